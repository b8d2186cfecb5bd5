/* gemm_baseline.c -- the compute baseline tpd is measured against: one cblas_sgemm of the whole
 * layer, y[rows, out] = x · Wᵀ + b (bias written first, then beta = 1, as a worker does), in one
 * process with the threads given, with no IPC and no gRPC: what a program that links OpenBLAS
 * gets from the same cores. Runs back to back for --duration seconds or --iters calls after a
 * warm-up, and prints a summary and one machine-readable `gemm-result:` line.
 *
 *   gemm_baseline --rows B --in N --out M [--threads T] [--duration S | --iters K] [--warmup W]
 *
 * OPENBLAS_CORETYPE and the other OPENBLAS_* variables of the environment apply as they do to
 * tpd's workers, which inherit tpd's environment. */
#include <cblas.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "timing.h"

#define MAX_CALLS (1L << 24)

static int usage(void)
{
    fprintf(stderr, "usage: gemm_baseline --rows B --in N --out M [--threads T] "
                    "[--duration S | --iters K] [--warmup W]\n");
    return 64;
}

int main(int argc, char **argv)
{
    long rows = 64, in = 4096, out = 4096, iters = 0, threads = 1, warmup = 2;
    double duration = 0, total = 0, t_start, flop;
    float *x, *w, *b, *y;
    double *t;
    long n = 0;

    for (int i = 1; i < argc; i++) {
        char *end;
        double v;

        if (strcmp(argv[i], "--help") == 0) {
            usage();
            return 0;
        }
        if (i + 1 >= argc)
            return usage();
        errno = 0;
        v = strtod(argv[i + 1], &end);
        if (errno || end == argv[i + 1] || *end || v < 0 || v > 1e9) {
            fprintf(stderr, "gemm_baseline: %s takes a number, got '%s'\n", argv[i], argv[i + 1]);
            return 64;
        }
        if (strcmp(argv[i], "--rows") == 0)
            rows = (long)v;
        else if (strcmp(argv[i], "--in") == 0)
            in = (long)v;
        else if (strcmp(argv[i], "--out") == 0)
            out = (long)v;
        else if (strcmp(argv[i], "--iters") == 0)
            iters = (long)v;
        else if (strcmp(argv[i], "--warmup") == 0)
            warmup = (long)v;
        else if (strcmp(argv[i], "--threads") == 0)
            threads = (long)v;
        else if (strcmp(argv[i], "--duration") == 0)
            duration = v;
        else
            return usage();
        i++;
    }
    if (rows < 1 || in < 1 || out < 1 || threads < 1 || (iters > 0 && duration > 0)) {
        fprintf(stderr, "gemm_baseline: --rows, --in, --out and --threads must be at least 1, "
                        "and --iters and --duration exclude each other\n");
        return 64;
    }
    if (iters == 0 && duration == 0)
        iters = 50;
    openblas_set_num_threads((int)threads);
    x = malloc((size_t)(rows * in) * sizeof(float));
    w = malloc((size_t)(out * in) * sizeof(float));
    b = malloc((size_t)out * sizeof(float));
    y = malloc((size_t)(rows * out) * sizeof(float));
    t = malloc((size_t)(iters ? iters : MAX_CALLS) * sizeof(double));
    if (!x || !w || !b || !y || !t) {
        fprintf(stderr, "gemm_baseline: out of memory\n");
        return 1;
    }
    for (long i = 0; i < rows * in; i++)
        x[i] = (float)(i % 7) * 0.1f - 0.3f;
    for (long i = 0; i < out * in; i++)
        w[i] = (float)(i % 5) * 0.01f - 0.02f;
    for (long i = 0; i < out; i++)
        b[i] = 0.5f;
    t_start = 0;
    for (long k = -warmup;; k++) {
        double t0;

        if (k == 0)
            t_start = timing_now_s();
        if (k >= 0 && (iters ? k >= iters
                             : (timing_now_s() - t_start >= duration && k > 0) || k >= MAX_CALLS))
            break;
        t0 = timing_now_s();
        for (long r = 0; r < rows; r++)
            memcpy(y + r * out, b, (size_t)out * sizeof(float));
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)rows, (int)out, (int)in, 1.0f, x,
                    (int)in, w, (int)in, 1.0f, y, (int)out);
        if (k >= 0)
            t[n++] = timing_now_s() - t0;
    }
    total = timing_now_s() - t_start;
    timing_sort(t, (size_t)n);
    flop = 2.0 * (double)rows * (double)in * (double)out;
    printf("gemm_baseline: %ld x %ld -> %ld, %ld threads, %ld calls in %.3f s: median %.3f ms, "
           "%.1f calls/s, %.2f GFLOP/s\n",
           rows, in, out, threads, n, total, timing_percentile(t, (size_t)n, 0.5) * 1e3,
           (double)n / total, flop * (double)n / total * 1e-9);
    /* the kernel OpenBLAS picked (OPENBLAS_CORETYPE overrides its detection) */
    printf("openblas: %s; core %s\n", openblas_get_config(), openblas_get_corename());
    printf("gemm-result: rows=%ld in=%ld out=%ld threads=%ld calls=%ld seconds=%.9f rps=%.4f "
           "rows_per_s=%.2f gflops=%.6f p50_ms=%.4f p90_ms=%.4f p99_ms=%.4f\n",
           rows, in, out, threads, n, total, (double)n / total, (double)(n * rows) / total,
           flop * (double)n / total * 1e-9, timing_percentile(t, (size_t)n, 0.5) * 1e3,
           timing_percentile(t, (size_t)n, 0.9) * 1e3, timing_percentile(t, (size_t)n, 0.99) * 1e3);
    /* keeps the result alive for the compiler, and proves the GEMM ran */
    if (!(y[0] == y[0])) {
        fprintf(stderr, "gemm_baseline: output is NaN\n");
        return 1;
    }
    free(x);
    free(w);
    free(b);
    free(y);
    free(t);
    return 0;
}
