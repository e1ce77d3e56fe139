/*
 * Paged decode attention for CPU, float32 queries and outputs over a float32 KV cache, or, built with -DKV_HALF,
 * over a float16 one (half the bytes to read; each K/V row is widened to float32 as it is loaded, so the
 * arithmetic is the float32 kernel's).
 *
 * One query token per sequence attends to that sequence's context in a paged KV cache laid out as
 * [num_blocks, block_size, num_kv_heads, head_dim]. Built at first use by tgi_nb/models/attention.py with
 * the system C compiler (-O3 -march=native -ffast-math) and called through ctypes, which releases the GIL
 * for the duration of the call.
 *
 * Decode attention reads every K and V row of the context once and does little arithmetic per byte, so
 * the design is about memory traffic:
 * - all query heads of a GQA group are computed from one read of each K/V row;
 * - a context is cut into parts of PART tokens (counted from the first attended position), so that one
 *   long sequence still keeps every thread busy; parts are merged at the end, in order;
 * - a work item is one part of a sequence with a range of kv heads. With enough parts per thread the range
 *   is all kv heads, so each block is read as one contiguous run (per kv head it would be 256-byte pieces
 *   at a stride, which measured 1.6x slower); with few parts it is one kv head, to keep every thread busy;
 * - the context is walked in tiles of TILE tokens: scores for the tile, one online-softmax update per
 *   tile (max, rescale, exp), then V. While the scores of a tile are computed the tile's V rows are
 *   prefetched, so that they arrive while the CPU is busy.
 *
 * Batch invariance: every (sequence, query head, part) is computed by one thread with the same sequence of
 * floating-point operations, fixed by head_dim, the sequence's own context and window, TILE and PART, and
 * parts are merged in a fixed order. Neither the kv-head range of a work item nor the thread that takes it
 * changes a single operation, so a sequence's output is bit-identical whatever else is in the batch and
 * however many threads run.
 *
 * pthreads, not OpenMP: torch ships its own OpenMP runtime and a second one in the same process fights it
 * for the same cores.
 *
 * No infinities anywhere (a large negative sentinel instead): -ffast-math lets the compiler assume
 * finite values.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TILE 64              /* tokens per softmax tile; a multiple of 8 */
#define PART 512             /* tokens per part of a context; a multiple of TILE */
#define NEG_BIG (-1.0e30f)   /* "minus infinity" for masked scores and the initial running max */

/* GCC/clang vector extensions: 8 floats map to one AVX register, or two SSE/NEON registers elsewhere. */
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

static inline v8f load8(const float *p) { v8f v; memcpy(&v, p, sizeof v); return v; }

#ifdef KV_HALF
typedef _Float16 kv_t;
typedef _Float16 v8h __attribute__((vector_size(16)));
#if defined(__F16C__)
#include <immintrin.h>
/* One vcvtph2ps, spelled out: GCC 12 turned __builtin_convertvector of _Float16 lanes into a library call per
 * element, which made attention over a float16 cache 9x slower than over a float32 one (845 vs 92 us at 1,536
 * tokens) instead of faster. Exact either way. */
static inline v8f loadkv8(const kv_t *p) { return (v8f)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
#else
/* the compiler's own conversion, exact */
static inline v8f loadkv8(const kv_t *p) { v8h v; memcpy(&v, p, sizeof v); return __builtin_convertvector(v, v8f); }
#endif
#define PAGED_DECODE_ATTENTION paged_decode_attention_f16kv
#else
typedef float kv_t;
static inline v8f loadkv8(const kv_t *p) { return load8(p); }
#define PAGED_DECODE_ATTENTION paged_decode_attention_f32
#endif
static inline void store8(float *p, v8f v) { memcpy(p, &v, sizeof v); }
static inline v8f splat8(float x) { return (v8f){x, x, x, x, x, x, x, x}; }
static inline float hsum8(v8f v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }
static inline v8f vmax8(v8f a, v8f b) { const v8i m = a > b; return (v8f)(((v8i)a & m) | ((v8i)b & ~m)); }
static inline float hmax8(v8f v)
{
    float m = v[0];
    for (int j = 1; j < 8; j++) m = v[j] > m ? v[j] : m;
    return m;
}

/* exp(x) for x <= 0, 8 at a time (Cephes' expf polynomial, ~1 ulp); exactly 0 below -87 where expf
 * underflows. Own code rather than libm so that it vectorizes everywhere and gives the same bits on
 * every machine with the same instruction set. */
static inline v8f vexp_neg(v8f x)
{
    const v8i keep = x >= splat8(-87.0f);
    x = (v8f)(((v8i)x & keep) | ((v8i)splat8(-87.0f) & ~keep));
    const v8i n = __builtin_convertvector(x * splat8(-1.44269504088896341f) + splat8(0.5f), v8i); /* round(-x/ln2) */
    const v8f nf = __builtin_convertvector(n, v8f);
    const v8f r = (x + nf * splat8(0.693359375f)) + nf * splat8(-2.12194440e-4f); /* x + n ln2, in two parts */
    v8f p = splat8(1.9875691500e-4f);
    p = p * r + splat8(1.3981999507e-3f);
    p = p * r + splat8(8.3334519073e-3f);
    p = p * r + splat8(4.1665795894e-2f);
    p = p * r + splat8(1.6666665459e-1f);
    p = p * r + splat8(5.0000001201e-1f);
    p = p * r * r + r + splat8(1.0f);
    const v8i two_pow_minus_n = ((v8i){127, 127, 127, 127, 127, 127, 127, 127} - n) << 23;
    return (v8f)((v8i)(p * (v8f)two_pow_minus_n) & keep);
}

typedef struct {
    const float *q;              /* [B, H, D] */
    const kv_t *k_cache;         /* [NB, BS, KVH, D] */
    const kv_t *v_cache;         /* [NB, BS, KVH, D] */
    const int32_t *block_tables; /* [B, MAXB] */
    const int32_t *context_lens; /* [B] */
    float *out;                  /* [B, H, D] */
    int64_t B, H, KVH, D, BS, MAXB;
    float scale;
    int64_t window;
    int64_t heads_per_item;      /* kv heads per work item */
    int64_t items_per_part;      /* KVH / heads_per_item */
    const int64_t *part_seq;     /* [n_parts] sequence of each part; a sequence's parts are consecutive */
    const int64_t *first_part;   /* [B + 1] index of each sequence's first part */
    float *partials;             /* [n_parts, H, D + 2] unnormalized acc, max, sum of multi-part sequences */
    int64_t n_items;
    int64_t next_item;           /* shared work counter, taken with atomics */
} params_t;

/* Per work item: where its query heads, state and the tile's row offsets live in the thread's scratch. */
typedef struct {
    int64_t nh;                  /* query heads of the item */
    int64_t span;                /* floats of a token row the item reads: its kv heads x D */
    int64_t *rows;               /* [TILE] element offsets of the tile's token rows */
    float *qs, *acc, *sc, *mx, *sum, *alpha;
} item_state_t;

static size_t scratch_floats(const params_t *p)
{
    const int64_t nh = p->H / p->KVH * p->heads_per_item;
    /* TILE int64 row offsets, then q, acc, scores, max, sum, alpha */
    return (size_t)(2 * TILE + nh * (2 * p->D + TILE + 3));
}

static inline void fill_rows(int64_t *restrict rows, int64_t n, const int32_t *restrict table, int64_t *blk_idx,
                             int64_t *off, int64_t bs, int64_t row_stride, int64_t first)
{
    /* Walk block and offset incrementally: no integer division per token. */
    for (int64_t i = 0; i < n; i++) {
        rows[i] = ((int64_t)table[*blk_idx] * bs + *off) * row_stride + first;
        if (++*off == bs) { *off = 0; ++*blk_idx; }
    }
}

/* One online-softmax step for every head over the tile's scores: new running max, rescale factor of
 * what was accumulated so far, probabilities in place of scores, running sum. */
static inline void tile_softmax(item_state_t *s, int64_t n)
{
    const int64_t n8 = (n + 7) / 8;
    for (int64_t h = 0; h < s->nh; h++) {
        float *restrict sh = s->sc + h * TILE;
        for (int64_t i = n; i < n8 * 8; i++) sh[i] = NEG_BIG;
        v8f m8 = load8(sh);
        for (int64_t j = 1; j < n8; j++) m8 = vmax8(load8(sh + 8 * j), m8);
        const float tmax = hmax8(m8);
        const float new_max = tmax > s->mx[h] ? tmax : s->mx[h];
        const float alpha = vexp_neg(splat8(s->mx[h] - new_max))[0]; /* 0 on the first tile */
        v8f s8 = splat8(0.0f);
        for (int64_t j = 0; j < n8; j++) {
            const v8f e = vexp_neg(load8(sh + 8 * j) - splat8(new_max));
            store8(sh + 8 * j, e);
            s8 += e;
        }
        s->sum[h] = s->sum[h] * alpha + hsum8(s8);
        s->mx[h] = new_max;
        s->alpha[h] = alpha;
    }
}

static inline void prefetch_row(const kv_t *row, int64_t span)
{
    const int64_t per_line = 64 / sizeof(kv_t);
    for (int64_t x = 0; x < span; x += per_line) __builtin_prefetch(row + x, 0, 3);
}

/* head_dim = 8 * NV. Inlined with a constant NV for common sizes so that a head's accumulator stays in
 * registers; also called with a run-time NV for other multiples of 8. */
static inline __attribute__((always_inline)) void
tile_vec(item_state_t *s, const kv_t *restrict kc, const kv_t *restrict vc, int64_t n, int64_t G, const int NV)
{
    const int64_t D = 8 * NV;
    const int64_t *restrict rows = s->rows;
    for (int64_t i = 0; i < n; i++) {
        prefetch_row(vc + rows[i], s->span);
        /* query head h of the item reads the item's kv head h / G, at offset (h / G) * D in the row */
        for (int64_t h0 = 0, koff = 0; h0 < s->nh; h0 += G, koff += D) {
            const kv_t *restrict kg = kc + rows[i] + koff;
            for (int64_t h = h0; h < h0 + G; h++) {
                const float *restrict qh = s->qs + h * D;
                v8f a0 = splat8(0.0f), a1 = splat8(0.0f);
                int c = 0;
                for (; c + 1 < NV; c += 2) {
                    a0 += load8(qh + 8 * c) * loadkv8(kg + 8 * c);
                    a1 += load8(qh + 8 * c + 8) * loadkv8(kg + 8 * c + 8);
                }
                if (c < NV) a0 += load8(qh + 8 * c) * loadkv8(kg + 8 * c);
                s->sc[h * TILE + i] = hsum8(a0 + a1);
            }
        }
    }
    tile_softmax(s, n);
    for (int64_t h = 0; h < s->nh; h++) {
        const float *restrict ph = s->sc + h * TILE;
        const kv_t *restrict vg = vc + (h / G) * D;
        float *restrict ah = s->acc + h * D;
        const v8f alpha = splat8(s->alpha[h]);
        for (int c0 = 0; c0 < NV; c0 += 8) {   /* 8 vectors of accumulator at a time fit the registers */
            const int ch = NV - c0 < 8 ? NV - c0 : 8;
            v8f a[8];
            for (int c = 0; c < ch; c++) a[c] = load8(ah + 8 * (c0 + c)) * alpha;
            for (int64_t i = 0; i < n; i++) {
                const v8f w = splat8(ph[i]);
                const kv_t *restrict vr = vg + rows[i] + 8 * c0;
                for (int c = 0; c < ch; c++) a[c] += w * loadkv8(vr + 8 * c);
            }
            for (int c = 0; c < ch; c++) store8(ah + 8 * (c0 + c), a[c]);
        }
    }
}

/* Any head_dim, in plain loops the compiler vectorizes as it can. */
static void tile_scalar(item_state_t *s, const kv_t *restrict kc, const kv_t *restrict vc, int64_t n, int64_t G,
                        int64_t D)
{
    const int64_t *restrict rows = s->rows;
    for (int64_t i = 0; i < n; i++) {
        prefetch_row(vc + rows[i], s->span);
        for (int64_t h0 = 0, koff = 0; h0 < s->nh; h0 += G, koff += D) {
            const kv_t *restrict kg = kc + rows[i] + koff;
            for (int64_t h = h0; h < h0 + G; h++) {
                const float *restrict qh = s->qs + h * D;
                float dot = 0.0f;
                for (int64_t d = 0; d < D; d++) dot += qh[d] * (float)kg[d];
                s->sc[h * TILE + i] = dot;
            }
        }
    }
    tile_softmax(s, n);
    for (int64_t h = 0; h < s->nh; h++) {
        const float *restrict ph = s->sc + h * TILE;
        const kv_t *restrict vg = vc + (h / G) * D;
        float *restrict ah = s->acc + h * D;
        const float alpha = s->alpha[h];
        for (int64_t d = 0; d < D; d++) ah[d] *= alpha;
        for (int64_t i = 0; i < n; i++) {
            const float w = ph[i];
            const kv_t *restrict vr = vg + rows[i];
            for (int64_t d = 0; d < D; d++) ah[d] += w * (float)vr[d];
        }
    }
}

/* out = acc / sum for one head. Its own function, one head per call: inlined, GCC's AVX2 build vectorized the loop
 * over all of a work item's heads at once and rounded differently with 1 and with 3 heads per item, so a
 * sequence's output changed with how the batch was cut into items (head_dim 16, 2 threads). */
static __attribute__((noinline)) void normalize_head(float *restrict out, const float *restrict acc, float sum,
                                                     int64_t D)
{
    const float inv = 1.0f / sum;
    for (int64_t d = 0; d < D; d++) out[d] = acc[d] * inv;
}

static inline __attribute__((always_inline)) void
attend_item(const params_t *p, int64_t item, float *restrict scratch, const int NV)
{
    const int64_t KVH = p->KVH, G = p->H / KVH, BS = p->BS, D = p->D;
    const int64_t part = item / p->items_per_part;
    const int64_t b = p->part_seq[part];
    const int64_t part_in_seq = part - p->first_part[b];
    const int64_t single = p->first_part[b + 1] - p->first_part[b] == 1;
    const int64_t g0 = (item % p->items_per_part) * p->heads_per_item;
    const int64_t g1 = g0 + p->heads_per_item < KVH ? g0 + p->heads_per_item : KVH;
    const int64_t ctx = p->context_lens[b];
    const int64_t start = (p->window > 0 && ctx > p->window) ? ctx - p->window : 0;
    const int64_t begin = start + part_in_seq * PART;
    const int64_t end = ctx - begin < PART ? ctx : begin + PART;
    const int64_t nh = (g1 - g0) * G;

    item_state_t s;
    s.nh = nh;
    s.span = (g1 - g0) * D;
    s.rows = (int64_t *)scratch;
    s.qs = scratch + 2 * TILE;
    s.acc = s.qs + nh * D;
    s.sc = s.acc + nh * D;
    s.mx = s.sc + nh * TILE;
    s.sum = s.mx + nh;
    s.alpha = s.sum + nh;

    const float *restrict q = p->q + (b * p->H + g0 * G) * D;
    for (int64_t x = 0; x < nh * D; x++) {
        s.qs[x] = q[x] * p->scale;
        s.acc[x] = 0.0f;
    }
    for (int64_t h = 0; h < nh; h++) {
        s.mx[h] = NEG_BIG;
        s.sum[h] = 0.0f;
    }

    const int32_t *restrict table = p->block_tables + b * p->MAXB;
    int64_t blk_idx = begin / BS, off = begin % BS;
    for (int64_t t0 = begin; t0 < end; t0 += TILE) {
        const int64_t n = end - t0 < TILE ? end - t0 : TILE;
        fill_rows(s.rows, n, table, &blk_idx, &off, BS, KVH * D, g0 * D);
        if (NV > 0) tile_vec(&s, p->k_cache, p->v_cache, n, G, NV);
        else tile_scalar(&s, p->k_cache, p->v_cache, n, G, D);
    }

    if (single) {
        float *restrict out = p->out + (b * p->H + g0 * G) * D;
        for (int64_t h = 0; h < nh; h++) normalize_head(out + h * D, s.acc + h * D, s.sum[h], D);
    } else {
        float *restrict dst = p->partials + (part * p->H + g0 * G) * (D + 2);
        for (int64_t h = 0; h < nh; h++) {
            memcpy(dst + h * (D + 2), s.acc + h * D, (size_t)D * sizeof(float));
            dst[h * (D + 2) + D] = s.mx[h];
            dst[h * (D + 2) + D + 1] = s.sum[h];
        }
    }
}

/* Softmax-weighted merge of a sequence's parts, in part order. */
static void merge_parts(const params_t *p, int64_t b)
{
    const int64_t D = p->D, stride = p->H * (D + 2);
    const float *first = p->partials + p->first_part[b] * stride;
    const int64_t n = p->first_part[b + 1] - p->first_part[b];
    for (int64_t h = 0; h < p->H; h++) {
        const float *ph = first + h * (D + 2);
        float m = ph[D];
        for (int64_t j = 1; j < n; j++) m = ph[j * stride + D] > m ? ph[j * stride + D] : m;
        float *restrict out = p->out + (b * p->H + h) * D;
        memset(out, 0, (size_t)D * sizeof(float));
        float total = 0.0f;
        for (int64_t j = 0; j < n; j++) {
            const float w = vexp_neg(splat8(ph[j * stride + D] - m))[0];
            total += w * ph[j * stride + D + 1];
            for (int64_t d = 0; d < D; d++) out[d] += w * ph[j * stride + d];
        }
        const float inv = 1.0f / total;
        for (int64_t d = 0; d < D; d++) out[d] *= inv;
    }
}

static void attend_item_dispatch(const params_t *p, int64_t item, float *scratch)
{
    /* Constant NV for the usual head sizes (each one adds compile time at first use); the choice depends
     * only on D, so it is batch invariant. */
    switch (p->D) {
    case 16: attend_item(p, item, scratch, 2); break;
    case 32: attend_item(p, item, scratch, 4); break;
    case 64: attend_item(p, item, scratch, 8); break;
    case 128: attend_item(p, item, scratch, 16); break;
    default: attend_item(p, item, scratch, p->D % 8 == 0 ? (int)(p->D / 8) : 0); break;
    }
}

static void *worker(void *arg)
{
    params_t *p = (params_t *)arg;
    float *scratch = (float *)aligned_alloc(64, ((scratch_floats(p) * sizeof(float) + 63) / 64) * 64);
    if (!scratch) return (void *)1;
    for (;;) {
        /* Dynamic hand-out balances mixed context lengths; it only chooses who computes an item. */
        const int64_t item = __atomic_fetch_add(&p->next_item, 1, __ATOMIC_RELAXED);
        if (item >= p->n_items) break;
        attend_item_dispatch(p, item, scratch);
    }
    free(scratch);
    return NULL;
}

/*
 * Returns 0 on success, 1 on invalid arguments (shape, context length beyond the block table, block id
 * out of range), 2 when memory for scratch buffers could not be had. Arguments are checked before any
 * thread starts, so bad input never reads outside the cache.
 */
int PAGED_DECODE_ATTENTION(const float *q, const kv_t *k_cache, const kv_t *v_cache,
                               const int32_t *block_tables, const int32_t *context_lens, float *out,
                               int64_t B, int64_t H, int64_t KVH, int64_t D, int64_t num_blocks,
                               int64_t BS, int64_t MAXB, float scale, int64_t window, int64_t num_threads,
                               int64_t min_rows_per_thread)
{
    if (B < 0 || H <= 0 || KVH <= 0 || D <= 0 || BS <= 0 || MAXB < 0 || H % KVH != 0) return 1;
    int64_t total_rows = 0, n_parts = 0, multi = 0;
    for (int64_t b = 0; b < B; b++) {
        const int64_t ctx = context_lens[b];
        if (ctx < 0 || ctx > MAXB * BS) return 1;
        const int64_t start = (window > 0 && ctx > window) ? ctx - window : 0;
        const int32_t *table = block_tables + b * MAXB;
        for (int64_t j = start / BS; j < (ctx + BS - 1) / BS; j++)
            if (table[j] < 0 || table[j] >= num_blocks) return 1;
        total_rows += (ctx - start) * KVH;
        n_parts += (ctx - start + PART - 1) / PART;
        multi |= ctx - start > PART;
    }

    int64_t *part_seq = malloc((size_t)(n_parts + B + 1) * sizeof(int64_t));
    float *partials = multi ? malloc((size_t)(n_parts * H * (D + 2)) * sizeof(float)) : NULL;
    if (!part_seq || (multi && !partials)) {
        free(part_seq);
        free(partials);
        return 2;
    }
    int64_t *first_part = part_seq + n_parts;
    for (int64_t b = 0, k = 0; b < B; b++) {
        const int64_t ctx = context_lens[b];
        const int64_t start = (window > 0 && ctx > window) ? ctx - window : 0;
        first_part[b] = k;
        for (int64_t j = 0; j < (ctx - start + PART - 1) / PART; j++) part_seq[k++] = b;
        if (ctx == 0) memset(out + b * H * D, 0, (size_t)(H * D) * sizeof(float)); /* nothing to attend to */
    }
    first_part[B] = n_parts;

    /* Starting a thread costs tens of microseconds: only worth it when each gets enough K/V to read. */
    int64_t n_threads = num_threads < 1 ? 1 : num_threads;
    if (min_rows_per_thread > 0 && total_rows / min_rows_per_thread < n_threads)
        n_threads = total_rows / min_rows_per_thread;
    if (n_threads > n_parts * KVH) n_threads = n_parts * KVH;
    if (n_threads < 1) n_threads = 1;
    /* Whole rows (all kv heads) read blocks contiguously; split by kv head only when parts are too few to
     * keep every thread busy. */
    const int64_t heads_per_item = (n_threads == 1 || n_parts >= 4 * n_threads) ? KVH : 1;

    params_t p = {q, k_cache, v_cache, block_tables, context_lens, out, B, H, KVH, D, BS, MAXB,
                  scale, window, heads_per_item, KVH / heads_per_item, part_seq, first_part, partials,
                  n_parts * (KVH / heads_per_item), 0};

    pthread_t threads[n_threads > 1 ? n_threads - 1 : 1];
    int64_t started = 0;
    for (int64_t t = 0; t < n_threads - 1; t++) {
        /* A thread that cannot be started just leaves its share to the others. */
        if (pthread_create(&threads[started], NULL, worker, &p) == 0) started++;
    }
    int failed = worker(&p) != NULL;
    for (int64_t t = 0; t < started; t++) {
        void *res = NULL;
        pthread_join(threads[t], &res);
        failed |= res != NULL;
    }
    /* A worker without scratch memory takes no items and others do them; fail only if some were left. */
    const int rc = (failed && p.next_item < p.n_items) ? 2 : 0;
    if (rc == 0 && multi)
        for (int64_t b = 0; b < B; b++)
            if (first_part[b + 1] - first_part[b] > 1) merge_parts(&p, b);
    free(part_seq);
    free(partials);
    return rc;
}
