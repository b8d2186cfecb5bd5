/* shard.h -- a rank's shard of the layer: its output rows of W and slice of b, read by the plan
 * that the coordinator sent (plan.h). Rank r of N owns rows [row0, row0 + rows) by plan_split;
 * they are read from the checkpoint by byte range, so a rank never reads or holds the whole
 * matrix, and plan_read first checks that the files are the ones the coordinator planned. */
#ifndef TP_SHARD_H
#define TP_SHARD_H

#include <stdint.h>

#include "err.h"
#include "gemm.h"
#include "plan.h"
#include "tensor.h"

struct shard {
    int64_t row0;        /* first output row of W owned */
    int64_t rows;        /* output rows owned (plan_split) */
    int64_t in;          /* inputs of the layer */
    int64_t out;         /* outputs of the layer, all ranks together */
    enum tp_dtype dtype; /* dtype of W in the file */
    char name[ST_MAX_NAME]; /* W's tensor name, for messages */
    float *w;            /* [rows, in], converted to float32, owned; NULL when packed */
    struct gemm_weights packed; /* shard_load_packed: W packed for the invariant GEMM */
    float *b;            /* [rows] or NULL without bias, owned */
    uint64_t w_bytes;    /* bytes of W read from the file */
    uint64_t b_bytes;    /* bytes of b read from the file */
};

/* Loads rank's rows of the plan's layer. On failure *s is empty. */
int shard_load(struct shard *s, const struct plan *p, int rank, int nranks, struct tp_err *err);

#define SHARD_MAX_THREADS 64

/* shard_load for the invariant GEMM: W is read in chunks of rows and each chunk packed into
 * s->packed as it comes, so the worker never holds W twice (s->w stays NULL). threads (1 to
 * SHARD_MAX_THREADS) read and pack whole panels of it side by side. */
int shard_load_packed(struct shard *s, const struct plan *p, int rank, int nranks, int threads,
                      struct tp_err *err);

/* Frees the rows; takes an empty shard. */
void shard_free(struct shard *s);

#endif
