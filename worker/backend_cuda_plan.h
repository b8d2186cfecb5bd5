/* backend_cuda_plan.h -- the host-side arithmetic of the cuda backend: which columns of y each
 * rank owns, where the GEMM writes, the cuBLAS parameters of y = x·Wᵀ in column-major terms, the
 * copies that undo the all-gather's layout (and their detour through a pinned stage), where FP16
 * and BF16 overflow, and the text of a failed CUDA, cuBLAS or NCCL call.
 * Nothing here calls CUDA, so the unit tests check all of it on machines without a GPU
 * (tests/gpu/test_cuda_plan.c, which runs a whole forward of every rank on the host).
 *
 * The layout trap: ncclAllGather concatenates the ranks' buffers, so after it the device holds
 * [nranks][rows][pad] (pad = the widest shard's columns), not [rows][out]. Rank q's block must
 * land at column row0_q of every output row: one strided 2-D copy per rank block
 * (cudaMemcpy2DAsync), cols_q wide. The split is uneven when nranks does not divide out
 * (plan_split: the first out mod nranks ranks own one column more), but ncclAllGather sends the
 * same count from every rank, so each block is padded to pad columns: the GEMM writes its dense
 * [rows, cols_q] shard at the start of its block, the rest of the block is padding that travels
 * with the gather and is never copied out. With rows == 1 and an even split the gathered buffer
 * is already [rows][out], which is why tests need rows > 1, nranks > 1 and uneven splits. */
#ifndef TP_BACKEND_CUDA_PLAN_H
#define TP_BACKEND_CUDA_PLAN_H

#include <stddef.h>
#include <stdint.h>

#include "backend.h"
#include "err.h"
#include "tensor.h"

/* Where one rank's columns go, fixed at start (cuda_plan_layout). */
struct cuda_layout {
    enum backend_gather gather;
    int rank, nranks;
    int64_t out;  /* columns of y, all ranks together */
    int64_t row0; /* this rank's first column of y (its first row of W) */
    int64_t cols; /* this rank's columns of y (its rows of W), by plan_split */
    int64_t pad;  /* columns of every rank block with NCCL: rank 0's, the widest shard's */
};

/* One cudaMemcpy2DAsync: height rows of width bytes, from src + src_off (pitch spitch) to
 * dst + dst_off (pitch dpitch). All in bytes. */
struct cuda_copy2d {
    size_t dst_off, dpitch;
    size_t src_off, spitch;
    size_t width, height;
};

/* cuBLAS column-major GEMM parameters: C(m x n) = op(A)(m x k) · op(B)(k x n), op(X) = Xᵀ when
 * the trans flag is set. Derivation in backend_cuda_plan.c. */
struct cuda_gemm_shape {
    int trans_a, trans_b; /* 1: CUBLAS_OP_T, 0: CUBLAS_OP_N */
    int m, n, k;
    int lda, ldb, ldc;
};

/* Fills l for rank of nranks over out columns, each rank's range by plan_split. Fails
 * (TP_EINVAL, l untouched) when plan_split does: a rank outside 0..nranks-1, or fewer columns
 * than ranks. */
int cuda_plan_layout(struct cuda_layout *l, enum backend_gather g, int64_t out, int nranks,
                     int rank, struct tp_err *err);

/* The GEMM that computes a rank's shard y_r [rows, cols] = x [rows, in] · W_r [cols, in]ᵀ with
 * every matrix row-major and dense, y_r written with row pitch cols. Fails (TP_EINVAL) when a
 * dimension does not fit cuBLAS's int. */
int cuda_plan_gemm(uint32_t rows, int64_t cols, int64_t in, struct cuda_gemm_shape *g,
                   struct tp_err *err);

/* Elements of the device output buffer for jobs of up to max_batch rows: nranks·max_batch·pad
 * with NCCL (every rank block, padded), max_batch·cols with the host gather (this rank's). */
size_t cuda_plan_buffer(const struct cuda_layout *l, uint32_t max_batch);

/* Element offset in the device output buffer where this rank's GEMM writes its dense
 * [rows, cols] shard: rank·rows·pad with NCCL, so that the all-gather runs in place (NCCL's
 * rule: sendbuff == recvbuff + rank·sendcount); 0 with the host gather. */
size_t cuda_plan_block(const struct cuda_layout *l, uint32_t rows);

/* The ncclAllGather sendcount for a job of rows rows: rows·pad elements, the same on every
 * rank; the tail of a block beyond rows·cols is padding. */
size_t cuda_plan_count(const struct cuda_layout *l, uint32_t rows);

/* The copies from the device buffer to the [rows, out] row-major host output of elem-byte
 * elements. GATHER_NCCL: rank 0 copies every rank q's block, cols_q wide, to column row0_q
 * (nranks copies); other ranks none. GATHER_HOST: each rank copies its own shard to its columns
 * (one copy). c has room for nranks entries. Returns the number of copies. */
int cuda_plan_copyout(const struct cuda_layout *l, uint32_t rows, size_t elem,
                      struct cuda_copy2d *c);

/* Staging, for an arena that could not be pinned: a device-to-host copy into pageable memory
 * blocks the calling thread until the stream reaches it, and after an all-gather that means until
 * the collective ends, however long a stuck peer makes it. So the copies go to a pinned stage
 * instead, and the host moves the stage into the output after its bounded wait.
 *
 * The bytes of the stage for jobs of up to max_batch rows of elem-byte elements: rank 0 of the
 * NCCL gather stages the whole [rows, out] output, another rank of it nothing (it copies nothing
 * out), a rank of the host gather its own dense [rows, cols]. */
size_t cuda_plan_stage_bytes(const struct cuda_layout *l, uint32_t max_batch, size_t elem);

/* to_stage[i] = to_y[i] (n copies from cuda_plan_copyout) redirected into the stage, which holds
 * at most cuda_plan_stage_bytes. */
void cuda_plan_stage(const struct cuda_layout *l, const struct cuda_copy2d *to_y, int n,
                     struct cuda_copy2d *to_stage);

/* On the host, after the device copies to_stage ran: moves what they wrote into the stage to
 * where to_y would have written it in y. Writes exactly the bytes to_y would. */
void cuda_plan_unstage(const struct cuda_copy2d *to_y, const struct cuda_copy2d *to_stage, int n,
                       const void *stage, void *y);

/* The smallest magnitude that round-to-nearest-even turns into an infinity when a float32 is
 * converted to dt: 65520 for TP_F16, 0x1.fep127 + 2^119 (3.3962e38) for TP_BF16; INFINITY for
 * any other dtype (nothing overflows). */
float cuda_plan_half_limit(enum tp_dtype dt);

/* The index of the first finite v[i] that becomes ±infinity converted to dt (|v[i]| >=
 * cuda_plan_half_limit(dt)), or SIZE_MAX when none does. Infinities and NaNs stay what they are
 * and are not counted. */
size_t cuda_plan_first_overflow(const float *v, size_t n, enum tp_dtype dt);

/* Sets err to "CALL: LIBMSG" where CALL is the function name of call_text (the text before its
 * first '(', after a table's "name." if the call goes through one), e.g. "cudaMalloc: out of
 * memory" for "cudaMalloc(&p, n)" and "cublasSgemm: ..." for "blas.cublasSgemm(h, ...)".
 * Returns -1. */
int cuda_call_error(struct tp_err *err, enum tp_code code, const char *call_text,
                    const char *lib_msg);

#endif
