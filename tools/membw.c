/* membw: memory read bandwidth the way gemma3 decode uses memory.
 *
 * Decode reads every weight byte once per token, as long sequential streams split
 * across all threads (one OpenMP `parallel for` over matrix rows), and the weights are
 * far bigger than any cache. So: fill a large float array (default 1 GiB), then sum it
 * with all threads (OMP_NUM_THREADS, default all cores) a number of times, and report
 * the best and median read bandwidth in GB/s (1e9 bytes per second, like file sizes).
 *
 * The figure is the limit that bench.sh holds decode to, so it has to be the most this
 * machine reads, not what one access pattern gets. Two patterns take turns, repetition
 * by repetition (the shared machine's speed moves within seconds, so both see the same
 * moments), and the one with the better best is reported:
 *   1 stream   each thread sums its block front to back;
 *   4 streams  each thread sums the four quarters of its block side by side. More
 *              streams keep more reads in flight: on this project's machine (AMD EPYC,
 *              2 vCPUs) that read up to 10 % faster when the memory ran at ~80 GB/s,
 *              and gemma3's f32 decode streamed faster than a 1-stream probe.
 * On Linux the array asks for 2 MiB pages (madvise), as gemma3 does for its weights.
 *
 *     cc -O3 -march=native -fopenmp -o membw tools/membw.c     (as tools/bench.sh builds it)
 *     ./membw [MiB] [reps]          (defaults: 1024 MiB, 15 repetitions of each pattern)
 *
 * Output, one line on stdout, which tools/bench.sh parses (best and median of the
 * reported pattern first; the other pattern's best / median in the brackets):
 *     membw: 1073.7 MB x 15 reps, 2 threads, 2 MiB pages: best 85.12 GB/s, median 84.01 GB/s (4 streams; 1 stream 80.31 / 79.50)
 *
 * C99 plus POSIX; without OpenMP it still builds and measures one thread.
 */
#define _POSIX_C_SOURCE 200112L
#define _DEFAULT_SOURCE /* glibc: MADV_HUGEPAGE */
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* One stream: 16 independent partial sums. One serial chain of adds would be limited by
 * the add latency (a few GB/s per core), not by memory. The 16 sums are separate
 * variables, not an array, which went through the stack on every step and capped one
 * core near the memory speed itself. Build with the machine's widest vectors: GCC -O2
 * without -march keeps the sums in 4 SSE registers and loads each cache line in four
 * 16-byte pieces, and that read 10-14 % less than an -O3 -march=native build (one 64-byte
 * load a line) with the memory at ~88 GB/s (the same at ~50); presumably more loads per
 * line leave fewer lines in flight. */
static double sum_one_stream(const float *p, long nblocks) {
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0;
    float s8 = 0, s9 = 0, s10 = 0, s11 = 0, s12 = 0, s13 = 0, s14 = 0, s15 = 0;
    for (long b = 0; b < nblocks; b++, p += 16) {
        s0 += p[0]; s1 += p[1]; s2 += p[2]; s3 += p[3];
        s4 += p[4]; s5 += p[5]; s6 += p[6]; s7 += p[7];
        s8 += p[8]; s9 += p[9]; s10 += p[10]; s11 += p[11];
        s12 += p[12]; s13 += p[13]; s14 += p[14]; s15 += p[15];
    }
    return (double)(((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))) +
           (double)(((s8 + s9) + (s10 + s11)) + ((s12 + s13) + (s14 + s15)));
}

/* Four streams: the quarters of the block, 64 bytes of each per step, added pairwise
 * before they reach the same 16 sums (3 adds per element are still far below the memory
 * speed). A remainder of under 4 blocks goes through the one-stream loop. */
static double sum_four_streams(const float *p, long nblocks) {
    long q = nblocks / 4;
    const float *a = p, *b = p + 16 * q, *c = p + 32 * q, *d = p + 48 * q;
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0;
    float s8 = 0, s9 = 0, s10 = 0, s11 = 0, s12 = 0, s13 = 0, s14 = 0, s15 = 0;
#define ADD4(s, i) s += (a[i] + b[i]) + (c[i] + d[i])
    for (long k = 0; k < q; k++, a += 16, b += 16, c += 16, d += 16) {
        ADD4(s0, 0); ADD4(s1, 1); ADD4(s2, 2); ADD4(s3, 3);
        ADD4(s4, 4); ADD4(s5, 5); ADD4(s6, 6); ADD4(s7, 7);
        ADD4(s8, 8); ADD4(s9, 9); ADD4(s10, 10); ADD4(s11, 11);
        ADD4(s12, 12); ADD4(s13, 13); ADD4(s14, 14); ADD4(s15, 15);
    }
#undef ADD4
    return (double)(((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))) +
           (double)(((s8 + s9) + (s10 + s11)) + ((s12 + s13) + (s14 + s15))) +
           sum_one_stream(p + 64 * q, nblocks - 4 * q);
}

/* Each thread sums one contiguous block, the block it wrote at initialisation (first
 * touch puts those pages near it on NUMA hosts), as gemma3's `parallel for` over matrix
 * rows streams one block of rows per thread. */
static double sum_array(const float *arr, long n, int streams) {
    double total = 0.0;
    long nblocks = n / 16;
#ifdef _OPENMP
#pragma omp parallel reduction(+:total)
#endif
    {
        int t = 0, nt = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        long lo = nblocks * t / nt, hi = nblocks * (t + 1) / nt;
        total += streams == 4 ? sum_four_streams(arr + lo * 16, hi - lo) : sum_one_stream(arr + lo * 16, hi - lo);
    }
    for (long i = nblocks * 16; i < n; i++) total += arr[i];
    return total;
}

int main(int argc, char **argv) {
    long mib = argc > 1 ? atol(argv[1]) : 1024;
    int reps = argc > 2 ? atoi(argv[2]) : 15;
    if (mib < 1 || reps < 1 || argc > 3) {
        fprintf(stderr, "usage: membw [MiB (default 1024)] [repetitions (default 15)]\n");
        return 1;
    }
    long n = mib * 1024L * 1024L / (long)sizeof(float), i;
    size_t bytes = (size_t)n * sizeof(float);
    void *mem = NULL;
    const size_t huge = (size_t)2 << 20;
    if (posix_memalign(&mem, huge, (bytes + huge - 1) / huge * huge) != 0) mem = NULL;
    float *a = mem;
    double *gbs[2] = {malloc((size_t)reps * sizeof(double)), malloc((size_t)reps * sizeof(double))};
    if (!a || !gbs[0] || !gbs[1]) {
        fprintf(stderr, "membw: cannot allocate %ld MiB\n", mib);
        return 1;
    }
    const char *pages = "4 KiB pages";
#ifdef MADV_HUGEPAGE
    if (madvise(a, (bytes + huge - 1) / huge * huge, MADV_HUGEPAGE) == 0) pages = "2 MiB pages";
#endif
    /* Write every page first: untouched pages of a fresh allocation all map the one
     * shared zero page, which would stay in cache and give an absurd "bandwidth". */
#ifdef _OPENMP
#pragma omp parallel for schedule(static)
#endif
    for (i = 0; i < n; i++) a[i] = (float)(i & 1023) * 0.001f;

    int threads = 1;
#ifdef _OPENMP
    threads = omp_get_max_threads();
#endif
    double check = sum_array(a, n, 1) + sum_array(a, n, 4); /* warm-up: page tables, thread pool */
    for (int r = 0; r < reps; r++) {
        for (int p = 0; p < 2; p++) {
            double t0 = now_seconds();
            check += sum_array(a, n, p == 0 ? 1 : 4);
            double dt = now_seconds() - t0;
            gbs[p][r] = (double)bytes / (dt > 0 ? dt : 1e-9) / 1e9;
        }
    }
    double best[2], median[2];
    for (int p = 0; p < 2; p++) {
        qsort(gbs[p], (size_t)reps, sizeof(double), cmp_double);
        best[p] = gbs[p][reps - 1];
        median[p] = reps % 2 ? gbs[p][reps / 2] : 0.5 * (gbs[p][reps / 2 - 1] + gbs[p][reps / 2]);
    }
    int top = best[1] > best[0]; /* the pattern reported */
    /* printing the checksum (to stderr) keeps the compiler from dropping the sums */
    fprintf(stderr, "membw: checksum %g\n", check);
    printf("membw: %.1f MB x %d reps, %d threads, %s: best %.2f GB/s, median %.2f GB/s (%s; %s %.2f / %.2f)\n",
           (double)bytes / 1e6, reps, threads, pages, best[top], median[top], top ? "4 streams" : "1 stream",
           top ? "1 stream" : "4 streams", best[!top], median[!top]);
    free(a);
    free(gbs[0]);
    free(gbs[1]);
    return 0;
}
