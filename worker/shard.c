/* shard.c -- loading a rank's rows (see shard.h). The buffer of W is the largest a worker makes,
 * so it comes from bigalloc (huge pages where the kernel gives them). */
#include "shard.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bigalloc.h"
#include "log.h"

int shard_load(struct shard *s, const struct plan *p, int rank, int nranks, struct tp_err *err)
{
    *s = (struct shard){.in = p->in, .out = p->out, .dtype = (enum tp_dtype)p->w.dtype};
    snprintf(s->name, sizeof(s->name), "%s", p->w.name);
    if (plan_split(p->out, nranks, rank, &s->row0, &s->rows, err) < 0)
        goto fail;
    s->w = bigalloc((size_t)(s->rows * s->in) * sizeof(float));
    s->b = p->has_bias ? malloc((size_t)s->rows * sizeof(float)) : NULL;
    if (!s->w || (p->has_bias && !s->b)) {
        tp_err_set(err, TP_ENOMEM, "no memory for %lld x %lld weights", (long long)s->rows,
                   (long long)s->in);
        goto fail;
    }
    if (plan_read(p, s->row0, s->rows, s->w, s->b, &s->w_bytes, &s->b_bytes, err) < 0)
        goto fail;
    return 0;
fail:
    shard_free(s);
    return -1;
}

#define PACK_CHUNK 256 /* rows of W read and packed at a time: 4 MiB for 4096 inputs */

/* One thread's part of a packed load: rows [first, first + rows) of the shard. */
struct part {
    struct shard *s;
    const struct plan *p;
    int64_t first, rows;
    uint64_t w_bytes, b_bytes;
    struct tp_err err;
    int rc;
};

static int pack_chunk(void *ctx, int64_t r, int64_t n, const float *w, struct tp_err *err)
{
    struct part *t = ctx;

    (void)err;
    gemm_pack_rows(&t->s->packed, w, (uint32_t)(t->first + r), (uint32_t)n, (size_t)t->s->in);
    return 0;
}

static void *load_part(void *arg)
{
    struct part *t = arg;

    t->rc = plan_read_chunks(t->p, t->s->row0 + t->first, t->rows, PACK_CHUNK, pack_chunk, t,
                             t->s->b ? t->s->b + t->first : NULL, &t->w_bytes, &t->b_bytes,
                             &t->err);
    return NULL;
}

int shard_load_packed(struct shard *s, const struct plan *p, int rank, int nranks, int threads,
                      struct tp_err *err)
{
    struct part parts[SHARD_MAX_THREADS];
    pthread_t tid[SHARD_MAX_THREADS];
    int64_t per;
    int n = 0, started = 0, failed = 0, rc;

    *s = (struct shard){.in = p->in, .out = p->out, .dtype = (enum tp_dtype)p->w.dtype};
    snprintf(s->name, sizeof(s->name), "%s", p->w.name);
    if (plan_split(p->out, nranks, rank, &s->row0, &s->rows, err) < 0)
        goto fail;
    if (s->rows > UINT32_MAX || s->in > UINT32_MAX) {
        tp_err_set(err, TP_EINVAL, "a shard of [%lld, %lld] is too large for the invariant gemm",
                   (long long)s->rows, (long long)s->in);
        goto fail;
    }
    if (gemm_pack_init(&s->packed, (uint32_t)s->rows, (uint32_t)s->in, err) < 0)
        goto fail;
    s->b = p->has_bias ? malloc((size_t)s->rows * sizeof(float)) : NULL;
    if (p->has_bias && !s->b) {
        tp_err_set(err, TP_ENOMEM, "no memory for %lld biases", (long long)s->rows);
        goto fail;
    }
    /* whole panels per thread, so that no two threads write one panel */
    threads = threads < 1 ? 1 : threads > SHARD_MAX_THREADS ? SHARD_MAX_THREADS : threads;
    per = (s->rows + threads - 1) / threads;
    per = (per + GEMM_NR - 1) / GEMM_NR * GEMM_NR;
    for (int64_t first = 0; first < s->rows; first += per)
        parts[n++] = (struct part){.s = s,
                                   .p = p,
                                   .first = first,
                                   .rows = s->rows - first < per ? s->rows - first : per};
    for (int i = 1; i < n; i++) {
        rc = pthread_create(&tid[i], NULL, load_part, &parts[i]);
        if (rc != 0) { /* what did not start is loaded here */
            tp_log(TP_LOG_WARN, "loading on one thread fewer: %s", strerror(rc));
            for (int j = i; j < n; j++)
                load_part(&parts[j]);
            break;
        }
        started = i;
    }
    load_part(&parts[0]);
    for (int i = 1; i <= started; i++)
        pthread_join(tid[i], NULL);
    for (int i = 0; i < n; i++) {
        if (parts[i].rc < 0 && !failed++)
            *err = parts[i].err; /* the first part's failure */
        s->w_bytes += parts[i].w_bytes;
        s->b_bytes += parts[i].b_bytes;
    }
    if (failed)
        goto fail;
    return 0;
fail:
    shard_free(s);
    return -1;
}

void shard_free(struct shard *s)
{
    if (!s)
        return;
    free(s->w);
    free(s->b);
    gemm_free(&s->packed);
    *s = (struct shard){0};
}
