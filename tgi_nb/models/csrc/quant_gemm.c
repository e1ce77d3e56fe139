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
#define NV (QK / VW)   /* vectors per block */
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

/* One block as NV vectors of floats (vector j: elements j*VW .. j*VW+VW-1), the values gguf's dequantize gives:
   d * q (Q8_0), d * (q - 8) (Q4_0), d * q + m (Q4_1; d * q is exact in float32, so fused or not the sum
   rounds once). GGML's 4-bit blocks hold element i in the low nibble of byte i, element i + 16 in the high. */
static inline void dequant_block(const uint8_t *blk, int qtype, vf out[NV]) {
    vf d, m;
    block_scales(blk, qtype, &d, &m);
    if (qtype == Q8_0) {
        for (int j = 0; j < NV; j++) out[j] = __builtin_convertvector(load_s8(blk + 2 + j * VW), vf) * d;
        return;
    }
    const uint8_t *qs = blk + (qtype == Q4_1 ? 4 : 2);
    for (int j = 0; j < NV; j++) {
        vi q = load_u8(qs + (j * VW) % 16);
        q = j * VW >= 16 ? q >> 4 : q & 15;
        const vf qf = __builtin_convertvector(q, vf);
        if (qtype == Q4_1) out[j] = qf * d + m;
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
        vf wv[RT][NV];
        for (int r = 0; r < R; r++) dequant_block(wr + r * row_bytes + (size_t)b * bb, qtype, wv[r]);
        for (int i = 0; i < MM; i++) {
            const float *xb = x + (size_t)(m + i) * K + (size_t)b * QK;
            for (int j = 0; j < NV; j++) {
                vf xv;
                memcpy(&xv, xb + j * VW, sizeof xv);
                for (int r = 0; r < R; r++) acc[r][i] += wv[r][j] * xv;
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

/* RMSNorm of each row of x into xn, as transformers' LlamaRMSNorm: x * rsqrt(mean(x^2) + eps) * weight. */
static void rms_norm_rows(const float *x, const float *weight, float eps, int M, int K, float *xn) {
    for (int m = 0; m < M; m++) {
        const float *xr = x + (size_t)m * K;
        float *out = xn + (size_t)m * K;
        float sum = 0;
        for (int k = 0; k < K; k++) sum += xr[k] * xr[k];
        const float r = 1.0f / sqrtf(sum / K + eps);
        for (int k = 0; k < K; k++) out[k] = weight[k] * (xr[k] * r);
    }
}

#define CHUNK 64
#define SILU_MAX_ROWS 64

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
            for (int m = 0; m < M; m++)
                for (int j = 0; j < width; j++) {
                    const float g = gate[m * CHUNK + j];
                    y[(size_t)m * I + n0 + j] = g / (1.0f + expf(-g)) * up[m * CHUNK + j];
                }
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
            vf v[NV];
            dequant_block(src + (size_t)b * bb, qtype, v);
            memcpy(dst + (size_t)b * QK, v, sizeof v);
        }
    }
    return 0;
}
