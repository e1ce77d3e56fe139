/* The RMSNorm the native products fuse in front of themselves (small_gemm.c, quant_gemm.c; decode_step.c through
   quant_gemm.c). Included, not linked: each library is one translation unit built with its own flags, and
   tgi_nb/models/native.py keys the kernel cache on included sources too. */
#ifndef TGI_NB_RMS_NORM_H
#define TGI_NB_RMS_NORM_H
#include <math.h>
#include <stddef.h>

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

#endif
