/* cmd_bench.c -- `tpclient bench`: closed-loop ModelInfer calls of random rows, one at a time,
 * for a number of iterations after a warm-up; prints latency percentiles and throughput. The
 * input and output buffers are allocated once and reused, so the client measures the server and
 * the transport, not its own page faults. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cmd.h"
#include "kserve.h"
#include "timing.h"

int cmd_bench(struct conn *c, int argc, char **argv)
{
    const char *model_opt = NULL;
    long rows = 1, iters = 100, warmup = 5;
    char model[256];
    struct kserve_layout l;
    struct tp_err err = {0};
    float *x = NULL, *y = NULL;
    double *lat = NULL, total = 0;
    int status = EXIT_ERROR;

    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--rows") == 0 && i + 1 < argc)
            rows = atol(argv[++i]);
        else if (strcmp(argv[i], "--iters") == 0 && i + 1 < argc)
            iters = atol(argv[++i]);
        else if (strcmp(argv[i], "--warmup") == 0 && i + 1 < argc)
            warmup = atol(argv[++i]);
        else if (strcmp(argv[i], "--model") == 0 && i + 1 < argc)
            model_opt = argv[++i];
        else {
            cmd_error("bench: unexpected argument '%s' (--rows B --iters N --warmup N --model M)",
                      argv[i]);
            return EXIT_USAGE;
        }
    }
    if (rows < 1 || iters < 1 || warmup < 0) {
        cmd_error("bench: --rows and --iters must be at least 1");
        return EXIT_USAGE;
    }
    if (kserve_model(c, model_opt, model, sizeof(model), &err) < 0)
        goto fail;
    if (kserve_layout(c, model, &l, &err) < 0)
        goto fail;
    x = malloc((size_t)(rows * l.in) * sizeof(float));
    y = malloc((size_t)(rows * l.out) * sizeof(float));
    lat = malloc((size_t)iters * sizeof(double));
    if (!x || !y || !lat) {
        tp_err_set(&err, TP_ENOMEM, "no memory for %ld rows", rows);
        goto fail;
    }
    srand(1);
    for (long i = 0; i < rows * l.in; i++)
        x[i] = (float)rand() / (float)RAND_MAX - 0.5f;
    for (long i = 0; i < warmup + iters; i++) {
        double t0 = timing_now_s();

        if (kserve_infer(c, model, &l, x, rows, y, &err) < 0)
            goto fail;
        if (i >= warmup)
            lat[i - warmup] = timing_now_s() - t0;
    }
    for (long i = 0; i < iters; i++)
        total += lat[i];
    timing_sort(lat, (size_t)iters);
    printf("bench: model %s, %ld x %lld -> %lld, %ld calls after %ld warm-up\n", model, rows,
           (long long)l.in, (long long)l.out, iters, warmup);
    printf("latency ms: p50 %.3f  p90 %.3f  p99 %.3f  mean %.3f\n",
           timing_percentile(lat, (size_t)iters, 0.5) * 1e3,
           timing_percentile(lat, (size_t)iters, 0.9) * 1e3,
           timing_percentile(lat, (size_t)iters, 0.99) * 1e3, total / (double)iters * 1e3);
    printf("throughput: %.1f requests/s, %.0f rows/s, %.2f GFLOP/s\n", (double)iters / total,
           (double)(iters * rows) / total,
           2.0 * (double)rows * (double)l.in * (double)l.out * (double)iters / total * 1e-9);
    status = 0;
    goto out;
fail:
    cmd_error("%s", err.msg);
out:
    free(x);
    free(y);
    free(lat);
    return status;
}
