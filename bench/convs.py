"""`python -m bench.convs`: where a train step's time goes, conv by conv, in both memory layouts.

Each of the model's twelve convs alone (forward, then forward + backward with input and weight
gradients) at the training dtype, in NCHW and in channels_last, with train.py's device set-up
(cuDNN autotune, TF32); then the profiler's top kernels over a few eager train steps of the
trainer's layout. It repeats the measurement behind the 2026-11-26 H100 finding
(bench/results/2026-11-26-h100-notes.md): cuDNN's grouped and depthwise dilated convs ran
1.8-2.5x slower forward + backward in channels_last than in NCHW, and its layout transforms
(`tensorTransformGeneric`) took 29% of the step's GPU time.
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from engine.config import Config, resolve
from engine.device import setup_env
from engine.loop import make_optimizer, train_step
from net import build_model

from .timing import measure


def conv_rows(device, dtype, batch, timing):
    """[(conv, layout, forward ms, forward+backward ms)] for every conv of the model."""
    rows = []
    for k, c in enumerate(m for m in build_model().modules() if isinstance(m, torch.nn.Conv2d)):
        for layout, fmt in (("NCHW", torch.contiguous_format), ("channels_last", torch.channels_last)):
            conv = torch.nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, padding=c.padding, dilation=c.dilation,
                                   groups=c.groups, bias=False).to(device, dtype=dtype, memory_format=fmt)
            x = torch.randn(batch, c.in_channels, 32, 32, device=device, dtype=dtype).contiguous(memory_format=fmt)
            grad = torch.randn(batch, c.out_channels, 32, 32, device=device, dtype=dtype).contiguous(memory_format=fmt)
            x.requires_grad_()

            def forward():
                with torch.no_grad():
                    conv(x)

            ms = [batch / measure(fn, images_per_step=batch, **timing)["img_per_s"] * 1e3
                  for fn in (forward, lambda: conv(x).backward(grad))]
            what = f"{k}: {c.in_channels}->{c.out_channels}, k{c.kernel_size[0]}, dilation {c.dilation[0]}, groups {c.groups}"
            rows.append((what, layout, *ms))
    return rows


def top_kernels(cfg, env, steps=5, rows=15):
    """The profiler's table of the most expensive kernels (device time; CPU time on a CPU) over
    `steps` eager steps of the trainer's own `train_step` and optimizer, in its dtype and layout."""
    torch.manual_seed(cfg.seed)
    model = build_model(dropout=cfg.dropout).to(env.device, memory_format=env.memory_format)
    optimizer = make_optimizer(cfg, model)
    x = torch.randn(cfg.batch_size, 3, 32, 32, device=env.device).to(env.dtype).contiguous(memory_format=env.memory_format)
    y = torch.randint(0, 10, (cfg.batch_size,), device=env.device)

    def step():
        train_step(model, optimizer, x, y, label_smoothing=cfg.label_smoothing, autocast=env.autocast)

    step()  # cuDNN autotune outside the profile
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
    parser.add_argument("--batch-size", type=int, default=None, help="images per step (default: 512 on cuda, 16 on cpu)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available; use --device cpu")
    cuda = args.device == "cuda"
    batch = args.batch_size or (512 if cuda else 16)
    cfg = resolve(Config(device=args.device, batch_size=batch))
    env = setup_env(cfg)
    timing = dict(steps=10 if cuda else 1, repeats=5 if cuda else 3, warmup=3 if cuda else 1,
                  sync=torch.cuda.synchronize if cuda else (lambda: None))
    print(f"{env.name}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, {env.dtype}, batch {batch}; "
          f"ms per step, median of {timing['repeats']}\n")
    print("| conv | layout | forward ms | forward + backward ms |\n|---|---|---|---|")
    for what, layout, fwd, both in conv_rows(env.device, env.dtype, batch, timing):
        print(f"| {what} | {layout} | {fwd:.3f} | {both:.3f} |", flush=True)
    print(f"\nTop kernels over 5 eager train steps, {env.precision_and_layout}:\n")
    print(top_kernels(cfg, env))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
