/* shard.c -- loading a rank's rows (see shard.h). The buffer of W is the largest a worker makes,
 * so it comes from bigalloc (huge pages where the kernel gives them). */
#include "shard.h"

#include <stdio.h>
#include <stdlib.h>

#include "bigalloc.h"

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

static int pack_chunk(void *ctx, int64_t r, int64_t n, const float *w, struct tp_err *err)
{
    struct shard *s = ctx;

    (void)err;
    gemm_pack_rows(&s->packed, w, (uint32_t)r, (uint32_t)n, (size_t)s->in);
    return 0;
}

int shard_load_packed(struct shard *s, const struct plan *p, int rank, int nranks,
                      struct tp_err *err)
{
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
    if (plan_read_chunks(p, s->row0, s->rows, PACK_CHUNK, pack_chunk, s, s->b, &s->w_bytes,
                         &s->b_bytes, err) < 0)
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
