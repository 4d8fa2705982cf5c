/* Int4 weights times a few rows of activations on x86 (AVX2, FMA, F16C): the CPU decode
   step's matmul (layers/int4_cpu.py builds and loads it).

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
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static __thread int8_t *scratch;
static __thread size_t scratch_size;

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
    for (int r = 0; r < ROWS; r++) {
        __m256 y = _mm256_add_ps(acc[r], accm[r]);
        size_t at = (size_t)(r0 + r) * N + (size_t)nb * 8;
        if (out_bf16) {
            float tmp[8];
            _mm256_storeu_ps(tmp, y);
            for (int j = 0; j < 8; j++) ((uint16_t *)out)[at + j] = f32_to_bf16(tmp[j]);
        } else {
            _mm256_storeu_ps((float *)out + at, y);
        }
    }
}

/* out[M, N] = x[M, K] @ W^T; x and out are float32, or bfloat16 where the flags say so.
   K is a multiple of 32 and N of 8. Returns 0, or -1 when scratch memory is short. */
int int4_gemm(const void *x, int x_bf16, int M, int K, const uint8_t *w, int N, void *out,
              int out_bf16) {
    int G = K / 32;
    size_t xq_bytes = ((size_t)M * K * 2 + 63) / 64 * 64;
    size_t need = xq_bytes + 2 * sizeof(float) * (size_t)M * G;
    if (need > scratch_size) {
        free(scratch);
        scratch = aligned_alloc(64, (need + 63) / 64 * 64);
        scratch_size = scratch ? need : 0;
        if (!scratch) return -1;
    }
    int16_t *xq = (int16_t *)scratch;
    float *xd = (float *)(scratch + xq_bytes), *xs = xd + (size_t)M * G;
    quantize(x, x_bf16, M, K, xq, xd, xs);
    /* blocks of rows split over the OpenMP threads torch uses (the same libgomp: torch's
       set_num_threads sets them); small products stay on the calling thread */
#pragma omp parallel for schedule(static) if ((size_t)M * N * K >= (1u << 21))
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
    return 0;
}
