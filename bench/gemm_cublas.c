/* gemm_cublas.c -- cuBLAS GEMM throughput on one GPU, the ceiling tpd's forward is compared
 * with: n x n x n products in FP32 (cublasSgemm, CUBLAS_DEFAULT_MATH: no TF32), TF32
 * (cublasSgemm with CUBLAS_TF32_TENSOR_OP_MATH) and BF16 (cublasGemmEx, BF16 inputs, FP32
 * accumulation and FP32 output, as tpd's --dtype bf16 does). Timed with CUDA events after a
 * warm-up; prints one line per mode. Exits 77 with the reason when no GPU is usable.
 *
 * Then one job of a tpd worker, in parts, for 1, 64 and 1024 rows of an n -> n FP32 layer: the
 * input's copy from pinned host memory to the device, the GEMM, the output's copy back, each
 * timed alone. A worker runs them one after the other on one stream; overlapping the next job's
 * input copy with this job's GEMM and output copy (two streams) would save at most
 * min(H2D, GEMM + D2H) per job of back-to-back jobs: the line says how much of the job that is,
 * which is what decides whether that overlap is worth building.
 *
 *   gemm_cublas [--n 4096] [--iters 20] [--device 0] */
#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHECK_CUDA(call)                                                                           \
    do {                                                                                           \
        cudaError_t e_ = (call);                                                                   \
        if (e_ != cudaSuccess) {                                                                   \
            fprintf(stderr, "gemm_cublas: %s: %s\n", #call, cudaGetErrorString(e_));               \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)

#define CHECK_BLAS(call)                                                                           \
    do {                                                                                           \
        cublasStatus_t s_ = (call);                                                                \
        if (s_ != CUBLAS_STATUS_SUCCESS) {                                                         \
            fprintf(stderr, "gemm_cublas: %s: %s\n", #call, cublasGetStatusString(s_));            \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)

enum mode { FP32, TF32, BF16 };

static uint16_t to_bf16(float f)
{
    uint32_t u;

    memcpy(&u, &f, sizeof(u));
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* c [rows, n] = b [rows, n] · a [n, n]ᵀ, row-major: column-major aᵀ·b, as tpd's worker calls it */
static void gemm(cublasHandle_t h, enum mode m, int n, int rows, const void *a, const void *b,
                 float *c)
{
    const float one = 1.0f, zero = 0.0f;

    if (m == BF16)
        CHECK_BLAS(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, n, rows, n, &one, a, CUDA_R_16BF, n, b,
                                CUDA_R_16BF, n, &zero, c, CUDA_R_32F, n, CUBLAS_COMPUTE_32F,
                                CUBLAS_GEMM_DEFAULT));
    else
        CHECK_BLAS(cublasSgemm(h, CUBLAS_OP_T, CUBLAS_OP_N, n, rows, n, &one, (const float *)a, n,
                               (const float *)b, n, &zero, c, n));
}

/* The milliseconds of one of iters runs of what work enqueues (on the legacy default stream),
 * after one warm-up run. */
#define TIME_MS(iters, t0, t1, work)                                                               \
    __extension__({                                                                                \
        float ms_ = 0;                                                                             \
        work;                                                                                      \
        CHECK_CUDA(cudaEventRecord((t0), 0));                                                      \
        for (int i_ = 0; i_ < (iters); i_++)                                                       \
            work;                                                                                  \
        CHECK_CUDA(cudaEventRecord((t1), 0));                                                      \
        CHECK_CUDA(cudaEventSynchronize(t1));                                                      \
        CHECK_CUDA(cudaEventElapsedTime(&ms_, (t0), (t1)));                                        \
        ms_ / (float)(iters);                                                                      \
    })

/* One worker job's parts at rows rows of an n -> n FP32 layer (see the top of the file). x and y
 * are pinned host buffers of n·n floats; a the weights, b and c device buffers of as many. */
static void job_parts(cublasHandle_t h, int n, int iters, const void *a, float *b, float *c,
                      float *x, float *y, cudaEvent_t t0, cudaEvent_t t1)
{
    static const int rows_of[] = {1, 64, 1024};

    CHECK_BLAS(cublasSetMathMode(h, CUBLAS_DEFAULT_MATH));
    for (size_t r = 0; r < sizeof(rows_of) / sizeof(rows_of[0]); r++) {
        int rows = rows_of[r] < n ? rows_of[r] : n;
        size_t bytes = (size_t)rows * (size_t)n * sizeof(float);
        float h2d, mm, d2h, saved;

        h2d = TIME_MS(iters, t0, t1,
                      CHECK_CUDA(cudaMemcpyAsync(b, x, bytes, cudaMemcpyHostToDevice, 0)));
        mm = TIME_MS(iters, t0, t1, gemm(h, FP32, n, rows, a, b, c));
        d2h = TIME_MS(iters, t0, t1,
                      CHECK_CUDA(cudaMemcpyAsync(y, c, bytes, cudaMemcpyDeviceToHost, 0)));
        saved = h2d < mm + d2h ? h2d : mm + d2h;
        printf("job %d rows fp32 %dx%d: H2D %.3f ms, GEMM %.3f ms, D2H %.3f ms: overlapping the "
               "next job's H2D saves at most %.0f%% of %.3f ms\n",
               rows, n, n, h2d, mm, d2h, 100.0 * saved / (h2d + mm + d2h), h2d + mm + d2h);
    }
}

int main(int argc, char **argv)
{
    static const char *const names[] = {"fp32", "tf32", "bf16"};
    int n = 4096, iters = 20, device = 0, count = 0;
    size_t elems;
    float *host, *c, *xpin, *ypin;
    uint16_t *host16;
    void *a32, *b32, *a16, *b16;
    cublasHandle_t h;
    cudaEvent_t t0, t1;
    cudaError_t e;

    for (int i = 1; i + 1 < argc; i += 2) {
        if (strcmp(argv[i], "--n") == 0)
            n = atoi(argv[i + 1]);
        else if (strcmp(argv[i], "--iters") == 0)
            iters = atoi(argv[i + 1]);
        else if (strcmp(argv[i], "--device") == 0)
            device = atoi(argv[i + 1]);
        else {
            fprintf(stderr, "usage: gemm_cublas [--n N] [--iters K] [--device D]\n");
            return 64;
        }
    }
    if (n < 1 || n > 32768 || iters < 1) {
        fprintf(stderr, "gemm_cublas: --n takes 1 to 32768 and --iters at least 1\n");
        return 64;
    }
    e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess || count < 1) {
        printf("gemm_cublas: no usable GPU: %s\n",
               e != cudaSuccess ? cudaGetErrorString(e) : "no CUDA device is visible");
        return 77;
    }
    CHECK_CUDA(cudaSetDevice(device));
    elems = (size_t)n * (size_t)n;
    host = malloc(elems * sizeof(float));
    host16 = malloc(elems * sizeof(uint16_t));
    if (!host || !host16) {
        fprintf(stderr, "gemm_cublas: no memory for %d x %d\n", n, n);
        return 1;
    }
    srand(1);
    for (size_t i = 0; i < elems; i++) {
        host[i] = (float)rand() / (float)RAND_MAX - 0.5f;
        host16[i] = to_bf16(host[i]);
    }
    CHECK_CUDA(cudaMalloc(&a32, elems * sizeof(float)));
    CHECK_CUDA(cudaMalloc(&b32, elems * sizeof(float)));
    CHECK_CUDA(cudaMalloc((void **)&c, elems * sizeof(float)));
    CHECK_CUDA(cudaMalloc(&a16, elems * sizeof(uint16_t)));
    CHECK_CUDA(cudaMalloc(&b16, elems * sizeof(uint16_t)));
    CHECK_CUDA(cudaMemcpy(a32, host, elems * sizeof(float), cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemcpy(b32, host, elems * sizeof(float), cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemcpy(a16, host16, elems * sizeof(uint16_t), cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemcpy(b16, host16, elems * sizeof(uint16_t), cudaMemcpyHostToDevice));
    CHECK_BLAS(cublasCreate(&h));
    CHECK_CUDA(cudaEventCreate(&t0));
    CHECK_CUDA(cudaEventCreate(&t1));
    for (int m = FP32; m <= BF16; m++) {
        const void *a = m == BF16 ? a16 : a32, *b = m == BF16 ? b16 : b32;
        float ms = 0;
        double tflops;

        CHECK_BLAS(
            cublasSetMathMode(h, m == TF32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH));
        for (int i = 0; i < 2; i++)
            gemm(h, (enum mode)m, n, n, a, b, c);
        ms = TIME_MS(iters, t0, t1, gemm(h, (enum mode)m, n, n, a, b, c));
        tflops = 2.0 * n * (double)n * n / (ms * 1e-3) * 1e-12;
        printf("gemm %s %dx%dx%d: %.1f TFLOP/s (%.3f ms per GEMM, %d GEMMs)\n", names[m], n, n, n,
               tflops, ms, iters);
    }
    CHECK_CUDA(cudaMallocHost((void **)&xpin, elems * sizeof(float)));
    CHECK_CUDA(cudaMallocHost((void **)&ypin, elems * sizeof(float)));
    memcpy(xpin, host, elems * sizeof(float));
    job_parts(h, n, iters, a32, b32, c, xpin, ypin, t0, t1);
    cudaFreeHost(xpin);
    cudaFreeHost(ypin);
    cublasDestroy(h);
    cudaFree(a32);
    cudaFree(b32);
    cudaFree(c);
    cudaFree(a16);
    cudaFree(b16);
    free(host);
    free(host16);
    return 0;
}
