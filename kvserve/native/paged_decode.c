/* Paged decode attention for float32, float16, bfloat16 and int8 CPU caches: one query token per sequence, read in
 * place.
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
 * int8 codes are a quarter of float32's bytes: a smaller cache, not a faster step. The per-(token, head) dot
 * products bound this kernel, not the bytes (float32 from a cold and a warm cache measured the same). With AVX-512,
 * 16 tokens at a time: their products' sums across lanes together (span_scores16), and p v with each head's sums
 * in registers (span_values16); a batch-1 decode over 600 int8 tokens, 30 layers: 1.6-1.75 -> 1.05 ms.
 */
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
enum kv_kind { KV_F32 = 0, KV_I8 = 1, KV_F16 = 2, KV_BF16 = 3 };

static inline int64_t element_bytes(int kind) { return kind == KV_F32 ? 4 : kind == KV_I8 ? 1 : 2; }

typedef struct {  // one layer's paged cache; key_scale / value_scale only for KV_I8 (else NULL)
    const void *key, *value;
    const float *key_scale, *value_scale;
    int kind;  // enum kv_kind
} paged_kv;

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

/* Asks for token `token`'s row of the next block while this one is read: block ids are scattered, so the
 * hardware prefetcher cannot guess them (~10% of a cold decode step). */
static inline void prefetch_row(const void *cache, int kind, int64_t token, int64_t token_stride) {
    const int64_t row_bytes = token_stride * element_bytes(kind);
    const char *row = (const char *)cache + token * row_bytes;
    for (int64_t offset = 0; offset < row_bytes; offset += 64) __builtin_prefetch(row + offset);
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

/* Tokens t0 .. t0 + n - 1's rows of one cache (keys or values) as floats: float32 in place, others converted into
 * converted[j] [Hkv * D], int8's scales into scales [Hkv, 16]; the next block's row prefetched as attend_span
 * does. */
static inline void tile_rows(const void *cache, int kind, const float *cache_scales, const int64_t *restrict table,
                             int64_t t0, int64_t n, int64_t last, const float **rows, float *restrict scales,
                             float *restrict converted, int64_t num_kv_heads, int64_t token_stride,
                             int64_t block_size) {
    for (int64_t j = 0; j < n; j++) {
        const int64_t t = t0 + j, b = t / block_size, i = t % block_size, token = table[b] * block_size + i;
        if (t + block_size < last) prefetch_row(cache, kind, table[b + 1] * block_size + i, token_stride);
        rows[j] = float_row(cache, kind, token, token_stride, converted + j * token_stride);
        if (kind == KV_I8)
            for (int64_t kv_head = 0; kv_head < num_kv_heads; kv_head++)
                scales[kv_head * 16 + j] = cache_scales[token * num_kv_heads + kv_head];
    }
}

/* out[j] [16] = the 16 partial sums of q . keys[j][column ..] for `count` (1 or 4) tokens: a product of the first 16
 * values, then fused multiply-adds in order, the same operations whatever `count`. */
static inline __attribute__((always_inline)) void dot_vectors(const float *q, const float *const *keys,
                                                              int64_t column, int64_t head_dim, int count,
                                                              float *out) {
    __m512 acc[4];
    const __m512 q0 = _mm512_loadu_ps(q);
    for (int j = 0; j < count; j++) acc[j] = _mm512_mul_ps(q0, _mm512_loadu_ps(keys[j] + column));
    for (int64_t d = 16; d < head_dim; d += 16) {
        const __m512 qd = _mm512_loadu_ps(q + d);
        for (int j = 0; j < count; j++) acc[j] = _mm512_fmadd_ps(qd, _mm512_loadu_ps(keys[j] + column + d), acc[j]);
    }
    for (int j = 0; j < count; j++) _mm512_storeu_ps(out + 16 * j, acc[j]);
}

/* attend_span's keys pass for head dims that are multiples of 16: scores [num_heads, len] = q . k (* key scale)
 * * scale. Each (token, head) product stays 16 partial sums until a tile of 16 tokens is summed across lanes at
 * once (lane_sums16): the per-product reductions were 60% of a batch-1 decode's attention. `dots` [num_heads,
 * 16, 16] and `key_scales` [num_kv_heads, 16] are scratch. */
static void span_scores16(const float *restrict query, const paged_kv *kv, const int64_t *restrict table,
                          int64_t first, int64_t last, float *restrict scores, float *restrict dots,
                          float *restrict key_scales, float *restrict converted, int64_t num_kv_heads, int64_t group,
                          int64_t head_dim, int64_t block_size, float scale) {
    const int int8 = kv->kind == KV_I8;
    const int64_t num_heads = num_kv_heads * group, token_stride = num_kv_heads * head_dim, len = last - first;
    const float *rows[SCORE_TILE];
    for (int64_t t0 = first; t0 < last; t0 += SCORE_TILE) {
        const int64_t n = last - t0 < SCORE_TILE ? last - t0 : SCORE_TILE;
        tile_rows(kv->key, kv->kind, kv->key_scale, table, t0, n, last, rows, key_scales, converted, num_kv_heads,
                  token_stride, block_size);
        for (int64_t h = 0; h < num_heads; h++) {
            const float *q = query + h * head_dim;
            const int64_t column = (h / group) * head_dim;
            float *tile = dots + h * 256;
            int64_t j = 0;
            for (; j + 4 <= n; j += 4)  // four tokens' chains interleaved (one alone waits on its FMAs' latency)
                dot_vectors(q, rows + j, column, head_dim, 4, tile + j * 16);
            for (; j < n; j++) dot_vectors(q, rows + j, column, head_dim, 1, tile + j * 16);
            for (; j < SCORE_TILE; j++) _mm512_storeu_ps(tile + j * 16, _mm512_setzero_ps());  // past the span
            __m512 sums = lane_sums16(tile);
            if (int8) sums = _mm512_mul_ps(sums, _mm512_loadu_ps(key_scales + (h / group) * 16));
            _mm512_mask_storeu_ps(scores + h * len + t0 - first, (__mmask16)((1u << n) - 1),
                                  _mm512_mul_ps(sums, _mm512_set1_ps(scale)));
        }
    }
}

/* sums[16 c ..] += p[j] rows[j][column + 16 c ..] over the tile's n tokens in order, for `width` (1-4) vectors of
 * sums held in registers. */
static inline __attribute__((always_inline)) void values_fma(const float *p, const float *const *rows, int64_t column,
                                                             int64_t n, int width, float *sums) {
    __m512 acc[4];
    for (int c = 0; c < width; c++) acc[c] = _mm512_loadu_ps(sums + 16 * c);
    for (int64_t j = 0; j < n; j++) {
        const __m512 pj = _mm512_set1_ps(p[j]);
        for (int c = 0; c < width; c++)
            acc[c] = _mm512_fmadd_ps(pj, _mm512_loadu_ps(rows[j] + column + 16 * c), acc[c]);
    }
    for (int c = 0; c < width; c++) _mm512_storeu_ps(sums + 16 * c, acc[c]);
}

/* attend_span's values pass for head dims that are multiples of 16: partial [num_heads, head_dim] += p v over the
 * span, 16 tokens at a time with each head's sums in registers (the loops kept them in memory: every token's
 * multiply-add waited on the last one's store). Per value the same fused multiply-adds in token order as the loops,
 * so the same bits. `converted` [16, Hkv * D] and `value_scales` [Hkv, 16] are scratch. */
static void span_values16(float *restrict scores, const paged_kv *kv, const int64_t *restrict table,
                          int64_t first, int64_t last, float *restrict partial, float *restrict value_scales,
                          float *restrict converted, int64_t num_kv_heads, int64_t group, int64_t head_dim,
                          int64_t block_size) {
    const int int8 = kv->kind == KV_I8;
    const int64_t num_heads = num_kv_heads * group, token_stride = num_kv_heads * head_dim, len = last - first;
    const float *rows[SCORE_TILE];
    for (int64_t t0 = first; t0 < last; t0 += SCORE_TILE) {
        const int64_t n = last - t0 < SCORE_TILE ? last - t0 : SCORE_TILE;
        tile_rows(kv->value, kv->kind, kv->value_scale, table, t0, n, last, rows, value_scales, converted, num_kv_heads,
                  token_stride, block_size);
        float *p = scores + t0 - first;  // the tile's weights, p [num_heads, len]
        if (int8)  // every head's weights scaled before any is read: a read right after its store stalled
            for (int64_t h = 0; h < num_heads; h++)
                for (int64_t j = 0; j < n; j++) p[h * len + j] *= value_scales[(h / group) * 16 + j];
        for (int64_t h = 0; h < num_heads; h++) {
            const int64_t column = (h / group) * head_dim;
            for (int64_t d = 0; d < head_dim; d += 64) {  // four vectors of sums at a time: four chains in flight
                float *sums = partial + h * head_dim + d;
                if (head_dim - d >= 64)  // a constant width keeps the sums in registers (a variable one spilled them)
                    values_fma(p + h * len, rows, column + d, n, 4, sums);
                else
                    values_fma(p + h * len, rows, column + d, n, (int)(head_dim - d) / 16, sums);
            }
        }
    }
}
#endif

/* Tokens [first, last) of one sequence, every head. Keys and values are read token row by token row: all KV
 * heads of a token are contiguous, so a block is one sequential stream (per-head tasks striding over the rows
 * ran 2.4-4.3x slower from a cold cache). Scratch: scores [num_heads, SPAN_TOKENS], `converted` [16, Hkv * D]
 * (int8 rows as floats), `dots` [num_heads * 256 + Hkv * 16] (the AVX-512 passes' tiles and scales). */
static void attend_span(const float *restrict query, const paged_kv *kv, const int64_t *restrict table,
                        int64_t first, int64_t last, float *restrict partial, float *restrict scores,
                        float *restrict converted, float *restrict dots, int64_t num_kv_heads, int64_t group,
                        int64_t head_dim, int64_t block_size, float scale) {
    const int int8 = kv->kind == KV_I8;
    const int64_t num_heads = num_kv_heads * group, token_stride = num_kv_heads * head_dim, len = last - first;
    /* scores [num_heads, len] = q . k * scale: one pass over the keys */
#ifdef __AVX512F__
    if (head_dim % 16 == 0)
        span_scores16(query, kv, table, first, last, scores, dots, dots + num_heads * 256, converted, num_kv_heads,
                      group, head_dim, block_size, scale);
    else
#endif
    for (int64_t t = first, b = first / block_size, i = first % block_size; t < last; t++) {  // block b, row i
        const int64_t token = table[b] * block_size + i;
        if (t + block_size < last) prefetch_row(kv->key, kv->kind, table[b + 1] * block_size + i, token_stride);
        const float *row = float_row(kv->key, kv->kind, token, token_stride, converted);
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
    /* exp(score - the span's max) per query head, and their sum */
    for (int64_t h = 0; h < num_heads; h++) {
        float *s = scores + h * len;
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
    /* p @ v per head, unnormalized: one pass over the values */
#ifdef __AVX512F__
    if (head_dim % 16 == 0) {
        span_values16(scores, kv, table, first, last, partial, dots + num_heads * 256, converted, num_kv_heads, group,
                      head_dim, block_size);
        return;
    }
#endif
    for (int64_t t = first, b = first / block_size, i = first % block_size; t < last; t++) {
        const int64_t token = table[b] * block_size + i;
        if (t + block_size < last) prefetch_row(kv->value, kv->kind, table[b + 1] * block_size + i, token_stride);
        const float *row = float_row(kv->value, kv->kind, token, token_stride, converted);
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

/* Every sequence's decode over one layer's cache (its elements as kv->kind says). Returns 0, or -1 if a
 * buffer could not be allocated. */
static int paged_decode(const float *query, const paged_kv *kv, const int64_t *tables, const int64_t *seq_lens,
                        const int64_t *starts, float *out, int64_t num_seqs, int64_t num_kv_heads, int64_t group,
                        int64_t head_dim, int64_t block_size, int64_t max_blocks, float scale) {
    const int64_t num_heads = num_kv_heads * group, span = SPAN_TOKENS;
    if (num_seqs == 0) return 0;
    // first_span [num_seqs + 1]: sequence s owns spans first_span[s] .. first_span[s + 1] - 1
    int64_t *first_span = malloc(sizeof(int64_t) * (size_t)(num_seqs + 1));
    if (first_span == NULL) return -1;
    first_span[0] = 0;
    for (int64_t seq = 0; seq < num_seqs; seq++)
        first_span[seq + 1] = first_span[seq] + (seq_lens[seq] - (starts ? starts[seq] : 0) + span - 1) / span;
    const int64_t num_spans = first_span[num_seqs];
    int64_t *span_seq = malloc(sizeof(int64_t) * (size_t)num_spans);
    const int64_t stride = partial_floats(num_heads, head_dim);
    float *partials = aligned_alloc(64, sizeof(float) * (size_t)(num_spans * stride));
    if (span_seq == NULL || partials == NULL) {
        free(first_span), free(span_seq), free(partials);
        return -1;
    }
    for (int64_t seq = 0; seq < num_seqs; seq++)
        for (int64_t c = first_span[seq]; c < first_span[seq + 1]; c++) span_seq[c] = seq;
    int failed = 0;
#pragma omp parallel
    {
        // scores [Hq, SPAN_TOKENS], converted rows [16, Hkv * D], then span_scores16's dots [Hq, 16, 16] and
        // key scales [Hkv, 16]
        float *scores = malloc(sizeof(float) * (size_t)(num_heads * span + 16 * num_kv_heads * head_dim +
                                                        num_heads * 256 + num_kv_heads * 16));
        if (scores == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t c = 0; c < num_spans; c++) {
            if (scores == NULL) continue;
            const int64_t seq = span_seq[c], first = (starts ? starts[seq] : 0) + (c - first_span[seq]) * span;
            const int64_t last = first + span < seq_lens[seq] ? first + span : seq_lens[seq];
            attend_span(query + seq * num_heads * head_dim, kv, tables + seq * max_blocks, first, last,
                        partials + c * stride, scores, scores + num_heads * span,
                        scores + num_heads * span + 16 * num_kv_heads * head_dim, num_kv_heads, group, head_dim,
                        block_size, scale);
        }
        free(scores);
#pragma omp for schedule(static)
        for (int64_t seq = 0; seq < num_seqs; seq++)
            if (!failed)
                merge_spans(partials + first_span[seq] * stride,
                            first_span[seq + 1] - first_span[seq], out + seq * num_heads * head_dim, num_heads,
                            head_dim);
    }
    free(first_span), free(span_seq), free(partials);
    return failed ? -1 : 0;
}

/* The exported entry: a cache of `kind` (enum kv_kind; key_scale and value_scale only for KV_I8, else NULL). */
int paged_decode_kv(const float *query, const void *key, const void *value, const float *key_scale,
                    const float *value_scale, int64_t kind, const int64_t *tables, const int64_t *seq_lens,
                    const int64_t *starts, float *out, int64_t num_seqs, int64_t num_kv_heads, int64_t group,
                    int64_t head_dim, int64_t block_size, int64_t max_blocks, float scale) {
    const paged_kv kv = {key, value, key_scale, value_scale, (int)kind};
    return paged_decode(query, &kv, tables, seq_lens, starts, out, num_seqs, num_kv_heads, group, head_dim,
                        block_size, max_blocks, scale);
}
