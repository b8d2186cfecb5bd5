/* test_cuda_plan.c -- the host-side arithmetic of the cuda backend, on the CPU: the cuBLAS
 * parameters of the GEMM run through a column-major GEMM written from the BLAS definition must
 * give the row-major x·Wᵀ; the copy plan applied to a simulated all-gather buffer must give the
 * [rows, out] output for both gather modes; error texts name the call. Shapes with rows > 1,
 * nranks > 1 and cols not a power of two, where a wrong layout shows. */
#include <stdlib.h>
#include <string.h>

#include "backend_cuda_plan.h"
#include "test.h"

/* C = alpha op(A) op(B) + beta C, column-major, as the BLAS reference defines it */
static void gemm_colmajor(const struct cuda_gemm_shape *g, const float *a, const float *b,
                          float beta, float *c)
{
    for (int j = 0; j < g->n; j++)
        for (int i = 0; i < g->m; i++) {
            double acc = 0;

            for (int l = 0; l < g->k; l++) {
                float av = g->trans_a ? a[l + (size_t)i * g->lda] : a[i + (size_t)l * g->lda];
                float bv = g->trans_b ? b[j + (size_t)l * g->ldb] : b[l + (size_t)j * g->ldb];

                acc += (double)av * bv;
            }
            c[i + (size_t)j * g->ldc] = (float)(acc + beta * c[i + (size_t)j * g->ldc]);
        }
}

static float val(uint32_t seed)
{
    seed = seed * 2654435761u + 12345u;
    return (float)((seed >> 8) % 2001) / 1000.0f - 1.0f;
}

static void test_gemm_parameters(void)
{
    const uint32_t rows = 7;
    const int64_t cols = 6, in = 5;
    float x[7 * 5], w[6 * 5], bias[6], y[7 * 6];
    struct cuda_gemm_shape g;
    struct tp_err err = {0};

    for (size_t i = 0; i < sizeof(x) / sizeof(x[0]); i++)
        x[i] = val((uint32_t)i);
    for (size_t i = 0; i < sizeof(w) / sizeof(w[0]); i++)
        w[i] = val((uint32_t)i + 1000);
    for (int j = 0; j < cols; j++)
        bias[j] = val((uint32_t)j + 5000);
    ASSERT_EQ(cuda_plan_gemm(rows, cols, in, &g, &err), 0);
    ASSERT_EQ(g.trans_a, 1);
    ASSERT_EQ(g.trans_b, 0);
    /* the bias broadcast first, then beta = 1, as the backend does */
    for (uint32_t i = 0; i < rows; i++)
        memcpy(y + i * cols, bias, sizeof(bias));
    gemm_colmajor(&g, w, x, 1.0f, y);
    for (uint32_t b = 0; b < rows; b++)
        for (int64_t o = 0; o < cols; o++) {
            double ref = bias[o];

            for (int64_t k = 0; k < in; k++)
                ref += (double)x[b * in + k] * w[o * in + k];
            ASSERT_NEAR(y[b * cols + o], ref, 1e-5);
        }
}

static void test_gemm_too_big(void)
{
    struct cuda_gemm_shape g;
    struct tp_err err = {0};

    ASSERT_EQ(cuda_plan_gemm(1, (int64_t)1 << 31, 4, &g, &err), -1);
    ASSERT_EQ(err.code, TP_EINVAL);
    ASSERT_STR_HAS(err.msg, "2147483648");
}

static void copy2d(char *dst, const char *src, const struct cuda_copy2d *c)
{
    ASSERT_TRUE(c->width <= c->dpitch && c->width <= c->spitch);
    for (size_t r = 0; r < c->height; r++)
        memcpy(dst + c->dst_off + r * c->dpitch, src + c->src_off + r * c->spitch, c->width);
}

/* y[b, o] of the whole layer, the value every plan must reproduce */
static float expect(uint32_t b, int64_t o)
{
    return (float)b * 1000.0f + (float)o;
}

static void check_gather(enum backend_gather mode, int nranks, uint32_t rows, int64_t cols)
{
    int64_t out = cols * nranks;
    float *y = calloc((size_t)rows * (size_t)out, sizeof(float));
    float *dev = calloc((size_t)nranks * rows * (size_t)cols, sizeof(float));
    struct cuda_copy2d *plan = calloc((size_t)nranks, sizeof(*plan));

    ASSERT_TRUE(y && dev && plan);
    for (size_t i = 0; i < (size_t)rows * (size_t)out; i++)
        y[i] = -1.0f;
    if (mode == BACKEND_GATHER_NCCL) {
        /* each rank's GEMM writes its block in place; the all-gather leaves [N][rows][cols] */
        for (int q = 0; q < nranks; q++) {
            size_t off = cuda_plan_block(mode, q, rows, cols);

            ASSERT_EQ(off, (size_t)q * rows * (size_t)cols);
            for (uint32_t b = 0; b < rows; b++)
                for (int64_t j = 0; j < cols; j++)
                    dev[off + b * cols + j] = expect(b, q * cols + j);
        }
        for (int q = 0; q < nranks; q++) {
            int n = cuda_plan_copyout(mode, q, nranks, rows, cols, sizeof(float), plan);

            ASSERT_EQ(n, q == 0 ? nranks : 0);
            for (int i = 0; i < n; i++)
                copy2d((char *)y, (const char *)dev, &plan[i]);
        }
    } else {
        /* each rank has only its own [rows][cols] block and copies it */
        for (int q = 0; q < nranks; q++) {
            ASSERT_EQ(cuda_plan_block(mode, q, rows, cols), 0);
            for (uint32_t b = 0; b < rows; b++)
                for (int64_t j = 0; j < cols; j++)
                    dev[b * cols + j] = expect(b, q * cols + j);
            ASSERT_EQ(cuda_plan_copyout(mode, q, nranks, rows, cols, sizeof(float), plan), 1);
            copy2d((char *)y, (const char *)dev, &plan[0]);
        }
    }
    for (uint32_t b = 0; b < rows; b++)
        for (int64_t o = 0; o < out; o++)
            if (y[b * out + o] != expect(b, o))
                TEST_FAIL_("%s gather, %d ranks, %u rows, %lld cols: y[%u, %lld] = %g, expected %g",
                           mode == BACKEND_GATHER_NCCL ? "nccl" : "host", nranks, rows,
                           (long long)cols, b, (long long)o, y[b * out + o], expect(b, o));
    free(y);
    free(dev);
    free(plan);
}

static void test_copyout_layouts(void)
{
    static const uint32_t rows[] = {1, 7, 64, 1024};
    static const int nranks[] = {1, 2, 3, 8};

    for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++)
        for (size_t j = 0; j < sizeof(nranks) / sizeof(nranks[0]); j++) {
            check_gather(BACKEND_GATHER_NCCL, nranks[j], rows[i], 6);
            check_gather(BACKEND_GATHER_HOST, nranks[j], rows[i], 6);
        }
    check_gather(BACKEND_GATHER_NCCL, 2, 5, 420);
}

/* The trap the plan avoids: copying the gathered buffer flat is right only for one row. */
static void test_flat_copy_is_wrong(void)
{
    const int nranks = 2;
    const uint32_t rows = 3;
    const int64_t cols = 3;
    float dev[2 * 3 * 3], y[3 * 6];
    int wrong = 0;

    for (int q = 0; q < nranks; q++)
        for (uint32_t b = 0; b < rows; b++)
            for (int64_t j = 0; j < cols; j++)
                dev[(q * rows + b) * cols + j] = expect(b, q * cols + j);
    memcpy(y, dev, sizeof(y));
    for (uint32_t b = 0; b < rows; b++)
        for (int64_t o = 0; o < nranks * cols; o++)
            wrong += y[b * nranks * cols + o] != expect(b, o);
    ASSERT_GT(wrong, 0);
}

static void test_error_text(void)
{
    struct tp_err err = {0};

    ASSERT_EQ(cuda_call_error(&err, TP_EDEVICE, "cudaMalloc(&b->w, n * 2)", "out of memory"), -1);
    ASSERT_EQ(err.code, TP_EDEVICE);
    ASSERT_STR_EQ(err.msg, "cudaMalloc: out of memory");
    cuda_call_error(&err, TP_EUNAVAIL, "ncclAllGather", "remote process exited");
    ASSERT_STR_EQ(err.msg, "ncclAllGather: remote process exited");
    cuda_call_error(&err, TP_EDEVICE, "cublasSgemm (h, ...)", NULL);
    ASSERT_STR_EQ(err.msg, "cublasSgemm: unknown error");
}

int main(void)
{
    TEST_RUN(test_gemm_parameters);
    TEST_RUN(test_gemm_too_big);
    TEST_RUN(test_copyout_layouts);
    TEST_RUN(test_flat_copy_is_wrong);
    TEST_RUN(test_error_text);
    return 0;
}
