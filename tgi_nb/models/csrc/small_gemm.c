/* y = x @ w^T (+ bias) (+ residual) in float32 for a few rows of x: the decode step of a small batch.

   With one to a few dozen rows the product is bound by reading w from memory, and BLAS libraries tuned
   for big matrices (MKL on AMD in particular) stream it at well under the machine's bandwidth. Here each
   thread streams its own range of w's rows exactly once; blocks of 4 w rows x 2 x rows keep 8 running
   sums in registers, and gcc vectorizes the k loop (-O3 -ffast-math allows the reassociation).

   Threads come from OpenMP: the library links libgomp.so.1, which resolves to the copy torch has already
   loaded, so the kernel shares torch's thread pool instead of competing with it. Each output element is
   computed by one thread in a fixed order, so results do not depend on the thread count. */
#include <math.h>
#include <stddef.h>
#include <stdlib.h>

#include "rms_norm.h"

static inline void store(float *y, const float *res, const float *bias, int ldy, int m, int n, float v) {
    if (bias) v += bias[n];
    if (res) v += res[(size_t)m * ldy + n];
    y[(size_t)m * ldy + n] = v;
}
static void block4(const float *restrict w, const float *restrict x, int M, int K, int ldy, int n,
                   float *restrict y, const float *bias, const float *res) {
    const float *restrict w0 = w, *restrict w1 = w + K, *restrict w2 = w + 2 * (size_t)K, *restrict w3 = w + 3 * (size_t)K;
    int m = 0;
    for (; m + 2 <= M; m += 2) {
        const float *restrict xa = x + (size_t)m * K, *restrict xb = xa + K;
        float a0 = 0, a1 = 0, a2 = 0, a3 = 0, b0 = 0, b1 = 0, b2 = 0, b3 = 0;
        for (int k = 0; k < K; k++) {
            float u = xa[k], v = xb[k];
            a0 += w0[k] * u; a1 += w1[k] * u; a2 += w2[k] * u; a3 += w3[k] * u;
            b0 += w0[k] * v; b1 += w1[k] * v; b2 += w2[k] * v; b3 += w3[k] * v;
        }
        store(y, res, bias, ldy, m, n, a0); store(y, res, bias, ldy, m, n + 1, a1);
        store(y, res, bias, ldy, m, n + 2, a2); store(y, res, bias, ldy, m, n + 3, a3);
        store(y, res, bias, ldy, m + 1, n, b0); store(y, res, bias, ldy, m + 1, n + 1, b1);
        store(y, res, bias, ldy, m + 1, n + 2, b2); store(y, res, bias, ldy, m + 1, n + 3, b3);
    }
    for (; m < M; m++) {
        const float *restrict xa = x + (size_t)m * K;
        float a0 = 0, a1 = 0, a2 = 0, a3 = 0;
        for (int k = 0; k < K; k++) {
            float u = xa[k];
            a0 += w0[k] * u; a1 += w1[k] * u; a2 += w2[k] * u; a3 += w3[k] * u;
        }
        store(y, res, bias, ldy, m, n, a0); store(y, res, bias, ldy, m, n + 1, a1);
        store(y, res, bias, ldy, m, n + 2, a2); store(y, res, bias, ldy, m, n + 3, a3);
    }
}
static void block1(const float *restrict w, const float *restrict x, int M, int K, int ldy, int n,
                   float *restrict y, const float *bias, const float *res) {
    for (int m = 0; m < M; m++) {
        const float *restrict xa = x + (size_t)m * K;
        float a = 0;
        for (int k = 0; k < K; k++) a += w[k] * xa[k];
        store(y, res, bias, ldy, m, n, a);
    }
}
static void columns(const float *w, const float *x, int M, int K, int ldy, int n, int n1, float *y,
                    const float *bias, const float *res) {
    for (; n + 4 <= n1; n += 4) block4(w + (size_t)n * K, x, M, K, ldy, n, y, bias, res);
    for (; n < n1; n++) block1(w + (size_t)n * K, x, M, K, ldy, n, y, bias, res);
}


#define SILU_CHUNK 64
#define SILU_MAX_ROWS 64

/* y = x @ w^T (+ bias) (+ residual), with two optional fusions that save a pass of torch ops per layer:
   - norm_weight != NULL: x is first RMS-normalized row by row (weight norm_weight, epsilon eps);
   - silu_mul != 0: w is a fused [gate; up] weight of N = 2 * I rows and y is [M, I] =
     silu(x @ gate^T) * (x @ up^T) (bias, if any, is [N]; residual must be NULL; M <= 64).
   x: [M, K], w: [N, K], bias: [N] or NULL, res: [M, N] or NULL (may alias y), y: [M, N]; all contiguous.
   Returns 0, 1 when out of memory, 2 for arguments outside what is supported. */
int tgi_nb_small_gemm(const float *x, const float *w, const float *bias, const float *res, float *y,
                      int M, int N, int K, int nthreads, const float *norm_weight, float eps, int silu_mul) {
    if (silu_mul && (res || M > SILU_MAX_ROWS || N % 2)) return 2;
    float *xn = NULL;
    if (norm_weight) {
        xn = malloc(sizeof(float) * (size_t)M * K);
        if (!xn) return 1;
        rms_norm_rows(x, norm_weight, eps, M, K, xn);
        x = xn;
    }
    if (!silu_mul) {
        int chunks = (N + 63) / 64;
        #pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int c = 0; c < chunks; c++) {
            int n = c * 64, n1 = n + 64 < N ? n + 64 : N;
            columns(w, x, M, K, N, n, n1, y, bias, res);
        }
    } else {
        /* Output column j needs gate row j and up row I + j: a chunk computes both for SILU_CHUNK columns into
           its own scratch, then combines them. */
        const int I = N / 2, chunks = (I + SILU_CHUNK - 1) / SILU_CHUNK;
        #pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int c = 0; c < chunks; c++) {
            float gate[SILU_MAX_ROWS * SILU_CHUNK], up[SILU_MAX_ROWS * SILU_CHUNK];
            const int n0 = c * SILU_CHUNK, width = I - n0 < SILU_CHUNK ? I - n0 : SILU_CHUNK;
            columns(w + (size_t)n0 * K, x, M, K, SILU_CHUNK, 0, width, gate, bias ? bias + n0 : NULL, NULL);
            columns(w + (size_t)(I + n0) * K, x, M, K, SILU_CHUNK, 0, width, up, bias ? bias + I + n0 : NULL, NULL);
            for (int m = 0; m < M; m++)
                for (int j = 0; j < width; j++) {
                    const float g = gate[m * SILU_CHUNK + j];
                    y[(size_t)m * I + n0 + j] = g / (1.0f + expf(-g)) * up[m * SILU_CHUNK + j];
                }
        }
    }
    free(xn);
    return 0;
}
