/*
 * kernels_x86.c — optional fast kernels for gemma3.c on x86 (AVX2 + FMA + F16C, and AVX-512).
 *
 * gemma3.c is the reference: plain loops that any C99 compiler builds. It includes this
 * file at its end when the compiler targets these instructions (make's default
 * -march=native; `make NATIVE=0` or -DGEMMA3_NO_SIMD leaves it out), and calls it through
 * four functions:
 *
 *   kernels_setup      lays out the scratch memory the kernels need (in the run state's arena)
 *   kernels_matmul     out[i] = W[i] x for 1-3 matrices that read the same x
 *   kernels_attention  one attention job (a token and a group of query heads)
 *   kernels_attention_unmasked  every token against every token (the image tower's attention)
 *
 * Each returns 0 when it has no kernel for the call, and the plain loops run instead.
 * They compute the same sums as the plain loops; only the order of the float additions
 * differs (8 or 16 lanes, an FMA's single rounding), so results agree to about 1e-6
 * relative, not bit for bit. (q8_0 and q4_0 add each block's 32 products exactly in int32,
 * as the plain loops do, and meet the block's scales once: only the order in which the
 * blocks' terms are added differs, BLOCK_LANE.) test_all.c runs every kernel against the
 * plain loops. One exception: with AVX512_BF16, bf16 weights meet x rounded to bf16
 * (GEMMA3_BF16_DOT), which the tests compare with the plain loops fed the same rounded x.
 *
 * Speed comes from three things, in order of effect:
 *   - register tiles: NR weight rows times NT tokens, each weight vector loaded once for NT
 *     tokens and each activation vector once for NR rows (a prompt runs 4 x 4 tiles; a
 *     q8_0 prompt of 4 tokens or more, or q4_0 of 32, with AVX-512, 16 rows to a dot
 *     product, rows repacked);
 *   - decode streams every weight from memory once per token, so it asks for each line
 *     well ahead of its use (prefetch) and reads each thread's rows in two streams;
 *   - the threads share decode's jobs out at run time (claim_jobs), so none waits at the
 *     end of a matmul.
 * Every (row, token) sum is added in the same order whatever the tile, so a batch gives
 * exactly the logits that token-by-token decoding gives. `make bench` measures the speed.
 */
#define GEMMA3_AVX2 1
#define HAVE_KERNELS_MATMUL 1 /* and HAVE_KERNELS_ATTENTION with AVX-512: gemma3.c stubs the rest */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define GEMMA3_AVX512 1
#if defined(__AVX512BF16__)
/* bf16 rows meet x rounded to bf16, a pair of products per lane (vdpbf16ps): twice the
 * multiply-adds of an f32 FMA, but x keeps 8 bits of mantissa (README, Accuracy) */
#define GEMMA3_BF16_DOT 1
#endif
#endif
#include <immintrin.h>

/* A matmul's input x as the tiles read it, for some number of tokens of up to `widest`
 * values each: int8 blocks for the quantized weights, and the orders the tiles want. */
typedef struct {
    int8_t *xq;       /* (tokens, widest) x quantized to int8 blocks of 32 */
    float *xq_scale;  /* (tokens, widest / 32) their scales */
    int32_t *xq_sum;  /* (tokens, widest / 32) per-block sums of xq */
    float *xperm;     /* (tokens, widest) x reordered for the bf16 tiles */
    int8_t *xq_perm;  /* (tokens, 320 per 256 of widest, rounded up) xq as the AVX-512 q4_0 tiles read it */
    int8_t *xr;       /* (tokens, widest) GGUF block types: what xq left out, as int8 blocks */
    float *xr_scale;  /* (tokens, widest / 32) their scales */
    int32_t *xr_sum;  /* (tokens, widest / 32) their sums */
    /* A prompt's q8_0 or q4_0 rows, 16 at a time, repacked for the AVX-512 row-interleaved
     * tiles (rows16), in a slot per thread; only the prompt's Activations has them. */
    unsigned char *repack; /* (repack_slots, repack_bytes) */
    size_t repack_bytes;
    int repack_slots;
    int q8_min_tokens;     /* q8_0 prompts of fewer tokens keep the 4 x 4 tiles (the tests lower it) */
    int q4_min_tokens;     /* the same for q4_0 */
    uint16_t *xbf;         /* (tokens, widest) x rounded to bf16 for the AVX512_BF16 tiles */
    /* A GGUF block row decoded into the shape ggml_tile reads (ggml_unpack), in a slot per
     * thread (decode's per-thread Activations have one) */
    unsigned char *unpack; /* (unpack_slots, unpack_bytes) */
    size_t unpack_bytes;
    int unpack_slots;
    float *xmin;           /* (tokens, widest / 16) GGUF block types: per 16 values, xq_scale times the
                              sum of their xq + the same of xr: what a min multiplies */
} Activations;

/* The kernels' scratch, one per run state. */
typedef struct {
    int level;                /* widest tiles to use: 1 AVX2, 2 AVX-512 (the tests lower it) */
    int threads;              /* how many act_thread and share have */
    Activations act;          /* (max_batch tokens) a prompt's x, prepared by all the threads */
    Activations *act_thread;  /* (threads) decode's x: each thread prepares its own copy */
    uint64_t *share;          /* (threads, 8) a cache line each: [0] the decode jobs the thread
                                 has left (claim_jobs), [1] how many decode matmuls it has run */
    /* kernels_attention_unmasked's scratch, for n tokens and heads of hd values; np is n
     * rounded up to UM_KEYS, hdp hd rounded up to a vector (n 0: none) */
    struct {
        int n, hd;
        float *kt;  /* (np / UM_KEYS, hd, UM_KEYS) one head's keys, transposed, UM_KEYS a panel */
        float *v;   /* (np, hdp) its values, zeros after each row's hd and after the n rows */
        float *att; /* (threads, UM_QUERIES, np + 16) each thread's scores of a block of queries */
        float *out; /* (threads, UM_QUERIES, hdp) and their outputs */
    } um;
} Kernels;

#define CHUNK_ROWS 64 /* a prompt's matmul job: these rows' weights stay in L2 while each
                       * 4 tokens' x, in L1, meets them all */
#define UM_QUERIES 24 /* queries a job of kernels_attention_unmasked takes: 4 tiles of 6, 6 of 4 */
#define UM_KEYS 64    /* keys a panel of its transposed keys holds: 4 vectors, one tile wide */
#define TILE_INLINE static inline __attribute__((always_inline))
/* The r and t loops of a tile must unroll so that its sums live in registers. */
#ifdef __clang__
#define UNROLL _Pragma("unroll")
#else
#define UNROLL _Pragma("GCC unroll 4")
#endif
#ifdef __clang__
#define UNROLL8 _Pragma("unroll")
#define UNROLL16 _Pragma("unroll")
#else
#define UNROLL8 _Pragma("GCC unroll 8")
#define UNROLL16 _Pragma("GCC unroll 16")
#endif

/* Decode reads each weight once, straight from memory. One core alone cannot keep enough
 * reads in flight to use the memory's bandwidth, so each tile asks for the line
 * PREFETCH_AHEAD bytes further on as it uses one. A tile that reads `streams` rows far
 * apart (matmul_streams512) shares that distance among them, so that the lines in flight
 * do not crowd x out of L1. q4_0 reads fewer bytes per instruction and wants a longer
 * distance. The distances are the best of those tried with `make bench` on a 1B model. */
#ifndef PREFETCH_AHEAD
#define PREFETCH_AHEAD 8192
#endif
#ifndef PREFETCH_AHEAD_Q4
#define PREFETCH_AHEAD_Q4 10240
#endif
/* (Macros: gcc 12 dropped the prefetch when this was a static inline function.) */
#define prefetch_by(p, ahead, streams) __builtin_prefetch((const char *)(p) + (ahead) / (streams), 0, 3)
#define prefetch_ahead(p, streams) prefetch_by(p, PREFETCH_AHEAD, streams)

/* A tile loads each weight vector once for NT tokens and each activation vector once for
 * NR rows. gcc 12 undoes that: it folds the load into every FMA that uses the vector, as
 * a memory operand, so a 4 x 4 f32 tile issued 32 loads for 16 FMAs and ran load-bound at
 * under half the FMA rate. An empty asm that claims to change the vector keeps it in a
 * register (4 x 4 f32 tiles ran at over twice the speed). clang keeps them in registers
 * by itself, and the asm would only get in its way, so there it is nothing. */
#if defined(__clang__)
#define IN_REGISTER(v) ((void)0)
#else
#define IN_REGISTER(v) __asm__("" : "+v"(v))
#endif

/* The opposite, for a tile that has too few registers to hold its activations for all its
 * rows: an asm (volatile: never merged with another) that claims to change the pointer p,
 * so that each row loads through it again instead of keeping the values (and spilling
 * them to the stack). */
#define RELOAD(p) __asm__ volatile("" : "+r"(p))

/* A prompt's job is a chunk of CHUNK_ROWS rows against all the tokens (matmul_rows_*), then
 * the thread's next chunk (the next rows, under the static schedule). Rows of 1152 q4_0
 * columns are 648 bytes: too short a stretch for the hardware prefetcher, so the next
 * chunk's first tiles would wait on memory. The tiles of tokens t0 .. t1 - 1 (of n) ask
 * for their share of the next chunk's `bytes` at `next` instead. */
static inline void prefetch_next_chunk(const unsigned char *next, size_t bytes, int t0, int t1, int n) {
    for (size_t b = bytes * t0 / n / 64 * 64; b < bytes * t1 / n; b += 64) __builtin_prefetch(next + b, 0, 3);
}

/* The bytes of the chunk after rows r0 .. r0 + nr - 1 (at most nr rows; 0 at the end). */
static size_t next_chunk_bytes(int rows, int r0, int nr, size_t rb) {
    int left = rows - r0 - nr;
    return (size_t)(left < nr ? left : nr) * rb;
}

/* A prompt's chunk in matmul_rows_avx2/512 (which define TILE and the variables): each
 * `most` tokens (or the 2 or 1 left) meet the chunk's rows 4 at a time, then its last rows
 * one by one, and ask for their share of the next chunk's weights. */
#define CHUNK_LOOP(most)                                                                                           \
    do {                                                                                                           \
        const size_t ahead_ = next_chunk_bytes(rows, r0, nr, rb);                                                  \
        const unsigned char *w0_ = w;                                                                              \
        for (int t = 0, nt; t < n; t += nt) {                                                                      \
            nt = n - t >= (most) ? (most) : n - t >= 2 ? 2 : 1;                                                    \
            prefetch_next_chunk(w0_ + (size_t)nr * rb, ahead_, t, t + nt, n);                                      \
            int r = 0;                                                                                             \
            w = w0_, o = out + r0;                                                                                 \
            for (; r + 4 <= nr; r += 4, w += 4 * rb, o += 4) {                                                     \
                if (nt == 4) TILE(4, 4);                                                                           \
                else if (nt == 2) TILE(4, 2);                                                                      \
                else TILE(4, 1);                                                                                   \
            }                                                                                                      \
            for (; r < nr; r++, w += rb, o++) {                                                                    \
                if (nt == 4) TILE(1, 4);                                                                           \
                else if (nt == 2) TILE(1, 2);                                                                      \
                else TILE(1, 1);                                                                                   \
            }                                                                                                      \
        }                                                                                                          \
    } while (0)

static float hsum8(__m256 v) { /* a fixed order: 8 -> 4 -> 2 -> 1 */
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Sum of u[i] * s[i] over each group of 4 bytes, added to acc: u unsigned, s signed.
 * One instruction with VNNI; otherwise pairs into int16 (cannot saturate here: |u| <= 128,
 * |s| <= 127) and then into int32. */
static inline __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(acc, u, s);
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(acc, u, s);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

/* f32 rows: out[t * ostride + r] = w_r . x_t; w_r rb bytes apart, x_t cols floats apart.
 * cols % 8 == 0. */
TILE_INLINE void tile_f32(float *out, int ostride, const unsigned char *w, size_t rb, const float *x, int cols,
                          const int NR, const int NT) {
    __m256 acc[4][4];
    UNROLL
    for (int r = 0; r < NR; r++)
        UNROLL
        for (int t = 0; t < NT; t++) acc[r][t] = _mm256_setzero_ps();
    for (int j = 0; j < cols; j += 8) {
        __m256 wv[4];
        UNROLL
        for (int r = 0; r < NR; r++) {
            if (NT == 1 && j % 16 == 0) prefetch_ahead((const float *)(w + r * rb) + j, NR);
            wv[r] = _mm256_loadu_ps((const float *)(w + r * rb) + j);
            IN_REGISTER(wv[r]);
        }
        UNROLL
        for (int t = 0; t < NT; t++) {
            __m256 xv = _mm256_loadu_ps(x + (size_t)t * cols + j);
            IN_REGISTER(xv);
            UNROLL
            for (int r = 0; r < NR; r++) acc[r][t] = _mm256_fmadd_ps(wv[r], xv, acc[r][t]);
        }
    }
    UNROLL
    for (int r = 0; r < NR; r++)
        UNROLL
        for (int t = 0; t < NT; t++) out[(size_t)t * ostride + r] = hsum8(acc[r][t]);
}

/* bf16 rows. 16 weights load as 8 32-bit lanes; bf16 being the high half of an f32, a
 * shift gives the even weights as floats and a mask the odd ones, with no shuffle. So x
 * comes permuted (bf16_permute_x): each 16 floats as the 8 even, then the 8 odd ones.
 * cols % 16 == 0. */
TILE_INLINE void tile_bf16(float *out, int ostride, const unsigned char *w, size_t rb, const float *xp, int cols,
                           const int NR, const int NT) {
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
    __m256 acc[4][4];
    UNROLL
    for (int r = 0; r < NR; r++)
        UNROLL
        for (int t = 0; t < NT; t++) acc[r][t] = _mm256_setzero_ps();
    for (int j = 0; j < cols; j += 16) {
        __m256 we[4], wo[4];
        UNROLL
        for (int r = 0; r < NR; r++) {
            if (NT == 1 && j % 32 == 0) prefetch_ahead(w + r * rb + (size_t)j * 2, NR);
            __m256i v = _mm256_loadu_si256((const __m256i *)(w + r * rb + (size_t)j * 2));
            we[r] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
            wo[r] = _mm256_castsi256_ps(_mm256_and_si256(v, high));
            IN_REGISTER(we[r]);
            IN_REGISTER(wo[r]);
        }
        UNROLL
        for (int t = 0; t < NT; t++) {
            __m256 xe = _mm256_loadu_ps(xp + (size_t)t * cols + j), xo = _mm256_loadu_ps(xp + (size_t)t * cols + j + 8);
            IN_REGISTER(xe);
            IN_REGISTER(xo);
            UNROLL
            for (int r = 0; r < NR; r++) {
                acc[r][t] = _mm256_fmadd_ps(we[r], xe, acc[r][t]);
                acc[r][t] = _mm256_fmadd_ps(wo[r], xo, acc[r][t]);
            }
        }
    }
    UNROLL
    for (int r = 0; r < NR; r++)
        UNROLL
        for (int t = 0; t < NT; t++) out[(size_t)t * ostride + r] = hsum8(acc[r][t]);
}

/* x for the bf16 tiles: each 2 * lanes floats as their `lanes` even, then `lanes` odd ones
 * (lanes = floats per vector: 8 for AVX2, 16 for AVX-512). n % (2 * lanes) == 0. */
static void bf16_permute_x(float *xp, const float *x, int n, int lanes) {
    for (int j = 0; j < n; j += 2 * lanes)
        for (int i = 0; i < lanes; i++) {
            xp[j + i] = x[j + 2 * i];
            xp[j + lanes + i] = x[j + 2 * i + 1];
        }
}

/* q8_0 / q4_0 rows times int8 activations (xq, scales xs, block sums xsum; x_t cols bytes,
 * cols/32 scales and sums apart), in the order of the AVX-512 tiles with 8 lanes: each
 * block's exact int32 sum meets its two scales once, block b into lane b % 8 of the row's
 * 8 float sums (then hsum8). 8 blocks a step: per row and token a dot product per block
 * (8 int32 lanes), a tree of horizontal adds that leaves block b0 + k's sum in lane k, one
 * conversion, one FMA times the 8 blocks' scales. q8_0 uses |w| (unsigned) times x with
 * w's sign (maddubs, without VNNI, must not saturate: |w| <= 128). q4_0's nibbles n are
 * unsigned already; sum (n - 8) x = sum n x - 8 sum x, the second term taken off the 8
 * sums at once. */
static inline __m256i quant_block_dot(int dtype, const unsigned char *row, int nb, int b, __m256i xv) {
    if (dtype == DT_Q8_0) {
        __m256i wv = _mm256_loadu_si256((const __m256i *)(row + 2 * (size_t)nb + (size_t)b * QK));
        return dot_u8s8(_mm256_setzero_si256(), _mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
    }
    __m128i raw = _mm_loadu_si128((const __m128i *)(row + 2 * (size_t)nb + (size_t)b * (QK / 2)));
    /* weights 0..15 are the low nibbles, 16..31 the high ones */
    __m256i wu = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(0x0f));
    return dot_u8s8(_mm256_setzero_si256(), wu, xv);
}

/* The 8 lanes of each p[k] added up into lane k */
static inline __m256i sum_blocks8(const __m256i p[8]) {
    /* each 128-bit half of a: the sums of p[0] .. p[3] over that half's lanes; b: p[4] .. p[7] */
    __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
    __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(p[4], p[5]), _mm256_hadd_epi32(p[6], p[7]));
    return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

TILE_INLINE void tile_quant(float *out, int ostride, const unsigned char *w, size_t rb, const int8_t *xq,
                            const float *xs, const int32_t *xsum, int cols, int dtype, const int NR, const int NT) {
    const int nb = cols / QK;
    __m256 acc[4][4];
    UNROLL
    for (int r = 0; r < NR; r++)
        UNROLL
        for (int t = 0; t < NT; t++) acc[r][t] = _mm256_setzero_ps();
    for (int b0 = 0; b0 < nb; b0 += 8) {
        const int k = nb - b0 < 8 ? nb - b0 : 8;
        const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        __m256 dw[4], dx[4];
        __m256i corr[4];
        UNROLL
        for (int r = 0; r < NR; r++) /* 8 halves (past the row's last block: its quants, masked off) */
            dw[r] = _mm256_and_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + r * rb + 2 * b0))),
                                  _mm256_castsi256_ps(live));
        UNROLL
        for (int t = 0; t < NT; t++) {
            dx[t] = _mm256_maskload_ps(xs + (size_t)t * nb + b0, live);
            corr[t] = _mm256_slli_epi32(_mm256_maskload_epi32(xsum + (size_t)t * nb + b0, live), 3);
        }
        UNROLL
        for (int t = 0; t < NT; t++)
            UNROLL
            for (int r = 0; r < NR; r++) {
                const unsigned char *row = w + r * rb;
                __m256i p[8];
                UNROLL8
                for (int j = 0; j < 8; j++) {
                    const int b = b0 + j;
                    if (j >= k) {
                        p[j] = _mm256_setzero_si256();
                        continue;
                    }
                    if (NT == 1 && b % (dtype == DT_Q8_0 ? 2 : 4) == 0) /* once per 64-byte line */
                        prefetch_ahead(row + 2 * nb + (size_t)b * (dtype == DT_Q8_0 ? QK : QK / 2), NR);
                    __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + (size_t)t * cols + (size_t)b * QK));
                    p[j] = quant_block_dot(dtype, row, nb, b, xv);
                }
                __m256i s = sum_blocks8(p);
                if (dtype == DT_Q4_0) s = _mm256_sub_epi32(s, corr[t]);
                acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(dw[r], dx[t]), acc[r][t]);
            }
    }
    UNROLL
    for (int r = 0; r < NR; r++)
        UNROLL
        for (int t = 0; t < NT; t++) out[(size_t)t * ostride + r] = hsum8(acc[r][t]);
}

/* Rows r0 .. r0 + nr - 1 of W against all n tokens. xin: x as the tiles want it. */
static void matmul_rows_avx2(float *out, const float *xin, int n, const Matrix *W, const Activations *a, int r0, int nr) {
    const int rows = W->rows, cols = W->cols, dtype = W->dtype;
    const size_t rb = row_bytes(dtype, cols), nb = (size_t)cols / QK;
    const unsigned char *w = (const unsigned char *)W->data + (size_t)r0 * rb;
    float *o = out + r0;
#define TILE(NR_, NT_)                                                                                             \
    do {                                                                                                           \
        float *o_ = o + (size_t)t * rows;                                                                          \
        if (dtype == DT_F32) tile_f32(o_, rows, w, rb, xin + (size_t)t * cols, cols, NR_, NT_);                     \
        else if (dtype == DT_BF16) tile_bf16(o_, rows, w, rb, xin + (size_t)t * cols, cols, NR_, NT_);              \
        else                                                                                                       \
            tile_quant(o_, rows, w, rb, a->xq + (size_t)t * cols, a->xq_scale + t * nb, a->xq_sum + t * nb, cols, dtype, \
                       NR_, NT_);                                                                                  \
    } while (0)
    if (n > 1) {
#ifdef __AVX512VL__ /* 32 vector registers: room for 4 x 4 sums */
        const int most = 4;
#else
        const int most = 2;
#endif
        CHUNK_LOOP(most);
    } else {
        for (int r = 0, t = 0; r < nr; r++, w += rb, o++) TILE(1, 1);
    }
#undef TILE
}

/* ------------------------------------------------------------------------- */
/* AVX-512 tiles (F, BW, VL and VNNI; e.g. AMD Zen 4/5, Intel Ice Lake and later servers):
 * the same products with vectors twice as wide, 16 floats or 64 bytes. The quantized
 * ones take several blocks per vector, which the format's layout allows (a row's quants
 * are contiguous across blocks, its scales too): 8 or 16 scales convert in one
 * instruction and a permute spreads each over its block's lanes. A 1 x 1 and a 4 x 4 tile add each (row,
 * token) sum in the same order, so batches still equal token-by-token decoding. */
#ifdef GEMMA3_AVX512
#define Q4_GROUPS(nb) (((nb) + 7) / 8) /* q4_0 blocks go 8 to a step */

/* The first min(n, 64) bytes at p, zeros after them (load256_upto: 32 bytes): the end of a
 * row must not be read past. A whole vector takes a plain load, not a masked one: masked
 * loads are slow on some CPUs (AMD Zen 4). */
static inline __m512i load512_upto(const void *p, int n) {
    return n >= 64 ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi8(((__mmask64)1 << n) - 1, p);
}

static inline __m256i load256_upto(const void *p, int n) {
    return n >= 32 ? _mm256_loadu_si256((const __m256i *)p) : _mm256_maskz_loadu_epi8(((__mmask32)1 << n) - 1, p);
}

/* The 16 lanes of v in a fixed order: 16 -> 8 -> 4 -> 2 -> 1 */
static float hsum16(__m512 v) {
    return hsum8(_mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1)));
}

/* cols % 16 == 0 */
TILE_INLINE void tile512_f32(float *out, int ostride, const unsigned char *w, size_t rb, const float *x, int cols,
                             const int NR, const int NT) {
    __m512 acc[4][4];
    UNROLL
    for (int r = 0; r < NR; r++)
        UNROLL
        for (int t = 0; t < NT; t++) acc[r][t] = _mm512_setzero_ps();
    for (int j = 0; j < cols; j += 16) {
        __m512 wv[4];
        UNROLL
        for (int r = 0; r < NR; r++) {
            if (NT == 1) prefetch_ahead((const float *)(w + r * rb) + j, NR);
            wv[r] = _mm512_loadu_ps((const float *)(w + r * rb) + j);
            IN_REGISTER(wv[r]);
        }
        UNROLL
        for (int t = 0; t < NT; t++) {
            __m512 xv = _mm512_loadu_ps(x + (size_t)t * cols + j);
            IN_REGISTER(xv);
            UNROLL
            for (int r = 0; r < NR; r++) acc[r][t] = _mm512_fmadd_ps(wv[r], xv, acc[r][t]);
        }
    }
    UNROLL
    for (int r = 0; r < NR; r++)
        UNROLL
        for (int t = 0; t < NT; t++) out[(size_t)t * ostride + r] = hsum16(acc[r][t]);
}

/* bf16 as in tile_bf16: 32 weights per load, their even ones by a shift and odd ones by
 * a mask, against x permuted by 16 (bf16_permute_x). cols % 32 == 0. */
TILE_INLINE void tile512_bf16(float *out, int ostride, const unsigned char *w, size_t rb, const float *xp, int cols,
                              const int NR, const int NT) {
    const __m512i high = _mm512_set1_epi32((int)0xffff0000u);
    __m512 acc[4][4];
    UNROLL
    for (int r = 0; r < NR; r++)
        UNROLL
        for (int t = 0; t < NT; t++) acc[r][t] = _mm512_setzero_ps();
    for (int j = 0; j < cols; j += 32) {
        __m512 we[4], wo[4];
        UNROLL
        for (int r = 0; r < NR; r++) {
            if (NT == 1) prefetch_ahead(w + r * rb + (size_t)j * 2, NR);
            __m512i v = _mm512_loadu_si512((const void *)(w + r * rb + (size_t)j * 2));
            we[r] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
            wo[r] = _mm512_castsi512_ps(_mm512_and_si512(v, high));
            IN_REGISTER(we[r]);
            IN_REGISTER(wo[r]);
        }
        UNROLL
        for (int t = 0; t < NT; t++) {
            __m512 xe = _mm512_loadu_ps(xp + (size_t)t * cols + j), xo = _mm512_loadu_ps(xp + (size_t)t * cols + j + 16);
            IN_REGISTER(xe);
            IN_REGISTER(xo);
            UNROLL
            for (int r = 0; r < NR; r++) {
                acc[r][t] = _mm512_fmadd_ps(we[r], xe, acc[r][t]);
                acc[r][t] = _mm512_fmadd_ps(wo[r], xo, acc[r][t]);
            }
        }
    }
    UNROLL
    for (int r = 0; r < NR; r++)
        UNROLL
        for (int t = 0; t < NT; t++) out[(size_t)t * ostride + r] = hsum16(acc[r][t]);
}

#ifdef GEMMA3_BF16_DOT
/* bf16 rows times x rounded to bf16 (xb, bf16_round_x): 32 weights per load, and one
 * vdpbf16ps adds the products of each lane's pair (weights 2i and 2i + 1) to its f32 sum.
 * A product of two bf16 is exact in f32; only the sums round. cols % 32 == 0. */
TILE_INLINE void tile512_bf16dot(float *out, int ostride, const unsigned char *w, size_t rb, const uint16_t *xb,
                                 int cols, const int NR, const int NT) {
    __m512 acc[4][4];
    UNROLL
    for (int r = 0; r < NR; r++)
        UNROLL
        for (int t = 0; t < NT; t++) acc[r][t] = _mm512_setzero_ps();
    for (int j = 0; j < cols; j += 32) {
        __m512bh wv[4];
        UNROLL
        for (int r = 0; r < NR; r++) {
            if (NT == 1) prefetch_ahead(w + r * rb + (size_t)j * 2, NR);
            wv[r] = (__m512bh)_mm512_loadu_si512((const void *)(w + r * rb + (size_t)j * 2));
            IN_REGISTER(wv[r]);
        }
        UNROLL
        for (int t = 0; t < NT; t++) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512((const void *)(xb + (size_t)t * cols + j));
            IN_REGISTER(xv);
            UNROLL
            for (int r = 0; r < NR; r++) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], wv[r], xv);
        }
    }
    UNROLL
    for (int r = 0; r < NR; r++)
        UNROLL
        for (int t = 0; t < NT; t++) out[(size_t)t * ostride + r] = hsum16(acc[r][t]);
}

/* x rounded to bf16 for tile512_bf16dot: to nearest, ties to even (a NaN stays a NaN, a
 * subnormal becomes a zero), 32 values per instruction. n % 32 == 0. */
static void bf16_round_x(uint16_t *xb, const float *x, int n) {
    for (int j = 0; j < n; j += 32) {
        __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + j + 16), _mm512_loadu_ps(x + j)); /* (high, low) */
        _mm512_storeu_si512((void *)(xb + j), (__m512i)v);
    }
}
#endif

/* The order of a quantized row's sum (q8_0 and q4_0, every tile): each block's 32
 * products add up exactly in int32, and meet the block's two scales once, as
 * float(isum) x (weight scale x activation scale), added with an FMA into one of 16 float
 * lanes: block b of each run of 16 into lane BLOCK_LANE(dtype, b % 16); then hsum16 adds
 * the lanes. The lane of a block is where the tile's int32 sums leave it (q8_0_sum_lanes,
 * q4_0_group512), so that the 1 x 1 and 4 x 4 tiles need no permute of their sums; the
 * 16-row tiles (rows16) keep a register per lane and put blocks anywhere. */
#define Q8_LANE(k) (((k) & 8) | ((k) & 1) << 2 | ((k) >> 1 & 3))
#define Q4_LANE(k) (((k) & 3) << 2 | ((k) >> 2 & 1) << 1 | (k) >> 3)
#define BLOCK_LANE(dtype, k) ((dtype) == DT_Q8_0 ? Q8_LANE(k) : Q4_LANE(k))

/* Lane l of the result: lane BLOCK_LANE's inverse of v (a vector of 16 blocks' values in
 * block order), so that per-block scales line up with the tiles' sums. */
static inline __m512i lanes_of(int dtype, __m512i v) {
    const __m512i q8 = _mm512_set_epi32(15, 13, 11, 9, 14, 12, 10, 8, 7, 5, 3, 1, 6, 4, 2, 0);
    const __m512i q4 = _mm512_set_epi32(15, 7, 11, 3, 14, 6, 10, 2, 13, 5, 9, 1, 12, 4, 8, 0);
    return _mm512_permutexvar_epi32(dtype == DT_Q8_0 ? q8 : q4, v);
}

/* The 8 lane sums of each block in p[0 .. 7] (p[j]: lanes 0-7 block 2j, 8-15 block 2j + 1)
 * added up, a tree of unpacks and adds, block k into lane Q8_LANE(k). */
static inline __m512i q8_0_sum_lanes(const __m512i p[8]) {
    __m512i q[4], r[2];
    /* q[m], each 128-bit lane: sums of p[2m], p[2m + 1], p[2m], p[2m + 1]; r[n]: p[4n] .. p[4n + 3] */
    for (int m = 0; m < 4; m++)
        q[m] = _mm512_add_epi32(_mm512_unpacklo_epi32(p[2 * m], p[2 * m + 1]), _mm512_unpackhi_epi32(p[2 * m], p[2 * m + 1]));
    for (int n = 0; n < 2; n++)
        r[n] = _mm512_add_epi32(_mm512_unpacklo_epi64(q[2 * n], q[2 * n + 1]), _mm512_unpackhi_epi64(q[2 * n], q[2 * n + 1]));
    /* 128-bit lanes 0, 1 of r hold the even block of each p, 2, 3 the odd one */
    return _mm512_add_epi32(_mm512_shuffle_i32x4(r[0], r[1], 0x88), _mm512_shuffle_i32x4(r[0], r[1], 0xdd));
}

/* The int32 sums of k (1-16) q8_0 blocks of NR rows (wq, rb bytes apart) and one token x,
 * 2 blocks per 64-byte vector, into s[0 .. NR - 1], block k in lane Q8_LANE(k). Each x
 * vector is loaded once for the NR rows. Weights go in as w + 128 (unsigned, as vpdpbusd
 * wants them); the caller takes 128 x (the block's sum of x) off. */
TILE_INLINE void q8_0_isums16(__m512i s[], const unsigned char *wq, size_t rb, const int8_t *x, int k, const int prefetch,
                              const int NR) {
    const __m512i flip = _mm512_set1_epi8((char)0x80), zero = _mm512_setzero_si512();
    __m512i p[2][8];
    UNROLL8
    for (int j = 0; j < 8; j++) {
        if (2 * j >= k) {
            UNROLL
            for (int r = 0; r < NR; r++) p[r][j] = zero;
            continue;
        }
        __m512i xv = load512_upto(x + 64 * j, QK * (k - 2 * j));
        UNROLL
        for (int r = 0; r < NR; r++) {
            if (prefetch) prefetch_ahead(wq + r * rb + 64 * j, NR);
            __m512i w = load512_upto(wq + r * rb + 64 * j, QK * (k - 2 * j));
            p[r][j] = _mm512_dpbusd_epi32(zero, _mm512_xor_si512(w, flip), xv);
        }
    }
    UNROLL
    for (int r = 0; r < NR; r++) s[r] = q8_0_sum_lanes(p[r]);
}

/* q8_0, 16 blocks a step: per row and token the blocks' int32 sums (q8_0_isums16), less
 * 128 x the activations' block sums (xsum), one conversion, one FMA times the scales of
 * the 16 blocks (the row's halves converted at once, the token's floats loaded, both put
 * in the lanes' order). A row's last, partial step is loaded under a mask (zeros beyond
 * the row). */
TILE_INLINE void tile512_q8_0(float *out, int ostride, const unsigned char *w, size_t rb, const int8_t *xq,
                              const float *xs, const int32_t *xsum, int nb, const int NR, const int NT) {
    __m512 acc[4][4];
    UNROLL
    for (int r = 0; r < NR; r++)
        UNROLL
        for (int t = 0; t < NT; t++) acc[r][t] = _mm512_setzero_ps();
    for (int b0 = 0; b0 < nb; b0 += 16) {
        const int k = nb - b0 < 16 ? nb - b0 : 16;
        __m512 dw[4], dx[4];
        __m512i corr[4];
        UNROLL
        for (int r = 0; r < NR; r++)
            dw[r] = _mm512_castsi512_ps(
                lanes_of(DT_Q8_0, _mm512_castps_si512(_mm512_cvtph_ps(load256_upto(w + r * rb + 2 * b0, 2 * k)))));
        UNROLL
        for (int t = 0; t < NT; t++) {
            dx[t] = _mm512_castsi512_ps(lanes_of(DT_Q8_0, load512_upto(xs + (size_t)t * nb + b0, 4 * k)));
            corr[t] = _mm512_slli_epi32(lanes_of(DT_Q8_0, load512_upto(xsum + (size_t)t * nb + b0, 4 * k)), 7);
        }
        /* decode's 1 or 2 rows share each x vector; a prompt's 4 x 4 goes row by row (the
         * lane sums of 4 rows would not fit in the registers) */
        const unsigned char *wq = w + 2 * (size_t)nb + (size_t)b0 * QK;
        UNROLL
        for (int t = 0; t < NT; t++) {
            const int8_t *xt = xq + ((size_t)t * nb + b0) * QK;
            __m512i s[4];
            if (NT == 1 && NR <= 2) q8_0_isums16(s, wq, rb, xt, k, 1, NR);
            else
                UNROLL
                for (int r = 0; r < NR; r++) q8_0_isums16(s + r, wq + r * rb, rb, xt, k, 0, 1);
            UNROLL
            for (int r = 0; r < NR; r++)
                acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(s[r], corr[t])), _mm512_mul_ps(dw[r], dx[t]),
                                            acc[r][t]);
        }
    }
    UNROLL
    for (int r = 0; r < NR; r++)
        UNROLL
        for (int t = 0; t < NT; t++) out[(size_t)t * ostride + r] = hsum16(acc[r][t]);
}

/* q4_0: 8 blocks per group, 16 (two groups) per step. A block's 16 bytes hold its first 16
 * weights in the low nibbles and its last 16 in the high ones. Two 64-byte loads bring
 * blocks 0-3 and 4-7 of a group; unpacking their 8-byte halves puts, in each 128-bit lane
 * k, 8 bytes of block k beside 8 bytes of block 4 + k. So lanes 4k, 4k + 1 of the int32
 * sums hold block k's products and 4k + 2, 4k + 3 block 4 + k's, and 4 dot products cover
 * 8 blocks. Nibbles are unsigned already: each lane's sum starts from -8 x the sum of the
 * activations it meets. x comes reordered to match (q4_0_reorder512). Adding each lane
 * pair (one shuffle) gives each block's sum twice; the FMA takes it in one of the two,
 * under a mask: lanes 4k, 4k + 2 for a step's first group, 4k + 1, 4k + 3 for its second,
 * block j of the step in lane Q4_LANE(j). Decode (one token, registers to spare) blends
 * the two groups' lanes into one vector instead: one conversion and one FMA per step. */
#define Q4_GROUP_BYTES 320 /* x per group of 8 blocks: 4 x 64 bytes of int8, 16 int32 offsets */

/* Group g (of nblk, 1-8, blocks; `second`: the second of its step) of an NR x NT tile into
 * its sums acc, times the step's scales dw (per row) and dx (per token), in lane order.
 * The NR rows' nibbles are unpacked first; then each token's x (4 vectors and its offsets)
 * is loaded once and meets them all. A prompt's 4-row tiles go as two of 2 rows
 * (matmul_rows_avx512): 4 rows' nibbles and 16 sums would not fit in the 32 registers. */
TILE_INLINE void q4_0_group512(__m512 acc[4][4], __m512i keep[4], const unsigned char *w, size_t rb, int nb, int g,
                               int nblk, const int8_t *xg, size_t xstride, const __m512 dw[4], const __m512 dx[4],
                               int second, const int NR, const int NT) {
    const __m512i low4 = _mm512_set1_epi8(0x0f);
    const __mmask16 mine = second ? 0xaaaa : 0x5555;
    const int bytes = 16 * nblk;
    __m512i alo[4], ahi[4], blo[4], bhi[4];
    UNROLL
    for (int r = 0; r < NR; r++) {
        const unsigned char *row = w + r * rb, *q = row + 2 * (size_t)nb + (size_t)g * 128;
        if (NT == 1) {
            const unsigned char *pf = row + (size_t)g * 144;
            prefetch_by(pf, PREFETCH_AHEAD_Q4, NR);
            prefetch_by(pf + 64, PREFETCH_AHEAD_Q4, NR);
            prefetch_by(pf + 128, PREFETCH_AHEAD_Q4, NR);
        }
        __m512i v1 = load512_upto(q, bytes), v2 = bytes > 64 ? load512_upto(q + 64, bytes - 64) : _mm512_setzero_si512();
        __m512i a = _mm512_unpacklo_epi64(v1, v2), b = _mm512_unpackhi_epi64(v1, v2);
        alo[r] = _mm512_and_si512(a, low4), ahi[r] = _mm512_and_si512(_mm512_srli_epi16(a, 4), low4);
        blo[r] = _mm512_and_si512(b, low4), bhi[r] = _mm512_and_si512(_mm512_srli_epi16(b, 4), low4);
    }
    UNROLL
    for (int t = 0; t < NT; t++) {
        const int8_t *xt = xg + (size_t)t * xstride;
        __m512i x0 = _mm512_loadu_si512((const void *)xt), x1 = _mm512_loadu_si512((const void *)(xt + 64));
        __m512i x2 = _mm512_loadu_si512((const void *)(xt + 128)), x3 = _mm512_loadu_si512((const void *)(xt + 192));
        __m512i off = _mm512_loadu_si512((const void *)(xt + 256));
        IN_REGISTER(x0);
        IN_REGISTER(x1);
        IN_REGISTER(x2);
        IN_REGISTER(x3);
        UNROLL
        for (int r = 0; r < NR; r++) {
            __m512i s = _mm512_dpbusd_epi32(off, alo[r], x0);
            s = _mm512_dpbusd_epi32(s, ahi[r], x1);
            s = _mm512_dpbusd_epi32(s, blo[r], x2);
            s = _mm512_dpbusd_epi32(s, bhi[r], x3);
            s = _mm512_add_epi32(s, _mm512_shuffle_epi32(s, _MM_PERM_CDAB)); /* each lane pair's sum, in both */
            if (NT == 1) keep[r] = s;
            else acc[r][t] = _mm512_mask3_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(dw[r], dx[t]), acc[r][t], mine);
        }
    }
}

/* A row's group of 4 blocks or fewer (1152 columns are 36 blocks: 2 steps and 4 blocks).
 * q4_0_group512 would spend as many dot products on it as on 8 blocks, half of them on
 * zeros. Here one 64-byte load brings the blocks, lane k holding block k alone: its low
 * nibbles (values 0-15) go against x's values 0-15 and its high nibbles against 16-31, two
 * dot products per row and token. Lanes 4k .. 4k + 3 all hold block k: their sum goes into
 * lane 4k (4k + 1 for a step's second group), as in q4_0_group512. x: 2 x 64 bytes, 16
 * offsets. */
TILE_INLINE void q4_0_half512(__m512 acc[4][4], __m512i keep[4], const unsigned char *w, size_t rb, int nb, int g,
                              int nblk, const int8_t *xg, size_t xstride, const __m512 dw[4], const __m512 dx[4],
                              int second, const int NR, const int NT) {
    const __m512i low4 = _mm512_set1_epi8(0x0f);
    const __mmask16 mine = second ? 0x2222 : 0x1111;
    UNROLL
    for (int r = 0; r < NR; r++) {
        const unsigned char *row = w + r * rb, *q = row + 2 * (size_t)nb + (size_t)g * 128;
        if (NT == 1) prefetch_by(row + (size_t)g * 144, PREFETCH_AHEAD_Q4, NR);
        __m512i v = load512_upto(q, 16 * nblk);
        __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        const int8_t *x = xg;
        if (NT > 1) RELOAD(x);
        UNROLL
        for (int t = 0; t < NT; t++) {
            const int8_t *xt = x + (size_t)t * xstride;
            __m512i s = _mm512_loadu_si512((const void *)(xt + 128));
            s = _mm512_dpbusd_epi32(s, lo, _mm512_loadu_si512((const void *)xt));
            s = _mm512_dpbusd_epi32(s, hi, _mm512_loadu_si512((const void *)(xt + 64)));
            s = _mm512_add_epi32(s, _mm512_shuffle_epi32(s, _MM_PERM_BADC)); /* lanes 4k + 2, 4k + 3 onto 4k, 4k + 1 */
            s = _mm512_add_epi32(s, _mm512_shuffle_epi32(s, _MM_PERM_CDAB)); /* and 4k + 1 onto 4k (and back) */
            if (NT == 1) keep[r] = _mm512_maskz_mov_epi32(mine, s);
            else acc[r][t] = _mm512_mask3_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(dw[r], dx[t]), acc[r][t], mine);
        }
    }
}

/* Group g of nblk blocks, as q4_0_group512 or (4 blocks or fewer) q4_0_half512 */
TILE_INLINE void q4_0_step512(__m512 acc[4][4], __m512i keep[4], const unsigned char *w, size_t rb, int nb, int g,
                              int nblk, const int8_t *xg, size_t xstride, const __m512 dw[4], const __m512 dx[4],
                              int second, const int NR, const int NT) {
    if (nblk > 4) q4_0_group512(acc, keep, w, rb, nb, g, nblk, xg, xstride, dw, dx, second, NR, NT);
    else q4_0_half512(acc, keep, w, rb, nb, g, nblk, xg, xstride, dw, dx, second, NR, NT);
}

/* q4_0 rows against the tokens' reordered activations xp (q4_0_reorder512), scales xs */
TILE_INLINE void tile512_q4_0(float *out, int ostride, const unsigned char *w, size_t rb, const int8_t *xp,
                              const float *xs, int nb, const int NR, const int NT) {
    const size_t xstride = (size_t)Q4_GROUPS(nb) * Q4_GROUP_BYTES; /* bytes per token */
    __m512 acc[4][4];
    UNROLL
    for (int r = 0; r < NR; r++)
        UNROLL
        for (int t = 0; t < NT; t++) acc[r][t] = _mm512_setzero_ps();
    for (int b0 = 0; b0 < nb; b0 += 16) {
        const int k = nb - b0 < 16 ? nb - b0 : 16, g = b0 / 8;
        __m512 dw[4], dx[4];
        UNROLL
        for (int r = 0; r < NR; r++)
            dw[r] = _mm512_castsi512_ps(
                lanes_of(DT_Q4_0, _mm512_castps_si512(_mm512_cvtph_ps(load256_upto(w + r * rb + 2 * b0, 2 * k)))));
        UNROLL
        for (int t = 0; t < NT; t++) dx[t] = _mm512_castsi512_ps(lanes_of(DT_Q4_0, load512_upto(xs + (size_t)t * nb + b0, 4 * k)));
        __m512i first[4], second[4]; /* decode's sums of the step's two groups (NT == 1) */
        q4_0_step512(acc, first, w, rb, nb, g, k < 8 ? k : 8, xp + (size_t)g * Q4_GROUP_BYTES, xstride, dw, dx, 0, NR, NT);
        if (k > 8)
            q4_0_step512(acc, second, w, rb, nb, g + 1, k - 8, xp + (size_t)(g + 1) * Q4_GROUP_BYTES, xstride, dw, dx, 1,
                         NR, NT);
        if (NT == 1) /* the two groups' lanes into one vector: one conversion and one FMA per step */
            UNROLL
            for (int r = 0; r < NR; r++) {
                __m512i s = k > 8 ? _mm512_mask_blend_epi32(0xaaaa, first[r], second[r]) : _mm512_maskz_mov_epi32(0x5555, first[r]);
                acc[r][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(dw[r], dx[0]), acc[r][0]);
            }
    }
    UNROLL
    for (int r = 0; r < NR; r++)
        UNROLL
        for (int t = 0; t < NT; t++) out[(size_t)t * ostride + r] = hsum16(acc[r][t]);
}

/* quantize_activations in AVX-512, a block per step: the same operations on each value
 * (|x|, its block's max, one division, one reciprocal, a multiply, a round to nearest
 * even: the conversion in the default rounding mode), so the same bytes; the tests
 * compare them. The plain loop's max does not vectorise (without -ffast-math), and decode
 * runs it on every thread before its rows. */
static void quantize_activations512(int8_t *xq, float *scale, int32_t *sums, const float *x, int n) {
    for (int b = 0; b < n / QK; b++) {
        __m512 lo = _mm512_loadu_ps(x + b * QK), hi = _mm512_loadu_ps(x + b * QK + 16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
        float d = amax / 127.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
        __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, _mm512_set1_ps(inv)));
        __m512i qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, _mm512_set1_ps(inv)));
        _mm_storeu_si128((__m128i *)(xq + b * QK), _mm512_cvtsepi32_epi8(qlo)); /* |q| <= 127 */
        _mm_storeu_si128((__m128i *)(xq + b * QK + 16), _mm512_cvtsepi32_epi8(qhi));
        scale[b] = d;
        sums[b] = _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
    }
}

/* One token's int8 activations xq for tile512_q4_0. Per group of 8 blocks: 4 vectors of
 * 64 bytes whose 128-bit lane k holds 8 values of block k, then 8 of block 4 + k: values
 * 0-7 (against the low nibbles of the blocks' first 8 bytes), 16-23 (their high nibbles),
 * 8-15 and 24-31 (the last 8 bytes' low and high nibbles). Then per lane of the sums, -8
 * x (the sum of the 16 values it multiplies). Missing blocks of a last, partial group are
 * zeros; a last group of 4 blocks or fewer is laid out for q4_0_half512 instead (lane k:
 * block k's values 0-15, then 16-31, then the offsets). */
static void q4_0_reorder512(int8_t *xp, const int8_t *xq, int nb, int g0, int g1) {
    static const int first[4] = {0, 16, 8, 24}; /* the value each vector starts a block's run at */
    const __m512i eight = _mm512_set1_epi8(8);
    for (int g = g0; g < g1; g++) {
        int8_t *dst = xp + (size_t)g * Q4_GROUP_BYTES;
        __m512i sum = _mm512_setzero_si512();
        if (nb - 8 * g <= 4) { /* a last group of 4 blocks or fewer, as q4_0_half512 reads it */
            for (int v = 0; v < 2; v++) {
                for (int k = 0; k < 4; k++) { /* lane k: values 16v .. 16v + 15 of block 8g + k */
                    int b = 8 * g + k;
                    if (b < nb) memcpy(dst + 64 * v + 16 * k, xq + (size_t)b * QK + 16 * v, 16);
                    else memset(dst + 64 * v + 16 * k, 0, 16);
                }
                sum = _mm512_dpbusd_epi32(sum, eight, _mm512_loadu_si512((const void *)(dst + 64 * v)));
            }
            _mm512_storeu_si512((void *)(dst + 128), _mm512_sub_epi32(_mm512_setzero_si512(), sum));
            continue;
        }
        for (int v = 0; v < 4; v++) {
            for (int h = 0; h < 8; h++) { /* 8-byte half lane h: block 8g + h/2 + 4 * (h % 2) */
                int b = 8 * g + h / 2 + 4 * (h % 2);
                int8_t *d = dst + 64 * v + 8 * h;
                if (b < nb) memcpy(d, xq + (size_t)b * QK + first[v], 8);
                else memset(d, 0, 8);
            }
            sum = _mm512_dpbusd_epi32(sum, eight, _mm512_loadu_si512((const void *)(dst + 64 * v)));
        }
        _mm512_storeu_si512((void *)(dst + 256), _mm512_sub_epi32(_mm512_setzero_si512(), sum));
    }
}

/* Quantized prompts (q8_0, q4_0), 16 rows to a vpdpbusd. The rows of a job are repacked,
 * 16 at a time, so that one 512-bit register holds 4 bytes of each of 16 rows: per block
 * and token, 8 vpdpbusd give the 16 rows' exact int32 sums in one register, and one
 * conversion and one FMA take them on (8 dot products and a few more instructions per
 * 512 multiply-adds); the repacking (a transpose) is paid once per 16 rows for all the
 * prompt's tokens. The mmap'd
 * file keeps its layout; the repacked rows live in a slot per thread of the run state (16
 * rows of the widest matrix and their scales as floats: 18 bytes per column, 124 KB for
 * the 1B shape). Weights go in as unsigned bytes, as vpdpbusd wants them: q8_0's w + 128,
 * q4_0's nibbles (0-15, the format's w + 8); each block's sum starts from -128 or -8 times
 * the block's sum of activations (xq_sum), giving the integers of the plain loops exactly.
 *
 * The float side is the order every quantized tile keeps (BLOCK_LANE), so that a prompt
 * still gives the logits of token-by-token decoding: 16 partial sums per row and token,
 * here 16 registers, one per lane, each holding 16 rows; block b goes into lane
 * BLOCK_LANE(b % 16), and the final adds go in hsum16's tree (store_rows16). */
#define Q8_ROWS 16          /* rows per repacked group */
#define Q8_MIN_TOKENS 4     /* default q8_min_tokens: fewer tokens do not repay the repacking */
#define Q4_MIN_TOKENS 32    /* default q4_min_tokens: q4_0's 4 x 4 tiles are as fast below it */
#define Q8_REPACK_BYTES(cols) ((size_t)(cols) * Q8_ROWS + (size_t)(cols) / QK * Q8_ROWS * sizeof(float))

/* The 16 x 16 dwords of v transposed: v[j] lane i becomes v[i] lane j. Dwords within each
 * 128-bit lane first (unpacks), giving lanes that hold a column of 4 rows, then the 128-bit
 * lanes of each 4 such vectors. */
static inline void transpose16x16(__m512i v[16]) {
    __m512i t[16], s[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(v[i], v[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(v[i], v[i + 1]);
    }
    /* s[4a + m], 128-bit lane L: dword 4L + m of rows 4a .. 4a + 3 */
    for (int a = 0; a < 16; a += 4) {
        s[a] = _mm512_unpacklo_epi64(t[a], t[a + 2]);
        s[a + 1] = _mm512_unpackhi_epi64(t[a], t[a + 2]);
        s[a + 2] = _mm512_unpacklo_epi64(t[a + 1], t[a + 3]);
        s[a + 3] = _mm512_unpackhi_epi64(t[a + 1], t[a + 3]);
    }
    for (int m = 0; m < 4; m++) {
        __m512i x0 = _mm512_shuffle_i32x4(s[m], s[4 + m], 0x44), x1 = _mm512_shuffle_i32x4(s[m], s[4 + m], 0xee);
        __m512i x2 = _mm512_shuffle_i32x4(s[8 + m], s[12 + m], 0x44), x3 = _mm512_shuffle_i32x4(s[8 + m], s[12 + m], 0xee);
        v[m] = _mm512_shuffle_i32x4(x0, x2, 0x88);      /* dword m of the 16 rows */
        v[4 + m] = _mm512_shuffle_i32x4(x0, x2, 0xdd);  /* dword 4 + m */
        v[8 + m] = _mm512_shuffle_i32x4(x1, x3, 0x88);
        v[12 + m] = _mm512_shuffle_i32x4(x1, x3, 0xdd);
    }
}

/* Blocks b, b + 1 (two: else b alone) of a q8_0 or q4_0 row as 64 unsigned bytes, the 32
 * weights of each block in order: q8_0's w + 128, q4_0's nibbles. */
static inline __m512i unsigned_blocks2(int dtype, const unsigned char *row, int nb, int b, int two) {
    if (dtype == DT_Q8_0) {
        const unsigned char *q = row + 2 * (size_t)nb + (size_t)b * QK;
        __m512i v = two ? _mm512_loadu_si512((const void *)q) : _mm512_maskz_loadu_epi32((__mmask16)0xff, q);
        return _mm512_xor_si512(v, _mm512_set1_epi8((char)0x80));
    }
    const unsigned char *q = row + 2 * (size_t)nb + (size_t)b * (QK / 2);
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    __m256i v = two ? _mm256_loadu_si256((const __m256i *)q) : _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)q));
    __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
    /* 128-bit lanes: block b's low nibbles (values 0-15), b + 1's, b's high (16-31), b + 1's */
    __m512i z = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    return _mm512_shuffle_i32x4(z, z, 0xd8); /* lanes 0, 2, 1, 3 */
}

/* Rows row[0 .. nr - 1] (nr <= 16, rb bytes apart) of a q8_0 or q4_0 matrix of nb blocks
 * into dst: per block, 8 vectors whose lane i holds unsigned bytes 4k .. 4k + 3 of row i's
 * block (unsigned_blocks2); then per block the 16 rows' scales as floats. Missing rows are
 * zero scales. Two blocks (64 bytes of each row) at a time, as a 16 x 16 transpose of dwords. */
static void repack16(int dtype, unsigned char *dst, const unsigned char *row, size_t rb, int nb, int nr) {
    const __mmask16 live = (__mmask16)((1u << nr) - 1);
    const __m512i at = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                          _mm512_set1_epi32((int)rb));
    float *scales = (float *)(dst + (size_t)nb * QK * Q8_ROWS);
    for (int b = 0; b < nb; b += 2) {
        const int two = nb - b >= 2; /* else the row's last block alone */
        __m512i v[16];
        for (int i = 0; i < 16; i++)
            v[i] = i >= nr ? _mm512_setzero_si512() : unsigned_blocks2(dtype, row + (size_t)i * rb, nb, b, two);
        transpose16x16(v);
        for (int j = 0; j < (two ? 16 : 8); j++) _mm512_storeu_si512((void *)(dst + ((size_t)b * 8 + j) * 64), v[j]);
    }
    for (int b = 0; b < nb; b++) {
        /* the scale and the next 2 bytes (another scale or the first quants: inside the row) */
        __m512i h = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, at, row + 2 * b, 1);
        _mm512_storeu_ps(scales + (size_t)b * Q8_ROWS, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(h)));
    }
}

/* hsum16's tree over the 16 lane sums, 16 rows at once (lanes l + 8, then l + 4, l + 2,
 * l + 1), to o[0 .. nr - 1]. */
TILE_INLINE void store_rows16(float *o, int nr, __m512 acc[16]) {
    UNROLL8
    for (int l = 0; l < 8; l++) acc[l] = _mm512_add_ps(acc[l], acc[l + 8]);
    UNROLL8
    for (int l = 0; l < 4; l++) acc[l] = _mm512_add_ps(acc[l], acc[l + 4]);
    acc[0] = _mm512_add_ps(acc[0], acc[2]);
    acc[1] = _mm512_add_ps(acc[1], acc[3]);
    _mm512_mask_storeu_ps(o, (__mmask16)((1u << nr) - 1), _mm512_add_ps(acc[0], acc[1]));
}

/* A token (int8 activations xq, their block sums xsum and scales xs) as rows16 reads it */
typedef struct {
    const int8_t *xq;
    const int32_t *xsum;
    const float *xs;
} Token16;

/* Block b of token x against the 16 repacked rows into acc, which holds lane
 * BLOCK_LANE(b % 16) of their sums; off: what the unsigned weights carry over the format's
 * (128 for q8_0, 8 for q4_0). */
TILE_INLINE void rows16_block(__m512 *acc, const unsigned char *pk, const float *scales, int b, Token16 x, int off) {
    const __m512 d = _mm512_mul_ps(_mm512_loadu_ps(scales + (size_t)b * Q8_ROWS), _mm512_set1_ps(x.xs[b]));
    __m512i s = _mm512_set1_epi32(-off * x.xsum[b]);
    UNROLL8
    for (int k = 0; k < 8; k++) {
        int32_t x4;
        memcpy(&x4, x.xq + (size_t)b * QK + 4 * k, 4);
        s = _mm512_dpbusd_epi32(s, _mm512_loadu_si512((const void *)(pk + ((size_t)b * 8 + k) * 64)), _mm512_set1_epi32(x4));
    }
    *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), d, *acc);
}

/* One token x against a repacked group pk of nr rows: their nr sums to o[0 .. nr - 1]. */
TILE_INLINE void rows16(const int dtype, float *o, int nr, const unsigned char *pk, int nb, Token16 x) {
    const float *scales = (const float *)(pk + (size_t)nb * QK * Q8_ROWS);
    const int off = dtype == DT_Q8_0 ? 128 : 8;
    __m512 acc[16];
    UNROLL16
    for (int l = 0; l < 16; l++) acc[l] = _mm512_setzero_ps();
    int b0 = 0;
    for (; b0 + 16 <= nb; b0 += 16)
        UNROLL16
        for (int k = 0; k < 16; k++) rows16_block(&acc[BLOCK_LANE(dtype, k)], pk, scales, b0 + k, x, off);
    UNROLL16
    for (int k = 0; k < 16; k++)
        if (b0 + k < nb) rows16_block(&acc[BLOCK_LANE(dtype, k)], pk, scales, b0 + k, x, off);
    store_rows16(o, nr, acc);
}

/* The blocks of two tokens whose lanes are 8h .. 8h + 7 (half h of the 16) into
 * acc[t][lane - 8h], each repacked vector loaded once for both. */
TILE_INLINE void rows16_half2(const int dtype, __m512 acc[2][8], const int h, const unsigned char *pk, int nb,
                              const Token16 x[2]) {
    const float *scales = (const float *)(pk + (size_t)nb * QK * Q8_ROWS);
    const int off = dtype == DT_Q8_0 ? 128 : 8;
    for (int b0 = 0; b0 < nb; b0 += 16)
        UNROLL16
        for (int k = 0; k < 16; k++) {
            const int lane = BLOCK_LANE(dtype, k);
            if (lane / 8 != h || b0 + k >= nb) continue;
            const int b = b0 + k;
            __m512 d[2];
            __m512i s[2];
            UNROLL
            for (int t = 0; t < 2; t++) {
                d[t] = _mm512_mul_ps(_mm512_loadu_ps(scales + (size_t)b * Q8_ROWS), _mm512_set1_ps(x[t].xs[b]));
                s[t] = _mm512_set1_epi32(-off * x[t].xsum[b]);
            }
            UNROLL8
            for (int j = 0; j < 8; j++) {
                __m512i w = _mm512_loadu_si512((const void *)(pk + ((size_t)b * 8 + j) * 64));
                UNROLL
                for (int t = 0; t < 2; t++) {
                    int32_t x4;
                    memcpy(&x4, x[t].xq + (size_t)b * QK + 4 * j, 4);
                    s[t] = _mm512_dpbusd_epi32(s[t], w, _mm512_set1_epi32(x4));
                }
            }
            UNROLL
            for (int t = 0; t < 2; t++) acc[t][lane - 8 * h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[t]), d[t], acc[t][lane - 8 * h]);
        }
}

/* rows16 for two tokens: lanes 0-7 first, then 8-15 (each lane's sum is its own, so the
 * order of the lanes does not matter), every repacked vector loaded once per pass for both
 * tokens (16 lanes of two tokens would not fit in the registers). */
TILE_INLINE void rows16x2(const int dtype, float *const o[2], int nr, const unsigned char *pk, int nb, const Token16 x[2]) {
    __m512 lo[2][8], hi[2][8];
    UNROLL
    for (int t = 0; t < 2; t++)
        UNROLL8
        for (int k = 0; k < 8; k++) lo[t][k] = hi[t][k] = _mm512_setzero_ps();
    rows16_half2(dtype, lo, 0, pk, nb, x);
    rows16_half2(dtype, hi, 1, pk, nb, x);
    UNROLL
    for (int t = 0; t < 2; t++) {
        __m512 acc[16];
        UNROLL8
        for (int k = 0; k < 8; k++) acc[k] = lo[t][k], acc[8 + k] = hi[t][k];
        store_rows16(o[t], nr, acc);
    }
}

/* Whether a prompt of n tokens runs its matmuls of dtype (q8_0, q4_0) in rows16: a prompt
 * long enough, and a repacking slot for every thread. */
static int rows16_on(const Activations *a, int n, int dtype) {
    return n > 1 && n >= (dtype == DT_Q8_0 ? a->q8_min_tokens : a->q4_min_tokens) && a->repack &&
           TEAM_SIZE() <= a->repack_slots;
}

/* Token t of a's activations as rows16 reads them */
static Token16 token16(const Activations *a, int t, int cols) {
    Token16 x = {a->xq + (size_t)t * cols, a->xq_sum + (size_t)t * (cols / QK), a->xq_scale + (size_t)t * (cols / QK)};
    return x;
}

/* Rows r0 .. r0 + nr - 1 of a q8_0 or q4_0 W against all n tokens: 16 rows repacked, then
 * every token against them (the repacked rows stay in L2), then the next 16. */
TILE_INLINE void matmul_rows16(const int dtype, float *out, int n, const Matrix *W, const Activations *a, int r0, int nr) {
    const int rows = W->rows, cols = W->cols, nb = cols / QK;
    const size_t rb = row_bytes(dtype, cols);
    unsigned char *pk = a->repack + (size_t)THREAD_NUM() * a->repack_bytes;
    for (int g = 0; g < nr; g += Q8_ROWS) {
        const int m = nr - g < Q8_ROWS ? nr - g : Q8_ROWS;
        repack16(dtype, pk, (const unsigned char *)W->data + (size_t)(r0 + g) * rb, rb, nb, m);
        int t = 0;
        for (; t + 2 <= n; t += 2) {
            float *o[2] = {out + (size_t)t * rows + r0 + g, out + (size_t)(t + 1) * rows + r0 + g};
            const Token16 x[2] = {token16(a, t, cols), token16(a, t + 1, cols)};
            rows16x2(dtype, o, m, pk, nb, x);
        }
        for (; t < n; t++) rows16(dtype, out + (size_t)t * rows + r0 + g, m, pk, nb, token16(a, t, cols));
    }
}

static void matmul_q8_0_rows16(float *out, int n, const Matrix *W, const Activations *a, int r0, int nr) {
    matmul_rows16(DT_Q8_0, out, n, W, a, r0, nr);
}

static void matmul_q4_0_rows16(float *out, int n, const Matrix *W, const Activations *a, int r0, int nr) {
    matmul_rows16(DT_Q4_0, out, n, W, a, r0, nr);
}

/* An AVX-512 bf16 tile of tokens t .. : the pair dot of x rounded to bf16 (a->xbf) where the
 * CPU has one, else the widening tile on x permuted (xin). Decode and a prompt take the
 * same one, so that a batch still equals token-by-token decoding. */
#ifdef GEMMA3_BF16_DOT
#define TILE512_BF16(o, ostride, w, rb, xin, a, t, cols, NR, NT) \
    tile512_bf16dot(o, ostride, w, rb, (a)->xbf + (size_t)(t) * (cols), cols, NR, NT)
#else
#define TILE512_BF16(o, ostride, w, rb, xin, a, t, cols, NR, NT) \
    tile512_bf16(o, ostride, w, rb, (xin) + (size_t)(t) * (cols), cols, NR, NT)
#endif

/* Rows r0 .. r0 + nr - 1 of W against all n tokens, as matmul_rows_avx2. */
static void matmul_rows_avx512(float *out, const float *xin, int n, const Matrix *W, const Activations *a, int r0, int nr) {
    const int rows = W->rows, cols = W->cols, dtype = W->dtype, nb = cols / QK;
    const size_t rb = row_bytes(dtype, cols);
    const unsigned char *w = (const unsigned char *)W->data + (size_t)r0 * rb;
    float *o = out + r0;
    if ((dtype == DT_Q8_0 || dtype == DT_Q4_0) && rows16_on(a, n, dtype)) {
        if (dtype == DT_Q8_0) matmul_q8_0_rows16(out, n, W, a, r0, nr);
        else matmul_q4_0_rows16(out, n, W, a, r0, nr);
        return;
    }
#define TILE(NR_, NT_)                                                                                             \
    do {                                                                                                           \
        float *o_ = o + (size_t)t * rows;                                                                          \
        const int8_t *xp_ = a->xq_perm + (size_t)t * Q4_GROUPS(nb) * Q4_GROUP_BYTES;                                 \
        const float *xs_ = a->xq_scale + (size_t)t * nb;                                                            \
        if (dtype == DT_F32) tile512_f32(o_, rows, w, rb, xin + (size_t)t * cols, cols, NR_, NT_);                  \
        else if (dtype == DT_BF16) TILE512_BF16(o_, rows, w, rb, xin, a, t, cols, NR_, NT_);                      \
        else if (dtype == DT_Q8_0)                                                                                 \
            tile512_q8_0(o_, rows, w, rb, a->xq + (size_t)t * cols, xs_, a->xq_sum + (size_t)t * nb, nb, NR_, NT_); \
        else if (NR_ == 4 && NT_ > 1) {                                                                            \
            tile512_q4_0(o_, rows, w, rb, xp_, xs_, nb, 2, NT_);                                                    \
            tile512_q4_0(o_ + 2, rows, w + 2 * rb, rb, xp_, xs_, nb, 2, NT_);                                       \
        } else                                                                                                     \
            tile512_q4_0(o_, rows, w, rb, xp_, xs_, nb, NR_, NT_);                                                  \
    } while (0)
    /* A prompt: each 4 tokens' x stays in L1 while it meets the chunk's rows, 4 at a time,
     * whose weights stay in L2 (CHUNK_ROWS). Decode (matmul_streams512 takes most of its
     * rows) runs 1 x 1 tiles. */
    if (n > 1) {
        CHUNK_LOOP(4);
    } else {
        for (int r = 0, t = 0; r < nr; r++, w += rb, o++) TILE(1, 1);
    }
#undef TILE
}

/* Decode reads a matrix in two streams per thread: group g of the matrix's first
 * 4 * (rows / 4) rows is rows 2g and 2g + D, then 2g + 1 and 2g + 1 + D (D = rows / 2), so
 * a thread's share of the groups is two far-apart runs of rows, read side by side by 2 x 1
 * tiles. The sums are the same as with 1 x 1 tiles. Two streams read faster than one or
 * four (`make bench`, 1B, every weight type). */
static void matmul_streams512(float *out, const float *xin, const Matrix *W, const Activations *a, int g) {
    const int D = W->rows / 4 * 2, nb = W->cols / QK;
    const size_t rb = row_bytes(W->dtype, W->cols);
    for (int u = 2 * g; u < 2 * g + 2; u++) {
        const unsigned char *w = (const unsigned char *)W->data + (size_t)u * rb;
        float o[2];
        if (W->dtype == DT_F32) tile512_f32(o, 1, w, (size_t)D * rb, xin, W->cols, 2, 1);
        else if (W->dtype == DT_BF16) TILE512_BF16(o, 1, w, (size_t)D * rb, xin, a, 0, W->cols, 2, 1);
        else if (W->dtype == DT_Q8_0) tile512_q8_0(o, 1, w, (size_t)D * rb, a->xq, a->xq_scale, a->xq_sum, nb, 2, 1);
        else tile512_q4_0(o, 1, w, (size_t)D * rb, a->xq_perm, a->xq_scale, nb, 2, 1);
        out[u] = o[0];
        out[u + D] = o[1];
    }
}

/* Attention of one job (attention()'s loop) with AVX-512: nh query heads q (hd apart) of
 * one kv head, against the span keys and values a query sees, which are ring slots s0 ..
 * s0 + n0 - 1 then 0 .. span - n0 - 1. Scores go to att (head g's at att + g * ctx), the
 * output to out (head g's at out + g * hd). A prompt's job (4 heads) took twice as long in
 * the plain loops: there each score is a dot product of its own, and the weighted sum of
 * values loads and stores the output every 4 keys. Here scores come 4 keys x up to 4 heads at a
 * time from the f32 matmul tile (keys as its rows, heads as its tokens), and the sum keeps
 * its output in registers over all the keys. Each (head, key) score and (head, element)
 * sum is added in the same order whatever nh is: a prompt's job equals decode's one head. */
#define RING_RUNS(j0, j1, slot) /* the keys j0 .. j1 - 1 of both runs, the first at ring slot `slot` */ \
    for (int run_ = 0, j0 = 0, j1 = n0, slot = s0; run_ < 2; run_++, j0 = n0, j1 = span, slot = 0)

TILE_INLINE void scores512(float *att, size_t ctx, const float *q, const float *kc, int KV, int s0, int n0, int span,
                           int hd, const int NH) {
    const size_t kb = (size_t)KV * sizeof(float); /* bytes from one key to the next */
    RING_RUNS(j0, j1, slot) {
        const unsigned char *k = (const unsigned char *)(kc + (size_t)slot * KV);
        int j = j0;
        for (; j + 4 <= j1; j += 4, k += 4 * kb) tile512_f32(att + j, (int)ctx, k, kb, q, hd, 4, NH);
        for (; j < j1; j++, k += kb) tile512_f32(att + j, (int)ctx, k, kb, q, hd, 1, NH);
    }
}

/* out[g][i] = sum over keys j of att[g][j] v_j[i], 16 x NV elements of NH heads at a time,
 * over blocks of keys whose values fill 32 KB: a block stays in L1 while the passes over
 * its elements go by, and each value row comes from L2 or memory once. */
TILE_INLINE void values512(float *out, const float *att, size_t ctx, const float *vc, int KV, int s0, int n0, int span,
                           int hd, const int NH, const int NV) {
    const int block = hd <= 8192 ? 8192 / hd : 1;
    for (int jb = 0; jb < span; jb += block) {
        const int je = span - jb < block ? span : jb + block;
        for (int i0 = 0; i0 < hd; i0 += 16 * NV) {
            __m512 acc[4][16];
            UNROLL
            for (int g = 0; g < NH; g++)
                UNROLL
                for (int k = 0; k < NV; k++)
                    acc[g][k] = jb ? _mm512_loadu_ps(out + (size_t)g * hd + i0 + 16 * k) : _mm512_setzero_ps();
            for (int j = jb; j < je; j++) {
                const float *v = vc + (size_t)(j < n0 ? s0 + j : j - n0) * KV + i0;
                UNROLL
                for (int g = 0; g < NH; g++) {
                    __m512 a = _mm512_set1_ps(att[(size_t)g * ctx + j]);
                    UNROLL
                    for (int k = 0; k < NV; k++) acc[g][k] = _mm512_fmadd_ps(a, _mm512_loadu_ps(v + 16 * k), acc[g][k]);
                }
            }
            UNROLL
            for (int g = 0; g < NH; g++)
                UNROLL
                for (int k = 0; k < NV; k++) _mm512_storeu_ps(out + (size_t)g * hd + i0 + 16 * k, acc[g][k]);
        }
    }
}
#undef RING_RUNS

/* Decode: before a thread prepares x (a microsecond or more), it asks for the start of its
 * streams, as far as the tiles' own prefetches run ahead, so that the memory's latency
 * passes while x is prepared, not at the start of the streams. g is the thread's first
 * job (first[i] .. first[i + 1] - 1 are matrix i's). */
static void prefetch_stream_starts(const Matrix *const W[], const int first[], int count, int g) {
    int i = 0;
    if (g >= first[count]) return;
    while (g >= first[i + 1]) i++;
    const Matrix *M = W[i];
    const int gi = g - first[i], D = M->rows / 4 * 2; /* as matmul_streams512 */
    if (gi >= M->rows / 4) return;
    const size_t rb = row_bytes(M->dtype, M->cols);
    const int ahead = M->dtype == DT_Q4_0 ? PREFETCH_AHEAD_Q4 : PREFETCH_AHEAD; /* as the tiles */
    for (int r = 0; r < 2; r++) { /* the two streams */
        const unsigned char *p = (const unsigned char *)M->data + ((size_t)gi * 2 + (size_t)r * D) * rb;
        for (int b = 0; b < ahead / 2; b += 64) __builtin_prefetch(p + b, 0, 3);
    }
}
#endif /* GEMMA3_AVX512 */

/* ------------------------------------------------------------------------- */
/* GGUF's blocks (dtype DT_GGML + t; gguf_blocks.c has the plain dots). A row's blocks are
 * decoded (ggml_unpack) into one shape that every type with a kernel here fits, and
 * multiplied by the int8 activations of each token: decode meets each group as it is
 * decoded (ggml_dot1), a prompt decodes each row once into a slot and meets it with its
 * tokens 4 at a time (ggml_tile). The shape, per group of 32 values (QK):
 *
 *   32 signed codes c (|c| <= 128), and for each half (values 0-15, 16-31) a float scale
 *   and a float min m:  w[i] = scale[i / 16] * c[i] - m[i / 16]
 *
 * (the k-quants' 4- or 6-bit scales and mins already folded in: d * sc, dmin * m). Per
 * group, the integer sums of the codes times each int8 term of x go in 8 int32 lanes of 4
 * bytes each (lanes 0-3 are values 0-15) and meet the scales in float once; the mins meet
 * x's sums per 16 values (xmin), 8 halves a vector. A signed code c times x goes as |c|
 * (unsigned) times x with c's sign. Decode and a prompt add the same float operations in
 * the same order (group_times_x, mins_times_x), so a batch gives exactly the results that
 * token-by-token decoding gives; only the order of the float additions differs from the
 * plain loops. Types without an unpacker here (the i-quants' grids, F16) run the plain
 * loops. */

/* 32 signed codes c times 32 int8 x: 8 int32 lanes, lane k the sum over bytes 4k .. 4k + 3 */
static inline __m256i dot_s8s8(__m256i c, __m256i x) {
    return dot_u8s8(_mm256_setzero_si256(), _mm256_sign_epi8(c, c), _mm256_sign_epi8(x, c));
}

/* Byte j of the result is 0x10 where bit j of the 32 bits at p is set, else 0. */
static inline __m256i bits_to_0x10(const unsigned char *p) {
    uint32_t bits;
    memcpy(&bits, p, 4); /* x86 is little-endian: bit j is bit j of the u32 */
    const __m256i which = _mm256_setr_epi64x(0, 0x0101010101010101LL, 0x0202020202020202LL, 0x0303030303030303LL);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    __m256i b = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), which); /* byte j: byte j / 8 of bits */
    return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(b, bit), bit), _mm256_set1_epi8(0x10));
}

/* The 32 nibbles of 16 bytes: values 0-15 the low nibbles, 16-31 the high ones. */
static inline __m256i nibbles32(const unsigned char *q) {
    __m128i raw = _mm_loadu_si128((const __m128i *)q);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(0x0f));
}

/* Bits k of the 32 bytes v (k < 8), as 0 or 1 per byte */
static inline __m256i bit_k(__m256i v, int k) {
    return _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(k)), _mm256_set1_epi8(1));
}

/* A row unpacked: the codes of its groups, then per group its two half scales, then its
 * mins. (In a slot of the thread's scratch: ggml_unpacked_bytes.) */
typedef struct {
    int8_t *c;    /* (nb, 32) */
    float *scale; /* (nb, 2) */
    float *min;   /* (nb, 2) */
} Unpacked;

static Unpacked unpacked_at(unsigned char *slot, int nb) {
    Unpacked u = {(int8_t *)slot, (float *)(slot + (size_t)nb * QK), (float *)(slot + (size_t)nb * QK) + 2 * nb};
    return u;
}

static size_t ggml_unpacked_bytes(size_t widest) { return (widest + widest / QK * 4 * sizeof(float) + 63) / 64 * 64; }

/* One token's sums for one row: 8 lanes of the groups' scaled integer sums in two
 * accumulators that swap after each group (two chains of additions, not one: even groups
 * go to one, odd ones to the other), and 8 of the mins' part (lane j: halves 8i + j) */
typedef struct {
    __m256 acc[2], mins;
} RowSums;

/* A group (codes c, half scales s0 s1) times token t's x, into s->acc: each int8 term's
 * integer sums, met by its scale, then the two by the group's. unsigned_codes: c >= 0 (no
 * sign to move onto x). The order of every float operation here is the same for decode and
 * a prompt. */
TILE_INLINE void group_times_x(RowSums *s, __m256i c, float s0, float s1, int unsigned_codes, const Activations *a, int t,
                               int b, int nb) {
    const size_t at = (size_t)t * nb * QK + QK * b, blk = (size_t)t * nb + b;
    const __m256i mag = unsigned_codes ? c : _mm256_sign_epi8(c, c);
    const __m256 sv = _mm256_set_m128(_mm_set1_ps(s1), _mm_set1_ps(s0));
    __m256i xq = _mm256_loadu_si256((const __m256i *)(a->xq + at)), xr = _mm256_loadu_si256((const __m256i *)(a->xr + at));
    if (!unsigned_codes) {
        xq = _mm256_sign_epi8(xq, c);
        xr = _mm256_sign_epi8(xr, c);
    }
    __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(dot_u8s8(_mm256_setzero_si256(), mag, xq)), _mm256_set1_ps(a->xq_scale[blk]));
    f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(_mm256_setzero_si256(), mag, xr)), _mm256_set1_ps(a->xr_scale[blk]), f);
    const __m256 sum = _mm256_fmadd_ps(f, sv, s->acc[0]);
    s->acc[0] = s->acc[1];
    s->acc[1] = sum;
}

/* The mins of halves h0 .. h0 + count - 1 (16 values each; count <= 8, m: theirs) times
 * token t's xmin, into s->mins: one lane a half, the missing ones zero */
TILE_INLINE void mins_times_x(RowSums *s, const float *m, int count, const Activations *a, int t, int h0, int nb) {
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(count), lanes);
    s->mins = _mm256_fmadd_ps(_mm256_maskload_ps(m, mask), _mm256_maskload_ps(a->xmin + (size_t)t * 2 * nb + h0, mask), s->mins);
}

static inline float row_sums_total(const RowSums *s) { return hsum8(_mm256_add_ps(s->acc[0], s->acc[1])) - hsum8(s->mins); }

/* Where the unpackers below put a group: into an unpacked row (u), or, with u NULL, straight
 * into token 0's sums (decode: no row is stored; its mins wait in m, 4 groups at a time) */
typedef struct {
    const Unpacked *u;
    RowSums *sums;
    float *m; /* (16) */
    const Activations *a;
    int nb, has_min, unsigned_codes;
} Sink;

TILE_INLINE void put_group(const Sink *k, int b, __m256i c, float s0, float s1, float m0, float m1) {
    if (k->u) {
        _mm256_storeu_si256((__m256i *)(k->u->c + QK * b), c);
        k->u->scale[2 * b] = s0;
        k->u->scale[2 * b + 1] = s1;
        k->u->min[2 * b] = m0;
        k->u->min[2 * b + 1] = m1;
        return;
    }
    group_times_x(k->sums, c, s0, s1, k->unsigned_codes, k->a, 0, b, k->nb);
    if (k->has_min) { /* 4 groups' mins a time (chunk c: groups 4c ..), in turns in two halves of m */
        const int c = b / 4;
        k->m[8 * (c % 2) + 2 * (b % 4)] = m0;
        k->m[8 * (c % 2) + 2 * (b % 4) + 1] = m1;
        /* A chunk is added once the next one is whole: read back at once, the stores just
         * made would stall the load */
        if (c >= 1 && (b % 4 == 3 || b == k->nb - 1)) mins_times_x(k->sums, k->m + 8 * ((c - 1) % 2), 8, k->a, 0, 8 * (c - 1), k->nb);
        if (b == k->nb - 1) mins_times_x(k->sums, k->m + 8 * (c % 2), 2 * (b % 4 + 1), k->a, 0, 8 * c, k->nb);
    }
}

/* The legacy types, 32 values a block: Q8_0 (34 bytes) d q; Q4_0 (18) d (q - 8); IQ4_NL
 * (18) d kvalues[q]; Q5_0 (22) d (q - 16); Q4_1 (20) d q + m; Q5_1 (24) d q + m. */
TILE_INLINE void unpack_legacy(const Sink *k, const unsigned char *w, int type, int nb) {
    const __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)gguf_kvalues_iq4nl));
    for (int b = 0; b < nb; b++) {
        const float d = _cvtsh_ss(rd_u16(w));
        __m256i c;
        float m = 0.0f;
        switch (type) {
        case 8: c = _mm256_loadu_si256((const __m256i *)(w + 2)); w += 34; break;
        case 2: c = _mm256_sub_epi8(nibbles32(w + 2), _mm256_set1_epi8(8)); w += 18; break;
        case 20: c = _mm256_shuffle_epi8(table, nibbles32(w + 2)); w += 18; break;
        case 6: c = _mm256_sub_epi8(_mm256_or_si256(nibbles32(w + 6), bits_to_0x10(w + 2)), _mm256_set1_epi8(16)); w += 22; break;
        case 3: c = nibbles32(w + 4); m = -_cvtsh_ss(rd_u16(w + 2)); w += 20; break;
        default: /* 7, Q5_1 */
            c = _mm256_or_si256(nibbles32(w + 8), bits_to_0x10(w + 4));
            m = -_cvtsh_ss(rd_u16(w + 2));
            w += 24;
            break;
        }
        put_group(k, b, c, d, d, m, m);
    }
}

/* Q4_K (has_qh 0, 144 bytes per 256 values) and Q5_K (176): per 32 values a 6-bit scale sc
 * and min m: (d sc) q - (dmin m) */
TILE_INLINE void unpack_k4(const Sink *k, const unsigned char *w, int has_qh, int nb) {
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    for (int s = 0; s < nb / 8; s++, w += has_qh ? 176 : 144) {
        const float d = _cvtsh_ss(rd_u16(w)), dmin = _cvtsh_ss(rd_u16(w + 2));
        const unsigned char *qs = w + (has_qh ? 48 : 16);
        const __m256i qh = has_qh ? _mm256_loadu_si256((const __m256i *)(w + 16)) : _mm256_setzero_si256();
        UNROLL8 for (int g = 0; g < 8; g++) {
            int sc, m;
            gguf_scale_min_k4(w + 4, g, &sc, &m);
            __m256i raw = _mm256_loadu_si256((const __m256i *)(qs + 32 * (g / 2)));
            __m256i c = _mm256_and_si256(g % 2 ? _mm256_srli_epi16(raw, 4) : raw, low4);
            if (has_qh) c = _mm256_or_si256(c, _mm256_slli_epi16(bit_k(qh, g), 4));
            put_group(k, 8 * s + g, c, d * (float)sc, d * (float)sc, dmin * (float)m, dmin * (float)m);
        }
    }
}

/* Q6_K, 210 bytes per 256 values: d sc (q - 32), a signed 8-bit scale per 16 values. Group
 * g (values 32g ..) of half h = g / 4 takes nibble g % 4 / 2 of ql[64h + 32 (g % 2) ..]
 * and bits 2 (g % 4) of qh[32h ..]. */
TILE_INLINE void unpack_q6_k(const Sink *k, const unsigned char *w, int nb) {
    const __m256i low4 = _mm256_set1_epi8(0x0f), three = _mm256_set1_epi8(3), off = _mm256_set1_epi8(32);
    for (int s = 0; s < nb / 8; s++, w += 210) {
        const float d = _cvtsh_ss(rd_u16(w + 208));
        const signed char *sc = (const signed char *)(w + 192);
        UNROLL8 for (int g = 0; g < 8; g++) {
            const int h = g / 4, j = g % 4;
            __m256i lo = _mm256_loadu_si256((const __m256i *)(w + 64 * h + 32 * (j % 2)));
            lo = _mm256_and_si256(j / 2 ? _mm256_srli_epi16(lo, 4) : lo, low4);
            __m256i hi = _mm256_and_si256(_mm256_srl_epi16(_mm256_loadu_si256((const __m256i *)(w + 128 + 32 * h)),
                                                           _mm_cvtsi32_si128(2 * j)), three);
            __m256i c = _mm256_sub_epi8(_mm256_or_si256(lo, _mm256_slli_epi16(hi, 4)), off);
            put_group(k, 8 * s + g, c, d * (float)sc[2 * g], d * (float)sc[2 * g + 1], 0.0f, 0.0f);
        }
    }
}

/* Q3_K, 110 bytes per 256 values: d sc q, a signed 6-bit scale per 16 values, codes in
 * -4..3: two bits of qs, minus 4 where the bit in hmask is clear (gguf_dot_q3_k). */
TILE_INLINE void unpack_q3_k(const Sink *k, const unsigned char *w, int nb) {
    const __m256i three = _mm256_set1_epi8(3), four = _mm256_set1_epi8(4);
    for (int s = 0; s < nb / 8; s++, w += 110) {
        const unsigned char *sc = w + 96;
        const float d = _cvtsh_ss(rd_u16(w + 108));
        const __m256i hm = _mm256_loadu_si256((const __m256i *)w);
        UNROLL8 for (int g = 0; g < 8; g++) {
            const int h = g / 4, j = g % 4;
            __m256i lo = _mm256_and_si256(_mm256_srl_epi16(_mm256_loadu_si256((const __m256i *)(w + 32 + 32 * h)),
                                                           _mm_cvtsi32_si128(2 * j)), three);
            __m256i c = _mm256_sub_epi8(_mm256_or_si256(lo, _mm256_slli_epi16(bit_k(hm, 4 * h + j), 2)), four);
            float s01[2];
            for (int i = 0; i < 2; i++) {
                int e = 2 * g + i; /* the group's scale of values 16i .. */
                int scale = (((sc[e % 8] >> (4 * (e / 8))) & 0x0f) | ((sc[8 + e % 4] >> (2 * (e / 4))) & 0x03) << 4) - 32;
                s01[i] = d * (float)scale;
            }
            put_group(k, 8 * s + g, c, s01[0], s01[1], 0.0f, 0.0f);
        }
    }
}

/* Q2_K, 84 bytes per 256 values: (d sc) q - (dmin m), a 4-bit scale sc and min m per 16
 * values (scales[16], then qs[64]: group g takes bits 2 (g % 4) of qs[32 (g / 4) ..]) */
TILE_INLINE void unpack_q2_k(const Sink *k, const unsigned char *w, int nb) {
    const __m256i three = _mm256_set1_epi8(3);
    for (int s = 0; s < nb / 8; s++, w += 84) {
        const float d = _cvtsh_ss(rd_u16(w + 80)), dmin = _cvtsh_ss(rd_u16(w + 82));
        UNROLL8 for (int g = 0; g < 8; g++) {
            __m256i c = _mm256_and_si256(_mm256_srl_epi16(_mm256_loadu_si256((const __m256i *)(w + 16 + 32 * (g / 4))),
                                                          _mm_cvtsi32_si128(2 * (g % 4))), three);
            put_group(k, 8 * s + g, c, d * (float)(w[2 * g] & 0x0f), d * (float)(w[2 * g + 1] & 0x0f), dmin * (float)(w[2 * g] >> 4),
                      dmin * (float)(w[2 * g + 1] >> 4));
        }
    }
}

/* IQ4_XS, 136 bytes per 256 values: d (ls - 32) kvalues[q], a 6-bit scale ls per 32 values */
TILE_INLINE void unpack_iq4_xs(const Sink *k, const unsigned char *w, int nb) {
    const __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)gguf_kvalues_iq4nl));
    for (int s = 0; s < nb / 8; s++, w += 136) {
        const float d = _cvtsh_ss(rd_u16(w));
        const unsigned scales_h = rd_u16(w + 2);
        UNROLL8 for (int g = 0; g < 8; g++) {
            int ls = (((w[4 + g / 2] >> (4 * (g % 2))) & 0x0f) | (int)((scales_h >> (2 * g)) & 0x03) << 4) - 32;
            __m256i c = _mm256_shuffle_epi8(table, nibbles32(w + 8 + 16 * g));
            put_group(k, 8 * s + g, c, d * (float)ls, d * (float)ls, 0.0f, 0.0f);
        }
    }
}

/* Whether ggml type `type` has an unpacker here, and whether its groups have mins */
static int ggml_kernel(int dtype) {
    switch (dtype - DT_GGML) {
    case 2: case 3: case 6: case 7: case 8: case 10: case 11: case 12: case 13: case 14: case 20: case 23: return 1;
    default: return 0;
    }
}

static int ggml_has_min(int dtype) {
    int t = dtype - DT_GGML;
    return t == 3 || t == 7 || t == 10 || t == 12 || t == 13;
}

/* (The types with mins are those whose codes are unsigned.) */
static int ggml_unsigned_codes(int dtype) { return ggml_has_min(dtype); }

/* A row of W's blocks (cols values) into k's sink. (Each case its own copy of the
 * unpacker, the type a constant in it.) */
TILE_INLINE void ggml_unpack(const Sink *k, const unsigned char *w, int dtype, int cols) {
    const int nb = cols / QK;
    switch (dtype - DT_GGML) {
    case 12: unpack_k4(k, w, 0, nb); break;
    case 13: unpack_k4(k, w, 1, nb); break;
    case 14: unpack_q6_k(k, w, nb); break;
    case 11: unpack_q3_k(k, w, nb); break;
    case 10: unpack_q2_k(k, w, nb); break;
    case 23: unpack_iq4_xs(k, w, nb); break;
    case 8: unpack_legacy(k, w, 8, nb); break;
    case 2: unpack_legacy(k, w, 2, nb); break;
    case 20: unpack_legacy(k, w, 20, nb); break;
    case 6: unpack_legacy(k, w, 6, nb); break;
    case 3: unpack_legacy(k, w, 3, nb); break;
    default: unpack_legacy(k, w, 7, nb); break;
    }
}

/* A row unpacked into u */
static void ggml_unpack_row(const Unpacked *u, const unsigned char *w, int dtype, int cols) {
    const Sink k = {u, NULL, NULL, NULL, 0, 0, 0};
    ggml_unpack(&k, w, dtype, cols);
}

/* Decode: a row times token 0 of a's x, each group met as it is unpacked. One function per
 * type (the type a constant in each), as the compiler unrolls and schedules a small loop
 * better than one that holds every type. */
TILE_INLINE float ggml_dot1(const unsigned char *w, int dtype, int cols, const Activations *a) {
    RowSums s = {{_mm256_setzero_ps(), _mm256_setzero_ps()}, _mm256_setzero_ps()};
    float m[16];
    const Sink k = {NULL, &s, m, a, cols / QK, ggml_has_min(dtype), ggml_unsigned_codes(dtype)};
    ggml_unpack(&k, w, dtype, cols);
    return row_sums_total(&s);
}

typedef float (*GGMLDot1)(const unsigned char *w, int cols, const Activations *a);
static float dot1_q4_0(const unsigned char *w, int cols, const Activations *a) { return ggml_dot1(w, DT_GGML + 2, cols, a); }
static float dot1_q4_1(const unsigned char *w, int cols, const Activations *a) { return ggml_dot1(w, DT_GGML + 3, cols, a); }
static float dot1_q5_0(const unsigned char *w, int cols, const Activations *a) { return ggml_dot1(w, DT_GGML + 6, cols, a); }
static float dot1_q5_1(const unsigned char *w, int cols, const Activations *a) { return ggml_dot1(w, DT_GGML + 7, cols, a); }
static float dot1_q8_0(const unsigned char *w, int cols, const Activations *a) { return ggml_dot1(w, DT_GGML + 8, cols, a); }
static float dot1_q2_k(const unsigned char *w, int cols, const Activations *a) { return ggml_dot1(w, DT_GGML + 10, cols, a); }
static float dot1_q3_k(const unsigned char *w, int cols, const Activations *a) { return ggml_dot1(w, DT_GGML + 11, cols, a); }
static float dot1_q4_k(const unsigned char *w, int cols, const Activations *a) { return ggml_dot1(w, DT_GGML + 12, cols, a); }
static float dot1_q5_k(const unsigned char *w, int cols, const Activations *a) { return ggml_dot1(w, DT_GGML + 13, cols, a); }
static float dot1_q6_k(const unsigned char *w, int cols, const Activations *a) { return ggml_dot1(w, DT_GGML + 14, cols, a); }
static float dot1_iq4_nl(const unsigned char *w, int cols, const Activations *a) { return ggml_dot1(w, DT_GGML + 20, cols, a); }
static float dot1_iq4_xs(const unsigned char *w, int cols, const Activations *a) { return ggml_dot1(w, DT_GGML + 23, cols, a); }

static GGMLDot1 ggml_dot1_of(int dtype) {
    switch (dtype - DT_GGML) {
    case 2: return dot1_q4_0;
    case 3: return dot1_q4_1;
    case 6: return dot1_q5_0;
    case 7: return dot1_q5_1;
    case 8: return dot1_q8_0;
    case 10: return dot1_q2_k;
    case 11: return dot1_q3_k;
    case 12: return dot1_q4_k;
    case 13: return dot1_q5_k;
    case 14: return dot1_q6_k;
    case 20: return dot1_iq4_nl;
    default: return dot1_iq4_xs;
    }
}

/* An unpacked row times NT tokens of x (t0 ..): out[t * ostride]. Each group is loaded
 * once for all NT tokens, and each token's sums are added in decode's order (ggml_dot1). */
TILE_INLINE void ggml_tile(float *out, int ostride, const Unpacked *u, int nb, int has_min, int unsigned_codes,
                           const Activations *a, int t0, const int NT) {
    RowSums s[4];
    UNROLL for (int t = 0; t < NT; t++) s[t] = (RowSums){{_mm256_setzero_ps(), _mm256_setzero_ps()}, _mm256_setzero_ps()};
    for (int b = 0; b < nb; b++) {
        const __m256i c = _mm256_loadu_si256((const __m256i *)(u->c + QK * b));
        const float s0 = u->scale[2 * b], s1 = u->scale[2 * b + 1];
        UNROLL for (int t = 0; t < NT; t++) group_times_x(&s[t], c, s0, s1, unsigned_codes, a, t0 + t, b, nb);
    }
    if (has_min)
        for (int b = 0; b < nb; b += 4) /* as put_group: 4 groups' mins a time */
            UNROLL for (int t = 0; t < NT; t++) mins_times_x(&s[t], u->min + 2 * b, 2 * (nb - b < 4 ? nb - b : 4), a, t0 + t, 2 * b, nb);
    UNROLL for (int t = 0; t < NT; t++) out[(size_t)t * ostride] = row_sums_total(&s[t]);
}

/* Rows r0 .. r0 + nr - 1 of a GGUF block matrix against all n tokens. Decode meets each
 * group as it decodes it; a prompt unpacks each row once into the thread's slot and meets
 * it with the tokens 4 at a time. */
static void matmul_rows_ggml(float *out, int n, const Matrix *W, const Activations *a, int r0, int nr) {
    const int cols = W->cols, nb = cols / QK, has_min = ggml_has_min(W->dtype), uc = ggml_unsigned_codes(W->dtype);
    const size_t rb = row_bytes(W->dtype, cols);
    const unsigned char *w = (const unsigned char *)W->data + (size_t)r0 * rb;
    if (n == 1) {
        const GGMLDot1 dot = ggml_dot1_of(W->dtype);
        for (int r = r0; r < r0 + nr; r++, w += rb) out[r] = dot(w, cols, a);
        return;
    }
    const Unpacked u = unpacked_at(a->unpack + (a->unpack_slots > 1 ? (size_t)THREAD_NUM() * a->unpack_bytes : 0), nb);
    for (int r = r0; r < r0 + nr; r++, w += rb) {
        ggml_unpack_row(&u, w, W->dtype, cols);
        int t = 0;
        for (; t + 4 <= n; t += 4) ggml_tile(out + (size_t)t * W->rows + r, W->rows, &u, nb, has_min, uc, a, t, 4);
        for (; t < n; t++) ggml_tile(out + (size_t)t * W->rows + r, W->rows, &u, nb, has_min, uc, a, t, 1);
    }
}

/* x is prepared for the tiles in pieces of PIECE columns (a q4_0 AVX-512 group of 8
 * blocks), which the threads share out in a prompt: one token is 5 pieces in a 1152-wide
 * matmul, 27 in a 6912-wide one. */
#define PIECE 256

/* Columns piece * PIECE .. of token t (of a matmul of n tokens) of x as the tiles of
 * `level` (1 AVX2, 2 AVX-512) want them: int8 blocks for the quantized types (and for
 * AVX-512 q4_0 outside rows16 their reordering), for bf16 rounded to bf16 (AVX512_BF16)
 * or in even/odd order. f32 takes x as it is. */
static void prepare_piece(Activations *a, const float *x, int t, int n, int piece, const Matrix *W, int level) {
    const int cols = W->cols, dtype = W->dtype, nb = cols / QK;
    const int j0 = piece * PIECE, len = cols - j0 < PIECE ? cols - j0 : PIECE; /* len % 32 == 0 */
    const size_t at = (size_t)t * cols + j0, block = (size_t)t * nb + j0 / QK;
    (void)n; /* (only AVX-512's q4_0 asks: rows16_on) */
    if (dtype == DT_BF16) {
#ifdef GEMMA3_BF16_DOT
        if (level == 2) {
            bf16_round_x(a->xbf + at, x + at, len);
            return;
        }
#endif
        bf16_permute_x(a->xperm + at, x + at, len, level == 2 ? 16 : 8);
        return;
    }
#ifdef GEMMA3_AVX512
    if (level == 2) {
        quantize_activations512(a->xq + at, a->xq_scale + block, a->xq_sum + block, x + at, len);
        if (dtype == DT_Q4_0 && !rows16_on(a, n, DT_Q4_0)) /* (rows16 reads xq as it is) */
            q4_0_reorder512(a->xq_perm + (size_t)t * Q4_GROUPS(nb) * Q4_GROUP_BYTES, a->xq + (size_t)t * cols, nb,
                            piece, piece + 1);
    } else
#endif
        quantize_activations(a->xq + at, a->xq_scale + block, a->xq_sum + block, x + at, len);
    if (dtype >= DT_GGML) { /* (the same bytes as the plain loops' xr: xq is) */
        quantize_residual(a->xr + at, a->xr_scale + block, a->xr_sum + block, x + at, a->xq + at, a->xq_scale + block, len);
        for (size_t b = block; b < block + (size_t)len / QK; b++)
            for (int h = 0; h < 2; h++) {
                const size_t v = (b - block) * QK + 16 * h; /* the half's first value in the piece */
                int32_t sq = 0, sr = 0;
                for (int i = 0; i < 16; i++) sq += a->xq[at + v + i], sr += a->xr[at + v + i];
                a->xmin[2 * b + h] = a->xq_scale[b] * (float)sq + a->xr_scale[b] * (float)sr;
            }
    }
}

/* The widest tiles that the build has, ks->level allows and the shape fits: 2 AVX-512
 * (cols % 32 == 0), 1 AVX2 (cols % 16 == 0), 0 none. */
static int tile_level(const Kernels *ks, int cols) {
#ifdef GEMMA3_AVX512
    if (ks->level >= 2 && cols % 32 == 0) return 2;
#endif
    return ks->level >= 1 && cols % 16 == 0 ? 1 : 0;
}

/* Job g of matmul_many: R rows of one of the matrices (first[i] .. first[i + 1] - 1 are
 * matrix i's jobs). Decode's groups of 4 rows go in streams (matmul_streams512). */
static void matmul_job(int g, int n, int R, const int first[], float *const out[], const Matrix *const W[],
                       const float *xin, const Activations *a, int level) {
    int i = 0;
    while (g >= first[i + 1]) i++;
    int gi = g - first[i]; /* the job's number within matrix i */
    int r0 = R * gi, nr = W[i]->rows - r0 < R ? W[i]->rows - r0 : R;
    if (W[i]->dtype >= DT_GGML) {
        matmul_rows_ggml(out[i], n, W[i], a, r0, nr);
        return;
    }
#ifdef GEMMA3_AVX512
    if (level == 2 && n == 1 && gi < W[i]->rows / 4) {
        matmul_streams512(out[i], xin, W[i], a, gi); /* the rest (rows % 4) below */
        return;
    }
    if (level == 2) {
        matmul_rows_avx512(out[i], xin, n, W[i], a, r0, nr);
        return;
    }
#else
    (void)level;
#endif
    matmul_rows_avx2(out[i], xin, n, W[i], a, r0, nr);
}

/* Decode's jobs, shared out so that no thread waits for another at the end of a matmul
 * (under a static split, one thread always finished a few microseconds after the other).
 * (The __atomic builtins are GCC's and clang's, as is this file.)
 * Each thread starts on its static share, as one stream of jobs, claiming a quarter of
 * what is left at a time (at least 8 jobs); a thread done with its own takes half of what
 * another has left from the back. A share is one 64-bit word, claimed from with a
 * compare-and-swap: its next job, its end, and which matmul it belongs to (the epoch: a
 * share not yet set for this matmul is left alone). Each row is still computed by one
 * thread with the same tile, so the results do not depend on who took it. */
#define SHARE_WORD(epoch, lo, hi) ((uint64_t)((epoch) & 0xffffu) << 48 | (uint64_t)(hi) << 24 | (uint64_t)(lo))
#define SHARE_MAX (1 << 24) /* jobs a share can count */

/* Jobs *lo .. *hi - 1 of N: this thread's part under a static split (as OpenMP's static
 * schedule splits: the first N % T threads take one job more). */
static void static_share(int N, int *lo, int *hi) {
    int T = TEAM_SIZE(), id = THREAD_NUM(), q = N / T, extra = N % T;
    *lo = id < extra ? (q + 1) * id : q * id + extra;
    *hi = *lo + q + (id < extra);
}

/* How many of `left` jobs the owner of a share claims at a time */
static int owner_claim(int left) { return left / 4 > 8 ? left / 4 : left < 8 ? left : 8; }

/* Claims jobs of a share: from the front (the owner) or the back (a thief). Returns how
 * many (0: none left) and sets *job to the first. */
static int claim_jobs(uint64_t *share, unsigned epoch, int thief, int *job) {
    uint64_t w = __atomic_load_n(share, __ATOMIC_ACQUIRE);
    for (;;) {
        int lo = (int)(w & 0xffffff), hi = (int)(w >> 24 & 0xffffff), left = hi - lo;
        if ((unsigned)(w >> 48) != (epoch & 0xffffu) || left <= 0) return 0;
        int k = thief ? (left + 1) / 2 : owner_claim(left);
        uint64_t next = thief ? SHARE_WORD(epoch, lo, hi - k) : SHARE_WORD(epoch, lo + k, hi);
        if (__atomic_compare_exchange_n(share, &w, next, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            *job = thief ? hi - k : lo;
            return k;
        }
    }
}

/* ------------------------------------------------------------------------- */
/* the seam: what gemma3.c calls                                               */
/* ------------------------------------------------------------------------- */

static void carve_activations(Carve *cv, Activations *a, size_t tokens, size_t widest) {
    a->xq = carve(cv, tokens * widest, 1);
    a->xq_scale = carve(cv, tokens * (widest / 32 + 1), sizeof(float));
    a->xq_sum = carve(cv, tokens * (widest / 32 + 1), sizeof(int32_t));
    a->xperm = carve(cv, tokens * widest, sizeof(float));
    a->xq_perm = carve(cv, tokens * ((widest + 255) / 256 * 320), 1); /* Q4_GROUP_BYTES per 256 */
    a->xr = carve(cv, tokens * widest, 1);
    a->xr_scale = carve(cv, tokens * (widest / 32 + 1), sizeof(float));
    a->xr_sum = carve(cv, tokens * (widest / 32 + 1), sizeof(int32_t));
#ifdef GEMMA3_BF16_DOT
    a->xbf = carve(cv, tokens * widest, sizeof(uint16_t));
#endif
    a->xmin = carve(cv, tokens * (widest / 16 + 2), sizeof(float));
}

/* Lays out the kernels' scratch for max_batch tokens and `threads` threads at mem, which
 * gemma3.c carves from the run state's arena (zeroed); returns its size in bytes. With mem
 * NULL, only the size. unmasked_n: the tokens of kernels_attention_unmasked, in heads of
 * c->head_dim (0: it is not called). */
static size_t kernels_setup(void *mem, const Config *c, int max_batch, int threads, int unmasked_n) {
    size_t widest = (size_t)c->hidden_dim, Q = (size_t)c->n_heads * c->head_dim;
    if (Q > widest) widest = Q;
    if ((size_t)c->dim > widest) widest = (size_t)c->dim;
    Carve cv = {mem, 0};
    Kernels sizes, *k = carve(&cv, 1, sizeof(Kernels));
    if (!k) k = &sizes;
    k->threads = threads;
#ifdef GEMMA3_AVX512
    k->level = 2;
#else
    k->level = 1;
#endif
    k->act_thread = carve(&cv, (size_t)threads, sizeof(Activations));
    k->share = carve(&cv, (size_t)threads * 8, sizeof(uint64_t));
    carve_activations(&cv, &k->act, (size_t)max_batch, widest);
#ifdef GEMMA3_AVX512
    if (max_batch > 1) { /* a slot per thread for a prompt's repacked q8_0 / q4_0 rows */
        k->act.repack_bytes = (Q8_REPACK_BYTES(widest) + 63) / 64 * 64;
        k->act.repack_slots = threads;
        k->act.q8_min_tokens = Q8_MIN_TOKENS;
        k->act.q4_min_tokens = Q4_MIN_TOKENS;
        k->act.repack = carve(&cv, (size_t)threads, k->act.repack_bytes);
    }
#endif
    /* a slot per thread for a GGUF block row, unpacked */
    k->act.unpack_bytes = ggml_unpacked_bytes(widest);
    k->act.unpack_slots = threads;
    k->act.unpack = carve(&cv, (size_t)threads, k->act.unpack_bytes);
    for (int i = 0; i < threads; i++) {
        Activations ignored, *a = k->act_thread ? &k->act_thread[i] : &ignored;
        carve_activations(&cv, a, 1, widest);
        a->unpack_bytes = ggml_unpacked_bytes(widest);
        a->unpack_slots = 1;
        a->unpack = carve(&cv, 1, a->unpack_bytes);
    }
    if (unmasked_n > 0) { /* (hdp: rounded up to AVX-512's vector, enough for AVX2's) */
        const size_t np = ((size_t)unmasked_n + UM_KEYS - 1) / UM_KEYS * UM_KEYS, hd = (size_t)c->head_dim;
        const size_t hdp = (hd + 15) / 16 * 16;
        k->um.n = unmasked_n, k->um.hd = c->head_dim;
        k->um.kt = carve(&cv, np * hd, sizeof(float));
        k->um.v = carve(&cv, np * hdp, sizeof(float));
        k->um.att = carve(&cv, (size_t)threads * UM_QUERIES * (np + 16), sizeof(float));
        k->um.out = carve(&cv, (size_t)threads * UM_QUERIES * hdp, sizeof(float));
    }
    return cv.used;
}

/* The hot loop of the whole program: out[i] = W[i] x for `count` matrices that read the
 * same x (q/k/v; gate/up), with the widest tiles the build has and the shapes allow; 0
 * (nothing done) where none fits. All threads of the team call it: they first prepare x (a
 * prompt's together, decode's each for itself), then split the rows of all the matrices,
 * in jobs of 4 rows (decode, shared out by claim_jobs) or CHUNK_ROWS (a prompt, OpenMP's
 * static schedule), and wait for each other once at the end: once per x, not per matrix. */
#define MATMUL_MANY 3 /* most matrices per call */
static int kernels_matmul(void *kernels, float *const out[], const Matrix *const W[], int count, const float *x, int n) {
    Kernels *ks = kernels;
    if (!ks) return 0;
    const int level = tile_level(ks, W[0]->cols);
    /* A job is R rows of one matrix: a group of 4 in decode, a chunk in a prompt */
    const int R = n > 1 ? CHUNK_ROWS : 4;
    int same = 1, first[MATMUL_MANY + 1] = {0}; /* matrix i has the jobs first[i] .. first[i + 1] - 1 */
    for (int i = 0; i < count; i++) {
        /* GGUF block types with a dot here all read x as int8 blocks alone: they mix (q, k
         * and v of a Q4_K_M file are Q5_0, Q5_0, Q8_0) */
        int ggml = ggml_kernel(W[i]->dtype) && ggml_kernel(W[0]->dtype);
        if (W[i]->dtype >= DT_GGML && !ggml_kernel(W[i]->dtype)) return 0; /* the plain loops */
        same &= (W[i]->dtype == W[0]->dtype || ggml) && W[i]->cols == W[0]->cols;
        first[i + 1] = first[i] + (W[i]->rows + R - 1) / R;
    }
    if (level == 0 || !same) return 0;
    if (W[0]->dtype >= DT_GGML && !(n == 1 && TEAM_SIZE() <= ks->threads) && TEAM_SIZE() > ks->act.unpack_slots)
        return 0; /* (a team larger than the one the scratch was laid out for) */
    const int pieces = W[0]->dtype == DT_F32 ? 0 : (W[0]->cols + PIECE - 1) / PIECE;
    const int T = TEAM_SIZE(), id = THREAD_NUM(), decode = n == 1 && T <= ks->threads;
    const Activations *a = &ks->act;
    int job, g, lo = 0, hi = 0;
    if (decode) {
        /* Decode: each thread prepares the whole token for itself and starts on its rows
         * without waiting for the other (nor fetching x from the other core's cache). */
        Activations *own = &ks->act_thread[id];
        static_share(first[count], &lo, &hi);
#ifdef GEMMA3_AVX512
        if (level == 2) prefetch_stream_starts(W, first, count, lo);
#endif
        for (int p = 0; p < pieces; p++) prepare_piece(own, x, 0, 1, p, W[0], level);
        a = own;
    } else {
        FOR /* a prompt: x prepared by all the threads */
        for (job = 0; job < n * pieces; job++) prepare_piece(&ks->act, x, job / pieces, n, job % pieces, W[0], level);
    }
    const float *xin = W[0]->dtype == DT_BF16 ? a->xperm : x; /* what the float tiles read */
    if (decode && first[count] < SHARE_MAX) { /* decode's jobs, shared out */
        /* the epoch: each thread counts the matmuls it has run (all run the same ones) */
        const unsigned epoch = (unsigned)++ks->share[8 * id + 1];
        int k = owner_claim(hi - lo); /* the first claim: taken as the share is set */
        __atomic_store_n(&ks->share[8 * id], SHARE_WORD(epoch, lo + k, hi), __ATOMIC_RELEASE);
        for (g = lo; k > 0; k = claim_jobs(&ks->share[8 * id], epoch, 0, &g))
            for (int e = g + k; g < e; g++) matmul_job(g, n, R, first, out, W, xin, a, level);
        for (int v = 1; v < T; v++) /* then the others' last jobs */
            while ((k = claim_jobs(&ks->share[8 * ((id + v) % T)], epoch, 1, &g)) > 0)
                for (int e = g + k; g < e; g++) matmul_job(g, n, R, first, out, W, xin, a, level);
        BARRIER
    } else {
        FOR
        for (g = 0; g < first[count]; g++) matmul_job(g, n, R, first, out, W, xin, a, level);
    }
    return 1;
}

#ifdef GEMMA3_AVX512
/* One attention job with the AVX-512 kernels (hd % 16 == 0), its heads 4, 2 or 1 at a
 * time: their scores, scaled and softmaxed, then the weighted sum of the values, 16 sums
 * in registers (a single head's 256 elements at once, 2 or 4 heads' 64). */
static void attend512(float *out, float *att, size_t ctx, const float *q, const float *kc, const float *vc, int KV,
                      int s0, int n0, int span, int hd, int nh, float scale) {
    const int wide = hd % 64 == 0;
    for (int h = 0, H; h < nh; h += H) {
        H = nh - h >= 4 ? 4 : nh - h >= 2 ? 2 : 1;
        float *a = att + (size_t)h * ctx, *o = out + (size_t)h * hd;
        const float *qh = q + (size_t)h * hd;
        if (H == 4) scores512(a, ctx, qh, kc, KV, s0, n0, span, hd, 4);
        else if (H == 2) scores512(a, ctx, qh, kc, KV, s0, n0, span, hd, 2);
        else scores512(a, ctx, qh, kc, KV, s0, n0, span, hd, 1);
        for (int g = 0; g < H; g++) {
            for (int j = 0; j < span; j++) a[(size_t)g * ctx + j] *= scale;
            softmax(a + (size_t)g * ctx, span);
        }
        if (H == 4 && wide) values512(o, a, ctx, vc, KV, s0, n0, span, hd, 4, 4);
        else if (H == 4) values512(o, a, ctx, vc, KV, s0, n0, span, hd, 4, 1);
        else if (H == 2 && wide) values512(o, a, ctx, vc, KV, s0, n0, span, hd, 2, 4);
        else if (H == 2) values512(o, a, ctx, vc, KV, s0, n0, span, hd, 2, 1);
        else if (hd % 256 == 0) values512(o, a, ctx, vc, KV, s0, n0, span, hd, 1, 16);
        else if (wide) values512(o, a, ctx, vc, KV, s0, n0, span, hd, 1, 4);
        else values512(o, a, ctx, vc, KV, s0, n0, span, hd, 1, 1);
    }
}

#define HAVE_KERNELS_ATTENTION 1
/* One attention job (see attention() in gemma3.c): nh query heads q of one kv head against
 * the span keys and values it sees, which start at ring slot s0 of a ring of len slots.
 * 0 (nothing done) without AVX-512 or where head_dim is not a multiple of 16. */
static int kernels_attention(void *kernels, float *out, float *att, size_t ctx, const float *q, const float *kc,
                             const float *vc, int KV, int s0, int span, int len, int hd, int nh, float scale) {
    const Kernels *ks = kernels;
    if (!ks || ks->level < 2 || hd % 16 != 0) return 0;
    int n0 = span < len - s0 ? span : len - s0; /* slots s0 .. s0 + n0 - 1, then 0 .. */
    attend512(out, att, ctx, q, kc, vc, KV, s0, n0, span, hd, nh, scale);
    return 1;
}
#endif

/* ------------------------------------------------------------------------- */
/* Unmasked attention (the image tower's: every patch to every patch). Per head and block
 * of UM_QUERIES queries: scores = q k^T, softmax, out = P v. Both products run one register
 * tile, c (R x NV vectors) = a (R x K) b (K x NV vectors): each element of a is broadcast to
 * all lanes and meets a row of b, so no sum ever crosses lanes and head_dim need be no
 * multiple of the vector (the tower's 72 is not of 16). b is read row after row: the keys
 * are transposed once per head, into panels of UM_KEYS keys (contiguous: the rows of one
 * long transposed matrix would lie a power of two apart and share a few L1 sets), and the
 * values padded with zeros to a whole number of vectors. */

/* c (R x 8 NV, rows ldc apart) = a (R x K, rows lda apart) times b (K x 8 NV, rows ldb
 * apart), plus c's own values if add. R * NV <= 12, NV <= 3: the sums, NV rows of b and a
 * broadcast fill AVX2's 16 registers. */
TILE_INLINE void tile_broadcast(float *c, size_t ldc, const float *a, size_t lda, const float *b, size_t ldb, int K,
                                int add, const int R, const int NV) {
    __m256 acc[6][3];
    UNROLL8
    for (int r = 0; r < R; r++)
        UNROLL8
        for (int i = 0; i < NV; i++) acc[r][i] = add ? _mm256_loadu_ps(c + r * ldc + 8 * i) : _mm256_setzero_ps();
    for (int k = 0; k < K; k++) {
        __m256 bv[3];
        UNROLL8
        for (int i = 0; i < NV; i++) {
            bv[i] = _mm256_loadu_ps(b + (size_t)k * ldb + 8 * i);
            IN_REGISTER(bv[i]);
        }
        UNROLL8
        for (int r = 0; r < R; r++) {
            __m256 av = _mm256_broadcast_ss(a + (size_t)r * lda + k);
            UNROLL8
            for (int i = 0; i < NV; i++) acc[r][i] = _mm256_fmadd_ps(av, bv[i], acc[r][i]);
        }
    }
    UNROLL8
    for (int r = 0; r < R; r++)
        UNROLL8
        for (int i = 0; i < NV; i++) _mm256_storeu_ps(c + r * ldc + 8 * i, acc[r][i]);
}

#ifdef GEMMA3_AVX512
/* The same with AVX-512: 16 floats a vector, 32 registers, R * NV <= 24, NV <= 5. */
TILE_INLINE void tile512_broadcast(float *c, size_t ldc, const float *a, size_t lda, const float *b, size_t ldb, int K,
                                   int add, const int R, const int NV) {
    __m512 acc[6][5];
    UNROLL8
    for (int r = 0; r < R; r++)
        UNROLL8
        for (int i = 0; i < NV; i++) acc[r][i] = add ? _mm512_loadu_ps(c + r * ldc + 16 * i) : _mm512_setzero_ps();
    for (int k = 0; k < K; k++) {
        __m512 bv[5];
        UNROLL8
        for (int i = 0; i < NV; i++) {
            bv[i] = _mm512_loadu_ps(b + (size_t)k * ldb + 16 * i);
            IN_REGISTER(bv[i]);
        }
        UNROLL8
        for (int r = 0; r < R; r++) {
            __m512 av = _mm512_set1_ps(a[(size_t)r * lda + k]);
            UNROLL8
            for (int i = 0; i < NV; i++) acc[r][i] = _mm512_fmadd_ps(av, bv[i], acc[r][i]);
        }
    }
    UNROLL8
    for (int r = 0; r < R; r++)
        UNROLL8
        for (int i = 0; i < NV; i++) _mm512_storeu_ps(c + r * ldc + 16 * i, acc[r][i]);
}
#endif

/* Head h's keys and values of panel p (keys p * UM_KEYS ..) into the scratch: the keys
 * transposed, the values in rows of hdp; zeros for the keys past n. */
static void um_pack(const Kernels *ks, const float *k, const float *v, int p, int h, int D, int hdp) {
    const int n = ks->um.n, hd = ks->um.hd;
    float *panel = ks->um.kt + (size_t)p * hd * UM_KEYS;
    for (int j = 0; j < UM_KEYS; j++) {
        const int key = p * UM_KEYS + j;
        float *vo = ks->um.v + (size_t)key * hdp;
        if (key >= n) {
            for (int e = 0; e < hd; e++) panel[e * UM_KEYS + j] = 0.0f;
            memset(vo, 0, (size_t)hdp * sizeof(float));
            continue;
        }
        const float *kr = k + (size_t)key * D + (size_t)h * hd, *vr = v + (size_t)key * D + (size_t)h * hd;
        for (int e = 0; e < hd; e++) panel[e * UM_KEYS + j] = kr[e];
        memcpy(vo, vr, (size_t)hd * sizeof(float));
        memset(vo + hd, 0, (size_t)(hdp - hd) * sizeof(float));
    }
}

/* The scores of m <= UM_QUERIES queries (rows of q, D apart) against all np keys, into
 * att (rows lda apart): each panel of keys, from L1, meets the queries 6 at a time. */
static void um_scores(int level, float *att, size_t lda, const float *q, int D, const float *kt, int np, int hd, int m) {
    for (int p = 0; p < np / UM_KEYS; p++) {
        const float *panel = kt + (size_t)p * hd * UM_KEYS;
        float *c = att + (size_t)p * UM_KEYS;
#ifdef GEMMA3_AVX512
        if (level == 2) { /* the panel's 64 keys, 4 vectors */
            int r = 0;
            for (; r + 6 <= m; r += 6) tile512_broadcast(c + r * lda, lda, q + (size_t)r * D, D, panel, UM_KEYS, hd, 0, 6, 4);
            for (; r < m; r++) tile512_broadcast(c + r * lda, lda, q + (size_t)r * D, D, panel, UM_KEYS, hd, 0, 1, 4);
            continue;
        }
#else
        (void)level;
#endif
        for (int x = 0; x < UM_KEYS; x += 16) { /* 16 keys, 2 vectors, at a time */
            int r = 0;
            for (; r + 6 <= m; r += 6) tile_broadcast(c + r * lda + x, lda, q + (size_t)r * D, D, panel + x, UM_KEYS, hd, 0, 6, 2);
            for (; r < m; r++) tile_broadcast(c + r * lda + x, lda, q + (size_t)r * D, D, panel + x, UM_KEYS, hd, 0, 1, 2);
        }
    }
}

/* One tile of um_values: R (4 or 1) rows by nv vectors of the output (1 .. 3; AVX-512 1 .. 5),
 * from the UM_KEYS keys of a panel. */
static void um_values_tile(int level, float *c, int hdp, const float *a, size_t lda, const float *b, int add, int R, int nv) {
#define UM_TILE(tile, R_, NV_) tile(c, hdp, a, lda, b, hdp, UM_KEYS, add, R_, NV_)
#ifdef GEMMA3_AVX512
    if (level == 2) {
        if (R == 4) {
            if (nv == 1) UM_TILE(tile512_broadcast, 4, 1);
            else if (nv == 2) UM_TILE(tile512_broadcast, 4, 2);
            else if (nv == 3) UM_TILE(tile512_broadcast, 4, 3);
            else if (nv == 4) UM_TILE(tile512_broadcast, 4, 4);
            else UM_TILE(tile512_broadcast, 4, 5);
        } else {
            if (nv == 1) UM_TILE(tile512_broadcast, 1, 1);
            else if (nv == 2) UM_TILE(tile512_broadcast, 1, 2);
            else if (nv == 3) UM_TILE(tile512_broadcast, 1, 3);
            else if (nv == 4) UM_TILE(tile512_broadcast, 1, 4);
            else UM_TILE(tile512_broadcast, 1, 5);
        }
        return;
    }
#else
    (void)level;
#endif
    if (R == 4) {
        if (nv == 1) UM_TILE(tile_broadcast, 4, 1);
        else if (nv == 2) UM_TILE(tile_broadcast, 4, 2);
        else UM_TILE(tile_broadcast, 4, 3);
    } else {
        if (nv == 1) UM_TILE(tile_broadcast, 1, 1);
        else if (nv == 2) UM_TILE(tile_broadcast, 1, 2);
        else UM_TILE(tile_broadcast, 1, 3);
    }
#undef UM_TILE
}

/* out (m rows of hdp) = att (m rows, lda apart) times the np values (rows of hdp): each
 * panel's values, from L1, meet the queries 4 at a time, as many vectors of them at once
 * as the registers hold (AVX-512: 5, all 72 values of the tower's heads). */
static void um_values(int level, float *out, int hdp, const float *att, size_t lda, const float *v, int np, int m) {
    const int lanes = level == 2 ? 16 : 8, vectors = hdp / lanes;
    for (int j0 = 0; j0 < np; j0 += UM_KEYS)
        for (int i0 = 0, nv; i0 < vectors; i0 += nv) {
            nv = vectors - i0;
            if (nv > 3) nv = level < 2 ? 3 : nv == 5 ? 5 : 4;
            for (int r = 0, R; r < m; r += R) {
                R = m - r >= 4 ? 4 : 1;
                um_values_tile(level, out + (size_t)r * hdp + lanes * i0, hdp, att + (size_t)r * lda + j0, lda,
                               v + (size_t)j0 * hdp + lanes * i0, j0 > 0, R, nv);
            }
        }
}

/* Row a of n scores into exp(scale a - max) (exp_vec, as softmax), zeros after them up to np
 * (the padding keys weigh nothing); returns 1 / their sum, by which the row's output is
 * multiplied then: softmax's division, once per output element, not once per key. The
 * loops are plain C, in 16 lanes that the compiler vectorises. */
static float um_exp_row(float *a, int n, int np, float scale) {
    float top[16], part[16] = {0}, max = -INFINITY, sum = 0.0f;
    int j = 0;
    for (int k = 0; k < 16; k++) top[k] = -INFINITY;
    for (; j + 16 <= n; j += 16)
        for (int k = 0; k < 16; k++) {
            a[j + k] *= scale;
            top[k] = a[j + k] > top[k] ? a[j + k] : top[k];
        }
    for (; j < n; j++) {
        a[j] *= scale;
        max = a[j] > max ? a[j] : max;
    }
    for (int k = 0; k < 16; k++) max = top[k] > max ? top[k] : max;
    for (j = 0; j + 16 <= n; j += 16)
        for (int k = 0; k < 16; k++) {
            a[j + k] = exp_vec(a[j + k] - max);
            part[k] += a[j + k];
        }
    for (; j < n; j++) {
        a[j] = exp_vec(a[j] - max);
        sum += a[j];
    }
    for (int k = 0; k < 16; k++) sum += part[k];
    memset(a + n, 0, (size_t)(np - n) * sizeof(float));
    return 1.0f / sum;
}

#define HAVE_KERNELS_ATTENTION_UNMASKED 1
/* out = softmax(q k^T scale) v per head of hd, every one of the n queries against every
 * key (rows of D = heads * hd values). All threads of the team call it; they pack each
 * head together, then share its blocks of queries. Each score and output element is the
 * same sum, in another order, as in the plain loops. 0 (nothing done) for a shape
 * kernels_setup did not lay out. */
static int kernels_attention_unmasked(void *kernels, float *out, const float *q, const float *k, const float *v, int n,
                                      int D, int hd, float scale) {
    const Kernels *ks = kernels;
    if (!ks || ks->level < 1 || ks->um.n != n || ks->um.hd != hd) return 0;
    const int level = ks->level, lanes = level == 2 ? 16 : 8, hdp = (hd + lanes - 1) / lanes * lanes;
    const int np = (n + UM_KEYS - 1) / UM_KEYS * UM_KEYS, blocks = (n + UM_QUERIES - 1) / UM_QUERIES;
    const size_t lda = (size_t)np + 16; /* (rows not a power of two apart: see above) */
    for (int h = 0; h < D / hd; h++) {
        int p, b;
        FOR
        for (p = 0; p < np / UM_KEYS; p++) um_pack(ks, k, v, p, h, D, hdp);
        FOR
        for (b = 0; b < blocks; b++) {
            const int i0 = b * UM_QUERIES, m = n - i0 < UM_QUERIES ? n - i0 : UM_QUERIES;
            float *att = ks->um.att + (size_t)THREAD_NUM() * UM_QUERIES * lda;
            float *o = ks->um.out + (size_t)THREAD_NUM() * UM_QUERIES * hdp, inv_sum[UM_QUERIES];
            um_scores(level, att, lda, q + (size_t)i0 * D + (size_t)h * hd, D, ks->um.kt, np, hd, m);
            for (int r = 0; r < m; r++) inv_sum[r] = um_exp_row(att + (size_t)r * lda, n, np, scale);
            um_values(level, o, hdp, att, lda, ks->um.v, np, m);
            for (int r = 0; r < m; r++) {
                float *dst = out + (size_t)(i0 + r) * D + (size_t)h * hd;
                for (int e = 0; e < hd; e++) dst[e] = o[(size_t)r * hdp + e] * inv_sum[r];
            }
        }
    }
    return 1;
}
