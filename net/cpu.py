"""The fused path on a CPU (`Net.fused` on CPU tensors): the same function as the unfused model, at the CPU's speed.

Why: on a CPU, PyTorch runs this net far below the machine (2026-12-07, 2-core AMD EPYC, AVX2, torch 2.13): the
eager fp32 step trains at 11-17 img/s, and the same algebra as torch ops under torch.compile at 17, because
oneDNN's dilated depthwise convs took 157 ms a call at batch 128 and Inductor's loops around them ran 5-10x off
memory speed (a bool mask, a hash, per-channel reductions). Here each piece is a short C++ loop over channels
(net/cpu_kernels.cpp), vectorised by the compiler, in OpenMP threads:

- each layer i is conv_i, then BatchNorm + ReLU + dropout as one op (`BatchNormAct`): its forward reduces the
  conv output Y_i's per-channel sum and sum of squares (fp32 partials per block of rows, summed in a fixed
  order), forms s = gamma * rstd and t = beta - mean * s in PyTorch (tiny tensors; the running statistics updated
  exactly as nn.BatchNorm2d updates them), and writes a_i = relu(s Y_i + t) * keep * 1 / (1 - p) in one pass.
  Its backward needs no stored mask: ReLU's and dropout's are a_i's zeros; BatchNorm's backward through the batch
  statistics is one reducing pass and one elementwise pass;
- dropout's keep bit for each element is the fused GPU path's counter hash of (the layer's seed, the layer, the
  image, the element's NHWC index within the image), computed where the activation is written: the masks are
  `net.fused.dropout_mask`'s, bit for bit, whatever the device;
- the 3x3 depthwise and grouped convs are the kernels' own (a tap at a time over contiguous channels, the weight
  gradient per image, summed in image order); the 1x1 convs are matmuls (`torch.mm`: oneDNN/MKL at the CPU's
  rate); the first conv (3 -> 32 on the image) is F.conv2d, global average pooling and the head are PyTorch's.

Everything is fp32, NHWC (a (positions, channels) matrix per layer). The kernels are built once per machine by
Inductor's C++ toolchain (`torch._inductor.codecache`: the compiler, flags and OpenMP that torch.compile uses on
this CPU, cached on disk; no other build tool): `available()` says whether they built, and why not.
"""
import functools
from pathlib import Path

import torch
import torch.nn.functional as F

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
ROWS = 256  # rows of a reduction's block: the partials' granularity, fixed whatever the threads (deterministic)

# name -> (the C++ call, argument types): each becomes a Python function of tensors and ints.
KERNELS = {
    "bn_stats": ("bn_stats(a0, a1, a2, a3, a4)", ["const float*", "float*", "int64_t", "int64_t", "int64_t"]),
    "act_forward": ("act_forward(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10)",
                    ["const float*", "const float*", "const float*", "float*", "int64_t", "int64_t", "int64_t",
                     "int64_t", "int64_t", "int64_t", "float"]),
    "act_backward_sums": ("act_backward_sums(a0, a1, a2, a3, a4, a5, a6, a7)",
                          ["const float*", "const float*", "const float*", "float*", "int64_t", "int64_t", "int64_t",
                           "float"]),
    "act_backward_apply": ("act_backward_apply(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9)",
                           ["const float*", "const float*", "const float*", "const float*", "const float*",
                            "const float*", "float*", "int64_t", "int64_t", "float"]),
    "dw_forward": ("if (a7 == 1) dw_forward<1>(a0, a1, a2, a3, a4, a5, a6, a8); "
                   "else dw_forward<2>(a0, a1, a2, a3, a4, a5, a6, a8)",
                   ["const float*", "const float*", "float*", "int64_t", "int64_t", "int64_t", "int64_t", "int64_t",
                    "int64_t"]),
    "dw_backward": ("if (a9 == 1) dw_backward<1>(a0, a1, a2, a3, a4, a5, a6, a7, a8, a10); "
                    "else dw_backward<2>(a0, a1, a2, a3, a4, a5, a6, a7, a8, a10)",
                    ["const float*", "const float*", "const float*", "float*", "float*", "int64_t", "int64_t",
                     "int64_t", "int64_t", "int64_t", "int64_t"]),
    "keep_mask": ("keep_mask(a0, a1, a2, a3, a4, a5, a6)",
                  ["uint8_t*", "int64_t", "int64_t", "int64_t", "int64_t", "int64_t", "int64_t"]),
}


@functools.cache
def kernel(name):
    """The C++ kernel `name` as a Python function (built on first use, then from Inductor's on-disk cache)."""
    from torch._inductor.codecache import CppPythonBindingsCodeCache

    call, types = KERNELS[name]
    params = ", ".join(f"{t} a{i}" for i, t in enumerate(types))
    source = SOURCE.read_text() + f'\nextern "C" void kernel({params}) {{ {call}; }}\n'
    return CppPythonBindingsCodeCache.load_pybinding(types, source)


@functools.cache
def available():
    """"" where the kernels build and run on this machine, else one line saying why not (the fused CPU path is
    then off)."""
    try:
        for name in KERNELS:
            kernel(name)
        y = torch.arange(6.0).view(3, 2)
        partials = torch.empty(1, 2, 2)
        kernel("bn_stats")(y, partials, 3, 2, ROWS)
        if not torch.equal(partials[0], torch.tensor([[6.0, 9.0], [20.0, 35.0]])):
            return "the C++ kernels built but computed wrong sums"
    except Exception as e:  # noqa: BLE001  (a compiler's error is many lines: its first says enough)
        return f"the C++ kernels did not build ({type(e).__name__}: {str(e).strip().splitlines()[0][:200]})"
    return ""


def _partial_sums(partials):
    """Per-channel (first, second) sums from (blocks, 2, C) partials, summed in block order."""
    total = partials.sum(0)
    return total[0], total[1]


def batch_statistics(bn, total, total_sq, count):
    """(mean, biased variance) per channel: in training the batch's, from its sums of y and y^2 over `count` values,
    with `bn`'s running statistics updated as nn.BatchNorm2d updates them (momentum, or a cumulative average where
    it is None; the unbiased variance; num_batches_tracked); in eval the running statistics."""
    if not bn.training:
        return bn.running_mean, bn.running_var
    mean = total / count
    var = (total_sq / count - mean * mean).clamp_min(0)  # E[y^2] - E[y]^2 rounds below 0 at times
    with torch.no_grad():
        bn.num_batches_tracked.add_(1)
        factor = bn.momentum if bn.momentum is not None else (1 / bn.num_batches_tracked).to(mean)  # no host sync
        bn.running_mean.lerp_(mean.detach(), factor)
        bn.running_var.lerp_(var.detach() * (count / max(count - 1, 1)), factor)
    return mean, var


def _check(x):
    assert x.dtype == torch.float32 and x.device.type == "cpu" and x.is_contiguous(), (x.dtype, x.device, x.stride())
    return x


# --- BatchNorm + ReLU + dropout ------------------------------------------------------------------------

class BatchNormAct(torch.autograd.Function):
    """a = dropout(relu(batch_norm(y))) on NHWC y, with `bn`'s parameters and running statistics (updated in
    training as nn.BatchNorm2d updates them), dropout's mask from the hash of (seed, layer, image, element)."""

    @staticmethod
    def forward(ctx, y, weight, bias, bn, seed, layer, p):
        n, h, w, c = y.shape
        count = n * h * w
        total = total_sq = None
        if bn.training:
            partials = torch.empty(-(-count // ROWS), 2, c)
            kernel("bn_stats")(_check(y), partials, count, c, ROWS)
            total, total_sq = _partial_sums(partials)
        mean, var = batch_statistics(bn, total, total_sq, count)
        rstd = torch.rsqrt(var + bn.eps)
        s = (weight * rstd).contiguous()
        t = (bias - mean * s).contiguous()
        scale = 1 / (1 - p) if p > 0 else 1.0
        a = torch.empty_like(y)
        kernel("act_forward")(_check(y), s, t, a, n, h * w, c, seed, layer, drop_below(p), scale)
        ctx.save_for_backward(y, a, weight, mean, rstd)
        ctx.scale, ctx.count = scale, count
        return a

    @staticmethod
    def backward(ctx, da):
        y, a, weight, mean, rstd = ctx.saved_tensors
        count, c = ctx.count, y.shape[-1]
        da = da.contiguous()
        partials = torch.empty(-(-count // ROWS), 2, c)
        kernel("act_backward_sums")(da, a, y, partials, count, c, ROWS, ctx.scale)
        sum_g, sum_gy = _partial_sums(partials)
        dbias = sum_g
        dweight = rstd * (sum_gy - mean * sum_g)  # sum of g times the normalised y
        k1 = weight * rstd
        k2 = -k1 * rstd * dweight / count
        k3 = -k1 * dbias / count - k2 * mean
        dy = torch.empty_like(y)
        kernel("act_backward_apply")(da, a, y, k1.contiguous(), k2.contiguous(), k3.contiguous(), dy, count, c,
                                     ctx.scale)
        return dy, dweight, dbias, None, None, None, None


# --- the 3x3 depthwise and grouped convs -----------------------------------------------------------------

class DepthwiseConv(torch.autograd.Function):
    """y = conv2d(a, weight, padding=d, dilation=d, groups=C) on NHWC a (N, H, W, C), weight (C M, 1, 3, 3)."""

    @staticmethod
    def forward(ctx, a, weight, dilation):
        n, h, w, c = a.shape
        m = weight.shape[0] // c
        taps = weight.detach().flatten(1).t().contiguous()  # (9, C M): a tap's weights contiguous
        y = a.new_empty(n, h, w, c * m)
        kernel("dw_forward")(_check(a), taps, y, n, h, w, c, m, dilation)
        ctx.save_for_backward(a, taps)
        ctx.dilation, ctx.m = dilation, m
        return y

    @staticmethod
    def backward(ctx, dy):
        a, taps = ctx.saved_tensors
        n, h, w, c = a.shape
        da = torch.empty_like(a)
        partials = a.new_empty(n, 9, c * ctx.m)
        kernel("dw_backward")(dy.contiguous(), a, taps, da, partials, n, h, w, c, ctx.m, ctx.dilation)
        dweight = partials.sum(0).t().reshape(c * ctx.m, 1, 3, 3)
        return da, dweight, None


# --- dropout's mask in the open, and the reference it makes -------------------------------------------

def drop_below(p):
    """The hash's threshold for rate p: an element is dropped where hash / 2 < p 2^31 (0: none)."""
    return min(int(p * 2**31), 2**31 - 1) if p > 0 else 0


def dropout_mask(seed, shape, p, device="cpu", layer=0):
    """The keep mask (bool, `shape` = (N, C, H, W)) of layer `layer` with seed `seed` and rate `p`: what the kernels
    apply, equal to `net.fused.dropout_mask`'s (the GPU path's keep bits, unpacked)."""
    n, c, h, w = shape
    keep = torch.empty(n, h, w, c, dtype=torch.uint8)
    kernel("keep_mask")(keep, n, h * w, c, int(seed), layer, drop_below(p))
    return keep.bool().permute(0, 3, 1, 2).to(device)


def reference_layer(x, conv, bn, p, keep=None):
    """What one fused layer computes, unfused: conv, BatchNorm, ReLU, then dropout by the mask `keep` (bool, the
    conv output's shape; None: no dropout), scaled by 1 / (1 - p)."""
    a = F.relu(bn(conv(x)))
    return a if keep is None else a * keep / (1 - p)


def masked_reference(model, x, seeds, p, mask=dropout_mask):
    """The model's unfused modules, layer by layer, with the fused paths' dropout masks (`mask(seeds[k], shape, p,
    device, layer=k)` for layer k): the function the fused paths compute in training."""
    y = x
    for k, layer in enumerate(layer for block in model.features for layer in block):
        shape = (x.shape[0], layer[0].out_channels, *x.shape[2:])
        keep = mask(int(seeds[k]), shape, p, device=x.device, layer=k).to(y.dtype) if p > 0 else None
        y = reference_layer(y, layer[0], layer[1], p, keep)
    return model.head(model.pool(y).flatten(1))


# --- the model's forward ---------------------------------------------------------------------------

def layers(model):
    """The model's conv layers in order, each (conv, BatchNorm, ReLU, Dropout)."""
    return [layer for block in model.features for layer in block]


def conv_nhwc(i, conv, a):
    """Layer i's conv on `a`, as the fused path runs it: NHWC (positions, channels) out."""
    if i == 0:  # the image: a plain conv, then NHWC from here on (free where x is channels_last)
        return F.conv2d(a, conv.weight, padding=conv.padding, dilation=conv.dilation).permute(0, 2, 3, 1).contiguous()
    if conv.kernel_size == (1, 1):
        y = torch.mm(a.view(-1, conv.in_channels), conv.weight.reshape(conv.out_channels, -1).t())
        return y.view(*a.shape[:3], conv.out_channels)
    if conv.out_channels // conv.in_channels in (1, 2):  # the kernels' depthwise and C -> 2C grouped convs
        return DepthwiseConv.apply(a, conv.weight, conv.dilation[0])
    # other widths' multipliers (build_model(widths=...)): PyTorch's conv, on the NHWC view
    return F.conv2d(a.permute(0, 3, 1, 2), conv.weight, padding=conv.padding, dilation=conv.dilation,
                    groups=conv.groups).permute(0, 2, 3, 1).contiguous()


@torch.compiler.disable  # the kernels read tensors' memory directly: nothing for torch.compile to trace
def layer_forward(i, modules, a, seed, p):
    """Layer i (conv, BatchNorm, ReLU, Dropout) on `a`: its conv, then BatchNorm + ReLU + dropout as one op.
    What `forward` runs for each layer, and what the bench's per-layer table times."""
    conv, bn = modules[0], modules[1]
    return BatchNormAct.apply(conv_nhwc(i, conv, a), bn.weight, bn.bias, bn, seed, i, p)


@torch.compiler.disable  # the whole fused forward, one opaque call: no graph breaks around the kernels
def forward(model, x, seeds=None):
    """`model` (a Net) on a CPU batch `x` (N, 3, H, W) through the kernels: the same function as its unfused
    forward, parameters and buffers (running statistics and batch counts updated alike in training). Dropout's
    seeds are drawn from torch's generator unless given (`seeds`: one per layer, as `net.fused.draw_seeds`)."""
    convs = layers(model)
    drops = [c[3].p if model.training else 0.0 for c in convs]
    if seeds is None:
        seeds = torch.randint(0, 2**31 - 1, (len(convs),)) if any(drops) else torch.zeros(len(convs))
    a = x.float()
    for i, (c, seed, p) in enumerate(zip(convs, seeds.tolist(), drops, strict=True)):
        a = layer_forward(i, c, a, int(seed), p)
    return model.head(a.mean((1, 2)))
