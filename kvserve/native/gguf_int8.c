/* y [rows, out] = x [rows, in] @ W^T on GGUF blocks, with x quantized to 8 bits per 32 values as llama.cpp does
 * (cpu_gguf_int8_activations).
 *
 * A block of x becomes 32 signed bytes q and dx = max|x| / 127 (x ~ dx q). A weight block gives unsigned codes
 * u (4, 5 or 6 bits; for Q8_0 |w|, its sign moved onto q), a scale per half (16 values), a code offset `zero`
 * (8 for Q4_0, 16 for Q5_0, 32 for Q6_K) and a `min` (Q4_1, Q5_1, the K-quants: minus dmin * min):
 *     sum_j w_j x_j ~ dx * (sum_h scale_h * (sum_{j in h} u_j q_j - zero * sum_{j in h} q_j) + min * sum_j q_j)
 * On AVX2 the integer products of a block are two instructions (vpmaddubsw, vpmaddwd) where the float path
 * (gguf_matmul.c) spends about ten converting and scaling codes; the price is x's 8-bit rounding (about 0.4%
 * relative error per product, measured in tests/layers/test_gguf_int8.py). Other CPUs get plain C loops.
 */
#include <math.h>

#include "gguf_blocks.h"

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

typedef float f32x8 __attribute__((vector_size(32)));

typedef struct {  // 8-bit activations of one 32-value block (44 bytes; layers/gguf_ops.py allocates them)
    int8_t q[32];
    float d;
    float half_sums[2];  // d times the sum of q over values 0-15 and over 16-31 (what the zero and min terms need)
} act_block;

typedef struct {  // one 32-value weight block, as integer codes and what turns their products into values
    u8x32 u;
    float scale[2], zero, min;
} codes;

static inline u8x32 bytes32(const uint8_t *p) { u8x32 v; memcpy(&v, p, 32); return v; }

static inline u8x32 nibbles(const uint8_t *p) {  // 16 bytes -> 32 codes: low nibbles 0-15, high ones 16-31
#ifdef __AVX2__
    // In registers: assembling the halves through memory stalls on store forwarding.
    const __m128i bytes = _mm_loadu_si128((const __m128i *)p);
    return (u8x32)_mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(bytes, 4), bytes), _mm256_set1_epi8(15));
#else
    u8x16 bytes;
    memcpy(&bytes, p, 16);
    const u8x16 low = bytes & 15, high = bytes >> 4;
    u8x32 u;
    memcpy(&u, &low, 16);
    memcpy((uint8_t *)&u + 16, &high, 16);
    return u;
#endif
}

static inline u8x32 fifth_bits(const uint8_t *p) {  // bit j of the 32-bit word at p -> 16 in byte j
    uint32_t high;
    memcpy(&high, p, 4);
#ifdef __AVX2__
    // Byte j takes byte j / 8 of the word, then tests its bit j % 8.
    const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32((int)high),
                                               _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202,
                                                                 0x0101010101010101, 0x0000000000000000));
    const __m256i bit = _mm256_set1_epi64x(0x8040201008040201);
    return (u8x32)_mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit), _mm256_set1_epi8(16));
#else
    u8x32 bits;
    for (int j = 0; j < 32; j++) bits[j] = (uint8_t)(((high >> j) & 1) << 4);
    return bits;
#endif
}

static inline void same_scale(codes *c, float d, float zero, float min) {
    c->scale[0] = c->scale[1] = d;
    c->zero = zero;
    c->min = min;
}

static inline void q4_0_codes(const uint8_t *b, int sub, codes *c) {
    (void)sub;
    c->u = nibbles(b + 2);
    same_scale(c, f16(b), 8.0f, 0.0f);
}

static inline void q4_1_codes(const uint8_t *b, int sub, codes *c) {
    (void)sub;
    c->u = nibbles(b + 4);
    same_scale(c, f16(b), 0.0f, f16(b + 2));
}

static inline void q5_0_codes(const uint8_t *b, int sub, codes *c) {
    (void)sub;
    c->u = nibbles(b + 6) | fifth_bits(b + 2);
    same_scale(c, f16(b), 16.0f, 0.0f);
}

static inline void q5_1_codes(const uint8_t *b, int sub, codes *c) {
    (void)sub;
    c->u = nibbles(b + 8) | fifth_bits(b + 4);
    same_scale(c, f16(b), 0.0f, f16(b + 2));
}

static inline void q8_0_codes(const uint8_t *b, int sub, codes *c) {  // signed: see products()
    (void)sub;
    c->u = bytes32(b + 2);
    same_scale(c, f16(b), 0.0f, 0.0f);
}

static inline void q4_k_codes(const uint8_t *b, int sub, codes *c) {
    int scale, min;
    k_scale_min(b + 4, sub, &scale, &min);
    c->u = (bytes32(b + 16 + 32 * (sub / 2)) >> (4 * (sub & 1))) & 15;
    same_scale(c, f16(b) * (float)scale, 0.0f, -f16(b + 2) * (float)min);
}

static inline void q5_k_codes(const uint8_t *b, int sub, codes *c) {
    int scale, min;
    k_scale_min(b + 4, sub, &scale, &min);
    const u8x32 low = (bytes32(b + 48 + 32 * (sub / 2)) >> (4 * (sub & 1))) & 15;
    c->u = low | (((bytes32(b + 16) >> sub) & 1) << 4);
    same_scale(c, f16(b) * (float)scale, 0.0f, -f16(b + 2) * (float)min);
}

static inline void q6_k_codes(const uint8_t *b, int sub, codes *c) {
    const int half = sub / 4, k = sub % 4;
    const int8_t *scales = (const int8_t *)(b + 192) + 8 * half + 2 * k;
    const float d = f16(b + 208);
    const u8x32 low = (bytes32(b + 64 * half + 32 * (k & 1)) >> (4 * (k >> 1))) & 15;
    c->u = low | (((bytes32(b + 128 + 32 * half) >> (2 * k)) & 3) << 4);
    c->scale[0] = d * (float)scales[0];
    c->scale[1] = d * (float)scales[1];
    c->zero = 32.0f;
    c->min = 0.0f;
}

/* Integer products of a block as 8 float lanes, lanes 0-3 summing values 0-15 and lanes 4-7 values 16-31
 * (vpmaddubsw pairs bytes within each 128-bit half). SIGNED codes (Q8_0) hold w itself. */
static inline f32x8 products(u8x32 u, const int8_t *q, int is_signed) {
#ifdef __AVX2__
    __m256i w = (__m256i)u, x = _mm256_loadu_si256((const __m256i *)q);
    if (is_signed) {
        x = _mm256_sign_epi8(x, w);
        w = _mm256_sign_epi8(w, w);
    }
    // |w| <= 128 and |q| <= 127: a pair sums to at most 32512, no int16 saturation.
    return (f32x8)_mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
#else
    f32x8 out = {0};
    for (int j = 0; j < 32; j++) out[(j / 16) * 4 + (j % 16) / 4] += (float)((is_signed ? (int8_t)u[j] : u[j]) * q[j]);
    return out;
#endif
}

static inline float lane_sum(f32x8 v) {
    float sum = 0.0f;
    for (int lane = 0; lane < 8; lane++) sum += v[lane];
    return sum;
}

/* One block of x: 32 values -> codes, as the loops below compute them: d = max|v| / 127, q = v * (127 / max|v|)
 * rounded half to even. AVX-512 keeps them in registers: 2048 rows of 576 took 1.09 ms in the loops, 0.21 ms
 * so, bit for bit the same. */
static inline void quantize_block(const float *v, act_block *a) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
    const __m512 low = _mm512_loadu_ps(v), high = _mm512_loadu_ps(v + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(low), _mm512_abs_ps(high)));
    const float d = amax / 127.0f, inverse = d > 0.0f ? 127.0f / amax : 0.0f;
    const __m512 scale = _mm512_set1_ps(inverse);
    // The default rounding mode (MXCSR) is to nearest, ties to even: what rintf does.
    const __m512i codes_low = _mm512_cvtps_epi32(_mm512_mul_ps(low, scale));
    const __m512i codes_high = _mm512_cvtps_epi32(_mm512_mul_ps(high, scale));
    _mm_storeu_si128((__m128i *)a->q, _mm512_cvtepi32_epi8(codes_low));
    _mm_storeu_si128((__m128i *)(a->q + 16), _mm512_cvtepi32_epi8(codes_high));
    const int32_t sums[2] = {_mm512_reduce_add_epi32(codes_low), _mm512_reduce_add_epi32(codes_high)};
#else
    float amax = 0.0f;  // a comparison, not fmaxf (a libm call per value: NaN rules keep it from vectorizing)
#pragma omp simd reduction(max : amax)
    for (int j = 0; j < 32; j++) amax = fabsf(v[j]) > amax ? fabsf(v[j]) : amax;
    const float d = amax / 127.0f, inverse = d > 0.0f ? 127.0f / amax : 0.0f;
#pragma omp simd
    for (int j = 0; j < 32; j++) a->q[j] = (int8_t)__builtin_rintf(v[j] * inverse);  // half to even
    int32_t sums[2] = {0, 0};
    for (int j = 0; j < 32; j++) sums[j / 16] += a->q[j];
#endif
    a->d = d;
    a->half_sums[0] = d * (float)sums[0];
    a->half_sums[1] = d * (float)sums[1];
}

// x [rows, in] -> blocks [rows, in / 32]
void gguf_quantize_activations(const float *x, act_block *blocks, int64_t rows, int64_t in) {
    const int64_t per_row = in / 32, total = rows * per_row;
#pragma omp parallel for schedule(static) if (total >= 256)
    for (int64_t i = 0; i < total; i++) quantize_block(x + (i / per_row) * in + 32 * (i % per_row), blocks + i);
}

static inline f32x8 broadcast(float v) { return (f32x8){v, v, v, v, v, v, v, v}; }

// Lanes 0-3 scaled by `low`, lanes 4-7 by `high` (the two 16-value halves of a block).
static inline f32x8 halves(float low, float high) { return (f32x8){low, low, low, low, high, high, high, high}; }

/* One weight row against `nrows` (1-4) rows of x: each row keeps 8 float lanes of scaled products and a scalar
 * for the zero and min terms, summed once at the end. HALVES: the format scales 16 values at a time (Q6_K);
 * the others share one scale per block, so the lanes need a broadcast only. Inlined with a constant `nrows`, the
 * accumulators stay in registers. */
#define GGUF_INT8_ROWS(NAME, VALUES, BYTES, SIGNED, HALVES)                                                       \
    static inline __attribute__((always_inline)) void NAME##_int8_rows(const act_block *x, int64_t blocks,     \
                                                                      const uint8_t *wrow, float *y,            \
                                                                      int64_t ldy, int nrows) {                 \
        f32x8 acc[4] = {{0}};                                                                                     \
        float offsets[4] = {0.0f, 0.0f, 0.0f, 0.0f};                                                             \
        for (int64_t i = 0; i < blocks; i++) {                                                                    \
            codes c;                                                                                              \
            NAME##_codes(wrow + (i * 32 / VALUES) * BYTES, (int)(i % (VALUES / 32)), &c);                        \
            for (int r = 0; r < nrows; r++) {                                                                     \
                const act_block *a = x + r * blocks + i;                                                          \
                const float h0 = a->half_sums[0], h1 = a->half_sums[1];                                          \
                if (HALVES) {                                                                                     \
                    acc[r] += products(c.u, a->q, SIGNED) * halves(c.scale[0] * a->d, c.scale[1] * a->d);        \
                    offsets[r] += c.min * (h0 + h1) - c.zero * (c.scale[0] * h0 + c.scale[1] * h1);              \
                } else {                                                                                          \
                    acc[r] += products(c.u, a->q, SIGNED) * broadcast(c.scale[0] * a->d);                        \
                    offsets[r] += (c.min - c.zero * c.scale[0]) * (h0 + h1);                                      \
                }                                                                                                 \
            }                                                                                                     \
        }                                                                                                         \
        for (int r = 0; r < nrows; r++) y[r * ldy] = lane_sum(acc[r]) + offsets[r];                              \
    }

/* Threads take bands of output rows; each weight row is decoded once per four rows of x. */
#define GGUF_INT8_MATMUL(NAME, VALUES, BYTES, SIGNED, HALVES)                                                     \
    GGUF_INT8_ROWS(NAME, VALUES, BYTES, SIGNED, HALVES)                                                           \
    void gguf_int8_matmul_##NAME(const act_block *x, const uint8_t *w, float *y, int64_t rows, int64_t in,       \
                                 int64_t out, int64_t ldy) {                                                      \
        const int64_t row_bytes = in / VALUES * BYTES, blocks = in / 32;                                          \
        _Pragma("omp parallel for schedule(static)")                                                              \
        for (int64_t o = 0; o < out; o++) {                                                                       \
            const uint8_t *wrow = w + o * row_bytes;                                                              \
            if (rows == 1) {                                                                                      \
                NAME##_int8_rows(x, blocks, wrow, y + o, ldy, 1);                                                 \
                continue;                                                                                         \
            }                                                                                                     \
            int64_t r0 = 0;                                                                                       \
            for (; r0 + 4 <= rows; r0 += 4) NAME##_int8_rows(x + r0 * blocks, blocks, wrow, y + r0 * ldy + o, ldy, 4); \
            const act_block *xr = x + r0 * blocks;                                                                \
            float *yr = y + r0 * ldy + o;                                                                         \
            switch (rows - r0) { /* constant counts: accumulators in registers (a variable one cost 2x) */        \
            case 1: NAME##_int8_rows(xr, blocks, wrow, yr, ldy, 1); break;                                        \
            case 2: NAME##_int8_rows(xr, blocks, wrow, yr, ldy, 2); break;                                        \
            case 3: NAME##_int8_rows(xr, blocks, wrow, yr, ldy, 3); break;                                        \
            default: break;                                                                                       \
            }                                                                                                     \
        }                                                                                                         \
    }

GGUF_INT8_MATMUL(q4_0, 32, 18, 0, 0)
GGUF_INT8_MATMUL(q4_1, 32, 20, 0, 0)
GGUF_INT8_MATMUL(q5_0, 32, 22, 0, 0)
GGUF_INT8_MATMUL(q5_1, 32, 24, 0, 0)
GGUF_INT8_MATMUL(q8_0, 32, 34, 1, 0)
GGUF_INT8_MATMUL(q4_k, 256, 144, 0, 0)
GGUF_INT8_MATMUL(q5_k, 256, 176, 0, 0)
GGUF_INT8_MATMUL(q6_k, 256, 210, 0, 1)

/* Q4_0, Q4_1 and Q8_0 with eight weight rows interleaved (layers/gguf_ops.py: interleave_rows8), the layout the
 * 8-bit path reads. Per 32-value block, a tile of 8 rows holds the rows' 8 half-float scales d (Q4_1: then
 * their 8 mins m), then words of 32 bytes, each holding 4 consecutive code bytes of every row in turn. Q8_0 has
 * 8 words, word g holding values 4g..4g+3; Q4_0 and Q4_1 have 4, word p holding values 4p..4p+3 in its low
 * nibbles and 16+4p..16+4p+3 in its high ones. One dot-product instruction then sums 4 values of all 8 rows
 * at once, one row per int32 lane, against 4 broadcast activation bytes: a block of 8 rows takes 8 of them and
 * one scaling, where the row-major kernels above spend ~10 instructions per row.
 *     y_o = sum over blocks of  d_o dx (sum_j u_oj q_j) + m_o dx (sum_j q_j)
 * with m_o = Q4_1's min, -8 d_o for Q4_0, and for Q8_0 -128 d_o where its signed codes are offset to unsigned
 * (VNNI multiplies unsigned by signed bytes) or 0. Each row's sum runs in the same order whatever rows run
 * beside it (batch invariance). */
typedef int32_t i32x8 __attribute__((vector_size(32)));

enum { X8_Q4_0, X8_Q4_1, X8_Q8_0 };

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define Q8_0_X8_OFFSET 128  // signed codes + 128: unsigned, as vpdpbusd takes them
#else
#define Q8_0_X8_OFFSET 0  // signed codes, multiplied by sign (AVX2) or as they are (C)
#endif

// acc lane o += sum_j w[4o + j] q[j] for j < 4: w codes (unsigned, or SIGNED raw Q8_0 codes), q four signed bytes.
static inline i32x8 dot4(i32x8 acc, u8x32 w, const int8_t *q, int is_signed) {
    int32_t word;
    memcpy(&word, q, 4);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    (void)is_signed;
    return (i32x8)_mm256_dpbusd_epi32((__m256i)acc, (__m256i)w, _mm256_set1_epi32(word));
#elif defined(__AVX2__)
    __m256i codes = (__m256i)w, x = _mm256_set1_epi32(word);
    if (is_signed) {  // |w| times q with w's sign: |w| <= 128, |q| <= 127, so a pair stays within int16
        x = _mm256_sign_epi8(x, codes);
        codes = _mm256_sign_epi8(codes, codes);
    }
    return acc + (i32x8)_mm256_madd_epi16(_mm256_maddubs_epi16(codes, x), _mm256_set1_epi16(1));
#else
    for (int o = 0; o < 8; o++)
        for (int j = 0; j < 4; j++) acc[o] += (is_signed ? (int8_t)w[4 * o + j] : w[4 * o + j]) * q[j];
    return acc;
#endif
}

static inline f32x8 halves8(const uint8_t *p) {  // 8 IEEE halves -> 8 floats
#ifdef __F16C__
    return (f32x8)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
#else
    f32x8 v;
    for (int o = 0; o < 8; o++) v[o] = f16(p + 2 * o);
    return v;
#endif
}

static inline int x8_block_bytes(int format) { return format == X8_Q4_0 ? 144 : format == X8_Q4_1 ? 160 : 272; }

/* A tile block's codes: codes[g] pairs with activation bytes 4g..4g+3. */
static inline void x8_codes(const uint8_t *words, int format, u8x32 codes[8]) {
    if (format == X8_Q8_0) {
        for (int g = 0; g < 8; g++) codes[g] = bytes32(words + 32 * g) ^ (uint8_t)Q8_0_X8_OFFSET;
        return;
    }
    for (int p = 0; p < 4; p++) {
        const u8x32 word = bytes32(words + 32 * p);
        codes[p] = word & 15;
        codes[p + 4] = word >> 4;
    }
}

/* Fetch into L2 the same block of the tiles a thread reads next (its static share of tiles is contiguous): a
 * step reads each weight once from memory, and the hardware's prefetchers, which stop at page ends, left the
 * cores waiting on it (30 SmolLM2 layers from memory, 1 / 16 rows: 4.1 / 9.0 -> 2.6 / 7.0 ms). */
static inline void prefetch_block(const uint8_t *block, int64_t bytes) {
    for (int64_t c = 0; c < bytes; c += 64) __builtin_prefetch(block + c, 0, 2);
}

/* `ntiles` (1 or 2) neighbouring tiles' 8 rows against `nrows` rows of x (1-8 for one tile, 1-4 for two: the
 * codes of both stay in registers): y[r * ldy + 8k + o]. Two tiles share each broadcast of x's bytes, a third of
 * a row's instructions. Every (row, tile) sum runs the same operations in the same order either way. */
static inline __attribute__((always_inline)) void x8_rows(const act_block *x, int64_t blocks, const uint8_t *tile,
                                                          int64_t tile_bytes, float *y, int64_t ldy, int nrows,
                                                          int ntiles, int format, int prefetch) {
    const int is_signed = format == X8_Q8_0 && Q8_0_X8_OFFSET == 0;
    f32x8 acc[2][8] = {{{0}}};
    for (int64_t i = 0; i < blocks; i++) {
        f32x8 d[2], m[2];
        u8x32 codes[2][8];
        for (int k = 0; k < ntiles; k++) {
            const uint8_t *b = tile + k * tile_bytes + i * x8_block_bytes(format);
            if (prefetch) prefetch_block(b + ntiles * tile_bytes, x8_block_bytes(format));
            d[k] = halves8(b);
            m[k] = format == X8_Q4_1 ? halves8(b + 16)
                                     : d[k] * broadcast(format == X8_Q4_0 ? -8.0f : -(float)Q8_0_X8_OFFSET);
            x8_codes(b + (format == X8_Q4_1 ? 32 : 16), format, codes[k]);
        }
        for (int r = 0; r < nrows; r++) {
            const act_block *a = x + r * blocks + i;
            const f32x8 dx = broadcast(a->d), xsum = broadcast(a->half_sums[0] + a->half_sums[1]);
            for (int k = 0; k < ntiles; k++) {
                i32x8 sums = {0}, sums_high = {0};  // two chains: the dot products' latency
                for (int g = 0; g < 4; g++) {
                    sums = dot4(sums, codes[k][g], a->q + 4 * g, is_signed);
                    sums_high = dot4(sums_high, codes[k][g + 4], a->q + 16 + 4 * g, is_signed);
                }
                acc[k][r] += __builtin_convertvector(sums + sums_high, f32x8) * (d[k] * dx);
                if (format != X8_Q8_0 || Q8_0_X8_OFFSET) acc[k][r] += m[k] * xsum;
            }
        }
    }
    for (int k = 0; k < ntiles; k++)
        for (int r = 0; r < nrows; r++) memcpy(y + r * ldy + 8 * k, &acc[k][r], sizeof(f32x8));
}

/* Every row of x against one tile (rows eight at a time) or two (four at a time); constant counts, so that the
 * accumulators stay in registers. */
static inline __attribute__((always_inline)) void x8_tiles(const act_block *x, int64_t blocks, const uint8_t *tile,
                                                           int64_t tile_bytes, float *y, int64_t ldy, int64_t rows,
                                                           int ntiles, int format) {
    const int step = ntiles == 2 ? 4 : 8;
    int64_t r0 = 0;
    for (; r0 + step <= rows; r0 += step)
        x8_rows(x + r0 * blocks, blocks, tile, tile_bytes, y + r0 * ldy, ldy, step, ntiles, format, r0 == 0);
    const act_block *xr = x + r0 * blocks;
    float *yr = y + r0 * ldy;
    switch (rows - r0) {
    case 1: x8_rows(xr, blocks, tile, tile_bytes, yr, ldy, 1, ntiles, format, r0 == 0); break;
    case 2: x8_rows(xr, blocks, tile, tile_bytes, yr, ldy, 2, ntiles, format, r0 == 0); break;
    case 3: x8_rows(xr, blocks, tile, tile_bytes, yr, ldy, 3, ntiles, format, r0 == 0); break;
    case 4: x8_rows(xr, blocks, tile, tile_bytes, yr, ldy, 4, 1, format, r0 == 0); break;  // one tile only: step 8
    case 5: x8_rows(xr, blocks, tile, tile_bytes, yr, ldy, 5, 1, format, r0 == 0); break;
    case 6: x8_rows(xr, blocks, tile, tile_bytes, yr, ldy, 6, 1, format, r0 == 0); break;
    case 7: x8_rows(xr, blocks, tile, tile_bytes, yr, ldy, 7, 1, format, r0 == 0); break;
    default: break;
    }
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define HAVE_X16 1
typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef int32_t word32 __attribute__((may_alias, aligned(1)));  // 4 code bytes read as one int32

static inline __m512i two_words(const uint8_t *low, const uint8_t *high) {  // 32 bytes of each tile
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)low)),
                              _mm256_loadu_si256((const __m256i *)high), 1);
}

static inline f32x16 halves16(const uint8_t *low, const uint8_t *high) {  // 8 halves of each tile -> 16 floats
    const __m128i a = _mm_loadu_si128((const __m128i *)low), b = _mm_loadu_si128((const __m128i *)high);
    return (f32x16)_mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(a), b, 1));
}

static inline f32x16 broadcast16(float v) { return (f32x16)_mm512_set1_ps(v); }

/* x8_rows for two neighbouring tiles in one 512-bit register (16 weight rows, one per int32 lane) against
 * `nrows` (1-8) rows of x: each lane runs x8_rows' operations in x8_rows' order, so the sums are the same bits;
 * a broadcast of x's bytes and the scaling serve 16 rows instead of 8. */
static inline __attribute__((always_inline)) void x16_rows(const act_block *x, int64_t blocks, const uint8_t *tile,
                                                           int64_t tile_bytes, float *y, int64_t ldy, int nrows,
                                                           int format, int prefetch) {
    f32x16 acc[8];
    for (int r = 0; r < 8; r++) acc[r] = broadcast16(0.0f);
    const int64_t block_bytes = x8_block_bytes(format), words = format == X8_Q4_1 ? 32 : 16;
    for (int64_t i = 0; i < blocks; i++) {
        const uint8_t *low = tile + i * block_bytes, *high = low + tile_bytes;
        if (prefetch) {
            prefetch_block(low + 2 * tile_bytes, block_bytes);
            prefetch_block(high + 2 * tile_bytes, block_bytes);
        }
        const f32x16 d = halves16(low, high);
        const f32x16 m = format == X8_Q4_1 ? halves16(low + 16, high + 16)
                                           : d * broadcast16(format == X8_Q4_0 ? -8.0f : -(float)Q8_0_X8_OFFSET);
        __m512i codes[8];
        for (int p = 0; p < (format == X8_Q8_0 ? 8 : 4); p++) {
            const __m512i word = two_words(low + words + 32 * p, high + words + 32 * p);
            if (format == X8_Q8_0) {
                codes[p] = _mm512_xor_si512(word, _mm512_set1_epi8((char)Q8_0_X8_OFFSET));
            } else {
                codes[p] = _mm512_and_si512(word, _mm512_set1_epi8(15));
                codes[p + 4] = _mm512_and_si512(_mm512_srli_epi16(word, 4), _mm512_set1_epi8(15));
            }
        }
        for (int r = 0; r < nrows; r++) {
            const act_block *a = x + r * blocks + i;
            const word32 *q = (const word32 *)a->q;  // read in place: broadcasts straight from memory
            __m512i sums = _mm512_setzero_si512(), sums_high = _mm512_setzero_si512();
            for (int g = 0; g < 4; g++) {
                sums = _mm512_dpbusd_epi32(sums, codes[g], _mm512_set1_epi32(q[g]));
                sums_high = _mm512_dpbusd_epi32(sums_high, codes[g + 4], _mm512_set1_epi32(q[g + 4]));
            }
            const f32x16 dx = broadcast16(a->d), xsum = broadcast16(a->half_sums[0] + a->half_sums[1]);
            acc[r] += __builtin_convertvector((i32x16)sums + (i32x16)sums_high, f32x16) * (d * dx);
            acc[r] += m * xsum;
        }
    }
    for (int r = 0; r < nrows; r++) {  // lanes 0-7: the first tile's rows, 8-15: the second's
        memcpy(y + r * ldy, &acc[r], sizeof(f32x8));
        memcpy(y + r * ldy + 8, (const float *)&acc[r] + 8, sizeof(f32x8));
    }
}

static inline __attribute__((always_inline)) void x16_tiles(const act_block *x, int64_t blocks, const uint8_t *tile,
                                                            int64_t tile_bytes, float *y, int64_t ldy, int64_t rows,
                                                            int format) {
    int64_t r0 = 0;
    for (; r0 + 8 <= rows; r0 += 8)
        x16_rows(x + r0 * blocks, blocks, tile, tile_bytes, y + r0 * ldy, ldy, 8, format, r0 == 0);
    const act_block *xr = x + r0 * blocks;
    float *yr = y + r0 * ldy;
    switch (rows - r0) {
    case 1: x16_rows(xr, blocks, tile, tile_bytes, yr, ldy, 1, format, r0 == 0); break;
    case 2: x16_rows(xr, blocks, tile, tile_bytes, yr, ldy, 2, format, r0 == 0); break;
    case 3: x16_rows(xr, blocks, tile, tile_bytes, yr, ldy, 3, format, r0 == 0); break;
    case 4: x16_rows(xr, blocks, tile, tile_bytes, yr, ldy, 4, format, r0 == 0); break;
    case 5: x16_rows(xr, blocks, tile, tile_bytes, yr, ldy, 5, format, r0 == 0); break;
    case 6: x16_rows(xr, blocks, tile, tile_bytes, yr, ldy, 6, format, r0 == 0); break;
    case 7: x16_rows(xr, blocks, tile, tile_bytes, yr, ldy, 7, format, r0 == 0); break;
    default: break;
    }
}
#else
#define HAVE_X16 0
#endif

/* Whether threads take tiles in pairs. AVX-512 holds a pair in one register: 4-bit tiles at every row count (30
 * SmolLM2 layers at 1 / 16 / 64 / 256 rows: 1.00 / 6.9 / 26.7 / 107 -> 0.93 / 6.0 / 23.2 / 92 ms), Q8_0 from 16
 * rows (its LM head at 16 / 64 rows 2.96 / 9.5 -> 2.68 / 7.9 ms; fewer rows are slower, decoding 8 words a
 * pass). Otherwise, from 8 rows on, 4-bit pairs share x's broadcasts in 256-bit registers (7.8 / 27.3 ms at 16 /
 * 64 rows, one tile at a time 8.1 / 31.2), four rows at a time; fewer rows and Q8_0 take tiles one by one. */
static inline int x8_paired(int format, int64_t rows) {
    if (HAVE_X16) return format != X8_Q8_0 || rows >= 16;
    return format != X8_Q8_0 && rows >= 8;
}

static inline __attribute__((always_inline)) void x8_pair(const act_block *x, int64_t blocks, const uint8_t *tile,
                                                          int64_t tile_bytes, float *y, int64_t ldy, int64_t rows,
                                                          int format) {
#if HAVE_X16
    x16_tiles(x, blocks, tile, tile_bytes, y, ldy, rows, format);
#else
    x8_tiles(x, blocks, tile, tile_bytes, y, ldy, rows, 2, format);
#endif
}

#define GGUF_INT8_X8_MATMUL(NAME, FORMAT)                                                                         \
    void gguf_int8_matmul_##NAME(const act_block *x, const uint8_t *w, float *y, int64_t rows, int64_t in,       \
                                 int64_t out, int64_t ldy) {                                                      \
        const int64_t blocks = in / 32, tile_bytes = blocks * x8_block_bytes(FORMAT), tiles = out / 8;           \
        const int64_t per_task = x8_paired(FORMAT, rows) ? 2 : 1;                                                 \
        _Pragma("omp parallel for schedule(static)")                                                              \
        for (int64_t task = 0; task < (tiles + per_task - 1) / per_task; task++) {                                \
            const int64_t t = per_task * task;                                                                    \
            if (per_task == 2 && t + 1 < tiles)                                                                   \
                x8_pair(x, blocks, w + t * tile_bytes, tile_bytes, y + 8 * t, ldy, rows, FORMAT);                 \
            else                                                                                                  \
                x8_tiles(x, blocks, w + t * tile_bytes, tile_bytes, y + 8 * t, ldy, rows, 1, FORMAT);             \
        }                                                                                                         \
    }

GGUF_INT8_X8_MATMUL(q4_0x8, X8_Q4_0)
GGUF_INT8_X8_MATMUL(q4_1x8, X8_Q4_1)
GGUF_INT8_X8_MATMUL(q8_0x8, X8_Q8_0)
