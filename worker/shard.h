/* shard.h -- a rank's part of the model, read by the plan that the coordinator sent (plan.h), as
 * the GEMMs that the rank runs. What the ranks split (plan_split_size: a column layer's outputs,
 * a row layer's inputs, a block's intermediate size) is split by plan_split, and rank r owns
 * [first, first + count) of it:
 *
 *   column  g[0] = W[first:first+count, :]            b[first:first+count]   -> y[:, first:]
 *   row     g[0] = W[:, first:first+count]            no bias                -> partial, x[:, first:]
 *   gated   g[0] = gate[first.., :] then up[first.., :] (2·count rows)  their biases
 *           g[1] = down[:, first:first+count]         no bias                -> partial
 *   mlp     g[0] = fc[first.., :]                      its bias
 *           g[1] = proj[:, first:first+count]          no bias                -> partial
 *
 * A row-split layer's bias is rbias, whole: it is added once, after the all-reduce. Every piece
 * is read from the checkpoint by byte range, so a rank never reads or holds a whole matrix, and
 * plan_read first checks that the files are the ones the coordinator planned. Gate and up stay
 * two tensors of the checkpoint, each split on its own; the rank only lays its two pieces side by
 * side, so that one GEMM computes both. */
#ifndef TP_SHARD_H
#define TP_SHARD_H

#include <stdint.h>

#include "err.h"
#include "gemm.h"
#include "plan.h"
#include "tensor.h"

#define SHARD_MAX_GEMM 2

struct shard_gemm {
    uint32_t n, k;              /* W [n, k]: n outputs of k inputs */
    float *w;                   /* [n, k] row-major float32, owned; NULL when packed */
    struct gemm_weights packed; /* shard_load_packed: W packed for the invariant GEMM */
    float *b;                   /* [n] or NULL without bias, owned */
};

struct shard {
    enum plan_kind kind;
    enum plan_act act;
    int64_t in, out;        /* the model's */
    int64_t first, count;   /* this rank's part of what the ranks split */
    int ngemm;
    struct shard_gemm g[SHARD_MAX_GEMM];
    float *rbias;           /* [out]: the row-split layer's bias, added after the reduce; or NULL */
    enum tp_dtype dtype;    /* dtype of the first W in the file */
    char name[ST_MAX_NAME]; /* the first W's tensor name, for messages */
    uint64_t w_bytes;       /* bytes of weights read from the files */
    uint64_t b_bytes;       /* bytes of biases read from the files */
};

/* Loads rank's part of the plan's model, each W row-major. On failure *s is empty. */
int shard_load(struct shard *s, const struct plan *p, int rank, int nranks, struct tp_err *err);

#define SHARD_MAX_THREADS 64

/* shard_load for the invariant GEMM: each W is read in chunks of rows and each chunk packed as it
 * comes, so the worker never holds a W twice (g[i].w stays NULL). threads (1 to
 * SHARD_MAX_THREADS) read and pack rows of it side by side. */
int shard_load_packed(struct shard *s, const struct plan *p, int rank, int nranks, int threads,
                      struct tp_err *err);

/* Frees everything; takes an empty shard. */
void shard_free(struct shard *s);

#endif
