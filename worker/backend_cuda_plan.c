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
 * row-major product.
 *
 * The gather with an uneven split. Rank q owns columns [row0_q, row0_q + cols_q) of y, and
 * cols_q is pad or pad - 1 (pad = cols_0). Each rank's GEMM writes its dense [rows, cols_q]
 * shard at element q·rows·pad of a [nranks][rows·pad] buffer; ncclAllGather with count rows·pad
 * then gives every rank all blocks, each followed by rows·(pad - cols_q) elements of padding.
 * Rank 0 copies block q with source pitch cols_q (the shard is dense), width cols_q and
 * destination pitch out to column row0_q, so no padding element is ever copied: the widths sum
 * to out and the ranges tile [0, out). Writing the shard dense, rather than with row pitch pad,
 * keeps the GEMM and the bias kernel the same for both gathers. */
#include "backend_cuda_plan.h"

#include <assert.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "plan.h"

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

int cuda_plan_layout(struct cuda_layout *l, enum backend_gather g, int64_t out, int nranks,
                     int rank, struct tp_err *err)
{
    int64_t row0, cols, row0_0, pad;

    if (plan_split(out, nranks, rank, &row0, &cols, err) < 0 ||
        plan_split(out, nranks, 0, &row0_0, &pad, err) < 0)
        return -1;
    *l = (struct cuda_layout){.gather = g,
                              .rank = rank,
                              .nranks = nranks,
                              .out = out,
                              .row0 = row0,
                              .cols = cols,
                              .pad = pad};
    return 0;
}

size_t cuda_plan_buffer(const struct cuda_layout *l, uint32_t max_batch)
{
    if (l->gather == BACKEND_GATHER_NCCL)
        return (size_t)l->nranks * (size_t)max_batch * (size_t)l->pad;
    return (size_t)max_batch * (size_t)l->cols;
}

size_t cuda_plan_block(const struct cuda_layout *l, uint32_t rows)
{
    if (l->gather != BACKEND_GATHER_NCCL)
        return 0;
    return (size_t)l->rank * cuda_plan_count(l, rows);
}

size_t cuda_plan_count(const struct cuda_layout *l, uint32_t rows)
{
    return (size_t)rows * (size_t)l->pad;
}

int cuda_plan_copyout(const struct cuda_layout *l, uint32_t rows, size_t elem,
                      struct cuda_copy2d *c)
{
    size_t dpitch = (size_t)l->out * elem;          /* bytes of a whole output row */
    size_t block = cuda_plan_count(l, rows) * elem; /* bytes of one padded rank block */

    if (l->gather == BACKEND_GATHER_HOST) {
        c[0] = (struct cuda_copy2d){.dst_off = (size_t)l->row0 * elem,
                                    .dpitch = dpitch,
                                    .src_off = 0,
                                    .spitch = (size_t)l->cols * elem,
                                    .width = (size_t)l->cols * elem,
                                    .height = rows};
        return 1;
    }
    if (l->rank != 0)
        return 0;
    for (int q = 0; q < l->nranks; q++) {
        int64_t row0 = 0, cols = 0;
        struct tp_err err;
        int rc = plan_split(l->out, l->nranks, q, &row0, &cols, &err);

        /* cuda_plan_layout checked out and nranks, so every rank's split exists */
        assert(rc == 0);
        (void)rc;
        c[q] = (struct cuda_copy2d){.dst_off = (size_t)row0 * elem,
                                    .dpitch = dpitch,
                                    .src_off = (size_t)q * block,
                                    .spitch = (size_t)cols * elem,
                                    .width = (size_t)cols * elem,
                                    .height = rows};
    }
    return l->nranks;
}

size_t cuda_plan_stage_bytes(const struct cuda_layout *l, uint32_t max_batch, size_t elem)
{
    if (l->gather == BACKEND_GATHER_HOST)
        return (size_t)max_batch * (size_t)l->cols * elem;
    return l->rank == 0 ? (size_t)max_batch * (size_t)l->out * elem : 0;
}

void cuda_plan_stage(const struct cuda_layout *l, const struct cuda_copy2d *to_y, int n,
                     struct cuda_copy2d *to_stage)
{
    for (int i = 0; i < n; i++) {
        to_stage[i] = to_y[i];
        /* the host gather's one copy lands dense at the start of the stage; rank 0's copies of
         * the NCCL gather already tile [rows, out], which is what the stage holds */
        if (l->gather == BACKEND_GATHER_HOST) {
            to_stage[i].dst_off = 0;
            to_stage[i].dpitch = to_y[i].width;
        }
    }
}

void cuda_plan_unstage(const struct cuda_copy2d *to_y, const struct cuda_copy2d *to_stage, int n,
                       const void *stage, void *y)
{
    for (int i = 0; i < n; i++)
        for (size_t h = 0; h < to_y[i].height; h++)
            memcpy((char *)y + to_y[i].dst_off + h * to_y[i].dpitch,
                   (const char *)stage + to_stage[i].dst_off + h * to_stage[i].dpitch,
                   to_y[i].width);
}

float cuda_plan_half_limit(enum tp_dtype dt)
{
    /* FP16: the largest finite value is 65504 = (2 - 2^-10)·2^15, the next step would be 65536;
     * from their midpoint 65520 on, round-to-nearest-even goes up (65504's last bit is odd).
     * BF16: the largest finite value is 0x7f7f (3.3895e38); from the midpoint to 2^128, the
     * float 0x7f7f8000, rounding goes up for the same reason. */
    uint32_t bits = 0x7f7f8000u;
    float f;

    switch (dt) {
    case TP_F16: return 65520.0f;
    case TP_BF16: memcpy(&f, &bits, sizeof(f)); return f;
    default: return INFINITY;
    }
}

size_t cuda_plan_first_overflow(const float *v, size_t n, enum tp_dtype dt)
{
    float limit = cuda_plan_half_limit(dt);

    if (isinf(limit))
        return SIZE_MAX;
    for (size_t i = 0; i < n; i++)
        if (fabsf(v[i]) >= limit && isfinite(v[i]))
            return i;
    return SIZE_MAX;
}

int cuda_call_error(struct tp_err *err, enum tp_code code, const char *call_text,
                    const char *lib_msg)
{
    size_t n = strcspn(call_text, "("), start = 0;

    while (n > 0 && call_text[n - 1] == ' ')
        n--;
    /* "blas.cublasSgemm(...)", a call through a loaded library's table: the function's name */
    for (size_t i = 0; i < n; i++)
        if (call_text[i] == '.' || call_text[i] == '>')
            start = i + 1;
    n -= start;
    return tp_err_set(err, code, "%.*s: %s", (int)(n < 80 ? n : 80), call_text + start,
                      lib_msg ? lib_msg : "unknown error");
}
