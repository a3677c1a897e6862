// Multi-scale deformable attention on a CPU, forward and backward (the function of heads/ops/ms_deform_attn.py:
// every query and head reads num_points bilinear samples per level and mixes them with its attention weights).
//
// Plain C data in and out (no torch headers); heads/ops/native.py builds it, heads/ops/ms_deform_attn.py calls it
// through ctypes, one range of work items per thread. A work item is one image and one head: it reads and, in the
// backward, writes only that head's columns of that image's values, so items never write the same memory.
//
//   value      (B, S, M, D)        per-head values of all levels, flattened level after level
//   shapes     (L, 2)              each level's height and width; starts (L): its first row in S
//   location   (B, Q, M, L, P, 2)  normalised (x, y): (j + 0.5) / w is the centre of column j
//   attention  (B, Q, M, L, P)
//   out        (B, Q, M, D)
//   grad_out   (B, Q, M, D); grad_value (B, S, M, D), zero on entry; grad_location, grad_attention as their inputs
//     (either may be null: not wanted)
//
// A corner outside its level reads 0 and passes no gradient (grid_sample's padding_mode="zeros").
//
// On x86-64 with GCC one build holds AVX-512, AVX2 and baseline versions, chosen at load time by the CPU.
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__) && !defined(NATIVE_ONE_VERSION)
#define VERSIONS __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VERSIONS
#endif

namespace {

typedef float vec __attribute__((vector_size(64)));  // 16 floats: one AVX-512 register, two AVX2 ones

// sum_d row[d] * g[d], and row_grad[d] += w * g[d], in vectors of 16 (a float sum is not reassociated by the
// compiler on its own, so a plain loop would add one product at a time)
inline float dot_and_add(const float* row, const float* g, float* row_grad, float w, int64_t dim) {
    vec part = {};
    int64_t d = 0;
    for (; d + 16 <= dim; d += 16) {
        vec r, gg, rg;
        std::memcpy(&r, row + d, sizeof(vec));
        std::memcpy(&gg, g + d, sizeof(vec));
        std::memcpy(&rg, row_grad + d, sizeof(vec));
        part += r * gg;
        rg += w * gg;
        std::memcpy(row_grad + d, &rg, sizeof(vec));
    }
    float dot = 0.0f;
    for (int t = 0; t < 16; ++t) dot += part[t];
    for (; d < dim; ++d) {
        dot += row[d] * g[d];
        row_grad[d] += w * g[d];
    }
    return dot;
}

// One sample's four corners: their value rows (null outside the level), bilinear weights and the weights'
// derivatives along x and y.
struct Corners {
    const float* row[4];
    float weight[4], by_x[4], by_y[4];
};

inline void corners(const float* level_rows, int64_t height, int64_t width, int64_t row_stride, float x, float y,
                    Corners& c) {
    const float px = x * (float)width - 0.5f, py = y * (float)height - 0.5f;
    const float fx0 = std::floor(px), fy0 = std::floor(py);
    const float fx = px - fx0, fy = py - fy0;
    const float wx[2] = {1.0f - fx, fx}, wy[2] = {1.0f - fy, fy};
    const float dx[2] = {-1.0f, 1.0f};
    // beyond one pixel outside (or NaN) nothing is read; this also keeps the integer conversion in range
    const bool near = fx0 >= -1.0f && fx0 < (float)width && fy0 >= -1.0f && fy0 < (float)height;
    const int64_t x0 = near ? (int64_t)fx0 : -2, y0 = near ? (int64_t)fy0 : -2;
    for (int k = 0; k < 4; ++k) {
        const int64_t xx = x0 + (k & 1), yy = y0 + (k >> 1);
        const bool inside = xx >= 0 && xx < width && yy >= 0 && yy < height;
        c.row[k] = inside ? level_rows + (yy * width + xx) * row_stride : nullptr;
        c.weight[k] = wy[k >> 1] * wx[k & 1];
        c.by_x[k] = wy[k >> 1] * dx[k & 1];
        c.by_y[k] = dx[k >> 1] * wx[k & 1];
    }
}

}  // namespace

extern "C" VERSIONS int ms_deform_attn_forward(
    const float* value, const int64_t* shapes, const int64_t* starts, const float* location, const float* attention,
    int64_t spatial, int64_t heads, int64_t dim, int64_t queries, int64_t levels, int64_t points,
    int64_t item_begin, int64_t item_end, float* out) {
    const int64_t row_stride = dim;
    for (int64_t item = item_begin; item < item_end; ++item) {
        const int64_t b = item / heads, m = item % heads;
        const float* image = value + item * spatial * dim;
        for (int64_t q = 0; q < queries; ++q) {
            const int64_t sample = ((b * queries + q) * heads + m) * levels * points;
            float* acc = out + ((b * queries + q) * heads + m) * dim;
            for (int64_t d = 0; d < dim; ++d) acc[d] = 0.0f;
            for (int64_t l = 0; l < levels; ++l) {
                const float* level_rows = image + starts[l] * row_stride;
                for (int64_t p = 0; p < points; ++p) {
                    const int64_t s = sample + l * points + p;
                    Corners c;
                    corners(level_rows, shapes[2 * l], shapes[2 * l + 1], row_stride, location[2 * s],
                            location[2 * s + 1], c);
                    const float a = attention[s];
                    for (int k = 0; k < 4; ++k) {
                        if (c.row[k] == nullptr) continue;
                        const float w = a * c.weight[k];
                        const float* row = c.row[k];
                        for (int64_t d = 0; d < dim; ++d) acc[d] += w * row[d];
                    }
                }
            }
        }
    }
    return 0;
}

extern "C" VERSIONS int ms_deform_attn_backward(
    const float* value, const int64_t* shapes, const int64_t* starts, const float* location, const float* attention,
    const float* grad_out, int64_t spatial, int64_t heads, int64_t dim, int64_t queries, int64_t levels,
    int64_t points, int64_t item_begin, int64_t item_end, float* grad_value, float* grad_location,
    float* grad_attention) {
    const int64_t row_stride = dim;
    for (int64_t item = item_begin; item < item_end; ++item) {
        const int64_t b = item / heads, m = item % heads;
        const float* image = value + item * spatial * dim;
        float* image_grad = grad_value + item * spatial * dim;
        for (int64_t q = 0; q < queries; ++q) {
            const int64_t sample = ((b * queries + q) * heads + m) * levels * points;
            const float* g = grad_out + ((b * queries + q) * heads + m) * dim;
            for (int64_t l = 0; l < levels; ++l) {
                const int64_t height = shapes[2 * l], width = shapes[2 * l + 1];
                const int64_t offset = starts[l] * row_stride;
                for (int64_t p = 0; p < points; ++p) {
                    const int64_t s = sample + l * points + p;
                    Corners c;
                    corners(image + offset, height, width, row_stride, location[2 * s], location[2 * s + 1], c);
                    const float a = attention[s];
                    float by_weight = 0.0f, by_x = 0.0f, by_y = 0.0f;
                    for (int k = 0; k < 4; ++k) {
                        if (c.row[k] == nullptr) continue;
                        const float* row = c.row[k];
                        const float dot = dot_and_add(row, g, image_grad + (row - image), a * c.weight[k], dim);
                        by_weight += c.weight[k] * dot;
                        by_x += c.by_x[k] * dot;
                        by_y += c.by_y[k] * dot;
                    }
                    if (grad_attention != nullptr) grad_attention[s] = by_weight;
                    if (grad_location != nullptr) {
                        grad_location[2 * s] = a * by_x * (float)width;
                        grad_location[2 * s + 1] = a * by_y * (float)height;
                    }
                }
            }
        }
    }
    return 0;
}
