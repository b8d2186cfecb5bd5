/* gemm.h -- the batch-invariant GEMM of the CPU backend: y[i, j] = b[j] + Σₖ x[i, k]·W[j, k], with
 * every element summed in one fixed order: the inputs in blocks of GEMM_KC, each block a chain
 * of fused multiply-adds from zero in k order, the blocks added to the bias (or +0) in order:
 *
 *     c = b[j];
 *     for (k0 = 0; k0 < in; k0 += GEMM_KC) {
 *         s = 0;  for (k = k0; k < min(k0 + GEMM_KC, in); k++) s = fmaf(x[i][k], W[j][k], s);
 *         c = c + s;
 *     }
 *
 * whatever the number of rows in the call, the row's place among them, the columns computed
 * with it, the thread that computes it or the CPU's vector width. A row's bits therefore depend
 * only on that row and the weights: not on what it was batched with, nor on how W is split
 * over ranks. BLAS libraries promise none of this (their kernels, and so their summation
 * orders, change with the shape of the call and a row's position in it), which is why this
 * exists; docs/performance.md measures what it costs against OpenBLAS. The blocks keep the
 * rounding error near that of a blocked BLAS (a chain of GEMM_KC terms, then in / GEMM_KC
 * additions) rather than that of one chain of in terms.
 *
 * W is packed once, at load, into panels of GEMM_NR output columns, k-major and zero-padded,
 * each block of GEMM_KC inputs of every panel after the other (gemm.c says why); the packed
 * copy replaces the row-major one. Run by tpd-worker (worker/backend_cpu.c) and by
 * the benchmarks. */
#ifndef TP_GEMM_H
#define TP_GEMM_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"

#define GEMM_NR 16  /* output columns of a panel */
#define GEMM_KC 256 /* inputs per block of the sum; a panel's block is 16 KiB, L1-resident */

struct gemm_weights {
    uint32_t n;    /* output columns: rows of W */
    uint32_t k;    /* inputs: columns of W */
    uint32_t np;   /* panels: ceil(n / GEMM_NR) */
    float *panels; /* per block of GEMM_KC inputs, every panel's [kc][GEMM_NR] in panel order;
                    * owned; columns past n are zero */
};

/* Packs W [n, k] (row-major, ldw floats between rows) into g. g owns the packed copy (64-byte
 * aligned), the caller still owns w. Fails with TP_ENOMEM (g left empty) or TP_EINVAL for a
 * zero or oversized dimension. */
int gemm_pack(struct gemm_weights *g, const float *w, uint32_t n, uint32_t k, size_t ldw,
              struct tp_err *err);

/* gemm_pack in steps, so that W need never be held whole: gemm_pack_init allocates g for an [n, k]
 * weight (the padding columns of the last panel zero, the rest unset; same failures as
 * gemm_pack), then gemm_pack_rows packs rows [j0, j0 + rows) of W, given as rows rows of k floats
 * ldw apart; every row must be packed once before g is used. */
int gemm_pack_init(struct gemm_weights *g, uint32_t n, uint32_t k, struct tp_err *err);
void gemm_pack_rows(struct gemm_weights *g, const float *w, uint32_t j0, uint32_t rows,
                    size_t ldw);

/* Frees the packed weights; takes an empty (zeroed) g. */
void gemm_free(struct gemm_weights *g);

/* y[i, j] for rows i < rows and the output columns of panels [p0, p1) (columns
 * [p0·GEMM_NR, min(p1·GEMM_NR, n))), as the chain above; x has ldx floats between rows, y ldy.
 * bias is [n] or NULL. Nothing else of y is touched, so threads given disjoint panel ranges may
 * run at once on the same y. Never fails. */
void gemm_run(const struct gemm_weights *g, const float *x, size_t ldx, uint32_t rows,
              const float *bias, float *y, size_t ldy, uint32_t p0, uint32_t p1);

/* A team of threads that computes gemm_run calls together, each thread a fixed share of whole
 * panels (so every element is still one thread's chain, and the bits do not depend on the
 * thread count). The calling thread computes the first share itself; threads - 1 more wait for
 * work between calls. */
struct gemm_pool;

/* A pool of threads - 1 helpers (threads >= 1), started by its first run that needs them, on
 * that run's thread, whose scheduling they inherit; a helper that cannot start leaves its share
 * to the caller. Fails with TP_ENOMEM; on success the caller owns *p (gemm_pool_destroy). */
int gemm_pool_create(struct gemm_pool **p, int threads, struct tp_err *err);

/* gemm_run over all of g's panels, shared by the pool's threads (a call of under 2^19
 * multiply-adds runs on the calling thread alone); returns when all are done. One call at a
 * time per pool. */
void gemm_pool_run(struct gemm_pool *p, const struct gemm_weights *g, const float *x, size_t ldx,
                   uint32_t rows, const float *bias, float *y, size_t ldy);

/* Stops and joins the threads; takes NULL. */
void gemm_pool_destroy(struct gemm_pool *p);

/* The kernel gemm_run uses: "avx2" (AVX2 and FMA, where the CPU has them) or "generic" (fmaf).
 * Both give the same bits. */
const char *gemm_kernel_name(void);

/* Makes every later gemm_run use the kernel called name, for tests and benchmarks. Returns -1,
 * changing nothing, for an unknown name or a kernel this CPU cannot run. */
int gemm_set_kernel(const char *name);

#endif
