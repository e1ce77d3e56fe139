/* The products of one rows16 group (16 weight rows) with a tile of rows of x, for every type of quant_types.h,
   in both numerics. Included by quant_gemm.c, which describes the layout and drives these over groups.

   Exact numerics (float32 activations): per block (or sub-block) of 32 or 16 columns, part = sum_k q_k x_k over
   the unsigned quants as floats (vector lanes = the 16 rows), then acc += D part + M sum_k x_k, with D the block's
   scale (Q4_K / Q5_K: d sc_j, exact; Q6_K: d sc_s, exact) and M its min or offset (Q4_0: -8 d, Q5_0: -16 d,
   Q4_1 / Q5_1: m, Q4_K / Q5_K: -dmin m_j; Q6_K and Q8_0 take their offset inside the quant). Mathematically the
   dequantized weights times x; only the rounding differs.

   Fast numerics (llama.cpp's): x quantized to int8, per 32 columns as Q8_0 for the 32-weight types
   (quantize_rows_q8), per 256 as Q8_K for the K-quants (quantize_rows_q8k: one float scale per 256, sums of
   quants per 16), and every (sub-)block's product an integer dot product (VNNI dpbusd; maddubs on AVX-512BW and
   AVX2; plain int32 otherwise), exact, scaled once:
     Q4_0 / Q5_0   d_w d_x (sum q_w q_x - 8 or 16 sum q_x)
     Q4_1 / Q5_1   d_w d_x sum q_w q_x + m_w d_x sum q_x
     Q8_0          d_w d_x sum q_w q_x
     Q4_K / Q5_K   d_x d_w sum_j sc_j (sum q_w q_x)_j - d_x dmin_w sum_j m_j (sum q_x)_j     (ints summed exactly)
     Q6_K          d_x d_w sum_s sc_s (sum q_w q_x - 32 sum q_x)_s
   A row's arithmetic is the same in every tile size, thread and batch: each output is summed in a fixed order. */
#ifndef TGI_NB_QUANT_ROWS16_H
#define TGI_NB_QUANT_ROWS16_H

#include "quant_types.h"

#if defined(__AVX512F__)
#define MR 8                     /* rows of x per tile, 32-weight types: MR * 2 sums + temporaries of 32 registers */
#define ROW_TILES(X, F) X(8, F) X(4, F) X(2, F) X(1, F)
#define K_ROW_TILES(X, F) X(4, F) X(2, F) X(1, F)     /* K-quants keep three sums per row */
#define K_FAST_ROW_TILES(X, F) X(8, F) X(4, F) X(2, F) X(1, F)
#else
#define MR 2
#define ROW_TILES(X, F) X(2, F) X(1, F)
#define K_ROW_TILES(X, F) X(2, F) X(1, F)
#define K_FAST_ROW_TILES K_ROW_TILES
#endif

/* A product's input: x and what each numerics derives from it (prepared once per call, shared by all groups). */
typedef struct {
    const float *x;      /* [M, K] */
    const float *sx;     /* [M, K/32] sums of x per 32 columns (exact numerics' min terms) */
    const int8_t *q;     /* [M, K] x as Q8_0 quants (fast numerics, 32-weight types) */
    const float *d;      /* [M, K/32] their scales */
    const int32_t *s;    /* [M, K/32] their sums */
    const int8_t *qk;    /* [M, K] x as Q8_K quants (fast numerics, K-quants) */
    const float *dk;     /* [M, K/256] their scales */
    const int32_t *sk;   /* [M, K/16] their sums per 16 */
} xin_t;

static inline vf sbyte_f(vu w, int s) { return __builtin_convertvector((vi)(w << (24 - 8 * s)) >> 24, vf); }

/* The 4-bit (nib4_f) or 5-bit (nib5_f) unsigned quant at bit `shift` of each lane, as a float. On AVX-512 a table
   lookup: vpermps reads only the low 4 bits of each index (vpermt2ps the low 5), so a shift and one permute do
   what a shift, a mask and a conversion do elsewhere. The values are the same exact small integers either way. */
#if defined(__AVX512F__)
static const float QUANT_VALUES[32] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
                                       16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31};
static inline vf nib4_f(vu w, int shift) {
    return (vf)_mm512_permutexvar_ps((__m512i)(w >> shift), _mm512_loadu_ps(QUANT_VALUES));
}
static inline vf nib5_f(vu w, int shift) {
    return (vf)_mm512_permutex2var_ps(_mm512_loadu_ps(QUANT_VALUES), (__m512i)(w >> shift),
                                      _mm512_loadu_ps(QUANT_VALUES + 16));
}
#else
static inline vf nib4_f(vu w, int shift) { return __builtin_convertvector((vi)((w >> shift) & 15u), vf); }
static inline vf nib5_f(vu w, int shift) { return __builtin_convertvector((vi)((w >> shift) & 31u), vf); }
#endif

/* 4 bits per lane (the low bits of v) spread to bit 0 of each of its 4 bytes: b0 + 2 b1 + 4 b2 + 8 b3 times
   1 + 2^7 + 2^14 + 2^21 puts b_k at bit 8k, and no two shifted copies overlap (where AVX-512BW's byte shuffles
   and masks are not there). */
static inline vu spread4(vu bits) { return (bits * 0x00204081u) & 0x01010101u; }

/* The unsigned quants of chunk c of a 32-weight block, lanes l * VW..: lo = columns 4c..4c+3 (byte s: column
   4c + s), hi = columns 4c+16..; Q5's fifth bit (qh bit i for column i) put in bit 4 of each byte. */
static inline vu nibble_word(int qtype, const uint8_t *blk, int c, int l) {
    const int qs = qtype == Q4_0 ? 2 : qtype == Q4_1 ? 4 : qtype == Q5_0 ? 6 : 8;
    return load_words(blk + GROUP * qs + (size_t)(c * GROUP + l * VW) * 4);
}

static inline __attribute__((always_inline)) void nibble_words(int qtype, const uint8_t *blk, int c, int l, vu *lo,
                                                               vu *hi) {
    const vu v = nibble_word(qtype, blk, c, l);
    *lo = v & 0x0f0f0f0fu;
    *hi = (v >> 4) & 0x0f0f0f0fu;
    if (qtype == Q5_0 || qtype == Q5_1) {
        const vu h = load_words(blk + GROUP * (qtype == Q5_0 ? 2 : 4) + (size_t)l * VW * 4);
#if defined(__AVX512BW__) && VW == 16
        /* Byte s of a lane needs bit 4c + s (lo) or 16 + 4c + s (hi) of the lane's qh: copy qh's byte c / 2 (or
           2 + c / 2) into the lane's 4 bytes, test each against its bit, add 16 where set. */
        const __m512i lane = _mm512_set4_epi32(0x0c0c0c0c, 0x08080808, 0x04040404, 0);
        const __m512i bits = _mm512_set1_epi32((int)(0x08040201u << (4 * (c % 2))));
        const __mmask64 lo_set = _mm512_test_epi8_mask(
            _mm512_shuffle_epi8((__m512i)h, _mm512_add_epi8(lane, _mm512_set1_epi8((char)(c / 2)))), bits);
        const __mmask64 hi_set = _mm512_test_epi8_mask(
            _mm512_shuffle_epi8((__m512i)h, _mm512_add_epi8(lane, _mm512_set1_epi8((char)(2 + c / 2)))), bits);
        *lo = (vu)_mm512_mask_add_epi8((__m512i)*lo, lo_set, (__m512i)*lo, _mm512_set1_epi8(16));
        *hi = (vu)_mm512_mask_add_epi8((__m512i)*hi, hi_set, (__m512i)*hi, _mm512_set1_epi8(16));
#else
        *lo |= spread4((h >> (4 * c)) & 15u) << 4;
        *hi |= spread4((h >> (4 * c + 16)) & 15u) << 4;
#endif
    }
}

/* Q4_K / Q5_K: the quants of pair i (sub-blocks 2i, 2i + 1), chunk cq: byte s of lo = column 64i + 4cq + s,
   of hi = column 64i + 32 + 4cq + s (Q5_K: qh byte l holds bit j of sub-block j's column l). */
static inline vu k4_word(int qtype, const uint8_t *blk, int i, int cq, int l) {
    return load_words(blk + GROUP * (qtype == Q4_K ? 16 : 48) + (size_t)((8 * i + cq) * GROUP + l * VW) * 4);
}

static inline __attribute__((always_inline)) void k4_words(int qtype, const uint8_t *blk, int i, int cq, int l,
                                                           vu *lo, vu *hi) {
    const vu v = k4_word(qtype, blk, i, cq, l);
    *lo = v & 0x0f0f0f0fu;
    *hi = (v >> 4) & 0x0f0f0f0fu;
    if (qtype == Q5_K) {
        const vu h = load_words(blk + GROUP * 16 + (size_t)(cq * GROUP + l * VW) * 4);
#if defined(__AVX512BW__) && VW == 16
        const __m512i sixteen = _mm512_set1_epi8(16);
        *lo = (vu)_mm512_mask_add_epi8((__m512i)*lo, _mm512_test_epi8_mask((__m512i)h, _mm512_set1_epi8((char)(1 << (2 * i)))),
                                       (__m512i)*lo, sixteen);
        *hi = (vu)_mm512_mask_add_epi8((__m512i)*hi,
                                       _mm512_test_epi8_mask((__m512i)h, _mm512_set1_epi8((char)(1 << (2 * i + 1)))),
                                       (__m512i)*hi, sixteen);
#else
        *lo |= ((h >> (2 * i)) & 0x01010101u) << 4;
        *hi |= ((h >> (2 * i + 1)) & 0x01010101u) << 4;
#endif
    }
}

/* The 6-bit scale and min of sub-block j of the 16 rows' Q4_K / Q5_K superblocks (k_scale_min on lanes). */
static inline void k4_scale_min(const uint8_t *blk, int j, int l, vi *sc, vi *mn) {
    const uint8_t *s = blk + GROUP * 4 + (size_t)l * VW * 4;
    const vu w0 = load_words(s), w1 = load_words(s + GROUP * 4);
    if (j < 4) {
        *sc = (vi)((w0 >> (8 * j)) & 63u);
        *mn = (vi)((w1 >> (8 * j)) & 63u);
    } else {
        const vu w2 = load_words(s + 2 * GROUP * 4);
        const int t = j - 4;
        *sc = (vi)(((w2 >> (8 * t)) & 15u) | (((w0 >> (8 * t + 6)) & 3u) << 4));
        *mn = (vi)(((w2 >> (8 * t + 4)) & 15u) | (((w1 >> (8 * t + 6)) & 3u) << 4));
    }
}

/* Q6_K: the quants (0..63) of column 128h + 32k + 16lh + 4cq + s in byte s: the low 4 bits from ql byte
   64h + 32(k & 1) + l (nibble k >> 1), the high 2 from qh byte 32h + l (bits 2k), l = 16lh + 4cq + s. */
static inline vu q6_word(const uint8_t *blk, int h, int lh, int k, int cq, int l) {
    const vu ql = load_words(blk + (size_t)((16 * h + 8 * (k & 1) + 4 * lh + cq) * GROUP + l * VW) * 4);
    const vu qh = load_words(blk + GROUP * 128 + (size_t)((8 * h + 4 * lh + cq) * GROUP + l * VW) * 4);
    return ((ql >> (4 * (k >> 1))) & 0x0f0f0f0fu) | (((qh >> (2 * k)) & 0x03030303u) << 4);
}

/* Sub-block s's 8-bit scale of the 16 rows' Q6_K superblocks. */
static inline vi q6_scale(const uint8_t *blk, int s, int l) {
    const vu w = load_words(blk + GROUP * 192 + (size_t)((s / 4) * GROUP + l * VW) * 4);
    return (vi)(w << (24 - 8 * (s % 4))) >> 24;
}

/* ---------------------------------------------------------------------------------------- exact numerics */
static inline __attribute__((always_inline)) void tile_32(int qtype, const uint8_t *g, int K, const xin_t *in, int m0,
                                                          int MM, vf acc[MR][NL]) {
    const int blocks = K / QK;
    const size_t gb = (size_t)GROUP * block_bytes(qtype);
    const float *x = in->x + (size_t)m0 * K, *sx = in->sx + (size_t)m0 * blocks;
    for (int i = 0; i < MM; i++)
        for (int l = 0; l < NL; l++) acc[i][l] = splat(0);
    for (int b = 0; b < blocks; b++) {
        const uint8_t *blk = g + (size_t)b * gb;
        const float *xb = x + (size_t)b * QK;
        vf part[MR][NL];
        for (int i = 0; i < MM; i++)
            for (int l = 0; l < NL; l++) part[i][l] = splat(0);
        if (qtype == Q8_0) {
            for (int c = 0; c < 8; c++)
                for (int l = 0; l < NL; l++) {
                    const vu v = load_words(blk + 2 * GROUP + (size_t)(c * GROUP + l * VW) * 4);
                    for (int s = 0; s < 4; s++) {
                        const vf q = sbyte_f(v, s);
                        for (int i = 0; i < MM; i++) part[i][l] = fmadd(q, splat(xb[(size_t)i * K + 4 * c + s]), part[i][l]);
                    }
                }
        } else {
            const int q5 = qtype == Q5_0 || qtype == Q5_1;
            for (int c = 0; c < 4; c++)
                for (int l = 0; l < NL; l++) {
                    vu lo = nibble_word(qtype, blk, c, l), hi = lo;     /* Q4: the nibbles straight from the word */
                    if (q5) nibble_words(qtype, blk, c, l, &lo, &hi);
                    for (int s = 0; s < 4; s++) {
                        const vf lf = q5 ? nib5_f(lo, 8 * s) : nib4_f(lo, 8 * s);
                        const vf hf = q5 ? nib5_f(hi, 8 * s) : nib4_f(hi, 8 * s + 4);
                        for (int i = 0; i < MM; i++) {
                            const float *xr = xb + (size_t)i * K + 4 * c + s;
                            part[i][l] = fmadd(lf, splat(xr[0]), part[i][l]);
                            part[i][l] = fmadd(hf, splat(xr[16]), part[i][l]);
                        }
                    }
                }
        }
        vf d[NL], m[NL];
        load_halves(blk, d);
        if (qtype == Q4_1 || qtype == Q5_1) load_halves(blk + 2 * GROUP, m);
        for (int l = 0; l < NL; l++)      /* d (q - 8) = d q + (-8 d), -8 d exact; Q5_0 likewise with 16 */
            if (qtype == Q4_0 || qtype == Q5_0) m[l] = d[l] * (qtype == Q4_0 ? -8.0f : -16.0f);
        for (int i = 0; i < MM; i++)
            for (int l = 0; l < NL; l++) {
                acc[i][l] = fmadd(d[l], part[i][l], acc[i][l]);
                if (qtype != Q8_0) acc[i][l] = fmadd(m[l], splat(sx[(size_t)i * blocks + b]), acc[i][l]);
            }
    }
}

/* Q4_K / Q5_K. One lane vector (VW rows) at a time: three sums per row of x stay in registers on AVX2 too. */
static inline __attribute__((always_inline)) void tile_k4(int qtype, const uint8_t *g, int K, const xin_t *in, int m0,
                                                          int MM, vf acc[MR][NL]) {
    const int supers = K / QKK, blocks = K / QK;
    const size_t gb = (size_t)GROUP * block_bytes(qtype);
    const float *x = in->x + (size_t)m0 * K, *sx = in->sx + (size_t)m0 * blocks;
    for (int l = 0; l < NL; l++) {
        for (int i = 0; i < MM; i++) acc[i][l] = splat(0);
        for (int b = 0; b < supers; b++) {
            const uint8_t *blk = g + (size_t)b * gb;
            const float *xb = x + (size_t)b * QKK;
            vf d[NL], dmin[NL];
            load_halves(blk, d);
            load_halves(blk + 2 * GROUP, dmin);
            for (int p = 0; p < 4; p++) {
                vf lo_sum[MR], hi_sum[MR];
                for (int i = 0; i < MM; i++) lo_sum[i] = hi_sum[i] = splat(0);
                for (int cq = 0; cq < 8; cq++) {
                    vu lo = k4_word(qtype, blk, p, cq, l), hi = lo;     /* Q4_K: the nibbles straight from the word */
                    if (qtype == Q5_K) k4_words(qtype, blk, p, cq, l, &lo, &hi);
                    for (int s = 0; s < 4; s++) {
                        const vf lf = qtype == Q5_K ? nib5_f(lo, 8 * s) : nib4_f(lo, 8 * s);
                        const vf hf = qtype == Q5_K ? nib5_f(hi, 8 * s) : nib4_f(hi, 8 * s + 4);
                        for (int i = 0; i < MM; i++) {
                            const float *xr = xb + (size_t)i * K + 64 * p + 4 * cq + s;
                            lo_sum[i] = fmadd(lf, splat(xr[0]), lo_sum[i]);
                            hi_sum[i] = fmadd(hf, splat(xr[32]), hi_sum[i]);
                        }
                    }
                }
                for (int h = 0; h < 2; h++) {
                    vi sc, mn;
                    k4_scale_min(blk, 2 * p + h, l, &sc, &mn);
                    /* d sc and dmin m are exact (an fp16 times a 6-bit integer) */
                    const vf D = d[l] * __builtin_convertvector(sc, vf);
                    const vf M = -(dmin[l] * __builtin_convertvector(mn, vf));
                    for (int i = 0; i < MM; i++) {
                        acc[i][l] = fmadd(D, h ? hi_sum[i] : lo_sum[i], acc[i][l]);
                        acc[i][l] = fmadd(M, splat(sx[(size_t)i * blocks + 8 * b + 2 * p + h]), acc[i][l]);
                    }
                }
            }
        }
    }
}

static inline __attribute__((always_inline)) void tile_q6(const uint8_t *g, int K, const xin_t *in, int m0, int MM,
                                                          vf acc[MR][NL]) {
    const int supers = K / QKK;
    const size_t gb = (size_t)GROUP * block_bytes(Q6_K);
    const float *x = in->x + (size_t)m0 * K;
    for (int l = 0; l < NL; l++) {
        for (int i = 0; i < MM; i++) acc[i][l] = splat(0);
        for (int b = 0; b < supers; b++) {
            const uint8_t *blk = g + (size_t)b * gb;
            const float *xb = x + (size_t)b * QKK;
            vf d[NL];
            load_halves(blk + GROUP * 208, d);
            for (int h = 0; h < 2; h++)
                for (int lh = 0; lh < 2; lh++)
                    for (int k = 0; k < 4; k++) {
                        vf part[MR];
                        for (int i = 0; i < MM; i++) part[i] = splat(0);
                        for (int cq = 0; cq < 4; cq++) {
                            const vu w = (vu)((vb)q6_word(blk, h, lh, k, cq, l) - 32);   /* bytes q - 32, signed */
                            for (int s = 0; s < 4; s++) {
                                const vf q = sbyte_f(w, s);
                                for (int i = 0; i < MM; i++)
                                    part[i] = fmadd(q, splat(xb[(size_t)i * K + 128 * h + 32 * k + 16 * lh + 4 * cq + s]),
                                                    part[i]);
                            }
                        }
                        const vf D = d[l] * __builtin_convertvector(q6_scale(blk, 8 * h + 2 * k + lh, l), vf);
                        for (int i = 0; i < MM; i++) acc[i][l] = fmadd(D, part[i], acc[i][l]);
                    }
        }
    }
}

/* -------------------------------------------------------------------------------------------- fast numerics */
#if defined(__AVX512VNNI__) && VW == 16
#define Q8_OFFSET 128       /* dpbusd takes the weights unsigned: Q8_0 quants go in as w + 128 */
#else
#define Q8_OFFSET 0
#endif

/* f rounded to fp16 (nearest, ties to even, as numpy's astype(float16)) and back: llama.cpp keeps the Q8_0
   activation scale as fp16, and gguf's quantizer with it, so the tests compare xd bit for bit. */
static inline float half_round(float f) {
#if defined(__F16C__)
    return _cvtsh_ss(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT));
#else
    uint32_t b;
    memcpy(&b, &f, 4);
    const uint32_t sign = (b >> 16) & 0x8000u, a = b & 0x7fffffffu;
    uint32_t h;
    if (a >= 0x7f800000u) h = a > 0x7f800000u ? 0x7e00u : 0x7c00u;
    else if (a >= 0x47800000u) h = 0x7c00u;                         /* >= 65536: inf */
    else if (a >= 0x38800000u) {                                   /* normal half; a carry may reach inf, rightly */
        h = (a - 0x38000000u) >> 13;
        const uint32_t rem = a & 0x1fffu;
        h += rem > 0x1000u || (rem == 0x1000u && (h & 1));
    } else if (a < 0x33000000u) h = 0;                              /* under 2^-25: rounds to zero */
    else {                                                         /* subnormal half: units of 2^-24 */
        const int shift = 126 - (int)(a >> 23);
        const uint32_t mant = (a & 0x7fffffu) | 0x800000u, rem = mant & ((1u << shift) - 1), tie = 1u << (shift - 1);
        h = mant >> shift;
        h += rem > tie || (rem == tie && (h & 1));
    }
    const uint8_t bytes[2] = {(uint8_t)((sign | h) & 0xff), (uint8_t)((sign | h) >> 8)};
    return half_to_float(bytes);
#endif
}

/* Quantize M rows of K floats (K % 32 == 0) per block of 32 as llama.cpp's quantize_row_q8_0 does:
   d = amax / 127, q = round(x / d) (0 when amax == 0), xq [M, K] int8, xd [M, K/32] float (d), xs [M, K/32] int32
   (sum of q). Bit for bit gguf's Python quantizer: q = roundf(x * (1 / d)) with d in float32 (half away from
   zero), then d rounded to fp16. no-reciprocal-math: -ffast-math would turn amax / 127 into amax * (1 / 127.f),
   which differs in the last bit for some amax. */
__attribute__((optimize("no-reciprocal-math")))
static void quantize_rows_q8(const float *x, int M, int K, int8_t *xq, float *xd, int32_t *xs) {
    const int blocks = K / QK;
    for (int i = 0; i < M; i++)
        for (int b = 0; b < blocks; b++) {
            const size_t o = (size_t)i * K + (size_t)b * QK;
            float amax = 0;
            for (int k = 0; k < QK; k++) amax = fmaxf(amax, fabsf(x[o + k]));
            const float d = amax / 127, id = d != 0 ? 1.0f / d : 0.0f;
            int32_t s = 0;
            for (int k = 0; k < QK; k++) {
                const float v = x[o + k] * id, a = fabsf(v), f = floorf(a);
                const int q = (int)f + (a - f >= 0.5f);
                const int sq = v < 0 ? -q : q;
                xq[o + k] = (int8_t)sq;
                s += sq;
            }
            xd[(size_t)i * blocks + b] = half_round(d);
            xs[(size_t)i * blocks + b] = s;
        }
}

/* llama.cpp's nearest_int: round half to even through the float adder (|f| < 2^22). */
static inline int nearest_int(float f) {
    const float v = f + 12582912.0f;
    int32_t i;
    memcpy(&i, &v, 4);
    return (i & 0x007fffff) - 0x00400000;
}

/* Quantize M rows of K floats (K % 256 == 0) per 256 as llama.cpp's quantize_row_q8_K: the element of largest
   magnitude (the first) maps to -127 through iscale = -127 / max, q = min(127, nearest(iscale x)), d = 1 / iscale
   kept as float; xq [M, K], xd [M, K/256], xs [M, K/16] the sums of q per 16 (llama.cpp's bsums). */
__attribute__((optimize("no-reciprocal-math")))
static void quantize_rows_q8k(const float *x, int M, int K, int8_t *xq, float *xd, int32_t *xs) {
    const int supers = K / QKK;
    for (int i = 0; i < M; i++)
        for (int b = 0; b < supers; b++) {
            const size_t o = (size_t)i * K + (size_t)b * QKK;
            float amax = 0, max = 0;
            for (int k = 0; k < QKK; k++)
                if (fabsf(x[o + k]) > amax) {
                    amax = fabsf(x[o + k]);
                    max = x[o + k];
                }
            int32_t *sums = xs + (size_t)i * (K / 16) + (size_t)b * 16;
            if (amax == 0) {
                memset(xq + o, 0, QKK);
                memset(sums, 0, 16 * sizeof *sums);
                xd[(size_t)i * supers + b] = 0;
                continue;
            }
            const float iscale = -127.0f / max;
            for (int s = 0; s < 16; s++) {
                int32_t sum = 0;
                for (int k = 16 * s; k < 16 * s + 16; k++) {
                    const int q = nearest_int(iscale * x[o + k]);
                    xq[o + k] = (int8_t)(q > 127 ? 127 : q);
                    sum += xq[o + k];
                }
                sums[s] = sum;
            }
            xd[(size_t)i * supers + b] = 1.0f / iscale;
        }
}

/* Integer dot products of unsigned weight bytes (each at most 63) with signed activation bytes: dot_add adds the 4
   byte products of each lane to it. VNNI's dpbusd adds into int32 lanes; maddubs (AVX-512BW, AVX2) sums byte pairs
   into saturating int16 halves of a lane (*a16), which hold `depth` such adds before dot_flush must move them to
   int32 (the pairs are at most 2 * qmax * 128). */
#if defined(__AVX512VNNI__) && VW == 16
static inline void dot_add(vi *a32, vi *a16, vu w, int32_t xw) {
    (void)a16;
    *a32 = (vi)_mm512_dpbusd_epi32((__m512i)*a32, (__m512i)w, _mm512_set1_epi32(xw));
}
static inline void dot_flush(vi *a32, vi *a16) { (void)a32; (void)a16; }
#elif defined(__AVX512BW__) && VW == 16
static inline void dot_add(vi *a32, vi *a16, vu w, int32_t xw) {
    (void)a32;
    *a16 = (vi)_mm512_add_epi16((__m512i)*a16, _mm512_maddubs_epi16((__m512i)w, _mm512_set1_epi32(xw)));
}
static inline void dot_flush(vi *a32, vi *a16) {
    *a32 += (vi)_mm512_madd_epi16((__m512i)*a16, _mm512_set1_epi16(1));
    *a16 = (vi){};
}
#elif defined(__AVX2__) && VW == 8
static inline void dot_add(vi *a32, vi *a16, vu w, int32_t xw) {
    (void)a32;
    *a16 = (vi)_mm256_add_epi16((__m256i)*a16, _mm256_maddubs_epi16((__m256i)w, _mm256_set1_epi32(xw)));
}
static inline void dot_flush(vi *a32, vi *a16) {
    *a32 += (vi)_mm256_madd_epi16((__m256i)*a16, _mm256_set1_epi16(1));
    *a16 = (vi){};
}
#else
static inline void dot_add(vi *a32, vi *a16, vu w, int32_t xw) {
    (void)a16;
    for (int s = 0; s < 4; s++) *a32 += (vi)((w >> (8 * s)) & 0xffu) * (int32_t)(int8_t)(xw >> (8 * s));
}
static inline void dot_flush(vi *a32, vi *a16) { (void)a32; (void)a16; }
#endif

/* How many dot_adds an int16 half holds for quants of at most qmax: 32767 / (2 qmax 128). */
#define DOT_DEPTH(qmax) (32767 / (256 * (qmax)))

/* The integer dot products of one 32-weight block of a group with MM rows of quantized x (row i at xb + i K):
   isum[i][l] = lanes l * VW.. of sum_k q_w[k] q_x[k], Q8_0 weights offset by Q8_OFFSET. */
static inline __attribute__((always_inline)) void block_dots(int qtype, const uint8_t *blk, const int8_t *xb, int K,
                                                             int MM, vi isum[MR][NL]) {
    for (int i = 0; i < MM; i++)
        for (int l = 0; l < NL; l++) isum[i][l] = (vi){};
    const uint8_t *qs = blk + 2 * GROUP;
    if (qtype == Q8_0) {
#if defined(__AVX512VNNI__) && VW == 16
        for (int c = 0; c < 8; c++) {
            const __m512i w = _mm512_xor_si512(_mm512_loadu_si512(qs + c * 64), _mm512_set1_epi32((int)0x80808080u));
            for (int i = 0; i < MM; i++)
                isum[i][0] = (vi)_mm512_dpbusd_epi32((__m512i)isum[i][0], w,
                                                     _mm512_set1_epi32(load_i32(xb + (size_t)i * K + 4 * c)));
        }
#elif defined(__AVX512BW__) && VW == 16
        /* llama.cpp's sign trick: |w| (-128 -> 128 as u8) against x negated where w < 0, so a pair is at most
           2 * 128 * 127 = 32512 and never saturates. Each chunk's pairs go to int32 at once (two would not fit). */
        const __m512i ones = _mm512_set1_epi16(1);
        for (int c = 0; c < 8; c++) {
            const __m512i w = _mm512_loadu_si512(qs + c * 64), aw = _mm512_abs_epi8(w);
            const __mmask64 neg = _mm512_movepi8_mask(w);
            for (int i = 0; i < MM; i++) {
                const __m512i xv = _mm512_set1_epi32(load_i32(xb + (size_t)i * K + 4 * c));
                const __m512i xs = _mm512_mask_sub_epi8(xv, neg, _mm512_setzero_si512(), xv);
                isum[i][0] = (vi)_mm512_add_epi32((__m512i)isum[i][0],
                                                  _mm512_madd_epi16(_mm512_maddubs_epi16(aw, xs), ones));
            }
        }
#elif defined(__AVX2__) && VW == 8
        const __m256i ones = _mm256_set1_epi16(1);
        for (int c = 0; c < 8; c++)
            for (int l = 0; l < NL; l++) {
                const __m256i w = _mm256_loadu_si256((const __m256i *)(qs + c * 64 + l * 32)), aw = _mm256_abs_epi8(w);
                for (int i = 0; i < MM; i++) {
                    const __m256i xs = _mm256_sign_epi8(_mm256_set1_epi32(load_i32(xb + (size_t)i * K + 4 * c)), w);
                    isum[i][l] = (vi)_mm256_add_epi32((__m256i)isum[i][l],
                                                      _mm256_madd_epi16(_mm256_maddubs_epi16(aw, xs), ones));
                }
            }
#else
        for (int c = 0; c < 8; c++)
            for (int l = 0; l < NL; l++) {
                const vu v = load_words(qs + (size_t)(c * GROUP + l * VW) * 4);
                for (int s = 0; s < 4; s++) {
                    const vi q = (vi)(v << (24 - 8 * s)) >> 24;
                    for (int i = 0; i < MM; i++) isum[i][l] += q * (int32_t)xb[(size_t)i * K + 4 * c + s];
                }
            }
#endif
        return;
    }
    /* Q4_0, Q4_1, Q5_0, Q5_1: unsigned quants of at most 15 or 31; two dot_adds (lo, hi) per chunk. */
    const int depth = DOT_DEPTH(qtype == Q5_0 || qtype == Q5_1 ? 31 : 15) / 2;
    vi s16[MR][NL];
    for (int i = 0; i < MM; i++)
        for (int l = 0; l < NL; l++) s16[i][l] = (vi){};
    for (int c = 0; c < 4; c++) {
        for (int l = 0; l < NL; l++) {
            vu lo, hi;
            nibble_words(qtype, blk, c, l, &lo, &hi);
            for (int i = 0; i < MM; i++) {
                const int8_t *xr = xb + (size_t)i * K + 4 * c;
                dot_add(&isum[i][l], &s16[i][l], lo, load_i32(xr));
                dot_add(&isum[i][l], &s16[i][l], hi, load_i32(xr + 16));
            }
        }
        if ((c + 1) % depth == 0 || c == 3)
            for (int i = 0; i < MM; i++)
                for (int l = 0; l < NL; l++) dot_flush(&isum[i][l], &s16[i][l]);
    }
}

static inline __attribute__((always_inline)) void tile_q8_32(int qtype, const uint8_t *g, int K, const xin_t *in,
                                                             int m0, int MM, vf acc[MR][NL]) {
    const int blocks = K / QK;
    const size_t gb = (size_t)GROUP * block_bytes(qtype);
    const int8_t *xq = in->q + (size_t)m0 * K;
    const float *xd = in->d + (size_t)m0 * blocks;
    const int32_t *xs = in->s + (size_t)m0 * blocks;
    const int has_min = qtype == Q4_1 || qtype == Q5_1;
    for (int i = 0; i < MM; i++)
        for (int l = 0; l < NL; l++) acc[i][l] = splat(0);
    for (int b = 0; b < blocks; b++) {
        const uint8_t *blk = g + (size_t)b * gb;
        vi isum[MR][NL];
        block_dots(qtype, blk, xq + (size_t)b * QK, K, MM, isum);
        vf d[NL], m[NL];
        load_halves(blk, d);
        if (has_min) load_halves(blk + 2 * GROUP, m);
        for (int i = 0; i < MM; i++) {
            const size_t ib = (size_t)i * blocks + b;
            const int32_t offset = qtype == Q4_0 ? 8 * xs[ib] : qtype == Q5_0 ? 16 * xs[ib]
                                   : qtype == Q8_0 ? Q8_OFFSET * xs[ib] : 0;
            const vf dx = splat(xd[ib]);
            for (int l = 0; l < NL; l++) {
                /* d_w d_x is exact (two fp16 values) and so is the integer sum as a float (|sum| < 2^21): the term
                   rounds once, in the FMA. */
                const vf dot = __builtin_convertvector(isum[i][l] - offset, vf);
                acc[i][l] = fmadd(d[l] * dx, dot, acc[i][l]);
                /* Q4_1's min term m * sum(x) with x as quantized (llama.cpp's q8_1 s = d_x sum q_x): the whole
                   result is then exactly the weights times the quantized activations. With the float sum of x
                   instead, the error measured 2.3x larger (it becomes sum (w - m)(x^ - x), |w - m| >> |w|). */
                if (has_min) acc[i][l] = fmadd(m[l], splat(xd[ib] * (float)xs[ib]), acc[i][l]);
            }
        }
    }
}

/* Q4_K / Q5_K with x as Q8_K: per superblock, sumi = sum_j sc_j dot_j and summ = sum_j m_j (sum q_x)_j in int32
   (exact), then two FMAs. One lane vector at a time (three int32 sums per row of x in registers). */
static inline __attribute__((always_inline)) void tile_q8_k4(int qtype, const uint8_t *g, int K, const xin_t *in,
                                                             int m0, int MM, vf acc[MR][NL]) {
    const int supers = K / QKK;
    const size_t gb = (size_t)GROUP * block_bytes(qtype);
    const int8_t *xq = in->qk + (size_t)m0 * K;
    const float *xd = in->dk + (size_t)m0 * supers;
    const int32_t *xs = in->sk + (size_t)m0 * (K / 16);
    const int depth = DOT_DEPTH(qtype == Q5_K ? 31 : 15);
    for (int l = 0; l < NL; l++) {
        for (int i = 0; i < MM; i++) acc[i][l] = splat(0);
        for (int b = 0; b < supers; b++) {
            const uint8_t *blk = g + (size_t)b * gb;
            vi sumi[MR];
            for (int i = 0; i < MM; i++) sumi[i] = (vi){};
            for (int p = 0; p < 4; p++) {
                vi lo_sum[MR], hi_sum[MR], lo16[MR], hi16[MR];
                for (int i = 0; i < MM; i++) lo_sum[i] = hi_sum[i] = lo16[i] = hi16[i] = (vi){};
                for (int cq = 0; cq < 8; cq++) {
                    vu lo, hi;
                    k4_words(qtype, blk, p, cq, l, &lo, &hi);
                    for (int i = 0; i < MM; i++) {
                        const int8_t *xr = xq + (size_t)i * K + (size_t)b * QKK + 64 * p + 4 * cq;
                        dot_add(&lo_sum[i], &lo16[i], lo, load_i32(xr));
                        dot_add(&hi_sum[i], &hi16[i], hi, load_i32(xr + 32));
                    }
                    if ((cq + 1) % depth == 0 || cq == 7)
                        for (int i = 0; i < MM; i++) {
                            dot_flush(&lo_sum[i], &lo16[i]);
                            dot_flush(&hi_sum[i], &hi16[i]);
                        }
                }
                vi sc_lo, sc_hi, mn;
                k4_scale_min(blk, 2 * p, l, &sc_lo, &mn);
                k4_scale_min(blk, 2 * p + 1, l, &sc_hi, &mn);
                for (int i = 0; i < MM; i++) sumi[i] += sc_lo * lo_sum[i] + sc_hi * hi_sum[i];
            }
            vi summ[MR];
            for (int i = 0; i < MM; i++) summ[i] = (vi){};
            for (int j = 0; j < 8; j++) {
                vi sc, mn;
                k4_scale_min(blk, j, l, &sc, &mn);
                for (int i = 0; i < MM; i++) {
                    const int32_t *s16 = xs + (size_t)i * (K / 16) + (size_t)b * 16 + 2 * j;
                    summ[i] += mn * (s16[0] + s16[1]);
                }
            }
            vf d[NL], dmin[NL];
            load_halves(blk, d);
            load_halves(blk + 2 * GROUP, dmin);
            for (int i = 0; i < MM; i++) {
                const vf dx = splat(xd[(size_t)i * supers + b]);
                acc[i][l] = fmadd(d[l] * dx, __builtin_convertvector(sumi[i], vf), acc[i][l]);
                acc[i][l] = fmadd(-(dmin[l] * dx), __builtin_convertvector(summ[i], vf), acc[i][l]);
            }
        }
    }
}

/* Q6_K with x as Q8_K: each sub-block's dot starts from -32 (sum q_x) (the quants' offset, free), then
   sumi += sc_s dot_s; one FMA per superblock. */
static inline __attribute__((always_inline)) void tile_q8_q6(const uint8_t *g, int K, const xin_t *in, int m0, int MM,
                                                             vf acc[MR][NL]) {
    const int supers = K / QKK;
    const size_t gb = (size_t)GROUP * block_bytes(Q6_K);
    const int8_t *xq = in->qk + (size_t)m0 * K;
    const float *xd = in->dk + (size_t)m0 * supers;
    const int32_t *xs = in->sk + (size_t)m0 * (K / 16);
    const int depth = DOT_DEPTH(63);
    for (int l = 0; l < NL; l++) {
        for (int i = 0; i < MM; i++) acc[i][l] = splat(0);
        for (int b = 0; b < supers; b++) {
            const uint8_t *blk = g + (size_t)b * gb;
            vi sumi[MR];
            for (int i = 0; i < MM; i++) sumi[i] = (vi){};
            for (int h = 0; h < 2; h++)
                for (int lh = 0; lh < 2; lh++)
                    for (int k = 0; k < 4; k++) {
                        const int s = 8 * h + 2 * k + lh;
                        vi dot[MR], d16[MR];
                        for (int i = 0; i < MM; i++) {
                            dot[i] = (vi){} - 32 * xs[(size_t)i * (K / 16) + (size_t)b * 16 + s];
                            d16[i] = (vi){};
                        }
                        for (int cq = 0; cq < 4; cq++) {
                            const vu w = q6_word(blk, h, lh, k, cq, l);
                            for (int i = 0; i < MM; i++)
                                dot_add(&dot[i], &d16[i], w,
                                        load_i32(xq + (size_t)i * K + (size_t)b * QKK + 128 * h + 32 * k + 16 * lh + 4 * cq));
                            if ((cq + 1) % depth == 0 || cq == 3)
                                for (int i = 0; i < MM; i++) dot_flush(&dot[i], &d16[i]);
                        }
                        const vi sc = q6_scale(blk, s, l);
                        for (int i = 0; i < MM; i++) sumi[i] += sc * dot[i];
                    }
            vf d[NL];
            load_halves(blk + GROUP * 208, d);
            for (int i = 0; i < MM; i++)
                acc[i][l] = fmadd(d[l] * splat(xd[(size_t)i * supers + b]), __builtin_convertvector(sumi[i], vf),
                                  acc[i][l]);
        }
    }
}

/* Row i of acc to row m of y, columns col..col+valid-1, with bias / residual (offset like y). */
static inline void store_group(const vf acc[NL], int valid, float *y, int ldy, int m, int col, const float *bias,
                               const float *res) {
    float v[GROUP];
    memcpy(v, acc, sizeof v);
    float *yr = y + (size_t)m * ldy + col;
    const float *rr = res ? res + (size_t)m * ldy + col : NULL;
    for (int j = 0; j < valid; j++) yr[j] = v[j] + (bias ? bias[col + j] : 0.0f) + (rr ? rr[j] : 0.0f);
}

/* The rows of x go in tiles of ROW_TILES (or K_ROW_TILES) rows: STEP(T, TILE_FN) runs every whole tile of T rows
   left, with T a constant so that a tile's sums stay in registers; a row's arithmetic is the same in every tile. */
#define STEP(T, TILE_FN)                                                                              \
    for (; m + (T) <= M; m += (T)) {                                                                  \
        TILE_FN(qtype, wg, K, in, m, (T), acc);                                                       \
        for (int i = 0; i < (T); i++) store_group(acc[i], valid, y, ldy, m + i, col, bias, res);       \
    }
#define GROUP_ARGS const uint8_t *wg, int K, const xin_t *in, int M, int valid, float *y, int ldy, int col,   \
                   const float *bias, const float *res

/* One function per type and numerics (not inlined into one another: GCC inlines a callee's every branch before
   it drops the ones a constant type rules out, and one function holding all of them took minutes to compile). */
#define INSTANCE(NAME, QTYPE, TILE_FN, TILES)                                                         \
    static __attribute__((noinline)) void NAME(GROUP_ARGS) {                                          \
        const int qtype = QTYPE;                                                                      \
        vf acc[MR][NL];                                                                               \
        int m = 0;                                                                                    \
        TILES(STEP, TILE_FN)                                                                          \
    }
#define TILE_Q6(qtype, ...) ((void)(qtype), tile_q6(__VA_ARGS__))
#define TILE_Q8_Q6(qtype, ...) ((void)(qtype), tile_q8_q6(__VA_ARGS__))
INSTANCE(rows_q4_0, Q4_0, tile_32, ROW_TILES)
INSTANCE(rows_q4_1, Q4_1, tile_32, ROW_TILES)
INSTANCE(rows_q5_0, Q5_0, tile_32, ROW_TILES)
INSTANCE(rows_q5_1, Q5_1, tile_32, ROW_TILES)
INSTANCE(rows_q8_0, Q8_0, tile_32, ROW_TILES)
INSTANCE(rows_q4_k, Q4_K, tile_k4, K_ROW_TILES)
INSTANCE(rows_q5_k, Q5_K, tile_k4, K_ROW_TILES)
INSTANCE(rows_q6_k, Q6_K, TILE_Q6, K_ROW_TILES)
INSTANCE(fast_q4_0, Q4_0, tile_q8_32, ROW_TILES)
INSTANCE(fast_q4_1, Q4_1, tile_q8_32, ROW_TILES)
INSTANCE(fast_q5_0, Q5_0, tile_q8_32, ROW_TILES)
INSTANCE(fast_q5_1, Q5_1, tile_q8_32, ROW_TILES)
INSTANCE(fast_q8_0, Q8_0, tile_q8_32, ROW_TILES)
INSTANCE(fast_q4_k, Q4_K, tile_q8_k4, K_FAST_ROW_TILES)
INSTANCE(fast_q5_k, Q5_K, tile_q8_k4, K_FAST_ROW_TILES)
INSTANCE(fast_q6_k, Q6_K, TILE_Q8_Q6, K_FAST_ROW_TILES)
#undef INSTANCE
#undef STEP

/* Group wg of a rows16 weight of type qtype (rows col.. of the output, valid of them) against all M rows of x,
   into columns col.. of y (row stride ldy), bias / res offset like y. */
static void group_rows(int qtype, int fast, GROUP_ARGS) {
#define CASE(T, EXACT, FAST)                                                                          \
    case T: (fast ? FAST : EXACT)(wg, K, in, M, valid, y, ldy, col, bias, res); break;
    switch (qtype) {
    CASE(Q4_0, rows_q4_0, fast_q4_0)
    CASE(Q4_1, rows_q4_1, fast_q4_1)
    CASE(Q5_0, rows_q5_0, fast_q5_0)
    CASE(Q5_1, rows_q5_1, fast_q5_1)
    CASE(Q8_0, rows_q8_0, fast_q8_0)
    CASE(Q4_K, rows_q4_k, fast_q4_k)
    CASE(Q5_K, rows_q5_k, fast_q5_k)
    CASE(Q6_K, rows_q6_k, fast_q6_k)
    }
#undef CASE
}
#undef GROUP_ARGS

#endif
