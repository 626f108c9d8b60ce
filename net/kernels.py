"""The model's depthwise and grouped dilated 3x3 convs as Triton kernels: `dwconv(x, weight, dilation)`.

Why our own: for this net's seven depthwise (C -> C) and grouped (C -> 2C) dilated convs, PyTorch
runs cuDNN in channels_last, which transposes around its grouped kernels, and in NCHW its own
kernel, whose weight gradient reads x and dy about 9 times (on one H100, batch 512, bf16, the
256-channel d5 conv took 13.5 ms forward + backward in channels_last and 5.5 ms in NCHW, where
its memory traffic needs ~0.45 ms). Inductor cannot generate them (its conv template needs
dilation 1). These kernels read each big tensor once from memory: the 9 taps are shifted,
masked loads of the same tile, served from cache.

In order, as in flash-linear-attention's convolution module: the reference (what the tests
compare against), the kernels, their launchers, the torch.library ops and autograd, and the
public function. The kernels run on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1
(Triton's interpreter, how the tests run them without a GPU); anything else, and any shape
they do not cover, goes to F.conv2d.

The next step, not built (its worth is a GPU measurement): the previous layer's BatchNorm-apply,
ReLU and dropout in the forward kernel's prologue (where x is loaded), and BatchNorm's
per-channel sums in its epilogue (where y is stored), which would remove a read and a write of
every activation around each conv.
"""
from __future__ import annotations  # the kernels' `tl.constexpr` annotations stay text where Triton is absent

import contextlib
import functools
import importlib.util
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Triton is imported when a kernel first runs (`_compiled`): 0.3 s that a process which never runs
# one (evaluation, export, the CPU trainer) need not pay. Without it, every call goes to F.conv2d.
HAVE_TRITON = importlib.util.find_spec("triton") is not None
triton = tl = None

TAPS = 9  # a 3x3 kernel


# --- the reference ---------------------------------------------------------------------------------

def dwconv_reference(x, weight, dilation):
    """The contract: a 3x3 conv with padding = dilation (maps keep their size), one group per input
    channel, each feeding weight.shape[0] // C outputs (1: depthwise, 2: this net's grouped convs)."""
    return F.conv2d(x, weight, padding=dilation, dilation=dilation, groups=x.shape[1])


# --- the kernels -----------------------------------------------------------------------------------
# Positions p index an image's H x W map flattened (p = h * W + w); strides make one kernel serve
# both layouts (NHWC: channels contiguous; NCHW: positions contiguous). A program takes a block of
# input channels c and their M outputs co = c * M + m, side by side: each input is loaded once for
# both. Offsets within an image are 32-bit, each image's base 64-bit, the batch on grid axis 0.
# Accumulation is fp32 whatever the storage dtype.

def _to_outputs(x, M: tl.constexpr):
    """[P, C] -> [P, M C]: each input channel's value once for each of its M outputs, side by side."""
    if M == 2:
        x = tl.reshape(tl.join(x, x), [x.shape[0], 2 * x.shape[1]])
    return x


def _dwconv_forward_kernel(x, w, y, N, C_in, H, W, DIL,
                           sxn, sxc, sxh, sxw, syn, syc, syh, syw,
                           M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """One program: BLOCK_P positions of image n x BLOCK_C input channels and their M * BLOCK_C outputs (grid:
    N, p blocks, c blocks). N, the batch, is read by autotune's key only."""
    n = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    co = tl.program_id(2) * (M * BLOCK_C) + tl.arange(0, M * BLOCK_C)
    h = p // W
    w_ = p - h * W
    p_ok, c_ok, co_ok = p < H * W, c < C_in, co < C_in * M
    x_img = x + n * sxn
    # (prologue: the previous layer's BatchNorm-apply, ReLU and dropout would act on each x tile here)
    acc = tl.zeros([BLOCK_P, M * BLOCK_C], dtype=tl.float32)
    for kh in tl.static_range(3):
        hh = h + (kh - 1) * DIL
        for kw in tl.static_range(3):
            ww = w_ + (kw - 1) * DIL
            inside = p_ok & (hh.to(tl.uint32) < H) & (ww.to(tl.uint32) < W)  # zero padding: masked loads
            xv = tl.load(x_img + (hh * sxh + ww * sxw)[:, None] + c[None, :] * sxc,
                         mask=inside[:, None] & c_ok[None, :], other=0.0)
            wv = tl.load(w + co * 9 + kh * 3 + kw, mask=co_ok, other=0.0)
            acc += _to_outputs(xv.to(tl.float32), M) * wv.to(tl.float32)[None, :]
    # (epilogue: BatchNorm's per-channel sum and sum of squares of acc would be reduced here)
    out = y + n * syn + (h * syh + w_ * syw)[:, None] + co[None, :] * syc
    tl.store(out, acc.to(y.dtype.element_ty), mask=p_ok[:, None] & co_ok[None, :])


def _dwconv_tap(dy_here, dx_acc, x_img, dy_img, h, w_, p_ok, c, c_ok, co, co_ok, w, H, W, DIL, sxc, sxh, sxw,
                syc, syh, syw, KH: tl.constexpr, KW: tl.constexpr, M: tl.constexpr):
    """Tap (KH, KW) of the backward: (dW's product at each position, dx_acc plus this tap's share)."""
    # weight gradient: dy here against x shifted forward by the tap
    hh, ww = h + (KH - 1) * DIL, w_ + (KW - 1) * DIL
    inside = p_ok & (hh.to(tl.uint32) < H) & (ww.to(tl.uint32) < W)
    xv = tl.load(x_img + (hh * sxh + ww * sxw)[:, None] + c[None, :] * sxc, mask=inside[:, None] & c_ok[None, :],
                 other=0.0)
    # input gradient: dy shifted back by the tap, against the tap's weight
    hh, ww = h - (KH - 1) * DIL, w_ - (KW - 1) * DIL
    inside = p_ok & (hh.to(tl.uint32) < H) & (ww.to(tl.uint32) < W)
    dyv = tl.load(dy_img + (hh * syh + ww * syw)[:, None] + co[None, :] * syc,
                  mask=inside[:, None] & co_ok[None, :], other=0.0)
    wv = tl.load(w + co * 9 + KH * 3 + KW, mask=co_ok, other=0.0)
    return dy_here * _to_outputs(xv.to(tl.float32), M), dx_acc + dyv.to(tl.float32) * wv.to(tl.float32)[None, :]


def _dwconv_backward_kernel(x, w, dy, dx, dw_partial, N, C_in, H, W, DIL, PER_TILE,
                            sxn, sxc, sxh, sxw, syn, syc, syh, syw, sdn, sdc, sdh, sdw,
                            M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """One program: the PER_TILE positions of tile t of image n, BLOCK_P at a time, x BLOCK_C input channels and
    their M * BLOCK_C outputs (grid: N, tiles, c blocks). The tiles are the launcher's, not the configuration's,
    so the partials' rows do not depend on what autotune picks.

    Reads dy, x and w once each, and writes both gradients:
    - dx[p, c] = sum over m, taps of dy[p - offset, c*M + m] * w[c*M + m, tap] (the transposed conv): each
      output channel's share, then the M shares of an input channel added in registers;
    - dw[co, tap] = sum over p of dy[p, co] * x[p + offset, co // M]: each tap's products summed over the
      positions a thread meets in registers, across the program once at the end, written as its fp32 partial;
      the launcher sums the partials of all programs (deterministic, no atomics).
    """
    n = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)  # this program's row of partials
    C_out = C_in * M
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    co = tl.program_id(2) * (M * BLOCK_C) + tl.arange(0, M * BLOCK_C)
    c_ok, co_ok = c < C_in, co < C_out
    x_img, dy_img, dx_img = x + n * sxn, dy + n * syn, dx + n * sdn
    zero = tl.zeros([BLOCK_P, M * BLOCK_C], dtype=tl.float32)
    dw0, dw1, dw2, dw3, dw4, dw5, dw6, dw7, dw8 = zero, zero, zero, zero, zero, zero, zero, zero, zero
    first = tl.program_id(1) * PER_TILE
    end = tl.minimum(first + PER_TILE, H * W)
    for start in range(first, end, BLOCK_P):
        p = start + tl.arange(0, BLOCK_P)
        h = p // W
        w_ = p - h * W
        p_ok = p < end
        dy_here = tl.load(dy_img + (h * syh + w_ * syw)[:, None] + co[None, :] * syc,
                          mask=p_ok[:, None] & co_ok[None, :], other=0.0).to(tl.float32)
        dx_acc = zero
        args = (x_img, dy_img, h, w_, p_ok, c, c_ok, co, co_ok, w, H, W, DIL, sxc, sxh, sxw, syc, syh, syw)
        prod, dx_acc = _dwconv_tap(dy_here, dx_acc, *args, 0, 0, M)
        dw0 += prod
        prod, dx_acc = _dwconv_tap(dy_here, dx_acc, *args, 0, 1, M)
        dw1 += prod
        prod, dx_acc = _dwconv_tap(dy_here, dx_acc, *args, 0, 2, M)
        dw2 += prod
        prod, dx_acc = _dwconv_tap(dy_here, dx_acc, *args, 1, 0, M)
        dw3 += prod
        prod, dx_acc = _dwconv_tap(dy_here, dx_acc, *args, 1, 1, M)
        dw4 += prod
        prod, dx_acc = _dwconv_tap(dy_here, dx_acc, *args, 1, 2, M)
        dw5 += prod
        prod, dx_acc = _dwconv_tap(dy_here, dx_acc, *args, 2, 0, M)
        dw6 += prod
        prod, dx_acc = _dwconv_tap(dy_here, dx_acc, *args, 2, 1, M)
        dw7 += prod
        prod, dx_acc = _dwconv_tap(dy_here, dx_acc, *args, 2, 2, M)
        dw8 += prod
        if M == 2:  # the two output channels of each input channel sit side by side: add them
            dx_acc = tl.sum(tl.reshape(dx_acc, [BLOCK_P, BLOCK_C, 2]), axis=2)
        out = dx_img + (h * sdh + w_ * sdw)[:, None] + c[None, :] * sdc
        tl.store(out, dx_acc.to(dx.dtype.element_ty), mask=p_ok[:, None] & c_ok[None, :])
    partial = dw_partial + tile.to(tl.int64) * C_out * 9 + co * 9
    tl.store(partial, tl.sum(dw0, axis=0), mask=co_ok)
    tl.store(partial + 1, tl.sum(dw1, axis=0), mask=co_ok)
    tl.store(partial + 2, tl.sum(dw2, axis=0), mask=co_ok)
    tl.store(partial + 3, tl.sum(dw3, axis=0), mask=co_ok)
    tl.store(partial + 4, tl.sum(dw4, axis=0), mask=co_ok)
    tl.store(partial + 5, tl.sum(dw5, axis=0), mask=co_ok)
    tl.store(partial + 6, tl.sum(dw6, axis=0), mask=co_ok)
    tl.store(partial + 7, tl.sum(dw7, axis=0), mask=co_ok)
    tl.store(partial + 8, tl.sum(dw8, axis=0), mask=co_ok)


# --- launchers -------------------------------------------------------------------------------------

KERNELS = {"forward": _dwconv_forward_kernel, "backward": _dwconv_backward_kernel}
HELPERS = {"_to_outputs": _to_outputs, "_dwconv_tap": _dwconv_tap}  # Triton functions the kernels call

# The tiles autotune may pick on CUDA, timed there on the first call of each shape; its key: the batch, channels,
# map, dilation and layout below, and the tensors' dtypes, which autotune adds itself. BLOCK_C counts input
# channels (M * BLOCK_C outputs). Every one builds for sm_90a with no register spill under both Tritons the project
# meets, the pinned one and 3.6.0 (the lent GPU's torch 2.11 brings it), in every variant a step launches (M 1 and
# 2, bf16 and fp32, both layouts): tests/test_kernels.py builds each. `python -m bench.roofline` counts their
# instructions; bench/results/*-roofline-*.md has each tile's registers and count per layer.
TUNING = {"forward": [dict(BLOCK_P=32, BLOCK_C=32, num_warps=8),
                      dict(BLOCK_P=32, BLOCK_C=32, num_warps=4),
                      dict(BLOCK_P=64, BLOCK_C=32, num_warps=8),
                      dict(BLOCK_P=16, BLOCK_C=64, num_warps=8)],
          "backward": [dict(BLOCK_P=16, BLOCK_C=16, num_warps=4),
                       dict(BLOCK_P=32, BLOCK_C=32, num_warps=8),
                       dict(BLOCK_P=16, BLOCK_C=64, num_warps=8),
                       dict(BLOCK_P=16, BLOCK_C=16, num_warps=8)]}
# sxn: C_in * H * W, syn: C_out * H * W (so M); sxc: 1 in NHWC, H * W in NCHW
AUTOTUNE_KEY = ["N", "C_in", "H", "W", "DIL", "sxn", "sxc", "syn"]
# Under Triton's interpreter one pinned configuration runs (autotune has broken there before, and times nothing
# worth keeping): its cost is per program, so one wide block.
INTERPRETED = {"forward": dict(BLOCK_P=128, BLOCK_C=256), "backward": dict(BLOCK_P=128, BLOCK_C=256)}
# The backward's grid aims at about this many programs (at 32 channels a block): on CUDA enough to fill a GPU, few
# enough that its fp32 weight-gradient partials (tiles x C x 9 floats) stay small beside dy; in the interpreter,
# whose cost is per program, one tile an image. Its tiles are whole multiples of TILE_ALIGN positions, so of every
# BLOCK_P above.
BACKWARD_PROGRAMS = {"cuda": 2048, "interpreter": 1}
TILE_ALIGN = 64


def cdiv(a, b):
    return -(-a // b)


def interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


def runs_kernels(device):
    """Whether the Triton kernels can run on tensors of `device`: CUDA with Triton, or CPU under its interpreter."""
    return HAVE_TRITON and (device.type == "cuda" or (device.type == "cpu" and interpreting()))


@functools.cache
def _compiled(fn, interpreted):
    """`fn` as a Triton kernel: built for the GPU, or interpreted on CPU tensors. The kernels' globals `triton`
    and `tl` are bound here, on first use."""
    global triton, tl
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    wrap = InterpretedFunction if interpreted else JITFunction
    globals().update({name: wrap(helper) for name, helper in HELPERS.items()})  # what the kernels call, alike
    return wrap(fn)


_autotuners = {}  # kind -> its kernel under triton.autotune, made at the first launch on CUDA


def autotuned(kernel, kind):
    """`kernel` (a Triton function of KERNELS[kind]) under triton.autotune among TUNING[kind], keyed by AUTOTUNE_KEY."""
    configs = [triton.Config({k: v for k, v in c.items() if k != "num_warps"}, num_warps=c["num_warps"])
               for c in TUNING[kind]]
    return triton.autotune(configs, key=AUTOTUNE_KEY)(kernel)


@dataclass
class Launch:
    """A kernel launch as `recording()` keeps it: the kernel (a plain Python function of this module or a Triton
    function of net/fused.py), its arguments (tensors, ints, floats) and constexprs, the tiles it may run with
    (block sizes and num_warps: autotune's choices, or the one a launcher fixed), and its grid for a tile."""
    kernel: object
    args: tuple
    constexprs: dict
    tiles: list
    grid: object  # tile -> the launch grid

    @property
    def name(self):
        return getattr(self.kernel, "__name__", None) or self.kernel.fn.__name__

    def named(self, tile):
        """{parameter: value}: the arguments by the kernel's parameter names, with the constexprs and `tile`."""
        import inspect

        fn = getattr(self.kernel, "fn", self.kernel)
        return {**dict(zip(inspect.signature(fn).parameters, self.args)), **self.constexprs, **tile}


_recorded = None  # a list while `recording()` is on
_pinned = False  # while `pinned()` is on: the first TUNING tile, no autotune


@contextlib.contextmanager
def pinned():
    """Within it, the kernels here and net/fused.py's run their first TUNING tile, unautotuned: for checks (the
    fused path's start-up check, in fp32), which would otherwise build and time every tile of kernels the run
    never launches."""
    global _pinned
    _pinned, saved = True, _pinned
    try:
        yield
    finally:
        _pinned = saved


@contextlib.contextmanager
def recording():
    """Within it, launches are recorded ([Launch]), not run: what a step would launch, counted by bench/roofline.py
    from the launchers themselves on tensors that may be on the meta device (nothing is computed)."""
    global _recorded
    _recorded, saved = [], _recorded
    try:
        yield _recorded
    finally:
        _recorded = saved


def _launch(kind, grid, *args, **constexprs):
    """Run kernel `kind` over `grid(blocks)`: on CUDA autotuned among TUNING; under the interpreter (CPU tensors,
    where Triton builds nothing) the one INTERPRETED configuration; under `recording()` recorded with TUNING."""
    if _recorded is not None:
        _recorded.append(Launch(KERNELS[kind], args, constexprs, TUNING[kind], grid))
        return
    if interpreting():
        blocks = INTERPRETED[kind]
        _compiled(KERNELS[kind], True)[grid(blocks)](*args, **constexprs, **blocks)
        return
    if _pinned:
        tile = TUNING[kind][0]
        _compiled(KERNELS[kind], False)[grid(tile)](*args, **constexprs, **tile)
        return
    if kind not in _autotuners:
        _autotuners[kind] = autotuned(_compiled(KERNELS[kind], False), kind)
    _autotuners[kind][grid](*args, **constexprs)


def tiles():
    """{kernel: {shape: tile}}: under the interpreter its pinned tile; on CUDA autotune's pick for each shape it
    has met ("128->256 32x32 d4 NHWC bfloat16, batch 512" -> "32x32, 8 warps"); empty before any launch."""
    if interpreting():
        return {kind: {"interpreter (pinned)": "{BLOCK_P}x{BLOCK_C}".format(**INTERPRETED[kind])} for kind in KERNELS}
    picked = {}
    for kind, tuner in _autotuners.items():
        picked[kind] = {}
        for key, config in tuner.cache.items():  # key: AUTOTUNE_KEY's values, then each tensor's dtype
            n, c_in, h, w, dilation, sxn, sxc, syn = key[:len(AUTOTUNE_KEY)]
            shape = (f"{c_in}->{syn // (h * w)} {h}x{w} d{dilation} {'NHWC' if sxc == 1 else 'NCHW'} "
                     f"{str(key[len(AUTOTUNE_KEY)]).removeprefix('torch.')}, batch {n}")
            picked[kind][shape] = "{BLOCK_P}x{BLOCK_C}".format(**config.kwargs) + f", {config.num_warps} warps"
    return picked


def tile_trips(length, per_tile, block):
    """Trips of a tiled loop, `for start in range(first, min(first + per_tile, length), block)`, summed over the
    tiles first = 0, per_tile, ... of `length`."""
    return sum(cdiv(min(first + per_tile, length) - first, block) for first in range(0, length, per_tile))


# Each kernel's runtime loop, its trips summed over the programs of a launch ({parameter: value} with the tile, and
# the grid): what bench/roofline.py multiplies the loop's body by. A kernel not named has no runtime loop.
LOOP_TRIPS = {"_dwconv_backward_kernel": lambda a, grid: tile_trips(a["H"] * a["W"], a["PER_TILE"], a["BLOCK_P"])
              * grid[0] * grid[2]}


def output_format(x):
    """The memory format of the outputs for input `x`: channels_last for an NHWC input, else NCHW
    (what F.conv2d gives for these two; the fake implementation below must agree)."""
    nhwc = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if nhwc else torch.contiguous_format


def _empty_like_output(x, channels):
    n, _, h, w = x.shape
    return torch.empty((n, channels, h, w), dtype=x.dtype, device=x.device, memory_format=output_format(x))


def _forward(x, weight, dilation):
    n, c_in, h, w = x.shape
    c_out = weight.shape[0]
    y = _empty_like_output(x, c_out)

    def grid(blocks):
        return n, cdiv(h * w, blocks["BLOCK_P"]), cdiv(c_in, blocks["BLOCK_C"])

    _launch("forward", grid, x, weight.contiguous(), y, n, c_in, h, w, dilation, *x.stride(), *y.stride(),
            M=c_out // c_in)
    return y


def backward_tiles(n, c_out, positions):
    """(tiles per image, positions per tile) of the backward's grid: about BACKWARD_PROGRAMS programs at 32
    channels a block, each tile a whole multiple of TILE_ALIGN positions."""
    programs = BACKWARD_PROGRAMS["interpreter" if interpreting() else "cuda"]
    want = max(1, min(cdiv(positions, TILE_ALIGN), programs // (n * cdiv(c_out, 32))))
    per_tile = cdiv(cdiv(positions, want), TILE_ALIGN) * TILE_ALIGN
    return cdiv(positions, per_tile), per_tile


def _backward(dy, x, weight, dilation):
    n, c_in, h, w = x.shape
    c_out = weight.shape[0]
    dx = _empty_like_output(x, c_in)
    tiles_per_image, per_tile = backward_tiles(n, c_out, h * w)
    partial = torch.empty((tiles_per_image * n, c_out, TAPS), dtype=torch.float32, device=x.device)

    def grid(blocks):
        return n, tiles_per_image, cdiv(c_in, blocks["BLOCK_C"])

    _launch("backward", grid, x, weight.contiguous(), dy, dx, partial, n, c_in, h, w, dilation, per_tile,
            *x.stride(), *dy.stride(), *dx.stride(), M=c_out // c_in)
    dw = partial.sum(0).view(weight.shape).to(weight.dtype)
    return dx, dw


# --- torch.library: one opaque op each way, so that torch.compile sees the kernels as ops, not a break ---
# needs_exact_strides: Inductor hands the ops tensors with the strides they were traced with, so the
# output layouts the fake implementations promise are those the kernels write (torch before that tag:
# the nearest older one, a fixed stride order).
STRIDES = (getattr(torch.Tag, "needs_exact_strides", torch.Tag.needs_fixed_stride_order),)

@torch.library.custom_op("dalicifar::dwconv", mutates_args=(), tags=STRIDES)
def dwconv_op(x: torch.Tensor, weight: torch.Tensor, dilation: int) -> torch.Tensor:
    return _forward(x, weight, dilation)


@dwconv_op.register_fake
def _(x, weight, dilation):
    return _empty_like_output(x, weight.shape[0])


@torch.library.custom_op("dalicifar::dwconv_backward", mutates_args=(), tags=STRIDES)
def dwconv_backward_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                       dilation: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward(dy, x, weight, dilation)


@dwconv_backward_op.register_fake
def _(dy, x, weight, dilation):
    return _empty_like_output(x, x.shape[1]), torch.empty_like(weight, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, weight, ctx.dilation = inputs
    ctx.save_for_backward(x, weight)


def _dwconv_grad(ctx, dy):
    x, weight = ctx.saved_tensors
    dx, dw = dwconv_backward_op(dy, x, weight, ctx.dilation)
    return dx, dw, None


dwconv_op.register_autograd(_dwconv_grad, setup_context=_setup_context)


# --- the public function ---------------------------------------------------------------------------

def covered(x, weight, dilation):
    """Whether the kernels cover this conv: 4-d input, a 3x3 weight of C*M outputs (M 1 or 2), one
    input channel per group, fp32/bf16/fp16, on a device where Triton runs."""
    return (x.dim() == 4 and weight.dim() == 4 and tuple(weight.shape[1:]) == (1, 3, 3) and dilation >= 1
            and weight.shape[0] in (x.shape[1], 2 * x.shape[1]) and x.dtype in (torch.float32, torch.bfloat16,
                                                                                torch.float16)
            and runs_kernels(x.device))


def dwconv(x, weight, dilation):
    """`F.conv2d(x, weight, padding=dilation, dilation=dilation, groups=x.shape[1])` for a 3x3 weight of
    shape (C*M, 1, 3, 3), M 1 or 2, through the Triton kernels where they run (else F.conv2d).

    Input NHWC (channels_last) or NCHW, output in the same layout; fp32, bf16 or fp16 in and out,
    fp32 accumulation. Under autocast both run at the autocast dtype, as F.conv2d would.
    """
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    if not covered(x, weight, dilation):
        return dwconv_reference(x, weight.to(x.dtype), dilation)
    return dwconv_op(x, weight.to(x.dtype), dilation)
