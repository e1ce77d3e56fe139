/* What every quantized kernel shares: the instruction set's vector types, fp16 conversions, and the GGML block
   types (geometry, fields, the reference dequantization each kernel must agree with, bit for bit, where it
   dequantizes).

   Types (GGML ids): 32 weights per block Q4_0, Q4_1, Q5_0, Q5_1, Q8_0; 256 weights per block ("K-quants", a
   superblock of 8 sub-blocks of 32, or 16 of 16 for Q6_K, each with its own 6- or 8-bit scale) Q4_K, Q5_K,
   Q6_K. A block's fields as GGML stores them (byte offset, size):
     Q4_0  d 0,2  qs 2,16                     w = d (q - 8)
     Q4_1  d 0,2  m 2,2  qs 4,16              w = d q + m
     Q5_0  d 0,2  qh 2,4  qs 6,16             w = d (q - 16), q = nibble | high bit << 4
     Q5_1  d 0,2  m 2,2  qh 4,4  qs 8,16      w = d q + m
     Q8_0  d 0,2  qs 2,32                     w = d q (q signed)
     Q4_K  d 0,2  dmin 2,2  scales 4,12  qs 16,128              w = (d sc_j) q - (dmin m_j), j = sub-block of 32
     Q5_K  d 0,2  dmin 2,2  scales 4,12  qh 16,32  qs 48,128    the same with a fifth bit
     Q6_K  ql 0,128  qh 128,64  scales 192,16  d 208,2          w = (d sc_s) (q - 32), s = sub-block of 16
   In the rows16 layout (quant_gemm.c) a field at GGML offset o starts at 16 o of the group's block. */
#ifndef TGI_NB_QUANT_TYPES_H
#define TGI_NB_QUANT_TYPES_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__F16C__) || defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
#define VW 16
#define MT 4
#elif defined(__AVX2__)
#define VW 8
#define MT 2
#else
#define VW 4
#define MT 2
#endif
#define QK 32          /* weights per block of the 32-weight types, and per sub-block of Q4_K / Q5_K */
#define QKK 256        /* weights per K-quant superblock */
#define NVB (QK / VW)   /* vectors per block */
#define GROUP 16       /* weight rows per group of the rows16 layout */
#define NL (GROUP / VW) /* vectors per group of rows */

typedef float vf __attribute__((vector_size(VW * 4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));
typedef uint32_t vu __attribute__((vector_size(VW * 4)));
typedef int8_t vb __attribute__((vector_size(VW * 4)));     /* a vu seen as bytes */

enum { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14 };   /* GGML type ids */

static inline int block_bytes(int qtype) {
    switch (qtype) {
    case Q4_0: return 18;
    case Q4_1: return 20;
    case Q5_0: return 22;
    case Q5_1: return 24;
    case Q8_0: return 34;
    case Q4_K: return 144;
    case Q5_K: return 176;
    case Q6_K: return 210;
    default: return 0;
    }
}
static inline int is_k(int qtype) { return qtype == Q4_K || qtype == Q5_K || qtype == Q6_K; }
static inline int block_weights(int qtype) { return is_k(qtype) ? QKK : QK; }

static inline float half_to_float(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff, bits;
    if (exponent == 0x1f) bits = sign | 0x7f800000u | (mantissa << 13);
    else if (exponent) bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    else {
        float f = (float)mantissa * (1.0f / 16777216.0f);   /* subnormal: mantissa * 2^-24 */
        memcpy(&bits, &f, 4);
        bits |= sign;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

static inline vf splat(float v) { return (vf){} + v; }

/* a * b + c, fused where the instruction set has it. Written out rather than left to the compiler's contraction
   (the build passes -ffp-contract=off -fno-associative-math): GCC contracted the same source differently in the
   tiles of 1 and of 2+ rows, so a sequence's logits changed with the number of others in its step. */
static inline vf fmadd(vf a, vf b, vf c) {
#if defined(__AVX512F__)
    return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__FMA__) && VW == 8
    return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
    return a * b + c;
#endif
}

static inline float hsum(vf v) {
    float s = 0;
    for (int i = 0; i < VW; i++) s += v[i];
    return s;
}

static inline vu load_words(const uint8_t *p) {
    vu v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline int32_t load_i32(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* 16 fp16 values into NL vectors. */
static inline void load_halves(const uint8_t *p, vf out[NL]) {
#if defined(__AVX512F__)
    out[0] = (vf)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
#elif defined(__F16C__)
    for (int l = 0; l < NL; l++) out[l] = (vf)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 16 * l)));
#else
    for (int l = 0; l < NL; l++)
        for (int i = 0; i < VW; i++) out[l][i] = half_to_float(p + 2 * (l * VW + i));
#endif
}

/* The scale and min of sub-block j (0..7) of a Q4_K / Q5_K superblock from its 12 scale bytes (6 bits each,
   packed as GGML's get_scale_min_k4). */
static inline void k_scale_min(const uint8_t *s, int j, int *sc, int *m) {
    if (j < 4) {
        *sc = s[j] & 63;
        *m = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0xf) | ((s[j - 4] >> 6) << 4);
        *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

/* One GGML block of any type into floats, the values gguf's numpy dequantizer gives bit for bit: d q is exact in
   float32 for every type (a fp16 scale, or the exact product of a fp16 scale and a 6- or 8-bit one, times a quant
   of at most 6 bits), so each weight rounds at most once, where a min is added. */
static void dequant_block_ref(int qtype, const uint8_t *blk, float *out) {
    switch (qtype) {
    case Q4_0: case Q4_1: case Q5_0: case Q5_1: {
        const float d = half_to_float(blk);
        const int q5 = qtype == Q5_0 || qtype == Q5_1, min = qtype == Q4_1 || qtype == Q5_1;
        const float m = min ? half_to_float(blk + 2) : 0.0f;
        const int off = q5 ? -16 : -8;
        uint32_t qh = 0;
        if (q5) memcpy(&qh, blk + (min ? 4 : 2), 4);
        const uint8_t *qs = blk + (qtype == Q4_0 ? 2 : qtype == Q4_1 ? 4 : qtype == Q5_0 ? 6 : 8);
        for (int i = 0; i < 16; i++) {
            const int lo = (qs[i] & 15) | (int)(((qh >> i) & 1) << 4), hi = (qs[i] >> 4) | (int)(((qh >> (i + 16)) & 1) << 4);
            out[i] = min ? d * (float)lo + m : d * (float)(lo + off);
            out[i + 16] = min ? d * (float)hi + m : d * (float)(hi + off);
        }
        return;
    }
    case Q8_0: {
        const float d = half_to_float(blk);
        for (int i = 0; i < QK; i++) out[i] = d * (float)(int8_t)blk[2 + i];
        return;
    }
    case Q4_K: case Q5_K: {
        const float d = half_to_float(blk), dmin = half_to_float(blk + 2);
        const uint8_t *qh = blk + 16, *qs = blk + (qtype == Q4_K ? 16 : 48);
        for (int j = 0; j < 8; j++) {
            int sc, m;
            k_scale_min(blk + 4, j, &sc, &m);
            const float D = d * (float)sc, M = dmin * (float)m;
            for (int l = 0; l < QK; l++) {
                int q = (qs[32 * (j / 2) + l] >> (4 * (j % 2))) & 15;
                if (qtype == Q5_K) q |= ((qh[l] >> j) & 1) << 4;
                out[32 * j + l] = D * (float)q - M;
            }
        }
        return;
    }
    case Q6_K: {
        const float d = half_to_float(blk + 208);
        const int8_t *sc = (const int8_t *)(blk + 192);
        for (int e = 0; e < QKK; e++) {
            const int h = e / 128, k = (e % 128) / 32, l = e % 32;
            const int ql = (blk[64 * h + 32 * (k & 1) + l] >> (4 * (k >> 1))) & 15;
            const int q = ql | (((blk[128 + 32 * h + l] >> (2 * k)) & 3) << 4);
            out[e] = d * (float)sc[8 * h + 2 * k + l / 16] * (float)(q - 32);
        }
        return;
    }
    }
}

/* A block's fields: GGML byte offset, size, and unit (2: fp16 values, 4: words of quants). The rows16 layout
   puts a field's units of the 16 rows side by side: unit u of row j at 16 off + (u * 16 + j) * unit. */
typedef struct { uint8_t off, size, unit; } field_t;

static int block_fields(int qtype, field_t f[5]) {
    switch (qtype) {
    case Q4_0: f[0] = (field_t){0, 2, 2}; f[1] = (field_t){2, 16, 4}; return 2;
    case Q4_1: f[0] = (field_t){0, 2, 2}; f[1] = (field_t){2, 2, 2}; f[2] = (field_t){4, 16, 4}; return 3;
    case Q5_0: f[0] = (field_t){0, 2, 2}; f[1] = (field_t){2, 4, 4}; f[2] = (field_t){6, 16, 4}; return 3;
    case Q5_1:
        f[0] = (field_t){0, 2, 2}; f[1] = (field_t){2, 2, 2}; f[2] = (field_t){4, 4, 4}; f[3] = (field_t){8, 16, 4};
        return 4;
    case Q8_0: f[0] = (field_t){0, 2, 2}; f[1] = (field_t){2, 32, 4}; return 2;
    case Q4_K:
        f[0] = (field_t){0, 2, 2}; f[1] = (field_t){2, 2, 2}; f[2] = (field_t){4, 12, 4}; f[3] = (field_t){16, 128, 4};
        return 4;
    case Q5_K:
        f[0] = (field_t){0, 2, 2}; f[1] = (field_t){2, 2, 2}; f[2] = (field_t){4, 12, 4}; f[3] = (field_t){16, 32, 4};
        f[4] = (field_t){48, 128, 4};
        return 5;
    case Q6_K:
        f[0] = (field_t){0, 128, 4}; f[1] = (field_t){128, 64, 4}; f[2] = (field_t){192, 16, 4};
        f[3] = (field_t){208, 2, 2};
        return 4;
    default: return 0;
    }
}

/* Row j's GGML block out of a rows16 group block (the layout's inverse for one row). */
static void gather_block(int qtype, const uint8_t *group_block, int j, uint8_t *out) {
    field_t f[5];
    const int n = block_fields(qtype, f);
    for (int i = 0; i < n; i++)
        for (int u = 0; u < f[i].size / f[i].unit; u++)
            memcpy(out + f[i].off + u * f[i].unit, group_block + GROUP * f[i].off + (size_t)(u * GROUP + j) * f[i].unit,
                   f[i].unit);
}

#endif
