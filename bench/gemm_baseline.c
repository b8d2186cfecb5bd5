/* gemm_baseline.c -- the compute baseline tpd is measured against: cblas_sgemm of the whole
 * layer, y[rows, out] = x · Wᵀ + b (bias written first, then beta = 1, as a worker does), with
 * no gRPC: what a program that links OpenBLAS gets from the same cores. Runs back to back for
 * --duration seconds or --iters calls after a warm-up, and prints a summary and one
 * machine-readable `gemm-result:` line.
 *
 *   gemm_baseline --rows B --in N --out M [--threads T] [--ranks R] [--duration S | --iters K]
 *                 [--warmup W] [--gemm openblas|invariant]
 *
 * With --ranks 1 (the default) it is one call in this process with T threads. With --ranks R it
 * is tpd's layout without tpd: R forked processes of T threads each compute their column block
 * straight into one shared output (ldc = out), woken by a byte on a pipe and answering with
 * one, so what is left between this and tpd is gRPC, the request path and the copies.
 *
 * --gemm invariant (default openblas) runs tpd's batch-invariant GEMM (lib/gemm.c) instead, W
 * packed once before timing and T threads of a gemm_pool per rank, as tpd's cpu ranks do.
 *
 * OPENBLAS_CORETYPE and the other OPENBLAS_* variables of the environment apply as they do to
 * tpd's workers, which inherit tpd's environment. */
#include <cblas.h>
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "gemm.h"
#include "timing.h"

#define MAX_CALLS (1L << 24)
#define MAX_RANKS 64

struct layer {
    long rows, in, out;
    const float *x, *w, *b; /* [rows, in], [out, in], [out] */
    float *y;               /* [rows, out] */
    int invariant;          /* --gemm invariant */
};

/* The invariant GEMM of one rank: its columns packed, and its threads. */
struct inv {
    struct gemm_weights g;
    struct gemm_pool *pool;
};

static int inv_start(struct inv *v, const struct layer *l, long c0, long n, long threads)
{
    struct tp_err err = {0};

    if (gemm_pack(&v->g, l->w + c0 * l->in, (uint32_t)n, (uint32_t)l->in, (size_t)l->in, &err) <
            0 ||
        gemm_pool_create(&v->pool, (int)threads, &err) < 0) {
        fprintf(stderr, "gemm_baseline: %s\n", err.msg);
        return -1;
    }
    return 0;
}

static void inv_stop(struct inv *v)
{
    gemm_pool_destroy(v->pool);
    gemm_free(&v->g);
}

/* Columns [c0, c0 + n) of y, as a worker of rank c0 / n computes them (v: with the invariant
 * GEMM, already packed for those columns). */
static void compute(const struct layer *l, long c0, long n, struct inv *v)
{
    if (v) {
        gemm_pool_run(v->pool, &v->g, l->x, (size_t)l->in, (uint32_t)l->rows, l->b + c0,
                      l->y + c0, (size_t)l->out);
        return;
    }
    for (long r = 0; r < l->rows; r++)
        memcpy(l->y + r * l->out + c0, l->b + c0, (size_t)n * sizeof(float));
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)l->rows, (int)n, (int)l->in, 1.0f,
                l->x, (int)l->in, l->w + c0 * l->in, (int)l->in, 1.0f, l->y + c0, (int)l->out);
}

static int usage(void)
{
    fprintf(stderr, "usage: gemm_baseline --rows B --in N --out M [--threads T] [--ranks R] "
                    "[--duration S | --iters K] [--warmup W] [--gemm openblas|invariant]\n");
    return 64;
}

/* The R processes of --ranks: go[r] wakes rank r, done[r] says it finished. */
struct ranks {
    int n;
    pid_t pid[MAX_RANKS];
    int go[MAX_RANKS], done[MAX_RANKS];
};

static int ranks_start(struct ranks *k, int n, long threads, const struct layer *l)
{
    k->n = 0;
    for (int r = 0; r < n; r++) {
        int go[2], done[2];
        pid_t pid;

        if (pipe(go) < 0 || pipe(done) < 0) {
            perror("gemm_baseline: pipe");
            return -1;
        }
        pid = fork();
        if (pid < 0) {
            perror("gemm_baseline: fork");
            return -1;
        }
        if (pid == 0) {
            struct inv v = {0};
            char c;

            close(go[1]);
            close(done[0]);
            for (int i = 0; i < k->n; i++) {
                close(k->go[i]);
                close(k->done[i]);
            }
            openblas_set_num_threads(l->invariant ? 1 : (int)threads);
            if (l->invariant && inv_start(&v, l, r * (l->out / n), l->out / n, threads) < 0)
                _exit(1);
            while (read(go[0], &c, 1) == 1) {
                compute(l, r * (l->out / n), l->out / n, l->invariant ? &v : NULL);
                if (write(done[1], &c, 1) != 1)
                    _exit(1);
            }
            _exit(0);
        }
        close(go[0]);
        close(done[1]);
        k->pid[r] = pid;
        k->go[r] = go[1];
        k->done[r] = done[0];
        k->n++;
    }
    return 0;
}

static int ranks_step(struct ranks *k)
{
    char c = 1;

    for (int r = 0; r < k->n; r++)
        if (write(k->go[r], &c, 1) != 1)
            return -1;
    for (int r = 0; r < k->n; r++)
        if (read(k->done[r], &c, 1) != 1)
            return -1;
    return 0;
}

static void ranks_stop(struct ranks *k)
{
    for (int r = 0; r < k->n; r++) {
        close(k->go[r]);
        close(k->done[r]);
    }
    for (int r = 0; r < k->n; r++)
        while (waitpid(k->pid[r], NULL, 0) < 0 && errno == EINTR)
            ;
    k->n = 0;
}

int main(int argc, char **argv)
{
    long rows = 64, in = 4096, out = 4096, iters = 0, threads = 1, warmup = 2, nranks = 1;
    int invariant = 0;
    struct inv ig = {0};
    double duration = 0, total = 0, t_start, flop;
    float *x, *w, *b, *y;
    struct layer l;
    struct ranks k = {0};
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
        if (strcmp(argv[i], "--gemm") == 0) {
            if (strcmp(argv[i + 1], "invariant") != 0 && strcmp(argv[i + 1], "openblas") != 0) {
                fprintf(stderr, "gemm_baseline: --gemm takes openblas or invariant, got '%s'\n",
                        argv[i + 1]);
                return 64;
            }
            invariant = strcmp(argv[++i], "invariant") == 0;
            continue;
        }
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
        else if (strcmp(argv[i], "--ranks") == 0)
            nranks = (long)v;
        else if (strcmp(argv[i], "--duration") == 0)
            duration = v;
        else
            return usage();
        i++;
    }
    if (rows < 1 || in < 1 || out < 1 || threads < 1 || (iters > 0 && duration > 0) || nranks < 1 ||
        nranks > MAX_RANKS || out % nranks) {
        fprintf(stderr,
                "gemm_baseline: --rows, --in, --out and --threads must be at least 1, "
                "--ranks from 1 to %d and a divisor of --out, and --iters and "
                "--duration exclude each other\n",
                MAX_RANKS);
        return 64;
    }
    if (iters == 0 && duration == 0)
        iters = 50;
    x = malloc((size_t)(rows * in) * sizeof(float));
    w = malloc((size_t)(out * in) * sizeof(float));
    b = malloc((size_t)out * sizeof(float));
    /* shared, so that forked ranks write where the parent reads, as in tpd's arena */
    y = mmap(NULL, (size_t)(rows * out) * sizeof(float), PROT_READ | PROT_WRITE,
             MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    t = malloc((size_t)(iters ? iters : MAX_CALLS) * sizeof(double));
    if (!x || !w || !b || y == MAP_FAILED || !t) {
        fprintf(stderr, "gemm_baseline: out of memory\n");
        return 1;
    }
    for (long i = 0; i < rows * in; i++)
        x[i] = (float)(i % 7) * 0.1f - 0.3f;
    for (long i = 0; i < out * in; i++)
        w[i] = (float)(i % 5) * 0.01f - 0.02f;
    for (long i = 0; i < out; i++)
        b[i] = 0.5f;
    memset(y, 0xff, (size_t)(rows * out) * sizeof(float)); /* NaN until computed */
    l = (struct layer){
        .rows = rows, .in = in, .out = out, .x = x, .w = w, .b = b, .y = y, .invariant = invariant};
    if (nranks > 1) {
        signal(SIGPIPE, SIG_IGN);
        if (ranks_start(&k, (int)nranks, threads, &l) < 0) {
            ranks_stop(&k);
            return 1;
        }
    } else if (invariant) {
        openblas_set_num_threads(1);
        if (inv_start(&ig, &l, 0, out, threads) < 0)
            return 1;
    } else {
        openblas_set_num_threads((int)threads);
    }
    t_start = 0;
    for (long i = -warmup;; i++) {
        double t0;

        if (i == 0)
            t_start = timing_now_s();
        if (i >= 0 && (iters ? i >= iters
                             : (timing_now_s() - t_start >= duration && i > 0) || i >= MAX_CALLS))
            break;
        t0 = timing_now_s();
        if (nranks == 1) {
            compute(&l, 0, out, invariant ? &ig : NULL);
        } else if (ranks_step(&k) < 0) {
            fprintf(stderr, "gemm_baseline: a rank process died\n");
            ranks_stop(&k);
            return 1;
        }
        if (i >= 0)
            t[n++] = timing_now_s() - t0;
    }
    total = timing_now_s() - t_start;
    ranks_stop(&k);
    timing_sort(t, (size_t)n);
    flop = 2.0 * (double)rows * (double)in * (double)out;
    printf("gemm_baseline: %ld x %ld -> %ld, %s, %ld rank%s x %ld threads, %ld calls in %.3f s: "
           "median %.3f ms, %.1f calls/s, %.2f GFLOP/s\n",
           rows, in, out, invariant ? "invariant gemm" : "cblas_sgemm", nranks,
           nranks > 1 ? "s" : "", threads, n, total,
           timing_percentile(t, (size_t)n, 0.5) * 1e3, (double)n / total,
           flop * (double)n / total * 1e-9);
    /* the kernel OpenBLAS picked (OPENBLAS_CORETYPE overrides its detection) */
    printf("openblas: %s; core %s\n", openblas_get_config(), openblas_get_corename());
    if (invariant)
        printf("invariant gemm: %s kernel\n", gemm_kernel_name());
    printf("gemm-result: gemm=%s rows=%ld in=%ld out=%ld ranks=%ld threads=%ld calls=%ld "
           "seconds=%.9f rps=%.4f rows_per_s=%.2f gflops=%.6f p50_ms=%.4f p90_ms=%.4f "
           "p99_ms=%.4f\n",
           invariant ? "invariant" : "openblas", rows, in, out, nranks, threads, n, total, (double)n / total, (double)(n * rows) / total,
           flop * (double)n / total * 1e-9, timing_percentile(t, (size_t)n, 0.5) * 1e3,
           timing_percentile(t, (size_t)n, 0.9) * 1e3, timing_percentile(t, (size_t)n, 0.99) * 1e3);
    /* proves every rank wrote its columns: y was NaN before */
    for (long c = 0; c < rows * out; c++) {
        if (y[c] != y[c]) {
            fprintf(stderr, "gemm_baseline: output element %ld was not computed\n", c);
            return 1;
        }
    }
    if (nranks > 1) {
        /* and that the ranks' columns are the whole layer's: recompute it in one piece */
        size_t ny = (size_t)(rows * out);
        float *ys = malloc(ny * sizeof(float));
        double worst = 0;

        if (!ys) {
            fprintf(stderr, "gemm_baseline: out of memory\n");
            return 1;
        }
        memcpy(ys, y, ny * sizeof(float));
        openblas_set_num_threads((int)(threads * nranks));
        l.invariant = 0;
        compute(&l, 0, out, NULL);
        for (size_t i = 0; i < ny; i++) {
            double d = fabs((double)ys[i] - (double)y[i]) / (fabs((double)y[i]) + 1.0);

            worst = d > worst ? d : worst;
        }
        free(ys);
        if (worst > 1e-5) {
            fprintf(stderr, "gemm_baseline: %ld ranks differ from one GEMM by %g\n", nranks, worst);
            return 1;
        }
    }
    inv_stop(&ig);
    free(x);
    free(w);
    free(b);
    munmap(y, (size_t)(rows * out) * sizeof(float));
    free(t);
    return 0;
}
