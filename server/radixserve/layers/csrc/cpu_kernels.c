/* Int4 weights times a few rows of activations on x86 (AVX2, FMA, F16C): the CPU decode
   step's matmul (layers/cpu_kernels.py builds and loads it).

   Why a kernel of our own: torch's CPU int4 matmul turns every weight into a float before
   multiplying, and at one row that arithmetic, not memory, bounds it (at AVX2 dispatch, at
   up to eight rows too). Here the weights stay integers: the activations are quantized to
   int16 per group of 32 (finer than the bfloat16 rounding torch's kernel applies to them)
   and meet the 4-bit weights in integer multiply-adds (`vpmaddwd`, 16 per instruction).
   No library on PyPI offers such a matmul for torch on x86.

   Weights: groups of 32 inputs, each with a scale d and a minimum m (w = d * q + m,
   q in [0, 15]: a 4-bit GGUF's blocks, d and m in float16 as GGUF keeps them). They are
   stored in blocks of 8 output rows, one record of 160 bytes per block and group,
   [N/8, G, 160], read as one sequential stream (a decode step is bound by reading them):
   128 bytes of nibbles [4, 8, 4] (vector t, row j, byte b holds q[j][4t + b] in its low
   nibble and q[j][16 + 4t + b] in its high one, so each 32-bit lane of a vector belongs to
   one output row: no horizontal sums), then the 8 rows' d, then their m.

   Activations: quantized per row and group to int16 with one scale (amax / 32767), and
   their exact float sum, which multiplies the minimum:
   sum_i w_i x_i = d * sum_i q_i x_i + m * sum_i x_i ~ d * dx * sum_i q_i xq_i + m * sum_i x_i. */
#include <immintrin.h>
#include <omp.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static __thread int8_t *scratch;
static __thread size_t scratch_size;

/* Memory kept between calls of one thread, grown (never shrunk) to `need` bytes; -1 when
   short. */
static int grow(char **buf, size_t *size, size_t need) {
    if (need <= *size) return 0;
    free(*buf);
    *buf = aligned_alloc(64, (need + 63) / 64 * 64);
    *size = *buf ? need : 0;
    return *buf ? 0 : -1;
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFF + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

static inline __m256 load8(const void *x, int x_bf16, size_t at) {
    if (!x_bf16) return _mm256_loadu_ps((const float *)x + at);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)x + at));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline __m256 round8(__m256 v, int bf16) { /* to bfloat16's precision, as f32_to_bf16 */
    if (!bf16) return v;
    __m256i u = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
    return _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32((int)0xFFFF0000u)));
}

static inline void store8(void *out, int bf16, size_t at, __m256 y) {
    if (bf16) { /* rounded as f32_to_bf16, the upper halves packed (they fit: no saturation) */
        __m256i u = _mm256_srli_epi32(_mm256_castps_si256(round8(y, 1)), 16);
        __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
        _mm_storeu_si128((__m128i *)((uint16_t *)out + at), h);
    } else {
        _mm256_storeu_ps((float *)out + at, y);
    }
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline float hmax(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

static void quantize(const void *x, int x_bf16, int M, int K, int16_t *xq, float *xd, float *xs) {
    int G = K / 32;
    const __m256 sign = _mm256_set1_ps(-0.f);
    for (int r = 0; r < M; r++)
        for (int g = 0; g < G; g++) {
            size_t at = (size_t)r * K + (size_t)g * 32;
            __m256 v[4];
            for (int i = 0; i < 4; i++) v[i] = load8(x, x_bf16, at + 8 * i);
            __m256 amax = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                        _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
            float a = hmax(amax);
            __m256 inv = _mm256_set1_ps(a > 0.f ? 32767.f / a : 0.f);
            /* rounded to nearest even; packs interleave 128-bit lanes, the permute undoes it */
            int16_t q[32];
            for (int i = 0; i < 4; i += 2) {
                __m256i p = _mm256_packs_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv)),
                                               _mm256_cvtps_epi32(_mm256_mul_ps(v[i + 1], inv)));
                _mm256_storeu_si256((__m256i *)(q + 8 * i), _mm256_permute4x64_epi64(p, 0xD8));
            }
            /* stored as the int16 pairs the kernel broadcasts, in its order: for t = 0..3,
               (4t, 4t+2), (4t+1, 4t+3), (16+4t, 18+4t), (17+4t, 19+4t) */
            int16_t *o = xq + at;
            for (int t = 0; t < 4; t++) {
                const int16_t *l = q + 4 * t, *h = q + 16 + 4 * t;
                int16_t pairs[8] = {l[0], l[2], l[1], l[3], h[0], h[2], h[1], h[3]};
                memcpy(o + 8 * t, pairs, sizeof pairs);
            }
            xd[r * G + g] = a / 32767.f;
            xs[r * G + g] = hsum(_mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3])));
        }
}

/* One block of 8 output rows for ROWS (1 to 4) rows of x, reading the block's weights once.
   Always inlined with a constant ROWS, so its loops over rows unroll into registers. */
static inline __attribute__((always_inline)) void block_rows(
    const uint8_t *wb, int G, int K, int N, const int16_t *xq, const float *xd, const float *xs,
    int r0, const int ROWS, int nb, void *out, int out_bf16) {
    const __m256i low = _mm256_set1_epi8(0x0F);
    const __m256i even = _mm256_set1_epi16(0x00FF);
    __m256 acc[4], accm[4];
    for (int r = 0; r < ROWS; r++) acc[r] = accm[r] = _mm256_setzero_ps();
    for (int g = 0; g < G; g++) {
        const uint8_t *rec = wb + (size_t)g * 160;
        _mm_prefetch((const char *)rec + 8 * 160, _MM_HINT_T0);
        _mm_prefetch((const char *)rec + 8 * 160 + 64, _MM_HINT_T0);
        _mm_prefetch((const char *)rec + 8 * 160 + 128, _MM_HINT_T0);
        /* each 32-bit lane is one row's 4 bytes: low nibbles are inputs 4t..4t+3, high ones
           16+4t..16+4t+3; the even and odd bytes of each half meet the matching int16
           activation pairs in one madd each. int32 sums of 32 products of 15 x 32767
           cannot overflow. */
        __m256i s32[4];
        for (int r = 0; r < ROWS; r++) s32[r] = _mm256_setzero_si256();
        for (int t = 0; t < 4; t++) {
            __m256i v = _mm256_loadu_si256((const __m256i *)rec + t);
            __m256i lo = _mm256_and_si256(v, low);
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
            __m256i le = _mm256_and_si256(lo, even), lod = _mm256_srli_epi16(lo, 8);
            __m256i he = _mm256_and_si256(hi, even), hod = _mm256_srli_epi16(hi, 8);
            for (int r = 0; r < ROWS; r++) {
                const int32_t *xp = (const int32_t *)(xq + (size_t)(r0 + r) * K + (size_t)g * 32) + 4 * t;
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
                /* the VNNI build: multiply, pair-add and accumulate in one instruction */
                s32[r] = _mm256_dpwssd_epi32(s32[r], le, _mm256_set1_epi32(xp[0]));
                s32[r] = _mm256_dpwssd_epi32(s32[r], lod, _mm256_set1_epi32(xp[1]));
                s32[r] = _mm256_dpwssd_epi32(s32[r], he, _mm256_set1_epi32(xp[2]));
                s32[r] = _mm256_dpwssd_epi32(s32[r], hod, _mm256_set1_epi32(xp[3]));
#else
                __m256i a = _mm256_madd_epi16(le, _mm256_set1_epi32(xp[0]));
                a = _mm256_add_epi32(a, _mm256_madd_epi16(lod, _mm256_set1_epi32(xp[1])));
                a = _mm256_add_epi32(a, _mm256_madd_epi16(he, _mm256_set1_epi32(xp[2])));
                a = _mm256_add_epi32(a, _mm256_madd_epi16(hod, _mm256_set1_epi32(xp[3])));
                s32[r] = _mm256_add_epi32(s32[r], a);
#endif
            }
        }
        __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(rec + 128)));
        __m256 m = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(rec + 144)));
        for (int r = 0; r < ROWS; r++) {
            size_t rg = (size_t)(r0 + r) * G + g;
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32[r]), _mm256_mul_ps(d, _mm256_set1_ps(xd[rg])), acc[r]);
            accm[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(xs[rg]), accm[r]);
        }
    }
    for (int r = 0; r < ROWS; r++)
        store8(out, out_bf16, (size_t)(r0 + r) * N + (size_t)nb * 8, _mm256_add_ps(acc[r], accm[r]));
}

/* The blocks of 8 output rows split over the threads of the enclosing OpenMP region (an
   orphaned worksharing loop: on the calling thread alone outside one). */
static void gemm_blocks(const int16_t *xq, const float *xd, const float *xs, int M, int K,
                        const uint8_t *w, int N, void *out, int out_bf16) {
    int G = K / 32;
#pragma omp for schedule(static)
    for (int nb = 0; nb < N / 8; nb++) {
        const uint8_t *wb = w + (size_t)nb * G * 160;
        for (int r0 = 0; r0 < M; r0 += 4) {
            switch (M - r0) {
            case 1: block_rows(wb, G, K, N, xq, xd, xs, r0, 1, nb, out, out_bf16); break;
            case 2: block_rows(wb, G, K, N, xq, xd, xs, r0, 2, nb, out, out_bf16); break;
            case 3: block_rows(wb, G, K, N, xq, xd, xs, r0, 3, nb, out, out_bf16); break;
            default: block_rows(wb, G, K, N, xq, xd, xs, r0, 4, nb, out, out_bf16); break;
            }
        }
    }
}

/* Bytes of the quantized activations of M rows of K inputs, and their scales and sums. */
static size_t quant_bytes(int M, int K) {
    return ((size_t)M * K * 2 + 63) / 64 * 64 + 2 * sizeof(float) * (size_t)M * (K / 32);
}

/* out[M, N] = x[M, K] @ W^T; x and out are float32, or bfloat16 where the flags say so.
   K is a multiple of 32 and N of 8. Returns 0, or -1 when scratch memory is short. */
int int4_gemm(const void *x, int x_bf16, int M, int K, const uint8_t *w, int N, void *out,
              int out_bf16) {
    int G = K / 32;
    size_t xq_bytes = ((size_t)M * K * 2 + 63) / 64 * 64;
    size_t need = quant_bytes(M, K);
    if (grow((char **)&scratch, &scratch_size, need)) return -1;
    int16_t *xq = (int16_t *)scratch;
    float *xd = (float *)(scratch + xq_bytes), *xs = xd + (size_t)M * G;
    quantize(x, x_bf16, M, K, xq, xd, xs);
    /* blocks of rows split over the OpenMP threads torch uses (the same libgomp: torch's
       set_num_threads sets them); small products stay on the calling thread */
#pragma omp parallel if ((size_t)M * N * K >= (1u << 21))
    gemm_blocks(xq, xd, xs, M, K, w, N, out, out_bf16);
    return 0;
}

/* The element-wise steps around the matmuls of a decode step, one call each instead of
   torch's five to seven operations (each of which costs more in dispatch than in work at
   a few rows of 576). */

/* x [M, H] float32, in place: x += delta (float32 or bfloat16; none when delta is NULL),
   then out = x / sqrt(mean(x^2) + eps) * w, in float32 or bfloat16. H is a multiple of 8. */
void add_rms_norm(float *x, const void *delta, int delta_bf16, const float *w, int M, int H,
                  float eps, void *out, int out_bf16) {
    for (int r = 0; r < M; r++) {
        float *xr = x + (size_t)r * H;
        __m256 ss = _mm256_setzero_ps();
        for (int i = 0; i < H; i += 8) {
            __m256 v = _mm256_loadu_ps(xr + i);
            if (delta) {
                v = _mm256_add_ps(v, load8(delta, delta_bf16, (size_t)r * H + i));
                _mm256_storeu_ps(xr + i, v);
            }
            ss = _mm256_fmadd_ps(v, v, ss);
        }
        __m256 inv = _mm256_set1_ps(1.f / sqrtf(hsum(ss) / (float)H + eps));
        for (int i = 0; i < H; i += 8) {
            __m256 y = _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + i), inv), _mm256_loadu_ps(w + i));
            store8(out, out_bf16, (size_t)r * H + i, y);
        }
    }
}

/* gate_up [M, 2I] (gate, then up) -> out [M, I] = silu(gate) * up, in the input's dtype
   (float32 or bfloat16). I is a multiple of 8. */
void silu_mul(const void *gate_up, int bf16, int M, int I, void *out) {
    for (int r = 0; r < M; r++) {
        size_t row = (size_t)r * 2 * I;
        for (int i = 0; i < I; i += 8) {
            __m256 g = load8(gate_up, bf16, row + i), u = load8(gate_up, bf16, row + I + i);
            float gs[8];
            _mm256_storeu_ps(gs, g);
            /* rounded to bfloat16 before the product when the input is, as torch does */
            for (int j = 0; j < 8; j++) {
                gs[j] = gs[j] / (1.f + expf(-gs[j]));
                if (bf16) gs[j] = bf16_to_f32(f32_to_bf16(gs[j]));
            }
            store8(out, bf16, (size_t)r * I + i, _mm256_mul_ps(_mm256_loadu_ps(gs), u));
        }
    }
}

/* One query head's attention over n cached positions: slot t is slots[t], or first + t
   without a slot list. p is scratch for n scores. */
static void attend_head(const void *q, int q_bf16, const void *kbuf, const void *vbuf,
                        int kv_bf16, long head_stride, long first, const long *slots, int n,
                        int hq, int group, int D, float scale, void *out, int out_bf16,
                        float *p) {
    size_t head = (size_t)(hq / group) * head_stride;
    __m256 qv[32];
    for (int i = 0; i < D; i += 8) qv[i / 8] = load8(q, q_bf16, (size_t)hq * D + i);
    float mx = -INFINITY;
    for (int t = 0; t < n; t++) {
        size_t base = head + (size_t)(slots ? slots[t] : first + t) * D;
        __m256 acc = _mm256_setzero_ps();
        for (int i = 0; i < D; i += 8) acc = _mm256_fmadd_ps(qv[i / 8], load8(kbuf, kv_bf16, base + i), acc);
        p[t] = hsum(acc) * scale;
        mx = p[t] > mx ? p[t] : mx;
    }
    float sum = 0.f;
    for (int t = 0; t < n; t++) {
        p[t] = expf(p[t] - mx);
        sum += p[t];
    }
    __m256 o[32];
    for (int i = 0; i < D; i += 8) o[i / 8] = _mm256_setzero_ps();
    for (int t = 0; t < n; t++) {
        size_t base = head + (size_t)(slots ? slots[t] : first + t) * D;
        __m256 pt = _mm256_set1_ps(p[t]);
        for (int i = 0; i < D; i += 8) o[i / 8] = _mm256_fmadd_ps(pt, load8(vbuf, kv_bf16, base + i), o[i / 8]);
    }
    __m256 inv = _mm256_set1_ps(1.f / sum);
    for (int i = 0; i < D; i += 8) store8(out, out_bf16, (size_t)hq * D + i, _mm256_mul_ps(o[i / 8], inv));
}

static __thread float *att_scratch;
static __thread size_t att_scratch_size;

/* Attention of one decoding request over its n cached positions, which lie in one run of
   the pool's slots [first, first + n): q [Hq, D]; the K and V buffers head-major
   [Hkv, slots, D] (float32 or bfloat16), head_stride elements apart; out [Hq, D]. float32
   scores and softmax, as the torch path computes them at short contexts. D is a multiple
   of 8 and at most 256. Returns 0, or -1 when scratch memory is short. */
int decode_attention(const void *q, int q_bf16, const void *kbuf, const void *vbuf, int kv_bf16,
                     long head_stride, long first, int n, int Hq, int Hkv, int D, float scale,
                     void *out, int out_bf16) {
    if ((size_t)n > att_scratch_size) {
        free(att_scratch);
        att_scratch = malloc(sizeof(float) * (size_t)n);
        att_scratch_size = att_scratch ? (size_t)n : 0;
        if (!att_scratch) return -1;
    }
    for (int hq = 0; hq < Hq; hq++)
        attend_head(q, q_bf16, kbuf, vbuf, kv_bf16, head_stride, first, NULL, n, hq, Hq / Hkv, D,
                    scale, out, out_bf16, att_scratch);
    return 0;
}

/* ---- A whole decode step of a Llama-shaped stack in one call ------------------------------
   At one to eight rows a SmolLM2 layer is ~10 operations of a few microseconds of work
   each; from Python every one costs more in dispatch than it computes (about 40% of the
   single-stream step). Here the layers run back to back on the kernels above, each step
   rounded to the activations' dtype exactly where torch's path rounds, so the result is
   the per-operation path's, bit for bit, at one row over one run of slots. */

typedef struct {
    const uint8_t *qkv, *o, *gate_up, *down; /* int4 records (int4_gemm's layout) */
    const float *ln_in, *ln_post;            /* RMSNorm weights, float32 */
    void *k, *v;                             /* this layer's pool buffers [Hkv, slots, D] */
} layer_weights;

static inline float round_to(float f, int bf16) { return bf16 ? bf16_to_f32(f32_to_bf16(f)) : f; }

static inline float act_get(const void *a, int bf16, size_t i) {
    return bf16 ? bf16_to_f32(((const uint16_t *)a)[i]) : ((const float *)a)[i];
}

static inline void act_set(void *a, int bf16, size_t i, float f) {
    if (bf16) ((uint16_t *)a)[i] = f32_to_bf16(f);
    else ((float *)a)[i] = f;
}

/* Activations quantized for gemm_blocks, laid out in one buffer as int4_gemm lays them. */
typedef struct {
    int16_t *xq;
    float *xd, *xs;
} quantized;

static quantized quantize_to(char *buf, const void *a, int bf16, int M, int K) {
    quantized q = {(int16_t *)buf, NULL, NULL};
    q.xd = (float *)(buf + ((size_t)M * K * 2 + 63) / 64 * 64);
    q.xs = q.xd + (size_t)M * (K / 32);
    quantize(a, bf16, M, K, q.xq, q.xd, q.xs);
    return q;
}

/* ---- LoRA adapters' deltas on the decode rows (multi-LoRA, Punica's BGMV on the CPU) -------
   Each of a layer's four projections adds x A^T B^T with the row's own adapter right after
   its int4 matmul, before anything reads the output. The adapters' weights are layers/lora.py's
   LoraSlots, in the activations' dtype: A [slots, max_rank, parts, in] and the scaled B^T cut
   in chunks of the output [slots, chunks, max_rank, chunk] (chunk c belongs to part
   chunk_part[c]). At decode sizes the delta is bound by reading those weights (16 adapters of
   rank 16 on SmolLM2's seven projections: 156 MB a step in bfloat16), so the rows are grouped
   by adapter and each adapter's weights are read once a step, whatever its number of rows:
   the shrink splits over (adapter, rank row), the expand over (adapter, chunk, 64 columns).
   Rounded as the layer-by-layer path rounds: the shrink's output and the delta each to the
   activations' dtype, then the sum. */

#define LORA_PROJS 4         /* qkv, o, gate_up, down */
#define LORA_MAX_CHUNKS 32
#define LORA_MAX_PARTS 4
#define LORA_COLS 64         /* output columns of one expand unit */
#define LORA_MAX_RANK 64
#define SHRINK_ROWS 16       /* rows of one group in one unit of the bfloat16 shrink */

typedef struct {
    int parts, in, out, chunk, chunks;
    int chunk_part[LORA_MAX_CHUNKS];
} lora_shape;

typedef struct {
    const void *a[LORA_PROJS], *bc[LORA_PROJS]; /* one layer's slot tensors */
} lora_layer;

typedef struct {
    const lora_layer *layers; /* [L] */
    lora_shape shape[LORA_PROJS];
    int max_rank;             /* the slot tensors' rank dimension */
    const int *slot, *rank;   /* per row: adapter slot (-1: the base model) and its rank */
    int rows;                 /* M, set by decode_layers */
} lora_args;

/* The step's rows by adapter: group g is slot[g] of rank[g], rows order[first[g]..first[g+1]);
   shrink_end[g]: the shrink's units (one per rank row) of groups 0..g; block_end[g]: the
   bfloat16 shrink's units (one per SHRINK_ROWS of the group's rows) of groups 0..g. `wide`:
   some group has more rows than that (a prefill chunk), so units differ in size. */
typedef struct {
    int groups, *order, *first, *slot, *rank, *shrink_end, *block_end, wide;
} lora_plan;

/* s[row, k, p] of ROWS (1 to 4) rows against one row of A, read once from memory. */
static inline __attribute__((always_inline)) void shrink_rows(
    const void *a, size_t arow, const float *x, int bf16, int K, const int *rows,
    const int ROWS, float *s, size_t sp, size_t at) {
    __m256 acc[4];
    for (int j = 0; j < ROWS; j++) acc[j] = _mm256_setzero_ps();
    for (int i = 0; i < K; i += 8) {
        __m256 av = load8(a, bf16, arow + i);
        for (int j = 0; j < ROWS; j++)
            acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(x + (size_t)rows[j] * K + i), av, acc[j]);
    }
    for (int j = 0; j < ROWS; j++)
        s[(size_t)rows[j] * sp + at] = round_to(hsum(acc[j]), bf16);
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
/* The bfloat16 build (CPUs with AVX512_BF16, where torch runs AVX-512): the delta's products
   in `vdpbf16ps`, 32 bfloat16 pairs per instruction summed into float32, instead of
   widening every weight to float32 first. Exact products, float32 sums in another order
   than the AVX2 path's; the same roundings to bfloat16 after the shrink and the delta. */
#define LORA_BF16_DOT 1

static inline __m512 round16(__m512 v) { /* round8's rounding, 16 lanes */
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    return _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xFFFF0000u)));
}

/* s for ROWS (1 to 4) rows against AR (1 or 4) consecutive rows of A (rank row, part
   pairs), a tile of products in registers: each K-step loads ROWS + AR vectors for ROWS x AR
   dot products. */
static inline __attribute__((always_inline)) void shrink_tile_dot(
    const uint16_t *a, const int AR, const void *x, int K, const int *rows, const int ROWS,
    uint16_t *s16, size_t sp16, int at, int parts, int R2) {
    __m512 acc[4][4];
    for (int j = 0; j < ROWS; j++)
        for (int q = 0; q < AR; q++) acc[j][q] = _mm512_setzero_ps();
    for (int i = 0; i < K; i += 32) {
        __m512bh av[4];
        for (int q = 0; q < AR; q++) av[q] = (__m512bh)_mm512_loadu_si512(a + (size_t)q * K + i);
        for (int j = 0; j < ROWS; j++) {
            const uint16_t *xr = (const uint16_t *)x + (size_t)rows[j] * K + i;
            __m512bh xv = (__m512bh)_mm512_loadu_si512(xr);
            for (int q = 0; q < AR; q++) acc[j][q] = _mm512_dpbf16_ps(acc[j][q], xv, av[q]);
        }
    }
    for (int q = 0; q < AR; q++) {
        const int k = (at + q) / parts, p = (at + q) % parts;
        for (int j = 0; j < ROWS; j++)
            s16[(size_t)rows[j] * sp16 + (size_t)p * R2 + k] = f32_to_bf16(_mm512_reduce_add_ps(acc[j][q]));
    }
}

#define SHRINK_TILE(AR, ROWS) \
    shrink_tile_dot(ag + (size_t)q * K, AR, xin, K, rows + j, ROWS, s16, sp16, q, parts, R2)

/* One unit of the bfloat16 shrink: up to SHRINK_ROWS rows of one group against all of the
   group's rank x parts rows of A (read once per unit from L2, the rows' x from L1). Its
   outputs go out as bfloat16 in the layout the expand's dot products read: per row and
   part, the rank's values in order, so ranks k and k + 1 are one 32-bit pair (R2: the
   slots' rank rounded up to even; an odd rank's last pair gets a zero partner). */
static void shrink_block_dot(const uint16_t *ag, int nA, const void *xin, int K,
                             const int *rows, int nr, uint16_t *s16, size_t sp16, int parts,
                             int R2) {
    for (int j = 0; j < nr; j += 4) {
        const int left = nr - j;
        int q = 0;
        for (; q + 4 <= nA; q += 4) {
            switch (left) {
            case 1: SHRINK_TILE(4, 1); break;
            case 2: SHRINK_TILE(4, 2); break;
            case 3: SHRINK_TILE(4, 3); break;
            default: SHRINK_TILE(4, 4); break;
            }
        }
        for (; q < nA; q++) {
            switch (left) {
            case 1: SHRINK_TILE(1, 1); break;
            case 2: SHRINK_TILE(1, 2); break;
            case 3: SHRINK_TILE(1, 3); break;
            default: SHRINK_TILE(1, 4); break;
            }
        }
    }
}

/* Rank rows k and k + 1 of 16 columns of B^T as 16 bfloat16 pairs (each 32-bit lane one
   column's two weights), the layout vdpbf16ps multiplies against a pair of s. */
static inline __m512i bt_pairs(const uint16_t *b0, const uint16_t *b1) {
    const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9,
                                         24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17,
                                         1, 16, 0);
    __m256i lo = _mm256_loadu_si256((const __m256i *)b0);
    __m256i hi = b1 ? _mm256_loadu_si256((const __m256i *)b1) : _mm256_setzero_si256();
    return _mm512_permutexvar_epi16(idx, _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1));
}

/* y += s B^T for ROWS (1 or 2) bfloat16 rows, V vectors of 16 output columns, B^T's block
   as pairs (each pair vector read once for both rows); s as the shrink's pairs. */
static inline __attribute__((always_inline)) void expand_rows_dot(
    const uint32_t *const *pairs, int rank, const __m512i *bt, const int V, uint16_t *const *y,
    const int ROWS) {
    __m512 acc[2][LORA_COLS / 16];
    for (int j = 0; j < ROWS; j++)
        for (int v = 0; v < V; v++) acc[j][v] = _mm512_setzero_ps();
    for (int kp = 0; kp < (rank + 1) / 2; kp++) {
        __m512bh sv[2];
        for (int j = 0; j < ROWS; j++) sv[j] = (__m512bh)_mm512_set1_epi32((int)pairs[j][kp]);
        for (int v = 0; v < V; v++) {
            __m512bh b = (__m512bh)bt[kp * (LORA_COLS / 16) + v];
            for (int j = 0; j < ROWS; j++) acc[j][v] = _mm512_dpbf16_ps(acc[j][v], sv[j], b);
        }
    }
    for (int j = 0; j < ROWS; j++)
        for (int v = 0; v < V; v++) {
            __m256i yh = _mm256_loadu_si256((const __m256i *)(y[j] + 16 * v));
            __m512 yv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(yh), 16));
            __m512 sum = round16(_mm512_add_ps(yv, round16(acc[j][v])));
            __m256i out = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(sum), 16));
            _mm256_storeu_si256((__m256i *)(y[j] + 16 * v), out);
        }
}
#endif

#ifdef LORA_BF16_DOT
static void shrink_unit_dot(const lora_plan *pl, int u, const void *a, const void *xin, int K,
                            int R, int parts, void *s, size_t sp) {
    int g = 0;
    while (u >= pl->block_end[g]) g++;
    const int b = u - (g ? pl->block_end[g - 1] : 0), n = pl->first[g + 1] - pl->first[g];
    const int *rows = pl->order + pl->first[g] + b * SHRINK_ROWS;
    const int nr = n - b * SHRINK_ROWS < SHRINK_ROWS ? n - b * SHRINK_ROWS : SHRINK_ROWS;
    const uint16_t *ag = (const uint16_t *)a + (size_t)pl->slot[g] * R * parts * K;
    const int rank = pl->rank[g], R2 = R + (R & 1);
    uint16_t *s16 = (uint16_t *)s;
    shrink_block_dot(ag, rank * parts, xin, K, rows, nr, s16, sp, parts, R2);
    if (rank & 1)
        for (int j = 0; j < nr; j++)
            for (int p = 0; p < parts; p++) s16[(size_t)rows[j] * sp + (size_t)p * R2 + rank] = 0;
}
#endif

/* s [M, max_rank * LORA_MAX_PARTS] = x [M, in] A^T for the rows under an adapter; bfloat16
   rows are made float32 once first, in xf [M, in] (not once per rank row). */
static void lora_shrink(const lora_args *la, const lora_plan *pl, int proj, const void *a,
                        const void *xin, int bf16, float *xf, float *s) {
    const lora_shape *sh = &la->shape[proj];
    const int parts = sh->parts, K = sh->in, R = la->max_rank;
    const float *x = (const float *)xin;
#ifdef LORA_BF16_DOT
    if (bf16 && K % 32 == 0) { /* bfloat16 pairs straight from the rows and A (no float32 copy) */
        const size_t sp = (size_t)(R + (R & 1)) * LORA_MAX_PARTS; /* uint16s a row */
        const int units = pl->groups ? pl->block_end[pl->groups - 1] : 0;
        /* units of one size split evenly; with a prefill chunk's large units among small
           ones, they go to whichever thread is free */
        if (pl->wide) {
#pragma omp for schedule(dynamic, 1)
            for (int u = 0; u < units; u++) shrink_unit_dot(pl, u, a, xin, K, R, parts, s, sp);
        } else {
#pragma omp for schedule(static)
            for (int u = 0; u < units; u++) shrink_unit_dot(pl, u, a, xin, K, R, parts, s, sp);
        }
        return;
    }
#endif
    if (bf16) {
#pragma omp for schedule(static)
        for (int r = 0; r < la->rows; r++)
            if (la->slot[r] >= 0)
                for (int i = 0; i < K; i += 8)
                    _mm256_storeu_ps(xf + (size_t)r * K + i, load8(xin, 1, (size_t)r * K + i));
        x = xf;
    }
    const size_t sp = (size_t)R * LORA_MAX_PARTS;
    const int units = pl->groups ? pl->shrink_end[pl->groups - 1] : 0;
#pragma omp for schedule(static)
    for (int u = 0; u < units; u++) {
        int g = 0;
        while (u >= pl->shrink_end[g]) g++;
        const int k = u - (g ? pl->shrink_end[g - 1] : 0), slot = pl->slot[g];
        const int *rows = pl->order + pl->first[g], nr = pl->first[g + 1] - pl->first[g];
        for (int p = 0; p < parts; p++) {
            size_t arow = (((size_t)slot * R + k) * parts + p) * K, at = (size_t)k * parts + p;
            for (int i = 0; i < nr; i += 4) {
                switch (nr - i) {
                case 1: shrink_rows(a, arow, x, bf16, K, rows + i, 1, s, sp, at); break;
                case 2: shrink_rows(a, arow, x, bf16, K, rows + i, 2, s, sp, at); break;
                case 3: shrink_rows(a, arow, x, bf16, K, rows + i, 3, s, sp, at); break;
                default: shrink_rows(a, arow, x, bf16, K, rows + i, 4, s, sp, at); break;
                }
            }
        }
    }
}

/* One row's V vectors of 8 output columns: y += s_row B^T, B^T's block in float32 in L1.
   Inlined with a constant V for full units, so the accumulators stay in registers. */
static inline __attribute__((always_inline)) void expand_row(
    const float *sr, int parts, int rank, const float *bt, const int V, void *y, int bf16) {
    __m256 acc[LORA_COLS / 8];
    for (int v = 0; v < V; v++) acc[v] = _mm256_setzero_ps();
    for (int k = 0; k < rank; k++) {
        __m256 sk = _mm256_set1_ps(sr[(size_t)k * parts]);
        for (int v = 0; v < V; v++)
            acc[v] = _mm256_fmadd_ps(sk, _mm256_loadu_ps(bt + k * LORA_COLS + 8 * v), acc[v]);
    }
    for (int v = 0; v < V; v++)
        store8(y, bf16, 8 * v, _mm256_add_ps(load8(y, bf16, 8 * v), round8(acc[v], bf16)));
}

/* One unit of the expand: 64 (or fewer) columns of one chunk for one group's rows. */
static void expand_unit(const lora_args *la, const lora_plan *pl, int proj, const void *bc,
                        void *y, int bf16, const float *s, int u) {
    const lora_shape *sh = &la->shape[proj];
    const int parts = sh->parts, N = sh->out, chunk = sh->chunk, R = la->max_rank;
    const size_t sp = (size_t)R * LORA_MAX_PARTS;
    const int per_chunk = (chunk + LORA_COLS - 1) / LORA_COLS, per_group = sh->chunks * per_chunk;
    const int g = u / per_group, c = u % per_group / per_chunk;
    const int j0 = u % per_chunk * LORA_COLS;
    const int w = chunk - j0 < LORA_COLS ? chunk - j0 : LORA_COLS, p = sh->chunk_part[c];
    const int slot = pl->slot[g], rank = pl->rank[g];
    const size_t base = ((size_t)slot * sh->chunks + c) * R * chunk + j0;
#ifdef LORA_BF16_DOT
    if (bf16 && sh->in % 32 == 0) { /* the bfloat16 shrink's pairs layout (lora_shrink) */
        const int R2 = R + (R & 1);
        const size_t sp16 = (size_t)R2 * LORA_MAX_PARTS;
        const uint16_t *s16 = (const uint16_t *)s;
        if (w % 16 == 0) { /* the unit's B^T as pairs once, read back from L1 */
            __m512i bt2[LORA_MAX_RANK / 2 * (LORA_COLS / 16)];
            const uint16_t *b = (const uint16_t *)bc + base;
            for (int k = 0; k < rank; k += 2)
                for (int v = 0; v < w / 16; v++)
                    bt2[k / 2 * (LORA_COLS / 16) + v] =
                        bt_pairs(b + (size_t)k * chunk + 16 * v,
                                 k + 1 < rank ? b + (size_t)(k + 1) * chunk + 16 * v : NULL);
            for (int i = pl->first[g]; i < pl->first[g + 1]; i += 2) {
                const int two = i + 1 < pl->first[g + 1];
                const uint32_t *pairs[2];
                uint16_t *yr[2];
                for (int j = 0; j <= two; j++) {
                    const int r = pl->order[i + j];
                    pairs[j] = (const uint32_t *)(s16 + (size_t)r * sp16 + (size_t)p * R2);
                    yr[j] = (uint16_t *)y + (size_t)r * N + (size_t)c * chunk + j0;
                }
                if (w == LORA_COLS && two) expand_rows_dot(pairs, rank, bt2, LORA_COLS / 16, yr, 2);
                else if (w == LORA_COLS) expand_rows_dot(pairs, rank, bt2, LORA_COLS / 16, yr, 1);
                else if (two) expand_rows_dot(pairs, rank, bt2, w / 16, yr, 2);
                else expand_rows_dot(pairs, rank, bt2, w / 16, yr, 1);
            }
            return;
        }
        /* a part of fewer columns: float32 arithmetic on the row's pairs widened */
        float bt[LORA_MAX_RANK * LORA_COLS], sr[LORA_MAX_RANK];
        for (int k = 0; k < rank; k++)
            for (int v = 0; v < w / 8; v++)
                _mm256_storeu_ps(bt + k * LORA_COLS + 8 * v, load8(bc, 1, base + (size_t)k * chunk + 8 * v));
        for (int i = pl->first[g]; i < pl->first[g + 1]; i++) {
            const int r = pl->order[i];
            for (int k = 0; k < rank; k++) sr[k] = bf16_to_f32(s16[(size_t)r * sp16 + (size_t)p * R2 + k]);
            void *yr = (uint16_t *)y + (size_t)r * N + (size_t)c * chunk + j0;
            expand_row(sr, 1, rank, bt, w / 8, yr, 1);
        }
        return;
    }
#endif
    /* the unit's [rank, w] block of B^T in float32 once, read back from L1 by each of
       the adapter's rows */
    float bt[LORA_MAX_RANK * LORA_COLS];
    for (int k = 0; k < rank; k++)
        for (int v = 0; v < w / 8; v++)
            _mm256_storeu_ps(bt + k * LORA_COLS + 8 * v, load8(bc, bf16, base + (size_t)k * chunk + 8 * v));
    for (int i = pl->first[g]; i < pl->first[g + 1]; i++) {
        const int r = pl->order[i];
        const float *sr = s + (size_t)r * sp + p;
        void *yr = (char *)y + ((size_t)r * N + (size_t)c * chunk + j0) * (bf16 ? 2 : 4);
        if (w == LORA_COLS) expand_row(sr, parts, rank, bt, LORA_COLS / 8, yr, bf16);
        else expand_row(sr, parts, rank, bt, w / 8, yr, bf16);
    }
}

/* y [M, out] += s B^T for the rows under an adapter, in place, in the activations' dtype;
   units of one size split evenly, with a prefill chunk's large units among small ones they
   go to whichever thread is free. */
static void lora_expand(const lora_args *la, const lora_plan *pl, int proj, const void *bc,
                        void *y, int bf16, const float *s) {
    const lora_shape *sh = &la->shape[proj];
    const int units = pl->groups * sh->chunks * ((sh->chunk + LORA_COLS - 1) / LORA_COLS);
    if (pl->wide) {
#pragma omp for schedule(dynamic, 1)
        for (int u = 0; u < units; u++) expand_unit(la, pl, proj, bc, y, bf16, s, u);
    } else {
#pragma omp for schedule(static)
        for (int u = 0; u < units; u++) expand_unit(la, pl, proj, bc, y, bf16, s, u);
    }
}

/* The rows grouped by adapter slot in order of first appearance, base rows left out, in
   memory of lora_plan_ints(M) ints. */
static size_t lora_plan_ints(int M) { return (size_t)7 * M + 1; }

static lora_plan lora_plan_rows(const lora_args *la, int M, int *mem) {
    lora_plan pl = {0, mem, mem + M, mem + 2 * M + 1, mem + 3 * M + 1, mem + 4 * M + 1,
                    mem + 5 * M + 1, 0};
    int *placed = mem + 6 * M + 1, at = 0;
    memset(placed, 0, sizeof(int) * (size_t)M);
    pl.first[0] = 0;
    for (int r = 0; r < M; r++) {
        if (la->slot[r] < 0 || placed[r]) continue;
        int g = pl.groups++;
        pl.slot[g] = la->slot[r];
        pl.rank[g] = la->rank[r];
        for (int q = r; q < M; q++)
            if (!placed[q] && la->slot[q] == la->slot[r]) {
                pl.order[at++] = q;
                placed[q] = 1;
            }
        pl.first[g + 1] = at;
        pl.shrink_end[g] = (g ? pl.shrink_end[g - 1] : 0) + pl.rank[g];
        const int nr = pl.first[g + 1] - pl.first[g];
        pl.block_end[g] = (g ? pl.block_end[g - 1] : 0) + (nr + SHRINK_ROWS - 1) / SHRINK_ROWS;
        pl.wide |= nr > SHRINK_ROWS;
    }
    return pl;
}

/* y [M, out] += x [M, in] A^T B^T, each row with its own adapter (slot[r], -1: none): one
   projection's LoRA delta for any step in one call (prefill chunks of hundreds of rows under
   one adapter, decode rows, both mixed), bfloat16 x, y and slot tensors as above, with the
   same rows-by-adapter plan and kernels as the one-call decode step. Where torch's path runs
   a shrink and an expand per segment (bfloat16 matmuls of 16 to 48 columns, far below the
   base matmul's rate, plus gathers for the decode rows), this is one call a projection.
   Returns 0; 1 where this build has no bfloat16 dot products or the shape is not one it
   takes (the caller keeps torch's path); -1 when memory is short. */
int lora_delta(const void *x, void *y, int M, const void *a, const void *bc,
               const lora_shape *sh, int max_rank, const int *slot, const int *rank,
               int threads) {
#ifndef LORA_BF16_DOT
    (void)x, (void)y, (void)M, (void)a, (void)bc, (void)sh, (void)max_rank, (void)slot,
        (void)rank, (void)threads;
    return 1;
#else
    if (sh->in % 32 || sh->chunk % 8 || max_rank > LORA_MAX_RANK || sh->parts > LORA_MAX_PARTS ||
        sh->chunks > LORA_MAX_CHUNKS)
        return 1;
    lora_args la;
    memset(&la, 0, sizeof la);
    la.shape[0] = *sh;
    la.max_rank = max_rank;
    la.slot = slot;
    la.rank = rank;
    la.rows = M;
    /* the plan and the shrink's outputs in memory kept between calls (a prefill chunk's
       would otherwise be mapped and faulted in afresh by each of a step's ~120 calls) */
    static __thread char *keep;
    static __thread size_t kept;
    const size_t plan_bytes = (sizeof(int) * lora_plan_ints(M) + 63) / 64 * 64;
    const size_t need = plan_bytes + sizeof(float) * (size_t)M * max_rank * LORA_MAX_PARTS;
    if (grow(&keep, &kept, need)) return -1;
    int *plan = (int *)keep;
    float *s = (float *)(keep + plan_bytes);
    lora_plan pl = lora_plan_rows(&la, M, plan);
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads) if (threads > 1 && pl.groups)
    {
        lora_shrink(&la, &pl, 0, a, x, 1, NULL, s); /* its worksharing loop ends in a barrier */
        lora_expand(&la, &pl, 0, bc, y, 1, s);
    }
    return 0;
#endif
}

/* x [M, H]: the float32 residual stream, updated in place through all L layers (the final
   norm stays with the caller). Row r decodes one token at pool slot loc[r], attending over
   the n[r] pool slots slots[r][0..n[r]) (its own last). cos and sin [M, D]: the rotary tables at each row's position, already in the
   activations' precision (sin with rotate-half's sign folded in). Activations (act_bf16)
   and the K/V pool (kv_bf16) are float32 or bfloat16. `threads` share each matmul's blocks
   of rows and the attention's heads. `lora`, where not NULL, adds each row's adapter to the
   four projections (the LoRA section above). Returns 0, or -1 when memory is short. */
int decode_layers(const layer_weights *lw, int L, float *x, int M, int H, int Hq, int Hkv,
                  int D, int I, float eps, float scale, int act_bf16, int kv_bf16,
                  long head_stride, const float *cos, const float *sin, const long *loc,
                  const long *const *slots, const int *n, int threads,
                  const lora_args *lora) {
    int QKV = (Hq + 2 * Hkv) * D, maxn = 0, widest = QKV > 2 * I ? QKV : 2 * I;
    for (int r = 0; r < M; r++) maxn = n[r] > maxn ? n[r] : maxn;
    if (threads < 1) threads = 1;
    size_t es = act_bf16 ? 2 : 4, per_thread = ((size_t)maxn * sizeof(float) + 63) / 64 * 64;
    /* the widest input a matmul quantizes: hidden, attention output or intermediate */
    int K = H > Hq * D ? H : Hq * D, wide_act = I > H ? I : H;
    K = K > I ? K : I;
    size_t lora_s = lora ? sizeof(float) * (size_t)M * lora->max_rank * LORA_MAX_PARTS : 0;
    size_t sizes[8] = {(size_t)M * H * es, (size_t)M * widest * es, (size_t)M * Hq * D * es,
                       (size_t)M * wide_act * es, quant_bytes(M, K), lora_s,
                       lora ? sizeof(int) * lora_plan_ints(M) : 0,
                       lora ? sizeof(float) * (size_t)M * K : 0};
    size_t total = 0, at[8];
    for (int i = 0; i < 8; i++) {
        at[i] = total;
        total += (sizes[i] + 63) / 64 * 64;
    }
    char *mem = aligned_alloc(64, total + (size_t)threads * per_thread);
    if (!mem) return -1;
    /* h: a norm's output; big: qkv, then gate_up; att: attention's output; act: the output
       projection's output, silu x up, then the down projection's output (added to the
       stream by the next norm) */
    void *h = mem + at[0], *big = mem + at[1], *att = mem + at[2], *act = mem + at[3];
    char *qbuf = mem + at[4];
    const int group = Hq / Hkv, half = D / 2, heads = Hq + Hkv;
    /* where the value heads start inside a qkv row */
    const size_t vof = (size_t)(Hq + Hkv) * D;
    quantized xq = {0};
    /* LoRA: the shrink's output [M, max_rank * LORA_MAX_PARTS] and the rows' groups */
    float *ls = (float *)(mem + at[5]), *lxf = (float *)(mem + at[7]);
    lora_plan pl = {0};
    lora_args la_m;
    if (lora) {
        la_m = *lora;
        la_m.rows = M;
        lora = &la_m;
        pl = lora_plan_rows(lora, M, (int *)(mem + at[6]));
    }
    const lora_args *la = pl.groups ? lora : NULL;

#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        float *p = (float *)(mem + total + (size_t)omp_get_thread_num() * per_thread);
        for (int l = 0; l < L; l++) {
            const layer_weights *w = lw + l;
            /* the previous layer's MLP output joins the stream inside this layer's first norm */
#pragma omp single
            {
                add_rms_norm(x, l ? act : NULL, act_bf16, w->ln_in, M, H, eps, h, act_bf16);
                xq = quantize_to(qbuf, h, act_bf16, M, H);
            }
            const lora_layer *ll = la ? la->layers + l : NULL;
            if (la) lora_shrink(la, &pl, 0, ll->a[0], h, act_bf16, lxf, ls);
            gemm_blocks(xq.xq, xq.xd, xq.xs, M, H, w->qkv, QKV, big, act_bf16);
            if (la) lora_expand(la, &pl, 0, ll->bc[0], big, act_bf16, ls);
            /* rotate-half on the query and key heads (x * cos + roll(x) * sin, each product
               and the sum rounded as torch rounds them), then K and V into the pool */
#pragma omp for schedule(static)
            for (int rh = 0; rh < M * heads; rh++) {
                int r = rh / heads, hd = rh % heads;
                size_t row = (size_t)r * QKV + (size_t)hd * D;
                float v[256];
                for (int i = 0; i < D; i++) v[i] = act_get(big, act_bf16, row + i);
                for (int i = 0; i < D; i++) {
                    float c = cos[(size_t)r * D + i], s = sin[(size_t)r * D + i];
                    float rolled = v[i < half ? i + half : i - half];
                    float y = round_to(round_to(v[i] * c, act_bf16) + round_to(rolled * s, act_bf16), act_bf16);
                    act_set(big, act_bf16, row + i, y);
                }
                if (hd >= Hq) {
                    size_t dst = (size_t)(hd - Hq) * head_stride + (size_t)loc[r] * D;
                    size_t vsrc = (size_t)r * QKV + vof + (size_t)(hd - Hq) * D;
                    for (int i = 0; i < D; i++) {
                        act_set(w->k, kv_bf16, dst + i, act_get(big, act_bf16, row + i));
                        act_set(w->v, kv_bf16, dst + i, act_get(big, act_bf16, vsrc + i));
                    }
                }
            }
#pragma omp for schedule(static)
            for (int rh = 0; rh < M * Hq; rh++) {
                int r = rh / Hq, hq = rh % Hq;
                attend_head((char *)big + (size_t)r * QKV * es, act_bf16, w->k, w->v, kv_bf16,
                            head_stride, 0, slots[r], n[r], hq, group, D, scale,
                            (char *)att + (size_t)r * Hq * D * es, act_bf16, p);
            }
#pragma omp single
            xq = quantize_to(qbuf, att, act_bf16, M, Hq * D);
            if (la) lora_shrink(la, &pl, 1, ll->a[1], att, act_bf16, lxf, ls);
            gemm_blocks(xq.xq, xq.xd, xq.xs, M, Hq * D, w->o, H, act, act_bf16);
            if (la) lora_expand(la, &pl, 1, ll->bc[1], act, act_bf16, ls);
#pragma omp single
            {
                add_rms_norm(x, act, act_bf16, w->ln_post, M, H, eps, h, act_bf16);
                xq = quantize_to(qbuf, h, act_bf16, M, H);
            }
            if (la) lora_shrink(la, &pl, 2, ll->a[2], h, act_bf16, lxf, ls);
            gemm_blocks(xq.xq, xq.xd, xq.xs, M, H, w->gate_up, 2 * I, big, act_bf16);
            if (la) lora_expand(la, &pl, 2, ll->bc[2], big, act_bf16, ls);
#pragma omp single
            {
                silu_mul(big, act_bf16, M, I, act);
                xq = quantize_to(qbuf, act, act_bf16, M, I);
            }
            /* the shrink reads the down projection's input before its output overwrites it */
            if (la) lora_shrink(la, &pl, 3, ll->a[3], act, act_bf16, lxf, ls);
            gemm_blocks(xq.xq, xq.xd, xq.xs, M, I, w->down, H, act, act_bf16);
            if (la) lora_expand(la, &pl, 3, ll->bc[3], act, act_bf16, ls);
        }
    }
    /* the last layer's MLP output */
    for (size_t i = 0; i < (size_t)M * H; i++) x[i] += act_get(act, act_bf16, i);
    free(mem);
    return 0;
}
