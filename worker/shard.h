/* shard.h -- which rows of W a rank owns, and loading exactly those rows. Rank r of N owns rows
 * [r*out/N, (r+1)*out/N) of W [out, in] and the same slice of b: Megatron's ColumnParallelLinear
 * split. The rows are read from the safetensors file by byte range; a rank never reads or holds
 * the whole matrix. */
#ifndef TP_SHARD_H
#define TP_SHARD_H

#include <stdint.h>

#include "err.h"
#include "tensor.h"

struct shard {
    int64_t row0;        /* first row of W owned */
    int64_t rows;        /* rows owned: out / nranks */
    int64_t in;          /* columns of W */
    int64_t out;         /* rows of W, all ranks together */
    enum tp_dtype dtype; /* dtype of W in the file */
    float *w;            /* [rows, in], converted to float32, owned */
    float *b;            /* [rows] or NULL without bias, owned */
    uint64_t w_bytes;    /* bytes of W read from the file */
    uint64_t b_bytes;    /* bytes of b read from the file */
};

/* Row range of a rank. Fails (TP_EINVAL) unless 0 <= rank < nranks and out % nranks == 0. */
int shard_range(int64_t out, int nranks, int rank, int64_t *row0, int64_t *rows,
                struct tp_err *err);

/* Loads rank's rows of tensor weight_name (2-d) and, when bias_name is not NULL, of bias_name
 * (1-d, same out) from the safetensors file at path. On failure *s is empty. */
int shard_load(struct shard *s, const char *path, const char *weight_name, const char *bias_name,
               int rank, int nranks, struct tp_err *err);

/* Frees the rows; takes an empty shard. */
void shard_free(struct shard *s);

#endif
