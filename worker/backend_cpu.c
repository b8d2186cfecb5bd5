/* backend_cpu.c -- the CPU backend: this rank's column block of y = x·Wᵀ + b, written straight
 * into the slot's shared output (ldc = out), so no gather step is needed. Two GEMMs:
 *
 *   invariant (the default)  lib/gemm.c: every output element is summed in one order fixed by
 *                            the layer (gemm.h), so a row's bits never depend on the rows it
 *                            was batched with, on how many there were, or on the rank count.
 *                            W is packed into panels at create; this rank's threads split the
 *                            panels (whole output columns), which keeps that promise.
 *   openblas                 one cblas_sgemm (bias written first, beta = 1): OpenBLAS picks its
 *                            kernels by the call's shape, so a row's bits can change with the
 *                            batch it came in.
 *
 * Threads per rank are set by the coordinator so that all ranks together use the machine's
 * cores, not ranks x cores; the invariant GEMM's threads are a gemm_pool of this backend. */
#include <cblas.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "gemm.h"
#include "log.h"

#define MAX_THREADS 256

struct backend {
    struct shard s; /* s.w is NULL once packed (invariant), s.packed empty */
    enum backend_cpu_gemm gemm;
    struct gemm_weights g;  /* invariant: the packed W */
    struct gemm_pool *pool; /* invariant: this rank's threads */
};

static void cpu_destroy(struct backend *b);

static int cpu_create(struct backend **out, const struct backend_config *c, struct shard *s,
                      struct tp_err *err)
{
    struct backend *b = calloc(1, sizeof(*b));
    int threads = c->threads < 1 ? 1 : c->threads > MAX_THREADS ? MAX_THREADS : c->threads;

    if (!b)
        return tp_err_set(err, TP_ENOMEM, "no memory for the cpu backend");
    b->s = *s;
    *s = (struct shard){0};
    b->gemm = c->cpu_gemm;
    if (b->gemm == BACKEND_GEMM_OPENBLAS) {
        openblas_set_num_threads(threads);
        *out = b;
        return 0;
    }
    openblas_set_num_threads(1); /* not used for the layer; keeps its pool from spinning */
    if (b->s.packed.panels) { /* shard_load_packed did it */
        b->g = b->s.packed;
        b->s.packed = (struct gemm_weights){0};
    } else if (b->s.rows > UINT32_MAX || b->s.in > UINT32_MAX) {
        tp_err_set(err, TP_EINVAL, "a shard of [%lld, %lld] is too large for the invariant gemm",
                   (long long)b->s.rows, (long long)b->s.in);
        goto fail;
    } else if (gemm_pack(&b->g, b->s.w, (uint32_t)b->s.rows, (uint32_t)b->s.in, (size_t)b->s.in,
                         err) < 0) {
        tp_err_prefix(err, "packing the shard: ");
        goto fail;
    }
    free(b->s.w); /* the packed copy replaces it */
    b->s.w = NULL;
    if ((uint32_t)threads > b->g.np)
        threads = (int)b->g.np; /* a thread per panel at most */
    if (gemm_pool_create(&b->pool, threads, err) < 0)
        goto fail;
    tp_log(TP_LOG_INFO, "invariant gemm: %s kernel, %u panels of %d columns, %d threads",
           gemm_kernel_name(), b->g.np, GEMM_NR, threads);
    *out = b;
    return 0;
fail:
    cpu_destroy(b);
    return -1;
}

static int cpu_forward(struct backend *b, const float *x, uint32_t rows, float *y,
                       struct tp_err *err)
{
    const struct shard *s = &b->s;
    float *yc = y + s->row0; /* this rank's first column */
    float beta = 0.0f;

    (void)err;
    if (b->gemm == BACKEND_GEMM_INVARIANT) {
        gemm_pool_run(b->pool, &b->g, x, (size_t)s->in, rows, s->b, yc, (size_t)s->out);
        return 0;
    }
    if (s->b) {
        for (uint32_t i = 0; i < rows; i++)
            memcpy(yc + (size_t)i * (size_t)s->out, s->b, (size_t)s->rows * sizeof(float));
        beta = 1.0f;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)rows, (int)s->rows, (int)s->in, 1.0f,
                x, (int)s->in, s->w, (int)s->in, beta, yc, (int)s->out);
    return 0;
}

static void cpu_destroy(struct backend *b)
{
    if (!b)
        return;
    gemm_pool_destroy(b->pool);
    gemm_free(&b->g);
    shard_free(&b->s);
    free(b);
}

const struct backend_ops backend_cpu = {
    .name = "cpu", .create = cpu_create, .forward = cpu_forward, .destroy = cpu_destroy};
