/* cublas.c -- the emulated device's cuBLAS (libcublas.so.MAJOR of the emulator's folder): the
 * calls of worker/backend_cuda.c, with cuBLAS's documented semantics (column-major matrices,
 * op(A) m x k, op(B) k x n, C m x n, leading dimensions, alpha and beta read from the host at
 * the call). The GEMM runs on the handle's stream, accumulating in double, after checking that
 * every matrix lies within its allocation as its leading dimension spans it. Inputs are rounded
 * to TF32 (10 mantissa bits) where cuBLAS would use TF32 tensor cores. */
#include <cblas.h>
#include <cublas_v2.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cudaemu.h"

struct cublasContext {
    cudaStream_t stream;
    void *ws; /* the workspace set, bound in the runtime; NULL for none */
    cublasMath_t math;
    int live;
    struct cublasContext *next_all; /* every handle ever made (reachable for leak checkers) */
};

static struct {
    pthread_mutex_t mu;
    struct cublasContext *all;
} handles = {.mu = PTHREAD_MUTEX_INITIALIZER};

cublasStatus_t cublasCreate_v2(cublasHandle_t *h)
{
    *h = calloc(1, sizeof(**h));
    if (!*h)
        return CUBLAS_STATUS_ALLOC_FAILED;
    (*h)->live = 1;
    pthread_mutex_lock(&handles.mu);
    (*h)->next_all = handles.all;
    handles.all = *h;
    pthread_mutex_unlock(&handles.mu);
    return CUBLAS_STATUS_SUCCESS;
}

/* The struct stays, marked dead, so that a use after destroy is recognised. */
cublasStatus_t cublasDestroy_v2(cublasHandle_t h)
{
    if (!h || !h->live)
        return CUBLAS_STATUS_NOT_INITIALIZED;
    cudaemu_bind_workspace(h->ws, 0);
    h->ws = NULL;
    h->live = 0;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetStream_v2(cublasHandle_t h, cudaStream_t s)
{
    if (!h || !h->live)
        return CUBLAS_STATUS_NOT_INITIALIZED;
    h->stream = s;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetMathMode(cublasHandle_t h, cublasMath_t mode)
{
    if (!h || !h->live)
        return CUBLAS_STATUS_NOT_INITIALIZED;
    h->math = mode;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetWorkspace_v2(cublasHandle_t h, void *ws, size_t bytes)
{
    if (!h || !h->live)
        return CUBLAS_STATUS_NOT_INITIALIZED;
    if (ws)
        cudaemu_dev(ws, bytes, "cublasSetWorkspace", "the workspace");
    cudaemu_bind_workspace(h->ws, 0);
    h->ws = ws;
    cudaemu_bind_workspace(ws, 1);
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGetProperty(libraryPropertyType type, int *value)
{
    switch (type) {
    case MAJOR_VERSION: *value = CUBLAS_VER_MAJOR; return CUBLAS_STATUS_SUCCESS;
    case MINOR_VERSION: *value = CUBLAS_VER_MINOR; return CUBLAS_STATUS_SUCCESS;
    case PATCH_LEVEL: *value = CUBLAS_VER_PATCH; return CUBLAS_STATUS_SUCCESS;
    default: return CUBLAS_STATUS_INVALID_VALUE;
    }
}

const char *cublasGetStatusString(cublasStatus_t s)
{
    switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "the operation completed successfully";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "the library was not initialized";
    case CUBLAS_STATUS_ALLOC_FAILED: return "the resource allocation failed";
    case CUBLAS_STATUS_INVALID_VALUE: return "an invalid numeric value was used as an argument";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "the functionality requested is not supported";
    default: return "unknown error";
    }
}

/* One matrix of a GEMM: column-major, rows x cols, ld elements between columns. */
struct mat {
    const void *p; /* the emulator's address */
    cudaDataType type;
    int64_t rows, cols, ld;
};

struct gemm_job {
    int trans_a, trans_b, tf32;
    int64_t m, n, k;
    double alpha, beta;
    struct mat a, b;
    float *c;
    int64_t ldc;
};

static float tf32(float v)
{
    uint32_t u;

    if (!isfinite(v))
        return v;
    memcpy(&u, &v, sizeof(u));
    u = (u + 0xfffu + ((u >> 13) & 1u)) & ~0x1fffu;
    memcpy(&v, &u, sizeof(v));
    return v;
}

static double element(const struct mat *x, int64_t i, int64_t j, int round_tf32)
{
    size_t at = (size_t)(i + j * x->ld);
    float f;

    if (x->type != CUDA_R_32F)
        return cudaemu_half_value(((const uint16_t *)x->p)[at], x->type == CUDA_R_16BF);
    f = ((const float *)x->p)[at];
    return round_tf32 ? tf32(f) : f;
}

/* op(X) densely as doubles, [rows of op(X)] x [cols of op(X)], column-major. */
static double *dense(const struct mat *x, int trans, int64_t rows, int64_t cols, int round_tf32)
{
    double *d = malloc((size_t)(rows * cols) * sizeof(double) + 1);

    if (!d)
        cudaemu_fatal("cublas GEMM: out of host memory");
    for (int64_t j = 0; j < cols; j++)
        for (int64_t i = 0; i < rows; i++)
            d[i + j * rows] = trans ? element(x, j, i, round_tf32) : element(x, i, j, round_tf32);
    return d;
}

static void run_gemm(void *arg)
{
    const struct gemm_job *g = arg;
    /* op(A) as its transpose (k x m) and op(B) (k x n), dense: the layouts are settled here */
    double *at = dense(&g->a, !g->trans_a, g->k, g->m, g->tf32);
    double *b = dense(&g->b, g->trans_b, g->k, g->n, g->tf32);

    double *c = malloc((size_t)(g->m * g->n) * sizeof(double) + 1);

    if (!c)
        cudaemu_fatal("cublas GEMM: out of host memory");
    /* c = op(A) op(B), column-major m x n: OpenBLAS's double GEMM on the dense copies */
    cblas_dgemm(CblasColMajor, CblasTrans, CblasNoTrans, (blasint)g->m, (blasint)g->n,
                (blasint)g->k, 1.0, at, (blasint)g->k, b, (blasint)g->k, 0.0, c, (blasint)g->m);
    for (int64_t j = 0; j < g->n; j++)
        for (int64_t i = 0; i < g->m; i++) {
            float *out = g->c + i + j * g->ldc;

            *out =
                (float)(g->alpha * c[i + j * g->m] + (g->beta != 0 ? g->beta * (double)*out : 0.0));
        }
    free(at);
    free(b);
    free(c);
}

static size_t type_size(cudaDataType t)
{
    return t == CUDA_R_32F ? 4 : t == CUDA_R_16F || t == CUDA_R_16BF ? 2 : 0;
}

/* Checks x (rows x cols with leading dimension ld, of type t) and returns its description. */
static struct mat matrix(const void *p, cudaDataType t, int64_t rows, int64_t cols, int64_t ld,
                         const char *call, const char *what)
{
    size_t extent = rows && cols ? (size_t)((cols - 1) * ld + rows) * type_size(t) : 0;

    return (struct mat){.p = extent ? cudaemu_dev(p, extent, call, what) : p,
                        .type = t,
                        .rows = rows,
                        .cols = cols,
                        .ld = ld};
}

/* The GEMM of both entry points, which have checked h. */
static cublasStatus_t gemm(cublasHandle_t h, const char *call, cublasOperation_t ta,
                           cublasOperation_t tb, int m, int n, int k, double alpha, const void *A,
                           cudaDataType at, int lda, const void *B, cudaDataType bt, int ldb,
                           double beta, float *C, int ldc, int round_tf32)
{
    int trans_a = ta != CUBLAS_OP_N, trans_b = tb != CUBLAS_OP_N;
    int64_t ra = trans_a ? k : m, ca = trans_a ? m : k; /* A as stored */
    int64_t rb = trans_b ? n : k, cb = trans_b ? k : n;
    struct gemm_job g;

    if ((ta != CUBLAS_OP_N && ta != CUBLAS_OP_T) || (tb != CUBLAS_OP_N && tb != CUBLAS_OP_T) ||
        m < 0 || n < 0 || k < 0 || lda < (ra > 1 ? ra : 1) || ldb < (rb > 1 ? rb : 1) ||
        ldc < (m > 1 ? m : 1))
        return CUBLAS_STATUS_INVALID_VALUE;
    if (m == 0 || n == 0)
        return CUBLAS_STATUS_SUCCESS;
    g = (struct gemm_job){.trans_a = trans_a,
                          .trans_b = trans_b,
                          .tf32 = round_tf32,
                          .m = m,
                          .n = n,
                          .k = k,
                          .alpha = alpha,
                          .beta = beta,
                          .a = matrix(A, at, ra, ca, lda, call, "A"),
                          .b = matrix(B, bt, rb, cb, ldb, call, "B"),
                          .c = (float *)matrix(C, CUDA_R_32F, m, n, ldc, call, "C").p,
                          .ldc = ldc};
    cudaemu_enqueue(h->stream, call, run_gemm, &g, sizeof(g));
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSgemm_v2(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m,
                              int n, int k, const float *alpha, const float *A, int lda,
                              const float *B, int ldb, const float *beta, float *C, int ldc)
{
    if (!h || !h->live)
        return CUBLAS_STATUS_NOT_INITIALIZED;
    return gemm(h, "cublasSgemm", ta, tb, m, n, k, *alpha, A, CUDA_R_32F, lda, B, CUDA_R_32F, ldb,
                *beta, C, ldc, (h->math & 0xf) == CUBLAS_TF32_TENSOR_OP_MATH);
}

/* The combinations tpd uses: FP32, FP16 or BF16 inputs (A and B alike), FP32 output, FP32
 * compute; anything else is not supported here. */
cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m,
                            int n, int k, const void *alpha, const void *A, cudaDataType at,
                            int lda, const void *B, cudaDataType bt, int ldb, const void *beta,
                            void *C, cudaDataType ct, int ldc, cublasComputeType_t compute,
                            cublasGemmAlgo_t algo)
{
    int round_tf32;

    if (!h || !h->live)
        return CUBLAS_STATUS_NOT_INITIALIZED;
    if (at != bt || type_size(at) == 0 || ct != CUDA_R_32F ||
        (compute != CUBLAS_COMPUTE_32F && compute != CUBLAS_COMPUTE_32F_FAST_TF32) ||
        algo != CUBLAS_GEMM_DEFAULT)
        return CUBLAS_STATUS_NOT_SUPPORTED;
    round_tf32 = at == CUDA_R_32F && (compute == CUBLAS_COMPUTE_32F_FAST_TF32 ||
                                      (h->math & 0xf) == CUBLAS_TF32_TENSOR_OP_MATH);
    return gemm(h, "cublasGemmEx", ta, tb, m, n, k, *(const float *)alpha, A, at, lda, B, bt, ldb,
                *(const float *)beta, C, ldc, round_tf32);
}
