/* y [out] = x [in] @ w [in, out] for float32 on the CPU: batch-1 decode's matrix-vector products.
 *
 * Bound by reading w. Each thread streams its own contiguous band of rows (i0..i1), four rows per pass
 * so the accumulator is loaded and stored a quarter as often, into a private partial sum; then the
 * threads add the partials column band by column band. On the 2-core test CPU this read SmolLM2's
 * 538 MB of float32 weights per token at 24-30 GB/s where numpy's OpenBLAS GEMV read 21-25 (8 rows per
 * pass, or 512-bit vectors, were slower). Used by layers/native_ops.py.
 *
 * partial: scratch of [threads, out] floats (unused with one thread).
 */
#include <omp.h>
#include <stdint.h>
#include <string.h>

static void accumulate_rows(const float *restrict x, const float *restrict w, float *restrict acc, int64_t first,
                            int64_t last, int64_t out) {
    memset(acc, 0, sizeof(float) * out);
    int64_t i = first;
    for (; i + 4 <= last; i += 4) {
        const float a0 = x[i], a1 = x[i + 1], a2 = x[i + 2], a3 = x[i + 3];
        const float *w0 = w + i * out, *w1 = w0 + out, *w2 = w1 + out, *w3 = w2 + out;
#pragma omp simd
        for (int64_t o = 0; o < out; o++) acc[o] += a0 * w0[o] + a1 * w1[o] + a2 * w2[o] + a3 * w3[o];
    }
    for (; i < last; i++) {
        const float a = x[i];
        const float *row = w + i * out;
#pragma omp simd
        for (int64_t o = 0; o < out; o++) acc[o] += a * row[o];
    }
}

void gemv_f32(const float *x, const float *w, float *y, float *partial, int64_t in, int64_t out) {
#pragma omp parallel
    {
        const int64_t thread = omp_get_thread_num(), num_threads = omp_get_num_threads();
        float *acc = num_threads == 1 ? y : partial + thread * out;
        accumulate_rows(x, w, acc, in * thread / num_threads, in * (thread + 1) / num_threads, out);
        if (num_threads > 1) {
#pragma omp barrier
            for (int64_t o = out * thread / num_threads; o < out * (thread + 1) / num_threads; o++) {
                float sum = 0.0f;
                for (int64_t t = 0; t < num_threads; t++) sum += partial[t * out + o];
                y[o] = sum;
            }
        }
    }
}

/* How many threads gemv_f32 will use from this thread (the size of its scratch). */
int gemv_threads(void) { return omp_get_max_threads(); }
