/* Paged decode attention for float32 and int8 CPU caches: one query token per sequence, read in place.
 *
 * The pure-torch path copies every sequence's blocks into a padded [B, L, Hkv, D] tensor before SDPA
 * reads them again; here each sequence's task walks its block table and reads each key and value row
 * once, up to its own length. The threads share the sequences. Used by attention/cpu_native.py.
 *
 * query, out  [num_seqs, num_kv_heads * group, head_dim]   (query head h * group + g uses KV head h)
 * key, value  [num_blocks, block_size, num_kv_heads, head_dim] float32, or int8 codes with
 * key_scale, value_scale [num_blocks, block_size, num_kv_heads] float32 (kv_cache_dtype int8: x = code * scale,
 *             applied as torch_ref does: q . k = (q . codes) * key_scale, p v = (p * value_scale) codes)
 * tables      [num_seqs, max_blocks] block ids;  seq_lens [num_seqs] tokens to attend (>= 1)
 *
 * int8 codes are a quarter of float32's bytes: a smaller cache, not a faster step. On 2 AVX2 cores the per-(token,
 * head) dot products bound this kernel, not the bytes (float32 from a cold and a warm cache measured the same).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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

typedef struct {  // one layer's paged cache; scales NULL: float32 rows, else int8 codes
    const void *key, *value;
    const float *key_scale, *value_scale;
} paged_kv;

/* A cache row [Hkv * D] as floats: in place for float32; int8 codes are converted into `converted` (their scales
 * are applied by the caller, as torch_ref does). */
static inline const float *float_row(const void *cache, int int8, int64_t token, int64_t token_stride,
                                     float *restrict converted) {
    if (!int8) return (const float *)cache + token * token_stride;
    const int8_t *codes = (const int8_t *)cache + token * token_stride;
#pragma omp simd
    for (int64_t e = 0; e < token_stride; e++) converted[e] = (float)codes[e];
    return converted;
}

/* Asks for token `token`'s row of the next block while this one is read: block ids are scattered, so the
 * hardware prefetcher cannot guess them (~10% of a cold decode step). */
static inline void prefetch_row(const void *cache, int int8, int64_t token, int64_t token_stride) {
    const int64_t row_bytes = token_stride * (int8 ? 1 : (int64_t)sizeof(float));
    const char *row = (const char *)cache + token * row_bytes;
    for (int64_t offset = 0; offset < row_bytes; offset += 64) __builtin_prefetch(row + offset);
}

/* One sequence, every head. Keys and values are read token row by token row: all KV heads of a token are
 * contiguous, so a block is one sequential stream (per-head tasks striding over the rows ran 2.4-4.3x slower
 * from a cold cache). `converted` [Hkv * D] is int8's scratch. (Tiles of 2-4 tokens with a dot product in
 * flight per token measured no faster.) */
static void attend_sequence(const float *restrict query, const paged_kv *kv, const int64_t *restrict table,
                            int64_t seq_len, float *restrict out, float *restrict scores, float *restrict converted,
                            int64_t num_kv_heads, int64_t group, int64_t head_dim, int64_t block_size, float scale) {
    const int int8 = kv->key_scale != NULL;
    const int64_t num_heads = num_kv_heads * group, token_stride = num_kv_heads * head_dim;
    /* scores [num_heads, seq_len] = q . k * scale: one pass over the keys, block by block */
    for (int64_t start = 0, b = 0; start < seq_len; start += block_size, b++) {
        const int64_t count = seq_len - start < block_size ? seq_len - start : block_size;
        for (int64_t i = 0; i < count; i++) {
            const int64_t token = table[b] * block_size + i;
            if (start + block_size < seq_len)
                prefetch_row(kv->key, int8, table[b + 1] * block_size + i, token_stride);
            const float *row = float_row(kv->key, int8, token, token_stride, converted);
            for (int64_t h = 0; h < num_heads; h++) {
                const int64_t kv_head = h / group;
                const float *k = row + kv_head * head_dim, *q = query + h * head_dim;
                float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                for (int64_t d = 0; d < head_dim; d++) dot += q[d] * k[d];
                if (int8) dot *= kv->key_scale[token * num_kv_heads + kv_head];
                scores[h * seq_len + start + i] = dot * scale;
            }
        }
    }
    /* softmax per query head */
    for (int64_t h = 0; h < num_heads; h++) {
        float *s = scores + h * seq_len;
        float max = s[0];
#pragma omp simd reduction(max : max)
        for (int64_t t = 0; t < seq_len; t++) max = s[t] > max ? s[t] : max;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < seq_len; t++) {
            s[t] = exp_nonpositive(s[t] - max);
            sum += s[t];
        }
        const float inv = 1.0f / sum;
#pragma omp simd
        for (int64_t t = 0; t < seq_len; t++) s[t] *= inv;
    }
    /* out [num_heads, head_dim] = p @ v: one pass over the values */
    memset(out, 0, sizeof(float) * num_heads * head_dim);
    for (int64_t start = 0, b = 0; start < seq_len; start += block_size, b++) {
        const int64_t count = seq_len - start < block_size ? seq_len - start : block_size;
        for (int64_t i = 0; i < count; i++) {
            const int64_t token = table[b] * block_size + i;
            if (start + block_size < seq_len)
                prefetch_row(kv->value, int8, table[b + 1] * block_size + i, token_stride);
            const float *row = float_row(kv->value, int8, token, token_stride, converted);
            for (int64_t h = 0; h < num_heads; h++) {
                const int64_t kv_head = h / group;
                const float *v = row + kv_head * head_dim;
                float p = scores[h * seq_len + start + i], *o = out + h * head_dim;
                if (int8) p *= kv->value_scale[token * num_kv_heads + kv_head];
#pragma omp simd
                for (int64_t d = 0; d < head_dim; d++) o[d] += p * v[d];
            }
        }
    }
}

/* Every sequence's decode over one layer's cache (int8 codes where kv->key_scale is set). Returns 0, or -1 if a
 * thread could not allocate its score buffer. */
static int paged_decode(const float *query, const paged_kv *kv, const int64_t *tables, const int64_t *seq_lens,
                        float *out, int64_t num_seqs, int64_t num_kv_heads, int64_t group, int64_t head_dim,
                        int64_t block_size, int64_t max_blocks, float scale) {
    const int64_t max_len = max_blocks * block_size;
    int failed = 0;
#pragma omp parallel
    {
        // scores [Hq, max_len], then int8's converted row [Hkv * D]
        float *scores = malloc(sizeof(float) * (size_t)(num_kv_heads * (group * max_len + head_dim)));
        if (scores == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t seq = 0; seq < num_seqs; seq++) {
            if (scores == NULL) continue;
            const int64_t offset = seq * num_kv_heads * group * head_dim;
            attend_sequence(query + offset, kv, tables + seq * max_blocks, seq_lens[seq], out + offset, scores,
                            scores + num_kv_heads * group * max_len, num_kv_heads, group, head_dim, block_size,
                            scale);
        }
        free(scores);
    }
    return failed ? -1 : 0;
}

int paged_decode_f32(const float *query, const float *key, const float *value, const int64_t *tables,
                     const int64_t *seq_lens, float *out, int64_t num_seqs, int64_t num_kv_heads, int64_t group,
                     int64_t head_dim, int64_t block_size, int64_t max_blocks, float scale) {
    const paged_kv kv = {key, value, NULL, NULL};
    return paged_decode(query, &kv, tables, seq_lens, out, num_seqs, num_kv_heads, group, head_dim, block_size,
                        max_blocks, scale);
}

int paged_decode_i8(const float *query, const int8_t *key, const int8_t *value, const float *key_scale,
                    const float *value_scale, const int64_t *tables, const int64_t *seq_lens, float *out,
                    int64_t num_seqs, int64_t num_kv_heads, int64_t group, int64_t head_dim, int64_t block_size,
                    int64_t max_blocks, float scale) {
    const paged_kv kv = {key, value, key_scale, value_scale};
    return paged_decode(query, &kv, tables, seq_lens, out, num_seqs, num_kv_heads, group, head_dim, block_size,
                        max_blocks, scale);
}
