/* gpu_probe.c -- tp_gpu_probe: says which GPUs the CUDA runtime sees, for the gpu tests and
 * bench/gpu-check.sh. Prints "gpus: N" and one line per device, exit 0; or one line "no usable
 * GPU: ..." with the runtime's reason, exit 1. Built only with the CUDA backend. */
#include <cuda_runtime_api.h>
#include <stdio.h>

int main(void)
{
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);

    if (e != cudaSuccess) {
        printf("no usable GPU: cudaGetDeviceCount: %s\n", cudaGetErrorString(e));
        return 1;
    }
    if (n < 1) {
        printf("no usable GPU: no CUDA device is visible\n");
        return 1;
    }
    printf("gpus: %d\n", n);
    for (int i = 0; i < n; i++) {
        struct cudaDeviceProp p;

        e = cudaGetDeviceProperties(&p, i);
        if (e != cudaSuccess) {
            printf("gpu %d: cudaGetDeviceProperties: %s\n", i, cudaGetErrorString(e));
            return 1;
        }
        printf("gpu %d: %s, compute capability %d.%d, %.1f GiB\n", i, p.name, p.major, p.minor,
               (double)p.totalGlobalMem / (1024.0 * 1024.0 * 1024.0));
    }
    return 0;
}
