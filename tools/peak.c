/* peak: the arithmetic peak of this machine for the instructions gemma3's matmul tiles use.
 *
 * Prefill is bound by arithmetic, not memory (each weight meets many tokens), so its speed
 * is judged against what the cores can multiply and add. For each kind of multiply-add the
 * CPU has, every thread (OMP_NUM_THREADS, default all cores) runs a loop of independent
 * instructions of that kind on registers only (enough separate accumulators to cover the
 * instruction's latency on every pipe), and the best of several timed runs is reported in
 * multiply-adds per second: one multiply-add is one product added to a sum (an f32 FMA lane,
 * one bf16 pair's product, one u8 x s8 product). The kinds:
 *
 *   f32 fma avx512    vfmadd231ps zmm: 16 multiply-adds
 *   f32 fma avx2      vfmadd231ps ymm: 8
 *   bf16 avx512       vdpbf16ps zmm (AVX512_BF16): 32 (16 lanes x a pair)
 *   int8 avx512vnni   vpdpbusd zmm (AVX512_VNNI): 64 (16 lanes x 4 bytes)
 *   int8 avxvnni      vpdpbusd ymm (AVX-VNNI, VEX): 32
 *   int8 avx2         vpmaddubsw + vpmaddwd (by ones) + vpaddd ymm, the AVX2 way to the
 *                     same int32 sums: 32 per three instructions
 *
 * The CPU is asked at run time (cpuid and xgetbv: the instructions, and the OS saving their
 * registers), and each loop is compiled for its own instructions (target attributes), so one
 * binary built without -march runs anywhere and measures what the machine has. Kinds the CPU
 * lacks are not printed. x86-64 with GCC or clang only; elsewhere it says so and exits 1.
 *
 *     cc -O2 -fopenmp -o peak tools/peak.c       (as `make tools/peak` and tools/bench.sh build it)
 *     ./peak [seconds]           (default 0.2 s per timed run, 5 runs of each kind)
 *
 * Output, one line per kind on stdout, which tools/bench.sh parses:
 *     peak: f32 fma avx512: 147.20 G multiply-adds/s (2 threads)
 */
#define _POSIX_C_SOURCE 200112L
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#include <immintrin.h>

#define ITERS 4096 /* loop trips between looks at the clock */

/* What the CPU and the OS offer. */
typedef struct {
    int avx2, fma, avx512, avx512vnni, avx512bf16, avxvnni;
} Isa;

static unsigned long long xgetbv0(void) {
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return (unsigned long long)hi << 32 | lo;
}

static Isa detect(void) {
    Isa isa = {0, 0, 0, 0, 0, 0};
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c >> 27 & 1)) return isa; /* no OSXSAVE: no AVX at all */
    unsigned long long xcr0 = xgetbv0();
    int ymm = (xcr0 & 0x6) == 0x6, zmm = ymm && (xcr0 & 0xe0) == 0xe0; /* the OS saves these registers */
    int fma = c >> 12 & 1;
    if (!ymm || __get_cpuid_max(0, NULL) < 7) return isa;
    __cpuid_count(7, 0, a, b, c, d);
    isa.avx2 = b >> 5 & 1;
    isa.fma = fma && isa.avx2;
    isa.avx512 = zmm && (b >> 16 & 1) && (b >> 30 & 1); /* F and BW */
    isa.avx512vnni = isa.avx512 && (c >> 11 & 1);
    unsigned max_sub = a;
    if (max_sub >= 1) {
        __cpuid_count(7, 1, a, b, c, d);
        isa.avxvnni = isa.avx2 && (a >> 4 & 1);
        isa.avx512bf16 = isa.avx512 && (a >> 5 & 1);
    }
    return isa;
}

/* Each loop: N = 12 accumulators, each updated once per trip, so 12 instructions in flight:
 * enough for a 4-cycle latency on two pipes with room to spare. They are 12 variables, not
 * an array, which gcc kept on the stack (a load and a store around every instruction).
 * Returns something of the sums, so that the compiler keeps the work. */
#define N 12
#define EACH(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)

/* A loop named NAME for the target TARGET: accumulators of type VT set by INIT(i), then
 * `trips` times STEP(acc) on each, then SUM(acc) of each added up. */
#define PEAK_LOOP(NAME, TARGET, VT, INIT, STEP, SUM)                                                               \
    __attribute__((target(TARGET))) static double NAME(long trips) {                                               \
        EACH(DECLARE)                                                                                              \
        for (long t = 0; t < trips; t++) {                                                                         \
            EACH(UPDATE)                                                                                           \
        }                                                                                                          \
        double s = 0;                                                                                              \
        EACH(ADD)                                                                                                  \
        return s;                                                                                                  \
    }
#define DECLARE(i) VT acc##i = INIT(i);
#define UPDATE(i) acc##i = STEP(acc##i);
#define ADD(i) s += SUM(acc##i);

/* f32: acc = acc * a + b, a = 0.999999 and b = 1e-7 (no overflow, no denormals) */
#define VT __m512
#define INIT(i) _mm512_set1_ps((float)(i))
#define STEP(x) _mm512_fmadd_ps(x, _mm512_set1_ps(0.999999f), _mm512_set1_ps(1e-7f))
#define SUM(x) _mm512_reduce_add_ps(x)
PEAK_LOOP(loop_f32_avx512, "avx512f,fma", VT, INIT, STEP, SUM)
#undef VT
#undef INIT
#undef STEP
#undef SUM

#define VT __m256
#define INIT(i) _mm256_set1_ps((float)(i))
#define STEP(x) _mm256_fmadd_ps(x, _mm256_set1_ps(0.999999f), _mm256_set1_ps(1e-7f))
#define SUM(x) _mm_cvtss_f32(_mm256_castps256_ps128(x))
PEAK_LOOP(loop_f32_avx2, "avx2,fma", VT, INIT, STEP, SUM)
#undef VT
#undef INIT
#undef STEP
#undef SUM

/* bf16: pairs of 1.0 and 1e-7 (bf16 0x3f80 and 0x33d6) */
#define VT __m512
#define INIT(i) _mm512_set1_ps((float)(i))
#define STEP(x) _mm512_dpbf16_ps(x, (__m512bh)_mm512_set1_epi32(0x3f803f80), (__m512bh)_mm512_set1_epi32(0x33d633d6))
#define SUM(x) _mm512_reduce_add_ps(x)
PEAK_LOOP(loop_bf16_avx512, "avx512f,avx512bf16", VT, INIT, STEP, SUM)
#undef VT
#undef INIT
#undef STEP
#undef SUM

/* int8: u8 3 times s8 -5, the int32 sums wrap harmlessly */
#define VT __m512i
#define INIT(i) _mm512_set1_epi32(i)
#define STEP(x) _mm512_dpbusd_epi32(x, _mm512_set1_epi8(3), _mm512_set1_epi8(-5))
#define SUM(x) _mm512_reduce_add_epi32(x)
PEAK_LOOP(loop_int8_avx512vnni, "avx512f,avx512bw,avx512vnni", VT, INIT, STEP, SUM)
#undef VT
#undef INIT
#undef STEP
#undef SUM

#define VT __m256i
#define INIT(i) _mm256_set1_epi32((int)trips + (i)) /* from a variable: gcc kept constants on the stack */
#define STEP(x) _mm256_dpbusd_avx_epi32(x, _mm256_set1_epi8(3), _mm256_set1_epi8(-5))
#define SUM(x) _mm256_movemask_epi8(x) /* any use of the sums will do; the first lane kept them on the stack */
PEAK_LOOP(loop_int8_avxvnni, "avx2,avxvnni", VT, INIT, STEP, SUM)
#undef STEP

/* AVX2: the accumulator's own bytes are the u8 side, or the compiler would compute the
 * products once outside the loop (they would not depend on the trip) */
#define STEP(x) _mm256_add_epi32(x, _mm256_madd_epi16(_mm256_maddubs_epi16(x, _mm256_set1_epi8(-5)), _mm256_set1_epi16(1)))
PEAK_LOOP(loop_int8_avx2, "avx2", VT, INIT, STEP, SUM)
#undef VT
#undef INIT
#undef STEP
#undef SUM

typedef struct {
    const char *name;
    double (*loop)(long);
    int macs; /* multiply-adds per accumulator update */
    int present;
} Kind;

static volatile double sink; /* where the loops' results go */

/* Multiply-adds per second of all the threads running `loop`: the best of `runs` runs of
 * about `seconds` each (the trips per run fixed beforehand from a short calibration). */
static double measure(const Kind *k, double seconds, int runs, int *threads) {
    long trips = ITERS;
    for (;;) { /* calibrate on one thread: trips for ~seconds */
        double t0 = now_seconds();
        sink = k->loop(trips);
        double dt = now_seconds() - t0;
        if (dt > seconds / 8 || trips > (1L << 40)) {
            trips = (long)(trips * (seconds / (dt > 1e-9 ? dt : 1e-9)));
            break;
        }
        trips *= 4;
    }
    if (trips < 1) trips = 1;
    double best = 0;
    for (int r = 0; r < runs; r++) {
        int T = 1;
        double t0 = 0, t1 = 0;
#ifdef _OPENMP
#pragma omp parallel
        {
#pragma omp single
            T = omp_get_num_threads();
#pragma omp barrier
#pragma omp master
            t0 = now_seconds();
            double s = k->loop(trips);
#pragma omp atomic
            sink += s;
#pragma omp barrier
#pragma omp master
            t1 = now_seconds();
        }
#else
        t0 = now_seconds();
        sink += k->loop(trips);
        t1 = now_seconds();
#endif
        double rate = (double)trips * N * k->macs * T / (t1 - t0);
        if (rate > best) best = rate;
        *threads = T;
    }
    return best;
}

int main(int argc, char **argv) {
    double seconds = argc > 1 ? atof(argv[1]) : 0.2;
    if (argc > 2 || !(seconds > 0 && seconds < 100)) {
        fprintf(stderr, "usage: peak [seconds per run, 0-100]\n");
        return 2;
    }
    Isa isa = detect();
    Kind kinds[] = {
        {"f32 fma avx512", loop_f32_avx512, 16, isa.avx512 && isa.fma},
        {"f32 fma avx2", loop_f32_avx2, 8, isa.fma},
        {"bf16 avx512", loop_bf16_avx512, 32, isa.avx512bf16},
        {"int8 avx512vnni", loop_int8_avx512vnni, 64, isa.avx512vnni},
        {"int8 avxvnni", loop_int8_avxvnni, 32, isa.avxvnni},
        {"int8 avx2", loop_int8_avx2, 32, isa.avx2},
    };
    int any = 0;
    for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; i++) {
        if (!kinds[i].present) continue;
        int threads = 1;
        double rate = measure(&kinds[i], seconds, 5, &threads);
        printf("peak: %s: %.2f G multiply-adds/s (%d thread%s)\n", kinds[i].name, rate / 1e9, threads,
               threads == 1 ? "" : "s");
        fflush(stdout);
        any = 1;
    }
    if (!any) {
        fprintf(stderr, "peak: this CPU has none of AVX2, FMA, AVX-512 (or the OS does not enable them)\n");
        return 1;
    }
    return 0;
}
#else
int main(void) {
    (void)now_seconds;
    fprintf(stderr, "peak: measures x86 vector instructions only (x86-64, GCC or clang)\n");
    return 1;
}
#endif
