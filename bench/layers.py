"""`python -m bench.layers`: where a CPU training step's time goes, a layer at a time, beside each layer's floor.

Each row is one conv with what is fused to it (BatchNorm + ReLU + dropout as one op), run by `net.cpu.layer_forward`:
the very function the fused CPU path runs for that layer in training. It is timed on its own on a batch of the
layer's input shape: forward (building the autograd graph, as training does), then forward + backward with a random
output gradient; the backward is the difference. Beside it, the layer's floor, the larger of
- its FLOPs (forward 2 per MAC, backward twice that: input and weight gradients) at the measured matmul rate, and
- its bytes at the measured copy bandwidth, counted as the bench's limit line counts them: the layer's output
  written in forward and read in backward, its gradient written and read, 4 fp32 touches an element.
The sum of the floors is what the layers would take run one after another at the machine's rates; `x floor` says how
far each layer is above its own. "the rest" is the whole fused training step (`engine.loop.train_step`) less the
layers: the head, pooling, loss, the optimizer step.

`make bench` adds this table to its report on a CPU; alone it takes a minute: `python -m bench.layers`.
"""
import argparse
import sys

import torch

from engine.cli import run_main
from engine.config import Config, UserError, resolve
from engine.device import setup_env
from engine.loop import make_optimizer, train_step
from engine.results import markdown_table
from net import build_model

from .timing import measure

BLOCK_PARTS = ("3x3", "depthwise 3x3", "1x1")  # each block's three convs, in order


def describe(i, conv):
    """(name, what runs the conv) of layer i: "C2 grouped 3x3 d2, 32->64", "the C++ kernel"."""
    block, part = divmod(i, 3)
    if part == 0:
        kind = "3x3" if block == 0 else "grouped 3x3"
    else:
        kind = BLOCK_PARTS[part]
    shape = f"{conv.in_channels}->{conv.out_channels}" if conv.in_channels != conv.out_channels or part == 2 \
        else f"{conv.out_channels}"
    dilation = f" d{conv.dilation[0]}" if conv.kernel_size != (1, 1) else ""
    runs = "F.conv2d" if i == 0 else "torch.mm" if conv.kernel_size == (1, 1) else "C++ kernel"
    return f"C{block + 1} {kind}{dilation}, {shape}", runs


def layer_input(i, conv, batch, size=32):
    """A batch as layer i receives it in training: the image (N, 3, H, W) channels_last for the first, else the
    previous layer's NHWC activation (non-negative: after ReLU), which takes a gradient."""
    if i == 0:
        return torch.randn(batch, conv.in_channels, size, size).contiguous(memory_format=torch.channels_last)
    return torch.randn(batch, size, size, conv.in_channels).relu_().requires_grad_()


def time_layer(i, modules, batch, p, timing):
    """{"forward_ms", "backward_ms"} per image of layer i (its modules: conv, BatchNorm, ReLU, Dropout)."""
    from net import cpu

    a = layer_input(i, modules[0], batch)
    grad = torch.randn(batch, 32, 32, modules[0].out_channels)  # every layer's output: NHWC
    forward = measure(lambda: cpu.layer_forward(i, modules, a, 12345, p), images_per_step=batch, **timing)
    both = measure(lambda: cpu.layer_forward(i, modules, a, 12345, p).backward(grad), images_per_step=batch, **timing)
    fwd_ms, total_ms = 1e3 / forward["img_per_s"], 1e3 / both["img_per_s"]
    return {"forward_ms": fwd_ms, "backward_ms": total_ms - fwd_ms, "total_ms": total_ms}


def floor_ms(conv, matmul_tflops, copy_gb_per_s, size=32):
    """(floor ms per image, "matmul" or "memory", FLOPs, bytes) of one layer; see the module's docstring."""
    flops = 3 * 2 * conv.weight.numel() * size * size
    bytes_ = 4 * 4 * conv.out_channels * size * size
    compute, memory = flops / (matmul_tflops * 1e9), bytes_ / (copy_gb_per_s * 1e6)
    return max(compute, memory), "matmul" if compute >= memory else "memory", flops, bytes_


def layer_rows(batch, p, timing, matmul_tflops, copy_gb_per_s, step_ms=None):
    """[{"layer", "runs", "forward_ms", "backward_ms", "total_ms", "floor_ms", "bound", "flops", "bytes"}]: a row a
    layer, then "the rest" (the step, `step_ms` per image, less the layers) where the step was timed."""
    from net import cpu

    torch.manual_seed(0)
    model = build_model(dropout=p)
    rows = []
    for i, modules in enumerate(cpu.layers(model)):
        name, runs = describe(i, modules[0])
        floor, bound, flops, bytes_ = floor_ms(modules[0], matmul_tflops, copy_gb_per_s)
        rows.append({"layer": name, "runs": runs, **time_layer(i, modules, batch, p, timing), "floor_ms": floor,
                     "bound": bound, "flops": flops, "bytes": bytes_})
    if step_ms is not None:
        rows.append({"layer": "the rest", "runs": "head, pooling, loss, optimizer",
                     "total_ms": step_ms - sum(r["total_ms"] for r in rows)})
    return rows


def fused_step_ms(batch, p, timing):
    """ms per image of the whole fused training step (train.py's on a CPU), the recipe's optimizer."""
    cfg = resolve(Config(device="cpu", batch_size=batch, dropout=p))
    torch.manual_seed(0)
    model = build_model(dropout=p).to(memory_format=torch.channels_last)
    model.fused = True
    optimizer = make_optimizer(cfg, model)
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    rate = measure(lambda: train_step(model, optimizer, x, y, label_smoothing=cfg.label_smoothing),
                   images_per_step=batch, **timing)["img_per_s"]
    return 1e3 / rate


def layers_table(rows):
    """The rows as Markdown, with a total."""
    table = [("layer", "conv runs on", "forward ms/img", "backward ms/img", "total ms/img", "floor ms/img", "bound",
              "x floor")]
    for r in rows:
        if "floor_ms" in r:
            table.append((r["layer"], r["runs"], f"{r['forward_ms']:.3f}", f"{r['backward_ms']:.3f}",
                          f"{r['total_ms']:.3f}", f"{r['floor_ms']:.3f}", r["bound"],
                          f"{r['total_ms'] / r['floor_ms']:.1f}"))
        else:
            noise = " (below 0: the layers timed alone sum past the step, within noise)" if r["total_ms"] < 0 else ""
            table.append((r["layer"], r["runs"] + noise, "", "", f"{r['total_ms']:.3f}", "", "", ""))
    layers = [r for r in rows if "floor_ms" in r]
    total, floor = sum(r["total_ms"] for r in rows), sum(r["floor_ms"] for r in layers)
    table.append(("all", "", f"{sum(r['forward_ms'] for r in layers):.3f}",
                  f"{sum(r['backward_ms'] for r in layers):.3f}", f"{total:.3f}", f"{floor:.3f}", "",
                  f"{total / floor:.1f}"))
    return markdown_table(table)


def cpu_kernels_missing():
    """Why the fused CPU path's kernels cannot run here, in one line, or "" where they can."""
    from net import cpu

    return cpu.available()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.layers", description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64, help="images a call (default 64, the CPU bench's)")
    parser.add_argument("--dropout", type=float, default=None, help="default: the fast recipe's")
    args = parser.parse_args(argv)

    def run(_):
        from .model import copy_bandwidth, matmul_tflops

        if cpu_kernels_missing():
            raise UserError(f"the fused CPU path's kernels: {cpu_kernels_missing()}; there is nothing to time here")
        cfg = resolve(Config(device="cpu", batch_size=args.batch_size, dropout=args.dropout))
        env = setup_env(cfg)
        timing = dict(steps=3, repeats=5, warmup=2, sync=lambda: None)
        tflops = matmul_tflops("cpu", torch.float32, 2048, timing["sync"])
        gbps = copy_bandwidth("cpu", timing) / 1e9
        print(f"{env.threads} threads, batch {args.batch_size}, dropout {cfg.dropout}: matmul {tflops * 1e3:.0f} "
              f"GFLOP/s, copy {gbps:.1f} GB/s", flush=True)
        rows = layer_rows(args.batch_size, cfg.dropout, timing, tflops, gbps,
                          fused_step_ms(args.batch_size, cfg.dropout, timing))
        print(layers_table(rows))
        return 0

    return run_main(run)


if __name__ == "__main__":
    sys.exit(main())
