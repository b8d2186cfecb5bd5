/* shard.c -- loading a rank's rows (see shard.h). The buffer of W is the largest a worker makes:
 * it asks for transparent huge pages, since faulting in a multi-GiB shard 4 KiB at a time costs
 * more than reading it from the page cache. */
#include "shard.h"

#include <stdlib.h>
#include <sys/mman.h>

#define HUGE_PAGE (2u << 20)

/* n bytes, 2 MiB aligned when large, so that the kernel can back it with huge pages. */
static void *alloc_big(size_t n)
{
    void *p = NULL;

    if (n < HUGE_PAGE)
        return malloc(n ? n : 1);
    n = (n + HUGE_PAGE - 1) / HUGE_PAGE * HUGE_PAGE;
    if (posix_memalign(&p, HUGE_PAGE, n) != 0)
        return NULL;
    (void)madvise(p, n, MADV_HUGEPAGE); /* advice: without it the pages are only smaller */
    return p;
}

int shard_load(struct shard *s, const struct plan *p, int rank, int nranks, struct tp_err *err)
{
    *s = (struct shard){.in = p->in, .out = p->out, .dtype = (enum tp_dtype)p->w.dtype};
    if (plan_split(p->out, nranks, rank, &s->row0, &s->rows, err) < 0)
        goto fail;
    s->w = alloc_big((size_t)(s->rows * s->in) * sizeof(float));
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

void shard_free(struct shard *s)
{
    if (!s)
        return;
    free(s->w);
    free(s->b);
    *s = (struct shard){0};
}
