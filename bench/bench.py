"""`python -m bench` (`make bench`): images/second at every stage, side by side, in one run.

1. data pipelines alone: DALI raw (with and without augmentation) and encoded, on the GPU and
   the CPU, a plain-torch augmenter doing the same three augmentations on the same device, and
   the original design's Albumentations loader; beside them what a batch costs outside the
   graph: the numpy parameter draws, and an epoch's start (pipeline build, then reset);
2. the model's train step alone on device-resident batches of the dtype and layout training
   feeds each variant (eager fp32 NCHW / channels_last, eager bf16 channels_last, compiled bf16
   channels_last through the trainer's compile check) and inference;
3. end to end: `net.engine.train_epoch`, the very loop train.py runs (recipe optimizer and
   schedule, on-device metrics, log-step syncs), over the DALI loader, and its ratio to (2);
4. the limit: FLOPs and minimum bytes per training image against the device's measured
   matmul rate and copy bandwidth;
5. accuracy beside speed, from a training run's summary.json.

Device set-up is train.py's (`setup_env`: cuDNN autotune, TF32, bf16 autocast). Every figure:
warm-up first (compile, autotune, DALI start), then 5 timed repeats between synchronisations
over distinct batches; the median is reported with min and max. Each row is written to the
results files as soon as it is measured.
"""
import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from net import build_model, count_macs
from net.engine import (Config, Env, UserError, compile_checked, make_optimizer, make_scheduler, resolve, run_facts,
                        setup_env, train_epoch, train_step, write_atomic, write_json)
from net.model import activation_elements
from pipelines import MEAN, STD, Augment, DataError, load_cifar10, make_loader, synthetic_cifar
from pipelines.dali import draw_augment
from pipelines.data import decode_image

ROOT = Path(__file__).resolve().parents[1]


# --- timing ---------------------------------------------------------------------------------

def measure(step, *, images_per_step, steps, repeats, warmup, sync):
    """Median images/s of `step()` over `repeats` timed runs of `steps` calls, after `warmup` calls."""
    for _ in range(warmup):
        step()
    sync()
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()  # the work queued on the device is part of the time
        rates.append(images_per_step * steps / (time.perf_counter() - t0))
    return {"img_per_s": statistics.median(rates), "min": min(rates), "max": max(rates), "repeats": repeats,
            "batch": images_per_step}


def endless(loader):
    """Batches across epoch boundaries: a new epoch (and DALI pipeline) is part of the cost."""
    while True:
        yield from loader


# --- data -----------------------------------------------------------------------------------

def bench_data(path, n_encoded, n_synthetic):
    """(raw images, labels, encoded images, description): the real set if there, else synthetic."""
    if not Path(path).exists():
        images, labels = synthetic_cifar(n_synthetic)
        return images, labels, jpeg_encode(images[:n_encoded]), \
            f"synthetic_cifar({n_synthetic}), no CIFAR-10 at {path} (encoded: {n_encoded} of them as JPEG q75)"
    try:
        blobs, labels = load_cifar10(path, "train", encoded=True)
        images = np.stack([decode_image(b) for b in blobs])  # the pixels of the same files: one read of the copy
        return images, labels, blobs, f"CIFAR-10 train split from {path}"
    except DataError as e:
        if "not encoded images" not in str(e):
            raise  # a broken copy is the user's to fix, not a reason to bench something else
    images, labels = load_cifar10(path, "train")
    return images, labels, jpeg_encode(images[:n_encoded]), \
        f"CIFAR-10 train split from {path} (encoded: its first {n_encoded} images as JPEG q75)"


def jpeg_encode(images, quality=75):
    import io

    from PIL import Image

    out = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=quality)
        out.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
    return out


# --- 1. pipelines ---------------------------------------------------------------------------

def bench_dali(images, labels, device, batch, timing, augment=Augment()):
    loader = make_loader(images, labels, batch_size=batch, train=True, augment=augment, device=device,
                         dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    it = endless(loader)
    return measure(lambda: next(it), images_per_step=batch, **timing)


def bench_draws(batch=512, repeats=5, calls=50):
    """Milliseconds to draw one batch's augmentation parameters with numpy (the loader's callback)."""
    aug, times = Augment(), []
    for r in range(repeats):
        t0 = time.perf_counter()
        for i in range(calls):
            draw_augment(aug, batch, np.random.default_rng([0, r, 0, i]))  # seeded as the loader seeds it
        times.append((time.perf_counter() - t0) / calls * 1e3)
    return {"ms": statistics.median(times), "min": min(times), "max": max(times), "batch": batch}


def bench_epoch_start(images, labels, device, batch, repeats=5):
    """Milliseconds from `iter(loader)` to the first batch: building the pipeline (a new loader's
    first epoch) and resetting it (every later epoch)."""
    build, reset = [], []
    for _ in range(repeats):
        loader = make_loader(images, labels, batch_size=batch, train=True, device=device,
                             dtype=torch.bfloat16 if device == "cuda" else torch.float32)
        for times in (build, reset):
            t0 = time.perf_counter()
            it = iter(loader)
            next(it)
            times.append((time.perf_counter() - t0) * 1e3)
            for _ in it:  # finish the epoch: only a finished one is reset rather than rebuilt
                pass
        assert loader.builds == 1
    return {"build_ms": statistics.median(build), "reset_ms": statistics.median(reset), "batch": batch}


def torch_augment(x, aug, gen):
    """The same three augmentations in plain torch on a device-resident uint8 batch (B, 32, 32, 3)."""
    b, dev = len(x), x.device
    mean, std = (torch.tensor(v, device=dev).view(1, 3, 1, 1) for v in (MEAN, STD))
    x = (x.permute(0, 3, 1, 2).float() - mean) / std
    u = torch.rand(b, 9, device=dev, generator=gen)  # per image: 3 coins and 6 uniforms
    x = torch.where((u[:, 0] < aug.flip_p).view(-1, 1, 1, 1), x.flip(3), x)
    on = (u[:, 1] < aug.ssr_p).float()
    angle = (u[:, 2] * 2 - 1) * math.radians(aug.rotate) * on
    scale = 1 + (u[:, 3] * 2 - 1) * aug.scale * on
    shift = (u[:, 4:6] * 2 - 1) * aug.shift * 2 * on[:, None]  # affine_grid units: the image spans [-1, 1]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale  # destination -> source
    theta = torch.stack([torch.stack([cos, sin, -shift[:, 0]], 1), torch.stack([-sin, cos, -shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # 0 = mean
    centre = u[:, 6:8] * 32
    ys = torch.arange(32, device=dev).view(1, 32, 1)
    xs = torch.arange(32, device=dev).view(1, 1, 32)
    half = aug.cutout_size / 2
    hole = ((ys - centre[:, 0].view(-1, 1, 1)).abs() < half) & ((xs - centre[:, 1].view(-1, 1, 1)).abs() < half)
    hole &= (u[:, 8] < aug.cutout_p).view(-1, 1, 1)
    x = x.masked_fill(hole[:, None], 0.0)
    return x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)


def bench_torch_augment(images, device, batch, timing):
    """The plain-torch augmenter over a device-resident dataset: DALI's peer on every machine."""
    x_all = torch.as_tensor(images).to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    aug, n = Augment(), len(images)
    perm = torch.randperm(n, device=device, generator=gen)
    state = {"i": 0}

    def step():
        i = state["i"] % (n // batch)
        state["i"] += 1
        torch_augment(x_all[perm[i * batch:(i + 1) * batch]], aug, gen)

    return measure(step, images_per_step=batch, **timing)


class AlbumentationsSet(torch.utils.data.Dataset):
    """The original design's loader: per-image CPU augmentation in DataLoader workers."""

    def __init__(self, images, labels):
        import albumentations as A

        self.images, self.labels = images, labels
        self.transform = A.Compose([
            A.HorizontalFlip(p=0.5),
            A.ShiftScaleRotate(shift_limit=0.0625, scale_limit=0.1, rotate_limit=15, p=0.5),
            A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=(16, 16), hole_width_range=(16, 16),
                            fill=tuple(int(round(m)) for m in MEAN), p=0.5),
            A.Normalize(mean=[m / 255 for m in MEAN], std=[s / 255 for s in STD]),
        ])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = self.transform(image=self.images[i])["image"]
        return torch.from_numpy(x.transpose(2, 0, 1)), int(self.labels[i])


def bench_albumentations(images, labels, batch, timing):
    import warnings

    warnings.filterwarnings("ignore", message=".*ShiftScaleRotate.*")
    loader = torch.utils.data.DataLoader(AlbumentationsSet(images, labels), batch_size=batch, shuffle=True,
                                         drop_last=True, num_workers=os.cpu_count(), persistent_workers=True)
    it = endless(loader)
    return measure(lambda: next(it), images_per_step=batch, **timing)


# --- 2. model alone, 3. end to end -------------------------------------------------------------

def model_variants(device):
    """{key: (dtype, channels_last, compiled)} for this device; the last is what train.py runs there.

    Each variant gets the inputs training would feed it: the dtype and memory layout of its name.
    """
    if device == "cuda":
        return {"eager fp32 NCHW": (torch.float32, False, False),
                "eager bf16 channels_last": (torch.bfloat16, True, False),
                "compiled bf16 channels_last": (torch.bfloat16, True, True)}
    return {"eager fp32 NCHW": (torch.float32, False, False), "eager fp32 channels_last": (torch.float32, True, False)}


def prepare_model(cfg, env, key, notes):
    """(model, Env) for one variant, on the training Env's device settings. The compiled variant
    goes through the trainer's compile check (once per bench: its graphs serve every later use);
    a rejected compile is timed eager, and `notes` says so under the variant's key."""
    dtype, channels_last, compiled = model_variants(cfg.device)[key]
    variant_env = dataclasses.replace(env, dtype=dtype, autocast=env.autocast if dtype == torch.bfloat16
                                      else contextlib.nullcontext)
    torch.manual_seed(cfg.seed)
    model = build_model(dropout=cfg.dropout).to(cfg.device, memory_format=torch.channels_last if channels_last
                                                else torch.contiguous_format)
    if compiled:
        check = compile_checked(model, variant_env, eval_batch=cfg.batch_size, train_batch=cfg.batch_size,
                                mode=cfg.compile_mode)
        notes[key] = {"compiled": check.compiled, "graphs": check.graphs, "seconds": check.seconds,
                      "error": check.error, "eager_error": check.eager_error, "note": check.note}
        model = check.model
    return model, variant_env


def synthetic_batches(device, batch, dtype, channels_last, k=4):
    """k distinct device-resident batches, cycled: nothing measured from a single cached input."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return [(torch.randn(batch, 3, 32, 32, device=device).to(dtype).contiguous(memory_format=fmt),
             torch.randint(0, 10, (batch,), device=device)) for _ in range(k)]


def bench_model(cfg, env, models, timing, record):
    """Train step of every variant, then inference of the last (train.py's); `record(key, row)` each as measured."""
    for key, (dtype, channels_last, _) in model_variants(cfg.device).items():
        model, variant_env = models[key]
        optimizer = make_optimizer(cfg, model)
        batches, i = synthetic_batches(cfg.device, cfg.batch_size, dtype, channels_last), [0]

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
    loader = make_loader(images, labels, batch_size=cfg.batch_size, train=True, augment=Augment(), device=cfg.device,
                         dtype=env.dtype, num_threads=env.dali_threads)
    scheduler = make_scheduler(cfg, optimizer, len(loader))

    def epoch():
        train_epoch(model, optimizer, loader, env, scheduler=scheduler if cfg.schedule == "onecycle" else None,
                    label_smoothing=cfg.label_smoothing, log_every=cfg.log_every)

    result = measure(epoch, images_per_step=len(loader) * cfg.batch_size, steps=1, repeats=timing["repeats"],
                     warmup=1, sync=timing["sync"])
    return {**result, "batch": cfg.batch_size, "images_per_epoch": len(loader) * cfg.batch_size}


# --- 4. the limit ---------------------------------------------------------------------------

def bench_limit(device, dtype_bytes, sync, quick):
    n = 2048 if quick or device == "cpu" else 8192
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    mm = measure(lambda: a @ b, images_per_step=1, steps=3 if device == "cpu" else 20, repeats=5, warmup=2, sync=sync)
    src = torch.empty(64 * 2**20 if device == "cpu" else 1024 * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    cp = measure(lambda: dst.copy_(src), images_per_step=1, steps=5, repeats=5, warmup=2, sync=sync)
    model = build_model()
    macs = count_macs(model)
    flops = 3 * 2 * macs  # forward 2 FLOPs per MAC; backward twice the forward (input and weight grads)
    elements = activation_elements(model)
    # Each saved activation is written in forward and read in backward, and its gradient is written
    # and read once in backward: 4 touches per element at the training dtype, plus the uint8 image.
    bytes_per_image = 4 * dtype_bytes * elements + 3 * 32 * 32
    tflops, gbps = mm["img_per_s"] * 2 * n**3 / 1e12, cp["img_per_s"] * 2 * src.numel() / 1e9  # copy: read + write
    floor = min(tflops * 1e12 / flops, gbps * 1e9 / bytes_per_image)
    return {"macs_per_image": macs, "train_flops_per_image": flops, "activation_elements_per_image": elements,
            "train_bytes_per_image": bytes_per_image, "matmul_tflops": tflops, "copy_gb_per_s": gbps,
            "compute_bound_img_per_s": tflops * 1e12 / flops, "memory_bound_img_per_s": gbps * 1e9 / bytes_per_image,
            "floor_img_per_s": floor}


# --- 5. accuracy ------------------------------------------------------------------------------

def accuracy(train_first, data, device):
    if train_first:
        subprocess.run([sys.executable, str(ROOT / "train.py"), "--data", data, "--device", device], check=True, cwd=ROOT)
    summaries = sorted((ROOT / "runs").glob("*/summary.json"), key=lambda p: p.stat().st_mtime)
    if not summaries:
        return None
    s = json.loads(summaries[-1].read_text())
    return {"run": str(summaries[-1].parent.relative_to(ROOT)), "device": s["device"], "best_acc": s["best_acc"],
            "epochs_run": s["epochs_run"], "epoch_to_target": s["epoch_to_target"],
            "wall_s_to_target": s["wall_s_to_target"], "target_acc": s["target_acc"], "data": s["config"]["data"],
            "smoke": s["config"]["smoke"], "train_images": s.get("train_images"), "test_images": s.get("test_images")}


# --- the report -------------------------------------------------------------------------------

def figure(v):
    """Images/second as a person reads them: thousands separated, small rates with the digits they need."""
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def table(results):
    """The report as Markdown, from whatever `results` holds so far (a bench cut short still reports)."""
    rows = [("stage", "what", "img/s (median)", "min - max", "batch")]
    for stage in ("pipeline", "model"):
        for what, r in results[stage].items():
            rows.append((stage, what, figure(r["img_per_s"]), f"{figure(r['min'])} - {figure(r['max'])}", str(r["batch"])))
    e = results.get("end_to_end")
    if e:
        rows.append(("end to end", f"train_epoch on DALI raw ({e['model']})", figure(e["img_per_s"]),
                     f"{figure(e['min'])} - {figure(e['max'])}", str(e["batch"])))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines.append("")
    costs = results["costs"]
    if "augment draws" in costs:
        d = costs["augment draws"]
        lines.append(f"- augmentation parameters drawn with numpy: {d['ms']:.3f} ms per batch of {d['batch']} "
                     f"({d['min']:.3f} - {d['max']:.3f})")
    for what, c in costs.items():
        if what.startswith("epoch start"):
            lines.append(f"- {what}: {c['build_ms']:.1f} ms to build the pipeline (first epoch), {c['reset_ms']:.1f} ms "
                         f"to reset it (every later epoch), to the first batch of {c['batch']}")
    for key, c in results["compile"].items():
        lines.append(f"- compile check ({key}): " + (
            f"{c['graphs']} graphs in {c['seconds']:.1f} s; relative error against fp32 eager {c['error']:.2e} "
            f"(eager at training precision {c['eager_error']:.2e})" if c["compiled"] else c["note"]))
    if e:
        lines.append(f"- end to end / the same model variant alone: **{e['ratio_to_model']:.2f}** (the pipeline's and the "
                     f"loop's cost; epochs of {e['images_per_epoch']:,} images, recipe `{results['recipe']}`)")
    lim = results.get("limit")
    if lim and e:
        lines += [f"- limit: {lim['train_flops_per_image'] / 1e6:,.0f} MFLOP and {lim['train_bytes_per_image'] / 1e6:,.1f} MB "
                  f"per training image; measured {lim['matmul_tflops']:,.2f} TFLOP/s matmul and "
                  f"{lim['copy_gb_per_s']:,.1f} GB/s copy -> floor {figure(lim['floor_img_per_s'])} img/s "
                  f"(compute {figure(lim['compute_bound_img_per_s'])}, memory {figure(lim['memory_bound_img_per_s'])}); "
                  f"end to end reaches **{e['fraction_of_floor']:.1%}** of it",
                  "  (bytes: every conv output saved in forward, read in backward, its gradient written and read, "
                  "at the training dtype, plus the uint8 image)"]
    if "accuracy" in results:
        acc = results["accuracy"]
        if acc:
            reached = (f"{acc['target_acc']:.0%} at epoch {acc['epoch_to_target']} ({acc['wall_s_to_target']:.0f} s)"
                       if acc["epoch_to_target"] else f"{acc['target_acc']:.0%} not reached")
            size = f"{acc['train_images']:,} train / {acc['test_images']:,} test images" if acc["train_images"] \
                else "data size not recorded"
            lines.append(f"- accuracy of the newest run ({acc['run']}, {acc['device']}, {size}, {acc['epochs_run']} "
                         f"epochs{', generated smoke data' if acc['smoke'] else ''}): best {acc['best_acc']:.2%}; {reached}")
        else:
            lines.append("- accuracy: no training run found under runs/ (run `make train`, or `make bench ARGS=--train`)")
    lines += [f"- skipped: {k}: {v}" for k, v in results["skipped"].items()]
    if not results["complete"]:
        lines.append("- **incomplete**: the bench stopped before the end; the rows above are what it measured")
    lines.append(f"- {results['device']}, torch {results['torch']}, DALI {results['dali']}, commit {results['commit']}, "
                 f"{results['date']}; data: {results['data']}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true",
                        help="fewer, smaller steps, results in bench/results/quick/ (git ignores it): a smoke test of the bench")
    parser.add_argument("--data", default="data", help="CIFAR-10 for the pipeline figures (default: data; synthetic if absent)")
    parser.add_argument("--batch-size", type=int, default=None, help="train batch (default: 512 on cuda, 32 on cpu)")
    parser.add_argument("--train", action="store_true", help="run train.py (default recipe) first, for the accuracy row")
    parser.add_argument("--out", default=None, help="folder for the .json and .md results (default: bench/results, "
                        "bench/results/quick with --quick)")
    parser.add_argument("--tensorboard", default=str(ROOT / "bench" / "tensorboard"),
                        help="parent folder of the TensorBoard scalars (kept apart from training runs)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available; use --device cpu")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    args.out = args.out or str(ROOT / "bench" / "results" / ("quick" if args.quick else ""))
    try:
        return run(args)
    except (UserError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args):
    cpu = args.device == "cpu"
    # The default recipe, as train.py resolves it on this device, at the bench's batch size, with
    # train.py's device set-up (cuDNN autotune, TF32, bf16 autocast on CUDA).
    cfg = resolve(Config(device=args.device, batch_size=args.batch_size or (32 if cpu else 512)))
    env = setup_env(cfg)  # on CPU also the thread counts: torch on the idle cores, DALI one thread
    print(f"threads: torch {env.threads}, DALI {env.dali_threads} for end to end ({env.threads_why})", flush=True)
    timing = dict(repeats=5, warmup=(1 if args.quick else 2) if cpu else 10,
                  steps=(1 if args.quick else 3) if cpu else (10 if args.quick else 50),
                  sync=torch.cuda.synchronize if not cpu else (lambda: None))
    pipe_batch = 256 if cpu else 1024  # pipelines alone: their own good batch; DALI's fixed cost is per batch
    pipe_timing = {**timing, "steps": 4 if args.quick else 20, "warmup": 4}

    images, labels, blobs, what = bench_data(args.data, n_encoded=2048 if args.quick else 20_000,
                                             n_synthetic=8192 if args.quick else 50_000)
    need = max(pipe_batch, cfg.batch_size)
    if len(labels) < need or len(blobs) < pipe_batch:
        raise UserError(f"{args.data}: {min(len(labels), len(blobs))} train images, fewer than the {need} of one "
                        f"batch; bench a full copy of CIFAR-10 (or a missing --data path, for synthetic images)")
    # End to end on CPU: a few steps' worth of images per epoch (a whole one takes 20 minutes there).
    e2e_images = len(labels) if not cpu and not args.quick else cfg.batch_size * timing["steps"]
    print(f"bench on {args.device}: {what}", flush=True)
    facts = run_facts(env)
    if cpu:
        facts["device"] = f"cpu ({os.cpu_count()} cores)"
    facts["threads"] = {"torch": env.threads, "dali_end_to_end": env.dali_threads, "why": env.threads_why}
    results = {**facts, "date": datetime.date.today().isoformat(), "quick": args.quick, "data": what,
               "recipe": cfg.recipe, "complete": False, "pipeline": {}, "costs": {}, "model": {}, "compile": {},
               "skipped": {}}
    out = Path(args.out)
    stem = out / f"{results['date']}-{args.device}{'-quick' if args.quick else ''}"

    def save():  # after every row: a bench that fails or is killed keeps what it measured
        out.mkdir(parents=True, exist_ok=True)
        write_json(results, stem.with_suffix(".json"))
        write_atomic(stem.with_suffix(".md"), lambda tmp: Path(tmp).write_text(table(results) + "\n"))

    def record(section, key, row):
        results[section][key] = row
        print(f"  {key}: " + (f"{figure(row['img_per_s'])} img/s" if "img_per_s" in row else
                              ", ".join(f"{k} {v:.3g}" for k, v in row.items() if isinstance(v, float))), flush=True)
        save()

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    record("costs", "augment draws", bench_draws())
    for dev in ["cpu"] if cpu else ["cuda", "cpu"]:
        print(f"pipelines on {dev} ...", flush=True)
        record("pipeline", f"DALI raw, {dev}", bench_dali(images, labels, dev, pipe_batch, pipe_timing))
        record("pipeline", f"DALI raw, no augmentation, {dev}",
               bench_dali(images, labels, dev, pipe_batch, pipe_timing, augment=None))
        record("pipeline", f"DALI encoded (decode), {dev}",
               bench_dali(blobs, labels[:len(blobs)], dev, pipe_batch, pipe_timing))
        record("costs", f"epoch start, DALI raw, {dev}", bench_epoch_start(images[:4 * pipe_batch], labels[:4 * pipe_batch],
                                                                          dev, pipe_batch))
        record("pipeline", f"plain torch, {dev}", bench_torch_augment(images, dev, pipe_batch, pipe_timing))
    try:
        record("pipeline", f"Albumentations DataLoader, {os.cpu_count()} workers",
               bench_albumentations(images, labels, pipe_batch, pipe_timing))
    except ImportError:
        results["skipped"]["Albumentations loader"] = "not installed (pip install -e '.[baseline]')"

    print("model ...", flush=True)
    models = {key: prepare_model(cfg, env, key, results["compile"]) for key in model_variants(cfg.device)}
    bench_model(cfg, env, models, timing, lambda key, row: record("model", key, row))
    print("end to end ...", flush=True)
    trainer_key = list(model_variants(cfg.device))[-1]  # the variant train.py runs, compile check and all
    e2e = bench_end_to_end(cfg, *models[trainer_key], images[:e2e_images], labels[:e2e_images], timing)
    results["limit"] = bench_limit(args.device, 2 if not cpu else 4, timing["sync"], args.quick)
    same_model = results["model"][f"train, {trainer_key}"]["img_per_s"]  # the same variant, step alone
    results["end_to_end"] = {**e2e, "model": trainer_key, "ratio_to_model": e2e["img_per_s"] / same_model,
                             "fraction_of_floor": e2e["img_per_s"] / results["limit"]["floor_img_per_s"]}
    save()
    results["accuracy"] = accuracy(args.train, args.data, args.device)
    results["complete"] = True
    save()
    print("\n" + table(results))
    write_tensorboard(results, Path(args.tensorboard) / stem.name)
    print(f"\nwrote {stem}.json, {stem}.md and TensorBoard scalars in {Path(args.tensorboard) / stem.name}")
    return 0


def write_tensorboard(results, folder):
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(folder) as w:
        for stage in ("pipeline", "model"):
            for what, r in results[stage].items():
                w.add_scalar(f"{stage}/{what}", r["img_per_s"], 0)
        w.add_scalar("end_to_end/img_per_s", results["end_to_end"]["img_per_s"], 0)
        w.add_scalar("end_to_end/ratio_to_model", results["end_to_end"]["ratio_to_model"], 0)
        w.add_scalar("limit/fraction_of_floor", results["end_to_end"]["fraction_of_floor"], 0)
