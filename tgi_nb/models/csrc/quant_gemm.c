/* y = x @ dequant(w)^T (+ bias) (+ residual) for GGUF block-quantized w and float32 x: the products of a decode
   step or a batch, for every type of quant_types.h (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K).

   Decode reads every weight once per step, so bytes are the cost: w stays in GGML's own blocks, turned into
   numbers in registers and used at once for every row of x of a tile. Two layouts:
   - "ggml", the file's (a row's blocks one after the other): the per-row kernel below (Q4_0, Q4_1, Q8_0: each
     block dequantized into vectors, tiles of 4 w rows x MT x rows) and the dequantizers of every type;
   - "rows16", the same bytes regrouped 16 rows at a time so that vector lanes are rows (see below): what the
     engine computes with, in both numerics (quant_rows16.h).
   Threads take ranges of w rows, so each output element is summed by one thread in a fixed order whatever the
   thread count or the other rows of x.

   The source is built once per instruction set (python: tgi_nb/models/quant_kernels.py picks the one the CPU
   runs): with -march=x86-64-v4 GCC's vector extensions become AVX-512 (16 floats), with x86-64-v3 AVX2 + FMA +
   F16C (8 floats), with plain x86-64 SSE2 (4 floats, software fp16); -mavx512vnni adds dpbusd to the first. */
#include "quant_types.h"
#include "quant_rows16.h"
#include "rms_norm.h"

#define RT 4           /* w rows per tile of the per-row kernel */

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
   x: [M, K] float32, w: N rows of K / 32 blocks of type qtype (GGML ids: 2 Q4_0, 3 Q4_1, 8 Q8_0: this per-row
   kernel takes those three; every type computes in the rows16 layout below),
   bias: [N] or NULL, res: [M, N] or NULL (may alias y), y: [M, N]; all contiguous.
   Returns 0, 1 when out of memory, 2 for arguments outside what is supported. */
int tgi_nb_quant_gemm(const float *x, const uint8_t *w, int qtype, const float *bias, const float *res, float *y,
                      int M, int N, int K, int nthreads, const float *norm_weight, float eps, int silu_mul) {
    const int bb = block_bytes(qtype);
    if ((qtype != Q4_0 && qtype != Q4_1 && qtype != Q8_0) || K % QK || M < 1 || N < 1) return 2;
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

/* Dequantize rows of w (N rows of K / block_weights blocks of any type) to float32: row rows[i] into out[i] for
   i < count, or every row (count = N) when rows is NULL. For an embedding lookup (a few ids) and for the prefill
   path, which dequantizes one layer into a scratch buffer and hands it to oneDNN. Returns 0, or 2 for a bad type,
   K or row id. */
int tgi_nb_dequantize(const uint8_t *w, int qtype, int N, int K, const int64_t *rows, int count, float *out,
                      int nthreads) {
    const int bb = block_bytes(qtype), bw = block_weights(qtype);
    if (!bb || K % bw) return 2;
    if (rows)
        for (int i = 0; i < count; i++)
            if (rows[i] < 0 || rows[i] >= N) return 2;
    const size_t row_bytes = (size_t)(K / bw) * bb;
    const int total = rows ? count : N;
    const int vector = qtype == Q4_0 || qtype == Q4_1 || qtype == Q8_0;
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (total > 16)
    for (int i = 0; i < total; i++) {
        const uint8_t *src = w + (size_t)(rows ? rows[i] : i) * row_bytes;
        float *dst = out + (size_t)i * K;
        for (int b = 0; b < K / bw; b++) {
            if (vector) {
                vf v[NVB];
                dequant_block(src + (size_t)b * bb, qtype, v);
                memcpy(dst + (size_t)b * QK, v, sizeof v);
            } else {
                dequant_block_ref(qtype, src + (size_t)b * bb, dst + (size_t)b * bw);
            }
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------------------------
   The "rows16" layout: the same blocks, regrouped once at load (tgi_nb/models/quant_layouts.py) so that vector
   lanes are weight rows. Rows go 16 to a group (the last group padded with zero blocks); each group holds, for each
   block of 32 (or 256) columns in order, the block's fields (quant_types.h) one after the other, each with the 16
   rows' units side by side: fp16 values (d, m, dmin) as 16 halves, quants and packed scales as chunks of 16
   uint32, chunk c lane j = bytes 4c..4c+3 of row j's field. E.g. Q4_1: d[16], m[16], then 4 chunks of nibbles
   (byte s of chunk c: low nibble = column 4c+s, high = column 4c+s+16, as GGML stores them): 32 + 32 + 256 bytes
   per group and block, GGML's bytes only moved.

   A chunk loaded as uint32 lanes gives, after a shift and a mask, one column of 16 rows per byte: no per-row
   unpacking, no horizontal sums, one fp16 conversion per 16 scales; scales and mins apply once per (sub-)block
   (quant_rows16.h has the arithmetic of both numerics).

   A weight is passed as a table of row segments, (address, GGML type, rows) as int64 each, stacked in that order
   (a fused q|k|v whose v is Q6_K and q, k Q4_K; one segment for a plain weight). Each segment is rows16 on its
   own (its last group padded); segment i's rows are the output columns after those of the segments before it. */

typedef struct {
    const uint8_t *w;   /* the group's first block, NULL when there is none */
    int qtype, col, valid;
} group_ref;

static inline size_t group_bytes(int qtype, int K) {
    return (size_t)GROUP * (K / block_weights(qtype)) * block_bytes(qtype);
}

/* N = the segments' rows, each a known type whose blocks tile K. */
static int segments_valid(const int64_t *segs, int nseg, int K, int N) {
    int64_t total = 0;
    if (nseg < 1) return 0;
    for (int i = 0; i < nseg; i++) {
        const int qtype = (int)segs[3 * i + 1];
        if (!segs[3 * i] || !block_bytes(qtype) || K % block_weights(qtype) || segs[3 * i + 2] < 1) return 0;
        total += segs[3 * i + 2];
    }
    return total == N;
}

static int segment_groups(const int64_t *segs, int nseg) {
    int groups = 0;
    for (int i = 0; i < nseg; i++) groups += (int)((segs[3 * i + 2] + GROUP - 1) / GROUP);
    return groups;
}

/* The g-th group counting through every segment. */
static inline group_ref nth_group(const int64_t *segs, int nseg, int K, int g) {
    int col = 0;
    for (int i = 0; i < nseg; i++) {
        const int qtype = (int)segs[3 * i + 1], rows = (int)segs[3 * i + 2], n = (rows + GROUP - 1) / GROUP;
        if (g < n)
            return (group_ref){(const uint8_t *)(intptr_t)segs[3 * i] + (size_t)g * group_bytes(qtype, K), qtype,
                               col + g * GROUP, rows - g * GROUP < GROUP ? rows - g * GROUP : GROUP};
        g -= n;
        col += rows;
    }
    return (group_ref){NULL, 0, 0, 0};
}

/* The group whose first row is output row `row` (w NULL when no group starts there). */
static inline group_ref group_at_row(const int64_t *segs, int nseg, int K, int row) {
    int col = 0;
    for (int i = 0; i < nseg; i++) {
        const int qtype = (int)segs[3 * i + 1], rows = (int)segs[3 * i + 2];
        if (row < col + rows) {
            const int r = row - col;
            if (r % GROUP) break;
            return (group_ref){(const uint8_t *)(intptr_t)segs[3 * i] + (size_t)(r / GROUP) * group_bytes(qtype, K),
                               qtype, row, rows - r < GROUP ? rows - r : GROUP};
        }
        col += rows;
    }
    return (group_ref){NULL, 0, 0, 0};
}

/* A fused [gate; up] weight of 2 I rows works group by group when every 16 rows of gate and the 16 up rows they
   pair with start a group (one segment with I % 16 == 0, or gate and up as segments of their own). */
static int gated_valid(const int64_t *segs, int nseg, int K, int I) {
    for (int n = 0; n < I; n += GROUP) {
        const int width = I - n < GROUP ? I - n : GROUP;
        const group_ref gate = group_at_row(segs, nseg, K, n), up = group_at_row(segs, nseg, K, I + n);
        if (!gate.w || !up.w || gate.valid < width || up.valid < width) return 0;
    }
    return 1;
}

/* 1: some segment is a 32-weight type (fast numerics: x as Q8_0), 2: some is a K-quant (x as Q8_K). */
static int segment_families(const int64_t *segs, int nseg) {
    int families = 0;
    for (int i = 0; i < nseg; i++) families |= is_k((int)segs[3 * i + 1]) ? 2 : 1;
    return families;
}

/* sx[b] = the sum of block b of a row of x, in column order: the factor of a block's min (or Q4_0's -8 d) in the
   exact products. */
static void block_sums(const float *x, int K, float *sx) {
    for (int b = 0; b < K / QK; b++) {
        const float *xb = x + (size_t)b * QK;
        float s = 0;
        for (int k = 0; k < QK; k++) s += xb[k];
        sx[b] = s;
    }
}

/* Scratch for a product's input of M rows: xn (the normalized x, when there is a norm), its block sums and, with
   the fast numerics, x quantized for the families asked for. One allocation (floats and int32 first, then the
   int8 quants: each part aligned to its type); free(in->... ) is free(*base). */
static int input_alloc(int M, int K, int norm, int fast, int families, float **xn, xin_t *in, void **base) {
    const size_t mk = (size_t)M * K, mb = (size_t)M * (K / QK);
    const int q8 = fast && (families & 1), q8k = fast && (families & 2);
    const size_t words = (norm ? mk : 0) + mb + (q8 ? 2 * mb : 0) + (q8k ? (size_t)M * (K / QKK) + (size_t)M * (K / 16) : 0);
    char *mem = malloc(4 * words + (q8 ? mk : 0) + (q8k ? mk : 0) + 1);
    if (!mem) return 1;
    float *f = (float *)mem;
    *xn = norm ? f : NULL;
    f += norm ? mk : 0;
    *in = (xin_t){0};
    in->sx = f;
    f += mb;
    if (q8) {
        in->d = f;
        in->s = (const int32_t *)(f + mb);
        f += 2 * mb;
    }
    if (q8k) {
        in->dk = f;
        in->sk = (const int32_t *)(f + (size_t)M * (K / QKK));
        f += (size_t)M * (K / QKK) + (size_t)M * (K / 16);
    }
    int8_t *q = (int8_t *)f;
    if (q8) {
        in->q = q;
        q += mk;
    }
    if (q8k) in->qk = q;
    *base = mem;
    return 0;
}

/* Row i of a product's input from row i of x: xn row = RMSNorm(x row) when norm is given (in->x points at xn),
   its block sums, and the quants the numerics need. Rows are independent: callers split them among threads. */
static void input_row(const float *x, const float *norm, float eps, int K, int i, int fast, const xin_t *in) {
    const float *xr = x + (size_t)i * K;
    if (norm) {
        rms_norm_rows(xr, norm, eps, 1, K, (float *)in->x + (size_t)i * K);
        xr = in->x + (size_t)i * K;
    }
    block_sums(xr, K, (float *)in->sx + (size_t)i * (K / QK));
    if (fast && in->q)
        quantize_rows_q8(xr, 1, K, (int8_t *)in->q + (size_t)i * K, (float *)in->d + (size_t)i * (K / QK),
                         (int32_t *)in->s + (size_t)i * (K / QK));
    if (fast && in->qk)
        quantize_rows_q8k(xr, 1, K, (int8_t *)in->qk + (size_t)i * K, (float *)in->dk + (size_t)i * (K / QKK),
                          (int32_t *)in->sk + (size_t)i * (K / 16));
}

/* The groups of a weight's segments split among the threads of the enclosing parallel region (omp for): y (+)= x
   @ w^T, y with row stride N. */
static void segments_product(const int64_t *segs, int nseg, int N, int K, const xin_t *in, int fast, int M, float *y,
                             const float *bias, const float *res) {
    const int groups = segment_groups(segs, nseg);
    #pragma omp for schedule(static)
    for (int g = 0; g < groups; g++) {
        const group_ref r = nth_group(segs, nseg, K, g);
        group_rows(r.qtype, fast, r.w, K, in, M, r.valid, y, N, r.col, bias, res);
    }
}

/* silu(x @ gate^T) * (x @ up^T) into y [M, I] for a fused [gate; up] weight that gated_valid accepts (omp for). */
static void segments_gated(const int64_t *segs, int nseg, int I, int K, const xin_t *in, int fast, int M, float *y,
                           const float *bias) {
    const int groups = (I + GROUP - 1) / GROUP;
    #pragma omp for schedule(static)
    for (int g = 0; g < groups; g++) {
        float gate[SILU_MAX_ROWS * GROUP], up[SILU_MAX_ROWS * GROUP];
        const int n = g * GROUP, width = I - n < GROUP ? I - n : GROUP;
        const group_ref a = group_at_row(segs, nseg, K, n), b = group_at_row(segs, nseg, K, I + n);
        group_rows(a.qtype, fast, a.w, K, in, M, width, gate, GROUP, 0, bias ? bias + n : NULL, NULL);
        group_rows(b.qtype, fast, b.w, K, in, M, width, up, GROUP, 0, bias ? bias + I + n : NULL, NULL);
        silu_mul_rows(gate, up, GROUP, M, width, y + n, I);
    }
}

static int rows16_gemm(const float *x, const int64_t *segs, int nseg, const float *bias, const float *res, float *y,
                       int M, int N, int K, int nthreads, const float *norm_weight, float eps, int silu_mul, int fast) {
    if (K % QK || M < 1 || N < 1 || !segments_valid(segs, nseg, K, N)) return 2;
    if (silu_mul && (res || M > SILU_MAX_ROWS || N % 2 || !gated_valid(segs, nseg, K, N / 2))) return 2;
    float *xn;
    xin_t in;
    void *base;
    if (input_alloc(M, K, norm_weight != NULL, fast, segment_families(segs, nseg), &xn, &in, &base)) return 1;
    in.x = norm_weight ? xn : x;
    /* Rows are independent: threads once the rows outweigh the start-up (about 0.5 ns an element, a few us). */
    #pragma omp parallel for num_threads(nthreads) schedule(static) if ((size_t)M * K >= 8192)
    for (int i = 0; i < M; i++) input_row(x, norm_weight, eps, K, i, fast, &in);
    #pragma omp parallel num_threads(nthreads)
    {
        if (silu_mul) segments_gated(segs, nseg, N / 2, K, &in, fast, M, y, bias);
        else segments_product(segs, nseg, N, K, &in, fast, M, y, bias, res);
    }
    free(base);
    return 0;
}

/* tgi_nb_quant_gemm's contract (the same fusions and return codes) for w in the rows16 layout as a segment table
   (segs: nseg rows of (address, GGML type, rows), N rows in all), exact numerics. With silu_mul each 16 rows of
   gate and the up rows they pair with must start a group (gated_valid). */
int tgi_nb_quant_gemm_rows16(const float *x, const int64_t *segs, int nseg, const float *bias, const float *res,
                             float *y, int M, int N, int K, int nthreads, const float *norm_weight, float eps,
                             int silu_mul) {
    return rows16_gemm(x, segs, nseg, bias, res, y, M, N, K, nthreads, norm_weight, eps, silu_mul, 0);
}

/* The same with the fast numerics: x (after the norm) quantized to int8 (Q8_0 per 32 for the 32-weight types,
   Q8_K per 256 for the K-quants), integer dot products. Any M >= 1 without silu_mul (M <= 64 with it, whose scratch
   is on the stack). */
int tgi_nb_quant_gemm_rows16_q8(const float *x, const int64_t *segs, int nseg, const float *bias, const float *res,
                                float *y, int M, int N, int K, int nthreads, const float *norm_weight, float eps,
                                int silu_mul) {
    return rows16_gemm(x, segs, nseg, bias, res, y, M, N, K, nthreads, norm_weight, eps, silu_mul, 1);
}

/* tgi_nb_dequantize for w in the rows16 layout (one type): bit-equal to the GGML layout's values. */
int tgi_nb_dequantize_rows16(const uint8_t *w, int qtype, int N, int K, const int64_t *rows, int count,
                             float *out, int nthreads) {
    const int bb = block_bytes(qtype), bw = block_weights(qtype);
    if (!bb || K % bw) return 2;
    if (rows)
        for (int i = 0; i < count; i++)
            if (rows[i] < 0 || rows[i] >= N) return 2;
    const int blocks = K / bw, total = rows ? count : N;
    const size_t gbytes = group_bytes(qtype, K);
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (total > 16)
    for (int i = 0; i < total; i++) {
        const int64_t r = rows ? rows[i] : i;
        const uint8_t *g = w + (size_t)(r / GROUP) * gbytes;
        for (int b = 0; b < blocks; b++) {
            uint8_t blk[256];
            gather_block(qtype, g + (size_t)b * GROUP * bb, (int)(r % GROUP), blk);
            if (qtype == Q4_0 || qtype == Q4_1 || qtype == Q8_0) {
                vf v[NVB];
                dequant_block(blk, qtype, v);
                memcpy(out + (size_t)i * K + (size_t)b * bw, v, sizeof v);
            } else {
                dequant_block_ref(qtype, blk, out + (size_t)i * K + (size_t)b * bw);
            }
        }
    }
    return 0;
}
