/* What the GGUF block kernels share: byte vectors, the file's half floats and the K-quants' 6-bit scales.
 * Included by gguf_matmul.c and gguf_int8.c, which llama_decode.c includes together, hence the guard. */
#ifndef KVSERVE_GGUF_BLOCKS_H
#define KVSERVE_GGUF_BLOCKS_H

#include <stdint.h>
#include <string.h>

typedef uint8_t u8x16 __attribute__((vector_size(16)));
typedef uint8_t u8x32 __attribute__((vector_size(32)));

static inline float f16(const uint8_t *p) {  // an IEEE half, little-endian, as stored in the file
    uint16_t bits;
    memcpy(&bits, p, 2);
#ifdef __FLT16_MAX__
    _Float16 half;
    memcpy(&half, &bits, 2);
    return (float)half;
#else
    const uint32_t sign = (uint32_t)(bits & 0x8000) << 16, exponent = (bits >> 10) & 0x1f, mantissa = bits & 0x3ff;
    float magnitude;
    if (exponent == 0) magnitude = (float)mantissa * 0x1p-24f;  // subnormal
    else if (exponent == 31) magnitude = mantissa ? __builtin_nanf("") : __builtin_inff();
    else { uint32_t f = ((exponent + 112) << 23) | (mantissa << 13); memcpy(&magnitude, &f, 4); }
    uint32_t out;
    memcpy(&out, &magnitude, 4);
    out |= sign;
    memcpy(&magnitude, &out, 4);
    return magnitude;
#endif
}

// Q4_K / Q5_K: the 6-bit scale and min of sub-block j (0-7) from the block's 12 packed bytes (ggml's layout).
static inline void k_scale_min(const uint8_t *scales, int j, int *scale, int *min) {
    if (j < 4) {
        *scale = scales[j] & 63;
        *min = scales[j + 4] & 63;
    } else {
        *scale = (scales[j + 4] & 15) | ((scales[j - 4] >> 6) << 4);
        *min = (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4);
    }
}

#endif
