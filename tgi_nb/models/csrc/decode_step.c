/* A whole decode step of a Llama-family model in one call: every layer, then the final norm and the lm_head,
   for up to 64 sequences of one token each, with GGUF weights in the rows16 layout (quant_gemm.c) and a paged KV
   cache of float32, or of float16 when built with -DKV_HALF (tgi_nb_decode_step_f16kv: K/V rounded as they are
   stored, widened as they are read, as paged_attention.c and rope_cache.c do for that cache).

   Why: at one token the arithmetic of a layer is a few tens of microseconds, and the per-layer path (six Python
   calls into torch and ctypes per layer, each starting its own parallel section) spent about a third of the
   step between kernels: SmolLM2-135M's forward measured 6.4 ms that way, of which 4.2 ms in the products. Here
   the threads enter one OpenMP parallel region for the whole step and meet at barriers between stages:

       per layer:  RMSNorm (one thread)        -> q|k|v product            (threads split the 16-row groups)
                   RoPE + K/V into the cache   (threads split the sequences)
                   attention                   (threads split (sequence, part, kv heads) items)
                   o product + residual        (groups) -> RMSNorm -> gate|up with silu * up (groups)
                   down product + residual     (groups)
       then:       final RMSNorm -> lm_head    (groups)

   The stages are the per-layer path's own code, included here: the products and the rotation give the per-layer
   path's bits; the attention is the same source under this file's build flags, so it can differ from the
   standalone library in the last bits (the engine sends every decode token here, so a sequence never mixes the
   two). Each output is computed by one thread in a fixed order: results do not depend on the thread count or on
   the other sequences of the step. */
#include <omp.h>

#include "quant_gemm.c"
#include "rope_cache.c"
/* The attention as its own library builds it (-ffast-math contracts a * b + c into FMAs there); this file is
   built with contraction off for the products' sake. */
#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")
#include "paged_attention.c"
#pragma GCC pop_options

#ifdef KV_HALF
#define DECODE_STEP tgi_nb_decode_step_f16kv
#define KV_IS_HALF 1
#else
#define DECODE_STEP tgi_nb_decode_step
#define KV_IS_HALF 0
#endif

/* dims */
enum { D_LAYERS, D_HIDDEN, D_INTER, D_HEADS, D_KV_HEADS, D_HEAD_DIM, D_VOCAB, D_WINDOW, D_MAX_POS, D_NUM_BLOCKS,
       D_BLOCK_SIZE, D_COUNT };
/* per-layer pointers: the four products' segment tables (quant_gemm.c), then the float tensors and the caches */
enum { P_QKV, P_O, P_GATE_UP, P_DOWN, P_QKV_BIAS, P_INPUT_NORM, P_POST_NORM, P_Q_NORM, P_K_NORM, P_K_CACHE,
       P_V_CACHE, P_COUNT };
/* per-layer segment counts of the four products */
enum { T_QKV, T_O, T_GATE_UP, T_DOWN, T_COUNT };

/* The input of the next product: x itself, or its RMSNorm into xn; its block sums and, with the fast numerics, its
   quants (each family the model's products use, K-quants only where K is whole superblocks). One thread (omp
   single): the other threads see `in` after the single's barrier. */
static void prepare_input(const float *x, const float *norm, float eps, int M, int K, float *xn, xin_t *in, int fast) {
    in->x = norm ? xn : x;
    const int8_t *qk = in->qk;
    if (K % QKK) in->qk = NULL;
    for (int i = 0; i < M; i++) input_row(x, norm, eps, K, i, fast, in);
    in->qk = qk;
}

/* Run the step. x: [M, hidden] the embedded tokens (overwritten: the residual stream); positions, slots: [M];
   block_tables: [M, max_blocks]; context_lens: [M] (tokens including this one); logits: [M, vocab].
   dims, layer_ptrs ([layers, P_COUNT]), layer_types ([layers, T_COUNT]): the model (see
   tgi_nb/models/decode_step.py); the products are segment tables (quant_gemm.c) and layer_types their lengths;
   model_ptrs: cos, sin ([max_pos, head_dim]), final norm, lm_head's segment table (lm_head_type: its length);
   fparams: eps, attention scale. fast: the fast numerics (activations quantized to int8, integer dot products)
   instead of the exact ones.
   Returns 0, 1 for arguments out of range (nothing computed), 2 when out of memory. */
int DECODE_STEP(const int64_t *dims, const float *fparams, const int64_t *layer_ptrs,
                       const int32_t *layer_types, const int64_t *model_ptrs, int32_t lm_head_type, float *x, int M,
                       const int64_t *positions, const int64_t *slots, const int32_t *block_tables,
                       int64_t max_blocks, const int32_t *context_lens, float *logits, int nthreads, int fast) {
    const int L = (int)dims[D_LAYERS], Hd = (int)dims[D_HIDDEN], I = (int)dims[D_INTER];
    const int64_t NH = dims[D_HEADS], KVH = dims[D_KV_HEADS], D = dims[D_HEAD_DIM];
    const int V = (int)dims[D_VOCAB];
    const int64_t window = dims[D_WINDOW], max_pos = dims[D_MAX_POS], NB = dims[D_NUM_BLOCKS];
    const int64_t BS = dims[D_BLOCK_SIZE];
    const float eps = fparams[0], scale = fparams[1];
    const float *cos_table = (const float *)model_ptrs[0], *sin_table = (const float *)model_ptrs[1];
    const float *final_norm = (const float *)model_ptrs[2];
    const int64_t *lm_head = (const int64_t *)model_ptrs[3];
    const int QD = (int)(NH * D), NQKV = (int)((NH + 2 * KVH) * D);

    if (M < 1 || M > SILU_MAX_ROWS || Hd % QK || QD % QK || NH % KVH || D % 2 || nthreads < 1) return 1;
    /* The weights: every product's segments valid, gate|up pairing on groups; and which activation quants the
       fast numerics need (1: Q8_0, 2: Q8_K). */
    int families = segment_families(lm_head, lm_head_type);
    if (!segments_valid(lm_head, lm_head_type, Hd, V)) return 1;
    for (int l = 0; l < L; l++) {
        const int64_t *ptr = layer_ptrs + (size_t)l * P_COUNT;
        const int32_t *n = layer_types + (size_t)l * T_COUNT;
        const int64_t *qkv = (const int64_t *)ptr[P_QKV], *o = (const int64_t *)ptr[P_O];
        const int64_t *gate_up = (const int64_t *)ptr[P_GATE_UP], *down = (const int64_t *)ptr[P_DOWN];
        if (!segments_valid(qkv, n[T_QKV], Hd, NQKV) || !segments_valid(o, n[T_O], QD, Hd)
            || !segments_valid(gate_up, n[T_GATE_UP], Hd, 2 * I) || !gated_valid(gate_up, n[T_GATE_UP], Hd, I)
            || !segments_valid(down, n[T_DOWN], I, Hd))
            return 1;
        families |= segment_families(qkv, n[T_QKV]) | segment_families(o, n[T_O])
                    | segment_families(gate_up, n[T_GATE_UP]) | segment_families(down, n[T_DOWN]);
    }
    /* Everything an index comes from is checked before any thread starts: bad input never touches memory
       outside the cache. */
    for (int b = 0; b < M; b++) {
        const int64_t ctx = context_lens[b];
        if (positions[b] < 0 || positions[b] >= max_pos || slots[b] < 0 || slots[b] >= NB * BS) return 1;
        if (ctx < 1 || ctx > max_blocks * BS) return 1;
        const int64_t start = (window > 0 && ctx > window) ? ctx - window : 0;
        for (int64_t j = start / BS; j < (ctx + BS - 1) / BS; j++)
            if (block_tables[b * max_blocks + j] < 0 || block_tables[b * max_blocks + j] >= NB) return 1;
    }

    /* The attention's work items: parts of PART tokens of each sequence. */
    int64_t n_parts = 0, multi = 0;
    for (int b = 0; b < M; b++) {
        const int64_t ctx = context_lens[b], start = (window > 0 && ctx > window) ? ctx - window : 0;
        n_parts += (ctx - start + PART - 1) / PART;
        multi |= ctx - start > PART;
    }
    /* Whole rows of kv heads per item (read contiguously) when there are plenty of parts, one kv head per item
       otherwise, so that both threads share a lone sequence's attention (as paged_attention.c cuts them; the cut
       never changes a sequence's bits). */
    const int64_t heads_per_item = (nthreads == 1 || n_parts >= 4 * nthreads) ? KVH : 1;
    params_t attn = {0};
    attn.block_tables = block_tables;
    attn.context_lens = context_lens;
    attn.B = M; attn.H = NH; attn.KVH = KVH; attn.D = D; attn.BS = BS; attn.MAXB = max_blocks;
    attn.scale = scale; attn.window = window;
    attn.heads_per_item = heads_per_item;
    attn.items_per_part = KVH / heads_per_item;
    attn.n_items = n_parts * attn.items_per_part;
    const size_t att_scratch = ((scratch_floats(&attn) * sizeof(float) + 63) / 64) * 64 / sizeof(float);

    const int maxK = Hd > I ? (Hd > QD ? Hd : QD) : (I > QD ? I : QD);
    const size_t floats = (size_t)M * NQKV               /* qkv */
                          + (size_t)M * QD * 2             /* q (contiguous), attention output */
                          + (size_t)M * I                  /* silu(gate) * up */
                          + (multi ? (size_t)n_parts * NH * (D + 2) : 0)
                          + att_scratch * nthreads + 16;
    int64_t *part_index = malloc(sizeof(int64_t) * (size_t)(n_parts + M + 1));
    float *mem = aligned_alloc(64, ((floats * sizeof(float) + 63) / 64) * 64);
    float *xn;          /* a product's input: xn, its block sums and quants (input_alloc, up to maxK columns) */
    xin_t in;
    void *in_base = NULL;
    if (!part_index || !mem || input_alloc(M, maxK, 1, fast, families, &xn, &in, &in_base)) {
        free(part_index);
        free(mem);
        free(in_base);
        return 2;
    }
    float *qkv = mem, *q = qkv + (size_t)M * NQKV;
    float *att = q + (size_t)M * QD, *mlp = att + (size_t)M * QD, *partials = mlp + (size_t)M * I;
    const size_t scratch_at = ((size_t)(partials - mem) + (multi ? (size_t)n_parts * NH * (D + 2) : 0) + 15) / 16 * 16;
    float *scratch = mem + scratch_at;     /* on a cache line */
    int64_t *first_part = part_index + n_parts;
    for (int64_t b = 0, k = 0; b < M; b++) {
        const int64_t ctx = context_lens[b], start = (window > 0 && ctx > window) ? ctx - window : 0;
        first_part[b] = k;
        for (int64_t j = 0; j < (ctx - start + PART - 1) / PART; j++) part_index[k++] = b;
    }
    first_part[M] = n_parts;
    attn.part_seq = part_index;
    attn.first_part = first_part;
    attn.partials = partials;
    attn.q = q;
    attn.out = att;

    #pragma omp parallel num_threads(nthreads)
    {
        float *my_scratch = scratch + att_scratch * (size_t)omp_get_thread_num();
        params_t p = attn;
        for (int l = 0; l < L; l++) {
            const int64_t *ptr = layer_ptrs + (size_t)l * P_COUNT;
            const int32_t *type = layer_types + (size_t)l * T_COUNT;
            #pragma omp single
            prepare_input(x, (const float *)ptr[P_INPUT_NORM], eps, M, Hd, xn, &in, fast);
            segments_product((const int64_t *)ptr[P_QKV], type[T_QKV], NQKV, Hd, &in, fast, M, qkv,
                             (const float *)ptr[P_QKV_BIAS], NULL);
            #pragma omp for schedule(static)
            for (int t = 0; t < M; t++) {
                rope_write_kv(qkv + (size_t)t * NQKV, positions + t, cos_table, sin_table, slots + t,
                              (void *)ptr[P_K_CACHE], (void *)ptr[P_V_CACHE], (const float *)ptr[P_Q_NORM],
                              (const float *)ptr[P_K_NORM], eps, 1, NH, KVH, D, NB * BS, max_pos, KV_IS_HALF);
                memcpy(q + (size_t)t * QD, qkv + (size_t)t * NQKV, sizeof(float) * QD);
            }
            p.k_cache = (const kv_t *)ptr[P_K_CACHE];
            p.v_cache = (const kv_t *)ptr[P_V_CACHE];
            #pragma omp for schedule(static)
            for (int64_t item = 0; item < p.n_items; item++) attend_item_dispatch(&p, item, my_scratch);
            if (multi) {
                #pragma omp for schedule(static)
                for (int b = 0; b < M; b++)
                    if (first_part[b + 1] - first_part[b] > 1) merge_parts(&p, b);
            }
            #pragma omp single
            prepare_input(att, NULL, eps, M, QD, xn, &in, fast);
            segments_product((const int64_t *)ptr[P_O], type[T_O], Hd, QD, &in, fast, M, x, NULL, x);
            #pragma omp single
            prepare_input(x, (const float *)ptr[P_POST_NORM], eps, M, Hd, xn, &in, fast);
            segments_gated((const int64_t *)ptr[P_GATE_UP], type[T_GATE_UP], I, Hd, &in, fast, M, mlp, NULL);
            #pragma omp single
            prepare_input(mlp, NULL, eps, M, I, xn, &in, fast);
            segments_product((const int64_t *)ptr[P_DOWN], type[T_DOWN], Hd, I, &in, fast, M, x, NULL, x);
        }
        #pragma omp single
        prepare_input(x, final_norm, eps, M, Hd, xn, &in, fast);
        segments_product(lm_head, lm_head_type, V, Hd, &in, fast, M, logits, NULL, NULL);
    }
    free(part_index);
    free(mem);
    free(in_base);
    return 0;
}
