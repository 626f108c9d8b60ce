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

from net.kernels import HAVE_TRITON, dwconv, dwconv_op, dwconv_reference, pinned, runs_kernels, tiles
from net.model import depthwise_convs, fused_path

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


def cpu_kernels(device):
    """Whether the fused path on `device` is net/cpu.py's C++ kernels: a CPU, outside Triton's interpreter."""
    return device.type == "cpu" and not runs_kernels(device)


# --- --fuse: the fused path (net/fused.py on CUDA, net/cpu.py on a CPU) ------------------------------------------

@dataclass
class FuseChoice:
    """What `choose_fused` decided, and why."""
    fused: bool = False
    why: str = ""
    path: str = "Triton kernels"  # which kernels run it: net/fused.py's Triton kernels, or net/cpu.py's C++ ones
    check: "FusedCheck" = None  # the start-up check (`check_fused`), where it ran
    ms: dict = field(default_factory=dict)  # {"fused": ms, "unfused": ms} per training step (auto on CUDA)

    def line(self):
        checked = f"; {self.check.line()}" if self.check is not None else ""
        times = f"; {self.ms['fused']:.2f} ms a step fused, {self.ms['unfused']:.2f} unfused" if self.ms else ""
        return f"{f'on, {self.path}' if self.fused else 'off'} ({self.why}{checked}{times})"


@dataclass
class FusedCheck:
    """`check_fused`'s findings: per tensor of each step, the fused and the unfused path's relative error against
    the unfused model in float64, and the tensors where the fused path's is more than the rule allows."""
    errors: dict = field(default_factory=dict)  # "dropout 0.05: C2.grouped weight gradient" -> (fused, unfused)
    failed: list = field(default_factory=list)  # those names, where fused > 2 * unfused + TOLERANCE
    seconds: float = 0.0
    precision: str = "fp32"

    @property
    def worst(self):
        """(name, fused error, unfused error) of the tensor with the largest fused error."""
        name = max(self.errors, key=lambda k: self.errors[k][0])
        return (name, *self.errors[name])

    def line(self):
        name, fused, unfused = self.worst
        verdict = (f"{len(self.failed)} of {len(self.errors)} tensors disagree, first {self.failed[0]}" if self.failed
                   else f"{len(self.errors)} tensors agree")
        return (f"checked in {self.precision} against float64 in {self.seconds:.1f} s: {verdict}; worst {name}: "
                f"{fused:.1e} (unfused {unfused:.1e})")


# The rule, per tensor: the fused path's error at most twice the unfused path's (the compile check's rule) plus this
# much. In fp32 most errors are ~1e-6, but a pre-activation within ~1e-6 of zero flips its ReLU between fp32 and
# float64, and one flipped element moves every gradient upstream of it: measured on the model (batch 2, 32x32, four
# initialisations, CPU), either path's worst tensor was then 6e-3 to 2.1e-2 off. A wrong kernel is off by O(1): a
# zero weight gradient by 1, the dropout kernels ignoring their masks by 1.8. bf16's own errors (0.4-0.9) hid both.
TOLERANCE = 5e-2


@contextlib.contextmanager
def exact_fp32(device):
    """fp32 as written: autocast off, and TF32 off for matmuls and cuDNN (the legacy flags, as setup_env sets
    them), restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _step_tensors(net, run, x, labels):
    """{name: tensor} after one training step of `net` (a copy, trained in place) run by `run(net, x)`: the output,
    every parameter's gradient, every buffer (running statistics, batch counts)."""
    out = run(net, x)
    torch.nn.functional.cross_entropy(out.float(), labels).backward()
    return {"output": out.detach(), **{f"{n} gradient": p.grad for n, p in net.named_parameters()},
            **{n: b.detach() for n, b in net.named_buffers()}}


def _relative_errors(got, reference, floor):
    """{name: |got - reference|_max / max(|reference|_max, floor)} (floor for gradients only: one that is 0 in exact
    arithmetic, a BatchNorm gamma whose scale the next BatchNorm divides out, is measured against it)."""
    out = {}
    for name, want in reference.items():
        if name.endswith("num_batches_tracked"):
            out[name] = float(not torch.equal(got[name].cpu(), want.cpu()))
            continue
        scale = max(want.abs().max().item(), floor if name.endswith("gradient") else 0.0)
        out[name] = ((got[name].double() - want).abs().max() / scale).item() if scale else 0.0
    return out


def check_fused(model, env, *, batch=2, size=32, seed=0, precision="fp32"):
    """The fused path against the unfused model, before a run trusts it: one training step each way, each held to
    the unfused model in float64, tensor by tensor (the output, every parameter's gradient, every running
    statistic), twice: with dropout 0, and with `model`'s own dropout, where the unfused layers apply the fused
    path's masks (`net.fused.masked_reference`), so that the dropout kernels are checked before they train.

    precision "fp32" (the check `choose_fused` runs): autocast and TF32 off, where the paths' errors are ~1e-6 but
    for ReLU flips (up to ~2e-2), so the rule (`TOLERANCE`) catches a wrong kernel (errors of O(1)); "run": the
    run's dtype and autocast (bf16 on CUDA, whose own errors reach 0.4-0.9 on some gradients: for reports only,
    gpu-check's). Random images at the run's
    size (32: every kernel path the launchers plan for it, several backward tiles and 1x1 weight-gradient splits at
    batch 2 on CUDA), channels_last, on the run's device; seeds from a generator of its own, so the run's random
    state is untouched."""
    path = fused_path(env.device)  # net.fused (Triton) or net.cpu (the C++ kernels)

    t0 = time.perf_counter()
    device = env.device
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(batch, 3, size, size, device=device, generator=gen)
    labels = torch.randint(0, 10, (batch,), device=device, generator=gen)
    layers = [layer for block in model.features for layer in block]
    seeds = torch.randint(0, 2**31 - 1, (len(layers),), device=device, generator=gen)
    p = max(layer[3].p for layer in layers)

    def net(dropout, dtype=torch.float32):
        copy_ = copy.deepcopy(model).train().to(dtype)
        for layer in (layer for block in copy_.features for layer in block):
            layer[3].p = dropout
        return copy_

    result = FusedCheck(precision=precision)
    for dropout in (0.0, p) if p > 0 else (0.0,):
        def fused_run(m, x):
            return path.forward(m, x, seeds)

        def unfused_run(m, x):
            return path.masked_reference(m, x, seeds, dropout)

        reference = _step_tensors(net(dropout, torch.float64), unfused_run, x.double(), labels)
        floor = max(t.abs().max().item() for k, t in reference.items() if k.endswith("gradient")) / 100
        context = exact_fp32(device) if precision == "fp32" else env.autocast()
        inputs = x.contiguous(memory_format=env.memory_format)
        if precision != "fp32":
            inputs = inputs.to(env.dtype)
        with context:
            fused_errors = _relative_errors(_step_tensors(net(dropout), fused_run, inputs, labels), reference, floor)
            unfused_errors = _relative_errors(_step_tensors(net(dropout), unfused_run, inputs, labels), reference,
                                              floor)
        for name in reference:
            key = f"dropout {dropout:g}: {name}"
            result.errors[key] = fused_errors[name], unfused_errors[name]
            if fused_errors[name] > 2 * unfused_errors[name] + TOLERANCE:
                result.failed.append(key)
    result.seconds = time.perf_counter() - t0
    return result


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
    the unfused model first (`check_fused`, in fp32: one that disagrees on any tensor stays unfused, with a note);
    auto on CUDA also times whole training steps of both (compiled as the trainer compiles) and keeps the faster;
    elsewhere auto is off."""
    choice = FuseChoice(why=f"--fuse {want}")
    if cpu_kernels(env.device):  # the C++ kernels (net/cpu.py): on wherever they build and pass the check
        from net import cpu

        usable, choice.path = want != "off" and not cpu.available(), "C++ kernels"
        if want != "off" and not usable:
            choice.why += f": {cpu.available()}"
    else:
        usable = runs_kernels(env.device) and (want == "on" or want == "auto" and env.device.type in AUTO_DEVICES)
        if want == "auto" and not usable:
            choice.why += (": Triton is not installed" if not HAVE_TRITON
                           else ": the fused kernels are timed on CUDA only")
    if usable:
        if choice.path == "Triton kernels":
            import net.fused  # noqa: F401  (the fused ops, registered before anything compiles)

        with pinned():  # one tile each: the check runs fp32 kernels that the run never launches, once
            choice.check = check_fused(model, env)
        if choice.check.failed:
            choice.why += ": the fused path disagrees with the unfused model, so unfused"
        elif want == "on" or choice.path == "C++ kernels":  # on a CPU the unfused step is 5-7x slower: no timing
            choice.fused = True
        else:
            choice.ms = time_steps(model, env, batch=batch, compiled=compiled, mode=mode)
            choice.fused = choice.ms["fused"] < choice.ms["unfused"]
            choice.why += ", timed" + ("" if compiled else " eager")
    if env.ddp:  # rank 0's choice on every rank
        shared = [choice]
        dist.broadcast_object_list(shared, src=0)
        choice = shared[0]
    model.fused = choice.fused
    return choice
