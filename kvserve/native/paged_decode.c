/* Paged decode attention for float32, float16, bfloat16, int8 and int4 CPU caches: one query token per sequence,
 * read in place.
 *
 * The pure-torch path copies every sequence's blocks into a padded [B, L, Hkv, D] tensor before SDPA
 * reads them again; here each sequence's task walks its block table and reads each key and value row
 * once, up to its own length. The threads share spans of the sequences (below). Used by attention/cpu_native.py.
 *
 * query, out  [num_seqs, num_kv_heads * group, head_dim]   (query head h * group + g uses KV head h)
 * key, value  [num_blocks, block_size, num_kv_heads, head_dim] float32, float16 or bfloat16 (converted to float32
 *             as read: exact), or int8 codes with
 * key_scale, value_scale [num_blocks, block_size, num_kv_heads] float32 (kv_cache_dtype int8: x = code * scale,
 *             applied as torch_ref does: q . k = (q . codes) * key_scale, p v = (p * value_scale) codes)
 * tables      [num_seqs, max_blocks] block ids;  seq_lens [num_seqs] tokens to attend (>= 1)
 * starts      [num_seqs] the first of them each sequence sees (a sliding window), or NULL: all from 0
 *
 * Rows with the same block table (the single-token rows of a request verifying drafts: runner/attention_inputs.py)
 * are attended together, each key and value row read once for all of them; every row rounds as it does alone.
 *
 * With AVX-512, 16 tokens at a time: their products' sums across lanes together (span_scores16), and p v with each
 * head's sums in registers (span_values16), each key and value vector loaded once for the query heads of its KV
 * head and widened in registers. Warm, the per-(token, head) products bound this kernel; a float32 cache from
 * memory costs twice as much (30 layers of 600 tokens, one row, one thread: 4.1 ms from a cold cache against 1.8
 * warm). 30 layers, warm, one thread, int8 cache: one row over 600 tokens 1.44 -> 1.03 ms and 16 rows over ~150
 * 8.3 -> 5.8 ms from widening in registers; five verify rows over 600 tokens 9.1 ms as five sequences, 4.3 together.
 *
 * int4 (KIVI, kv/kv_quant.py): codes two per byte, float16 scales and zero points (keys per channel of a block, values
 * per token), each sequence's incomplete block in its full-precision residual slot (kv/int4_residual.py); rows
 * dequantized as read (int4_row) on the loops' path.
 *
 * int8_queries (an int8 cache under cpu_gguf_int8_activations): Q.K on 8-bit query codes, summed exactly in
 * integers (query_codes); with AVX-512 VNNI each KV head's keys are transposed 16 at a time so that one instruction
 * takes 4 bytes of a query against 16 keys (int8_span_scores), with no sums across lanes.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

/* exp(x) for x <= 0 (softmax after subtracting the max), ~1 ulp: Cody-Waite reduction to r in
 * [-ln2/2, ln2/2] and a degree-6 polynomial (Cephes' expf coefficients). Branch-free, so it vectorizes. */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float n = __builtin_roundf(x * 1.44269504088896341f);
    const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } two_n = {.i = ((int32_t)n + 127) << 23};
    return p * two_n.f;
}

/* What a cache's elements are (kv/dtypes.py's storage dtypes the kernel reads). */
enum kv_kind { KV_F32 = 0, KV_I8 = 1, KV_F16 = 2, KV_BF16 = 3, KV_I4 = 4 };

static inline int64_t element_bytes(int kind) { return kind == KV_F32 ? 4 : kind == KV_I8 ? 1 : 2; }

// Bytes of a token's row of `token_stride` (Hkv * D) elements: two int4 codes a byte.
static inline int64_t row_bytes(int kind, int64_t token_stride) {
    return kind == KV_I4 ? token_stride / 2 : token_stride * element_bytes(kind);
}

typedef struct {  // KV_I4's parameters and residual (kv/kv_cache.py's int4 layout)
    const _Float16 *key_scale, *key_zero;      // [num_blocks, Hkv, D]: per channel of each block
    const _Float16 *value_scale, *value_zero;  // [num_blocks, block_size, Hkv]: per token
    const void *residual_key, *residual_value;  // [slots, block_size, Hkv, D]: each request's incomplete block
    int residual_kind;                          // its elements (enum kv_kind: the model's dtype)
    // Per sequence, from the task's own on (paged_decode offsets them): its incomplete block's table column (-1:
    // none) and its residual slot.
    const int64_t *tail_columns, *tail_slots;
} int4_cache;

typedef struct {  // one layer's paged cache; key_scale / value_scale only for KV_I8 (else NULL)
    const void *key, *value;
    const float *key_scale, *value_scale;
    int kind;          // enum kv_kind
    int int8_queries;  // KV_I8 only: the queries rounded to 8 bits for Q.K (query_codes below)
    int4_cache int4;   // KV_I4 only
} paged_kv;

/* x [rows, dim] -> int8 codes [rows, dim] and a scale per row, as kv/kv_quant.py's quantize computes them:
 * scale = max(absmax, 1e-8) / 127, code = x / scale rounded half to even, clamped to +-127. */
void quantize_rows_i8(const float *x, int8_t *codes, float *scales, int64_t rows, int64_t dim) {
    for (int64_t r = 0; r < rows; r++, x += dim, codes += dim) {
        float absmax = 0.0f;
        for (int64_t d = 0; d < dim; d++) absmax = fabsf(x[d]) > absmax ? fabsf(x[d]) : absmax;
        const float scale = (absmax > 1e-8f ? absmax : 1e-8f) / 127.0f;
        for (int64_t d = 0; d < dim; d++) {
            const float code = rintf(x[d] / scale);
            codes[d] = (int8_t)(code < -127.0f ? -127.0f : code > 127.0f ? 127.0f : code);
        }
        scales[r] = scale;
    }
}

/* Queries rounded to 8 bits for Q.K against an int8 cache (paged_kv.int8_queries; llama.cpp rounds them so for its
 * q8_0 K cache), per (row, head) as quantize_rows_i8 rounds keys. A score is then ((float)(q codes . k codes) * key
 * scale) * (query scale * scale): integer products summed exactly, so every path below gives the same bits. */
typedef struct {
    int8_t *codes;   // [rows, num_heads, padded]: head_dim codes, then zeros up to a multiple of 64
    int32_t *sums;   // [rows, num_heads] each head's codes summed (the VNNI pass's unsigned keys add 128 * sum)
    float *scales;   // [rows, num_heads] query scale * softmax scale
    int64_t padded;  // head_dim rounded up to a multiple of 64
} query_codes;

/* query [count, head_dim] -> q's codes, sums and scales for `count` (row, head) vectors. */
static void quantize_queries(const float *query, int64_t count, int64_t head_dim, float scale, const query_codes *q) {
    for (int64_t v = 0; v < count; v++) {
        int8_t *codes = q->codes + v * q->padded;
        float step;
        quantize_rows_i8(query + v * head_dim, codes, &step, 1, head_dim);
        memset(codes + head_dim, 0, (size_t)(q->padded - head_dim));
        int32_t sum = 0;
        for (int64_t d = 0; d < head_dim; d++) sum += codes[d];
        q->sums[v] = sum, q->scales[v] = step * scale;
    }
}

/* q's rows from `row` on (a task's rows). */
static inline query_codes rows_from(const query_codes *q, int64_t row, int64_t num_heads) {
    return (query_codes){q->codes + row * num_heads * q->padded, q->sums + row * num_heads,
                         q->scales + row * num_heads, q->padded};
}

/* One (row, head)'s score against an int8 key [head_dim], as query_codes says. */
static inline float int8_score(const int8_t *q, const int8_t *k, int64_t head_dim, float key_scale,
                               float query_scale) {
    int32_t dot = 0;
    for (int64_t d = 0; d < head_dim; d++) dot += (int32_t)q[d] * k[d];
    return (float)dot * key_scale * query_scale;
}

/* A cache row [Hkv * D] as floats: in place for float32; other elements are converted into `converted` (exactly:
 * every float16, bfloat16 and int8 value is a float32; int8's scales are applied by the caller, as torch_ref does). */
static inline const float *float_row(const void *cache, int kind, int64_t token, int64_t token_stride,
                                     float *restrict converted) {
    if (kind == KV_F32) return (const float *)cache + token * token_stride;
    if (kind == KV_I8) {
        const int8_t *codes = (const int8_t *)cache + token * token_stride;
#pragma omp simd
        for (int64_t e = 0; e < token_stride; e++) converted[e] = (float)codes[e];
        return converted;
    }
    const uint16_t *halves = (const uint16_t *)cache + token * token_stride;  // float16 or bfloat16 bits
    int64_t e = 0;
#ifdef __AVX512F__
    for (; e + 16 <= token_stride; e += 16) {
        const __m256i h = _mm256_loadu_si256((const __m256i *)(halves + e));
        _mm512_storeu_ps(converted + e, kind == KV_F16 ? _mm512_cvtph_ps(h)
                                                       : _mm512_castsi512_ps(_mm512_slli_epi32(
                                                             _mm512_cvtepu16_epi32(h), 16)));
    }
#endif
    for (; e < token_stride; e++) {
        if (kind == KV_F16) {
            converted[e] = (float)((const _Float16 *)halves)[e];
        } else {
            union { uint32_t u; float f; } bits = {.u = (uint32_t)halves[e] << 16};
            converted[e] = bits.f;
        }
    }
    return converted;
}

/* A KV_I4 row of the block in table column `column` (block id `block`, row i) as floats in `converted`: code * scale
 * + zero as kv_quant.dequantize_int4 computes it, keys with the block's per-channel parameters, values with the
 * token's; the sequence's incomplete block is read from its residual slot instead. */
static const float *int4_row(const paged_kv *kv, int values, int64_t column, int64_t block, int64_t i,
                             int64_t num_kv_heads, int64_t head_dim, int64_t block_size, float *restrict converted) {
    const int4_cache *c = &kv->int4;
    const int64_t token_stride = num_kv_heads * head_dim, half = head_dim / 2, token = block * block_size + i;
    if (column == c->tail_columns[0])
        return float_row(values ? c->residual_value : c->residual_key, c->residual_kind,
                         c->tail_slots[0] * block_size + i, token_stride, converted);
    const uint8_t *codes = (const uint8_t *)(values ? kv->value : kv->key) + token * token_stride / 2;
    for (int64_t h = 0; h < num_kv_heads; h++) {
        const uint8_t *packed = codes + h * half;  // channel d in the low nibble of byte d, d + D / 2 in the high
        float *out = converted + h * head_dim;
        if (values) {
            const float scale = (float)c->value_scale[token * num_kv_heads + h];
            const float zero = (float)c->value_zero[token * num_kv_heads + h];
#pragma omp simd
            for (int64_t d = 0; d < half; d++) {
                out[d] = (float)(packed[d] & 15) * scale + zero;
                out[d + half] = (float)(packed[d] >> 4) * scale + zero;
            }
        } else {
            const _Float16 *scale = c->key_scale + (block * num_kv_heads + h) * head_dim;
            const _Float16 *zero = c->key_zero + (block * num_kv_heads + h) * head_dim;
#pragma omp simd
            for (int64_t d = 0; d < half; d++) {
                out[d] = (float)(packed[d] & 15) * (float)scale[d] + (float)zero[d];
                out[d + half] = (float)(packed[d] >> 4) * (float)scale[d + half] + (float)zero[d + half];
            }
        }
    }
    return converted;
}

/* Token row i of the block in table column `column` of a cache's keys or values (`values`) as floats: float_row, or
 * int4_row for KV_I4. */
static inline const float *cache_row(const paged_kv *kv, int values, const int64_t *restrict table, int64_t column,
                                     int64_t i, int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                                     float *restrict converted) {
    if (kv->kind == KV_I4)
        return int4_row(kv, values, column, table[column], i, num_kv_heads, head_dim, block_size, converted);
    return float_row(values ? kv->value : kv->key, kv->kind, table[column] * block_size + i,
                     num_kv_heads * head_dim, converted);
}

/* Asks for token `token`'s row of the next block while this one is read: block ids are scattered, so the
 * hardware prefetcher cannot guess them (~10% of a cold decode step). */
static inline void prefetch_row(const void *cache, int kind, int64_t token, int64_t token_stride) {
    const int64_t bytes = row_bytes(kind, token_stride);
    const char *row = (const char *)cache + token * bytes;
    for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(row + offset);
}

/* A span of a sequence is a task. Sequences are cut into spans of SPAN_TOKENS (whole blocks where the block
 * size divides it), so that one long sequence keeps every thread busy (a batch-1 decode; one request's rows
 * verifying drafts), and the cut depends on the sequence's length only: a row's result does not depend on the rows
 * beside it. A span leaves, per query head, its max score, its sum of exp(score - max) and its p @ v unnormalized
 * (partial_floats); the sequence's spans are merged in order afterwards (flash-decoding's split). */
#define SPAN_TOKENS 128

/* Floats of a span's partial: p @ v [num_heads, head_dim], then max [num_heads] and sum [num_heads], rounded up to
 * a 64-byte line so that threads writing neighbouring spans never share one. */
static inline int64_t partial_floats(int64_t num_heads, int64_t head_dim) {
    return (num_heads * (head_dim + 2) + 15) / 16 * 16;
}

#ifdef __AVX512F__
#define SCORE_TILE 16  // tokens whose dot products are summed across lanes together

/* out[j] = the sum of v[j]'s 16 lanes, for 16 vectors at once: a transposing tree of 15 shuffle pairs and adds,
 * where reducing each vector alone takes 4 dependent steps of its own. */
static inline __m512 lane_sums16(const float *v) {  // v [16, 16]
    __m512 t[8], u[4], w[2];
    for (int i = 0; i < 8; i++) {  // per 128-bit lane: v2i's and v2i+1's lanes 0+2 and 1+3
        const __m512 a = _mm512_loadu_ps(v + 32 * i), b = _mm512_loadu_ps(v + 32 * i + 16);
        t[i] = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    }
    for (int i = 0; i < 4; i++)  // per 128-bit lane: the quarter sums of v4i .. v4i+3
        u[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0x44),
                             _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0xEE));
    for (int i = 0; i < 2; i++)  // 128-bit lanes 0+1 and 2+3 of u2i, then of u2i+1
        w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88), _mm512_shuffle_f32x4(w[0], w[1], 0xDD));
}

/* 16 elements of a cache row from `index` on, as floats: widened in registers (exactly: every float16, bfloat16
 * and int8 value is a float32). Widening each tile into a buffer first had cost a quarter of an int8 decode. */
static inline __attribute__((always_inline)) __m512 widened16(const void *row, int kind, int64_t index) {
    if (kind == KV_F32) return _mm512_loadu_ps((const float *)row + index);
    if (kind == KV_I8) {
        const __m128i codes = _mm_loadu_si128((const __m128i *)((const int8_t *)row + index));
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(codes));
    }
    const __m256i halves = _mm256_loadu_si256((const __m256i *)((const uint16_t *)row + index));
    return kind == KV_F16 ? _mm512_cvtph_ps(halves)
                          : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(halves), 16));
}

/* call(K) with the cache's kind as the compile-time constant K: each kind gets its own copy of the pass, with
 * widened16 inlined for that kind alone. */
#define WITH_CONSTANT_KIND(kind, call)                                                                        \
    do {                                                                                                       \
        switch (kind) {                                                                                        \
            case KV_F32: call(KV_F32); break;                                                                  \
            case KV_I8: call(KV_I8); break;                                                                    \
            case KV_F16: call(KV_F16); break;                                                                  \
            default: call(KV_BF16);                                                                            \
        }                                                                                                      \
    } while (0)

/* Where tokens t0 .. t0 + n - 1's rows of one cache (keys or values) start, int8's scales into scales [Hkv, 16];
 * the next block's row prefetched as attend_span does. */
static inline void tile_rows(const void *cache, int kind, const float *cache_scales, const int64_t *restrict table,
                             int64_t t0, int64_t n, int64_t last, const void **rows, float *restrict scales,
                             int64_t num_kv_heads, int64_t token_stride, int64_t block_size) {
    for (int64_t j = 0; j < n; j++) {
        const int64_t t = t0 + j, b = t / block_size, i = t % block_size, token = table[b] * block_size + i;
        if (t + block_size < last) prefetch_row(cache, kind, table[b + 1] * block_size + i, token_stride);
        rows[j] = (const char *)cache + token * token_stride * element_bytes(kind);
        if (kind == KV_I8)
            for (int64_t kv_head = 0; kv_head < num_kv_heads; kv_head++)
                scales[kv_head * 16 + j] = cache_scales[token * num_kv_heads + kv_head];
    }
}

/* out[i * 256 + 16 j ..] = the 16 partial sums of q_i . keys[j][column ..] for `nq` query vectors (q_i at q + i
 * head_dim: heads of one KV head) and `count` tokens (each 1-4): a product of the first 16 values, then fused
 * multiply-adds in order, the same operations whatever nq and count. Each key vector is loaded once for the nq
 * queries (one load per product had bound the pass). */
static inline __attribute__((always_inline)) void dot_block(const float *q, int nq, const void *const *keys,
                                                            int kind, int64_t column, int64_t head_dim, int count,
                                                            float *out) {
    __m512 acc[4][4], k[4];
    for (int j = 0; j < count; j++) k[j] = widened16(keys[j], kind, column);
    for (int i = 0; i < nq; i++) {
        const __m512 q0 = _mm512_loadu_ps(q + i * head_dim);
        for (int j = 0; j < count; j++) acc[i][j] = _mm512_mul_ps(q0, k[j]);
    }
    for (int64_t d = 16; d < head_dim; d += 16) {
        for (int j = 0; j < count; j++) k[j] = widened16(keys[j], kind, column + d);
        for (int i = 0; i < nq; i++) {
            const __m512 qd = _mm512_loadu_ps(q + i * head_dim + d);
            for (int j = 0; j < count; j++) acc[i][j] = _mm512_fmadd_ps(qd, k[j], acc[i][j]);
        }
    }
    for (int i = 0; i < nq; i++)
        for (int j = 0; j < count; j++) _mm512_storeu_ps(out + i * 256 + j * 16, acc[i][j]);
}

/* dot_block over a tile's n tokens, four at a time (four chains in flight), for nq (1-4) queries. A constant nq
 * in each call keeps the sums in registers. */
static inline __attribute__((always_inline)) void tile_dots(const float *q, int nq, const void *const *keys,
                                                            int kind, int64_t column, int64_t head_dim, int64_t n,
                                                            float *out) {
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) switch (nq) {
        case 1: dot_block(q, 1, keys + j, kind, column, head_dim, 4, out + j * 16); break;
        case 2: dot_block(q, 2, keys + j, kind, column, head_dim, 4, out + j * 16); break;
        case 3: dot_block(q, 3, keys + j, kind, column, head_dim, 4, out + j * 16); break;
        default: dot_block(q, 4, keys + j, kind, column, head_dim, 4, out + j * 16);
    }
    for (; j < n; j++) dot_block(q, nq, keys + j, kind, column, head_dim, 1, out + j * 16);
}

/* attend_span's keys pass for head dims that are multiples of 16: scores [rows, num_heads, len] = q . k (* key
 * scale) * scale, row r's up to its own last token lasts[r]. Each (token, head) product stays 16 partial sums until
 * a tile of 16 tokens is summed across lanes at once (lane_sums16): the per-product reductions were 60% of a
 * batch-1 decode's attention. A tile's rows are read once for every row and head. `dots` [num_heads, 16, 16] and
 * `key_scales` [num_kv_heads, 16] are scratch. */
static inline __attribute__((always_inline)) void span_scores16_of(
    const float *restrict query, int64_t num_rows, const int64_t *restrict lasts, const paged_kv *kv, int kind,
    const int64_t *restrict table, int64_t first, int64_t last, float *restrict scores, float *restrict dots,
    float *restrict key_scales, int64_t num_kv_heads, int64_t group, int64_t head_dim, int64_t block_size,
    float scale) {
    const int int8 = kind == KV_I8;
    const int64_t num_heads = num_kv_heads * group, token_stride = num_kv_heads * head_dim, len = last - first;
    const void *rows[SCORE_TILE];
    for (int64_t t0 = first; t0 < last; t0 += SCORE_TILE) {
        const int64_t n = last - t0 < SCORE_TILE ? last - t0 : SCORE_TILE;
        tile_rows(kv->key, kind, kv->key_scale, table, t0, n, last, rows, key_scales, num_kv_heads, token_stride,
                  block_size);
        for (int64_t r = 0; r < num_rows; r++) {
            const int64_t valid = lasts[r] - t0 < n ? lasts[r] - t0 : n;  // row r's tokens in the tile
            if (valid <= 0) continue;
            const float *q_row = query + r * num_heads * head_dim;
            for (int64_t kv_head = 0; kv_head < num_kv_heads; kv_head++)
                for (int64_t g = 0; g < group; g += 4) {  // up to four query heads of the KV head at a time
                    const int64_t h = kv_head * group + g;
                    tile_dots(q_row + h * head_dim, group - g < 4 ? (int)(group - g) : 4, rows, kind,
                              kv_head * head_dim, head_dim, n, dots + h * 256);
                }
            for (int64_t h = 0; h < num_heads; h++) {
                float *tile = dots + h * 256;
                for (int64_t j = n; j < SCORE_TILE; j++) _mm512_storeu_ps(tile + j * 16, _mm512_setzero_ps());
                __m512 sums = lane_sums16(tile);
                if (int8) sums = _mm512_mul_ps(sums, _mm512_loadu_ps(key_scales + (h / group) * 16));
                _mm512_mask_storeu_ps(scores + (r * num_heads + h) * len + t0 - first, (__mmask16)((1u << valid) - 1),
                                      _mm512_mul_ps(sums, _mm512_set1_ps(scale)));
            }
        }
    }
}

/* span_scores16_of for the cache's kind, a constant in each call (the widening inlined). */
static void span_scores16(const float *restrict query, int64_t num_rows, const int64_t *restrict lasts,
                          const paged_kv *kv, const int64_t *restrict table, int64_t first, int64_t last,
                          float *restrict scores, float *restrict dots, float *restrict key_scales,
                          int64_t num_kv_heads, int64_t group, int64_t head_dim, int64_t block_size, float scale) {
#define SCORES_OF(kind) span_scores16_of(query, num_rows, lasts, kv, kind, table, first, last, scores, dots, \
                                         key_scales, num_kv_heads, group, head_dim, block_size, scale)
    WITH_CONSTANT_KIND(kv->kind, SCORES_OF);
#undef SCORES_OF
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
/* t[i] lane j <- t[j] lane i: a 16 x 16 transpose of 32-bit elements (a key's 4-byte groups into a lane per key). */
static inline __attribute__((always_inline)) void transpose16x16(__m512i *t) {
    __m512i a[16];
    for (int i = 0; i < 16; i += 2) {  // 128-bit lane k: t[i]'s and t[i+1]'s elements 4k, 4k+1 (lo), 4k+2, 4k+3 (hi)
        a[i] = _mm512_unpacklo_epi32(t[i], t[i + 1]);
        a[i + 1] = _mm512_unpackhi_epi32(t[i], t[i + 1]);
    }
    for (int g = 0; g < 16; g += 4) {  // 128-bit lane k of t[g + m]: element 4k + m of t[g] .. t[g + 3]
        t[g] = _mm512_unpacklo_epi64(a[g], a[g + 2]);
        t[g + 1] = _mm512_unpackhi_epi64(a[g], a[g + 2]);
        t[g + 2] = _mm512_unpacklo_epi64(a[g + 1], a[g + 3]);
        t[g + 3] = _mm512_unpackhi_epi64(a[g + 1], a[g + 3]);
    }
    for (int m = 0; m < 4; m++) {  // then 128-bit lane k of t[4G + m] into lane G of t[4k + m]
        const __m512i x0 = _mm512_shuffle_i32x4(t[m], t[4 + m], 0x44), x1 = _mm512_shuffle_i32x4(t[m], t[4 + m], 0xEE);
        const __m512i x2 = _mm512_shuffle_i32x4(t[8 + m], t[12 + m], 0x44);
        const __m512i x3 = _mm512_shuffle_i32x4(t[8 + m], t[12 + m], 0xEE);
        t[m] = _mm512_shuffle_i32x4(x0, x2, 0x88), t[4 + m] = _mm512_shuffle_i32x4(x0, x2, 0xDD);
        t[8 + m] = _mm512_shuffle_i32x4(x1, x3, 0x88), t[12 + m] = _mm512_shuffle_i32x4(x1, x3, 0xDD);
    }
}

/* acc[i] lane j += (key j's 64 bytes + 128) . q[i]'s 64 codes, for `nq` (1-4) queries: t[g] lane j holds key j's
 * bytes 4g .. 4g + 3 made unsigned (VNNI multiplies unsigned bytes by signed ones). Two sums per query keep more
 * chains in flight; integer sums, so their order does not matter. */
static inline __attribute__((always_inline)) void vnni_dots(const __m512i *t, const int8_t *const *q, int nq,
                                                            __m512i *acc) {
    __m512i even[4], odd[4];
    for (int i = 0; i < nq; i++) even[i] = acc[i], odd[i] = _mm512_setzero_si512();
    for (int g = 0; g < 16; g += 2)
        for (int i = 0; i < nq; i++) {
            int32_t even_quad, odd_quad;  // q's bytes 4g .. 4g + 3 and 4g + 4 .. 4g + 7
            memcpy(&even_quad, q[i] + 4 * g, sizeof(even_quad));
            memcpy(&odd_quad, q[i] + 4 * g + 4, sizeof(odd_quad));
            even[i] = _mm512_dpbusd_epi32(even[i], t[g], _mm512_set1_epi32(even_quad));
            odd[i] = _mm512_dpbusd_epi32(odd[i], t[g + 1], _mm512_set1_epi32(odd_quad));
        }
    for (int i = 0; i < nq; i++) acc[i] = _mm512_add_epi32(even[i], odd[i]);
}

/* The (row, head) vectors v .. v + nq - 1 of one KV head against the tile's transposed bytes c .. c + 63 (t): their
 * integer sums carried in `sums` [., 16] between pieces, and after the last piece the scores of the `valid` keys
 * into out [nq, len] (query_codes' formula; the 128 that made the keys unsigned taken back as 128 * sum(q)). */
static inline __attribute__((always_inline)) void int8_tile_scores(const query_codes *q8, int64_t v, int nq,
                                                                   const __m512i *t, int64_t c, int64_t head_dim,
                                                                   int32_t *restrict sums, const float *key_scales,
                                                                   float *out, int64_t len, int64_t valid) {
    __m512i acc[4];
    const int8_t *q[4];
    for (int i = 0; i < nq; i++) {
        q[i] = q8->codes + (v + i) * q8->padded + c;
        acc[i] = c == 0 ? _mm512_setzero_si512() : _mm512_loadu_si512(sums + (v + i) * 16);
    }
    switch (nq) {  // a constant count keeps the sums in registers
        case 1: vnni_dots(t, q, 1, acc); break;
        case 2: vnni_dots(t, q, 2, acc); break;
        case 3: vnni_dots(t, q, 3, acc); break;
        default: vnni_dots(t, q, 4, acc);
    }
    if (c + 64 < head_dim) {
        for (int i = 0; i < nq; i++) _mm512_storeu_si512(sums + (v + i) * 16, acc[i]);
        return;
    }
    const __m512 key_scale = _mm512_loadu_ps(key_scales);
    for (int i = 0; i < nq; i++) {
        const __m512i dot = _mm512_sub_epi32(acc[i], _mm512_set1_epi32(128 * q8->sums[v + i]));
        _mm512_mask_storeu_ps(out + i * len, (__mmask16)((1u << valid) - 1),
                              _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot), key_scale),
                                            _mm512_set1_ps(q8->scales[v + i])));
    }
}

/* attend_span's keys pass for int8 keys and query codes, 16 keys at a time: each KV head's 64-byte pieces of the
 * tile's keys transposed so that a key's products sum in a lane of its own (no sums across lanes), then one VNNI
 * instruction per 4 bytes of a query covers all 16 keys; the transpose is shared by every row and head of the KV
 * head. scores [rows, num_heads, len] as span_scores16 leaves them; scratch `sums` [rows * num_heads, 16] (head_dim
 * over 64) and `key_scales` [Hkv, 16]. */
static void int8_span_scores(const query_codes *q8, int64_t num_rows, const int64_t *restrict lasts,
                             const paged_kv *kv, const int64_t *restrict table, int64_t first, int64_t last,
                             float *restrict scores, int32_t *restrict sums, float *restrict key_scales,
                             int64_t num_kv_heads, int64_t group, int64_t head_dim, int64_t block_size) {
    const int64_t num_heads = num_kv_heads * group, token_stride = num_kv_heads * head_dim, len = last - first;
    const void *rows[SCORE_TILE];
    for (int64_t t0 = first; t0 < last; t0 += SCORE_TILE) {
        const int64_t n = last - t0 < SCORE_TILE ? last - t0 : SCORE_TILE;
        tile_rows(kv->key, KV_I8, kv->key_scale, table, t0, n, last, rows, key_scales, num_kv_heads, token_stride,
                  block_size);
        for (int64_t j = n; j < SCORE_TILE; j++) rows[j] = rows[0];  // lanes past the span: computed, never stored
        for (int64_t kv_head = 0; kv_head < num_kv_heads; kv_head++)
            for (int64_t c = 0; c < head_dim; c += 64) {
                const int64_t width = head_dim - c < 64 ? head_dim - c : 64;
                const __mmask64 bytes = width == 64 ? ~0ull : (1ull << width) - 1;  // past head_dim: 0 (q's are 0)
                __m512i t[16];
                for (int j = 0; j < 16; j++) {
                    const int8_t *key = (const int8_t *)rows[j] + kv_head * head_dim + c;
                    t[j] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(bytes, key), _mm512_set1_epi8((char)0x80));
                }
                transpose16x16(t);
                for (int64_t r = 0; r < num_rows; r++) {
                    const int64_t valid = lasts[r] - t0 < n ? lasts[r] - t0 : n;  // row r's keys in the tile
                    if (valid <= 0) continue;
                    for (int64_t g = 0; g < group; g += 4) {  // up to four query heads of the KV head at a time
                        const int64_t v = r * num_heads + kv_head * group + g;
                        int8_tile_scores(q8, v, group - g < 4 ? (int)(group - g) : 4, t, c, head_dim, sums,
                                         key_scales + kv_head * 16, scores + v * len + t0 - first, len, valid);
                    }
                }
            }
    }
}
#endif

/* sums[i * head_dim + 16 c ..] += p[i * len + j] rows[j][column + 16 c ..] over the tile's n tokens in order, for
 * `nq` (1-4) heads of one KV head and `width` (1-4) vectors of each head's sums, held in registers. Each value
 * vector is loaded once for the nq heads. */
static inline __attribute__((always_inline)) void values_fma(const float *p, int64_t len, int nq,
                                                             const void *const *rows, int kind, int64_t column,
                                                             int64_t n, int width, float *sums, int64_t head_dim) {
    __m512 acc[4][4], v[4];
    for (int i = 0; i < nq; i++)
        for (int c = 0; c < width; c++) acc[i][c] = _mm512_loadu_ps(sums + i * head_dim + 16 * c);
    for (int64_t j = 0; j < n; j++) {
        for (int c = 0; c < width; c++) v[c] = widened16(rows[j], kind, column + 16 * c);
        for (int i = 0; i < nq; i++) {
            const __m512 pj = _mm512_set1_ps(p[i * len + j]);
            for (int c = 0; c < width; c++) acc[i][c] = _mm512_fmadd_ps(pj, v[c], acc[i][c]);
        }
    }
    for (int i = 0; i < nq; i++)
        for (int c = 0; c < width; c++) _mm512_storeu_ps(sums + i * head_dim + 16 * c, acc[i][c]);
}

/* attend_span's values pass for head dims that are multiples of 16: partials[r] [num_heads, head_dim] += p v over
 * row r's tokens of the span, 16 tokens at a time with the sums in registers (the loops kept them in memory: every
 * token's multiply-add waited on the last one's store). Per value the same fused multiply-adds in token order as
 * the loops, so the same bits. A tile's rows are read once for every row and head. `value_scales` [Hkv, 16] is
 * scratch. */
static inline __attribute__((always_inline)) void span_values16_of(
    float *restrict scores, int64_t num_rows, const int64_t *restrict lasts, const paged_kv *kv, int kind,
    const int64_t *restrict table, int64_t first, int64_t last, float *const *partials, float *restrict value_scales,
    int64_t num_kv_heads, int64_t group, int64_t head_dim, int64_t block_size) {
    const int int8 = kind == KV_I8;
    const int64_t num_heads = num_kv_heads * group, token_stride = num_kv_heads * head_dim, len = last - first;
    const void *rows[SCORE_TILE];
    for (int64_t t0 = first; t0 < last; t0 += SCORE_TILE) {
        const int64_t n = last - t0 < SCORE_TILE ? last - t0 : SCORE_TILE;
        tile_rows(kv->value, kind, kv->value_scale, table, t0, n, last, rows, value_scales, num_kv_heads, token_stride,
                  block_size);
        for (int64_t r = 0; r < num_rows; r++) {
            const int64_t valid = lasts[r] - t0 < n ? lasts[r] - t0 : n;  // row r's tokens in the tile
            if (valid <= 0) continue;
            float *p = scores + r * num_heads * len + t0 - first;  // the tile's weights, p [num_heads, len]
            if (int8)  // every head's weights scaled before any is read: a read right after its store stalled
                for (int64_t h = 0; h < num_heads; h++)
                    for (int64_t j = 0; j < valid; j++) p[h * len + j] *= value_scales[(h / group) * 16 + j];
            for (int64_t kv_head = 0; kv_head < num_kv_heads; kv_head++)
                for (int64_t g = 0; g < group; g += 4) {  // up to four query heads of the KV head at a time
                    const int64_t h = kv_head * group + g, nq = group - g < 4 ? group - g : 4;
                    for (int64_t d = 0; d < head_dim; d += 64) {
                        const int64_t column = kv_head * head_dim + d;
                        float *sums = partials[r] + h * head_dim + d;
                        if (head_dim - d < 64)  // the tail a head at a time
                            for (int64_t i = 0; i < nq; i++)
                                values_fma(p + (h + i) * len, len, 1, rows, kind, column, valid,
                                           (int)(head_dim - d) / 16, sums + i * head_dim, head_dim);
                        else if (nq == 1)  // constant widths keep the sums in registers (variable ones spilled)
                            values_fma(p + h * len, len, 1, rows, kind, column, valid, 4, sums, head_dim);
                        else if (nq == 2)
                            values_fma(p + h * len, len, 2, rows, kind, column, valid, 4, sums, head_dim);
                        else if (nq == 3)
                            values_fma(p + h * len, len, 3, rows, kind, column, valid, 4, sums, head_dim);
                        else
                            values_fma(p + h * len, len, 4, rows, kind, column, valid, 4, sums, head_dim);
                    }
                }
        }
    }
}

/* span_values16_of for the cache's kind, a constant in each call (the widening inlined). */
static void span_values16(float *restrict scores, int64_t num_rows, const int64_t *restrict lasts,
                          const paged_kv *kv, const int64_t *restrict table, int64_t first, int64_t last,
                          float *const *partials, float *restrict value_scales, int64_t num_kv_heads, int64_t group,
                          int64_t head_dim, int64_t block_size) {
#define VALUES_OF(kind) span_values16_of(scores, num_rows, lasts, kv, kind, table, first, last, partials, \
                                         value_scales, num_kv_heads, group, head_dim, block_size)
    WITH_CONSTANT_KIND(kv->kind, VALUES_OF);
#undef VALUES_OF
}
#endif

/* exp(score - the span's max) per query head of one row (scores [num_heads, stride], the first len of each), the
 * max and the sum into its partial, whose p @ v sums are zeroed. */
static void span_softmax(float *restrict scores, int64_t len, int64_t stride, float *restrict partial,
                         int64_t num_heads, int64_t head_dim) {
    for (int64_t h = 0; h < num_heads; h++) {
        float *s = scores + h * stride;
        float max = s[0];
#pragma omp simd reduction(max : max)
        for (int64_t t = 0; t < len; t++) max = s[t] > max ? s[t] : max;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < len; t++) {
            s[t] = exp_nonpositive(s[t] - max);
            sum += s[t];
        }
        partial[num_heads * head_dim + h] = max;
        partial[num_heads * (head_dim + 1) + h] = sum;
    }
    memset(partial, 0, sizeof(float) * num_heads * head_dim);
}

/* One row's scores [num_heads, stride] (the first last - first of each) over int8 keys [first, last), from its
 * query codes q8: plain loops. */
static void int8_row_scores(const query_codes *q8, const paged_kv *kv, const int64_t *restrict table, int64_t first,
                            int64_t last, float *restrict scores, int64_t stride, int64_t num_kv_heads, int64_t group,
                            int64_t head_dim, int64_t block_size) {
    const int64_t num_heads = num_kv_heads * group, token_stride = num_kv_heads * head_dim;
    for (int64_t t = first; t < last; t++) {
        const int64_t token = table[t / block_size] * block_size + t % block_size;
        for (int64_t h = 0; h < num_heads; h++) {
            const int64_t kv_head = h / group;
            scores[h * stride + t - first] =
                int8_score(q8->codes + h * q8->padded, (const int8_t *)kv->key + token * token_stride +
                           kv_head * head_dim, head_dim, kv->key_scale[token * num_kv_heads + kv_head], q8->scales[h]);
        }
    }
}

/* One row's scores [num_heads, last - first] over keys [first, last): plain loops, a token row at a time. */
static void float_row_scores(const float *restrict query, const paged_kv *kv, const int64_t *restrict table,
                             int64_t first, int64_t last, float *restrict scores, float *restrict converted,
                             int64_t num_kv_heads, int64_t group, int64_t head_dim, int64_t block_size, float scale) {
    const int int8 = kv->kind == KV_I8;
    const int64_t num_heads = num_kv_heads * group, token_stride = num_kv_heads * head_dim, len = last - first;
    for (int64_t t = first, b = first / block_size, i = first % block_size; t < last; t++) {  // block b, row i
        const int64_t token = table[b] * block_size + i;
        if (t + block_size < last) prefetch_row(kv->key, kv->kind, table[b + 1] * block_size + i, token_stride);
        const float *row = cache_row(kv, 0, table, b, i, num_kv_heads, head_dim, block_size, converted);
        for (int64_t h = 0; h < num_heads; h++) {
            const int64_t kv_head = h / group;
            const float *k = row + kv_head * head_dim, *q = query + h * head_dim;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < head_dim; d++) dot += q[d] * k[d];
            if (int8) dot *= kv->key_scale[token * num_kv_heads + kv_head];
            scores[h * len + t - first] = dot * scale;
        }
        if (++i == block_size) i = 0, b++;
    }
}

/* One row over tokens [first, last) without the AVX-512 passes: plain loops, a token row at a time. `q8`: the row's
 * query codes, or NULL for float queries. */
static void attend_span_loops(const float *restrict query, const query_codes *q8, const paged_kv *kv,
                              const int64_t *restrict table, int64_t first, int64_t last, float *restrict partial,
                              float *restrict scores, float *restrict converted, int64_t num_kv_heads, int64_t group,
                              int64_t head_dim, int64_t block_size, float scale) {
    const int int8 = kv->kind == KV_I8;
    const int64_t num_heads = num_kv_heads * group, token_stride = num_kv_heads * head_dim, len = last - first;
    /* scores [num_heads, len] = q . k * scale: one pass over the keys */
    if (q8)
        int8_row_scores(q8, kv, table, first, last, scores, len, num_kv_heads, group, head_dim, block_size);
    else
        float_row_scores(query, kv, table, first, last, scores, converted, num_kv_heads, group, head_dim, block_size,
                         scale);
    span_softmax(scores, len, len, partial, num_heads, head_dim);
    /* p @ v per head, unnormalized: one pass over the values */
    for (int64_t t = first, b = first / block_size, i = first % block_size; t < last; t++) {
        const int64_t token = table[b] * block_size + i;
        if (t + block_size < last) prefetch_row(kv->value, kv->kind, table[b + 1] * block_size + i, token_stride);
        const float *row = cache_row(kv, 1, table, b, i, num_kv_heads, head_dim, block_size, converted);
        for (int64_t h = 0; h < num_heads; h++) {
            const int64_t kv_head = h / group;
            const float *v = row + kv_head * head_dim;
            float p = scores[h * len + t - first], *o = partial + h * head_dim;
            if (int8) p *= kv->value_scale[token * num_kv_heads + kv_head];
#pragma omp simd
            for (int64_t d = 0; d < head_dim; d++) o[d] += p * v[d];
        }
        if (++i == block_size) i = 0, b++;
    }
}

/* Rows that share one block table over tokens [first, last), every head: a sequence's decode, or the single-token
 * rows of a request verifying drafts (runner/attention_inputs.py), which then read each key and value row once for
 * all of them. Row r (query [num_rows, num_heads, head_dim]) attends up to its own lasts[r]; one that ends before
 * `first` has no partial here (NULL). Keys and values are read token row by token row: all KV heads of a token
 * are contiguous, so a block is one sequential stream (per-head tasks striding over the rows ran 2.4-4.3x slower
 * from a cold cache). Scratch: scores [num_rows, num_heads, SPAN_TOKENS], `converted` [Hkv * D] (the loops' row
 * of another dtype as floats), `dots` [num_heads * 256 + Hkv * 16] (the AVX-512 passes' tiles and scales; the
 * int8-query pass's integer sums in the tiles' place). `q8`: the rows' query codes, or NULL for float queries. */
static void attend_span(const float *restrict query, const query_codes *q8, int64_t num_rows,
                        const int64_t *restrict lasts, const paged_kv *kv, const int64_t *restrict table, int64_t first,
                        int64_t last, float *const *partials, float *restrict scores, float *restrict converted,
                        float *restrict dots, int64_t num_kv_heads, int64_t group, int64_t head_dim,
                        int64_t block_size, float scale) {
    const int64_t num_heads = num_kv_heads * group, len = last - first;
#ifdef __AVX512F__
    if (head_dim % 16 == 0 && kv->kind != KV_I4) {
        float *key_scales = dots + num_heads * 256;
        if (q8 == NULL)
            span_scores16(query, num_rows, lasts, kv, table, first, last, scores, dots, key_scales, num_kv_heads,
                          group, head_dim, block_size, scale);
        else
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
            int8_span_scores(q8, num_rows, lasts, kv, table, first, last, scores, (int32_t *)dots, key_scales,
                             num_kv_heads, group, head_dim, block_size);
#else
            for (int64_t r = 0; r < num_rows; r++) {
                const query_codes row = rows_from(q8, r, num_heads);
                if (lasts[r] > first)
                    int8_row_scores(&row, kv, table, first, lasts[r] < last ? lasts[r] : last,
                                    scores + r * num_heads * len, len, num_kv_heads, group, head_dim, block_size);
            }
#endif
        for (int64_t r = 0; r < num_rows; r++)
            if (lasts[r] > first)
                span_softmax(scores + r * num_heads * len, (lasts[r] < last ? lasts[r] : last) - first, len,
                             partials[r], num_heads, head_dim);
        span_values16(scores, num_rows, lasts, kv, table, first, last, partials, key_scales, num_kv_heads, group,
                      head_dim, block_size);
        return;
    }
#endif
    for (int64_t r = 0; r < num_rows; r++) {
        const query_codes row = q8 ? rows_from(q8, r, num_heads) : (query_codes){0};
        if (lasts[r] > first)
            attend_span_loops(query + r * num_heads * head_dim, q8 ? &row : NULL, kv, table, first,
                              lasts[r] < last ? lasts[r] : last, partials[r], scores, converted, num_kv_heads, group,
                              head_dim, block_size, scale);
    }
}

/* out [num_heads, head_dim] from a sequence's `count` spans' partials: each span's sums rescaled to the largest
 * max, in span order. */
static void merge_spans(const float *restrict partials, int64_t count, float *restrict out, int64_t num_heads,
                        int64_t head_dim) {
    const int64_t stride = partial_floats(num_heads, head_dim), maxes = num_heads * head_dim, sums = maxes + num_heads;
    for (int64_t h = 0; h < num_heads; h++) {
        float max = partials[maxes + h];
        for (int64_t c = 1; c < count; c++)
            max = partials[c * stride + maxes + h] > max ? partials[c * stride + maxes + h] : max;
        float *o = out + h * head_dim, sum = 0.0f;
        memset(o, 0, sizeof(float) * head_dim);
        for (int64_t c = 0; c < count; c++) {
            const float *span = partials + c * stride, weight = exp_nonpositive(span[maxes + h] - max);
            sum += weight * span[sums + h];
#pragma omp simd
            for (int64_t d = 0; d < head_dim; d++) o[d] += weight * span[h * head_dim + d];
        }
        const float inv = 1.0f / sum;
#pragma omp simd
        for (int64_t d = 0; d < head_dim; d++) o[d] *= inv;
    }
}

/* Consecutive rows with the same block table and first key are attended together (attend_span), at most this
 * many: a verify step's drafts plus one. */
#define MAX_SHARED_ROWS 8

/* How many rows from `seq` on share its block table, first key and int4 tail (1 .. MAX_SHARED_ROWS). */
static int64_t shared_rows(const int64_t *tables, const int64_t *starts, const int64_t *tail_columns, int64_t seq,
                           int64_t num_seqs, int64_t max_blocks) {
    int64_t count = 1;
    while (count < MAX_SHARED_ROWS && seq + count < num_seqs &&
           (starts == NULL || starts[seq + count] == starts[seq]) &&
           (tail_columns == NULL || tail_columns[seq + count] == tail_columns[seq]) &&
           memcmp(tables + (seq + count) * max_blocks, tables + seq * max_blocks, sizeof(int64_t) * max_blocks) == 0)
        count++;
    return count;
}

/* Every sequence's decode over one layer's cache (its elements as kv->kind says). Returns 0, or -1 if a
 * buffer could not be allocated. */
static int paged_decode(const float *query, const paged_kv *kv, const int64_t *tables, const int64_t *seq_lens,
                        const int64_t *starts, float *out, int64_t num_seqs, int64_t num_kv_heads, int64_t group,
                        int64_t head_dim, int64_t block_size, int64_t max_blocks, float scale) {
    const int64_t num_heads = num_kv_heads * group, span = SPAN_TOKENS;
    if (num_seqs == 0) return 0;
    // first_span [num_seqs + 1]: sequence s owns spans first_span[s] .. first_span[s + 1] - 1; a task is span
    // task_span[t] of the task_rows[t] rows from task_seq[t] (as many tasks as spans at most)
    int64_t *first_span = malloc(sizeof(int64_t) * (size_t)(num_seqs + 1));
    if (first_span == NULL) return -1;
    first_span[0] = 0;
    for (int64_t seq = 0; seq < num_seqs; seq++)
        first_span[seq + 1] = first_span[seq] + (seq_lens[seq] - (starts ? starts[seq] : 0) + span - 1) / span;
    const int64_t num_spans = first_span[num_seqs];
    int64_t *task_seq = malloc(sizeof(int64_t) * (size_t)num_spans * 3), *task_rows = task_seq + num_spans,
            *task_span = task_rows + num_spans;
    const int64_t stride = partial_floats(num_heads, head_dim);
    float *partials = aligned_alloc(64, sizeof(float) * (size_t)(num_spans * stride));
    // int8 queries: every row's codes [num_seqs * Hq, padded], then their sums and scales [num_seqs * Hq] each
    const int int8_queries = kv->kind == KV_I8 && kv->int8_queries;
    query_codes q8 = {NULL, NULL, NULL, (head_dim + 63) / 64 * 64};
    const int64_t vectors = num_seqs * num_heads;
    if (int8_queries && (q8.codes = malloc((size_t)(vectors * (q8.padded + 8)))) != NULL) {
        q8.sums = (int32_t *)(q8.codes + vectors * q8.padded), q8.scales = (float *)(q8.sums + vectors);
        quantize_queries(query, vectors, head_dim, scale, &q8);
    }
    if (task_seq == NULL || partials == NULL || (int8_queries && q8.codes == NULL)) {
        free(first_span), free(task_seq), free(partials), free(q8.codes);
        return -1;
    }
    int64_t num_tasks = 0;
    for (int64_t seq = 0, rows; seq < num_seqs; seq += rows) {
        rows = shared_rows(tables, starts, kv->kind == KV_I4 ? kv->int4.tail_columns : NULL, seq, num_seqs,
                           max_blocks);
        int64_t most = 0;  // the rows' largest span count
        for (int64_t r = 0; r < rows; r++)
            most = first_span[seq + r + 1] - first_span[seq + r] > most ? first_span[seq + r + 1] - first_span[seq + r]
                                                                      : most;
        for (int64_t c = 0; c < most; c++, num_tasks++)
            task_seq[num_tasks] = seq, task_rows[num_tasks] = rows, task_span[num_tasks] = c;
    }
    int failed = 0;
#pragma omp parallel
    {
        // scores [MAX_SHARED_ROWS, Hq, SPAN_TOKENS], a converted row [Hkv * D], then span_scores16's dots
        // [Hq, 16, 16] and key scales [Hkv, 16]
        const int64_t score_floats = MAX_SHARED_ROWS * num_heads * span;
        float *scores = malloc(sizeof(float) * (size_t)(score_floats + num_kv_heads * head_dim +
                                                        num_heads * 256 + num_kv_heads * 16));
        if (scores == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < num_tasks; task++) {
            if (scores == NULL) continue;
            const int64_t seq = task_seq[task], rows = task_rows[task], c = task_span[task];
            const int64_t first = (starts ? starts[seq] : 0) + c * span;
            int64_t last = first;  // the end of the span for the longest row
            float *row_partials[MAX_SHARED_ROWS];
            for (int64_t r = 0; r < rows; r++) {
                const int64_t end = first + span < seq_lens[seq + r] ? first + span : seq_lens[seq + r];
                last = end > last ? end : last;
                row_partials[r] = end > first ? partials + (first_span[seq + r] + c) * stride : NULL;
            }
            const query_codes task_q8 = int8_queries ? rows_from(&q8, seq, num_heads) : (query_codes){0};
            paged_kv task_kv = *kv;  // int4: the tails from this task's sequence on
            if (kv->kind == KV_I4) task_kv.int4.tail_columns += seq, task_kv.int4.tail_slots += seq;
            attend_span(query + seq * num_heads * head_dim, int8_queries ? &task_q8 : NULL, rows, seq_lens + seq,
                        &task_kv, tables + seq * max_blocks, first, last, row_partials, scores, scores + score_floats,
                        scores + score_floats + num_kv_heads * head_dim, num_kv_heads, group, head_dim, block_size,
                        scale);
        }
        free(scores);
#pragma omp for schedule(static)
        for (int64_t seq = 0; seq < num_seqs; seq++)
            if (!failed)
                merge_spans(partials + first_span[seq] * stride,
                            first_span[seq + 1] - first_span[seq], out + seq * num_heads * head_dim, num_heads,
                            head_dim);
    }
    free(first_span), free(task_seq), free(partials), free(q8.codes);
    return failed ? -1 : 0;
}

/* The exported entry: a cache of `kind` (enum kv_kind; key_scale and value_scale only for KV_I8, else NULL), with
 * `int8_queries` (KV_I8 only) the queries rounded to 8 bits for Q.K. */
int paged_decode_kv(const float *query, const void *key, const void *value, const float *key_scale,
                    const float *value_scale, int64_t kind, int64_t int8_queries, const int64_t *tables,
                    const int64_t *seq_lens, const int64_t *starts, float *out, int64_t num_seqs, int64_t num_kv_heads,
                    int64_t group, int64_t head_dim, int64_t block_size, int64_t max_blocks, float scale) {
    const paged_kv kv = {key, value, key_scale, value_scale, (int)kind, (int)int8_queries, {0}};
    return paged_decode(query, &kv, tables, seq_lens, starts, out, num_seqs, num_kv_heads, group, head_dim,
                        block_size, max_blocks, scale);
}

/* The exported entry for an int4 cache: packed codes key, value [num_blocks, block_size, Hkv, D / 2] with int4_cache's
 * parameters and residual (elements of `residual_kind`), and each sequence's tail column (-1: none) and slot. */
int paged_decode_int4(const float *query, const void *key, const void *value, const _Float16 *key_scale,
                      const _Float16 *key_zero, const _Float16 *value_scale, const _Float16 *value_zero,
                      const void *residual_key, const void *residual_value, int64_t residual_kind,
                      const int64_t *tail_columns, const int64_t *tail_slots, const int64_t *tables,
                      const int64_t *seq_lens, float *out, int64_t num_seqs, int64_t num_kv_heads, int64_t group,
                      int64_t head_dim, int64_t block_size, int64_t max_blocks, float scale) {
    const paged_kv kv = {key, value, NULL, NULL, KV_I4, 0, {key_scale, key_zero, value_scale, value_zero, residual_key,
                                                             residual_value, (int)residual_kind, tail_columns,
                                                             tail_slots}};
    return paged_decode(query, &kv, tables, seq_lens, NULL, out, num_seqs, num_kv_heads, group, head_dim, block_size,
                        max_blocks, scale);
}
