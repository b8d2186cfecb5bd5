/* backend_cuda_plan.h -- the host-side arithmetic of the cuda backend: where the GEMM writes, the
 * cuBLAS parameters of y = x·Wᵀ in column-major terms, the copies that undo the all-gather's
 * layout, and the text of a failed CUDA, cuBLAS or NCCL call. Nothing here calls CUDA, so the
 * unit tests check all of it on machines without a GPU (tests/gpu/test_cuda_plan.c).
 *
 * The layout trap: ncclAllGather concatenates the ranks' buffers, so after it the device holds
 * [nranks][rows][cols] (cols = out / nranks), not [rows][out]. Rank q's block must land at column
 * q·cols of every output row: one strided 2-D copy per rank block (cudaMemcpy2DAsync). With
 * rows == 1 the two layouts coincide, which is why tests need rows > 1 and nranks > 1. */
#ifndef TP_BACKEND_CUDA_PLAN_H
#define TP_BACKEND_CUDA_PLAN_H

#include <stddef.h>
#include <stdint.h>

#include "backend.h"
#include "err.h"

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

/* The GEMM that computes a rank's shard y_r [rows, cols] = x [rows, in] · W_r [cols, in]ᵀ with
 * every matrix row-major and dense, y_r written with row pitch cols. Fails (TP_EINVAL) when a
 * dimension does not fit cuBLAS's int. */
int cuda_plan_gemm(uint32_t rows, int64_t cols, int64_t in, struct cuda_gemm_shape *g,
                   struct tp_err *err);

/* Element offset in the device output buffer where this rank's GEMM writes its [rows, cols]
 * block: rank·rows·cols with NCCL, so that the all-gather runs in place (NCCL's rule: sendbuff
 * == recvbuff + rank·sendcount); 0 with the host gather, whose buffer holds only this rank. */
size_t cuda_plan_block(enum backend_gather g, int rank, uint32_t rows, int64_t cols);

/* The copies from the device buffer to the [rows, nranks·cols] row-major host output of elem-byte
 * elements. GATHER_NCCL: rank 0 copies every rank block (nranks copies), other ranks none.
 * GATHER_HOST: each rank copies its own block to its columns (one copy). c has room for nranks
 * entries. Returns the number of copies. */
int cuda_plan_copyout(enum backend_gather g, int rank, int nranks, uint32_t rows, int64_t cols,
                      size_t elem, struct cuda_copy2d *c);

/* Sets err to "CALL: LIBMSG" where CALL is the function name of call_text (the text before its
 * first '('), e.g. "cudaMalloc: out of memory". Returns -1. */
int cuda_call_error(struct tp_err *err, enum tp_code code, const char *call_text,
                    const char *lib_msg);

#endif
