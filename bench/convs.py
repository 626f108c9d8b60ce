"""`python -m bench.convs`: where a train step's time goes, conv by conv, in each implementation.

Each of the model's twelve convs alone (forward, then forward + backward with input and weight
gradients) at the training dtype, with train.py's device set-up (cuDNN autotune, TF32), in each
implementation that can run it: torch in channels_last (cuDNN) and in NCHW (PyTorch's own
depthwise kernel), and for the seven depthwise and grouped convs the project's Triton kernels in
both layouts (net/kernels.py; CUDA only). Beside each time, the share of it that the conv's own
memory traffic needs at the device's measured copy bandwidth (100%: memory speed): forward reads
x and writes y, backward reads x and dy and writes dx. The tile autotune picked for each Triton kernel and
shape (on CUDA). Then the profiler's top kernels over a few
eager train steps in the trainer's layout, with its convs as `--conv-impl` chooses them.

It repeats the measurement behind the 2026-11-26 H100 finding (bench/results/2026-11-26-h100-notes.md):
cuDNN's grouped and depthwise dilated convs ran 1.8-2.5x slower forward + backward in channels_last
than in NCHW, the 256-channel d5 one 13.49 ms against a memory time of about 0.45 ms.
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from engine.config import Config, resolve
from engine.convs import choose_convs
from engine.device import setup_env
from engine.loop import make_optimizer, train_step
from net import build_model
from net.kernels import dwconv, runs_kernels, tiles
from net.model import DepthwiseConv2d

from .model import copy_bandwidth
from .timing import measure

LAYOUTS = {"channels_last": torch.channels_last, "NCHW": torch.contiguous_format}
IMPLEMENTATIONS = ("torch channels_last", "torch NCHW", "triton channels_last", "triton NCHW")


def conv_rows(device, dtype, batch, timing, bandwidth=None):
    """[{"conv", impl: (forward ms, forward + backward ms), "memory_ms": (forward, forward + backward)}] for
    every conv of the model, in each implementation that runs it here (Triton: depthwise and grouped
    convs, where the kernels run). memory_ms: the conv's own traffic at `bandwidth` bytes/s."""
    rows = []
    triton = runs_kernels(device) and device.type == "cuda"  # the interpreter would time Python, not a kernel
    for k, c in enumerate(m for m in build_model().modules() if isinstance(m, torch.nn.Conv2d)):
        row = {"conv": f"{k}: {c.in_channels}->{c.out_channels}, k{c.kernel_size[0]}, dilation {c.dilation[0]}, "
                       f"groups {c.groups}"}
        for impl in IMPLEMENTATIONS:
            kind, layout = impl.split()
            if kind == "triton" and not (triton and isinstance(c, DepthwiseConv2d)):
                continue
            fmt = LAYOUTS[layout]
            weight = c.weight.detach().to(device, dtype).requires_grad_()
            x = torch.randn(batch, c.in_channels, 32, 32, device=device, dtype=dtype).contiguous(memory_format=fmt)
            grad = torch.randn(batch, c.out_channels, 32, 32, device=device, dtype=dtype).contiguous(memory_format=fmt)
            x.requires_grad_()

            def conv(x, c=c, weight=weight, kind=kind):
                if kind == "triton":
                    return dwconv(x, weight, c.dilation[0])
                return torch.nn.functional.conv2d(x, weight, padding=c.padding, dilation=c.dilation, groups=c.groups)

            def forward():
                with torch.no_grad():
                    conv(x)

            row[impl] = tuple(batch / measure(fn, images_per_step=batch, **timing)["img_per_s"] * 1e3
                              for fn in (forward, lambda: conv(x).backward(grad)))
        if bandwidth:
            x_bytes = batch * c.in_channels * 32 * 32 * dtype.itemsize
            y_bytes = x_bytes * c.out_channels // c.in_channels
            row["memory_ms"] = ((x_bytes + y_bytes) / bandwidth * 1e3, (3 * x_bytes + 2 * y_bytes) / bandwidth * 1e3)
        rows.append(row)
    return rows


def conv_table(rows, which):
    """Markdown: a row per conv, a column per implementation, `which` 0 (forward) or 1 (forward + backward);
    each cell the time in ms and, where known, the share of it that memory traffic needs."""
    impls = [i for i in IMPLEMENTATIONS if any(i in r for r in rows)]
    lines = ["| conv | " + " | ".join(f"{i} ms" for i in impls) + " | memory time ms |",
             "|---|" + "---|" * (len(impls) + 1)]
    for r in rows:
        memory = r.get("memory_ms", (None, None))[which]

        def cell(impl):
            if impl not in r:
                return ""
            ms = r[impl][which]
            return f"{ms:.3f}" + (f" ({memory / ms:.0%})" if memory else "")
        lines.append(f"| {r['conv']} | " + " | ".join(cell(i) for i in impls) + " | "
                     + (f"{memory:.3f}" if memory else "") + " |")
    return "\n".join(lines)


def tiles_table():
    """Markdown: the tile each Triton kernel ran with for each shape it met (autotune's pick on CUDA), or ""."""
    picked = tiles()
    if not any(picked.values()):
        return ""
    lines = ["| kernel | shape | tile |", "|---|---|---|"]
    return "\n".join(lines + [f"| {kind} | {shape} | {tile} |" for kind, shapes in picked.items()
                              for shape, tile in shapes.items()])


def top_kernels(cfg, env, steps=5, rows=15):
    """The profiler's table of the most expensive kernels (device time; CPU time on a CPU) over
    `steps` eager steps of the trainer's own `train_step` and optimizer, in its dtype and layout, its
    depthwise convs run as `cfg.conv_impl` chooses."""
    torch.manual_seed(cfg.seed)
    model = build_model(dropout=cfg.dropout).to(env.device, memory_format=env.memory_format)
    choose_convs(model, env, cfg.conv_impl, batch=cfg.batch_size)
    optimizer = make_optimizer(cfg, model)
    x = torch.randn(cfg.batch_size, 3, 32, 32,
                    device=env.device).to(env.dtype).contiguous(memory_format=env.memory_format)
    y = torch.randint(0, 10, (cfg.batch_size,), device=env.device)

    def step():
        train_step(model, optimizer, x, y, label_smoothing=cfg.label_smoothing, autocast=env.autocast)

    step()  # cuDNN autotune and the kernels' compilation outside the profile
    cuda = env.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=90)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.convs", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images per step (default: 512 on cuda, 16 on cpu)")
    parser.add_argument("--conv-impl", choices=["auto", "triton", "torch"], default="auto",
                        help="how the profiled train steps run their depthwise convs (default: auto, as train.py)")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                        help="profile the train steps in NCHW (default: channels_last, as train.py)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available; use --device cpu")
    cuda = args.device == "cuda"
    batch = args.batch_size or (512 if cuda else 16)
    cfg = resolve(Config(device=args.device, batch_size=batch, conv_impl=args.conv_impl,
                         channels_last=args.channels_last))
    env = setup_env(cfg)
    timing = dict(steps=10 if cuda else 1, repeats=5 if cuda else 3, warmup=3 if cuda else 1,
                  sync=torch.cuda.synchronize if cuda else (lambda: None))
    bandwidth = copy_bandwidth(env.device, timing)
    print(f"{env.name}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, {env.dtype}, batch {batch}; "
          f"ms per step, median of {timing['repeats']}; in brackets the share of it that the conv's memory traffic "
          f"needs at {bandwidth / 1e9:,.0f} GB/s (copy)\n", flush=True)
    rows = conv_rows(env.device, env.dtype, batch, timing, bandwidth)
    print("Forward\n\n" + conv_table(rows, 0) + "\n\nForward + backward (input and weight gradients)\n\n"
          + conv_table(rows, 1), flush=True)
    if tiles_table():
        print("\nThe Triton kernels' tiles (autotune's pick per shape, among net/kernels.py's TUNING):\n")
        print(tiles_table())
    print(f"\nTop kernels over 5 eager train steps, {env.precision_and_layout}, --conv-impl {cfg.conv_impl}:\n")
    print(top_kernels(cfg, env))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
