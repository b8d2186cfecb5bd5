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

/* An element that was finite and became an infinity: the conversion overflowed. Only such an
 * element touches first_inf, so a job without one costs a compare per element. */
__device__ static void note_overflow(unsigned long long *first_inf, float v, float h, size_t i)
{
    if (first_inf && isinf(h) && !isinf(v))
        atomicMin(first_inf, (unsigned long long)i);
}

__global__ void to_f16(__half *dst, const float *src, size_t n, unsigned long long *first_inf)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        __half h = __float2half_rn(src[i]);

        dst[i] = h;
        note_overflow(first_inf, src[i], __half2float(h), i);
    }
}

__global__ void to_bf16(__nv_bfloat16 *dst, const float *src, size_t n,
                        unsigned long long *first_inf)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        __nv_bfloat16 h = __float2bfloat16_rn(src[i]);

        dst[i] = h;
        note_overflow(first_inf, src[i], __bfloat162float(h), i);
    }
}

__global__ void fill_bias(float *y, const float *b, size_t n, uint32_t cols)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        y[i] = b[i % cols];
}

extern "C" cudaError_t cuda_kern_to_half(void *dst, const float *src, size_t n, int bf16,
                                         unsigned long long *first_inf, cudaStream_t st)
{
    if (n == 0)
        return cudaSuccess;
    if (bf16)
        to_bf16<<<blocks_for(n), THREADS, 0, st>>>((__nv_bfloat16 *)dst, src, n, first_inf);
    else
        to_f16<<<blocks_for(n), THREADS, 0, st>>>((__half *)dst, src, n, first_inf);
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

/* As worker/block.c computes them: 1 + erf(t/√2) as erfc(-t/√2), 0.5·(1 + tanh(u)) as
 * sigmoid(2u), so that nothing cancels for negative t. */
__device__ static float act1(int act, float t)
{
    switch (act) {
    case 1: return t / (1.0f + expf(-t));
    case 2: return 0.5f * t * erfcf(-t * 0.70710678118654752f);
    case 3: return t / (1.0f + expf(-1.5957691216057308f * (t + 0.044715f * t * t * t)));
    case 4: return t > 0.0f || isnan(t) ? t : 0.0f;
    default: return t;
    }
}

__global__ void act_kernel(float *h, const float *t, size_t ldt, size_t n_all, uint32_t n,
                           int act, int gated)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n_all;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t r = i / n, j = i % n;
        const float *tr = t + r * ldt;
        float v = act1(act, tr[j]);

        h[i] = gated ? v * tr[n + j] : v;
    }
}

extern "C" cudaError_t cuda_kern_act(float *h, const float *t, size_t ldt, uint32_t rows, uint32_t n,
                                     int act, int gated, cudaStream_t st)
{
    size_t n_all = (size_t)rows * n;

    if (n_all == 0)
        return cudaSuccess;
    act_kernel<<<blocks_for(n_all), THREADS, 0, st>>>(h, t, ldt, n_all, n, act, gated);
    return cudaGetLastError();
}
