/* y = x @ dequant(w)^T (+ bias) (+ residual) for GGUF block-quantized w (Q4_0, Q4_1, Q8_0) and float32 x:
   the "exact" numerics (quantized weights x fp32 activations) of a decode step or a small batch.

   Decode reads every weight once per step, so bytes are the cost: w stays in GGML's own blocks of 32
   (Q4_1: 20 bytes, fp16 scale and min, 16 bytes of nibbles), each block is turned into floats in
   registers (w = d * q + m, as gguf's dequantize) and used at once for every row of x of the tile.
   Tiles of 4 w rows x MT x rows keep 4 * MT vector sums in registers; threads take ranges of 64 w rows,
   so each output element is summed by one thread in a fixed order whatever the thread count.

   The source is built once per instruction set (python: tgi_nb/models/quant.py picks the one the CPU
   runs): with -march=x86-64-v4 GCC's vector extensions below become AVX-512 (16 floats), with
   x86-64-v3 AVX2 + FMA + F16C (8 floats), with plain x86-64 SSE2 (4 floats, software fp16). */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__F16C__) || defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "rms_norm.h"

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
#define QK 32          /* weights per block */
#define NVB (QK / VW)   /* vectors per block */
#define RT 4           /* w rows per tile */

typedef float vf __attribute__((vector_size(VW * 4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));

enum { Q4_0 = 2, Q4_1 = 3, Q8_0 = 8 };   /* GGML type ids */

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

static inline int block_bytes(int qtype) {
    return qtype == Q4_0 ? 18 : qtype == Q4_1 ? 20 : qtype == Q8_0 ? 34 : 0;
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

/* VW bytes widened to VW int32 lanes. GCC's __builtin_convertvector does this one lane at a time, so the
   widening instructions are spelled out where the instruction set has them. */
static inline vi load_u8(const uint8_t *p) {
#if defined(__AVX512F__)
    return (vi)_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
#elif defined(__AVX2__)
    return (vi)_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
#else
    vi out;
    for (int i = 0; i < VW; i++) out[i] = p[i];
    return out;
#endif
}
static inline vi load_s8(const uint8_t *p) {
#if defined(__AVX512F__)
    return (vi)_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p));
#elif defined(__AVX2__)
    return (vi)_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p));
#else
    vi out;
    for (int i = 0; i < VW; i++) out[i] = (int8_t)p[i];
    return out;
#endif
}

/* The block's scale d and (Q4_1) min m as vectors. Both halves are converted in one instruction where F16C is
   there, instead of a load, insert, convert and broadcast per half. */
static inline void block_scales(const uint8_t *blk, int qtype, vf *d, vf *m) {
#if defined(__F16C__)
    uint32_t raw;
    memcpy(&raw, blk, 4);        /* Q4_0 / Q8_0: the second half is the first two quants, unused */
    const __m128 dm = _mm_cvtph_ps(_mm_cvtsi32_si128((int)raw));
    *d = splat(dm[0]);
    *m = qtype == Q4_1 ? splat(dm[1]) : splat(0);
#else
    *d = splat(half_to_float(blk));
    *m = qtype == Q4_1 ? splat(half_to_float(blk + 2)) : splat(0);
#endif
}

/* One block as NVB vectors of floats (vector j: elements j*VW .. j*VW+VW-1), the values gguf's dequantize gives:
   d * q (Q8_0), d * (q - 8) (Q4_0), d * q + m (Q4_1; d * q is exact in float32, so fused or not the sum
   rounds once). GGML's 4-bit blocks hold element i in the low nibble of byte i, element i + 16 in the high. */
static inline void dequant_block(const uint8_t *blk, int qtype, vf out[NVB]) {
    vf d, m;
    block_scales(blk, qtype, &d, &m);
    if (qtype == Q8_0) {
        for (int j = 0; j < NVB; j++) out[j] = __builtin_convertvector(load_s8(blk + 2 + j * VW), vf) * d;
        return;
    }
    const uint8_t *qs = blk + (qtype == Q4_1 ? 4 : 2);
    for (int j = 0; j < NVB; j++) {
        vi q = load_u8(qs + (j * VW) % 16);
        q = j * VW >= 16 ? q >> 4 : q & 15;
        const vf qf = __builtin_convertvector(q, vf);
        if (qtype == Q4_1) out[j] = fmadd(qf, d, m);     /* d * q is exact: fused or not, one rounding */
        else out[j] = (qf - 8.0f) * d;
    }
}

static inline float hsum(vf v) {
    float s = 0;
    for (int i = 0; i < VW; i++) s += v[i];
    return s;
}

static inline void store(float *y, const float *res, const float *bias, int ldy, int m, int n, float v) {
    if (bias) v += bias[n];
    if (res) v += res[(size_t)m * ldy + n];
    y[(size_t)m * ldy + n] = v;
}

/* Rows 0..R-1 of wr (R <= RT) against rows m..m+MM-1 of x (MM <= MT), into columns 0..R-1 of y. Inlined with
   constant R and MM, so the sums stay in registers. */
static inline __attribute__((always_inline)) void tile(const uint8_t *wr, size_t row_bytes, int qtype, int bb,
                                                       const float *x, int K, int m, int MM, int R, int ldy,
                                                       float *y, const float *bias, const float *res) {
    vf acc[RT][MT];
    for (int r = 0; r < RT; r++)
        for (int i = 0; i < MT; i++) acc[r][i] = splat(0);
    const int blocks = K / QK;
    for (int b = 0; b < blocks; b++) {
        vf wv[RT][NVB];
        for (int r = 0; r < R; r++) dequant_block(wr + r * row_bytes + (size_t)b * bb, qtype, wv[r]);
        for (int i = 0; i < MM; i++) {
            const float *xb = x + (size_t)(m + i) * K + (size_t)b * QK;
            for (int j = 0; j < NVB; j++) {
                vf xv;
                memcpy(&xv, xb + j * VW, sizeof xv);
                for (int r = 0; r < R; r++) acc[r][i] = fmadd(wv[r][j], xv, acc[r][i]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int i = 0; i < MM; i++) store(y, res, bias, ldy, m + i, r, hsum(acc[r][i]));
}

/* The per-type instantiation: qtype constant inside, so each block's unpacking is straight-line code. */
static inline __attribute__((always_inline)) void columns_of(
        int qtype, const uint8_t *w, size_t row_bytes, int rows, const float *x, int M, int K, int ldy, float *y,
        const float *bias, const float *res) {
    const int bb = block_bytes(qtype);
    for (int n = 0; n < rows; n += RT) {
        const int R = rows - n < RT ? rows - n : RT;
        const uint8_t *wr = w + (size_t)n * row_bytes;
        float *yn = y + n;
        const float *bn = bias ? bias + n : NULL, *rn = res ? res + n : NULL;
        int m = 0;
        if (R == RT) {
            for (; m + MT <= M; m += MT) tile(wr, row_bytes, qtype, bb, x, K, m, MT, RT, ldy, yn, bn, rn);
            for (; m < M; m++) tile(wr, row_bytes, qtype, bb, x, K, m, 1, RT, ldy, yn, bn, rn);
        } else {
            for (; m < M; m++) tile(wr, row_bytes, qtype, bb, x, K, m, 1, R, ldy, yn, bn, rn);
        }
    }
}

/* ``rows`` rows of w (from its first) against the M rows of x, into columns 0..rows-1 of y (row stride ldy);
   bias and res are offset like y. */
static void columns(int qtype, const uint8_t *w, size_t row_bytes, int rows, const float *x, int M, int K,
                    int ldy, float *y, const float *bias, const float *res) {
    switch (qtype) {
    case Q4_0: columns_of(Q4_0, w, row_bytes, rows, x, M, K, ldy, y, bias, res); break;
    case Q4_1: columns_of(Q4_1, w, row_bytes, rows, x, M, K, ldy, y, bias, res); break;
    default: columns_of(Q8_0, w, row_bytes, rows, x, M, K, ldy, y, bias, res); break;
    }
}


#define CHUNK 64
#define SILU_MAX_ROWS 64

/* out[j] = silu(g[j]) * u[j] for j < width. Its own function with fast-math on: the build turns associative math
   off for the sums, which also stops GCC from vectorizing expf (libmvec), and scalar expf made this epilogue a third
   of a decode step's gate|up product. One row per call (noinline): vector and scalar expf differ in the last bit,
   so which elements take the vector loop must depend on the width only, never on how many rows share the call. */
__attribute__((noinline, optimize("fast-math")))
static void silu_mul_row(const float *g, const float *u, int width, float *out) {
    for (int j = 0; j < width; j++) out[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
}

static void silu_mul_rows(const float *gate, const float *up, int ldg, int M, int width, float *y, int ldy) {
    for (int m = 0; m < M; m++) silu_mul_row(gate + (size_t)m * ldg, up + (size_t)m * ldg, width, y + (size_t)m * ldy);
}

/* The vector width this build computes with (16: AVX-512, 8: AVX2, 4: SSE2 or other), for tests and logs. */
int tgi_nb_quant_vector_width(void) { return VW; }

/* y = x @ dequant(w)^T (+ bias) (+ residual), with small_gemm.c's two fusions:
   - norm_weight != NULL: x is first RMS-normalized row by row (weight norm_weight, epsilon eps);
   - silu_mul != 0: w is a fused [gate; up] weight of N = 2 * I rows and y is [M, I] =
     silu(x @ gate^T) * (x @ up^T) (bias, if any, is [N]; residual must be NULL; M <= 64).
   x: [M, K] float32, w: N rows of K / 32 blocks of type qtype (GGML ids: 2 Q4_0, 3 Q4_1, 8 Q8_0),
   bias: [N] or NULL, res: [M, N] or NULL (may alias y), y: [M, N]; all contiguous.
   Returns 0, 1 when out of memory, 2 for arguments outside what is supported. */
int tgi_nb_quant_gemm(const float *x, const uint8_t *w, int qtype, const float *bias, const float *res, float *y,
                      int M, int N, int K, int nthreads, const float *norm_weight, float eps, int silu_mul) {
    const int bb = block_bytes(qtype);
    if (!bb || K % QK || M < 1 || N < 1) return 2;
    if (silu_mul && (res || M > SILU_MAX_ROWS || N % 2)) return 2;
    const size_t row_bytes = (size_t)(K / QK) * bb;
    float *xn = NULL;
    if (norm_weight) {
        xn = malloc(sizeof(float) * (size_t)M * K);
        if (!xn) return 1;
        rms_norm_rows(x, norm_weight, eps, M, K, xn);
        x = xn;
    }
    if (!silu_mul) {
        const int chunks = (N + CHUNK - 1) / CHUNK;
        #pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int c = 0; c < chunks; c++) {
            const int n0 = c * CHUNK, width = N - n0 < CHUNK ? N - n0 : CHUNK;
            columns(qtype, w + (size_t)n0 * row_bytes, row_bytes, width, x, M, K, N, y + n0,
                    bias ? bias + n0 : NULL, res ? res + n0 : NULL);
        }
    } else {
        /* Output column j needs gate row j and up row I + j: a chunk computes both for CHUNK columns into its
           own scratch, then combines them. */
        const int I = N / 2, chunks = (I + CHUNK - 1) / CHUNK;
        #pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int c = 0; c < chunks; c++) {
            float gate[SILU_MAX_ROWS * CHUNK], up[SILU_MAX_ROWS * CHUNK];
            const int n0 = c * CHUNK, width = I - n0 < CHUNK ? I - n0 : CHUNK;
            columns(qtype, w + (size_t)n0 * row_bytes, row_bytes, width, x, M, K, CHUNK, gate,
                    bias ? bias + n0 : NULL, NULL);
            columns(qtype, w + (size_t)(I + n0) * row_bytes, row_bytes, width, x, M, K, CHUNK, up,
                    bias ? bias + I + n0 : NULL, NULL);
            silu_mul_rows(gate, up, CHUNK, M, width, y + n0, I);
        }
    }
    free(xn);
    return 0;
}

/* Dequantize rows of w ([N rows of K / 32 blocks]) to float32: row rows[i] into out[i] for i < count, or every
   row (count = N) when rows is NULL. For an embedding lookup (a few ids) and for the prefill path, which
   dequantizes one layer into a scratch buffer and hands it to oneDNN. Returns 0, or 2 for a bad type, K or
   row id. */
int tgi_nb_dequantize(const uint8_t *w, int qtype, int N, int K, const int64_t *rows, int count, float *out,
                      int nthreads) {
    const int bb = block_bytes(qtype);
    if (!bb || K % QK) return 2;
    if (rows)
        for (int i = 0; i < count; i++)
            if (rows[i] < 0 || rows[i] >= N) return 2;
    const size_t row_bytes = (size_t)(K / QK) * bb;
    const int total = rows ? count : N;
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (total > 16)
    for (int i = 0; i < total; i++) {
        const uint8_t *src = w + (size_t)(rows ? rows[i] : i) * row_bytes;
        float *dst = out + (size_t)i * K;
        for (int b = 0; b < K / QK; b++) {
            vf v[NVB];
            dequant_block(src + (size_t)b * bb, qtype, v);
            memcpy(dst + (size_t)b * QK, v, sizeof v);
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------------------------
   The "rows16" layout: the same blocks, regrouped once at load (tgi_nb/models/quant.py, QuantizedTensor.to_layout)
   so that vector lanes are weight rows. Rows go 16 to a group (the last group padded with zero blocks); each group
   holds, for each block of 32 columns in order:
     d[16]   the 16 rows' fp16 scales,
     m[16]   their fp16 mins (Q4_1 only),
     quants  Q4_0 / Q4_1: 4 chunks of 16 uint32: chunk c, lane j = bytes 4c..4c+3 of row j's 16 nibble bytes
             (byte s: low nibble = column 4c+s, high nibble = column 4c+s+16, as GGML stores them);
             Q8_0: 8 chunks of 16 uint32: chunk c, lane j = row j's int8 quants of columns 4c..4c+3.
   The bytes are GGML's, only moved (Q4_1: 16 x 20 = 32 + 32 + 256 per group and block).

   A chunk loaded as uint32 lanes gives, after a shift and a mask, one column of 16 rows per byte: no per-row
   unpacking, no horizontal sums, one fp16 conversion per 16 scales. The scales come out of the block sum,
       sum_k (d q_k + m) x_k = d * sum_k q_k x_k + m * sum_k x_k,
   with sum_k x_k per row of x and block computed once per call: about half the instructions per weight of the
   per-row kernel above, which decode at one token was bound by. Mathematically the same sum; only the rounding
   differs (the "exact" numerics: no activation is quantized). Threads take contiguous ranges of groups, and every
   output is summed by one thread in the same order whatever the thread count or the other rows of x. */
#define GROUP 16
#define NL (GROUP / VW)          /* vectors per group of rows */
#if defined(__AVX512F__)
#define MR 8                     /* rows of x per tile: MR * 2 sums + 5 temporaries of 32 vector registers */
#else
#define MR 2
#endif

typedef uint32_t vu __attribute__((vector_size(VW * 4)));

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

/* One group of w (16 rows) against MM rows of x (MM constant where inlined): acc[i][l] = the 16 sums of row i. */
static inline __attribute__((always_inline)) void group_tile(int qtype, const uint8_t *g, int blocks,
                                                             const float *x, const float *sx, int K, int MM,
                                                             vf acc[MR][NL]) {
    const size_t gb = (size_t)GROUP * block_bytes(qtype);
    for (int i = 0; i < MM; i++)
        for (int l = 0; l < NL; l++) acc[i][l] = splat(0);
    for (int b = 0; b < blocks; b++) {
        const uint8_t *blk = g + (size_t)b * gb;
        const float *xb = x + (size_t)b * QK;
        vf part[MR][NL];
        for (int i = 0; i < MM; i++)
            for (int l = 0; l < NL; l++) part[i][l] = splat(0);
        if (qtype == Q8_0) {
            const uint8_t *qs = blk + 2 * GROUP;
            for (int c = 0; c < 8; c++)
                for (int l = 0; l < NL; l++) {
                    vu v;
                    memcpy(&v, qs + (size_t)(c * GROUP + l * VW) * 4, sizeof v);
                    for (int s = 0; s < 4; s++) {
                        const vf q = __builtin_convertvector((vi)(v << (24 - 8 * s)) >> 24, vf);
                        for (int i = 0; i < MM; i++) part[i][l] = fmadd(q, splat(xb[(size_t)i * K + 4 * c + s]), part[i][l]);
                    }
                }
        } else {
            const uint8_t *qs = blk + (qtype == Q4_1 ? 4 : 2) * GROUP;
            for (int c = 0; c < 4; c++)
                for (int l = 0; l < NL; l++) {
                    vu v;
                    memcpy(&v, qs + (size_t)(c * GROUP + l * VW) * 4, sizeof v);
                    for (int s = 0; s < 4; s++) {
                        const vf lo = __builtin_convertvector((vi)((v >> (8 * s)) & 15), vf);
                        const vf hi = __builtin_convertvector((vi)((v >> (8 * s + 4)) & 15), vf);
                        for (int i = 0; i < MM; i++) {
                            const float *xr = xb + (size_t)i * K + 4 * c + s;
                            part[i][l] = fmadd(lo, splat(xr[0]), part[i][l]);
                            part[i][l] = fmadd(hi, splat(xr[16]), part[i][l]);
                        }
                    }
                }
        }
        vf d[NL], m[NL];
        load_halves(blk, d);
        if (qtype == Q4_1) load_halves(blk + 2 * GROUP, m);
        for (int l = 0; l < NL; l++)
            if (qtype == Q4_0) m[l] = d[l] * -8.0f;      /* d (q - 8) = d q + (-8 d), -8 d exact */
        for (int i = 0; i < MM; i++)
            for (int l = 0; l < NL; l++) {
                acc[i][l] = fmadd(d[l], part[i][l], acc[i][l]);
                if (qtype != Q8_0) acc[i][l] = fmadd(m[l], splat(sx[(size_t)i * blocks + b]), acc[i][l]);
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

/* The rows of x go in tiles of 8, 4, 2 and 1 (AVX-512) or 2 and 1: TILE(T) is instantiated with each constant T, so
   a tile's sums stay in registers; a row's arithmetic is the same in every tile size. */
#if MR >= 8
#define ROW_TILES(TILE) TILE(8) TILE(4) TILE(2) TILE(1)
#else
#define ROW_TILES(TILE) TILE(2) TILE(1)
#endif

/* Group g of w (rows 16 g .. 16 g + valid - 1) against all M rows of x, into columns col.. of y. */
static inline __attribute__((always_inline)) void group_rows_of(
        int qtype, const uint8_t *wg, int blocks, const float *x, const float *sx, int M, int K, int valid,
        float *y, int ldy, int col, const float *bias, const float *res) {
    vf acc[MR][NL];
    int m = 0;
#define TILE(T)                                                                                       \
    for (; m + (T) <= M; m += (T)) {                                                                  \
        group_tile(qtype, wg, blocks, x + (size_t)m * K, sx + (size_t)m * blocks, K, (T), acc);       \
        for (int i = 0; i < (T); i++) store_group(acc[i], valid, y, ldy, m + i, col, bias, res);       \
    }
    ROW_TILES(TILE)
#undef TILE
}

static void group_rows(int qtype, const uint8_t *wg, int blocks, const float *x, const float *sx, int M, int K,
                       int valid, float *y, int ldy, int col, const float *bias, const float *res) {
    switch (qtype) {
    case Q4_0: group_rows_of(Q4_0, wg, blocks, x, sx, M, K, valid, y, ldy, col, bias, res); break;
    case Q4_1: group_rows_of(Q4_1, wg, blocks, x, sx, M, K, valid, y, ldy, col, bias, res); break;
    default: group_rows_of(Q8_0, wg, blocks, x, sx, M, K, valid, y, ldy, col, bias, res); break;
    }
}

/* sx[i * K/32 + b] = the sum of block b of row i of x, in column order: the factor of a block's min (or Q4_0's
   -8 d) in the rows16 products. */
static void block_sums(const float *x, int M, int K, float *sx) {
    const int blocks = K / QK;
    for (int i = 0; i < M; i++)
        for (int b = 0; b < blocks; b++) {
            const float *xb = x + (size_t)i * K + (size_t)b * QK;
            float s = 0;
            for (int k = 0; k < QK; k++) s += xb[k];
            sx[(size_t)i * blocks + b] = s;
        }
}

/* tgi_nb_quant_gemm's contract (the same fusions and return codes) for w in the rows16 layout: N rows in
   ceil(N / 16) groups. With silu_mul, N / 2 must be a multiple of 16 (the up half starts on a group). */
int tgi_nb_quant_gemm_rows16(const float *x, const uint8_t *w, int qtype, const float *bias, const float *res,
                             float *y, int M, int N, int K, int nthreads, const float *norm_weight, float eps,
                             int silu_mul) {
    const int bb = block_bytes(qtype);
    if (!bb || K % QK || M < 1 || N < 1) return 2;
    if (silu_mul && (res || M > SILU_MAX_ROWS || N % (2 * GROUP))) return 2;
    const int blocks = K / QK, groups = (N + GROUP - 1) / GROUP;
    const size_t group_bytes = (size_t)blocks * GROUP * bb;
    float *scratch = malloc(sizeof(float) * ((norm_weight ? (size_t)M * K : 0) + (size_t)M * blocks));
    if (!scratch) return 1;
    float *sx = scratch;
    if (norm_weight) {
        float *xn = scratch + (size_t)M * blocks;
        rms_norm_rows(x, norm_weight, eps, M, K, xn);
        x = xn;
    }
    block_sums(x, M, K, sx);
    if (!silu_mul) {
        #pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int g = 0; g < groups; g++) {
            const int n = g * GROUP, valid = N - n < GROUP ? N - n : GROUP;
            group_rows(qtype, w + (size_t)g * group_bytes, blocks, x, sx, M, K, valid, y, N, n, bias, res);
        }
    } else {
        const int I = N / 2, half = I / GROUP;
        #pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int g = 0; g < half; g++) {
            float gate[SILU_MAX_ROWS * GROUP], up[SILU_MAX_ROWS * GROUP];
            const int n = g * GROUP;
            group_rows(qtype, w + (size_t)g * group_bytes, blocks, x, sx, M, K, GROUP, gate, GROUP, 0,
                       bias ? bias + n : NULL, NULL);
            group_rows(qtype, w + (size_t)(g + half) * group_bytes, blocks, x, sx, M, K, GROUP, up, GROUP, 0,
                       bias ? bias + I + n : NULL, NULL);
            silu_mul_rows(gate, up, GROUP, M, GROUP, y + n, I);
        }
    }
    free(scratch);
    return 0;
}

/* tgi_nb_dequantize for w in the rows16 layout: bit-equal to the GGML layout's values. */
int tgi_nb_dequantize_rows16(const uint8_t *w, int qtype, int N, int K, const int64_t *rows, int count,
                             float *out, int nthreads) {
    const int bb = block_bytes(qtype);
    if (!bb || K % QK) return 2;
    if (rows)
        for (int i = 0; i < count; i++)
            if (rows[i] < 0 || rows[i] >= N) return 2;
    const int blocks = K / QK, total = rows ? count : N;
    const size_t group_bytes = (size_t)blocks * GROUP * bb;
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (total > 16)
    for (int i = 0; i < total; i++) {
        const int64_t r = rows ? rows[i] : i;
        const int j = (int)(r % GROUP);
        const uint8_t *g = w + (size_t)(r / GROUP) * group_bytes;
        float *dst = out + (size_t)i * K;
        for (int b = 0; b < blocks; b++) {
            const uint8_t *blk = g + (size_t)b * GROUP * bb;
            const float d = half_to_float(blk + 2 * j);
            float *o = dst + (size_t)b * QK;
            if (qtype == Q8_0) {
                for (int c = 0; c < 8; c++)
                    for (int s = 0; s < 4; s++)
                        o[4 * c + s] = d * (float)(int8_t)blk[2 * GROUP + (c * GROUP + j) * 4 + s];
                continue;
            }
            const float m = qtype == Q4_1 ? half_to_float(blk + 2 * GROUP + 2 * j) : 0.0f;
            const uint8_t *qs = blk + (qtype == Q4_1 ? 4 : 2) * GROUP;
            for (int c = 0; c < 4; c++)
                for (int s = 0; s < 4; s++) {
                    const uint8_t byte = qs[(c * GROUP + j) * 4 + s];
                    if (qtype == Q4_1) {
                        o[4 * c + s] = fmaf(d, (float)(byte & 15), m);      /* d * q exact: as gguf's d * q + m */
                        o[4 * c + s + 16] = fmaf(d, (float)(byte >> 4), m);
                    } else {
                        o[4 * c + s] = d * (float)((byte & 15) - 8);
                        o[4 * c + s + 16] = d * (float)((byte >> 4) - 8);
                    }
                }
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------------------------
   The "fast" numerics (llama.cpp's): each row of x is quantized per block of 32 to int8 with a float scale, as
   llama.cpp's quantize_row_q8_0 does (x ~ d_x * q_x), and every block's product becomes an integer dot product
   of weight quants and activation quants, scaled once per block:
     Q4_0: d_w d_x (sum q_w q_x - 8 sum q_x)   (q_w the unsigned nibble)
     Q4_1: d_w d_x sum q_w q_x + m_w sum x     (the float sum of the block of x; llama.cpp's q8_1: d_x sum q_x)
     Q8_0: d_w d_x sum q_w q_x
   One instruction (VNNI's dpbusd) takes 4 bytes of 16 weight rows against 4 activation bytes: a block of 16 rows
   is 8 instructions per row of x where the float kernel above spends 64 conversions and FMAs. The integer sums
   are exact and d_w d_x (two fp16 values) is exact in float32, so each block's term rounds once, in the FMA that
   adds it to the row's float sum; sums run in block order whatever M, the tile or the thread.
   The cost is the activations' quantization error (about 0.5 / 127 of each block's largest value per element),
   which llama.cpp accepts on every CPU. */
#if defined(__AVX512VNNI__) && VW == 16
#define Q8_OFFSET 128       /* dpbusd takes the weights unsigned: Q8_0 quants go in as w + 128 */
#else
#define Q8_OFFSET 0
#endif

/* f rounded to fp16 (nearest, ties to even, as numpy's astype(float16)) and back: llama.cpp keeps the activation
   scale as fp16, and gguf's quantizer with it, so the tests compare xd bit for bit. */
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

static inline int32_t load_i32(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* The integer dot products of one block of a group (quants at qs) with MM rows of quantized x (row i of the
   block at xb + i * K): isum[i][l] = lanes l * VW .. of sum_k q_w[k] q_x[k], Q8_0 weights offset by Q8_OFFSET. */
static inline __attribute__((always_inline)) void block_dots(int qtype, const uint8_t *qs, const int8_t *xb, int K,
                                                             int MM, vi isum[MR][NL]) {
#if defined(__AVX512VNNI__) && VW == 16
    for (int i = 0; i < MM; i++) isum[i][0] = (vi)_mm512_setzero_si512();
    if (qtype == Q8_0) {
        for (int c = 0; c < 8; c++) {
            const __m512i w = _mm512_xor_si512(_mm512_loadu_si512(qs + c * 64), _mm512_set1_epi32((int)0x80808080u));
            for (int i = 0; i < MM; i++)
                isum[i][0] = (vi)_mm512_dpbusd_epi32((__m512i)isum[i][0], w,
                                                     _mm512_set1_epi32(load_i32(xb + (size_t)i * K + 4 * c)));
        }
    } else {
        const __m512i low = _mm512_set1_epi8(0x0f);
        for (int c = 0; c < 4; c++) {
            const __m512i v = _mm512_loadu_si512(qs + c * 64);
            const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi32(v, 4), low);
            for (int i = 0; i < MM; i++) {
                const int8_t *xr = xb + (size_t)i * K + 4 * c;
                isum[i][0] = (vi)_mm512_dpbusd_epi32((__m512i)isum[i][0], lo, _mm512_set1_epi32(load_i32(xr)));
                isum[i][0] = (vi)_mm512_dpbusd_epi32((__m512i)isum[i][0], hi, _mm512_set1_epi32(load_i32(xr + 16)));
            }
        }
    }
#elif defined(__AVX512BW__) && VW == 16
    /* maddubs: u8 x s8 pairs summed into saturating int16, then madd with ones into int32. */
    const __m512i ones = _mm512_set1_epi16(1);
    if (qtype == Q8_0) {
        /* llama.cpp's sign trick: |w| (-128 -> 128 as u8) against x negated where w < 0, so a pair is at most
           2 * 128 * 127 = 32512 and never saturates. Each chunk's pairs go to int32 at once (two would not fit). */
        for (int i = 0; i < MM; i++) isum[i][0] = (vi)_mm512_setzero_si512();
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
    } else {
        /* Nibble pairs are at most 2 * 15 * 127 = 3810: the block's 8 pair sums stay in int16 (30480) and go to
           int32 once. */
        const __m512i low = _mm512_set1_epi8(0x0f);
        __m512i s16[MR];
        for (int i = 0; i < MM; i++) s16[i] = _mm512_setzero_si512();
        for (int c = 0; c < 4; c++) {
            const __m512i v = _mm512_loadu_si512(qs + c * 64);
            const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi32(v, 4), low);
            for (int i = 0; i < MM; i++) {
                const int8_t *xr = xb + (size_t)i * K + 4 * c;
                s16[i] = _mm512_add_epi16(s16[i], _mm512_maddubs_epi16(lo, _mm512_set1_epi32(load_i32(xr))));
                s16[i] = _mm512_add_epi16(s16[i], _mm512_maddubs_epi16(hi, _mm512_set1_epi32(load_i32(xr + 16))));
            }
        }
        for (int i = 0; i < MM; i++) isum[i][0] = (vi)_mm512_madd_epi16(s16[i], ones);
    }
#elif defined(__AVX2__) && VW == 8
    /* As the AVX-512BW path above, 8 rows per vector: a chunk's 16 lanes are two vectors. */
    const __m256i ones = _mm256_set1_epi16(1);
    if (qtype == Q8_0) {
        for (int i = 0; i < MM; i++)
            for (int l = 0; l < NL; l++) isum[i][l] = (vi)_mm256_setzero_si256();
        for (int c = 0; c < 8; c++)
            for (int l = 0; l < NL; l++) {
                const __m256i w = _mm256_loadu_si256((const __m256i *)(qs + c * 64 + l * 32)), aw = _mm256_abs_epi8(w);
                for (int i = 0; i < MM; i++) {
                    const __m256i xs = _mm256_sign_epi8(_mm256_set1_epi32(load_i32(xb + (size_t)i * K + 4 * c)), w);
                    isum[i][l] = (vi)_mm256_add_epi32((__m256i)isum[i][l],
                                                      _mm256_madd_epi16(_mm256_maddubs_epi16(aw, xs), ones));
                }
            }
    } else {
        const __m256i low = _mm256_set1_epi8(0x0f);
        __m256i s16[MR][NL];
        for (int i = 0; i < MM; i++)
            for (int l = 0; l < NL; l++) s16[i][l] = _mm256_setzero_si256();
        for (int c = 0; c < 4; c++)
            for (int l = 0; l < NL; l++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(qs + c * 64 + l * 32));
                const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi32(v, 4), low);
                for (int i = 0; i < MM; i++) {
                    const int8_t *xr = xb + (size_t)i * K + 4 * c;
                    s16[i][l] = _mm256_add_epi16(s16[i][l], _mm256_maddubs_epi16(lo, _mm256_set1_epi32(load_i32(xr))));
                    s16[i][l] = _mm256_add_epi16(s16[i][l],
                                                 _mm256_maddubs_epi16(hi, _mm256_set1_epi32(load_i32(xr + 16))));
                }
            }
        for (int i = 0; i < MM; i++)
            for (int l = 0; l < NL; l++) isum[i][l] = (vi)_mm256_madd_epi16(s16[i][l], ones);
    }
#else
    /* Plain int32 lanes: exact, and what the other paths must equal. */
    for (int i = 0; i < MM; i++)
        for (int l = 0; l < NL; l++) isum[i][l] = (vi){};
    for (int c = 0; c < (qtype == Q8_0 ? 8 : 4); c++)
        for (int l = 0; l < NL; l++) {
            vu v;
            memcpy(&v, qs + (size_t)(c * GROUP + l * VW) * 4, sizeof v);
            for (int s = 0; s < 4; s++) {
                if (qtype == Q8_0) {
                    const vi q = (vi)(v << (24 - 8 * s)) >> 24;
                    for (int i = 0; i < MM; i++) isum[i][l] += q * (int32_t)xb[(size_t)i * K + 4 * c + s];
                } else {
                    const vi lo = (vi)((v >> (8 * s)) & 15), hi = (vi)((v >> (8 * s + 4)) & 15);
                    for (int i = 0; i < MM; i++) {
                        const int8_t *xr = xb + (size_t)i * K + 4 * c + s;
                        isum[i][l] += lo * (int32_t)xr[0] + hi * (int32_t)xr[16];
                    }
                }
            }
        }
#endif
}

/* group_tile's work with quantized x: acc[i][l] = the 16 sums of row i (MM constant where inlined). */
static inline __attribute__((always_inline)) void group_tile_q8(int qtype, const uint8_t *g, int blocks,
                                                                const int8_t *xq, const float *xd, const int32_t *xs,
                                                                int K, int MM, vf acc[MR][NL]) {
    const size_t gb = (size_t)GROUP * block_bytes(qtype);
    const int head = (qtype == Q4_1 ? 4 : 2) * GROUP;
    for (int i = 0; i < MM; i++)
        for (int l = 0; l < NL; l++) acc[i][l] = splat(0);
    for (int b = 0; b < blocks; b++) {
        const uint8_t *blk = g + (size_t)b * gb;
        vi isum[MR][NL];
        block_dots(qtype, blk + head, xq + (size_t)b * QK, K, MM, isum);
        vf d[NL], m[NL];
        load_halves(blk, d);
        if (qtype == Q4_1) load_halves(blk + 2 * GROUP, m);
        for (int i = 0; i < MM; i++) {
            const size_t ib = (size_t)i * blocks + b;
            const int32_t offset = qtype == Q4_0 ? 8 * xs[ib] : qtype == Q8_0 ? Q8_OFFSET * xs[ib] : 0;
            const vf dx = splat(xd[ib]);
            for (int l = 0; l < NL; l++) {
                /* d_w d_x is exact (two fp16 values) and so is the integer sum as a float (|sum| < 2^21): the term
                   rounds once, in the FMA. */
                const vf dot = __builtin_convertvector(isum[i][l] - offset, vf);
                acc[i][l] = fmadd(d[l] * dx, dot, acc[i][l]);
                /* Q4_1's min term m * sum(x) with x as quantized (llama.cpp's q8_1 s = d_x sum q_x): the whole
                   result is then exactly the weights times the quantized activations. With the float sum of x
                   instead, the error measured 2.3x larger (it becomes sum (w - m)(x^ - x), |w - m| >> |w|). */
                if (qtype == Q4_1) acc[i][l] = fmadd(m[l], splat(xd[ib] * (float)xs[ib]), acc[i][l]);
            }
        }
    }
}

static inline __attribute__((always_inline)) void group_rows_q8_of(
        int qtype, const uint8_t *wg, int blocks, const int8_t *xq, const float *xd, const int32_t *xs,
        int M, int K, int valid, float *y, int ldy, int col, const float *bias, const float *res) {
    vf acc[MR][NL];
    int m = 0;
#define TILE(T)                                                                                                 \
    for (; m + (T) <= M; m += (T)) {                                                                            \
        const size_t ib = (size_t)m * blocks;                                                                   \
        group_tile_q8(qtype, wg, blocks, xq + (size_t)m * K, xd + ib, xs + ib, K, (T), acc);                      \
        for (int i = 0; i < (T); i++) store_group(acc[i], valid, y, ldy, m + i, col, bias, res);                 \
    }
    ROW_TILES(TILE)
#undef TILE
}

/* group_rows' contract (one group of 16 rows16 weight rows against all M rows of x, outputs to columns col.. of y
   with bias / res like store_group) with x as quantize_rows_q8 made it. */
static void group_rows_q8(int qtype, const uint8_t *wg, int blocks, const int8_t *xq, const float *xd,
                          const int32_t *xs, int M, int K, int valid, float *y, int ldy, int col,
                          const float *bias, const float *res) {
    switch (qtype) {
    case Q4_0: group_rows_q8_of(Q4_0, wg, blocks, xq, xd, xs, M, K, valid, y, ldy, col, bias, res); break;
    case Q4_1: group_rows_q8_of(Q4_1, wg, blocks, xq, xd, xs, M, K, valid, y, ldy, col, bias, res); break;
    default: group_rows_q8_of(Q8_0, wg, blocks, xq, xd, xs, M, K, valid, y, ldy, col, bias, res); break;
    }
}

/* tgi_nb_quant_gemm_rows16's contract (same arguments, same fusions, same return codes) with the fast numerics:
   x (after the norm) quantized by quantize_rows_q8, then group_rows_q8. Any M >= 1 without silu_mul (M <= 64
   with it, whose scratch is on the stack). */
int tgi_nb_quant_gemm_rows16_q8(const float *x, const uint8_t *w, int qtype, const float *bias, const float *res,
                                float *y, int M, int N, int K, int nthreads, const float *norm_weight, float eps,
                                int silu_mul) {
    const int bb = block_bytes(qtype);
    if (!bb || K % QK || M < 1 || N < 1) return 2;
    if (silu_mul && (res || M > SILU_MAX_ROWS || N % (2 * GROUP))) return 2;
    const int blocks = K / QK, groups = (N + GROUP - 1) / GROUP;
    const size_t group_bytes = (size_t)blocks * GROUP * bb, mb = (size_t)M * blocks;
    /* floats and int32 first, the int8 quants last: every part stays aligned to its type */
    const size_t norm_floats = norm_weight ? (size_t)M * K : 0;
    float *scratch = malloc(sizeof(float) * (norm_floats + 2 * mb) + (size_t)M * K);
    if (!scratch) return 1;
    float *xn = scratch, *xd = scratch + norm_floats;
    int32_t *xs = (int32_t *)(xd + mb);
    int8_t *xq = (int8_t *)(xs + mb);
    /* Rows are independent: threads once the rows outweigh the start-up (about 0.5 ns an element, a few us). */
    #pragma omp parallel for num_threads(nthreads) schedule(static) if ((size_t)M * K >= 8192)
    for (int i = 0; i < M; i++) {
        const float *xr = x + (size_t)i * K;
        if (norm_weight) {
            rms_norm_rows(xr, norm_weight, eps, 1, K, xn + (size_t)i * K);
            xr = xn + (size_t)i * K;
        }
        quantize_rows_q8(xr, 1, K, xq + (size_t)i * K, xd + (size_t)i * blocks, xs + (size_t)i * blocks);
    }
    if (!silu_mul) {
        #pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int g = 0; g < groups; g++) {
            const int n = g * GROUP, valid = N - n < GROUP ? N - n : GROUP;
            group_rows_q8(qtype, w + (size_t)g * group_bytes, blocks, xq, xd, xs, M, K, valid, y, N, n, bias,
                          res);
        }
    } else {
        const int I = N / 2, half = I / GROUP;
        #pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int g = 0; g < half; g++) {
            float gate[SILU_MAX_ROWS * GROUP], up[SILU_MAX_ROWS * GROUP];
            const int n = g * GROUP;
            group_rows_q8(qtype, w + (size_t)g * group_bytes, blocks, xq, xd, xs, M, K, GROUP, gate, GROUP, 0,
                          bias ? bias + n : NULL, NULL);
            group_rows_q8(qtype, w + (size_t)(g + half) * group_bytes, blocks, xq, xd, xs, M, K, GROUP, up,
                          GROUP, 0, bias ? bias + I + n : NULL, NULL);
            silu_mul_rows(gate, up, GROUP, M, GROUP, y + n, I);
        }
    }
    free(scratch);
    return 0;
}
