/* membw: memory read bandwidth the way gemma3 decode uses memory.
 *
 * Decode reads every weight byte once per token, as long sequential streams split
 * across all threads (one OpenMP `parallel for` over matrix rows), and the weights are
 * far bigger than any cache. So: fill a large float array (default 1 GiB), then sum it
 * with all threads (OMP_NUM_THREADS, default all cores) a number of times, and report
 * the best and median read bandwidth in GB/s (1e9 bytes per second, like file sizes).
 *
 *     cc -O2 -fopenmp -o membw tools/membw.c
 *     ./membw [MiB] [reps]          (defaults: 1024 MiB, 15 repetitions)
 *
 * Output, one line on stdout, which tools/bench.sh parses:
 *     membw: 1073.7 MB x 15 reps, 2 threads: best 45.12 GB/s, median 40.31 GB/s
 *
 * C99; without OpenMP it still builds and measures one thread.
 */
#define _POSIX_C_SOURCE 199309L
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

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Sum with 16 independent partial sums per thread. One serial chain of adds would be
 * limited by the add latency (a few GB/s per core), not by memory. The 16 sums are
 * separate variables, not an array: GCC -O2 then keeps them in 4 SIMD registers
 * (about 100 GB/s per core from L1, far above memory), while an acc[] array went
 * through the stack on every step and capped one core near the memory speed itself.
 * Each thread sums one contiguous block, the block it wrote at initialisation (first
 * touch puts those pages near it on NUMA hosts), as gemma3's `parallel for` over
 * matrix rows streams one block of rows per thread. */
static double sum_block(const float *p, long nblocks) {
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

static double sum_array(const float *a, long n) {
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
        total += sum_block(a + lo * 16, hi - lo);
    }
    for (long i = nblocks * 16; i < n; i++) total += a[i];
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
    float *a = malloc((size_t)n * sizeof(float));
    double *gbs = malloc((size_t)reps * sizeof(double));
    if (!a || !gbs) {
        fprintf(stderr, "membw: cannot allocate %ld MiB\n", mib);
        return 1;
    }
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
    double check = sum_array(a, n); /* warm-up: page tables, thread pool */
    for (int r = 0; r < reps; r++) {
        double t0 = now_seconds();
        check += sum_array(a, n);
        double dt = now_seconds() - t0;
        gbs[r] = (double)n * sizeof(float) / (dt > 0 ? dt : 1e-9) / 1e9;
    }
    qsort(gbs, (size_t)reps, sizeof(double), cmp_double);
    double median = reps % 2 ? gbs[reps / 2] : 0.5 * (gbs[reps / 2 - 1] + gbs[reps / 2]);
    /* printing the checksum (to stderr) keeps the compiler from dropping the sums */
    fprintf(stderr, "membw: checksum %g\n", check);
    printf("membw: %.1f MB x %d reps, %d threads: best %.2f GB/s, median %.2f GB/s\n",
           (double)n * sizeof(float) / 1e6, reps, threads, gbs[reps - 1], median);
    free(a);
    free(gbs);
    return 0;
}
