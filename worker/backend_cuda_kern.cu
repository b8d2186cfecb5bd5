/* backend_cuda_kern.cu -- the kernels of backend_cuda_kern.h. Grid-stride loops over size_t
 * indices, so any size runs with a bounded grid. */
#include "backend_cuda_kern.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define THREADS 256
#define MAX_BLOCKS 4096

static unsigned int blocks_for(size_t n)
{
    size_t b = (n + THREADS - 1) / THREADS;

    return (unsigned int)(b < 1 ? 1 : (b > MAX_BLOCKS ? MAX_BLOCKS : b));
}

__global__ void to_f16(__half *dst, const float *src, size_t n)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        dst[i] = __float2half_rn(src[i]);
}

__global__ void to_bf16(__nv_bfloat16 *dst, const float *src, size_t n)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        dst[i] = __float2bfloat16_rn(src[i]);
}

__global__ void fill_bias(float *y, const float *b, size_t n, uint32_t cols)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        y[i] = b[i % cols];
}

extern "C" cudaError_t cuda_kern_to_half(void *dst, const float *src, size_t n, int bf16,
                                         cudaStream_t st)
{
    if (n == 0)
        return cudaSuccess;
    if (bf16)
        to_bf16<<<blocks_for(n), THREADS, 0, st>>>((__nv_bfloat16 *)dst, src, n);
    else
        to_f16<<<blocks_for(n), THREADS, 0, st>>>((__half *)dst, src, n);
    return cudaGetLastError();
}

extern "C" cudaError_t cuda_kern_fill_bias(float *y, const float *b, uint32_t rows, uint32_t cols,
                                           cudaStream_t st)
{
    size_t n = (size_t)rows * cols;

    if (n == 0)
        return cudaSuccess;
    fill_bias<<<blocks_for(n), THREADS, 0, st>>>(y, b, n, cols);
    return cudaGetLastError();
}
