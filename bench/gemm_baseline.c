/* gemm_baseline.c -- the in-process baseline tpd is measured against: one cblas_sgemm of the
 * whole layer, y[rows, out] = x · Wᵀ + b (bias written first, beta = 1, as a worker does), with
 * all the threads given, in one process, no IPC and no gRPC. Prints the median of the runs. */
#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "timing.h"

int main(int argc, char **argv)
{
    long rows = 64, in = 4096, out = 4096, iters = 50, threads = 1;
    float *x, *w, *b, *y;
    double *t;

    for (int i = 1; i + 1 < argc; i += 2) {
        long v = atol(argv[i + 1]);

        if (strcmp(argv[i], "--rows") == 0)
            rows = v;
        else if (strcmp(argv[i], "--in") == 0)
            in = v;
        else if (strcmp(argv[i], "--out") == 0)
            out = v;
        else if (strcmp(argv[i], "--iters") == 0)
            iters = v;
        else if (strcmp(argv[i], "--threads") == 0)
            threads = v;
        else {
            fprintf(stderr, "usage: gemm_baseline [--rows B] [--in N] [--out M] [--iters K] "
                            "[--threads T]\n");
            return 64;
        }
    }
    if (rows < 1 || in < 1 || out < 1 || iters < 1 || threads < 1) {
        fprintf(stderr, "gemm_baseline: every value must be at least 1\n");
        return 64;
    }
    openblas_set_num_threads((int)threads);
    x = malloc((size_t)(rows * in) * sizeof(float));
    w = malloc((size_t)(out * in) * sizeof(float));
    b = malloc((size_t)out * sizeof(float));
    y = malloc((size_t)(rows * out) * sizeof(float));
    t = malloc((size_t)iters * sizeof(double));
    if (!x || !w || !b || !y || !t) {
        fprintf(stderr, "gemm_baseline: out of memory\n");
        return 1;
    }
    for (long i = 0; i < rows * in; i++)
        x[i] = (float)(i % 7) * 0.1f;
    for (long i = 0; i < out * in; i++)
        w[i] = (float)(i % 5) * 0.01f;
    for (long i = 0; i < out; i++)
        b[i] = 0.5f;
    for (long k = -3; k < iters; k++) { /* 3 warm-up runs */
        double t0 = timing_now_s();

        for (long r = 0; r < rows; r++)
            memcpy(y + r * out, b, (size_t)out * sizeof(float));
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)rows, (int)out, (int)in, 1.0f, x,
                    (int)in, w, (int)in, 1.0f, y, (int)out);
        if (k >= 0)
            t[k] = timing_now_s() - t0;
    }
    timing_sort(t, (size_t)iters);
    printf("gemm_baseline: %ld x %ld -> %ld, %ld threads: median %.3f ms, %.2f GFLOP/s\n", rows, in,
           out, threads, timing_percentile(t, (size_t)iters, 0.5) * 1e3,
           2.0 * (double)rows * (double)in * (double)out /
               timing_percentile(t, (size_t)iters, 0.5) * 1e-9);
    free(x);
    free(w);
    free(b);
    free(y);
    free(t);
    return 0;
}
