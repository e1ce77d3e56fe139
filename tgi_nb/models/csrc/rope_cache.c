/* Rotary position embedding and the KV-cache write of one step, float32, in place on the fused q|k|v
   projection. In torch this is about fifteen small ops per layer (views, a cat for rotate_half, four
   multiplies and adds, two index_copy_), which at one decode token cost more than the arithmetic itself.

   Per token t and head: optional per-head RMSNorm (Qwen3's q_norm / k_norm), then
       x[i]        = x[i] * cos[i]        - x[i + D/2] * sin[i]
       x[i + D/2]  = x[i + D/2] * cos[i + D/2] + x[i] * sin[i + D/2]        (i < D/2)
   with cos/sin rows of the model's table at the token's position (transformers' rotate_half convention);
   then K and V go to the token's cache slot (float32, or float16 for a half-size cache). Q stays in place in qkv
   for the attention.
   Built with -ffp-contract=off so that products are rounded before they are added, as in torch. */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__F16C__)
#include <immintrin.h>
#endif

static void rms_norm_head(float *x, const float *weight, float eps, int64_t D) {
    float sum = 0;
    for (int64_t i = 0; i < D; i++) sum += x[i] * x[i];
    const float r = 1.0f / sqrtf(sum / D + eps);
    for (int64_t i = 0; i < D; i++) x[i] = weight[i] * (x[i] * r);
}

static void rotate(float *restrict x, const float *restrict c, const float *restrict s, int64_t D) {
    const int64_t half = D / 2;
    for (int64_t i = 0; i < half; i++) {
        const float a = x[i], b = x[i + half];
        x[i] = a * c[i] - b * s[i];
        x[i + half] = b * c[i + half] + a * s[i + half];
    }
}

static inline void store_half(_Float16 *restrict dst, const float *restrict src, int64_t n) {
    int64_t i = 0;
#if defined(__F16C__)
    /* 8 at a time with vcvtps2ph: GCC 12 converts each _Float16 through a library call otherwise */
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; i < n; i++) dst[i] = (_Float16)src[i];   /* round to nearest even, as torch's .half() */
}

/* qkv: [T, (H + 2 KVH) D]; positions, slots: [T]; cos, sin: [max_pos, D]; k_cache, v_cache: [num_slots, KVH, D]
   of float, or of _Float16 when half; q_norm, k_norm: [D] or NULL. Returns 0, or 1 when a position or slot is out
   of range (nothing written for that token or later ones). */
static inline __attribute__((always_inline)) int
rope_write_kv(float *qkv, const int64_t *positions, const float *cos, const float *sin, const int64_t *slots,
              void *k_cache, void *v_cache, const float *q_norm, const float *k_norm, float eps, int64_t T,
              int64_t H, int64_t KVH, int64_t D, int64_t num_slots, int64_t max_pos, const int half) {
    const int64_t row = (H + 2 * KVH) * D, kv_row = KVH * D;
    for (int64_t t = 0; t < T; t++) {
        const int64_t pos = positions[t], slot = slots[t];
        if (pos < 0 || pos >= max_pos || slot < 0 || slot >= num_slots) return 1;
        const float *c = cos + pos * D, *s = sin + pos * D;
        float *q = qkv + t * row, *k = q + H * D, *v = k + kv_row;
        for (int64_t h = 0; h < H; h++) {
            if (q_norm) rms_norm_head(q + h * D, q_norm, eps, D);
            rotate(q + h * D, c, s, D);
        }
        for (int64_t h = 0; h < KVH; h++) {
            if (k_norm) rms_norm_head(k + h * D, k_norm, eps, D);
            rotate(k + h * D, c, s, D);
        }
        if (half) {
            store_half((_Float16 *)k_cache + slot * kv_row, k, kv_row);
            store_half((_Float16 *)v_cache + slot * kv_row, v, kv_row);
        } else {
            memcpy((float *)k_cache + slot * kv_row, k, sizeof(float) * kv_row);
            memcpy((float *)v_cache + slot * kv_row, v, sizeof(float) * kv_row);
        }
    }
    return 0;
}

/* The cache is float32, or float16 when kv_half (k and v rounded as they are stored); each variant is compiled
   with a constant, so the per-token branch disappears. */
int tgi_nb_rope_write_kv_f32(float *qkv, const int64_t *positions, const float *cos, const float *sin,
                             const int64_t *slots, void *k_cache, void *v_cache, const float *q_norm,
                             const float *k_norm, float eps, int64_t T, int64_t H, int64_t KVH, int64_t D,
                             int64_t num_slots, int64_t max_pos, int64_t kv_half) {
    if (kv_half)
        return rope_write_kv(qkv, positions, cos, sin, slots, k_cache, v_cache, q_norm, k_norm, eps, T, H, KVH, D,
                             num_slots, max_pos, 1);
    return rope_write_kv(qkv, positions, cos, sin, slots, k_cache, v_cache, q_norm, k_norm, eps, T, H, KVH, D,
                         num_slots, max_pos, 0);
}
