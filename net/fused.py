"""The fused path (`Net.fused`): each conv with its neighbours' BatchNorm, ReLU and dropout in the same kernels.

Why: the convs are opaque to Inductor (cuDNN, or net/kernels.py's ops), so it cannot fuse anything into them.
Unfused, every layer's conv output is written, read by BatchNorm's statistics, read again to normalise, ReLU
and drop, written as the next conv's input, and the backward does the same in reverse: counted by Inductor on
the compiled step (python -m bench.traffic), about 52 of its 65 MB per image are BatchNorm, ReLU and dropout.
Here, as in cuDNN's fused ops for ResNet training (and NVIDIA's MLPerf submissions), only each conv's raw
output Y_i is stored, plus per-channel fp32 vectors, and whoever reads Y_i next applies its BatchNorm, ReLU
and dropout on the fly, a_i = dropout(relu(s_i * Y_i + t_i)):

- forward op i: (Y_{i-1}, s_{i-1}, t_{i-1}, seed, W_i) -> (Y_i, sum_i, sumsq_i). The prologue forms a_{i-1} as
  each tile loads (padding stays zero after the transform); the epilogue reduces this layer's batch
  statistics as fp32 per-tile partials, summed afterwards in a fixed order (deterministic, no atomics);
- the per-channel algebra stays in PyTorch on tiny tensors (`batch_norm_coefficients`): mean, variance
  (biased, clamped at 0), s = gamma * rstd, t = beta - mean * s, and the running statistics exactly as
  nn.BatchNorm2d updates them; autograd carries the gradients of gamma, beta and the statistics;
- backward op i, given dY_i, dsum_i, dsumsq_i: g = dY_i + dsum_i + 2 Y_i dsumsq_i as tiles load (BatchNorm's
  backward through its statistics); dA = the transposed conv of g; dY_{i-1} = dA * mask * s_{i-1} with ReLU's
  and dropout's mask recomputed from Y_{i-1} and the seed, never stored; ds_{i-1}, dt_{i-1} as per-tile
  partials; dW_i from g and a_{i-1} recomputed;
- dropout keeps an element where Philox's uniform draw `tl.rand(seed, index)` is at least p, the index being
  the element's logical (n, c, h, w) position: any tiling, forward or backward, draws the same mask, and
  `dropout_mask(seed, shape, p)` draws it in the open, for tests. One seed per layer per step, drawn on the
  device from torch's generator (no host sync; checkpoints keep the generator);
- the first conv (3 -> 32, on the image) needs no prologue: F.conv2d, with its statistics in PyTorch; the last
  layer's activation goes straight into global average pooling (`_pool_*`), never stored.

In order, as net/kernels.py: the reference (the unfused layers), the kernels, launchers, the torch.library
ops and their autograd, and `forward(model, x)`. Every tensor the kernels touch is NHWC (channels_last),
viewed as a (positions, channels) matrix; fp32, bf16 or fp16 storage, fp32 arithmetic. This module imports
Triton: Net imports it when `fused` is first set, and its kernels run where net/kernels.py's do (CUDA, or
CPU tensors under TRITON_INTERPRET=1).
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .kernels import STRIDES, backward_tiles, cdiv, interpreting, record_or_run, tile_trips

# --- the reference ---------------------------------------------------------------------------------


def reference_layer(x, conv, bn, p, keep=None):
    """What one fused layer computes, unfused: conv, BatchNorm, ReLU, then dropout by the mask `keep` (bool, the
    conv output's shape; None: no dropout), scaled by 1 / (1 - p)."""
    a = F.relu(bn(conv(x)))
    return a if keep is None else a * keep / (1 - p)


# --- the kernels -----------------------------------------------------------------------------------
# Activations are NHWC: position q = n * HW + h * W + w of a (positions, channels) matrix. The dropout index of
# element (n, c, h, w) is its NCHW logical index ((n * C + c) * H + h) * W + w, whatever the layout or tile.

@triton.jit
def _activate(y, s, t, seed, index, p_drop, DROPOUT: tl.constexpr):
    """(a, m): a = dropout(relu(s * y + t)) and m its derivative in y over s: ReLU's step times dropout's keep
    / (1 - p). All fp32."""
    m = tl.where(y * s + t > 0, 1.0, 0.0)
    if DROPOUT:
        m = tl.where(tl.rand(seed, index) >= p_drop, m / (1 - p_drop), 0.0)
    return (y * s + t) * m, m


@triton.jit
def _mask_kernel(out, seed_ptr, numel, p_drop, BLOCK: tl.constexpr):
    """`dropout_mask`: the keep mask of elements 0..numel-1 by logical index."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    keep = tl.rand(tl.load(seed_ptr), i) >= p_drop
    tl.store(out + i, keep.to(tl.int8), mask=i < numel)


@triton.jit
def _dw_forward(yp, sp, tp, seed_ptr, w, y, stats, C_out, H, W, DIL, p_drop,
                M: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Depthwise (M = 1) or grouped (M = 2) dilated 3x3 conv of a_{i-1}: one program, BLOCK_P positions of image n
    x BLOCK_C output channels (grid: p blocks, N, c blocks); its statistics' partials in row n * p blocks + pid 0."""
    n = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    co = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    C_in = C_out // M
    ci = co // M
    h, w_ = p // W, p % W
    p_ok, c_ok = p < H * W, co < C_out
    s, t = tl.load(sp + ci, mask=c_ok, other=0.0), tl.load(tp + ci, mask=c_ok, other=0.0)
    seed = tl.load(seed_ptr)
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for kh in tl.static_range(3):
        hh = h + (kh - 1) * DIL
        for kw in tl.static_range(3):
            ww = w_ + (kw - 1) * DIL
            inside = (p_ok & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W))[:, None] & c_ok[None, :]
            v = tl.load(yp + (n * H * W + hh * W + ww)[:, None] * C_in + ci[None, :], mask=inside, other=0.0)
            index = ((n * C_in + ci[None, :]) * H + hh[:, None]) * W + ww[:, None]
            a, _ = _activate(v.to(tl.float32), s[None, :], t[None, :], seed, index.to(tl.int32), p_drop, DROPOUT)
            wv = tl.load(w + co * 9 + kh * 3 + kw, mask=c_ok, other=0.0)
            acc += tl.where(inside, a, 0.0) * wv.to(tl.float32)[None, :]  # zero padding, after the transform
    out = acc.to(y.dtype.element_ty)
    ok = p_ok[:, None] & c_ok[None, :]
    tl.store(y + (n * H * W + p)[:, None] * C_out + co[None, :], out, mask=ok)
    kept = tl.where(ok, out.to(tl.float32), 0.0)  # the statistics of what the next layer reads: the stored Y
    row = (n * tl.num_programs(0) + tl.program_id(0)) * 2
    tl.store(stats + row * C_out + co, tl.sum(kept, axis=0), mask=c_ok)
    tl.store(stats + (row + 1) * C_out + co, tl.sum(kept * kept, axis=0), mask=c_ok)


@triton.jit
def _dw_backward(yp, sp, tp, seed_ptr, w, y, dy, dsum, dsumsq, dyp, partials, C_out, H, W, DIL, PER_TILE, p_drop,
                 M: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """One program: the PER_TILE positions of tile t of image n, BLOCK_P at a time, x BLOCK_C output channels and
    their BLOCK_C // M input channels (grid: tiles, N, c blocks). Reads dy and y (for g), y_{i-1} (for a_{i-1}
    and its mask) and w; writes dy_{i-1} and, in its row of `partials`, dW's 9 taps and ds, dt of the inputs."""
    n = tl.program_id(1).to(tl.int64)
    row = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    co = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    ci = tl.program_id(2) * (BLOCK_C // M) + tl.arange(0, BLOCK_C // M)
    C_in = C_out // M
    co_ok, ci_ok = co < C_out, ci < C_in
    taps = tl.arange(0, 16)
    seed = tl.load(seed_ptr)
    d1, d2 = tl.load(dsum + co, mask=co_ok, other=0.0), 2 * tl.load(dsumsq + co, mask=co_ok, other=0.0)
    s_co, t_co = tl.load(sp + co // M, mask=co_ok, other=0.0), tl.load(tp + co // M, mask=co_ok, other=0.0)
    s_ci, t_ci = tl.load(sp + ci, mask=ci_ok, other=0.0), tl.load(tp + ci, mask=ci_ok, other=0.0)
    dw_acc = tl.zeros([16, BLOCK_C], dtype=tl.float32)
    ds_acc, dt_acc = tl.zeros([BLOCK_C // M], dtype=tl.float32), tl.zeros([BLOCK_C // M], dtype=tl.float32)
    first = tl.program_id(0) * PER_TILE
    end = tl.minimum(first + PER_TILE, H * W)
    for start in range(first, end, BLOCK_P):
        p = start + tl.arange(0, BLOCK_P)
        h, w_ = p // W, p % W
        p_ok = p < end
        here = p_ok[:, None] & co_ok[None, :]
        at = (n * H * W + p)[:, None] * C_out + co[None, :]
        g = tl.load(dy + at, mask=here, other=0.0).to(tl.float32) + d1[None, :] \
            + d2[None, :] * tl.load(y + at, mask=here, other=0.0).to(tl.float32)
        g = tl.where(here, g, 0.0)
        da = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
        for kh in tl.static_range(3):
            for kw in tl.static_range(3):
                # dW: g here against a_{i-1} shifted forward by the tap
                hh, ww = h + (kh - 1) * DIL, w_ + (kw - 1) * DIL
                inside = (p_ok & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W))[:, None] & co_ok[None, :]
                v = tl.load(yp + (n * H * W + hh * W + ww)[:, None] * C_in + (co // M)[None, :], mask=inside,
                            other=0.0)
                index = ((n * C_in + (co // M)[None, :]) * H + hh[:, None]) * W + ww[:, None]
                a, _ = _activate(v.to(tl.float32), s_co[None, :], t_co[None, :], seed, index.to(tl.int32), p_drop,
                                 DROPOUT)
                part = tl.sum(g * tl.where(inside, a, 0.0), axis=0)
                dw_acc += tl.where(taps[:, None] == kh * 3 + kw, part[None, :], 0.0)
                # dA: g shifted back by the tap, against the tap's weight
                hh, ww = h - (kh - 1) * DIL, w_ - (kw - 1) * DIL
                inside = (p_ok & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W))[:, None] & co_ok[None, :]
                there = (n * H * W + hh * W + ww)[:, None] * C_out + co[None, :]
                gv = tl.load(dy + there, mask=inside, other=0.0).to(tl.float32) + d1[None, :] \
                    + d2[None, :] * tl.load(y + there, mask=inside, other=0.0).to(tl.float32)
                wv = tl.load(w + co * 9 + kh * 3 + kw, mask=co_ok, other=0.0)
                da += tl.where(inside, gv, 0.0) * wv.to(tl.float32)[None, :]
        if M == 2:  # the two output channels of each input channel sit side by side: add them
            da = tl.sum(tl.reshape(da, [BLOCK_P, BLOCK_C // 2, 2]), axis=2)
        # through a_{i-1} = dropout(relu(s y_{i-1} + t)), its mask recomputed
        ok = p_ok[:, None] & ci_ok[None, :]
        at_in = (n * H * W + p)[:, None] * C_in + ci[None, :]
        v = tl.load(yp + at_in, mask=ok, other=0.0).to(tl.float32)
        index = ((n * C_in + ci[None, :]) * H + h[:, None]) * W + w_[:, None]
        _, m = _activate(v, s_ci[None, :], t_ci[None, :], seed, index.to(tl.int32), p_drop, DROPOUT)
        dam = tl.where(ok, da * m, 0.0)
        tl.store(dyp + at_in, (dam * s_ci[None, :]).to(dyp.dtype.element_ty), mask=ok)
        ds_acc += tl.sum(dam * v, axis=0)
        dt_acc += tl.sum(dam, axis=0)
    # this program's row: 9 taps x C_out of dW, then ds and dt of the C_in inputs
    width = 9 * C_out + 2 * C_in
    tl.store(partials + row * width + co[None, :] * 9 + taps[:, None], dw_acc,
             mask=(taps[:, None] < 9) & co_ok[None, :])
    tl.store(partials + row * width + 9 * C_out + ci, ds_acc, mask=ci_ok)
    tl.store(partials + row * width + 9 * C_out + C_in + ci, dt_acc, mask=ci_ok)


@triton.jit
def _pw_forward(yp, sp, tp, seed_ptr, w, y, stats, P, HW, C_in, C_out, p_drop, DROPOUT: tl.constexpr,
                DOT_F32: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """1x1 conv: Y (P x C_out) = a_{i-1} (P x C_in) @ W^T, a_{i-1} formed as each K chunk loads. One program:
    BLOCK_P positions x BLOCK_N outputs (grid: p blocks, n blocks); statistics' partials in row pid 0."""
    q = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    co = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    q_ok, co_ok = q < P, co < C_out
    img, hw = (q // HW).to(tl.int64), q % HW
    seed = tl.load(seed_ptr)
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, C_in, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < C_in
        ok = q_ok[:, None] & k_ok[None, :]
        v = tl.load(yp + q.to(tl.int64)[:, None] * C_in + k[None, :], mask=ok, other=0.0).to(tl.float32)
        s, t = tl.load(sp + k, mask=k_ok, other=0.0), tl.load(tp + k, mask=k_ok, other=0.0)
        index = (img[:, None] * C_in + k[None, :]) * HW + hw[:, None]
        a, _ = _activate(v, s[None, :], t[None, :], seed, index.to(tl.int32), p_drop, DROPOUT)
        wk = tl.load(w + co[None, :] * C_in + k[:, None], mask=k_ok[:, None] & co_ok[None, :], other=0.0)
        operand = tl.float32 if DOT_F32 else w.dtype.element_ty
        acc = tl.dot(tl.where(ok, a, 0.0).to(operand), wk.to(operand), acc, input_precision="ieee")
    out = acc.to(y.dtype.element_ty)
    ok = q_ok[:, None] & co_ok[None, :]
    tl.store(y + q.to(tl.int64)[:, None] * C_out + co[None, :], out, mask=ok)
    kept = tl.where(ok, out.to(tl.float32), 0.0)
    row = tl.program_id(0) * 2
    tl.store(stats + row * C_out + co, tl.sum(kept, axis=0), mask=co_ok)
    tl.store(stats + (row + 1) * C_out + co, tl.sum(kept * kept, axis=0), mask=co_ok)


@triton.jit
def _pw_dgrad(y, dy, dsum, dsumsq, w, yp, sp, tp, seed_ptr, dyp, partials, P, HW, C_in, C_out, p_drop,
              DROPOUT: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr):
    """dA (P x C_in) = g (P x C_out) @ W, g formed as each K chunk loads; then dy_{i-1} = dA * mask * s and ds, dt
    (row pid 0 of `partials`: ds then dt) through a_{i-1}. One program: BLOCK_P positions x BLOCK_N inputs."""
    q = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    ci = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    q_ok, ci_ok = q < P, ci < C_in
    q64 = q.to(tl.int64)
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, C_out, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < C_out
        ok = q_ok[:, None] & k_ok[None, :]
        at = q64[:, None] * C_out + k[None, :]
        d1, d2 = tl.load(dsum + k, mask=k_ok, other=0.0), 2 * tl.load(dsumsq + k, mask=k_ok, other=0.0)
        g = tl.load(dy + at, mask=ok, other=0.0).to(tl.float32) + d1[None, :] \
            + d2[None, :] * tl.load(y + at, mask=ok, other=0.0).to(tl.float32)
        wk = tl.load(w + k[:, None] * C_in + ci[None, :], mask=k_ok[:, None] & ci_ok[None, :], other=0.0)
        operand = tl.float32 if DOT_F32 else w.dtype.element_ty
        acc = tl.dot(tl.where(ok, g, 0.0).to(operand), wk.to(operand), acc, input_precision="ieee")
    ok = q_ok[:, None] & ci_ok[None, :]
    v = tl.load(yp + q64[:, None] * C_in + ci[None, :], mask=ok, other=0.0).to(tl.float32)
    s, t = tl.load(sp + ci, mask=ci_ok, other=0.0), tl.load(tp + ci, mask=ci_ok, other=0.0)
    index = ((q // HW).to(tl.int64)[:, None] * C_in + ci[None, :]) * HW + (q % HW)[:, None]
    _, m = _activate(v, s[None, :], t[None, :], tl.load(seed_ptr), index.to(tl.int32), p_drop, DROPOUT)
    dam = tl.where(ok, acc * m, 0.0)
    tl.store(dyp + q64[:, None] * C_in + ci[None, :], (dam * s[None, :]).to(dyp.dtype.element_ty), mask=ok)
    tl.store(partials + tl.program_id(0) * 2 * C_in + ci, tl.sum(dam * v, axis=0), mask=ci_ok)
    tl.store(partials + (tl.program_id(0) * 2 + 1) * C_in + ci, tl.sum(dam, axis=0), mask=ci_ok)


@triton.jit
def _pw_wgrad(y, dy, dsum, dsumsq, yp, sp, tp, seed_ptr, dw_partials, P, HW, C_in, C_out, PER_SPLIT, p_drop,
              DROPOUT: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr):
    """dW (C_out x C_in) = g^T @ a_{i-1} over the PER_SPLIT positions of split pid 2, both formed as they load.
    One program: BLOCK_M outputs x BLOCK_N inputs; its fp32 partial in `dw_partials[pid 2]`, summed after."""
    co = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ci = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok, ci_ok = co < C_out, ci < C_in
    d1 = tl.load(dsum + co, mask=co_ok, other=0.0)
    d2 = 2 * tl.load(dsumsq + co, mask=co_ok, other=0.0)
    s, t = tl.load(sp + ci, mask=ci_ok, other=0.0), tl.load(tp + ci, mask=ci_ok, other=0.0)
    seed = tl.load(seed_ptr)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    first = tl.program_id(2) * PER_SPLIT
    end = tl.minimum(first + PER_SPLIT, P)
    for q0 in range(first, end, BLOCK_K):
        q = q0 + tl.arange(0, BLOCK_K)
        q_ok = q < end
        q64 = q.to(tl.int64)
        ok_g = q_ok[:, None] & co_ok[None, :]
        at = q64[:, None] * C_out + co[None, :]
        g = tl.load(dy + at, mask=ok_g, other=0.0).to(tl.float32) + d1[None, :] \
            + d2[None, :] * tl.load(y + at, mask=ok_g, other=0.0).to(tl.float32)
        ok_a = q_ok[:, None] & ci_ok[None, :]
        v = tl.load(yp + q64[:, None] * C_in + ci[None, :], mask=ok_a, other=0.0).to(tl.float32)
        index = ((q // HW).to(tl.int64)[:, None] * C_in + ci[None, :]) * HW + (q % HW)[:, None]
        a, _ = _activate(v, s[None, :], t[None, :], seed, index.to(tl.int32), p_drop, DROPOUT)
        operand = tl.float32 if DOT_F32 else yp.dtype.element_ty
        acc = tl.dot(tl.trans(tl.where(ok_g, g, 0.0).to(operand)), tl.where(ok_a, a, 0.0).to(operand), acc,
                     input_precision="ieee")
    out = dw_partials + tl.program_id(2).to(tl.int64) * C_out * C_in + co[:, None] * C_in + ci[None, :]
    tl.store(out, acc, mask=co_ok[:, None] & ci_ok[None, :])


@triton.jit
def _pool_forward(y, sp, tp, seed_ptr, pooled, HW, C, p_drop, DROPOUT: tl.constexpr, BLOCK_P: tl.constexpr,
                  BLOCK_C: tl.constexpr):
    """Global average pooling of a = dropout(relu(s y + t)): one program, image n x BLOCK_C channels."""
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    s, t = tl.load(sp + c, mask=c_ok, other=0.0), tl.load(tp + c, mask=c_ok, other=0.0)
    seed = tl.load(seed_ptr)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(0, HW, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        ok = (p < HW)[:, None] & c_ok[None, :]
        v = tl.load(y + (n * HW + p)[:, None] * C + c[None, :], mask=ok, other=0.0).to(tl.float32)
        index = (n * C + c[None, :]) * HW + p[:, None]
        a, _ = _activate(v, s[None, :], t[None, :], seed, index.to(tl.int32), p_drop, DROPOUT)
        acc += tl.sum(tl.where(ok, a, 0.0), axis=0)
    tl.store(pooled + n * C + c, (acc / HW).to(pooled.dtype.element_ty), mask=c_ok)


@triton.jit
def _pool_backward(dpooled, y, sp, tp, seed_ptr, dy, partials, HW, C, p_drop, DROPOUT: tl.constexpr,
                   BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """dy = dpooled / HW * mask * s, and ds, dt of image n in row n of `partials`."""
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    s, t = tl.load(sp + c, mask=c_ok, other=0.0), tl.load(tp + c, mask=c_ok, other=0.0)
    d = tl.load(dpooled + n * C + c, mask=c_ok, other=0.0).to(tl.float32) / HW
    seed = tl.load(seed_ptr)
    ds_acc, dt_acc = tl.zeros([BLOCK_C], dtype=tl.float32), tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(0, HW, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        ok = (p < HW)[:, None] & c_ok[None, :]
        at = (n * HW + p)[:, None] * C + c[None, :]
        v = tl.load(y + at, mask=ok, other=0.0).to(tl.float32)
        index = (n * C + c[None, :]) * HW + p[:, None]
        _, m = _activate(v, s[None, :], t[None, :], seed, index.to(tl.int32), p_drop, DROPOUT)
        dam = tl.where(ok, d[None, :] * m, 0.0)
        tl.store(dy + at, (dam * s[None, :]).to(dy.dtype.element_ty), mask=ok)
        ds_acc += tl.sum(dam * v, axis=0)
        dt_acc += tl.sum(dam, axis=0)
    tl.store(partials + n * 2 * C + c, ds_acc, mask=c_ok)
    tl.store(partials + (n * 2 + 1) * C + c, dt_acc, mask=c_ok)


# --- launchers -------------------------------------------------------------------------------------

# Tiles per kernel: on CUDA, each builds for sm_90a with no register spill under Triton 3.9.0 and 3.6.0
# (tests/test_fused.py); under the interpreter, whose cost is per program, wide blocks.
BLOCKS = {"cuda": {"dw_forward": dict(BLOCK_P=32, BLOCK_C=32, num_warps=8),
                   "dw_backward": dict(BLOCK_P=16, BLOCK_C=32, num_warps=8),
                   "pw_forward": dict(BLOCK_P=64, BLOCK_N=64, BLOCK_K=32, num_warps=4),
                   "pw_dgrad": dict(BLOCK_P=64, BLOCK_N=64, BLOCK_K=32, num_warps=4),
                   "pw_wgrad": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4),
                   "pool": dict(BLOCK_P=32, BLOCK_C=64, num_warps=4)},
          # a whole 32x32 map a program: the interpreter's cost is per program and per operation, not per element
          "interpreter": {"dw_forward": dict(BLOCK_P=1024, BLOCK_C=256),
                          "dw_backward": dict(BLOCK_P=1024, BLOCK_C=256),
                          "pw_forward": dict(BLOCK_P=1024, BLOCK_N=256, BLOCK_K=256),
                          "pw_dgrad": dict(BLOCK_P=1024, BLOCK_N=256, BLOCK_K=256),
                          "pw_wgrad": dict(BLOCK_M=256, BLOCK_N=256, BLOCK_K=1024),
                          "pool": dict(BLOCK_P=1024, BLOCK_C=256)}}
# The 1x1 weight gradient's grid aims at about this many programs (the 3x3 backward's: net/kernels.py's), as there.
BACKWARD_PROGRAMS = {"cuda": 2048, "interpreter": 1}


# Each kernel's runtime loop, its trips summed over a launch's programs (as net/kernels.py's LOOP_TRIPS).
LOOP_TRIPS = {"_dw_backward": lambda a, grid: tile_trips(a["H"] * a["W"], a["PER_TILE"], a["BLOCK_P"]) * grid[1] * grid[2],
              "_pw_forward": lambda a, grid: cdiv(a["C_in"], a["BLOCK_K"]) * grid[0] * grid[1],
              "_pw_dgrad": lambda a, grid: cdiv(a["C_out"], a["BLOCK_K"]) * grid[0] * grid[1],
              "_pw_wgrad": lambda a, grid: tile_trips(a["P"], a["PER_SPLIT"], a["BLOCK_K"]) * grid[0] * grid[1],
              "_pool_forward": lambda a, grid: cdiv(a["HW"], a["BLOCK_P"]) * grid[0] * grid[1],
              "_pool_backward": lambda a, grid: cdiv(a["HW"], a["BLOCK_P"]) * grid[0] * grid[1]}

# The FLOPs each kernel runs on tensor cores (its tl.dot matmuls), for bench/roofline.py.
TENSOR_FLOPS = {name: lambda a: 2 * a["P"] * a["C_in"] * a["C_out"] for name in ("_pw_forward", "_pw_dgrad", "_pw_wgrad")}


def blocks(kind, **extent):
    """The tile of kernel `kind`. Under the interpreter, whose cost grows with the tile's elements, masked or not,
    each block is cut to the power of two that covers `extent` (the tile's name -> the size it spans)."""
    if not interpreting():
        return BLOCKS["cuda"][kind]
    return {k: min(v, triton.next_power_of_2(extent[k])) if k in extent else v
            for k, v in BLOCKS["interpreter"][kind].items()}


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


def dw_forward(y_prev, s, t, seed, p, weight, dilation):
    n, c_in, h, w = y_prev.shape
    c_out = weight.shape[0]
    y = _empty((n, c_out, h, w), y_prev)
    b = blocks("dw_forward", BLOCK_P=h * w, BLOCK_C=c_out)
    grid = (cdiv(h * w, b["BLOCK_P"]), n, cdiv(c_out, b["BLOCK_C"]))
    stats = torch.empty((grid[0] * n * 2, c_out), dtype=torch.float32, device=y.device)
    record_or_run(_dw_forward, grid, (y_prev, s, t, seed, weight.contiguous(), y, stats, c_out, h, w, dilation, p),
                  dict(M=c_out // c_in, DROPOUT=p > 0), b)
    return (y, *_stats(stats))


def dw_backward(dy, dsum, dsumsq, y, y_prev, s, t, seed, p, weight, dilation):
    n, c_in, h, w = y_prev.shape
    c_out = weight.shape[0]
    tiles, per_tile = backward_tiles(n, c_out, h * w)
    b = blocks("dw_backward", BLOCK_P=per_tile, BLOCK_C=c_out)
    grid = (tiles, n, cdiv(c_out, b["BLOCK_C"]))
    dy_prev = _empty(y_prev.shape, y_prev)
    partials = torch.empty((grid[0] * n, 9 * c_out + 2 * c_in), dtype=torch.float32, device=y.device)
    record_or_run(_dw_backward, grid, (y_prev, s, t, seed, weight.contiguous(), y, nhwc(dy), dsum, dsumsq, dy_prev,
                                       partials, c_out, h, w, dilation, per_tile, p), dict(M=c_out // c_in, DROPOUT=p > 0), b)
    dw = partials[:, :9 * c_out].sum(0).view(weight.shape).to(weight.dtype)
    return dy_prev, partials[:, 9 * c_out:9 * c_out + c_in].sum(0), partials[:, 9 * c_out + c_in:].sum(0), dw


def pw_forward(y_prev, s, t, seed, p, weight):
    n, c_in, h, w = y_prev.shape
    c_out = weight.shape[0]
    y = _empty((n, c_out, h, w), y_prev)
    b = blocks("pw_forward", BLOCK_P=n * h * w, BLOCK_N=c_out, BLOCK_K=c_in)
    grid = (cdiv(n * h * w, b["BLOCK_P"]), cdiv(c_out, b["BLOCK_N"]))
    stats = torch.empty((grid[0] * 2, c_out), dtype=torch.float32, device=y.device)
    record_or_run(_pw_forward, grid, (y_prev, s, t, seed, weight.contiguous(), y, stats, n * h * w, h * w, c_in, c_out,
                                      p), dict(DROPOUT=p > 0, DOT_F32=dot_f32(y)), b)
    return (y, *_stats(stats))


def pw_backward(dy, dsum, dsumsq, y, y_prev, s, t, seed, p, weight):
    n, c_in, h, w = y_prev.shape
    c_out, positions = weight.shape[0], n * h * w
    dy, weight = nhwc(dy), weight.contiguous()
    b = blocks("pw_dgrad", BLOCK_P=positions, BLOCK_N=c_in, BLOCK_K=c_out)
    grid = (cdiv(positions, b["BLOCK_P"]), cdiv(c_in, b["BLOCK_N"]))
    dy_prev = _empty(y_prev.shape, y_prev)
    partials = torch.empty((grid[0] * 2, c_in), dtype=torch.float32, device=y.device)
    record_or_run(_pw_dgrad, grid, (y, dy, dsum, dsumsq, weight, y_prev, s, t, seed, dy_prev, partials, positions, h * w,
                                    c_in, c_out, p), dict(DROPOUT=p > 0, DOT_F32=dot_f32(y)), b)
    ds, dt = _stats(partials)
    b = blocks("pw_wgrad", BLOCK_M=c_out, BLOCK_N=c_in, BLOCK_K=positions)
    tiles = cdiv(c_out, b["BLOCK_M"]) * cdiv(c_in, b["BLOCK_N"])
    programs = BACKWARD_PROGRAMS["interpreter" if interpreting() else "cuda"]
    splits = max(1, min(cdiv(positions, 1024), programs // tiles))
    per_split = cdiv(cdiv(positions, splits), b["BLOCK_K"]) * b["BLOCK_K"]
    grid = (cdiv(c_out, b["BLOCK_M"]), cdiv(c_in, b["BLOCK_N"]), cdiv(positions, per_split))
    dw = torch.empty((grid[2], c_out, c_in), dtype=torch.float32, device=y.device)
    record_or_run(_pw_wgrad, grid, (y, dy, dsum, dsumsq, y_prev, s, t, seed, dw, positions, h * w, c_in, c_out,
                                    per_split, p), dict(DROPOUT=p > 0, DOT_F32=dot_f32(y)), b)
    return dy_prev, ds, dt, dw.sum(0).view(weight.shape).to(weight.dtype)


def pool_forward(y, s, t, seed, p):
    n, c, h, w = y.shape
    b = blocks("pool", BLOCK_P=h * w, BLOCK_C=c)
    pooled = torch.empty((n, c), dtype=y.dtype, device=y.device)
    record_or_run(_pool_forward, (n, cdiv(c, b["BLOCK_C"])), (y, s, t, seed, pooled, h * w, c, p), dict(DROPOUT=p > 0), b)
    return pooled


def pool_backward(dpooled, y, s, t, seed, p):
    n, c, h, w = y.shape
    b = blocks("pool", BLOCK_P=h * w, BLOCK_C=c)
    dy = _empty(y.shape, y)
    partials = torch.empty((n * 2, c), dtype=torch.float32, device=y.device)
    record_or_run(_pool_backward, (n, cdiv(c, b["BLOCK_C"])), (dpooled.contiguous(), y, s, t, seed, dy, partials, h * w,
                                                               c, p), dict(DROPOUT=p > 0), b)
    return (dy, *_stats(partials))


def dropout_mask(seed, shape, p, device="cpu"):
    """The keep mask (bool, `shape` = (N, C, H, W)) that the fused path draws for one layer with `seed` and `p`:
    an element is kept where Philox's uniform draw at its logical index is at least p."""
    numel = 1
    for d in shape:
        numel *= d
    out = torch.empty(numel, dtype=torch.int8, device=device)
    seed = torch.as_tensor([seed], dtype=torch.int64, device=device)
    _mask_kernel[(cdiv(numel, 1024),)](out, seed, numel, p, BLOCK=1024)
    return out.view(shape).bool()


# --- torch.library: one opaque op each way per kind, so that torch.compile sees the kernels as ops, not a break ---
# Outputs: Y in the input's dtype and NHWC, the statistics fp32 per channel.

def _like_output(y_prev, channels):
    n, _, h, w = y_prev.shape
    return _empty((n, channels, h, w), y_prev)


def _channel_vectors(like, channels, k=2):
    return tuple(torch.empty(channels, dtype=torch.float32, device=like.device) for _ in range(k))


@torch.library.custom_op("dalicifar::fused_dw", mutates_args=(), tags=STRIDES)
def fused_dw_op(y_prev: torch.Tensor, s: torch.Tensor, t: torch.Tensor, seed: torch.Tensor, p: float,
                weight: torch.Tensor, dilation: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return dw_forward(y_prev, s, t, seed, p, weight, dilation)


@fused_dw_op.register_fake
def _(y_prev, s, t, seed, p, weight, dilation):
    return (_like_output(y_prev, weight.shape[0]), *_channel_vectors(y_prev, weight.shape[0]))


@torch.library.custom_op("dalicifar::fused_dw_backward", mutates_args=(), tags=STRIDES)
def fused_dw_backward_op(dy: torch.Tensor, dsum: torch.Tensor, dsumsq: torch.Tensor, y: torch.Tensor,
                         y_prev: torch.Tensor, s: torch.Tensor, t: torch.Tensor, seed: torch.Tensor, p: float,
                         weight: torch.Tensor, dilation: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return dw_backward(dy, dsum, dsumsq, y, y_prev, s, t, seed, p, weight, dilation)


@fused_dw_backward_op.register_fake
def _(dy, dsum, dsumsq, y, y_prev, s, t, seed, p, weight, dilation):
    return (_empty(y_prev.shape, y_prev), *_channel_vectors(y_prev, y_prev.shape[1]),
            torch.empty_like(weight, memory_format=torch.contiguous_format))


@torch.library.custom_op("dalicifar::fused_pw", mutates_args=(), tags=STRIDES)
def fused_pw_op(y_prev: torch.Tensor, s: torch.Tensor, t: torch.Tensor, seed: torch.Tensor, p: float,
                weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return pw_forward(y_prev, s, t, seed, p, weight)


@fused_pw_op.register_fake
def _(y_prev, s, t, seed, p, weight):
    return (_like_output(y_prev, weight.shape[0]), *_channel_vectors(y_prev, weight.shape[0]))


@torch.library.custom_op("dalicifar::fused_pw_backward", mutates_args=(), tags=STRIDES)
def fused_pw_backward_op(dy: torch.Tensor, dsum: torch.Tensor, dsumsq: torch.Tensor, y: torch.Tensor,
                         y_prev: torch.Tensor, s: torch.Tensor, t: torch.Tensor, seed: torch.Tensor, p: float,
                         weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return pw_backward(dy, dsum, dsumsq, y, y_prev, s, t, seed, p, weight)


@fused_pw_backward_op.register_fake
def _(dy, dsum, dsumsq, y, y_prev, s, t, seed, p, weight):
    return (_empty(y_prev.shape, y_prev), *_channel_vectors(y_prev, y_prev.shape[1]),
            torch.empty_like(weight, memory_format=torch.contiguous_format))


@torch.library.custom_op("dalicifar::fused_pool", mutates_args=(), tags=STRIDES)
def fused_pool_op(y: torch.Tensor, s: torch.Tensor, t: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    return pool_forward(y, s, t, seed, p)


@fused_pool_op.register_fake
def _(y, s, t, seed, p):
    return torch.empty((y.shape[0], y.shape[1]), dtype=y.dtype, device=y.device)


@torch.library.custom_op("dalicifar::fused_pool_backward", mutates_args=(), tags=STRIDES)
def fused_pool_backward_op(dpooled: torch.Tensor, y: torch.Tensor, s: torch.Tensor, t: torch.Tensor,
                           seed: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return pool_backward(dpooled, y, s, t, seed, p)


@fused_pool_backward_op.register_fake
def _(dpooled, y, s, t, seed, p):
    return (_empty(y.shape, y), *_channel_vectors(y, y.shape[1]))


def _grads_or_zeros(y, dy, dsum, dsumsq):
    """The incoming gradients, a zero where autograd has none (an output that nothing downstream used)."""
    zeros = torch.zeros(y.shape[1], dtype=torch.float32, device=y.device)
    return (torch.zeros_like(y) if dy is None else dy, zeros if dsum is None else dsum,
            zeros if dsumsq is None else dsumsq)


def _setup_conv(ctx, inputs, output):
    y_prev, s, t, seed, ctx.p, weight, *rest = inputs
    ctx.rest = rest  # the dilation of a 3x3 conv; nothing for a 1x1
    ctx.save_for_backward(output[0], y_prev, s, t, seed, weight)


def _conv_grad(backward_op):
    def grad(ctx, dy, dsum, dsumsq):
        y, y_prev, s, t, seed, weight = ctx.saved_tensors
        dy_prev, ds, dt, dw = backward_op(*_grads_or_zeros(y, dy, dsum, dsumsq), y, y_prev, s, t, seed, ctx.p,
                                          weight, *ctx.rest)
        return (dy_prev, ds, dt, None, None, dw, *[None] * len(ctx.rest))
    return grad


fused_dw_op.register_autograd(_conv_grad(fused_dw_backward_op), setup_context=_setup_conv)
fused_pw_op.register_autograd(_conv_grad(fused_pw_backward_op), setup_context=_setup_conv)


def _setup_pool(ctx, inputs, output):
    y, s, t, seed, ctx.p = inputs
    ctx.save_for_backward(y, s, t, seed)


def _pool_grad(ctx, dpooled):
    y, s, t, seed = ctx.saved_tensors
    dy, ds, dt = fused_pool_backward_op(dpooled, y, s, t, seed, ctx.p)
    return dy, ds, dt, None, None


fused_pool_op.register_autograd(_pool_grad, setup_context=_setup_pool)


# --- the model's forward ---------------------------------------------------------------------------

def batch_norm_coefficients(bn, total, total_sq, count):
    """(s, t) with BatchNorm(y) = s * y + t per channel, from the batch's per-channel sums of y and y^2 over
    `count` values in training (the running statistics updated as nn.BatchNorm2d does: momentum, the unbiased
    variance, num_batches_tracked), from the running statistics in eval. Tiny tensors, left to autograd."""
    if bn.training:
        mean = total / count
        var = (total_sq / count - mean * mean).clamp_min(0)  # E[y^2] - E[y]^2 rounds below 0 at times
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            bn.running_mean.lerp_(mean, bn.momentum)
            bn.running_var.lerp_(var * (count / (count - 1)), bn.momentum)
    else:
        mean, var = bn.running_mean, bn.running_var
    s = bn.weight * torch.rsqrt(var + bn.eps)
    return s, bn.bias - mean * s


def draw_seeds(layers, device):
    """One dropout seed per layer for this step, from torch's generator on `device` (no host sync)."""
    return torch.randint(0, 2**31 - 1, (layers,), device=device)


def forward(model, x):
    """`model` (a Net) on `x` through the fused kernels: the same function as its unfused forward, and the same
    parameters and buffers (the running statistics and batch counts updated alike in training)."""
    layers = [layer for block in model.features for layer in block]  # each: conv, BatchNorm, ReLU, Dropout
    for layer in layers:
        assert layer[1].momentum is not None and layer[1].track_running_stats, "the fused path keeps nn's defaults"
    n, _, h, w = x.shape
    count = n * h * w
    drops = [layer[3].p if model.training else 0.0 for layer in layers]
    seeds = draw_seeds(len(layers), x.device) if any(drops) else torch.zeros(len(layers), dtype=torch.int64,
                                                                              device=x.device)
    y = nhwc(layers[0][0](x))  # the first conv reads the image: no prologue, F.conv2d
    statistics = y.float()
    s, t = batch_norm_coefficients(layers[0][1], statistics.sum((0, 2, 3)), statistics.square().sum((0, 2, 3)),
                                   count)
    for i, (conv, bn, _, _) in enumerate(layers[1:], 1):
        weight = conv.weight.to(y.dtype)
        if conv.kernel_size == (1, 1):
            y, total, total_sq = fused_pw_op(y, s, t, seeds[i - 1:i], drops[i - 1], weight.flatten(1))
        else:
            y, total, total_sq = fused_dw_op(y, s, t, seeds[i - 1:i], drops[i - 1], weight, conv.dilation[0])
        s, t = batch_norm_coefficients(bn, total, total_sq, count)
    pooled = fused_pool_op(y, s, t, seeds[-1:], drops[-1])
    return model.head(pooled)
