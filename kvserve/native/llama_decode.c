/* A whole decode step of a Llama-family model's layers in one call: hidden [B, H] -> hidden after every layer.
 *
 * The module path spends ~350 us per layer in Python and torch dispatch around its matmuls (30 layers: ~10 ms a
 * token on 2 cores, more than the 4-bit weights take to stream). Here each layer is the same kernels in a row,
 * without leaving C: RMSNorm (rms_norm.c), QKV on GGUF blocks or float32 rows (gguf_matmul.c), RoPE, the
 * K/V rows into their cache slots, paged decode attention (paged_decode.c), O, residual, RMSNorm, gate/up,
 * SiLU * up, down, residual. Only batches of single-token decodes on caches paged_decode.c reads come here
 * (models/llama_decode.py decides); everything else stays on the module path. An int4 cache's token rows go to
 * the request's residual slot, and a block they complete is quantized from it (quantize_block_int4).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gguf_int8.c"
#include "gguf_matmul.c"
#include "paged_decode.c"
#include "rms_norm.c"

typedef void (*matmul_fn)(const float *, const uint8_t *, float *, int64_t, int64_t, int64_t, int64_t);

// In the order of native/__init__.py's GGUF_KERNEL_TYPES: a segment's `kind` indexes this table.
static const matmul_fn KERNELS[] = {gguf_matmul_f32,  gguf_matmul_f16,  gguf_matmul_q4_0, gguf_matmul_q4_1,
                                    gguf_matmul_q5_0, gguf_matmul_q5_1, gguf_matmul_q8_0, gguf_matmul_q4_k,
                                    gguf_matmul_q5_k, gguf_matmul_q6_k};

typedef void (*int8_matmul_fn)(const act_block *, const uint8_t *, float *, int64_t, int64_t, int64_t, int64_t);

// The same formats with 8-bit activations (cpu_gguf_int8_activations), from Q4_0 (kind 2) on, then
// INTERLEAVED_TYPES (kinds 10-12), which exist only with 8-bit activations.
static const int8_matmul_fn INT8_KERNELS[] = {gguf_int8_matmul_q4_0, gguf_int8_matmul_q4_1, gguf_int8_matmul_q5_0,
                                              gguf_int8_matmul_q5_1, gguf_int8_matmul_q8_0, gguf_int8_matmul_q4_k,
                                              gguf_int8_matmul_q5_k, gguf_int8_matmul_q6_k, gguf_int8_matmul_q4_0x8,
                                              gguf_int8_matmul_q4_1x8, gguf_int8_matmul_q8_0x8};

#define MAX_SEGMENTS 4

typedef struct {  // a run of output rows in one format
    int64_t kind, rows, first_row;
    const uint8_t *weight;  // [rows, row_bytes]
} segment;

typedef struct {  // a Linear: its runs, and its bias or NULL
    int64_t num_segments;
    segment segments[MAX_SEGMENTS];
    const float *bias;  // [out]
} linear;

typedef struct {
    const float *input_norm, *post_attention_norm;  // [H]
    linear qkv, o, gate_up, down;
    void *key_cache, *value_cache;  // [num_blocks, block_size, Hkv, D] of kv_kind (paged_decode.c), int8 codes with
    void *key_scale, *value_scale;  // float32 [num_blocks, block_size, Hkv] (NULL for the others); int4: float16
    int64_t kv_kind;                // enum kv_kind
    // KV_I4 only: codes [num_blocks, block_size, Hkv, D / 2], float16 scales (above) and zero points, keys'
    // [num_blocks, Hkv, D], values' [num_blocks, block_size, Hkv]; float32 residual slots [slots, block_size, Hkv, D]
    _Float16 *key_zero, *value_zero;
    float *residual_key, *residual_value;
} layer;

typedef struct {  // a step's int4 inputs, per decode row (NULL for other caches)
    const int64_t *residual_slots;  // the row's request's residual slot
    const int64_t *tail_columns, *tail_slots;  // after the write: the incomplete block's table column (-1: none)
} int4_step;

typedef struct {
    int64_t hidden, num_heads, num_kv_heads, head_dim, intermediate, block_size, num_layers;
    int64_t int8_activations;  // block formats multiply 8-bit activations (gguf_int8.c)
    int64_t int8_queries;      // int8 caches: queries rounded to 8 bits for Q.K (paged_decode.c's query_codes)
    float eps, scale;
} shape;

/* y [rows, out] = x [rows, in] @ W^T (+ bias). With `blocks` (scratch for x's 8-bit blocks), runs in block
 * formats take the 8-bit path; float runs (F32, F16) always read x. */
static void apply_linear(const linear *l, const float *x, act_block *blocks, float *y, int64_t rows, int64_t in,
                         int64_t out) {
    if (blocks) gguf_quantize_activations(x, blocks, rows, in);
    for (int64_t s = 0; s < l->num_segments; s++) {
        const segment *seg = &l->segments[s];
        if (blocks && seg->kind >= 2)
            INT8_KERNELS[seg->kind - 2](blocks, seg->weight, y + seg->first_row, rows, in, seg->rows, out);
        else
            KERNELS[seg->kind](x, seg->weight, y + seg->first_row, rows, in, seg->rows, out);
    }
    if (l->bias)
        for (int64_t r = 0; r < rows; r++)
            for (int64_t o = 0; o < out; o++) y[r * out + o] += l->bias[o];
}

/* x * cos + rotate_half(x) * sin for one head [D], as layers/rotary.py computes it (two products, one sum:
 * no fused multiply-add, so that the result is the module path's). */
__attribute__((optimize("fp-contract=off"))) static void rotate(float *x, const float *cos, const float *sin,
                                                                int64_t dim) {
    const int64_t half = dim / 2;
    float rotated[dim];
    for (int64_t d = 0; d < half; d++) {
        rotated[d] = -x[d + half];
        rotated[d + half] = x[d];
    }
    for (int64_t d = 0; d < dim; d++) {
        const float a = x[d] * cos[d], b = rotated[d] * sin[d];
        x[d] = a + b;
    }
}

/* x / (1 + exp(-x)), branch-free so that it vectorizes (expf does not): with e = exp(-|x|) <= 1, that is
 * x / (1 + e) for x >= 0 and x e / (1 + e) below. */
static inline float silu(float x) {
    const float e = exp_nonpositive(-fabsf(x));
    return (x >= 0.0f ? x : x * e) / (1.0f + e);
}

/* x rounded to bfloat16's bits as torch rounds it: to nearest, ties to even; NaN to the quiet NaN 0x7FC0. */
static inline uint16_t bfloat16_bits(float x) {
    union { float f; uint32_t u; } bits = {.f = x};
    if (x != x) return 0x7FC0;
    return (uint16_t)((bits.u + 0x7FFF + ((bits.u >> 16) & 1)) >> 16);
}

/* row [n] -> float16 or bfloat16 (`bf16`) elements, rounded to nearest even as torch's .to() does. */
void round_to_16bit(const float *row, uint16_t *out, int64_t n, int64_t bf16) {
    int64_t e = 0;
#ifdef __AVX512F__
    if (!bf16)
        for (; e + 16 <= n; e += 16)
            _mm256_storeu_si256((__m256i *)(out + e), _mm512_cvtps_ph(_mm512_loadu_ps(row + e),
                                                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
    for (; e < n; e++) {
        if (bf16) {
            out[e] = bfloat16_bits(row[e]);
        } else {
            const _Float16 half = (_Float16)row[e];
            memcpy(out + e, &half, sizeof(half));
        }
    }
}

/* One token's K or V row [Hkv, D] into its cache slot: float32 as is, float16 / bfloat16 rounded, or int8 codes
 * and a scale per head. */
static void store_row(const float *row, void *cache, float *scales, int64_t kind, int64_t slot, int64_t num_kv_heads,
                      int64_t head_dim) {
    const int64_t offset = slot * num_kv_heads * head_dim, n = num_kv_heads * head_dim;
    if (kind == KV_F32)
        memcpy((float *)cache + offset, row, sizeof(float) * n);
    else if (kind == KV_I8)
        quantize_rows_i8(row, (int8_t *)cache + offset, scales + slot * num_kv_heads, num_kv_heads, head_dim);
    else
        round_to_16bit(row, (uint16_t *)cache + offset, n, kind == KV_BF16);
}

/* A completed int4 block from its tokens rows [block_size, Hkv, D] (float32), as kv_quant.quantize_int4 computes it:
 * over the block's tokens per channel (`per_channel`: keys; scale / zero [Hkv, D]) or over each token's channels
 * (values; [block_size, Hkv]), zero = the low end in float16, scale = (high - zero) / 15 in float16 (1 for a constant
 * range), code = (x - zero) / scale rounded half to even and clamped to 0..15; codes [block_size, Hkv, D / 2], two a
 * byte (channel d in the low nibble of byte d, d + D / 2 in the high one). */
void quantize_block_int4(const float *rows, uint8_t *codes, _Float16 *scale, _Float16 *zero, int64_t per_channel,
                         int64_t block_size, int64_t num_kv_heads, int64_t head_dim) {
    const int64_t width = num_kv_heads * head_dim, half = head_dim / 2;
    // x's range: per channel, a group of block_size values width apart; per token, head_dim contiguous ones
    const int64_t groups = per_channel ? width : block_size * num_kv_heads, count = per_channel ? block_size : head_dim;
    const int64_t step = per_channel ? width : 1;
    for (int64_t g = 0; g < groups; g++) {
        const float *x = rows + (per_channel ? g : g * head_dim);
        float low = x[0], high = x[0];
        for (int64_t j = 1; j < count; j++) {
            low = x[j * step] < low ? x[j * step] : low;
            high = x[j * step] > high ? x[j * step] : high;
        }
        const _Float16 z = (_Float16)low, q = (_Float16)((high - (float)z) / 15.0f);
        const float zero32 = (float)z, scale32 = q > 0 ? (float)q : 1.0f;
        zero[g] = z, scale[g] = (_Float16)scale32;
        for (int64_t j = 0; j < count; j++) {
            const float code = rintf((x[j * step] - zero32) / scale32);
            const uint8_t u = (uint8_t)(code < 0.0f ? 0.0f : code > 15.0f ? 15.0f : code);
            const int64_t element = per_channel ? j * width + g : g * head_dim + j;  // [token, head, d]
            const int64_t d = element % head_dim, byte = element / head_dim * half + d % half;
            codes[byte] = d < half ? (uint8_t)((codes[byte] & 0xF0) | u) : (uint8_t)((codes[byte] & 0x0F) | (u << 4));
        }
    }
}

/* A decode token's K and V rows [Hkv, D] into an int4 cache: into its request's residual slot, and once they
 * complete their block (the token at the block's last offset), the block quantized from the slot. */
static void store_int4(const layer *L, const float *key, const float *value, int64_t slot, int64_t residual_slot,
                       int64_t block_size, int64_t num_kv_heads, int64_t head_dim) {
    const int64_t width = num_kv_heads * head_dim, block = slot / block_size, offset = slot % block_size;
    float *keys = L->residual_key + residual_slot * block_size * width;
    float *values = L->residual_value + residual_slot * block_size * width;
    memcpy(keys + offset * width, key, sizeof(float) * width);
    memcpy(values + offset * width, value, sizeof(float) * width);
    if (offset + 1 < block_size) return;
    const int64_t codes = block * block_size * width / 2;
    quantize_block_int4(keys, (uint8_t *)L->key_cache + codes, (_Float16 *)L->key_scale + block * width,
                        L->key_zero + block * width, 1, block_size, num_kv_heads, head_dim);
    quantize_block_int4(values, (uint8_t *)L->value_cache + codes, (_Float16 *)L->value_scale + block * block_size *
                        num_kv_heads, L->value_zero + block * block_size * num_kv_heads, 0, block_size, num_kv_heads,
                        head_dim);
}

/* A layer's attention between its QKV and O matmuls: RoPE on the queries and keys of qkv [B, (Hq + 2 Hkv) D] (in
 * place), each token's K/V rows into its cache slot, then paged decode attention of query [B, Hq D] (scratch) into
 * attended [B, Hq D]. Returns paged_decode's status. */
static int attend(const layer *L, const shape *s, float *qkv, float *query, float *attended, int64_t batch,
                  const float *cos, const float *sin, const int64_t *slots, const int64_t *tables,
                  const int64_t *seq_lens, int64_t max_blocks, const int4_step *int4, int threaded) {
    const int64_t D = s->head_dim, Hq = s->num_heads, Hkv = s->num_kv_heads, qkv_width = (Hq + 2 * Hkv) * D;
    const int is_int4 = L->kv_kind == KV_I4;
    // Per token, independent (distinct slots): threads take tokens once there are a few (unless not `threaded`).
#pragma omp parallel for schedule(static) if (threaded && batch >= 4)
    for (int64_t b = 0; b < batch; b++) {
        float *row = qkv + b * qkv_width;  // [Hq + 2 Hkv, D]: queries, keys, values
        for (int64_t h = 0; h < Hq + Hkv; h++) rotate(row + h * D, cos + b * D, sin + b * D, D);
        memcpy(query + b * Hq * D, row, sizeof(float) * Hq * D);
        if (is_int4) continue;
        store_row(row + Hq * D, L->key_cache, L->key_scale, L->kv_kind, slots[b], Hkv, D);
        store_row(row + (Hq + Hkv) * D, L->value_cache, L->value_scale, L->kv_kind, slots[b], Hkv, D);
    }
    // int4 in row order: a request's rows share its residual slot, whose block one row may complete for the next
    for (int64_t b = 0; is_int4 && b < batch; b++)
        store_int4(L, qkv + b * qkv_width + Hq * D, qkv + b * qkv_width + (Hq + Hkv) * D, slots[b],
                   int4->residual_slots[b], s->block_size, Hkv, D);
    paged_kv kv = {L->key_cache, L->value_cache, L->key_scale, L->value_scale, (int)L->kv_kind, (int)s->int8_queries,
                   {0}};
    if (is_int4)
        kv.int4 = (int4_cache){L->key_scale, L->key_zero, L->value_scale, L->value_zero, L->residual_key,
                               L->residual_value, KV_F32, int4->tail_columns, int4->tail_slots};
    return paged_decode(query, &kv, tables, seq_lens, NULL, attended, batch, Hkv, Hq / Hkv, D, s->block_size,
                        max_blocks, s->scale);
}

/* act [B, I] = SiLU(gate) * up of gate_up [B, 2 I] (gate then up). */
static void silu_mul(const float *gate_up, float *act, int64_t batch, int64_t intermediate, int threaded) {
#pragma omp parallel for schedule(static) if (threaded && batch >= 4)
    for (int64_t b = 0; b < batch; b++) {
        const float *gate = gate_up + b * 2 * intermediate, *up = gate + intermediate;
#pragma omp simd
        for (int64_t i = 0; i < intermediate; i++) act[b * intermediate + i] = silu(gate[i]) * up[i];
    }
}

/* hidden [B, H] in place through every layer. cos, sin [B, D] (each token's position); slots [B] cache slot
 * of each token; tables [B, max_blocks], seq_lens [B] as paged_decode_f32 reads them; an int4 cache's residual
 * slots and tails (int4_step). Returns 0, or -1 when out of memory. */
int llama_decode_layers(const layer *layers, const shape *s, float *hidden, int64_t batch, const float *cos,
                        const float *sin, const int64_t *slots, const int64_t *tables, const int64_t *seq_lens,
                        int64_t max_blocks, const int64_t *residual_slots, const int64_t *tail_columns,
                        const int64_t *tail_slots) {
    const int4_step int4 = {residual_slots, tail_columns, tail_slots};
    const int64_t H = s->hidden, D = s->head_dim, Hq = s->num_heads, Hkv = s->num_kv_heads, I = s->intermediate;
    const int64_t qkv_width = (Hq + 2 * Hkv) * D;
    float *normed = malloc(sizeof(float) * batch * H), *qkv = malloc(sizeof(float) * batch * qkv_width);
    float *query = malloc(sizeof(float) * batch * Hq * D), *attended = malloc(sizeof(float) * batch * Hq * D);
    float *gate_up = malloc(sizeof(float) * batch * 2 * I), *act = malloc(sizeof(float) * batch * I);
    float *delta = malloc(sizeof(float) * batch * H);
    const int64_t widest = H > I ? (H > Hq * D ? H : Hq * D) : (I > Hq * D ? I : Hq * D);
    act_block *blocks = s->int8_activations ? malloc(sizeof(act_block) * batch * (widest / 32)) : NULL;
    int status = (normed && qkv && query && attended && gate_up && act && delta &&
                  (blocks || !s->int8_activations)) ? 0 : -1;
    for (int64_t l = 0; l < s->num_layers && status == 0; l++) {
        const layer *L = &layers[l];
        rms_norm_f32(hidden, L->input_norm, normed, batch, H, s->eps);
        apply_linear(&L->qkv, normed, blocks, qkv, batch, H, qkv_width);
        status = attend(L, s, qkv, query, attended, batch, cos, sin, slots, tables, seq_lens, max_blocks, &int4, 1);
        apply_linear(&L->o, attended, blocks, delta, batch, Hq * D, H);
        for (int64_t i = 0; i < batch * H; i++) hidden[i] += delta[i];
        rms_norm_f32(hidden, L->post_attention_norm, normed, batch, H, s->eps);
        apply_linear(&L->gate_up, normed, blocks, gate_up, batch, H, 2 * I);
        silu_mul(gate_up, act, batch, I, 1);
        apply_linear(&L->down, act, blocks, delta, batch, I, H);
        for (int64_t i = 0; i < batch * H; i++) hidden[i] += delta[i];
    }
    free(normed), free(qkv), free(query), free(attended), free(gate_up), free(act), free(delta), free(blocks);
    return status;
}

/* The split step (models/llama_decode.py: decode batches beyond the fused step's rows): Python runs each layer's
 * matmuls through its Linear modules (oneDNN's packed matmuls, or the GGUF method), these two what lies between
 * them, the same code as llama_decode_layers. RoPE, the K/V writes and SiLU keep to one thread here: with an
 * OpenMP region of ours right before each oneDNN matmul, those ran 20% slower (a 16-decode float32 step: 45 -> 55
 * ms), as our idle threads spin on the cores that oneDNN's pool wants. */
int llama_decode_attention(const layer *layers, const shape *s, int64_t layer_index, float *qkv, float *query,
                           float *attended, int64_t batch, const float *cos, const float *sin, const int64_t *slots,
                           const int64_t *tables, const int64_t *seq_lens, int64_t max_blocks,
                           const int64_t *residual_slots, const int64_t *tail_columns, const int64_t *tail_slots) {
    const int4_step int4 = {residual_slots, tail_columns, tail_slots};
    return attend(&layers[layer_index], s, qkv, query, attended, batch, cos, sin, slots, tables, seq_lens,
                  max_blocks, &int4, 0);
}

void llama_silu_mul(const float *gate_up, float *act, int64_t batch, int64_t intermediate) {
    silu_mul(gate_up, act, batch, intermediate, 0);
}
