/* cudaemu.h -- a CUDA device emulated on the CPU, for testing the cuda backend's host code where
 * no GPU is: libtpcudaemu implements the part of the CUDA runtime that tpd-worker calls (and the
 * backend's kernels), and the fake libcublas and libnccl beside it (cublas.c, nccl.c) implement
 * the cuBLAS and NCCL calls on top of it. Nothing of it is installed or shipped; the tests run a
 * worker linked with it (tpd-worker-emu) and point TPD_CUDA_LIBS at its folder.
 *
 * The one design fact: it is stricter than a GPU wherever a GPU would silently misbehave. Device
 * memory lives at addresses the host cannot touch (a host access faults), every device range a
 * call is given is checked against one live allocation, every stream runs its work later on a
 * thread of its own (so a result read before the stream is waited for is stale), a copy between
 * device and pageable host memory waits for its stream as CUDA's does, and any misuse (a range
 * out of bounds, a freed pointer, the workspace of a live cuBLAS handle freed, collectives that
 * differ between ranks, a host call that waits on a collective without a deadline) ends the
 * process with a message starting "cudaemu:". */
#ifndef TP_CUDAEMU_H
#define TP_CUDAEMU_H

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Prints "cudaemu: " and the message to stderr and aborts: a misuse that a GPU would turn into
 * a wrong answer, a fault or a hang. */
void cudaemu_fatal(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

/* The emulator's own address of device range [p, p + n), which call was given as what: fatal
 * unless the range lies within one live allocation (n == 0: p must still be a device pointer). */
void *cudaemu_dev(const void *p, size_t n, const char *call, const char *what);

/* Whether p is a device address (live or not). */
int cudaemu_is_dev(const void *p);

/* Runs fn(arg) on the stream's thread after the work already queued there (NULL: the legacy
 * default stream). arg (bytes long) is copied. Fatal for a destroyed stream. */
void cudaemu_enqueue(cudaStream_t s, const char *call, void (*fn)(void *arg), const void *arg,
                     size_t bytes);

/* The float an FP16 (bf16 == 0) or BF16 (bf16 != 0) element's bits stand for (exact). */
float cudaemu_half_value(uint16_t bits, int bf16);

/* The same for a collective: while one is queued or running on a stream, a host call that would
 * wait for that stream (cudaStreamSynchronize, a copy between the device and pageable memory,
 * cudaFree's implicit synchronization, cudaStreamDestroy) is fatal. CUDA would just wait; but a
 * collective waits for every other rank, so such a call holds its thread as long as the
 * slowest peer, for ever if one is gone, and tpd's backend must never wait without a deadline
 * (worker/backend_cuda.c). */
void cudaemu_enqueue_collective(cudaStream_t s, const char *call, void (*fn)(void *arg),
                                const void *arg, size_t bytes);

/* The cuBLAS workspace [p, p + n) is in use by a live handle (bind) or no longer (unbind): while
 * bound, a cudaFree of it is fatal. */
void cudaemu_bind_workspace(const void *p, int bind);

#ifdef __cplusplus
}
#endif

#endif
