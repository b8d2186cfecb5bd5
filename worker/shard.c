/* shard.c -- loading a rank's part of the model (see shard.h). The buffers of W are the largest a
 * worker makes, so they come from bigalloc (huge pages where the kernel gives them). */
#include "shard.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bigalloc.h"
#include "log.h"

#define PACK_CHUNK 256 /* rows of W read and packed at a time: 4 MiB for 4096 inputs */

/* One piece of one linear layer, and where it goes: rows [dest, dest + rows) of g[gemm], its
 * bias into bias (NULL: none). */
struct piece {
    const struct plan_linear *l;
    int gemm;
    int64_t row0, rows, col0, cols, dest;
    float *bias;
};

/* Sizes the GEMMs of rank's part and lists the pieces that fill them (see shard.h). */
static int plan_pieces(struct shard *s, const struct plan *p, int rank, int nranks,
                       struct piece *pc, int *npc, struct tp_err *err)
{
    const char *what;
    const struct plan_linear *last = &p->lin[p->nlin - 1];
    int64_t f, c;

    *s = (struct shard){.kind = (enum plan_kind)p->kind,
                        .act = (enum plan_act)p->act,
                        .in = p->in,
                        .out = p->out,
                        .dtype = (enum tp_dtype)p->lin[0].w.dtype};
    snprintf(s->name, sizeof(s->name), "%s", p->lin[0].w.name);
    if (plan_split(plan_split_size(p, &what), nranks, rank, &s->first, &s->count, err) < 0)
        return -1;
    f = s->first;
    c = s->count;
    *npc = 0;
    if (p->kind == PLAN_COLUMN) {
        s->ngemm = 1;
        s->g[0] = (struct shard_gemm){.n = (uint32_t)c, .k = (uint32_t)p->in};
        pc[(*npc)++] = (struct piece){&p->lin[0], 0, f, c, 0, p->in, 0, NULL};
    } else if (p->kind == PLAN_ROW) {
        s->ngemm = 1;
        s->g[0] = (struct shard_gemm){.n = (uint32_t)p->out, .k = (uint32_t)c};
    } else {
        s->ngemm = 2;
        s->g[0] = (struct shard_gemm){.n = (uint32_t)(c * (p->nlin - 1)), .k = (uint32_t)p->in};
        s->g[1] = (struct shard_gemm){.n = (uint32_t)p->out, .k = (uint32_t)c};
        for (uint32_t j = 0; j + 1 < p->nlin; j++)
            pc[(*npc)++] = (struct piece){&p->lin[j], 0, f, c, 0, p->in, (int64_t)j * c, NULL};
    }
    if (p->kind != PLAN_COLUMN)
        pc[(*npc)++] = (struct piece){last, s->ngemm - 1, 0, p->out, f, c, 0, NULL};
    /* biases: an output-split layer's slice into its GEMM (zeros for a member without one), a
     * row-split layer's whole bias into rbias */
    for (int i = 0; i < *npc; i++) {
        struct shard_gemm *g = &s->g[pc[i].gemm];

        if (!pc[i].l->has_bias)
            continue;
        if (pc[i].l->split == PLAN_SPLIT_IN) {
            if (!(s->rbias = malloc((size_t)p->out * sizeof(float))))
                goto nomem;
            pc[i].bias = s->rbias;
            continue;
        }
        if (!g->b && !(g->b = calloc(g->n, sizeof(float))))
            goto nomem;
        pc[i].bias = g->b + pc[i].dest;
    }
    return 0;
nomem:
    return tp_err_set(err, TP_ENOMEM, "no memory for the biases");
}

int shard_load(struct shard *s, const struct plan *p, int rank, int nranks, struct tp_err *err)
{
    struct piece pc[PLAN_MAX_LINEAR];
    int npc;

    if (plan_pieces(s, p, rank, nranks, pc, &npc, err) < 0)
        goto fail;
    for (int i = 0; i < s->ngemm; i++)
        if (!(s->g[i].w = bigalloc((size_t)s->g[i].n * s->g[i].k * sizeof(float)))) {
            tp_err_set(err, TP_ENOMEM, "no memory for %u x %u weights", s->g[i].n, s->g[i].k);
            goto fail;
        }
    for (int i = 0; i < npc; i++) {
        struct shard_gemm *g = &s->g[pc[i].gemm];
        uint64_t wb = 0, bb = 0;

        if (plan_read(pc[i].l, pc[i].row0, pc[i].rows, pc[i].col0, pc[i].cols,
                      g->w + (size_t)pc[i].dest * g->k, pc[i].bias, &wb, &bb, err) < 0)
            goto fail;
        s->w_bytes += wb;
        s->b_bytes += bb;
    }
    return 0;
fail:
    shard_free(s);
    return -1;
}

/* One thread's part of a packed load: rows [first, first + rows) of a piece. */
struct part {
    struct gemm_weights *g;
    const struct piece *pc;
    int64_t first, rows;
    uint64_t w_bytes, b_bytes;
    struct tp_err err;
    int rc;
};

static int pack_chunk(void *ctx, int64_t r, int64_t n, const float *w, struct tp_err *err)
{
    struct part *t = ctx;

    (void)err;
    gemm_pack_rows(t->g, w, (uint32_t)(t->pc->dest + t->first + r), (uint32_t)n,
                   (size_t)t->pc->cols);
    return 0;
}

static void *load_part(void *arg)
{
    struct part *t = arg;
    const struct piece *pc = t->pc;

    t->rc = plan_read_chunks(pc->l, pc->row0 + t->first, t->rows, pc->col0, pc->cols, PACK_CHUNK,
                             pack_chunk, t, pc->bias ? pc->bias + t->first : NULL, &t->w_bytes,
                             &t->b_bytes, &t->err);
    return NULL;
}

/* Reads and packs one piece on up to threads threads, each a share of its rows in whole panels
 * (the pieces of one GEMM start where the one before ends, so only a piece's first and last
 * panels may be shared with its neighbour, at other columns). */
static int load_piece_packed(struct shard *s, const struct piece *pc, int threads,
                             struct tp_err *err)
{
    struct part parts[SHARD_MAX_THREADS];
    pthread_t tid[SHARD_MAX_THREADS];
    int64_t per;
    int n = 0, started = 0, failed = 0, rc;

    per = (pc->rows + threads - 1) / threads;
    per = (per + GEMM_NR - 1) / GEMM_NR * GEMM_NR;
    for (int64_t first = 0; first < pc->rows; first += per)
        parts[n++] = (struct part){.g = &s->g[pc->gemm].packed,
                                   .pc = pc,
                                   .first = first,
                                   .rows = pc->rows - first < per ? pc->rows - first : per};
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
    return failed ? -1 : 0;
}

int shard_load_packed(struct shard *s, const struct plan *p, int rank, int nranks, int threads,
                      struct tp_err *err)
{
    struct piece pc[PLAN_MAX_LINEAR];
    int npc;

    if (plan_pieces(s, p, rank, nranks, pc, &npc, err) < 0)
        goto fail;
    for (int i = 0; i < s->ngemm; i++)
        if (gemm_pack_init(&s->g[i].packed, s->g[i].n, s->g[i].k, err) < 0)
            goto fail;
    threads = threads < 1 ? 1 : threads > SHARD_MAX_THREADS ? SHARD_MAX_THREADS : threads;
    for (int i = 0; i < npc; i++)
        if (load_piece_packed(s, &pc[i], threads, err) < 0)
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
    for (int i = 0; i < SHARD_MAX_GEMM; i++) {
        free(s->g[i].w);
        free(s->g[i].b);
        gemm_free(&s->g[i].packed);
    }
    free(s->rbias);
    *s = (struct shard){0};
}
