/* y [rows, out] = x [rows, in] @ W^T on weight-only integer weights W [out, in], float32 activations.
 *
 * int8: per-output-row symmetric, W[o, i] = q[o, i] * scale[o], q int8 [out, in]. The row scale leaves the
 *   dot product: y = scale[o] * sum_i q x.
 * int4: group-wise asymmetric, W[o, i] = q[o, i] * scale[o, g] + min[o, g] for g = i / group, q in 0..15
 *   stored two per byte: each 32 values of a row are 16 bytes, byte j holding value j (low nibble) and value
 *   j + 16 (high nibble), the order that unpacks into four vectors with one mask and one shift. Each 32 values
 *   are dequantized in registers (one FMA per vector) and multiplied with x, as gguf_matmul.c does for Q4_1:
 *   taking scale and min out of the sum (sum_g scale * sum q x + min * sum x) was slower, its per-group
 *   reductions costing more than the FMA they save (2-core x86, one thread: 1.3x slower for one row, 3x for 16).
 *
 * As in gguf_matmul.c, threads take bands of output rows (each streams a contiguous part of W, no reduction
 * across threads); one activation row gets four accumulators, several rows are taken four at a time so that
 * each unpacked weight vector serves four FMAs. The result is the dequantized matmul up to summation order.
 * Used by layers/int_ops.py.
 */
#include <stdint.h>
#include <string.h>

typedef float lanes __attribute__((vector_size(32)));  // 8 floats: one AVX register, two NEON ones
typedef uint8_t u8x16 __attribute__((vector_size(16)));

static inline lanes load(const float *p) {
    lanes v;
    memcpy(&v, p, sizeof v);  // unaligned load
    return v;
}

static inline float sum_lanes(lanes v) {
    float sum = 0.0f;
    for (int lane = 0; lane < 8; lane++) sum += v[lane];
    return sum;
}

// Bytes to float lanes. gcc scalarises __builtin_convertvector from 8-byte vectors, so x86 gets the two
// instructions it should (vpmovzxbd / vpmovsxbd + vcvtdq2ps) from intrinsics; other CPUs the plain loop.
#ifdef __AVX2__
#include <immintrin.h>
static inline lanes u8_low_lanes(u8x16 v) { return (lanes)_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32((__m128i)v)); }
static inline lanes u8_high_lanes(u8x16 v) {
    return (lanes)_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64((__m128i)v, (__m128i)v)));
}
static inline lanes i8_lanes(const int8_t *p) {
    return (lanes)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
#else
static inline lanes u8_low_lanes(u8x16 v) { lanes r; for (int j = 0; j < 8; j++) r[j] = v[j]; return r; }
static inline lanes u8_high_lanes(u8x16 v) { lanes r; for (int j = 0; j < 8; j++) r[j] = v[j + 8]; return r; }
static inline lanes i8_lanes(const int8_t *p) { lanes r; for (int j = 0; j < 8; j++) r[j] = p[j]; return r; }
#endif

static inline int min_int(int64_t a, int b) { return a < b ? (int)a : b; }

/* ---- int8 ---------------------------------------------------------------------------------------------- */

// sum_i q[i] x[i] for one activation row: four accumulators over 32 values, then 8 at a time, then scalars.
static inline float int8_dot1(const float *x, const int8_t *q, int64_t in) {
    lanes acc[4] = {{0}};
    int64_t i = 0;
    for (; i + 32 <= in; i += 32)
        for (int k = 0; k < 4; k++) acc[k] += i8_lanes(q + i + 8 * k) * load(x + i + 8 * k);
    for (; i + 8 <= in; i += 8) acc[0] += i8_lanes(q + i) * load(x + i);
    float sum = sum_lanes((acc[0] + acc[1]) + (acc[2] + acc[3]));
    for (; i < in; i++) sum += (float)q[i] * x[i];
    return sum;
}

// The same for `nrows` (<= 4) activation rows x [nrows, ldx]: each weight vector is converted once.
static inline void int8_dot4(const float *x, int64_t ldx, const int8_t *q, int64_t in, int nrows, float *sums) {
    lanes even[4] = {{0}}, odd[4] = {{0}};
    int64_t i = 0;
    for (; i + 16 <= in; i += 16) {
        const lanes w0 = i8_lanes(q + i), w1 = i8_lanes(q + i + 8);
        for (int r = 0; r < nrows; r++) {
            even[r] += w0 * load(x + r * ldx + i);
            odd[r] += w1 * load(x + r * ldx + i + 8);
        }
    }
    for (int r = 0; r < nrows; r++) {
        float sum = sum_lanes(even[r] + odd[r]);
        for (int64_t j = i; j < in; j++) sum += (float)q[j] * x[r * ldx + j];
        sums[r] = sum;
    }
}

void int8_matmul(const float *x, const int8_t *q, const float *scale, float *y, int64_t rows, int64_t in,
                 int64_t out, int64_t ldy) {
#pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < out; o++) {
        const int8_t *qrow = q + o * in;
        if (rows == 1) {
            y[o] = scale[o] * int8_dot1(x, qrow, in);
            continue;
        }
        for (int64_t r = 0; r < rows; r += 4) {
            float sums[4];
            const int nrows = min_int(rows - r, 4);
            int8_dot4(x + r * in, in, qrow, in, nrows, sums);
            for (int k = 0; k < nrows; k++) y[(r + k) * ldy + o] = scale[o] * sums[k];
        }
    }
}

/* ---- int4 ---------------------------------------------------------------------------------------------- */

// The 32 values of 16 packed bytes as four vectors: values 0-7, 8-15 (low nibbles), 16-23, 24-31 (high).
static inline void nibble_lanes(const uint8_t *p, lanes *w) {
    u8x16 bytes;
    memcpy(&bytes, p, 16);
    const u8x16 low = bytes & 15, high = bytes >> 4;
    w[0] = u8_low_lanes(low);
    w[1] = u8_high_lanes(low);
    w[2] = u8_low_lanes(high);
    w[3] = u8_high_lanes(high);
}

// The 32 values of chunk `c` of a row: q * scale + min with its group's scale and min, eight per vector.
static inline void int4_values(const uint8_t *q, const float *scale, const float *min, int64_t c, int64_t chunks,
                               lanes *w) {
    const float d = scale[c / chunks], m = min[c / chunks];
    nibble_lanes(q + 16 * c, w);
    for (int k = 0; k < 4; k++) w[k] = w[k] * d + m;
}

// One output value for one activation row: four accumulators.
static inline float int4_row1(const float *x, const uint8_t *q, const float *scale, const float *min,
                              int64_t num_chunks, int64_t chunks) {
    lanes acc[4] = {{0}};
    for (int64_t c = 0; c < num_chunks; c++) {
        lanes w[4];
        int4_values(q, scale, min, c, chunks, w);
        for (int k = 0; k < 4; k++) acc[k] += w[k] * load(x + 32 * c + 8 * k);
    }
    return sum_lanes((acc[0] + acc[1]) + (acc[2] + acc[3]));
}

// One output value for `nrows` (<= 4) activation rows x [nrows, ldx], written to y[r * ldy]: each dequantized
// chunk serves every row, two accumulators per row.
static inline void int4_row4(const float *x, int64_t ldx, const uint8_t *q, const float *scale, const float *min,
                             int64_t num_chunks, int64_t chunks, int nrows, float *y, int64_t ldy) {
    lanes even[4] = {{0}}, odd[4] = {{0}};
    for (int64_t c = 0; c < num_chunks; c++) {
        lanes w[4];
        int4_values(q, scale, min, c, chunks, w);
        const lanes w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
        for (int r = 0; r < nrows; r++) {
            const float *xr = x + r * ldx + 32 * c;
            even[r] += w0 * load(xr) + w2 * load(xr + 16);
            odd[r] += w1 * load(xr + 8) + w3 * load(xr + 24);
        }
    }
    for (int r = 0; r < nrows; r++) y[r * ldy] = sum_lanes(even[r] + odd[r]);
}

// `in` is a multiple of `group`, and `group` of 32 (checked by the caller).
void int4_matmul(const float *x, const uint8_t *q, const float *scale, const float *min, float *y, int64_t rows,
                 int64_t in, int64_t out, int64_t group, int64_t ldy) {
    const int64_t groups = in / group, chunks = group / 32, num_chunks = in / 32;
#pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < out; o++) {
        const uint8_t *qrow = q + o * (in / 2);
        const float *srow = scale + o * groups, *mrow = min + o * groups;
        if (rows == 1) {
            y[o] = int4_row1(x, qrow, srow, mrow, num_chunks, chunks);
            continue;
        }
        for (int64_t r = 0; r < rows; r += 4)
            int4_row4(x + r * in, in, qrow, srow, mrow, num_chunks, chunks, min_int(rows - r, 4), y + r * ldy + o,
                      ldy);
    }
}
