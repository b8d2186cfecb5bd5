/* shard.c -- loading a rank's rows (see shard.h). The file's header is parsed again here rather
 * than trusted from the coordinator's command line: the worker checks for itself that the tensors
 * exist and agree, so a file changed between the two reads fails loudly instead of computing
 * garbage. */
#include "shard.h"

#include <stdlib.h>

#include "safetensors.h"

int shard_range(int64_t out, int nranks, int rank, int64_t *row0, int64_t *rows, struct tp_err *err)
{
    if (nranks < 1 || rank < 0 || rank >= nranks)
        return tp_err_set(err, TP_EINVAL, "rank %d outside 0..%d", rank, nranks - 1);
    if (out < 1 || out % nranks != 0)
        return tp_err_set(err, TP_EINVAL, "out %lld is not divisible by %d ranks", (long long)out,
                          nranks);
    *rows = out / nranks;
    *row0 = (int64_t)rank * *rows;
    return 0;
}

int shard_load(struct shard *s, const char *path, const char *weight_name, const char *bias_name,
               int rank, int nranks, struct tp_err *err)
{
    struct st_file f = {.fd = -1};
    const struct st_tensor *w, *b = NULL;

    *s = (struct shard){0};
    if (st_open(&f, path, err) < 0)
        goto fail;
    w = st_find(&f, weight_name);
    if (!w) {
        tp_err_set(err, TP_EINVAL, "%s has no tensor '%s'", path, weight_name);
        goto fail;
    }
    if (w->ndim != 2 || w->shape[0] < 1 || w->shape[1] < 1) {
        tp_err_set(err, TP_EINVAL, "tensor '%s' must be 2-d [out, in], has %d dims", weight_name,
                   w->ndim);
        goto fail;
    }
    s->out = w->shape[0];
    s->in = w->shape[1];
    s->dtype = w->dtype;
    if (shard_range(s->out, nranks, rank, &s->row0, &s->rows, err) < 0)
        goto fail;
    if (bias_name) {
        b = st_find(&f, bias_name);
        if (!b) {
            tp_err_set(err, TP_EINVAL, "%s has no tensor '%s'", path, bias_name);
            goto fail;
        }
        if (b->ndim != 1 || b->shape[0] != s->out) {
            tp_err_set(err, TP_EINVAL, "bias '%s' must be 1-d [%lld]", bias_name,
                       (long long)s->out);
            goto fail;
        }
    }
    s->w = malloc((size_t)(s->rows * s->in) * sizeof(float));
    if (!s->w) {
        tp_err_set(err, TP_ENOMEM, "no memory for %lld x %lld weights", (long long)s->rows,
                   (long long)s->in);
        goto fail;
    }
    if (st_read_rows_f32(&f, w, s->row0, s->rows, s->w, &s->w_bytes, err) < 0)
        goto fail;
    if (b) {
        s->b = malloc((size_t)s->rows * sizeof(float));
        if (!s->b) {
            tp_err_set(err, TP_ENOMEM, "no memory for %lld biases", (long long)s->rows);
            goto fail;
        }
        if (st_read_rows_f32(&f, b, s->row0, s->rows, s->b, &s->b_bytes, err) < 0)
            goto fail;
    }
    st_close(&f);
    return 0;
fail:
    st_close(&f);
    shard_free(s);
    return -1;
}

void shard_free(struct shard *s)
{
    if (!s)
        return;
    free(s->w);
    free(s->b);
    *s = (struct shard){0};
}
