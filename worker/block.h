/* block.h -- the CPU pieces of a model whose ranks all-reduce (plan_reduces: a row-split layer,
 * a block): the activation, and the all-reduce through the slot's partial blocks of the shared
 * arena (shm.h). Each rank writes its partial sum [rows, out] into its own block, arrives at the
 * slot's counter and waits for the others, then sums one stripe of columns of all partials, in
 * rank order, into the slot's output and adds the bias there: every rank reads every partial once
 * and writes only its stripe, so the reduction is parallel over ranks and nothing is gathered.
 * docs/blocks.md says why the ranks meet through the arena and not through the coordinator. */
#ifndef TP_BLOCK_H
#define TP_BLOCK_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"
#include "plan.h"

/* h[i, j] = act(t[i, j]) for j < n (mlp), in place; ld floats between rows. */
void block_act(enum plan_act act, float *t, size_t ld, uint32_t rows, uint32_t n);

/* h[i, j] = act(t[i, j]) · t[i, n + j] for j < n (gated: gate's outputs, then up's, side by side
 * in rows of ld floats), written over t[i, 0..n). */
void block_act_mul(enum plan_act act, float *t, size_t ld, uint32_t rows, uint32_t n);

/* The columns [*c0, *c0 + *nc) of out that rank reduces: whole 64-byte lines, as even as
 * possible; a rank may get none when out is small. */
void block_stripe(int64_t out, int nranks, int rank, int64_t *c0, int64_t *nc);

/* Adds this rank to the slot's counter (sync) and waits until all nranks have arrived: a short
 * spin, then futex waits. While it waits it watches ctl_fd: a hangup there means that the
 * coordinator is gone or took the group down, and it fails with TP_EUNAVAIL. spin_ns 0: no
 * spin. */
int block_arrive(uint32_t *sync, uint32_t nranks, int ctl_fd, int64_t spin_ns,
                 struct tp_err *err);

/* y[i, c] = ((p_0[i, c] + p_1[i, c]) + ... + p_{nranks-1}[i, c]) + bias[c], for c in
 * [c0, c0 + nc) and i < rows; partials and y have ld floats between rows; bias NULL: none. The
 * sums run in rank order, so an answer's bits depend on the rank count, not on which rank summed
 * it or on the batch. */
void block_reduce(float *y, float *const *partial, uint32_t nranks, size_t ld, uint32_t rows,
                  int64_t c0, int64_t nc, const float *bias);

/* y[i, c] += bias[c] for c < n, i < rows (rows of ld floats): one rank's whole sum. */
void block_add_bias(float *y, size_t ld, uint32_t rows, const float *bias, int64_t n);

#endif
