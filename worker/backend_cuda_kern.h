/* backend_cuda_kern.h -- the few device kernels of the cuda backend, callable from C: float32 to
 * FP16/BF16 conversion (weights once at start, activations per forward) and the broadcast of the
 * bias into the output before a GEMM with beta = 1. Each launches on the given stream and returns
 * the launch's error (cudaGetLastError), never synchronizing. Built for sm_80 and sm_90. */
#ifndef TP_BACKEND_CUDA_KERN_H
#define TP_BACKEND_CUDA_KERN_H

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

/* dst[i] = round-to-nearest-even(src[i]) as FP16 (bf16 == 0) or BF16 (bf16 != 0), i < n. */
cudaError_t cuda_kern_to_half(void *dst, const float *src, size_t n, int bf16, cudaStream_t st);

/* y[i, j] = b[j] for i < rows, j < cols (y row-major, dense). */
cudaError_t cuda_kern_fill_bias(float *y, const float *b, uint32_t rows, uint32_t cols,
                                cudaStream_t st);

#ifdef __cplusplus
}
#endif

#endif
