/* backend_cpu.c -- the CPU backend. A column layer's rank writes its column block of
 * y = x·Wᵀ + b straight into the slot's shared output (ldc = out), so no gather step is needed. A
 * reducing model's rank (shard.h has what it holds) computes its partial sum into its partial
 * block of the slot, and the ranks all-reduce them there (block.h):
 *
 *   row     partial = x[:, first:first+count] · W_rᵀ
 *   gated   t = x · [gate_r; up_r]ᵀ (+ their biases), h = act(t_gate) · t_up, partial = h · down_rᵀ
 *   mlp     t = x · fc_rᵀ + fc_b_r, h = act(t), partial = h · proj_rᵀ
 *
 * The intermediate t never leaves the rank: a buffer of its own, made once for max_batch rows.
 * Two GEMMs:
 *
 *   invariant (the default)  lib/gemm.c: every output element is summed in one order fixed by
 *                            the layer (gemm.h), so a row's bits never depend on the rows it
 *                            was batched with or on how many there were; for a column layer not
 *                            on the rank count either (a reducing model's sums are split at the
 *                            ranks' boundaries, so there they do). W is packed into panels at
 *                            load; this rank's threads split the panels (whole output columns),
 *                            which keeps that promise.
 *   openblas                 one cblas_sgemm per layer (bias written first, beta = 1): OpenBLAS
 *                            picks its kernels by the call's shape, so a row's bits can change
 *                            with the batch it came in.
 *
 * Threads per rank are set by the coordinator so that all ranks together use the machine's
 * cores, not ranks x cores; the invariant GEMM's threads are a gemm_pool of this backend. */
#include <cblas.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "bigalloc.h"
#include "block.h"
#include "gemm.h"
#include "log.h"
#include "timing.h"

#define MAX_THREADS 256
#define SPIN_NS 50000 /* spin before sleeping at the all-reduce: docs/blocks.md measures it */

struct backend {
    struct shard s; /* each g[i].w is NULL once packed (invariant) */
    enum backend_cpu_gemm gemm;
    struct gemm_pool *pool; /* invariant: this rank's threads */
    int rank, nranks;
    int ctl_fd;
    float *t;               /* a block's intermediate: [max_batch, g[0].n], or NULL */
    int64_t c0, nc;         /* the columns of out this rank reduces */
    int64_t spin_ns;        /* how long to spin at the all-reduce before sleeping */
};

static void cpu_destroy(struct backend *b);

/* Ranks that each have a core of their own arrive at the all-reduce within microseconds of each
 * other when the work is split evenly, and a short spin saves the futex's sleep and wake (about
 * 36 us against 0.6 us, bench/barrier.c). With more ranks than cores a spinning rank holds the
 * core a peer needs to arrive, and every spin is lost: then the ranks sleep at once. */
static int64_t spin_for(int nranks)
{
    cpu_set_t set;

    if (nranks < 2 || sched_getaffinity(0, sizeof(set), &set) < 0)
        return 0;
    return CPU_COUNT(&set) >= nranks ? SPIN_NS : 0;
}

static int cpu_create(struct backend **out, const struct backend_config *c, struct shard *s,
                      struct tp_err *err)
{
    struct backend *b = calloc(1, sizeof(*b));
    int threads = c->threads < 1 ? 1 : c->threads > MAX_THREADS ? MAX_THREADS : c->threads;
    uint32_t panels = 0;

    if (!b)
        return tp_err_set(err, TP_ENOMEM, "no memory for the cpu backend");
    b->s = *s;
    *s = (struct shard){0};
    b->gemm = c->cpu_gemm;
    b->rank = c->rank;
    b->nranks = c->nranks;
    b->ctl_fd = c->ctl_fd;
    block_stripe(b->s.out, c->nranks, c->rank, &b->c0, &b->nc);
    b->spin_ns = spin_for(c->nranks);
    if (b->s.ngemm > 1) {
        size_t n = (size_t)c->max_batch * b->s.g[0].n;

        b->t = bigalloc(n * sizeof(float));
        if (!b->t) {
            tp_err_set(err, TP_ENOMEM, "no memory for a [%u, %u] intermediate", c->max_batch,
                       b->s.g[0].n);
            goto fail;
        }
        memset(b->t, 0, n * sizeof(float)); /* its pages are touched now, not by a request */
    }
    if (b->gemm == BACKEND_GEMM_OPENBLAS) {
        openblas_set_num_threads(threads);
        *out = b;
        return 0;
    }
    openblas_set_num_threads(1); /* not used for the layer; keeps its pool from spinning */
    for (int i = 0; i < b->s.ngemm; i++) {
        struct shard_gemm *g = &b->s.g[i];

        if (!g->packed.panels) {
            if (gemm_pack(&g->packed, g->w, g->n, g->k, g->k, err) < 0) {
                tp_err_prefix(err, "packing the shard: ");
                goto fail;
            }
            free(g->w); /* the packed copy replaces it */
            g->w = NULL;
        }
        if (g->packed.np > panels)
            panels = g->packed.np;
    }
    if ((uint32_t)threads > panels)
        threads = (int)panels; /* a thread per panel at most */
    if (gemm_pool_create(&b->pool, threads, err) < 0)
        goto fail;
    tp_log(TP_LOG_INFO, "invariant gemm: %s kernel, %u panels of %d columns, %d threads",
           gemm_kernel_name(), b->s.g[0].packed.np, GEMM_NR, threads);
    *out = b;
    return 0;
fail:
    cpu_destroy(b);
    return -1;
}

/* y = x·Wᵀ + b for g, rows rows; x has ldx floats between rows, y ldy. */
static void run_gemm(struct backend *b, const struct shard_gemm *g, const float *x, size_t ldx,
                     uint32_t rows, float *y, size_t ldy)
{
    float beta = 0.0f;

    if (b->gemm == BACKEND_GEMM_INVARIANT) {
        gemm_pool_run(b->pool, &g->packed, x, ldx, rows, g->b, y, ldy);
        return;
    }
    if (g->b) {
        for (uint32_t i = 0; i < rows; i++)
            memcpy(y + (size_t)i * ldy, g->b, (size_t)g->n * sizeof(float));
        beta = 1.0f;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)rows, (int)g->n, (int)g->k, 1.0f, x,
                (int)ldx, g->w, (int)g->k, beta, y, (int)ldy);
}

static int cpu_forward(struct backend *b, struct backend_job *job, struct tp_err *err)
{
    const struct shard *s = &b->s;
    size_t in = (size_t)s->in, out = (size_t)s->out, ldt = s->g[0].n;
    float *partial;
    double t0, t1;

    job->collectives = 0;
    switch (s->kind) {
    case PLAN_COLUMN:
        run_gemm(b, &s->g[0], job->x, in, job->rows, job->y + s->first, out);
        return 0;
    case PLAN_ROW:
        partial = b->nranks > 1 ? job->partial[b->rank] : job->y;
        run_gemm(b, &s->g[0], job->x + s->first, in, job->rows, partial, out);
        break;
    case PLAN_GATED:
    case PLAN_MLP:
        partial = b->nranks > 1 ? job->partial[b->rank] : job->y;
        run_gemm(b, &s->g[0], job->x, in, job->rows, b->t, ldt);
        if (s->kind == PLAN_GATED)
            block_act_mul(s->act, b->t, ldt, job->rows, (uint32_t)s->count);
        else
            block_act(s->act, b->t, ldt, job->rows, (uint32_t)s->count);
        run_gemm(b, &s->g[1], b->t, ldt, job->rows, partial, out);
        break;
    default: return tp_err_set(err, TP_EINTERNAL, "model kind %d unknown", (int)s->kind);
    }
    if (b->nranks == 1) { /* its partial is the sum: written in place, nothing to meet */
        if (s->rbias)
            block_add_bias(job->y, out, job->rows, s->rbias, s->out);
        return 0;
    }
    t0 = timing_now_s();
    if (block_arrive(job->sync, (uint32_t)b->nranks, b->ctl_fd, b->spin_ns, err) < 0)
        return -1;
    t1 = timing_now_s();
    block_reduce(job->y, job->partial, (uint32_t)b->nranks, out, job->rows, b->c0, b->nc,
                 s->rbias);
    job->wait_s = t1 - t0;
    job->reduce_s = timing_now_s() - t1;
    job->collectives = 1;
    return 0;
}

static void cpu_destroy(struct backend *b)
{
    if (!b)
        return;
    gemm_pool_destroy(b->pool);
    shard_free(&b->s);
    free(b->t);
    free(b);
}

const struct backend_ops backend_cpu = {
    .name = "cpu", .create = cpu_create, .forward = cpu_forward, .destroy = cpu_destroy};
