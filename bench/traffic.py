"""`python -m bench.traffic`: the bytes the compiled training step moves per image, counted by Inductor.

An estimate, not a timing. After fusion, Inductor's scheduler knows every kernel of a compiled graph and
the buffers it reads and writes (`BaseSchedulerNode.get_read_write_buffers_sizes()`: "worst-case inputs,
best-case optimization"). A pass set as `torch._inductor.config._post_fusion_custom_pass` sees them all.
Summed over the training step as train.py compiles it (the model's forward and backward graphs, bf16
autocast, channels_last, static shapes; the loss stays eager, as in training) and divided by the batch,
that is what each training image costs in memory traffic, beside the floor model's bytes
(`bench.model.floor_bytes_per_image`: every conv output written and read once each way). On a GPU, where
this net is memory-bound, bytes over bandwidth bounds the step's rate: 65 MB per image at 4.3 TB/s allows
at most 66k images/second, whatever the kernels.

The count depends on the Inductor that made it: CPU and CUDA fuse slightly differently (the CPU's
scheduler has outer-loop fusion), so a CPU count is an estimate of the GPU's, and every row says which
device counted it. An op's tuple outputs (`MultiOutput` nodes) and no-op nodes are no kernels and are
not counted; an opaque op (cuDNN's conv, the project's Triton kernels) counts as one kernel with its own
inputs and outputs.

Each variant is counted in a fresh process: Dynamo's and Inductor's caches would otherwise skip the
scheduler, and on a CPU the Triton kernels need the interpreter chosen before Triton is first imported (there,
what they compute is left out: `shapes_only`).
"""
import argparse
import contextlib
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

from engine.cli import run_main
from engine.run import ROOT
from net import build_model
from net.model import depthwise_convs

# The trainer's model variants, by what runs their depthwise and grouped convs (`--conv-impl`).
VARIANTS = {"torch convs": dict(conv_impl="torch", fused=False), "triton convs": dict(conv_impl="triton", fused=False),
            "fused": dict(conv_impl="triton", fused=True)}
BATCH, QUICK_BATCH = 8, 2  # images per counted step; bytes scale with the batch, the per-image figure barely does
TOP = 10  # the largest kernels kept in the row
PROJECT_OPS = "extern torch.ops.dalicifar."  # how the project's torch.library ops are named among the kernels


def kernel_name(node):
    """A scheduler node as a person reads it: the opaque op it calls, or the aten ops fused into it."""
    from torch._inductor import ir

    if isinstance(node.node, ir.ExternKernel):
        return f"extern {node.node.python_kernel_name or type(node.node).__name__}"
    ops = {origin.meta["original_aten"]._overloadpacket.__name__ for part in node.get_nodes()
           for origin in getattr(part.node, "origins", ()) if origin.meta.get("original_aten") is not None}
    return " + ".join(sorted(ops)) or node.get_name()


def count_step(model, x, y, *, autocast):
    """[(kernel name, bytes read and written)] of one compiled training step of `model` on (x, y): the forward
    and backward graphs, in the order Inductor built them."""
    from torch._functorch import config as functorch
    from torch._inductor import config as inductor
    from torch._inductor import ir, scheduler

    counted = []

    def tally(nodes):
        for node in nodes:
            if isinstance(node, scheduler.NopKernelSchedulerNode) or isinstance(node.node, ir.MultiOutput):
                continue  # a view or an op's tuple element: no kernel, no bytes of its own
            counted.append((kernel_name(node), node.get_read_write_buffers_sizes()))
        return nodes

    torch._dynamo.reset()
    # No cache may answer for the compiler: a cached graph is never scheduled, so never counted.
    with inductor.patch(_post_fusion_custom_pass=tally, fx_graph_cache=False), \
            functorch.patch(enable_autograd_cache=False):
        compiled = torch.compile(model, dynamic=False)
        with autocast():
            loss = F.cross_entropy(compiled(x), y)
        loss.backward()
    return counted


@contextlib.contextmanager
def shapes_only():
    """The project's Triton kernels replaced, while counting on a CPU, by stand-ins that return zeros of the shapes
    they would write: the count is of Inductor's graphs, which never see the values, and Triton's interpreter would
    take many minutes on a real step (its cost is per operation; the fused backward recomputes dropout's Philox
    draws nine times a tile). The graphs, the ops and their shapes are the real ones."""
    from net import fused, kernels

    def zeros(*specs):
        return tuple(torch.zeros(shape, dtype=dtype, device=like.device).contiguous(memory_format=layout)
                     for shape, dtype, like, layout in specs)

    cl, plain, f32 = torch.channels_last, torch.contiguous_format, torch.float32

    def conv(y_prev, s, t, keep, weight, *dilation):
        n, _, h, w = y_prev.shape
        c = weight.shape[1] if dilation else weight.shape[0]  # a 3x3 weight is (9, C_out), a 1x1's (C_out, C_in)
        return zeros(((n, c, h, w), y_prev.dtype, y_prev, cl), ((c,), f32, s, plain), ((c,), f32, s, plain))

    def conv_backward(dy, dsum, dsumsq, y, y_prev, s, t, keep, weight, *dilation):
        c = y_prev.shape[1]
        return zeros((y_prev.shape, y_prev.dtype, y_prev, cl), ((c,), f32, s, plain), ((c,), f32, s, plain),
                     (weight.shape, weight.dtype, weight, plain))

    stand_ins = {fused: dict(dw_forward=conv, pw_forward=conv, dw_backward=conv_backward, pw_backward=conv_backward,
                             pool_forward=lambda y, s, t, keep: zeros(((y.shape[0], y.shape[1]), y.dtype, y,
                                                                       plain))[0],
                             pool_backward=lambda dp, y, s, t, keep: zeros(
                                 (y.shape, y.dtype, y, cl), ((y.shape[1],), f32, s, plain),
                                 ((y.shape[1],), f32, s, plain)),
                             keep_bits=lambda seeds, layer, p, n, c, h, w: torch.zeros(
                                 (n, h, w, (c + 31) // 32), dtype=torch.int32, device=seeds.device)),
                 kernels: dict(_forward=lambda x, weight, dilation: zeros(
                     ((x.shape[0], weight.shape[0], *x.shape[2:]), x.dtype, x, kernels.output_format(x)))[0],
                     _backward=lambda dy, x, weight, dilation: zeros(
                         (x.shape, x.dtype, x, kernels.output_format(x)), (weight.shape, weight.dtype, weight, plain)))}
    saved = {module: {name: getattr(module, name) for name in names} for module, names in stand_ins.items()}
    try:
        for module, names in stand_ins.items():
            for name, fn in names.items():
                setattr(module, name, fn)
        yield
    finally:
        for module, names in saved.items():
            for name, fn in names.items():
                setattr(module, name, fn)


def count_variant(key, device, batch):
    """The traffic row of one of VARIANTS, counted in this process on `device` (on a CPU, with `shapes_only`)."""
    from bench.model import floor_bytes_per_image

    device = torch.device(device)
    torch.manual_seed(0)
    model = build_model().to(device, memory_format=torch.channels_last)
    for conv in depthwise_convs(model).values():
        conv.impl = VARIANTS[key]["conv_impl"]
    model.fused = VARIANTS[key]["fused"]
    x = torch.randn(batch, 3, 32, 32, device=device).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    with shapes_only() if device.type == "cpu" else contextlib.nullcontext():
        counted = count_step(model, x, y, autocast=lambda: torch.autocast(device.type, dtype=torch.bfloat16))
    total = sum(b for _, b in counted)
    floor = floor_bytes_per_image(build_model(), dtype_bytes=2)  # unfused: its hooks see every conv
    top = sorted(counted, key=lambda k: -k[1])[:TOP]
    ours = [b for name, b in counted if name.startswith(PROJECT_OPS)]
    return {"kernels": len(counted), "bytes_per_image": total / batch, "floor_bytes_per_image": floor,
            "ratio_to_floor": total / batch / floor, "batch": batch, "counted_by": f"Inductor for {device.type}",
            "top": [{"kernel": name, "bytes_per_image": b / batch} for name, b in top],
            # the project's own ops (net/kernels.py, net/fused.py) apart: bench/roofline.py counts their kernels
            # itself, and takes the rest, Inductor's kernels and torch's, at these bytes
            "project_ops": {"kernels": len(ours), "bytes_per_image": sum(ours) / batch}}


def traffic_rows(device, batch, variants=tuple(VARIANTS)):
    """{variant: row}, each counted in a fresh process (the module docstring says why); yields as counted."""
    env = dict(os.environ)
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"  # the Triton kernels on CPU tensors: their ops, not F.conv2d's
    for key in variants:
        r = subprocess.run([sys.executable, "-m", "bench.traffic", "--device", device, "--batch-size", str(batch),
                            "--variant", key, "--json"], capture_output=True, text=True, env=env, cwd=ROOT)
        if r.returncode != 0:
            raise RuntimeError(f"counting the traffic of {key} failed: {r.stderr.strip()[-2000:]}")
        yield key, json.loads(r.stdout.splitlines()[-1])


def traffic_line(key, row):
    """One line per variant, for the bench's notes and this module's output."""
    return (f"{key}: {row['kernels']} kernels, {row['bytes_per_image'] / 1e6:.1f} MB per training image, "
            f"{row['ratio_to_floor']:.1f}x the floor model's {row['floor_bytes_per_image'] / 1e6:.1f} MB "
            f"(compiled bf16 channels_last step at batch {row['batch']}, counted by {row['counted_by']}: an "
            f"estimate, not a timing)")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.traffic", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu",
                        help="whose Inductor counts (default: cuda where there is one)")
    parser.add_argument("--batch-size", type=int, default=None, help=f"images per step (default {BATCH}; "
                        f"{QUICK_BATCH} with --quick)")
    parser.add_argument("--quick", action="store_true", help="a smaller batch: a smoke test")
    parser.add_argument("--variant", choices=list(VARIANTS), action="append",
                        help="count only this variant (again for more; default: all)")
    parser.add_argument("--json", action="store_true", help="print each row as JSON (one line each) instead")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available; use --device cpu")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    batch = args.batch_size or (QUICK_BATCH if args.quick else BATCH)

    def run():
        variants = args.variant or list(VARIANTS)
        if args.json:  # the worker: this process counts, once per variant asked for (the bench asks for one)
            for key in variants:
                print(json.dumps(count_variant(key, args.device, batch)), flush=True)
            return 0
        print(f"Inductor's count of the compiled training step on {args.device}, batch {batch} (an estimate of the "
              f"memory traffic, not a timing); each variant in its own process, a minute or two on a CPU", flush=True)
        for key, row in traffic_rows(args.device, batch, variants):
            print(f"\n{traffic_line(key, row)}\n  largest kernels, MB per image:", flush=True)
            for k in row["top"]:
                print(f"    {k['bytes_per_image'] / 1e6:6.2f}  {k['kernel']}")
        return 0

    return run_main(lambda _: run())


if __name__ == "__main__":
    raise SystemExit(main())
