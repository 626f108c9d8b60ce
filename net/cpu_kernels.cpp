// The CPU path's kernels (net/cpu.py builds each one through Inductor's own C++ toolchain and calls it on
// tensors' data). Every activation is NHWC fp32, a (positions, channels) matrix: P = N * H * W rows of C.
// The inner loops run over channels, contiguous, so that the compiler vectorises them for whatever the CPU has
// (AVX2, AVX-512; plain scalar code elsewhere). Reductions write per-block partials that Python sums in a fixed
// order: the same bits whatever the number of threads.
#include <cstdint>
#include <cstring>

// Inductor builds with -fno-tree-loop-vectorize (its own code is vectorised by hand) and -ffp-contract=off: these
// loops are written for the compiler's vectoriser (its selects need no-trapping-math), and take FMAs.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("tree-loop-vectorize", "no-trapping-math", "fp-contract=fast")
#endif

// Dropout's counter hash, bit for bit the fused GPU path's `_mix` (net/fused.py): a multiply, then a
// xorshift-multiply finaliser (Wellons' lowbias32 constants), in uint32 arithmetic.
static inline uint32_t mix(uint32_t key, uint32_t s) {
    uint32_t x = key * 0x61C88647u ^ s;
    x ^= x >> 16;
    x *= 0x21F0AAADu;
    x ^= x >> 15;
    x *= 0x735A2D97u;
    x ^= x >> 15;
    return x;
}

// Two per-channel sums over P rows of C, in blocks of R rows: partials (blocks, 2, C). add_row(r, first, second)
// adds row r's terms to the block's two sums.
template <class AddRow>
static void block_sums(float* partials, int64_t P, int64_t C, int64_t R, AddRow add_row) {
    const int64_t blocks = (P + R - 1) / R;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        float* first = partials + b * 2 * C;
        std::memset(first, 0, 2 * C * sizeof(float));
        const int64_t end = b * R + R < P ? b * R + R : P;
        for (int64_t r = b * R; r < end; r++) add_row(r, first, first + C);
    }
}

// Per-channel sum and sum of squares of y (P, C).
static void bn_stats(const float* y, float* partials, int64_t P, int64_t C, int64_t R) {
    block_sums(partials, P, C, R, [=](int64_t r, float* sum, float* sumsq) {
        const float* row = y + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; c++) {
            sum[c] += row[c];
            sumsq[c] += row[c] * row[c];
        }
    });
}

// a = relu(s y + t) * keep * scale: BatchNorm as s, t per channel, ReLU, dropout. keep: unless the hash of the
// element's index q * C + c within image n (keyed by the layer's seed, the layer and n) / 2 is below
// drop_below = p 2^31. drop_below 0: no dropout, no hash.
static void act_forward(const float* y, const float* s, const float* t, float* a, int64_t N, int64_t HW, int64_t C,
                        int64_t seed, int64_t layer, int64_t drop_below, float scale) {
    const uint32_t layer_key = mix((uint32_t)seed, (uint32_t)layer);
    const int32_t below = (int32_t)drop_below;
#pragma omp parallel for schedule(static) collapse(2)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t q = 0; q < HW; q++) {
            const uint32_t image_key = mix((uint32_t)n, layer_key);
            const float* yr = y + (n * HW + q) * C;
            float* ar = a + (n * HW + q) * C;
            if (below == 0) {
#pragma omp simd
                for (int64_t c = 0; c < C; c++) {
                    const float pre = yr[c] * s[c] + t[c];
                    ar[c] = pre > 0.0f ? pre : 0.0f;
                }
            } else {
                const uint32_t base = (uint32_t)(q * C);
#pragma omp simd
                for (int64_t c = 0; c < C; c++) {
                    const float pre = yr[c] * s[c] + t[c];
                    const bool kept = (int32_t)(mix(base + (uint32_t)c, image_key) >> 1) >= below;
                    const float out = pre * scale;  // computed unconditionally: a select, no branch
                    ar[c] = (pre > 0.0f) & kept ? out : 0.0f;
                }
            }
        }
    }
}

// The gradient through act_forward to its pre-activation, g = da * scale where a > 0 (ReLU and dropout's masks
// are a's zeros): partials of sum(g) and sum(g y).
static void act_backward_sums(const float* da, const float* a, const float* y, float* partials, int64_t P,
                              int64_t C, int64_t R, float scale) {
    block_sums(partials, P, C, R, [=](int64_t r, float* sg, float* sgy) {
        const float *dar = da + r * C, *ar = a + r * C, *yr = y + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; c++) {
            const float v = dar[c] * scale;  // loaded unconditionally: a select, no branch
            const float g = ar[c] > 0.0f ? v : 0.0f;
            sg[c] += g;
            sgy[c] += g * yr[c];
        }
    });
}

// BatchNorm's backward through its batch statistics, per element: dy = k1 g + k2 y + k3 (per channel), g as above.
static void act_backward_apply(const float* da, const float* a, const float* y, const float* k1, const float* k2,
                               const float* k3, float* dy, int64_t P, int64_t C, float scale) {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < P; r++) {
        const float* dar = da + r * C;
        const float* ar = a + r * C;
        const float* yr = y + r * C;
        float* out = dy + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; c++) {
            const float v = dar[c] * scale;
            const float g = ar[c] > 0.0f ? v : 0.0f;
            out[c] = k1[c] * g + k2[c] * yr[c] + k3[c];
        }
    }
}

// The 3x3 convs' loops are written in 8-lane vectors (GCC's and Clang's vector extensions: one AVX register
// here, two SSE registers or an AVX-512 half elsewhere); the vectoriser left them scalar (the taps' bounds).
typedef float vec __attribute__((vector_size(32)));
constexpr int64_t L = 8;

static inline vec load(const float* p) {
    vec v;
    std::memcpy(&v, p, sizeof v);  // an unaligned vector load
    return v;
}

static inline void store(float* p, vec v) { std::memcpy(p, &v, sizeof v); }

// Two vectors' lanes rearranged by constant indices (GCC 12+ and Clang have the builtin; older compilers build the
// same vectors lane by lane).
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define HAVE_SHUFFLE 1
#endif
#endif

// The inputs of L consecutive outputs from output o (p = the input at o / M): each input once (M = 1), or each of
// four inputs twice (M = 2: outputs 2c and 2c + 1 read input c).
template <int M>
static inline vec inputs(const float* p) {
    if constexpr (M == 1) {
        return load(p);
    } else {
#ifdef HAVE_SHUFFLE
        typedef float half __attribute__((vector_size(16)));
        half h;
        std::memcpy(&h, p, sizeof h);
        return __builtin_shufflevector(h, h, 0, 0, 1, 1, 2, 2, 3, 3);
#else
        return vec{p[0], p[0], p[1], p[1], p[2], p[2], p[3], p[3]};
#endif
    }
}

// (p0 + p1, p2 + p3, ..., p6 + p7, q0 + q1, ..., q6 + q7): 16 consecutive outputs' sums, 8 inputs' (M = 2).
static inline vec pair_sums(vec p, vec q) {
#ifdef HAVE_SHUFFLE
    return __builtin_shufflevector(p, q, 0, 2, 4, 6, 8, 10, 12, 14) +
           __builtin_shufflevector(p, q, 1, 3, 5, 7, 9, 11, 13, 15);
#else
    return vec{p[0] + p[1], p[2] + p[3], p[4] + p[5], p[6] + p[7], q[0] + q[1], q[2] + q[3], q[4] + q[5],
               q[6] + q[7]};
#endif
}

// The taps of position (h, x) that fall inside the map, at offset sign * (tap - centre) * d: their rows of `base`
// (row length `row`) and of w. Returns how many.
static inline int taps(const float* base, int64_t row, const float* w, int64_t w_row, int64_t h, int64_t x,
                       int64_t H, int64_t W, int64_t d, int64_t sign, const float** rows, const float** weights) {
    int k = 0;
    for (int64_t tap = 0; tap < 9; tap++) {
        const int64_t hh = h + sign * (tap / 3 - 1) * d, xx = x + sign * (tap % 3 - 1) * d;
        if (hh >= 0 && hh < H && xx >= 0 && xx < W) {
            rows[k] = base + (hh * W + xx) * row;
            weights[k++] = w + tap * w_row;
        }
    }
    return k;
}

// A 3x3 depthwise (M = 1) or grouped C -> 2C (M = 2: output channel o reads input o / 2) conv, dilation d,
// padding d: y (N, H, W, C M) from a (N, H, W, C) and w (9, C M), tap-major. A position's outputs in blocks of
// 2L channels, each summed over the taps in registers, then stored once.
template <int M>
static void dw_forward(const float* a, const float* w, float* y, int64_t N, int64_t H, int64_t W, int64_t C,
                       int64_t d) {
    const int64_t CO = C * M;
#pragma omp parallel for schedule(static) collapse(2)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t h = 0; h < H; h++) {
            for (int64_t x = 0; x < W; x++) {
                float* out = y + ((n * H + h) * W + x) * CO;
                const float *in[9], *wt[9];
                const int k = taps(a + n * H * W * C, C, w, CO, h, x, H, W, d, 1, in, wt);
                int64_t o = 0;
                for (; o + 2 * L <= CO; o += 2 * L) {
                    vec acc0 = {}, acc1 = {};
                    for (int t = 0; t < k; t++) {
                        acc0 += inputs<M>(in[t] + o / M) * load(wt[t] + o);
                        acc1 += inputs<M>(in[t] + (o + L) / M) * load(wt[t] + o + L);
                    }
                    store(out + o, acc0);
                    store(out + o + L, acc1);
                }
                for (; o < CO; o++) {  // widths that are not a multiple of 2L
                    float acc = 0.0f;
                    for (int t = 0; t < k; t++) acc += in[t][o / M] * wt[t][o];
                    out[o] = acc;
                }
            }
        }
    }
}

// Its backward, an image a thread: da (N, H, W, C), the transposed conv of g (N, H, W, C M); and the weight's
// gradient per image, dw_partials (N, 9, C M), summed by the caller in image order.
template <int M>
static void dw_backward(const float* g, const float* a, const float* w, float* da, float* dw_partials, int64_t N,
                        int64_t H, int64_t W, int64_t C, int64_t d) {
    const int64_t CO = C * M;
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const float* g_img = g + n * H * W * CO;
        const float* a_img = a + n * H * W * C;
        float* dw = dw_partials + n * 9 * CO;
        std::memset(dw, 0, 9 * CO * sizeof(float));
        for (int64_t h = 0; h < H; h++) {
            for (int64_t x = 0; x < W; x++) {
                // da at (h, x) gathers g from the positions whose tap read (h, x)
                const float *src[9], *wt[9];
                const int k = taps(g_img, CO, w, CO, h, x, H, W, d, -1, src, wt);
                float* out = da + ((n * H + h) * W + x) * C;
                int64_t c = 0;
                for (; c + L <= C; c += L) {
                    if constexpr (M == 1) {
                        vec acc = {};
                        for (int t = 0; t < k; t++) acc += load(src[t] + c) * load(wt[t] + c);
                        store(out + c, acc);
                    } else {  // the L M outputs' products summed over the taps, then each input's pair added once
                        vec p = {}, q = {};
                        for (int t = 0; t < k; t++) {
                            p += load(src[t] + c * M) * load(wt[t] + c * M);
                            q += load(src[t] + c * M + L) * load(wt[t] + c * M + L);
                        }
                        store(out + c, pair_sums(p, q));
                    }
                }
                for (; c < C; c++) {
                    float acc = 0.0f;
                    for (int t = 0; t < k; t++)
                        for (int64_t m = 0; m < M; m++) acc += src[t][c * M + m] * wt[t][c * M + m];
                    out[c] = acc;
                }
            }
            // the weight's gradient: g along row h times what each tap read there, summed over the row in registers
            // (four blocks of L outputs at a time: independent sums), then added to dw's nine rows of CO (in L1 or L2)
            const float* g_row = g_img + h * W * CO;
            for (int64_t tap = 0; tap < 9; tap++) {
                const int64_t hh = h + (tap / 3 - 1) * d, dx = (tap % 3 - 1) * d;
                if (hh < 0 || hh >= H) continue;
                const int64_t x0 = dx < 0 ? -dx : 0, x1 = dx > 0 ? W - dx : W;  // where the tap falls inside
                const float* a_row = a_img + hh * W * C;  // the tap reads a_row + (x + dx) C at x
                float* dwt = dw + tap * CO;
                int64_t o = 0;
                for (; o + 4 * L <= CO; o += 4 * L) {
                    vec s0 = {}, s1 = {}, s2 = {}, s3 = {};
                    for (int64_t x = x0; x < x1; x++) {
                        const float *gx = g_row + x * CO + o, *ax = a_row + (x + dx) * C + o / M;
                        s0 += load(gx) * inputs<M>(ax);
                        s1 += load(gx + L) * inputs<M>(ax + L / M);
                        s2 += load(gx + 2 * L) * inputs<M>(ax + 2 * L / M);
                        s3 += load(gx + 3 * L) * inputs<M>(ax + 3 * L / M);
                    }
                    store(dwt + o, load(dwt + o) + s0);
                    store(dwt + o + L, load(dwt + o + L) + s1);
                    store(dwt + o + 2 * L, load(dwt + o + 2 * L) + s2);
                    store(dwt + o + 3 * L, load(dwt + o + 3 * L) + s3);
                }
                for (; o < CO; o++)  // widths that are not a multiple of 4L
                    for (int64_t x = x0; x < x1; x++) dwt[o] += g_row[x * CO + o] * a_row[(x + dx) * C + o / M];
            }
        }
    }
}

// Dropout's keep mask in the open (N, HW, C) bytes, 1 = kept: what act_forward applies, for tests and checks.
static void keep_mask(uint8_t* keep, int64_t N, int64_t HW, int64_t C, int64_t seed, int64_t layer,
                      int64_t drop_below) {
    const uint32_t layer_key = mix((uint32_t)seed, (uint32_t)layer);
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint32_t image_key = mix((uint32_t)n, layer_key);
        for (int64_t i = 0; i < HW * C; i++)
            keep[n * HW * C + i] = (int32_t)(mix((uint32_t)i, image_key) >> 1) >= (int32_t)drop_below;
    }
}
