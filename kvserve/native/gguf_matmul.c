/* y [rows, out] = x [rows, in] @ W^T on GGUF-quantized weights W [out, in], kept in the file's own blocks.
 *
 * Each weight row is a run of blocks (Q4_0 18 bytes per 32 values, Q4_K 144 bytes per 256, ...). A block is
 * dequantized in registers, 32 values at a time, exactly as ggml does (same float32 operations), and multiplied
 * with float32 activations: the result is the dequantized model's up to summation order. Several activation
 * rows (batched decode, prefill) reuse each dequantized block, four rows at a time. Threads take bands of
 * output rows, so each streams a contiguous part of W and no reduction across threads is needed.
 *
 * The activations stay float32 on purpose: llama.cpp quantizes them to 8 bits per block, which is faster on
 * integer dot-product units but changes the model's numbers. Used by layers/gguf_ops.py.
 */
#include "gguf_blocks.h"

typedef float lanes __attribute__((vector_size(32)));  // 8 floats: one AVX register, two NEON ones

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

/* Each format: values per block, bytes per block, and `<name>_values(block, sub, w)` that sets w[0..3] to the
 * 32 values of sub-block `sub` (0 .. values/32 - 1), eight per vector, with ggml's float operations. Layouts are
 * ggml's (ggml-common.h). Written on vectors so that the unpacking vectorises too. */

typedef int32_t i32x8 __attribute__((vector_size(32)));

// Bytes to float lanes. gcc scalarises __builtin_convertvector from 8 bytes, so x86 gets the two instructions
// it should (vpmovzxbd / vpmovsxbd + vcvtdq2ps) from intrinsics; other CPUs the plain loop.
#ifdef __AVX2__
#include <immintrin.h>
static inline lanes u8_low_lanes(u8x16 v) { return (lanes)_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32((__m128i)v)); }
static inline lanes u8_high_lanes(u8x16 v) {
    return (lanes)_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64((__m128i)v, (__m128i)v)));
}
static inline lanes i8_lanes(const uint8_t *p) {
    return (lanes)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
#else
static inline lanes u8_low_lanes(u8x16 v) { lanes r; for (int j = 0; j < 8; j++) r[j] = v[j]; return r; }
static inline lanes u8_high_lanes(u8x16 v) { lanes r; for (int j = 0; j < 8; j++) r[j] = v[j + 8]; return r; }
static inline lanes i8_lanes(const uint8_t *p) { lanes r; for (int j = 0; j < 8; j++) r[j] = (int8_t)p[j]; return r; }
#endif

static inline u8x16 half16(u8x32 v, int k) {
    u8x16 r;
    memcpy(&r, (const uint8_t *)&v + 16 * k, 16);
    return r;
}

static inline u8x16 load16(const uint8_t *p) { u8x16 v; memcpy(&v, p, 16); return v; }
static inline u8x32 load32(const uint8_t *p) { u8x32 v; memcpy(&v, p, 32); return v; }

// The 4-bit (or 5-bit with high bits) integers of a 32-value block, nibbles as 16 bytes: low ones are values
// 0-15, high ones 16-31.
static inline void nibble_lanes(const uint8_t *q, lanes *w) {
    const u8x16 bytes = load16(q), low = bytes & 15, high = bytes >> 4;
    w[0] = u8_low_lanes(low);
    w[1] = u8_high_lanes(low);
    w[2] = u8_low_lanes(high);
    w[3] = u8_high_lanes(high);
}

// Adds 16 to the values whose bit is set in `high` (bit j for value j): the fifth bit of Q5_0 / Q5_1.
static inline void add_fifth_bit(uint32_t high, lanes *w) {
    const i32x8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
    for (int k = 0; k < 4; k++) {
        const i32x8 bits = ((i32x8){0} + (int32_t)(high >> (8 * k)) >> lane) & 1;
        w[k] += __builtin_convertvector(bits << 4, lanes);
    }
}

// Q4_0: half d; 16 bytes of nibbles. w = (q - 8) * d
static inline void q4_0_values(const uint8_t *b, int sub, lanes *w) {
    (void)sub;
    const float d = f16(b);
    nibble_lanes(b + 2, w);
    for (int k = 0; k < 4; k++) w[k] = (w[k] - 8.0f) * d;
}

// Q4_1: half d, half m; 16 bytes of nibbles. w = q * d + m
static inline void q4_1_values(const uint8_t *b, int sub, lanes *w) {
    (void)sub;
    const float d = f16(b), m = f16(b + 2);
    nibble_lanes(b + 4, w);
    for (int k = 0; k < 4; k++) w[k] = w[k] * d + m;
}

// Q5_0: half d; 32 fifth bits; 16 bytes of nibbles. w = (q5 - 16) * d
static inline void q5_0_values(const uint8_t *b, int sub, lanes *w) {
    (void)sub;
    const float d = f16(b);
    uint32_t high;
    memcpy(&high, b + 2, 4);
    nibble_lanes(b + 6, w);
    add_fifth_bit(high, w);
    for (int k = 0; k < 4; k++) w[k] = (w[k] - 16.0f) * d;
}

// Q5_1: half d, half m; 32 fifth bits; 16 bytes of nibbles. w = q5 * d + m
static inline void q5_1_values(const uint8_t *b, int sub, lanes *w) {
    (void)sub;
    const float d = f16(b), m = f16(b + 2);
    uint32_t high;
    memcpy(&high, b + 4, 4);
    nibble_lanes(b + 8, w);
    add_fifth_bit(high, w);
    for (int k = 0; k < 4; k++) w[k] = w[k] * d + m;
}

// Q8_0: half d; 32 signed bytes. w = q * d
static inline void q8_0_values(const uint8_t *b, int sub, lanes *w) {
    (void)sub;
    const float d = f16(b);
    for (int k = 0; k < 4; k++) w[k] = i8_lanes(b + 2 + 8 * k) * d;
}

static inline void byte_lanes(u8x32 q, lanes *w) {
    w[0] = u8_low_lanes(half16(q, 0));
    w[1] = u8_high_lanes(half16(q, 0));
    w[2] = u8_low_lanes(half16(q, 1));
    w[3] = u8_high_lanes(half16(q, 1));
}

// Q4_K: half d, half dmin; 12 bytes of scales/mins; 128 bytes of nibbles (each 32 bytes: low nibbles are
// sub-block 2k, high ones 2k+1). w = d * scale * q - dmin * min
static inline void q4_k_values(const uint8_t *b, int sub, lanes *w) {
    int scale, min;
    k_scale_min(b + 4, sub, &scale, &min);
    const float d = f16(b) * (float)scale, m = f16(b + 2) * (float)min;
    byte_lanes((load32(b + 16 + 32 * (sub / 2)) >> (4 * (sub & 1))) & 15, w);
    for (int k = 0; k < 4; k++) w[k] = d * w[k] - m;
}

// Q5_K: as Q4_K with a fifth bit per value: bit `sub` of high[j] (32 bytes after the scales).
static inline void q5_k_values(const uint8_t *b, int sub, lanes *w) {
    int scale, min;
    k_scale_min(b + 4, sub, &scale, &min);
    const float d = f16(b) * (float)scale, m = f16(b + 2) * (float)min;
    const u8x32 low = (load32(b + 48 + 32 * (sub / 2)) >> (4 * (sub & 1))) & 15;
    byte_lanes(low | (((load32(b + 16) >> sub) & 1) << 4), w);
    for (int k = 0; k < 4; k++) w[k] = d * w[k] - m;
}

// Q6_K: 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 signed scales (one per 16 values), half d.
// Each half of 128 values: sub-block k takes low nibbles from ql[k & 1 ? 32 : 0 ..] (high nibbles for k >= 2)
// and bits 2k..2k+1 of qh. w = d * scale * (q6 - 32)
static inline void q6_k_values(const uint8_t *b, int sub, lanes *w) {
    const int half = sub / 4, k = sub % 4;
    const int8_t *scales = (const int8_t *)(b + 192) + 8 * half + 2 * k;
    const float d = f16(b + 208), d0 = d * (float)scales[0], d1 = d * (float)scales[1];
    const u8x32 low = (load32(b + 64 * half + 32 * (k & 1)) >> (4 * (k >> 1))) & 15;
    byte_lanes(low | (((load32(b + 128 + 32 * half) >> (2 * k)) & 3) << 4), w);
    w[0] = d0 * (w[0] - 32.0f);
    w[1] = d0 * (w[1] - 32.0f);
    w[2] = d1 * (w[2] - 32.0f);
    w[3] = d1 * (w[3] - 32.0f);
}

// F32 and F16 rows: plain values.
static inline void f32_values(const uint8_t *b, int sub, lanes *w) {
    for (int k = 0; k < 4; k++) w[k] = load((const float *)(b + 128 * sub) + 8 * k);
}

static inline void f16_values(const uint8_t *b, int sub, lanes *w) {
    for (int k = 0; k < 4; k++) {
        float v[8];
        for (int j = 0; j < 8; j++) v[j] = f16(b + 64 * sub + 16 * k + 2 * j);
        w[k] = load(v);
    }
}

/* The driver, one copy per format. A single row (batch-1 decode) gets four accumulators so that consecutive FMAs
 * do not wait on each other. Several rows are taken eight at a time: each weight block is decoded once for all of
 * them, each row sums its block's four products into its own accumulator (eight chains in flight). Inlined with a
 * constant row count, the accumulators stay in registers (a variable count kept them in memory: 1.7x slower). */
#define GGUF_MATMUL(NAME, VALUES, BYTES)                                                                       \
    static inline void NAME##_row1(const float *x, const uint8_t *wrow, float *y, int64_t blocks) {          \
        lanes acc[4] = {{0}};                                                                                 \
        for (int64_t i = 0; i < blocks; i++) {                                                                \
            lanes w[4];                                                                                       \
            NAME##_values(wrow + (i * 32 / VALUES) * BYTES, (int)(i % (VALUES / 32)), w);                    \
            for (int k = 0; k < 4; k++) acc[k] += w[k] * load(x + 32 * i + 8 * k);                           \
        }                                                                                                     \
        *y = sum_lanes((acc[0] + acc[1]) + (acc[2] + acc[3]));                                                \
    }                                                                                                         \
    static inline __attribute__((always_inline)) void NAME##_rows(const float *x, int64_t ldx,               \
                                                                  const uint8_t *wrow, float *y, int64_t ldy, \
                                                                  int nrows, int64_t blocks) {                \
        lanes acc[8] = {{0}};                                                                                 \
        for (int64_t i = 0; i < blocks; i++) {                                                                \
            lanes w[4];                                                                                       \
            NAME##_values(wrow + (i * 32 / VALUES) * BYTES, (int)(i % (VALUES / 32)), w);                    \
            for (int r = 0; r < nrows; r++) {                                                                 \
                const float *xr = x + r * ldx + 32 * i;                                                       \
                acc[r] += (w[0] * load(xr) + w[1] * load(xr + 8)) + (w[2] * load(xr + 16) + w[3] * load(xr + 24)); \
            }                                                                                                 \
        }                                                                                                     \
        for (int r = 0; r < nrows; r++) y[r * ldy] = sum_lanes(acc[r]);                                      \
    }                                                                                                         \
    void gguf_matmul_##NAME(const float *x, const uint8_t *w, float *y, int64_t rows, int64_t in,            \
                            int64_t out, int64_t ldy) {                                                       \
        const int64_t row_bytes = in / VALUES * BYTES, blocks = in / 32;                                      \
        _Pragma("omp parallel for schedule(static)")                                                          \
        for (int64_t o = 0; o < out; o++) {                                                                   \
            const uint8_t *wrow = w + o * row_bytes;                                                          \
            if (rows == 1) {                                                                                  \
                NAME##_row1(x, wrow, y + o, blocks);                                                          \
                continue;                                                                                     \
            }                                                                                                 \
            int64_t r0 = 0;                                                                                   \
            for (; r0 + 8 <= rows; r0 += 8) NAME##_rows(x + r0 * in, in, wrow, y + r0 * ldy + o, ldy, 8, blocks); \
            const float *xr = x + r0 * in;                                                                    \
            float *yr = y + r0 * ldy + o;                                                                     \
            switch (rows - r0) {                                                                              \
            case 1: NAME##_rows(xr, in, wrow, yr, ldy, 1, blocks); break;                                     \
            case 2: NAME##_rows(xr, in, wrow, yr, ldy, 2, blocks); break;                                     \
            case 3: NAME##_rows(xr, in, wrow, yr, ldy, 3, blocks); break;                                     \
            case 4: NAME##_rows(xr, in, wrow, yr, ldy, 4, blocks); break;                                     \
            case 5: NAME##_rows(xr, in, wrow, yr, ldy, 5, blocks); break;                                     \
            case 6: NAME##_rows(xr, in, wrow, yr, ldy, 6, blocks); break;                                     \
            case 7: NAME##_rows(xr, in, wrow, yr, ldy, 7, blocks); break;                                     \
            default: break;                                                                                   \
            }                                                                                                 \
        }                                                                                                     \
    }                                                                                                         \
    void gguf_dequantize_##NAME(const uint8_t *w, const int64_t *ids, float *out, int64_t n, int64_t in) {   \
        const int64_t row_bytes = in / VALUES * BYTES;                                                        \
        _Pragma("omp parallel for schedule(static) if (n > 64)")                                              \
        for (int64_t r = 0; r < n; r++)                                                                       \
            for (int64_t i = 0; i < in / 32; i++) {                                                           \
                lanes v[4];                                                                                   \
                NAME##_values(w + ids[r] * row_bytes + (i * 32 / VALUES) * BYTES, (int)(i % (VALUES / 32)), v); \
                memcpy(out + r * in + 32 * i, v, sizeof v);                                                   \
            }                                                                                                 \
    }

GGUF_MATMUL(f32, 32, 128)
GGUF_MATMUL(f16, 32, 64)
GGUF_MATMUL(q4_0, 32, 18)
GGUF_MATMUL(q4_1, 32, 20)
GGUF_MATMUL(q5_0, 32, 22)
GGUF_MATMUL(q5_1, 32, 24)
GGUF_MATMUL(q8_0, 32, 34)
GGUF_MATMUL(q4_k, 256, 144)
GGUF_MATMUL(q5_k, 256, 176)
GGUF_MATMUL(q6_k, 256, 210)
