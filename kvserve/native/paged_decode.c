/* Paged decode attention for float32 CPU caches: one query token per sequence, read in place.
 *
 * The pure-torch path copies every sequence's blocks into a padded [B, L, Hkv, D] tensor before SDPA
 * reads them again; here each sequence's task walks its block table and reads each key and value row
 * once, up to its own length. The threads share the sequences. Used by attention/cpu_native.py.
 *
 * query, out  [num_seqs, num_kv_heads * group, head_dim]   (query head h * group + g uses KV head h)
 * key, value  [num_blocks, block_size, num_kv_heads, head_dim]
 * tables      [num_seqs, max_blocks] block ids;  seq_lens [num_seqs] tokens to attend (>= 1)
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

/* One sequence, every head. Keys and values are read token row by token row: all KV heads of a token
 * are contiguous, so a block is one sequential 2 * block_size * Hkv * D * 4-byte stream (per-head tasks
 * striding over the rows ran 2.4-4.3x slower from a cold cache). */
static void attend_sequence(const float *restrict query, const float *restrict key, const float *restrict value,
                            const int64_t *restrict table, int64_t seq_len, float *restrict out,
                            float *restrict scores, int64_t num_kv_heads, int64_t group, int64_t head_dim,
                            int64_t block_size, float scale) {
    const int64_t num_heads = num_kv_heads * group;
    const int64_t token_stride = num_kv_heads * head_dim;
    const int64_t block_stride = block_size * token_stride;
    /* scores [num_heads, seq_len] = q . k * scale: one pass over the keys, block by block */
    for (int64_t start = 0, b = 0; start < seq_len; start += block_size, b++) {
        const float *block = key + table[b] * block_stride;
        const int64_t count = seq_len - start < block_size ? seq_len - start : block_size;
        for (int64_t i = 0; i < count; i++) {
            for (int64_t h = 0; h < num_heads; h++) {
                const float *k = block + i * token_stride + (h / group) * head_dim;
                const float *q = query + h * head_dim;
                float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                for (int64_t d = 0; d < head_dim; d++) dot += q[d] * k[d];
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
        const float *block = value + table[b] * block_stride;
        const int64_t count = seq_len - start < block_size ? seq_len - start : block_size;
        for (int64_t i = 0; i < count; i++) {
            for (int64_t h = 0; h < num_heads; h++) {
                const float *v = block + i * token_stride + (h / group) * head_dim;
                const float p = scores[h * seq_len + start + i];
                float *o = out + h * head_dim;
#pragma omp simd
                for (int64_t d = 0; d < head_dim; d++) o[d] += p * v[d];
            }
        }
    }
}

/* Returns 0, or -1 if a thread could not allocate its score buffer. */
int paged_decode_f32(const float *query, const float *key, const float *value, const int64_t *tables,
                     const int64_t *seq_lens, float *out, int64_t num_seqs, int64_t num_kv_heads, int64_t group,
                     int64_t head_dim, int64_t block_size, int64_t max_blocks, float scale) {
    const int64_t max_len = max_blocks * block_size;
    int failed = 0;
#pragma omp parallel
    {
        float *scores = malloc(sizeof(float) * (size_t)(num_kv_heads * group * max_len + 1));
        if (scores == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t seq = 0; seq < num_seqs; seq++) {
            if (scores == NULL) continue;
            const int64_t offset = seq * num_kv_heads * group * head_dim;
            attend_sequence(query + offset, key, value, tables + seq * max_blocks, seq_lens[seq], out + offset,
                            scores, num_kv_heads, group, head_dim, block_size, scale);
        }
        free(scores);
    }
    return failed ? -1 : 0;
}
