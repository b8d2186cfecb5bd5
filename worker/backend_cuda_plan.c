/* backend_cuda_plan.c -- the host-side arithmetic of the cuda backend (see backend_cuda_plan.h).
 *
 * The GEMM in cuBLAS's column-major terms. A row-major matrix M [r, c] with row pitch p is, read
 * column-major, Mᵀ [c, r] with leading dimension p. So in column-major terms:
 *
 *   x   [rows, in]   row-major is  Xᵀ [in, rows]   ld = in
 *   W_r [cols, in]   row-major is  Wᵀ [in, cols]   ld = in
 *   y_r [rows, cols] row-major is  Yᵀ [cols, rows] ld = cols
 *
 * We want y_r = x·Wᵀ, i.e. Yᵀ = (x·Wᵀ)ᵀ = W·xᵀ: a [cols, rows] result, so m = cols, n = rows,
 * k = in. op(A) must be W [cols, in]; A in memory is Wᵀ (column-major [in, cols], lda = in), so
 * transa = T. op(B) must be xᵀ [in, rows], which is exactly what B in memory is (column-major
 * [in, rows], ldb = in), so transb = N. C is Yᵀ, ldc = cols. Hence
 *
 *   cublasSgemm(h, CUBLAS_OP_T, CUBLAS_OP_N, cols, rows, in, &alpha, W, in, x, in, &beta, y, cols)
 *
 * and the same arguments for cublasGemmEx. tests/gpu/test_cuda_plan.c runs exactly these
 * parameters through a column-major GEMM written from the BLAS definition and compares with the
 * row-major product. */
#include "backend_cuda_plan.h"

#include <limits.h>
#include <string.h>

int cuda_plan_gemm(uint32_t rows, int64_t cols, int64_t in, struct cuda_gemm_shape *g,
                   struct tp_err *err)
{
    if (rows < 1 || rows > INT_MAX || cols < 1 || cols > INT_MAX || in < 1 || in > INT_MAX)
        return tp_err_set(err, TP_EINVAL, "gemm of %u x %lld x %lld does not fit cuBLAS's int",
                          rows, (long long)cols, (long long)in);
    *g = (struct cuda_gemm_shape){.trans_a = 1,
                                  .trans_b = 0,
                                  .m = (int)cols,
                                  .n = (int)rows,
                                  .k = (int)in,
                                  .lda = (int)in,
                                  .ldb = (int)in,
                                  .ldc = (int)cols};
    return 0;
}

size_t cuda_plan_block(enum backend_gather g, int rank, uint32_t rows, int64_t cols)
{
    if (g != BACKEND_GATHER_NCCL)
        return 0;
    return (size_t)rank * (size_t)rows * (size_t)cols;
}

int cuda_plan_copyout(enum backend_gather g, int rank, int nranks, uint32_t rows, int64_t cols,
                      size_t elem, struct cuda_copy2d *c)
{
    size_t width = (size_t)cols * elem;     /* bytes of one rank's part of a row */
    size_t dpitch = width * (size_t)nranks; /* bytes of a whole output row */
    size_t block = width * (size_t)rows;    /* bytes of one rank block after the gather */

    if (g == BACKEND_GATHER_HOST) {
        c[0] = (struct cuda_copy2d){.dst_off = (size_t)rank * width,
                                    .dpitch = dpitch,
                                    .src_off = 0,
                                    .spitch = width,
                                    .width = width,
                                    .height = rows};
        return 1;
    }
    if (rank != 0)
        return 0;
    for (int q = 0; q < nranks; q++)
        c[q] = (struct cuda_copy2d){.dst_off = (size_t)q * width,
                                    .dpitch = dpitch,
                                    .src_off = (size_t)q * block,
                                    .spitch = width,
                                    .width = width,
                                    .height = rows};
    return nranks;
}

int cuda_call_error(struct tp_err *err, enum tp_code code, const char *call_text,
                    const char *lib_msg)
{
    size_t n = strcspn(call_text, "(");

    while (n > 0 && call_text[n - 1] == ' ')
        n--;
    return tp_err_set(err, code, "%.*s: %s", (int)(n < 80 ? n : 80), call_text,
                      lib_msg ? lib_msg : "unknown error");
}
