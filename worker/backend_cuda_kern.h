/* backend_cuda_kern.h -- the few device kernels of the cuda backend, callable from C: float32 to
 * FP16/BF16 conversion (weights once at start, activations per forward, noting the first element
 * that overflowed), the broadcast of the bias into the output before a GEMM with beta = 1, and a
 * block's activation (with the gate·up product).
 * Each launches on the given stream and returns the launch's error (cudaGetLastError), never
 * synchronizing. Built for sm_80 and sm_90. */
#ifndef TP_BACKEND_CUDA_KERN_H
#define TP_BACKEND_CUDA_KERN_H

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

/* dst[i] = round-to-nearest-even(src[i]) as FP16 (bf16 == 0) or BF16 (bf16 != 0), i < n. When
 * first_inf (device memory) is not NULL, the kernel lowers *first_inf to the index of every
 * finite src[i] that became an infinity (|src[i]| >= 65520 for FP16): set it to ~0 before, and
 * ~0 afterwards means that nothing overflowed. */
cudaError_t cuda_kern_to_half(void *dst, const float *src, size_t n, int bf16,
                              unsigned long long *first_inf, cudaStream_t st);

/* y[i, j] = b[j] for i < rows, j < cols (y row-major, dense). */
cudaError_t cuda_kern_fill_bias(float *y, const float *b, uint32_t rows, uint32_t cols,
                                cudaStream_t st);

/* A block's intermediate: h[i, j] = act(t[i, j]) · t[i, n + j] when gated, else act(t[i, j]), for
 * i < rows, j < n; t has rows of ldt floats (gate's n outputs, then up's), h is dense [rows, n].
 * act is an enum plan_act (1 silu, 2 gelu, 3 gelu_tanh, 4 relu), computed as PyTorch defines it
 * in float. */
cudaError_t cuda_kern_act(float *h, const float *t, size_t ldt, uint32_t rows, uint32_t n, int act,
                          int gated, cudaStream_t st);

#ifdef __cplusplus
}
#endif

#endif
