"""The fused path (`Net.fused`): each conv with its neighbours' BatchNorm, ReLU and dropout in the same kernels.

Why: the convs are opaque to Inductor (cuDNN, or net/kernels.py's ops), so it cannot fuse anything into them.
Unfused, every layer's conv output is written, read by BatchNorm's statistics, read again to normalise, ReLU
and drop, written as the next conv's input, and the backward does the same in reverse: counted by Inductor on
the compiled step (python -m bench.traffic), about 52 of its 65 MB per image are BatchNorm, ReLU and dropout.
Here, as in cuDNN's fused ops for ResNet training (and NVIDIA's MLPerf submissions), only each conv's raw
output Y_i is stored, plus per-channel fp32 vectors and dropout's keep bits, and whoever reads Y_i next applies
its BatchNorm, ReLU and dropout on the fly, a_i = relu(s_i * Y_i + t_i) * keep_i (dropout's 1 / (1 - p) is
folded into the next conv's weights, in PyTorch):

- forward op i: (Y_{i-1}, s_{i-1}, t_{i-1}, keep_{i-1}, W_i) -> (Y_i, sum_i, sumsq_i). The prologue forms a_{i-1}
  as each tile loads (padding stays zero after the transform); the epilogue reduces this layer's batch
  statistics as fp32 per-tile partials, summed afterwards in a fixed order (deterministic, no atomics);
- the per-channel algebra stays in PyTorch on tiny tensors (`batch_norm_coefficients`): mean, variance
  (biased, clamped at 0), s = gamma * rstd, t = beta - mean * s, and the running statistics exactly as
  nn.BatchNorm2d updates them; autograd carries the gradients of gamma, beta, the statistics and the folded
  weights;
- backward op i, given dY_i, dsum_i, dsumsq_i: g = dY_i + dsum_i + 2 Y_i dsumsq_i as tiles load (BatchNorm's
  backward through its statistics); dA = the transposed conv of g; dY_{i-1} = dA * mask * s_{i-1} with ReLU's
  mask recomputed from Y_{i-1} and dropout's read from its keep bits, never stored as values; ds_{i-1}, dt_{i-1}
  as per-tile partials; dW_i from g and a_{i-1} recomputed;
- dropout's keep bits: one 32-bit word per 32 channels of a position, made once per layer and step by their own
  small kernel (`_keep_bits`) from a counter-based integer hash of (the layer's seed, the image, the element's
  NHWC index within the image): any tiling reads the same mask, the taps of a 3x3 conv read one word for 32
  channels instead of drawing again, and `dropout_mask(seed, shape, p)` unpacks it in the open, for tests. One
  seed per layer per step, drawn on the device from torch's generator (no host sync; checkpoints keep it);
- the first conv (3 -> 32, on the image) needs no prologue: F.conv2d, with its statistics in PyTorch; the last
  layer's activation goes straight into global average pooling (`_pool_*`), never stored.

What the kernels cost is counted from their sm_90a machine code by `python -m bench.roofline`: warp-instructions,
not bytes, bounded them (Philox drawn again at every tap, 64-bit offsets, per-tap reductions); each kernel here
keeps per-element work to the few instructions its arithmetic needs. Offsets within an image are 32-bit, each
image's base 64-bit, and the batch is on grid axis 0 (2^31 programs): no limit on the batch below memory.

In order, as net/kernels.py: the reference (the unfused layers), the kernels, launchers, the torch.library
ops and their autograd, and `forward(model, x)`. Every tensor the kernels touch is NHWC (channels_last),
viewed as a (positions, channels) matrix; fp32, bf16 or fp16 storage, fp32 arithmetic. This module imports
Triton: Net imports it when `fused` is first set, and its kernels run where net/kernels.py's do (CUDA, or
CPU tensors under TRITON_INTERPRET=1).
"""
import torch
import triton
import triton.language as tl

from . import cpu
from .kernels import STRIDES, backward_tiles, cdiv, interpreting, tile_trips

# --- the reference ---------------------------------------------------------------------------------


def masked_reference(model, x, seeds, p):
    """The model's unfused modules, layer by layer, with the fused path's dropout masks (`dropout_mask` of
    `seeds[k]` for layer k): the function the fused path computes in training."""
    return cpu.masked_reference(model, x, seeds, p, mask=dropout_mask)


# --- the kernels -----------------------------------------------------------------------------------
# Activations are NHWC: position q = h * W + w of an image, a (positions, channels) matrix per image. Keep bits:
# int32 words (N, H, W, WORDS), WORDS = ceil(C / 32); bit c % 32 of word c // 32 keeps channel c.

@triton.jit
def _mix(key, s):
    """A 32-bit integer hash of `key` keyed by `s` (uint32): a multiply, then a xorshift-multiply finaliser
    (Wellons' lowbias32 constants). Dropout needs independence between elements, layers and steps, not a
    cryptographic draw: this is ten instructions where Philox takes sixty."""
    x = key.to(tl.uint32) * 0x61C88647 ^ s
    x ^= x >> 16
    x *= 0x21F0AAAD
    x ^= x >> 15
    x *= 0x735A2D97
    x ^= x >> 15
    return x


@triton.jit(do_not_specialize=["layer"])  # one build for every layer (0 and 1 would each specialise)
def _keep_bits(seeds, layer, bits, HW, C, WORDS, DROP_BELOW, BLOCK: tl.constexpr, WIDE: tl.constexpr):
    """Layer `layer`'s keep bits of image pid 0, BLOCK words a program (grid: N, word blocks): bit b of word j of
    position q keeps channel c = 32 j + b unless hash(q * C + c) / 2 < DROP_BELOW (= p * 2^31), the hash keyed by
    the layer's seed, the layer and the image. On a GPU each thread makes whole words, a bit at a time (no
    reduction across threads); in the interpreter (WIDE), whose cost is per operation, all 32 bits at once."""
    n = tl.program_id(0)
    s = _mix(n, _mix(tl.load(seeds + layer), layer))
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # word i of the image: position i // WORDS
    c = (i % WORDS) * 32
    key = (i // WORDS) * C + c
    if WIDE:
        b = tl.arange(0, 32)
        kept = ((_mix(key[:, None] + b[None, :], s) >> 1).to(tl.int32) >= DROP_BELOW) & (c[:, None] + b < C)
        word = tl.sum(kept.to(tl.int64) << b[None, :], axis=1).to(tl.int32)  # distinct bits: the sum is their OR
    else:
        word = tl.zeros([BLOCK], dtype=tl.int32)
        for b in tl.static_range(32):
            kept = ((_mix(key + b, s) >> 1).to(tl.int32) >= DROP_BELOW) & (c + b < C)
            word |= kept.to(tl.int32) << b
    tl.store(bits + n.to(tl.int64) * HW * WORDS + i, word, mask=i < HW * WORDS)


@triton.jit
def _kept(k_img, q, inside, c, c0, WORDS):
    """Whether dropout keeps each element at positions q ([BLOCK_P]; False where not `inside` the map) and channels
    c (a block from c0) of one image, from its keep words: [BLOCK_P, BLOCK_C]. A block of at most 32 channels that
    divides 32 reads one word a position (the GPU's tiles); a wider one (the interpreter's) a word per element."""
    if c.shape[0] <= 32:
        word = tl.load(k_img + q * WORDS + c0 // 32, mask=inside, other=0)
        return (word[:, None] & (1 << (c % 32))[None, :]) != 0
    word = tl.load(k_img + q[:, None] * WORDS + (c // 32)[None, :], mask=inside[:, None], other=0)
    return ((word >> (c % 32)[None, :]) & 1) != 0


@triton.jit
def _activate(y_in, k_img, q, inside, c, c0, c_ok, s, t, C, WORDS, DROPOUT: tl.constexpr):
    """a_{i-1} = relu(s y + t) * keep at positions q ([BLOCK_P], zero where not `inside` the map) and channels c
    of one image: [BLOCK_P, BLOCK_C], fp32. With dropout, a keep word outside the map loads as 0: bounds and
    dropout in one select."""
    v = tl.load(y_in + q[:, None] * C + c[None, :], mask=inside[:, None] & c_ok[None, :], other=0.0)
    a = tl.maximum(v.to(tl.float32) * s[None, :] + t[None, :], 0.0)
    if DROPOUT:
        a = tl.where(_kept(k_img, q, inside, c, c0, WORDS), a, 0.0)
    else:
        a = tl.where(inside[:, None], a, 0.0)
    return a


@triton.jit
def _bn_grad(dy_out, y_out, q, inside, co, co_ok, d1, d2, C_out):
    """g = dY + dsum + 2 Y dsumsq at positions q of one image (zero where not `inside`): [BLOCK_P, BLOCK_CO], fp32."""
    at = q[:, None] * C_out + co[None, :]
    ok = inside[:, None] & co_ok[None, :]
    dy = tl.load(dy_out + at, mask=ok, other=0.0).to(tl.float32)
    y = tl.load(y_out + at, mask=ok, other=0.0).to(tl.float32)
    return tl.where(ok, dy + (d1[None, :] + d2[None, :] * y), 0.0)


@triton.jit
def _to_outputs(x, M: tl.constexpr):
    """[P, C] -> [P, M C]: each input channel's value once for each of its M outputs, side by side (output co
    reads input co // M)."""
    if M == 2:
        x = tl.reshape(tl.join(x, x), [x.shape[0], 2 * x.shape[1]])
    return x


@triton.jit
def _tap_offsets(p, h, w_, p_ok, H, W, DIL, KH: tl.constexpr, KW: tl.constexpr):
    """(q, inside): the position tap (KH, KW) reads for positions p (row h, column w_ of their image), and whether
    it lies on the image."""
    hh, ww = h + (KH - 1) * DIL, w_ + (KW - 1) * DIL
    inside = p_ok & (hh.to(tl.uint32) < H) & (ww.to(tl.uint32) < W)  # one unsigned compare per bound pair
    return p + ((KH - 1) * W + (KW - 1)) * DIL, inside


@triton.jit
def _dw_forward(yp, sp, tp, keep, w, y, stats, POSITIONS, H, W, C_in, DIL, PER_TILE,
                M: tl.constexpr, DROPOUT: tl.constexpr, EVEN_C: tl.constexpr, BLOCK_P: tl.constexpr,
                BLOCK_C: tl.constexpr):
    """Depthwise (M = 1) or grouped (M = 2) dilated 3x3 conv of a_{i-1}. One program: the PER_TILE positions of
    tile pid 1 of images block pid 0 (POSITIONS positions: one image on a GPU, the whole batch in the interpreter,
    whose cost is per program), BLOCK_P at a time, x BLOCK_C input channels and their M * BLOCK_C outputs (grid:
    image blocks, tiles, channel blocks). w: (9, C_out) fp32, tap-major. Its statistics' partials in row
    block * tiles + tile."""
    n = tl.program_id(0).to(tl.int64)
    HW, C_out, WORDS = POSITIONS, C_in * M, (C_in + 31) // 32
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    co = tl.program_id(2) * (M * BLOCK_C) + tl.arange(0, M * BLOCK_C)
    c_ok, co_ok = (c < C_in) | EVEN_C, (co < C_out) | EVEN_C
    s, t = tl.load(sp + c, mask=c_ok, other=0.0), tl.load(tp + c, mask=c_ok, other=0.0)
    y_in, y_out, k_img = yp + n * HW * C_in, y + n * HW * C_out, keep + n * HW * WORDS
    total = tl.zeros([BLOCK_P, M * BLOCK_C], dtype=tl.float32)
    total_sq = tl.zeros([BLOCK_P, M * BLOCK_C], dtype=tl.float32)
    first = tl.program_id(1) * PER_TILE
    end = tl.minimum(first + PER_TILE, HW)
    for start in range(first, end, BLOCK_P):
        p = start + tl.arange(0, BLOCK_P)
        h = p // W
        w_ = p - h * W
        p_ok = p < end
        h = h % H  # the row within its image
        acc = tl.zeros([BLOCK_P, M * BLOCK_C], dtype=tl.float32)
        for kh in tl.static_range(3):
            for kw in tl.static_range(3):
                q, inside = _tap_offsets(p, h, w_, p_ok, H, W, DIL, kh, kw)
                a = _activate(y_in, k_img, q, inside, c, tl.program_id(2) * BLOCK_C, c_ok, s, t, C_in, WORDS,
                              DROPOUT)
                wt = tl.load(w + (kh * 3 + kw) * C_out + co, mask=co_ok, other=0.0)
                acc += _to_outputs(a, M) * wt[None, :]
        out = acc.to(y.dtype.element_ty)
        ok = p_ok[:, None] & co_ok[None, :]
        tl.store(y_out + p[:, None] * C_out + co[None, :], out, mask=ok)
        kept = tl.where(ok, out.to(tl.float32), 0.0)  # the statistics of what the next layer reads: the stored Y
        total += kept
        total_sq += kept * kept
    row = (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * 2
    tl.store(stats + row * C_out + co, tl.sum(total, axis=0), mask=co_ok)
    tl.store(stats + (row + 1) * C_out + co, tl.sum(total_sq, axis=0), mask=co_ok)


@triton.jit
def _dw_tap(g, da, y_in, k_img, dy_out, y_out, p, h, w_, p_ok, c, c0, c_ok, co, co_ok, s, t, d1, d2, w, H, W, C_in,
            DIL, KH: tl.constexpr, KW: tl.constexpr, M: tl.constexpr, DROPOUT: tl.constexpr):
    """Tap (KH, KW) of the 3x3 backward: (dW's product at each position, da plus this tap's share)."""
    C_out = C_in * M
    q, inside = _tap_offsets(p, h, w_, p_ok, H, W, DIL, KH, KW)  # dW: g here against a_{i-1} at the tap
    a = _activate(y_in, k_img, q, inside, c, c0, c_ok, s, t, C_in, (C_in + 31) // 32, DROPOUT)
    q, inside = _tap_offsets(p, h, w_, p_ok, H, W, DIL, 2 - KH, 2 - KW)  # dA: g at the tap the other way
    wt = tl.load(w + (KH * 3 + KW) * C_out + co, mask=co_ok, other=0.0)
    return g * _to_outputs(a, M), da + _bn_grad(dy_out, y_out, q, inside, co, co_ok, d1, d2, C_out) * wt[None, :]


@triton.jit
def _dw_backward(yp, sp, tp, keep, w, y, dy, dsum, dsumsq, dyp, partials, POSITIONS, H, W, C_in, DIL, PER_TILE,
                 M: tl.constexpr, DROPOUT: tl.constexpr, EVEN_C: tl.constexpr, BLOCK_P: tl.constexpr,
                 BLOCK_C: tl.constexpr):
    """One program: the PER_TILE positions of tile pid 1 of image block pid 0 (as `_dw_forward`), BLOCK_P at a time,
    x BLOCK_C input channels and their M * BLOCK_C outputs (grid: image blocks, tiles, channel blocks). Reads dy
    and y (for g), y_{i-1} (for a_{i-1} and its mask) and w; writes dy_{i-1} and, in its row of `partials`, dW's 9
    taps x C_out, then ds, dt of the inputs.
    dW's taps are summed over the positions a thread meets in registers, across threads once at the end."""
    n = tl.program_id(0).to(tl.int64)
    row = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    HW, C_out, WORDS = POSITIONS, C_in * M, (C_in + 31) // 32
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    co = tl.program_id(2) * (M * BLOCK_C) + tl.arange(0, M * BLOCK_C)
    c_ok, co_ok = (c < C_in) | EVEN_C, (co < C_out) | EVEN_C
    d1, d2 = tl.load(dsum + co, mask=co_ok, other=0.0), 2 * tl.load(dsumsq + co, mask=co_ok, other=0.0)
    s, t = tl.load(sp + c, mask=c_ok, other=0.0), tl.load(tp + c, mask=c_ok, other=0.0)
    c0 = tl.program_id(2) * BLOCK_C
    y_in, dy_in, k_img = yp + n * HW * C_in, dyp + n * HW * C_in, keep + n * HW * WORDS
    y_out, dy_out = y + n * HW * C_out, dy + n * HW * C_out
    zero = tl.zeros([BLOCK_P, M * BLOCK_C], dtype=tl.float32)
    dw0, dw1, dw2, dw3, dw4, dw5, dw6, dw7, dw8 = zero, zero, zero, zero, zero, zero, zero, zero, zero
    ds_acc, dt_acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32), tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    first = tl.program_id(1) * PER_TILE
    end = tl.minimum(first + PER_TILE, HW)
    for start in range(first, end, BLOCK_P):
        p = start + tl.arange(0, BLOCK_P)
        h = p // W
        w_ = p - h * W
        p_ok = p < end
        h = h % H  # the row within its image
        g = _bn_grad(dy_out, y_out, p, p_ok, co, co_ok, d1, d2, C_out)
        da = zero
        args = (y_in, k_img, dy_out, y_out, p, h, w_, p_ok, c, c0, c_ok, co, co_ok, s, t, d1, d2, w, H, W, C_in, DIL)
        prod, da = _dw_tap(g, da, *args, 0, 0, M, DROPOUT)
        dw0 += prod
        prod, da = _dw_tap(g, da, *args, 0, 1, M, DROPOUT)
        dw1 += prod
        prod, da = _dw_tap(g, da, *args, 0, 2, M, DROPOUT)
        dw2 += prod
        prod, da = _dw_tap(g, da, *args, 1, 0, M, DROPOUT)
        dw3 += prod
        prod, da = _dw_tap(g, da, *args, 1, 1, M, DROPOUT)
        dw4 += prod
        prod, da = _dw_tap(g, da, *args, 1, 2, M, DROPOUT)
        dw5 += prod
        prod, da = _dw_tap(g, da, *args, 2, 0, M, DROPOUT)
        dw6 += prod
        prod, da = _dw_tap(g, da, *args, 2, 1, M, DROPOUT)
        dw7 += prod
        prod, da = _dw_tap(g, da, *args, 2, 2, M, DROPOUT)
        dw8 += prod
        if M == 2:  # the two outputs of each input channel sit side by side: add them
            da = tl.sum(tl.reshape(da, [BLOCK_P, BLOCK_C, 2]), axis=2)
        # through a_{i-1} = relu(s y_{i-1} + t) * keep, its masks recomputed from y_{i-1} and the keep bits
        ok = p_ok[:, None] & c_ok[None, :]
        v = tl.load(y_in + p[:, None] * C_in + c[None, :], mask=ok, other=0.0).to(tl.float32)
        live = (v * s[None, :] + t[None, :] > 0) & ok
        if DROPOUT:
            live = live & _kept(k_img, p, p_ok, c, c0, WORDS)
        dam = tl.where(live, da, 0.0)
        tl.store(dy_in + p[:, None] * C_in + c[None, :], (dam * s[None, :]).to(dyp.dtype.element_ty), mask=ok)
        ds_acc += dam * v
        dt_acc += dam
    width = 9 * C_out + 2 * C_in  # this program's row: dW's 9 taps x C_out, then ds and dt of the C_in inputs
    out = partials + row.to(tl.int64) * width + co
    tl.store(out, tl.sum(dw0, axis=0), mask=co_ok)
    tl.store(out + C_out, tl.sum(dw1, axis=0), mask=co_ok)
    tl.store(out + 2 * C_out, tl.sum(dw2, axis=0), mask=co_ok)
    tl.store(out + 3 * C_out, tl.sum(dw3, axis=0), mask=co_ok)
    tl.store(out + 4 * C_out, tl.sum(dw4, axis=0), mask=co_ok)
    tl.store(out + 5 * C_out, tl.sum(dw5, axis=0), mask=co_ok)
    tl.store(out + 6 * C_out, tl.sum(dw6, axis=0), mask=co_ok)
    tl.store(out + 7 * C_out, tl.sum(dw7, axis=0), mask=co_ok)
    tl.store(out + 8 * C_out, tl.sum(dw8, axis=0), mask=co_ok)
    tl.store(partials + row.to(tl.int64) * width + 9 * C_out + c, tl.sum(ds_acc, axis=0), mask=c_ok)
    tl.store(partials + row.to(tl.int64) * width + 9 * C_out + C_in + c, tl.sum(dt_acc, axis=0), mask=c_ok)


@triton.jit
def _pw_forward(yp, sp, tp, keep, w, y, stats, P, C_in, C_out, DROPOUT: tl.constexpr, DOT_F32: tl.constexpr,
                BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """1x1 conv: Y (P x C_out) = a_{i-1} (P x C_in) @ W^T, a_{i-1} formed as each K chunk loads. One program:
    BLOCK_P positions (of all images, P = N H W) x BLOCK_N outputs (grid: position blocks, output blocks); its
    statistics' partials in row pid 0. Offsets from the block's first position are 32-bit."""
    q0 = tl.program_id(0).to(tl.int64) * BLOCK_P
    r = tl.arange(0, BLOCK_P)
    co = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    r_ok, co_ok = q0 + r < P, co < C_out
    WORDS = (C_in + 31) // 32
    y_in, k_img = yp + q0 * C_in, keep + q0 * WORDS
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    operand = tl.float32 if DOT_F32 else w.dtype.element_ty
    for k0 in range(0, C_in, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < C_in
        s, t = tl.load(sp + k, mask=k_ok, other=0.0), tl.load(tp + k, mask=k_ok, other=0.0)
        a = _activate(y_in, k_img, r, r_ok, k, k0, k_ok, s, t, C_in, WORDS, DROPOUT)
        wk = tl.load(w + co[None, :] * C_in + k[:, None], mask=k_ok[:, None] & co_ok[None, :], other=0.0)
        acc = tl.dot(a.to(operand), wk.to(operand), acc, input_precision="ieee")
    out = acc.to(y.dtype.element_ty)
    ok = r_ok[:, None] & co_ok[None, :]
    tl.store(y + q0 * C_out + r[:, None] * C_out + co[None, :], out, mask=ok)
    kept = tl.where(ok, out.to(tl.float32), 0.0)
    row = tl.program_id(0) * 2
    tl.store(stats + row * C_out + co, tl.sum(kept, axis=0), mask=co_ok)
    tl.store(stats + (row + 1) * C_out + co, tl.sum(kept * kept, axis=0), mask=co_ok)


@triton.jit
def _pw_dgrad(y, dy, dsum, dsumsq, w, yp, sp, tp, keep, dyp, partials, P, C_in, C_out, DROPOUT: tl.constexpr,
              DOT_F32: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dA (P x C_in) = g (P x C_out) @ W, g formed as each K chunk loads; then dy_{i-1} = dA * mask * s and ds, dt
    (row pid 0 of `partials`: ds then dt) through a_{i-1}. One program: BLOCK_P positions x BLOCK_N inputs."""
    q0 = tl.program_id(0).to(tl.int64) * BLOCK_P
    r = tl.arange(0, BLOCK_P)
    ci = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    r_ok, ci_ok = q0 + r < P, ci < C_in
    y_out, dy_out = y + q0 * C_out, dy + q0 * C_out
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    operand = tl.float32 if DOT_F32 else w.dtype.element_ty
    for k0 in range(0, C_out, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < C_out
        d1, d2 = tl.load(dsum + k, mask=k_ok, other=0.0), 2 * tl.load(dsumsq + k, mask=k_ok, other=0.0)
        g = _bn_grad(dy_out, y_out, r, r_ok, k, k_ok, d1, d2, C_out)
        wk = tl.load(w + k[:, None] * C_in + ci[None, :], mask=k_ok[:, None] & ci_ok[None, :], other=0.0)
        acc = tl.dot(g.to(operand), wk.to(operand), acc, input_precision="ieee")
    ok = r_ok[:, None] & ci_ok[None, :]
    WORDS = (C_in + 31) // 32
    at = q0 * C_in + r[:, None] * C_in + ci[None, :]
    v = tl.load(yp + at, mask=ok, other=0.0).to(tl.float32)
    s, t = tl.load(sp + ci, mask=ci_ok, other=0.0), tl.load(tp + ci, mask=ci_ok, other=0.0)
    live = (v * s[None, :] + t[None, :] > 0) & ok
    if DROPOUT:
        live = live & _kept(keep + q0 * WORDS, r, r_ok, ci, tl.program_id(1) * BLOCK_N, WORDS)
    dam = tl.where(live, acc, 0.0)
    tl.store(dyp + at, (dam * s[None, :]).to(dyp.dtype.element_ty), mask=ok)
    tl.store(partials + tl.program_id(0) * 2 * C_in + ci, tl.sum(dam * v, axis=0), mask=ci_ok)
    tl.store(partials + (tl.program_id(0) * 2 + 1) * C_in + ci, tl.sum(dam, axis=0), mask=ci_ok)


@triton.jit
def _pw_wgrad(y, dy, dsum, dsumsq, yp, sp, tp, keep, dw_partials, P, C_in, C_out, PER_SPLIT, DROPOUT: tl.constexpr,
              DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dW (C_out x C_in) = g^T @ a_{i-1} over the PER_SPLIT positions of split pid 2, both formed as they load.
    One program: BLOCK_M outputs x BLOCK_N inputs; its fp32 partial in `dw_partials[pid 2]`, summed after."""
    co = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ci = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok, ci_ok = co < C_out, ci < C_in
    d1 = tl.load(dsum + co, mask=co_ok, other=0.0)
    d2 = 2 * tl.load(dsumsq + co, mask=co_ok, other=0.0)
    s, t = tl.load(sp + ci, mask=ci_ok, other=0.0), tl.load(tp + ci, mask=ci_ok, other=0.0)
    WORDS = (C_in + 31) // 32
    first = tl.program_id(2).to(tl.int64) * PER_SPLIT
    length = tl.minimum(PER_SPLIT, P - first)
    y_out, dy_out, y_in = y + first * C_out, dy + first * C_out, yp + first * C_in
    k_img = keep + first * WORDS
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    operand = tl.float32 if DOT_F32 else yp.dtype.element_ty
    for r0 in range(0, length, BLOCK_K):
        r = r0 + tl.arange(0, BLOCK_K)
        r_ok = r < length
        g = _bn_grad(dy_out, y_out, r, r_ok, co, co_ok, d1, d2, C_out)
        a = _activate(y_in, k_img, r, r_ok, ci, tl.program_id(1) * BLOCK_N, ci_ok, s, t, C_in, WORDS, DROPOUT)
        acc = tl.dot(tl.trans(g.to(operand)), a.to(operand), acc, input_precision="ieee")
    out = dw_partials + tl.program_id(2).to(tl.int64) * C_out * C_in + co[:, None] * C_in + ci[None, :]
    tl.store(out, acc, mask=co_ok[:, None] & ci_ok[None, :])


@triton.jit
def _pool_forward(y, sp, tp, keep, pooled, HW, C, DROPOUT: tl.constexpr, BLOCK_P: tl.constexpr,
                  BLOCK_C: tl.constexpr):
    """Global average pooling of a = relu(s y + t) * keep: one program, image n x BLOCK_C channels (BLOCK_C divides
    32)."""
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    s, t = tl.load(sp + c, mask=c_ok, other=0.0), tl.load(tp + c, mask=c_ok, other=0.0)
    WORDS = (C + 31) // 32
    y_in, k_img = y + n * HW * C, keep + n * HW * WORDS
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for p0 in range(0, HW, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        acc += _activate(y_in, k_img, p, p < HW, c, tl.program_id(1) * BLOCK_C, c_ok, s, t, C, WORDS, DROPOUT)
    tl.store(pooled + n * C + c, (tl.sum(acc, axis=0) / HW).to(pooled.dtype.element_ty), mask=c_ok)


@triton.jit
def _pool_backward(dpooled, y, sp, tp, keep, dy, partials, HW, C, DROPOUT: tl.constexpr, BLOCK_P: tl.constexpr,
                   BLOCK_C: tl.constexpr):
    """dy = dpooled / HW * mask * s, and ds, dt of image n in row n of `partials`."""
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    s, t = tl.load(sp + c, mask=c_ok, other=0.0), tl.load(tp + c, mask=c_ok, other=0.0)
    d = tl.load(dpooled + n * C + c, mask=c_ok, other=0.0).to(tl.float32) / HW
    WORDS = (C + 31) // 32
    y_in, dy_in = y + n * HW * C, dy + n * HW * C
    k_img = keep + n * HW * WORDS
    ds_acc, dt_acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32), tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for p0 in range(0, HW, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        ok = (p < HW)[:, None] & c_ok[None, :]
        at = p[:, None] * C + c[None, :]
        v = tl.load(y_in + at, mask=ok, other=0.0).to(tl.float32)
        live = (v * s[None, :] + t[None, :] > 0) & ok
        if DROPOUT:
            live = live & _kept(k_img, p, p < HW, c, tl.program_id(1) * BLOCK_C, WORDS)
        dam = tl.where(live, d[None, :], 0.0)
        tl.store(dy_in + at, (dam * s[None, :]).to(dy.dtype.element_ty), mask=ok)
        ds_acc += dam * v
        dt_acc += dam
    tl.store(partials + n * 2 * C + c, tl.sum(ds_acc, axis=0), mask=c_ok)
    tl.store(partials + (n * 2 + 1) * C + c, tl.sum(dt_acc, axis=0), mask=c_ok)


# --- launchers -------------------------------------------------------------------------------------

# The tiles autotune picks among on CUDA, keyed by the shapes (AUTOTUNE_KEY), timed at the first call of each. What a
# tile must not change is fixed by the launcher instead: the positions of a 3x3 program (PER_TILE, so its partial
# sums' rows), the 1x1 kernels' BLOCK_P (their rows), the weight gradient's splits. Channel blocks divide 32: one
# keep word a position. Every tile builds for sm_90a under Triton 3.9.0 and 3.6.0 with no register spill in every
# variant a step launches (tests/test_kernels.py); the first, which the start-up check pins, at 128 registers a
# thread or fewer. Each tile's registers and instructions per layer: bench/results/*-roofline-after.md.
TUNING = {"dw_forward": [dict(BLOCK_P=16, BLOCK_C=32, num_warps=8),
                         dict(BLOCK_P=32, BLOCK_C=32, num_warps=8),
                         dict(BLOCK_P=32, BLOCK_C=16, num_warps=4),
                         dict(BLOCK_P=32, BLOCK_C=32, num_warps=4)],
          "dw_backward": [dict(BLOCK_P=16, BLOCK_C=8, num_warps=4),
                          dict(BLOCK_P=8, BLOCK_C=16, num_warps=4),
                          dict(BLOCK_P=32, BLOCK_C=8, num_warps=4)],
          "pw_forward": [dict(BLOCK_N=64, BLOCK_K=32, num_warps=4),
                         dict(BLOCK_N=128, BLOCK_K=32, num_warps=8),
                         dict(BLOCK_N=64, BLOCK_K=32, num_warps=8)],
          "pw_dgrad": [dict(BLOCK_N=32, BLOCK_K=32, num_warps=4),
                       dict(BLOCK_N=32, BLOCK_K=64, num_warps=4),
                       dict(BLOCK_N=16, BLOCK_K=64, num_warps=4),
                       dict(BLOCK_N=32, BLOCK_K=128, num_warps=8)],
          "pw_wgrad": [dict(BLOCK_M=128, BLOCK_N=32, BLOCK_K=32, num_warps=8),
                       dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=64, num_warps=4),
                       dict(BLOCK_M=128, BLOCK_N=32, BLOCK_K=64, num_warps=4),
                       dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, num_warps=4)],
          "pool_forward": [dict(BLOCK_P=64, BLOCK_C=32, num_warps=4),
                           dict(BLOCK_P=32, BLOCK_C=32, num_warps=4),
                           dict(BLOCK_P=128, BLOCK_C=32, num_warps=8)],
          "pool_backward": [dict(BLOCK_P=64, BLOCK_C=32, num_warps=4),
                            dict(BLOCK_P=32, BLOCK_C=32, num_warps=4),
                            dict(BLOCK_P=128, BLOCK_C=32, num_warps=8)],
          "keep_bits": [dict(BLOCK=256, num_warps=4),
                        dict(BLOCK=128, num_warps=4),
                        dict(BLOCK=512, num_warps=8)]}
KERNELS = {"dw_forward": _dw_forward, "dw_backward": _dw_backward, "pw_forward": _pw_forward,
           "pw_dgrad": _pw_dgrad, "pw_wgrad": _pw_wgrad, "pool_forward": _pool_forward,
           "pool_backward": _pool_backward, "keep_bits": _keep_bits}
# What autotune keys its pick on, besides the tensors' dtypes (which it adds itself): the shapes, and the constexprs
# that change the code (M, DROPOUT).
AUTOTUNE_KEY = {"dw_forward": ["POSITIONS", "W", "C_in", "DIL", "PER_TILE", "M", "DROPOUT"],
                "dw_backward": ["POSITIONS", "W", "C_in", "DIL", "PER_TILE", "M", "DROPOUT"],
                "pw_forward": ["P", "C_in", "C_out", "DROPOUT"], "pw_dgrad": ["P", "C_in", "C_out", "DROPOUT"],
                "pw_wgrad": ["P", "C_in", "C_out", "PER_SPLIT", "DROPOUT"], "pool_forward": ["HW", "C", "DROPOUT"],
                "pool_backward": ["HW", "C", "DROPOUT"], "keep_bits": ["HW", "C"]}
PW_BLOCK_P = {"cuda": 64, "interpreter": 1024}  # the 1x1 kernels' positions a program, fixed: their partials' rows
# The 1x1 weight gradient's grid aims at about this many programs (the 3x3 kernels': net/kernels.py's), as there.
BACKWARD_PROGRAMS = {"cuda": 2048, "interpreter": 1}

# Each kernel's runtime loop, its trips summed over a launch's programs (as net/kernels.py's LOOP_TRIPS).
LOOP_TRIPS = {"_dw_forward": lambda a, grid: tile_trips(a["POSITIONS"], a["PER_TILE"], a["BLOCK_P"]) * grid[0]
              * grid[2],
              "_dw_backward": lambda a, grid: tile_trips(a["POSITIONS"], a["PER_TILE"], a["BLOCK_P"]) * grid[0]
              * grid[2],
              "_pw_forward": lambda a, grid: cdiv(a["C_in"], a["BLOCK_K"]) * grid[0] * grid[1],
              "_pw_dgrad": lambda a, grid: cdiv(a["C_out"], a["BLOCK_K"]) * grid[0] * grid[1],
              "_pw_wgrad": lambda a, grid: tile_trips(a["P"], a["PER_SPLIT"], a["BLOCK_K"]) * grid[0] * grid[1],
              "_pool_forward": lambda a, grid: cdiv(a["HW"], a["BLOCK_P"]) * grid[0] * grid[1],
              "_pool_backward": lambda a, grid: cdiv(a["HW"], a["BLOCK_P"]) * grid[0] * grid[1]}
# The FLOPs each kernel runs on tensor cores (its tl.dot matmuls), for bench/roofline.py.
TENSOR_FLOPS = {name: lambda a: 2 * a["P"] * a["C_in"] * a["C_out"]
                for name in ("_pw_forward", "_pw_dgrad", "_pw_wgrad")}

_autotuners = {}  # kind -> its kernel under triton.autotune, made at the first launch on CUDA
_narrow_bits = False  # the interpreter makes keep bits as the GPU does, a bit at a time (a test sets it)


MAX_NUMEL = 2**20  # Triton's largest tensor: an interpreted tile's positions are capped to stay within it


def interpreted_positions(positions, channels):
    """The positions a tile `channels` wide takes at once in the interpreter: all of them, up to Triton's limit
    (the kernels loop over the rest)."""
    return min(positions, MAX_NUMEL // triton.next_power_of_2(channels))


def interpreted_tile(kind, extent):
    """Under the interpreter, whose cost is per program and per operation, not per element: one wide tile, each
    block the power of two that covers `extent` (block -> the size it spans)."""
    return {block: triton.next_power_of_2(size) for block, size in extent.items()}


def _launch(kind, grid, args, constexprs, extent):
    """Run kernel `kind` over `grid(tile)`: on CUDA autotuned among TUNING[kind]; under the interpreter (CPU tensors)
    one wide tile (`interpreted_tile` of `extent`); under net.kernels.recording() recorded with TUNING[kind]."""
    from . import kernels

    if kernels._recorded is not None:
        tiles = [{**t, **{k: v for k, v in constexprs.items() if k.startswith("BLOCK")}} for t in TUNING[kind]]
        kernels._recorded.append(kernels.Launch(KERNELS[kind], args, constexprs, tiles, grid))
    elif interpreting():
        tile = interpreted_tile(kind, extent)
        KERNELS[kind][grid(tile)](*args, **constexprs, **tile)
    elif kernels._pinned:
        tile = TUNING[kind][0]
        KERNELS[kind][grid(tile)](*args, **constexprs, **tile)
    else:
        if kind not in _autotuners:
            configs = [triton.Config({k: v for k, v in c.items() if k != "num_warps"}, num_warps=c["num_warps"])
                       for c in TUNING[kind]]
            _autotuners[kind] = triton.autotune(configs, key=AUTOTUNE_KEY[kind])(KERNELS[kind])
        _autotuners[kind][lambda meta: grid(meta)](*args, **constexprs)


def tiles():
    """{kernel: {shape: tile}}: autotune's pick for each shape it has met on CUDA ("POSITIONS=1024, W=32, C_in=256,
    ..., bfloat16" -> "16x32, 8 warps"); empty before any launch, and elsewhere. gpu-check reports it."""
    def shape(kind, key):  # autotune's key: AUTOTUNE_KEY's values, then each tensor's dtype
        named = [f"{k}={v}" for k, v in zip(AUTOTUNE_KEY[kind], key)]
        return ", ".join(named + sorted({str(d).removeprefix("torch.") for d in key[len(named):]}))

    return {kind: {shape(kind, key): "x".join(str(v) for v in c.kwargs.values()) + f", {c.num_warps} warps"
                   for key, c in tuner.cache.items()} for kind, tuner in _autotuners.items()}


def dot_f32(x):
    """Whether the matmuls take fp32 operands: for fp32 storage, and always in the interpreter, whose tl.dot
    multiplies bf16 operands as raw bits (seen with Triton 3.9.0)."""
    return x.dtype == torch.float32 or interpreting()


def nhwc(x):
    return x.contiguous(memory_format=torch.channels_last)


def _empty(shape, like):
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=torch.channels_last)


def _stats(partials):
    """(sum, sum of squares) per channel from rows of (sum, sumsq) partials, summed in a fixed order."""
    rows = partials.view(-1, 2, partials.shape[-1])
    return rows[:, 0].sum(0), rows[:, 1].sum(0)  # two tensors: an op's outputs may not alias each other


def _vectors(*vectors):
    """Per-channel vectors as the kernels index them: contiguous (a gradient may come expanded, stride 0)."""
    return tuple(v.contiguous() for v in vectors)


def keep_bits(seeds, layer, p, n, c, h, w):
    """Dropout's keep bits of layer `layer` (seed `seeds[layer]`, rate p) for activations (n, c, h, w): int32 words
    (n, h, w, ceil(c / 32)). The seeds are passed whole (an aligned pointer: each kernel builds once)."""
    words = cdiv(c, 32)
    bits = torch.empty((n, h, w, words), dtype=torch.int32, device=seeds.device)
    drop_below = min(int(p * 2**31), 2**31 - 1)  # keep unless hash / 2 < p 2^31
    _launch("keep_bits", lambda b: (n, cdiv(h * w * words, b["BLOCK"])),
            (seeds, layer, bits, h * w, c, words, drop_below), dict(WIDE=interpreting() and not _narrow_bits),
            dict(BLOCK=h * w * words))
    return bits


def image_blocks(n, h, w, c_out):
    """(image blocks, positions a block, tiles a block, positions a tile) of the 3x3 kernels' grid: on CUDA an image a
    block, tiles as net/kernels.py's backward plans them; in the interpreter the whole batch in one tile."""
    if interpreting():
        return 1, n * h * w, 1, n * h * w
    return n, h * w, *backward_tiles(n, c_out, h * w)


def dw_forward(y_prev, s, t, keep, weight, dilation):
    n, c_in, h, w = y_prev.shape
    c_out = weight.shape[1]
    y = _empty((n, c_out, h, w), y_prev)
    blocks, positions, tiles, per_tile = image_blocks(n, h, w, c_out)
    stats = torch.empty((blocks * tiles * 2, c_out), dtype=torch.float32, device=y.device)
    s, t = _vectors(s, t)
    _launch("dw_forward", lambda b: (blocks, tiles, cdiv(c_in, b["BLOCK_C"])),
            (nhwc(y_prev), s, t, keep, weight.contiguous(), y, stats, positions, h, w, c_in, dilation, per_tile),
            dict(M=c_out // c_in, DROPOUT=keep.numel() > 0, EVEN_C=c_in % 32 == 0),
            dict(BLOCK_P=interpreted_positions(per_tile, c_out), BLOCK_C=c_in))
    return (y, *_stats(stats))


def dw_backward(dy, dsum, dsumsq, y, y_prev, s, t, keep, weight, dilation):
    n, c_in, h, w = y_prev.shape
    c_out = weight.shape[1]
    blocks, positions, tiles, per_tile = image_blocks(n, h, w, c_out)
    dy_prev = _empty(y_prev.shape, y_prev)
    partials = torch.empty((blocks * tiles, 9 * c_out + 2 * c_in), dtype=torch.float32, device=y.device)
    dsum, dsumsq, s, t = _vectors(dsum, dsumsq, s, t)
    _launch("dw_backward", lambda b: (blocks, tiles, cdiv(c_in, b["BLOCK_C"])),
            (nhwc(y_prev), s, t, keep, weight.contiguous(), nhwc(y), nhwc(dy), dsum, dsumsq, dy_prev, partials,
             positions, h, w, c_in, dilation, per_tile),
            dict(M=c_out // c_in, DROPOUT=keep.numel() > 0, EVEN_C=c_in % 32 == 0),
            dict(BLOCK_P=interpreted_positions(per_tile, c_out), BLOCK_C=c_in))
    dw = partials[:, :9 * c_out].sum(0).view(weight.shape)
    return dy_prev, partials[:, 9 * c_out:9 * c_out + c_in].sum(0), partials[:, 9 * c_out + c_in:].sum(0), dw


def _pw_block_p():
    return PW_BLOCK_P["interpreter" if interpreting() else "cuda"]


def pw_forward(y_prev, s, t, keep, weight):
    n, c_in, h, w = y_prev.shape
    c_out, positions = weight.shape[0], n * h * w
    y = _empty((n, c_out, h, w), y_prev)
    block_p = min(_pw_block_p(), triton.next_power_of_2(positions))
    stats = torch.empty((cdiv(positions, block_p) * 2, c_out), dtype=torch.float32, device=y.device)
    s, t = _vectors(s, t)
    _launch("pw_forward", lambda b: (cdiv(positions, block_p), cdiv(c_out, b["BLOCK_N"])),
            (nhwc(y_prev), s, t, keep, weight.contiguous(), y, stats, positions, c_in, c_out),
            dict(DROPOUT=keep.numel() > 0, DOT_F32=dot_f32(y), BLOCK_P=block_p),
            dict(BLOCK_N=c_out, BLOCK_K=min(c_in, 32)))
    return (y, *_stats(stats))


def pw_backward(dy, dsum, dsumsq, y, y_prev, s, t, keep, weight):
    n, c_in, h, w = y_prev.shape
    c_out, positions = weight.shape[0], n * h * w
    dy, y, y_prev, weight = nhwc(dy), nhwc(y), nhwc(y_prev), weight.contiguous()
    dsum, dsumsq, s, t = _vectors(dsum, dsumsq, s, t)
    dropout = keep.numel() > 0
    block_p = min(_pw_block_p(), triton.next_power_of_2(positions))
    dy_prev = _empty(y_prev.shape, y_prev)
    partials = torch.empty((cdiv(positions, block_p) * 2, c_in), dtype=torch.float32, device=y.device)
    _launch("pw_dgrad", lambda b: (cdiv(positions, block_p), cdiv(c_in, b["BLOCK_N"])),
            (y, dy, dsum, dsumsq, weight, y_prev, s, t, keep, dy_prev, partials, positions, c_in, c_out),
            dict(DROPOUT=dropout, DOT_F32=dot_f32(y), BLOCK_P=block_p), dict(BLOCK_N=c_in, BLOCK_K=c_out))
    ds, dt = _stats(partials)
    # splits of the positions, fixed here (not by the tile): about BACKWARD_PROGRAMS programs at 64 x 32 a tile
    programs = BACKWARD_PROGRAMS["interpreter" if interpreting() else "cuda"]
    splits = max(1, min(cdiv(positions, 1024), programs // (cdiv(c_out, 64) * cdiv(c_in, 32))))
    per_split = cdiv(cdiv(positions, splits), 128) * 128
    splits = cdiv(positions, per_split)
    dw = torch.empty((splits, c_out, c_in), dtype=torch.float32, device=y.device)
    _launch("pw_wgrad", lambda b: (cdiv(c_out, b["BLOCK_M"]), cdiv(c_in, b["BLOCK_N"]), splits),
            (y, dy, dsum, dsumsq, y_prev, s, t, keep, dw, positions, c_in, c_out, per_split),
            dict(DROPOUT=dropout, DOT_F32=dot_f32(y)),
            dict(BLOCK_M=c_out, BLOCK_N=c_in, BLOCK_K=interpreted_positions(per_split, max(c_in, c_out))))
    return dy_prev, ds, dt, dw.sum(0).view(weight.shape)


def pool_forward(y, s, t, keep):
    n, c, h, w = y.shape
    pooled = torch.empty((n, c), dtype=y.dtype, device=y.device)
    s, t = _vectors(s, t)
    _launch("pool_forward", lambda b: (n, cdiv(c, b["BLOCK_C"])), (nhwc(y), s, t, keep, pooled, h * w, c),
            dict(DROPOUT=keep.numel() > 0), dict(BLOCK_P=h * w, BLOCK_C=c))
    return pooled


def pool_backward(dpooled, y, s, t, keep):
    n, c, h, w = y.shape
    dy = _empty(y.shape, y)
    partials = torch.empty((n * 2, c), dtype=torch.float32, device=y.device)
    s, t = _vectors(s, t)
    _launch("pool_backward", lambda b: (n, cdiv(c, b["BLOCK_C"])),
            (dpooled.contiguous(), nhwc(y), s, t, keep, dy, partials, h * w, c),
            dict(DROPOUT=keep.numel() > 0), dict(BLOCK_P=h * w, BLOCK_C=c))
    return (dy, *_stats(partials))


def dropout_mask(seed, shape, p, device="cpu", layer=0):
    """The keep mask (bool, `shape` = (N, C, H, W)) that the fused path draws for a layer with seed `seed` and rate
    `p`: its keep bits, unpacked."""
    n, c, h, w = shape
    seeds = torch.zeros(layer + 1, dtype=torch.int64, device=device)
    seeds[layer] = seed
    words = keep_bits(seeds, layer, p, n, c, h, w)
    shifts = torch.arange(32, device=device, dtype=torch.int32)
    bits = (words[..., None] >> shifts) & 1  # (n, h, w, words, 32)
    return bits.flatten(3)[..., :c].permute(0, 3, 1, 2).bool()


# --- torch.library: one opaque op each way per kind, so that torch.compile sees the kernels as ops, not a break ---
# Outputs: Y in the input's dtype and NHWC, the statistics fp32 per channel. `keep`: the input activation's keep
# bits (an empty tensor: no dropout). The 3x3 weight is fp32 (9, C_out), tap-major; the 1x1's (C_out, C_in) in the
# activations' dtype; both with dropout's 1 / (1 - p) folded in by `forward`.

def _like_output(y_prev, channels):
    n, _, h, w = y_prev.shape
    return _empty((n, channels, h, w), y_prev)


def _channel_vectors(like, channels, k=2):
    return tuple(torch.empty(channels, dtype=torch.float32, device=like.device) for _ in range(k))


@torch.library.custom_op("dalicifar::keep_bits", mutates_args=())
def keep_bits_op(seeds: torch.Tensor, layer: int, p: float, n: int, c: int, h: int, w: int) -> torch.Tensor:
    return keep_bits(seeds, layer, p, n, c, h, w)


@keep_bits_op.register_fake
def _(seeds, layer, p, n, c, h, w):
    return torch.empty((n, h, w, (c + 31) // 32), dtype=torch.int32, device=seeds.device)


@torch.library.custom_op("dalicifar::fused_dw", mutates_args=(), tags=STRIDES)
def fused_dw_op(y_prev: torch.Tensor, s: torch.Tensor, t: torch.Tensor, keep: torch.Tensor, weight: torch.Tensor,
                dilation: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return dw_forward(y_prev, s, t, keep, weight, dilation)


@fused_dw_op.register_fake
def _(y_prev, s, t, keep, weight, dilation):
    return (_like_output(y_prev, weight.shape[1]), *_channel_vectors(y_prev, weight.shape[1]))


@torch.library.custom_op("dalicifar::fused_dw_backward", mutates_args=(), tags=STRIDES)
def fused_dw_backward_op(dy: torch.Tensor, dsum: torch.Tensor, dsumsq: torch.Tensor, y: torch.Tensor,
                         y_prev: torch.Tensor, s: torch.Tensor, t: torch.Tensor, keep: torch.Tensor,
                         weight: torch.Tensor, dilation: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return dw_backward(dy, dsum, dsumsq, y, y_prev, s, t, keep, weight, dilation)


@fused_dw_backward_op.register_fake
def _(dy, dsum, dsumsq, y, y_prev, s, t, keep, weight, dilation):
    return (_empty(y_prev.shape, y_prev), *_channel_vectors(y_prev, y_prev.shape[1]), torch.empty_like(weight))


@torch.library.custom_op("dalicifar::fused_pw", mutates_args=(), tags=STRIDES)
def fused_pw_op(y_prev: torch.Tensor, s: torch.Tensor, t: torch.Tensor, keep: torch.Tensor,
                weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return pw_forward(y_prev, s, t, keep, weight)


@fused_pw_op.register_fake
def _(y_prev, s, t, keep, weight):
    return (_like_output(y_prev, weight.shape[0]), *_channel_vectors(y_prev, weight.shape[0]))


@torch.library.custom_op("dalicifar::fused_pw_backward", mutates_args=(), tags=STRIDES)
def fused_pw_backward_op(dy: torch.Tensor, dsum: torch.Tensor, dsumsq: torch.Tensor, y: torch.Tensor,
                         y_prev: torch.Tensor, s: torch.Tensor, t: torch.Tensor, keep: torch.Tensor,
                         weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return pw_backward(dy, dsum, dsumsq, y, y_prev, s, t, keep, weight)


@fused_pw_backward_op.register_fake
def _(dy, dsum, dsumsq, y, y_prev, s, t, keep, weight):
    return (_empty(y_prev.shape, y_prev), *_channel_vectors(y_prev, y_prev.shape[1]),
            torch.empty_like(weight, memory_format=torch.contiguous_format))


@torch.library.custom_op("dalicifar::fused_pool", mutates_args=(), tags=STRIDES)
def fused_pool_op(y: torch.Tensor, s: torch.Tensor, t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return pool_forward(y, s, t, keep)


@fused_pool_op.register_fake
def _(y, s, t, keep):
    return torch.empty((y.shape[0], y.shape[1]), dtype=y.dtype, device=y.device)


@torch.library.custom_op("dalicifar::fused_pool_backward", mutates_args=(), tags=STRIDES)
def fused_pool_backward_op(dpooled: torch.Tensor, y: torch.Tensor, s: torch.Tensor, t: torch.Tensor,
                           keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return pool_backward(dpooled, y, s, t, keep)


@fused_pool_backward_op.register_fake
def _(dpooled, y, s, t, keep):
    return (_empty(y.shape, y), *_channel_vectors(y, y.shape[1]))


def _grads_or_zeros(y, dy, dsum, dsumsq):
    """The incoming gradients, a zero where autograd has none (an output that nothing downstream used)."""
    zeros = torch.zeros(y.shape[1], dtype=torch.float32, device=y.device)
    return (torch.zeros_like(y) if dy is None else dy, zeros if dsum is None else dsum,
            zeros if dsumsq is None else dsumsq)


def _setup_conv(ctx, inputs, output):
    y_prev, s, t, keep, weight, *rest = inputs
    ctx.rest = rest  # the dilation of a 3x3 conv; nothing for a 1x1
    ctx.save_for_backward(output[0], y_prev, s, t, keep, weight)


def _conv_grad(backward_op):
    def grad(ctx, dy, dsum, dsumsq):
        y, y_prev, s, t, keep, weight = ctx.saved_tensors
        dy_prev, ds, dt, dw = backward_op(*_grads_or_zeros(y, dy, dsum, dsumsq), y, y_prev, s, t, keep, weight,
                                          *ctx.rest)
        return (dy_prev, ds, dt, None, dw, *[None] * len(ctx.rest))
    return grad


fused_dw_op.register_autograd(_conv_grad(fused_dw_backward_op), setup_context=_setup_conv)
fused_pw_op.register_autograd(_conv_grad(fused_pw_backward_op), setup_context=_setup_conv)


def _setup_pool(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _pool_grad(ctx, dpooled):
    y, s, t, keep = ctx.saved_tensors
    dy, ds, dt = fused_pool_backward_op(dpooled, y, s, t, keep)
    return dy, ds, dt, None


fused_pool_op.register_autograd(_pool_grad, setup_context=_setup_pool)


# --- the model's forward ---------------------------------------------------------------------------

def batch_norm_coefficients(bn, total, total_sq, count):
    """(s, t) with BatchNorm(y) = s * y + t per channel, from the batch's per-channel sums of y and y^2 over
    `count` values (`net.cpu.batch_statistics`: the running statistics updated in training). Tiny tensors, left to
    autograd."""
    mean, var = cpu.batch_statistics(bn, total, total_sq, count)
    s = bn.weight * torch.rsqrt(var + bn.eps)
    return s, bn.bias - mean * s


def draw_seeds(layers, device):
    """One dropout seed per layer for this step, from torch's generator on `device` (no host sync)."""
    return torch.randint(0, 2**31 - 1, (layers,), device=device)


def forward(model, x, seeds=None):
    """`model` (a Net) on `x` through the fused kernels: the same function as its unfused forward, and the same
    parameters and buffers (the running statistics and batch counts updated alike in training). Dropout's seeds
    are drawn here unless given (`seeds`: one per layer, as `draw_seeds` makes them)."""
    layers = [layer for block in model.features for layer in block]  # each: conv, BatchNorm, ReLU, Dropout
    for layer in layers:
        assert layer[1].momentum is not None and layer[1].track_running_stats, "the fused path keeps nn's defaults"
    n, _, h, w = x.shape
    count = n * h * w
    drops = [layer[3].p if model.training else 0.0 for layer in layers]
    if any(drops) and seeds is None:
        seeds = draw_seeds(len(layers), x.device)
    no_keep = torch.empty(0, dtype=torch.int32, device=x.device)

    def keep(i, channels):  # layer i's keep bits, and the 1 / (1 - p) its reader folds into its weights
        p = drops[i]
        return (keep_bits_op(seeds, i, p, n, channels, h, w), 1 / (1 - p)) if p > 0 else (no_keep, 1.0)

    y = nhwc(layers[0][0](x))  # the first conv reads the image: no prologue, F.conv2d
    statistics = y.float()
    s, t = batch_norm_coefficients(layers[0][1], statistics.sum((0, 2, 3)), statistics.square().sum((0, 2, 3)),
                                   count)
    for i, (conv, bn, _, _) in enumerate(layers[1:], 1):
        bits, scale = keep(i - 1, conv.in_channels)
        if conv.kernel_size == (1, 1):
            weight = (conv.weight.flatten(1) * scale).to(y.dtype)
            y, total, total_sq = fused_pw_op(y, s, t, bits, weight)
        else:  # tap-major and fp32 (a tap's weights one contiguous load), rounded first to the activations' dtype
            weight = (conv.weight.to(y.dtype).flatten(1).t() * scale).float().contiguous()  # as autocast would
            y, total, total_sq = fused_dw_op(y, s, t, bits, weight, conv.dilation[0])
        s, t = batch_norm_coefficients(bn, total, total_sq, count)
    bits, scale = keep(len(layers) - 1, y.shape[1])
    pooled = fused_pool_op(y, s, t, bits) * scale
    return model.head(pooled)
