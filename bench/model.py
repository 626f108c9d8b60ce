"""Bench rows for the model: its train step alone in each variant (dtype, layout, compiled, conv
implementation), on device-resident batches, and inference; end to end (`engine.loop.train_epoch`, the very loop
train.py runs, over the DALI loader); and the limit the device allows (FLOPs and bytes per image
against its measured matmul rate and copy bandwidth)."""
import contextlib
import dataclasses
from dataclasses import dataclass

import torch

from engine.config import augment
from engine.convs import choose_convs, choose_fused
from engine.device import compile_checked, memory_format
from engine.loop import make_optimizer, make_schedule, train_epoch, train_step
from net import build_model, count_macs
from net.model import activation_elements
from pipelines import make_loader

from .timing import measure


@dataclass(frozen=True)
class Variant:
    """How one model row runs: the batches' dtype and layout, compiled or not, `--conv-impl` and `--fuse`."""
    dtype: torch.dtype
    channels_last: bool
    compiled: bool
    convs: str = "torch"
    fuse: str = "off"


def model_variants(device):
    """{key: Variant} for this device; the last is what train.py runs there (its convs chosen as
    `--conv-impl auto` chooses them, and fused or not as `--fuse auto` chooses, at start, by timing
    both). Each variant gets the inputs training would feed it: the dtype and memory layout of its name."""
    fp32, bf16 = torch.float32, torch.bfloat16
    if device == "cuda":
        # Both layouts, both conv implementations: on an H100 (2026-11-26) cuDNN's grouped and depthwise
        # dilated convs ran 1.8-2.5x slower forward + backward in channels_last than in NCHW.
        return {"eager fp32 NCHW": Variant(fp32, False, False),
                "eager bf16 NCHW": Variant(bf16, False, False),
                "eager bf16 channels_last": Variant(bf16, True, False),
                "eager bf16 NCHW, triton convs": Variant(bf16, False, False, "triton"),
                "eager bf16 channels_last, triton convs": Variant(bf16, True, False, "triton"),
                "compiled bf16 NCHW": Variant(bf16, False, True),  # --no-channels-last: Inductor kept to NCHW
                "compiled bf16 channels_last": Variant(bf16, True, True),
                "compiled bf16 NCHW, triton convs": Variant(bf16, False, True, "triton"),
                "compiled bf16 channels_last, fused": Variant(bf16, True, True, "triton", "on"),  # net/fused.py
                "compiled bf16 channels_last, auto convs, auto fuse": Variant(bf16, True, True, "auto", "auto")}
    # A CPU trains fp32: without AVX512-BF16 or AMX, PyTorch's bf16 matmul is its reference loop (0.3 GFLOP/s against
    # 112 in fp32 on the 2-core AMD EPYC of 2026-12-07). The last: the fused path's C++ kernels (net/cpu.py).
    return {"eager fp32 NCHW": Variant(fp32, False, False),
            "eager fp32 channels_last": Variant(fp32, True, False, "auto"),
            "eager fp32 channels_last, fused (C++ kernels)": Variant(fp32, True, False, "auto", "auto")}


def prepare_model(cfg, env, key, results):
    """(model, Env) for one variant, on the training Env's device settings: its convs chosen by the
    trainer's `choose_convs` (their choice in results["convs"]), fused or not by its `choose_fused`
    (results["fuse"]), then, compiled, through the trainer's
    compile check (once per bench: its graphs serve every later use; results["compile"] has its
    verdict, and a rejected compile is timed eager)."""
    v = model_variants(cfg.device)[key]
    variant_env = dataclasses.replace(env, dtype=v.dtype, autocast=env.autocast if v.dtype == torch.bfloat16
                                      else contextlib.nullcontext,
                                      memory_format=memory_format(v.channels_last),
                                      batch=cfg.batch_size)
    torch.manual_seed(cfg.seed)
    model = build_model(dropout=cfg.dropout).to(cfg.device, memory_format=variant_env.memory_format)
    choice = choose_convs(model, variant_env, v.convs, batch=cfg.batch_size)
    results["convs"][key] = {"line": choice.line(), "impl": choice.impl, "ms": choice.ms, "notes": choice.notes,
                            "tiles": choice.tiles}
    fuse = choose_fused(model, variant_env, v.fuse, batch=cfg.batch_size, compiled=v.compiled, mode=cfg.compile_mode)
    results.setdefault("fuse", {})[key] = {"fused": fuse.fused, "line": fuse.line(), "ms": fuse.ms}
    if v.compiled:
        check = compile_checked(model, variant_env, eval_batch=cfg.batch_size, train_batch=cfg.batch_size,
                                mode=cfg.compile_mode)
        results["compile"][key] = {"compiled": check.compiled, "graphs": check.graphs, "seconds": check.seconds,
                                   "error": check.error, "eager_error": check.eager_error, "note": check.note}
        model = check.model
    return model, variant_env


def synthetic_batches(device, batch, dtype, channels_last, k=4):
    """k distinct device-resident batches, cycled: nothing measured from a single cached input."""
    return [(torch.randn(batch, 3, 32, 32,
                         device=device).to(dtype).contiguous(memory_format=memory_format(channels_last)),
             torch.randint(0, 10, (batch,), device=device)) for _ in range(k)]


def bench_model(cfg, env, models, timing, record):
    """Train step of every variant, then inference of the last (train.py's); `record(key, row)` each as measured."""
    for key, v in model_variants(cfg.device).items():
        model, variant_env = models[key]
        optimizer = make_optimizer(cfg, model)
        batches, i = synthetic_batches(cfg.device, cfg.batch_size, v.dtype, v.channels_last), [0]

        def step():
            x, y = batches[i[0] % len(batches)]
            i[0] += 1
            train_step(model, optimizer, x, y, label_smoothing=cfg.label_smoothing, autocast=variant_env.autocast)

        record(f"train, {key}", measure(step, images_per_step=cfg.batch_size, **timing))
    record(f"inference, {key}", bench_inference(model.eval(), variant_env, batches, cfg.batch_size, timing))
    model.train()


@torch.no_grad()
def bench_inference(model, env, batches, batch, timing):
    i = [0]

    def infer():
        x, _ = batches[i[0] % len(batches)]
        i[0] += 1
        with env.autocast():
            model(x)

    return measure(infer, images_per_step=batch, **timing)


def bench_end_to_end(cfg, model, env, images, labels, timing):
    """train.py's epoch, timed whole: `train_epoch` over the DALI raw loader, recipe optimizer and schedule.

    One timed repeat is one epoch of `images` (the pipeline reset between epochs, as in training).
    """
    model.train()
    optimizer = make_optimizer(cfg, model)
    loader = make_loader(images, labels, batch_size=cfg.batch_size, train=True, augment=augment(cfg),
                         **env.loader_args(cfg.seed))
    schedule = make_schedule(cfg, optimizer, len(loader))

    def epoch():
        train_epoch(model, optimizer, loader, env, schedule=schedule, label_smoothing=cfg.label_smoothing,
                    log_every=cfg.log_every)

    result = measure(epoch, images_per_step=len(loader) * cfg.batch_size, steps=1, repeats=timing["repeats"],
                     warmup=1, sync=timing["sync"])
    return {**result, "batch": cfg.batch_size, "images_per_epoch": len(loader) * cfg.batch_size}


def copy_bandwidth(device, timing):
    """Bytes per second a device-to-device copy moves (read + write): the memory floor's rate."""
    device = torch.device(device)
    src = torch.empty((64 if device.type == "cpu" else 1024) * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return measure(lambda: dst.copy_(src), images_per_step=2 * src.numel(), **timing)["img_per_s"]


def floor_bytes_per_image(model, dtype_bytes):
    """The floor model's memory traffic of one training image: each saved activation (every conv output) is
    written in forward and read in backward, and its gradient written and read once in backward: 4 touches per
    element at the training dtype, plus the uint8 image."""
    return 4 * dtype_bytes * activation_elements(model) + 3 * 32 * 32


def matmul_tflops(device, dtype, n, sync):
    """TFLOP/s of an n x n matmul into a preallocated output, median of 5 after warm-up."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty_like(a)
    mm = measure(lambda: torch.mm(a, b, out=out), images_per_step=1, steps=3 if device == "cpu" else 20, repeats=5,
                 warmup=2, sync=sync)
    return mm["img_per_s"] * 2 * n**3 / 1e12


def bench_limit(device, dtype_bytes, sync, quick):
    """The floor: FLOPs per image at the training dtype's measured matmul rate, bytes at the measured copy
    bandwidth. On a CPU the matmul is 2048 wide in both runs (1024 read 0.08 TFLOP/s where 2048 reads the CPU's
    rate), and bf16's rate beside fp32's: the CPU trains fp32, and bf16 is only worth it where the CPU has it."""
    n = 2048 if device == "cpu" else 1024 if quick else 8192
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tflops = matmul_tflops(device, dtype, n, sync)
    other = {}
    if device == "cpu":  # without native bf16, PyTorch's reference loop: a small matmul says so in a second
        native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        other = {"bf16_matmul_tflops": matmul_tflops(device, torch.bfloat16, n if native else 256, sync),
                 "bf16": "native" if native else "reference loop"}
    bandwidth = copy_bandwidth(device, dict(steps=5, repeats=5, warmup=2, sync=sync))
    model = build_model()
    macs = count_macs(model)
    flops = 3 * 2 * macs  # forward 2 FLOPs per MAC; backward twice the forward (input and weight grads)
    elements = activation_elements(model)
    bytes_per_image = floor_bytes_per_image(model, dtype_bytes)
    gbps = bandwidth / 1e9
    floor = min(tflops * 1e12 / flops, gbps * 1e9 / bytes_per_image)
    return {**other, "macs_per_image": macs, "train_flops_per_image": flops, "activation_elements_per_image": elements,
            "train_bytes_per_image": bytes_per_image, "matmul_tflops": tflops, "copy_gb_per_s": gbps,
            "compute_bound_img_per_s": tflops * 1e12 / flops, "memory_bound_img_per_s": gbps * 1e9 / bytes_per_image,
            "floor_img_per_s": floor}
