"""Which implementation runs each depthwise conv (`--conv-impl`), and whether the convs run fused with their
BatchNorm, ReLU and dropout (`--fuse`): decided once, at start, on the run's shapes.

- "torch": F.conv2d everywhere (cuDNN in channels_last, PyTorch's own kernel in NCHW);
- "triton": the project's kernels (net/kernels.py) on every depthwise and grouped conv, each first
  checked against F.conv2d; one that disagrees falls back to torch, with a note;
- "auto": checked likewise, then both timed forward + backward per layer, and the faster kept:
  cuDNN's autotuner, across implementations. On CUDA only: elsewhere, torch.

`choose_convs` sets each layer's `DepthwiseConv2d.impl`, `choose_fused` sets `Net.fused`; each returns what it
chose, for the start line, summary.json and TensorBoard's hparams. The bench and gpu-check call the same
functions.
"""
import contextlib
import copy
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from net.kernels import HAVE_TRITON, dwconv, dwconv_op, dwconv_reference, runs_kernels, tiles
from net.model import depthwise_convs

from .device import relative_error

IMPLEMENTATIONS = {"triton": dwconv, "torch": dwconv_reference}  # (x, weight, dilation) -> y
# Where auto times the kernels: on a CPU they run only in Triton's interpreter (for tests), which would
# take minutes to lose to F.conv2d.
AUTO_DEVICES = ("cuda",)


@dataclass
class ConvChoice:
    """What `choose_convs` decided: per layer, the implementation and why."""
    impl: dict = field(default_factory=dict)  # layer name -> "triton" or "torch"
    # layer name -> the kernels' worst relative error against fp32 / F.conv2d's
    errors: dict = field(default_factory=dict)
    ms: dict = field(default_factory=dict)  # layer name -> {"triton": ms, "torch": ms}, forward + backward (auto only)
    notes: list = field(default_factory=list)  # fallbacks, one line each
    tiles: dict = field(default_factory=dict)  # kernel -> {shape: tile}: autotune's picks on CUDA (net/kernels.py)
    why: str = ""  # how the choice was made, for the start line

    def line(self):
        """One line for the start of a run: each layer's implementation, and the times that chose it."""
        impls = set(self.impl.values())
        if len(impls) == 1 and not self.ms:
            return f"{impls.pop()} for all {len(self.impl)} depthwise and grouped convs ({self.why})"

        def one(name):
            t = self.ms.get(name)
            return f"{name} {self.impl[name]}" + (f" {t['triton']:.2f}/{t['torch']:.2f} ms" if t else "")
        return ", ".join(one(name) for name in self.impl) + f" ({self.why})"

    def tiles_line(self):
        """The kernels' tiles in one line, each with how many shapes it was picked for; "" where none ran."""
        def picks(shapes):
            if len(shapes) == 1:
                return "{1} ({0})".format(*next(iter(shapes.items())))
            counts = {tile: list(shapes.values()).count(tile) for tile in dict.fromkeys(shapes.values())}
            return ", ".join(f"{tile} ({n} shape{'s' * (n > 1)})" for tile, n in counts.items())
        return "; ".join(f"{kernel} {picks(shapes)}" for kernel, shapes in self.tiles.items() if shapes)


def check_layer(conv, *, batch, size, dtype, memory_format, device, seed=0):
    """(kernels' error, F.conv2d's error): each the worst, over the output and both gradients, of the
    relative error against fp32 F.conv2d, for `conv`'s weights on random inputs of this shape."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(batch, conv.in_channels, size, size, device=device, generator=gen)
    dy = torch.randn(batch, conv.out_channels, size, size, device=device, generator=gen)
    weight, dilation = conv.weight.detach(), conv.dilation[0]

    def run(fn, dtype):
        xi = x.to(dtype).contiguous(memory_format=memory_format).requires_grad_()
        wi = weight.to(dtype).requires_grad_()
        y = fn(xi, wi, dilation)
        return (y, *torch.autograd.grad(y, (xi, wi), dy.to(dtype).contiguous(memory_format=memory_format)))

    reference = run(dwconv_reference, torch.float32)
    kernels, torch_at_dtype = run(dwconv_op, dtype), run(dwconv_reference, dtype)
    return (max(relative_error(a, r) for a, r in zip(kernels, reference)),
            max(relative_error(a, r) for a, r in zip(torch_at_dtype, reference)))


def time_layer(conv, impl, *, batch, size, dtype, memory_format, device, sync, calls=5, repeats=5):
    """Median milliseconds of one forward + backward of `conv` run by `impl`, after a warm-up."""
    x = torch.randn(batch, conv.in_channels, size, size, device=device, dtype=dtype)
    x = x.contiguous(memory_format=memory_format).requires_grad_()
    dy = torch.randn(batch, conv.out_channels, size, size, device=device,
                     dtype=dtype).contiguous(memory_format=memory_format)
    weight, run = conv.weight.detach().to(dtype).requires_grad_(), IMPLEMENTATIONS[impl]

    def step():
        torch.autograd.grad(run(x, weight, conv.dilation[0]), (x, weight), dy)

    step()  # compiles the kernel, lets cuDNN pick its algorithm
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            step()
        sync()  # the queued work is part of the time
        times.append((time.perf_counter() - t0) / calls * 1e3)
    return statistics.median(times)


def choose_convs(model, env, want, *, batch, size=32):
    """Set each depthwise conv's implementation for `want` (auto, triton or torch), checked and (auto)
    timed at `batch` images of size x size in the run's dtype and layout; returns the ConvChoice."""
    layers = depthwise_convs(model)
    shape = dict(batch=batch, size=size, dtype=env.dtype, memory_format=env.memory_format, device=env.device)
    usable = runs_kernels(env.device) and (want == "triton" or want == "auto" and env.device.type in AUTO_DEVICES)
    why = f"--conv-impl {want}"
    if usable:
        why += ", checked against F.conv2d" + (f", timed forward + backward at batch {batch} (triton/torch)"
                                               if want == "auto" else "")
    elif want == "auto":
        why += ": Triton is not installed" if not HAVE_TRITON else ": the kernels are timed on CUDA only"
    choice = ConvChoice(why=why)
    for name, conv in layers.items():
        impl = "torch"
        if usable:
            error, torch_error = check_layer(conv, **shape)
            choice.errors[name] = error
            if error > 2 * torch_error + 1e-4:  # the compile check's rule: at most twice F.conv2d's rounding
                choice.notes.append(f"the Triton kernel disagrees with F.conv2d on {name} (relative error {error:.1e}, "
                                    f"F.conv2d's own {torch_error:.1e}): torch there")
            elif want == "triton":
                impl = "triton"
            else:
                ms = {k: time_layer(conv, k, sync=env.sync, **shape) for k in ("triton", "torch")}
                choice.ms[name], impl = ms, min(ms, key=ms.get)
        choice.impl[name] = impl
    if usable:  # what each kernel ran with: autotune picked it on the checks' and timings' shapes, the run's
        choice.tiles = tiles()
    if env.ddp:  # rank 0's choice on every rank: one model, whatever each rank's timings said
        shared = [choice]
        dist.broadcast_object_list(shared, src=0)
        choice = shared[0]
    for name, conv in layers.items():
        conv.impl = choice.impl[name]
    return choice


# --- --fuse: the fused path (net/fused.py) ----------------------------------------------------------

@dataclass
class FuseChoice:
    """What `choose_fused` decided, and why."""
    fused: bool = False
    why: str = ""
    error: float = None  # the fused path's worst relative error against the unfused model in float64
    unfused_error: float = None  # the unfused model's own, at the run's precision
    ms: dict = field(default_factory=dict)  # {"fused": ms, "unfused": ms} per training step (auto on CUDA)

    def line(self):
        errors = (f"; error against float64 {self.error:.1e}, unfused {self.unfused_error:.1e}"
                  if self.error is not None else "")
        times = f"; {self.ms['fused']:.2f} ms a step fused, {self.ms['unfused']:.2f} unfused" if self.ms else ""
        return f"{'on' if self.fused else 'off'} ({self.why}{errors}{times})"


def check_fused(model, env, *, batch=2, size=8, seed=0):
    """(fused error, unfused error): the worst relative error against the unfused model in float64, over the output
    and every parameter's gradient, of one training step on random images (dropout 0, whose masks differ between
    the paths) at the run's dtype, layout and device. A gradient that is 0 in exact arithmetic (a BatchNorm gamma
    whose scale the next BatchNorm divides out) is measured against a hundredth of the largest."""
    gen = torch.Generator(device=env.device).manual_seed(seed)
    x = torch.randn(batch, 3, size, size, device=env.device, generator=gen)
    labels = torch.randint(0, 10, (batch,), device=env.device, generator=gen)
    plain = copy.deepcopy(model).train()
    plain.fused = False
    for m in plain.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0

    def step(net, x, fused):
        net = copy.deepcopy(net)
        net.fused = fused
        with env.autocast() if x.dtype != torch.float64 else contextlib.nullcontext():
            out = net(x.contiguous(memory_format=env.memory_format))
            torch.nn.functional.cross_entropy(out.float(), labels).backward()
        return [out.detach()] + [p.grad for p in net.parameters()]

    reference = step(copy.deepcopy(plain).double(), x.double(), False)
    floor = max(g.abs().max().item() for g in reference[1:]) / 100
    worst = []
    for fused in (True, False):
        got = step(plain, x.to(env.dtype), fused)
        worst.append(max(((a.double() - b).abs().max() / max(b.abs().max().item(), floor if i else 0)).item()
                         for i, (a, b) in enumerate(zip(got, reference))))
    return tuple(worst)


def time_steps(model, env, *, batch, compiled, mode="default", steps=10):
    """{"fused": ms, "unfused": ms}: the median of `steps` forward + backward steps of a copy of `model` each way,
    compiled as the trainer will compile it (when `compiled`), after warm-up (the compile included there)."""
    x = torch.randn(batch, 3, 32, 32, device=env.device).to(env.dtype).contiguous(memory_format=env.memory_format)
    labels = torch.randint(0, 10, (batch,), device=env.device)
    ms = {}
    for key in ("fused", "unfused"):
        net = copy.deepcopy(model).train()
        net.fused = key == "fused"
        run = torch.compile(net, mode=mode, dynamic=False) if compiled else net

        def step():
            with env.autocast():
                torch.nn.functional.cross_entropy(run(x), labels).backward()

        for _ in range(3):
            step()
        times = []
        for _ in range(steps):
            env.sync()
            t0 = time.perf_counter()
            step()
            env.sync()
            times.append((time.perf_counter() - t0) * 1e3)
        ms[key] = statistics.median(times)
    return ms


def choose_fused(model, env, want, *, batch, compiled=False, mode="default"):
    """Set `model.fused` for `want` (auto, on or off) and return the FuseChoice: on checks the fused path against
    the unfused model first (one that disagrees stays unfused, with a note); auto on CUDA also times whole training
    steps of both (compiled as the trainer compiles) and keeps the faster; elsewhere auto is off."""
    choice = FuseChoice(why=f"--fuse {want}")
    usable = runs_kernels(env.device) and (want == "on" or want == "auto" and env.device.type in AUTO_DEVICES)
    if want == "auto" and not usable:
        choice.why += ": Triton is not installed" if not HAVE_TRITON else ": the fused kernels are timed on CUDA only"
    if usable:
        import net.fused  # noqa: F401  (the fused ops, registered before anything compiles)

        choice.error, choice.unfused_error = check_fused(model, env)
        if choice.error > 2 * choice.unfused_error + 1e-4:  # the compile check's rule
            choice.why += (f": the fused path disagrees with the unfused model (relative error {choice.error:.1e}, "
                           f"the unfused model's own {choice.unfused_error:.1e}), so unfused")
        elif want == "on":
            choice.fused, choice.why = True, choice.why + ", checked against the unfused model"
        else:
            choice.ms = time_steps(model, env, batch=batch, compiled=compiled, mode=mode)
            choice.fused = choice.ms["fused"] < choice.ms["unfused"]
            choice.why += ", checked against the unfused model and timed" + ("" if compiled else " eager")
    if env.ddp:  # rank 0's choice on every rank
        shared = [choice]
        dist.broadcast_object_list(shared, src=0)
        choice = shared[0]
    model.fused = choice.fused
    return choice
