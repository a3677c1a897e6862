// Rows by recurrence of heads/ops/upsampled_ce.py in one pass per output row (see that module's docstring), with the
// upsampling along the width done here too: neither the width-upsampled logits nor their gradient are in memory.
//
// Plain C data in and out (no torch headers: it builds in about a second); heads/ops/upsampled_ce_native.py
// builds it with torch.utils.cpp_extension and calls it through ctypes, one range of work items per thread.
// A work item is one image and one tile of TILE output columns; it writes its own pixels of norms and picked, and
// adds into grad, which each call has to itself (work items next to each other read the same input columns).
//
//   logits     (B, K, h, w)     in octaves below each location's peak class: FLOOR..0
//   labels     (B, H, W)        each output pixel's class (0 where ignored)
//   scale      (B, H, W)        each output pixel's share of the loss (0 where ignored)
//   run_index  (runs, 4)        start, stop, low, high: output rows start..stop-1 read input rows low and high
//   run_frac   (runs, 2)        frac, step: the weight on high is frac + (row - start) * step
//   col_index  (W, 2), col_frac (W): output column c reads input columns col_index[c] with weights 1 - f, f
//   norms      (B, H, W)        out: sum over classes of exp2(z), z the upsampled logits
//   picked     (B, H, W)        out: z at the pixel's label
//   grad       (B, h, w, K)     out, zero on entry: the gradient of the loss (in octaves) wrt logits
//
// On x86-64 with GCC one build holds AVX-512, AVX2 and baseline versions, chosen at load time by the CPU;
// -DNATIVE_ONE_VERSION builds only the one the compiler flags give (tests build each on its own).
#include <cstdint>
#include <cstdlib>
#include <cstring>

#define TILE 16  // output columns per work item: one vector

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__) && !defined(NATIVE_ONE_VERSION)
#define VERSIONS __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VERSIONS
#endif

typedef float vec __attribute__((vector_size(4 * TILE)));     // TILE floats, one register where the ISA has one
typedef int32_t ivec __attribute__((vector_size(4 * TILE)));  // their bits

// Unaligned loads and stores of the first n lanes (n < TILE only in the last tile of a row); inlined into each
// version of the kernel, where the full-tile copies become single vector moves.
#define INLINE static inline __attribute__((always_inline))

INLINE vec load(const float* from, int64_t n) {
    vec v = {};
    if (n == TILE)
        std::memcpy(&v, from, sizeof(vec));
    else
        for (int64_t t = 0; t < n; ++t) v[t] = from[t];
    return v;
}

INLINE void store(float* to, vec v, int64_t n) {
    if (n == TILE)
        std::memcpy(to, &v, sizeof(vec));
    else
        for (int64_t t = 0; t < n; ++t) to[t] = v[t];
}

// 2 ** x for x in [-126, 127]: adding 1.5 * 2 ** 23 rounds x to the integer m in the float's low bits, and
// x = m + r with r in [-0.5, 0.5]; a degree-6 fit of 2 ** r (relative error 1e-7) times 2 ** m built from
// exponent bits. Plain vector arithmetic, so that each version of the kernel lowers it to its own instructions.
#define EXP2(x, out)                                                                           \
    do {                                                                                       \
        const vec shifted_ = (x) + 12582912.0f;                                                \
        const vec r_ = (x) - (shifted_ - 12582912.0f);                                         \
        vec p_ = r_ * 1.5337577e-4f + 1.3399860e-3f;                                           \
        p_ = p_ * r_ + 9.6185198e-3f;                                                          \
        p_ = p_ * r_ + 5.5503290e-2f;                                                          \
        p_ = p_ * r_ + 2.4022646e-1f;                                                          \
        p_ = p_ * r_ + 6.9314718e-1f;                                                          \
        p_ = p_ * r_ + 1.0f;                                                                   \
        const ivec bits_ = (((ivec)shifted_ - 0x4B400000) + 127) << 23;                        \
        (out) = p_ * (vec)bits_;                                                               \
    } while (0)

extern "C" VERSIONS int upsampled_ce_rows(
    const float* logits, const int64_t* labels, const float* scale, const int64_t* run_index, const double* run_frac,
    int64_t runs, const int64_t* col_index, const float* col_frac, int64_t classes, int64_t h_in,
    int64_t w_in, int64_t height, int64_t width, int64_t restart, int32_t need_grad, int64_t item_begin,
    int64_t item_end, float* norms, float* picked, float* grad) {
    const int64_t tiles = (width + TILE - 1) / TILE, plane = h_in * w_in;
    // per class, contiguous: the low row's logits, the high minus low difference, the ratio exp2(step * d), the
    // numerators, the two input rows' gradients in this run; then the tile's gradient for every input row
    // (h_in * K), and the tile's width blend: one vector of lane weights per input column it reads
    const int64_t vectors = 6 * classes + (need_grad ? h_in * classes : 0) + w_in;
    vec* buffer = static_cast<vec*>(std::aligned_alloc(64, sizeof(vec) * vectors));
    if (buffer == nullptr) return 1;
    vec* __restrict__ z_low = buffer;
    vec* __restrict__ diff = z_low + classes;
    vec* __restrict__ ratio = diff + classes;
    vec* __restrict__ numer = ratio + classes;
    vec* __restrict__ acc_low = numer + classes;
    vec* __restrict__ acc_high = acc_low + classes;
    vec* __restrict__ blend = acc_high + classes;
    vec* __restrict__ tile_grad = blend + w_in;
    for (int64_t item = item_begin; item < item_end; ++item) {
        const int64_t b = item / tiles, col = (item % tiles) * TILE;
        const int64_t n = width - col < TILE ? width - col : TILE;
        const int64_t first = col_index[2 * col], span = col_index[2 * (col + n - 1) + 1] - first + 1;
        for (int64_t j = 0; j < span; ++j) blend[j] = vec{};
        for (int64_t t = 0; t < n; ++t) {
            blend[col_index[2 * (col + t)] - first][t] += 1.0f - col_frac[col + t];
            blend[col_index[2 * (col + t) + 1] - first][t] += col_frac[col + t];
        }
        if (need_grad) std::memset(tile_grad, 0, sizeof(vec) * h_in * classes);
        const float* image = logits + b * classes * plane + first;
        for (int64_t run = 0; run < runs; ++run) {
            const int64_t start = run_index[4 * run], stop = run_index[4 * run + 1];
            const int64_t low = run_index[4 * run + 2], high = run_index[4 * run + 3];
            const float frac = (float)run_frac[2 * run], step = (float)run_frac[2 * run + 1];
            for (int64_t k = 0; k < classes; ++k) {
                const float* row_low = image + k * plane + low * w_in;
                const float* row_high = image + k * plane + high * w_in;
                vec zl = {}, zh = {};
                for (int64_t j = 0; j < span; ++j) {
                    zl += row_low[j] * blend[j];
                    zh += row_high[j] * blend[j];
                }
                z_low[k] = zl;
                diff[k] = zh - zl;
                EXP2(step * diff[k], ratio[k]);
                acc_low[k] = acc_high[k] = vec{};
            }
            for (int64_t row = start; row < stop; ++row) {
                const int64_t j = row - start;
                const float f = frac + (float)j * step;
                if (j % restart == 0) {
                    for (int64_t k = 0; k < classes; ++k) EXP2(z_low[k] + f * diff[k], numer[k]);
                } else {
                    for (int64_t k = 0; k < classes; ++k) numer[k] *= ratio[k];
                }
                vec even = {}, odd = {};  // two partial sums: one would wait on the adder at every class
                int64_t k = 0;
                for (; k + 1 < classes; k += 2) {
                    even += numer[k];
                    odd += numer[k + 1];
                }
                if (k < classes) even += numer[k];
                const vec norm = even + odd;
                const int64_t pixel = (b * height + row) * width + col;
                vec pick = {};
                for (int64_t t = 0; t < n; ++t) {
                    const int64_t label = labels[pixel + t];
                    pick[t] = z_low[label][t] + f * diff[label][t];
                }
                store(norms + pixel, norm, n);
                store(picked + pixel, pick, n);
                if (!need_grad) continue;
                const vec s = load(scale + pixel, n);
                const vec coef_low = s * (1.0f - f) / norm, coef_high = s * f / norm;
                for (int64_t k = 0; k < classes; ++k) {
                    acc_low[k] += coef_low * numer[k];
                    acc_high[k] += coef_high * numer[k];
                }
                for (int64_t t = 0; t < n; ++t) {  // the one-hot part: minus each pixel's weights at its label
                    const int64_t label = labels[pixel + t];
                    acc_low[label][t] -= s[t] * (1.0f - f);
                    acc_high[label][t] -= s[t] * f;
                }
            }
            if (!need_grad) continue;
            for (int64_t k = 0; k < classes; ++k) {
                tile_grad[low * classes + k] += acc_low[k];
                tile_grad[high * classes + k] += acc_high[k];
            }
        }
        if (!need_grad) continue;
        // the width blend's transpose: each lane's gradient back to its two input columns, classes contiguous
        for (int64_t r = 0; r < h_in; ++r) {
            const vec* from = tile_grad + r * classes;
            for (int64_t t = 0; t < n; ++t) {
                const float f = col_frac[col + t];
                float* to_low = grad + ((b * h_in + r) * w_in + col_index[2 * (col + t)]) * classes;
                float* to_high = grad + ((b * h_in + r) * w_in + col_index[2 * (col + t) + 1]) * classes;
                for (int64_t k = 0; k < classes; ++k) to_low[k] += (1.0f - f) * from[k][t];
                for (int64_t k = 0; k < classes; ++k) to_high[k] += f * from[k][t];
            }
        }
    }
    std::free(buffer);
    return 0;
}
