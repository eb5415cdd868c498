/* y [out] = w [out, in] @ x [in] for float32 on the CPU: batch-1 decode's matrix-vector products, on the
 * checkpoint's [out, in] layout.
 *
 * Bound by reading w. Each thread takes a contiguous band of output rows, so it streams one contiguous block
 * of w; each row is one dot product with x (which stays in L1), vectorised over four independent 8-lane
 * accumulators so the adds do not wait on each other. No reduction across threads is needed. On the 2-core
 * test CPU (30 SmolLM2 layers + LM head, interleaved A/B) this read the 538 MB at ~29-31 GB/s, level with the
 * previous kernel on the transposed [in, out] layout; taking 2 or 4 rows at once to reuse x was slower
 * (25-29 GB/s: several streams per thread). Used by layers/native_ops.py.
 */
#include <stdint.h>

typedef float lanes __attribute__((vector_size(32)));  // 8 floats: AVX on x86, two NEON registers on Arm

static inline lanes load(const float *p) {
    lanes v;
    __builtin_memcpy(&v, p, sizeof v);  // unaligned load
    return v;
}

static inline float dot(const float *restrict x, const float *restrict row, int64_t in) {
    lanes acc0 = {0}, acc1 = {0}, acc2 = {0}, acc3 = {0};
    int64_t i = 0;
    for (; i + 32 <= in; i += 32) {
        acc0 += load(x + i) * load(row + i);
        acc1 += load(x + i + 8) * load(row + i + 8);
        acc2 += load(x + i + 16) * load(row + i + 16);
        acc3 += load(x + i + 24) * load(row + i + 24);
    }
    const lanes acc = (acc0 + acc1) + (acc2 + acc3);
    float sum = 0.0f;
    for (int lane = 0; lane < 8; lane++) sum += acc[lane];
    for (; i < in; i++) sum += x[i] * row[i];
    return sum;
}

void gemv_f32(const float *x, const float *w, float *y, int64_t in, int64_t out) {
#pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < out; o++) y[o] = dot(x, w + o * in, in);
}
