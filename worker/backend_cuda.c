/* backend_cuda.c -- the cuda backend: one GPU per worker process. At start it selects its device,
 * loads cuBLAS (and, for the NCCL gather, NCCL) with dlopen, uploads its shard once (converted to
 * the GEMM's dtype, refusing weights that dtype cannot hold), allocates every device buffer for
 * max_batch rows, pins the shared arena (cudaHostRegister) and, with the NCCL gather, joins a
 * non-blocking communicator of nranks ranks with the unique id the coordinator made; then it
 * warms up at one row and at max_batch rows. A forward is, on one stream:
 *
 *   x (pinned slot) --H2D--> [to FP16/BF16] --> bias broadcast --> cuBLAS GEMM (FP32 accumulate)
 *     GATHER_NCCL: in-place ncclAllGather of blocks padded to the widest shard, then rank 0
 *                  copies the [N][rows·pad] result to the slot's [rows, out] output with one
 *                  cudaMemcpy2DAsync per rank block, each as wide as that rank's shard
 *     GATHER_HOST: each rank copies its [rows, cols] shard to its columns of the slot's output
 *
 * A reducing model (a row layer, an MLP block: shard.h) runs, on the same stream,
 *
 *   x --H2D--> [to FP16/BF16] --> GEMM 1 (gate and up side by side, or fc, with their biases)
 *     --> activation kernel (act(gate)·up) --> [to FP16/BF16] --> GEMM 2 (down's piece) = partial
 *     GATHER_NCCL: rank 0 writes the row layer's bias into its partial first; in-place
 *                  ncclAllReduce (sum) of [rows, out]; rank 0 copies the sum to the slot
 *     GATHER_HOST: each rank copies its partial to its partial block of the slot, and the ranks
 *                  all-reduce on the host as the cpu backend does (block.h), bias added there
 *
 * (a row layer: x's slice only, and GEMM 2 alone). Either way, one collective per forward.
 *
 * and the worker then polls the stream (cudaStreamQuery) and the communicator's asynchronous
 * error with a deadline, so a dead or stuck peer never hangs a rank: the communicator is
 * aborted, the stream drained (bounded), the job fails with TP_EUNAVAIL, and the worker exits so
 * that the supervisor rebuilds the group. The one design fact: no call may block this thread
 * without a deadline, which is why an arena that cannot be pinned gets a pinned stage (a copy
 * into pageable memory would wait for the all-gather, however long a stuck peer makes it).
 *
 * Every CUDA, cuBLAS and NCCL call is checked; a failure names the call and the library's
 * message, and the supervisor prefixes the rank. Ranks own uneven column ranges when N does not
 * divide out (plan_split); where each shard goes is computed in backend_cuda_plan.c, which the
 * unit tests check on the CPU. */
#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#include <dlfcn.h>
#include <errno.h>
#include <nccl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#include "backend.h"
#include "backend_cuda_kern.h"
#include "block.h"
#include "backend_cuda_plan.h"
#include "cudalib.h"
#include "log.h"
#include "timing.h"

_Static_assert(NCCL_UNIQUE_ID_BYTES == CTL_NCCL_ID_BYTES, "the ctl INIT message carries the id");

#define STR_(x) #x
#define STR(x) STR_(x)
/* the major versions of the headers this was built with: the libraries must match them */
#define CUBLAS_SONAME "libcublas.so." STR(CUBLAS_VER_MAJOR)
#define NCCL_SONAME "libnccl.so." STR(NCCL_MAJOR)
#define NCCL_OLDEST 21400 /* 2.14: ncclCommInitRankConfig, non-blocking communicators */

#define INIT_TIMEOUT_S 120.0   /* NCCL communicator creation: every rank must have started */
#define FORWARD_TIMEOUT_S 30.0 /* one forward, including the all-gather */
#define DRAIN_TIMEOUT_S 5.0    /* the stream after a failure and an abort */
#define BLAS_WORKSPACE (32u << 20)
/* Waiting: polls without a pause for SPIN_S (a forward of up to ~64 rows of a 4096 x 4096 layer
 * is done by then), then sleeps POLL_SLEEP_NS between polls. The thread's timer slack, 50 us by
 * default, would be added to every such sleep, so it is lowered to TIMER_SLACK_NS. */
#define SPIN_S 1e-3
#define POLL_SLEEP_NS 20000
#define TIMER_SLACK_NS 1000
#define NO_OVERFLOW (~0ull) /* *first_inf when no input element overflowed */

/* One wrapper per library: on failure, fill err with the call and the library's message and jump
 * to the label (NCCL's CUDACHECKGOTO pattern). */
#define CUDA_GOTO(call, err, label)                                                                \
    do {                                                                                           \
        cudaError_t e_ = (call);                                                                   \
        if (e_ != cudaSuccess) {                                                                   \
            cuda_call_error((err), TP_EDEVICE, #call, cudaGetErrorString(e_));                     \
            goto label;                                                                            \
        }                                                                                          \
    } while (0)

#define BLAS_GOTO(call, err, label)                                                                \
    do {                                                                                           \
        cublasStatus_t s_ = (call);                                                                \
        if (s_ != CUBLAS_STATUS_SUCCESS) {                                                         \
            cuda_call_error((err), TP_EDEVICE, #call, blas.cublasGetStatusString(s_));             \
            goto label;                                                                            \
        }                                                                                          \
    } while (0)

/* cuBLAS and NCCL, loaded once per process (load_blas, load_nccl). Each field has the type and
 * the name of the library's function (cublas_v2.h maps cublasCreate to cublasCreate_v2, in the
 * field's name as in the symbol looked up), so a call reads blas.cublasSgemm(...) and its error
 * names cublasSgemm. */
static struct {
    void *handle;
    __typeof__(cublasCreate) *cublasCreate;
    __typeof__(cublasDestroy) *cublasDestroy;
    __typeof__(cublasSetStream) *cublasSetStream;
    __typeof__(cublasSetMathMode) *cublasSetMathMode;
    __typeof__(cublasSetWorkspace) *cublasSetWorkspace;
    __typeof__(cublasSgemm) *cublasSgemm;
    __typeof__(cublasGemmEx) *cublasGemmEx;
    __typeof__(cublasGetStatusString) *cublasGetStatusString;
    __typeof__(cublasGetProperty) *cublasGetProperty;
} blas;

static struct {
    void *handle;
    __typeof__(ncclGetVersion) *ncclGetVersion;
    __typeof__(ncclCommInitRankConfig) *ncclCommInitRankConfig;
    __typeof__(ncclCommGetAsyncError) *ncclCommGetAsyncError;
    __typeof__(ncclCommAbort) *ncclCommAbort;
    __typeof__(ncclAllGather) *ncclAllGather;
    __typeof__(ncclAllReduce) *ncclAllReduce;
    __typeof__(ncclGetErrorString) *ncclGetErrorString;
    __typeof__(ncclGetLastError) *ncclGetLastError;
} nccl;

/* Resolves lib.fn in lib.handle: 0, or -1 with *missing its symbol's name. */
#define LOAD_SYM(lib, fn, missing)                                                                 \
    (((lib).fn = (__typeof__((lib).fn))dlsym((lib).handle, STR(fn))) ? 0                           \
                                                                     : (*(missing) = STR(fn), -1))

struct backend {
    int rank, nranks, device;
    enum backend_gather gather;
    enum tp_dtype dtype;
    uint32_t max_batch;
    int64_t in;             /* inputs of the layer */
    struct cuda_layout lay; /* this rank's columns of y (its rows of W) and the gather's blocks */
    cudaStream_t stream;    /* shared_dev's */
    cublasHandle_t blas;    /* shared_dev's */
    ncclComm_t comm;
    int broken;                    /* a device or communicator error: nothing more runs */
    void *w;                       /* [lay.cols, in] of dtype, device */
    float *bias;                   /* [lay.cols] or NULL, device */
    float *x32;                    /* [max_batch, in] float32, device */
    void *x16;                     /* [max_batch, in] FP16/BF16, device; NULL with FP32 */
    float *y;                      /* cuda_plan_buffer: NCCL [nranks][max_batch·lay.pad]; host
                                      [max_batch, lay.cols] */
    void *pinned;                  /* the registered arena, or NULL */
    float *stage;                  /* cuda_plan_stage_bytes, pinned host, when the arena is not */
    unsigned long long *first_inf; /* FP16/BF16: first input element that overflowed, device */
    unsigned long long *first_inf_host; /* its copy, pinned host */
    struct cuda_copy2d *plan;           /* nranks entries: the copies to the slot's output */
    struct cuda_copy2d *staged;         /* nranks entries: the same copies into the stage */
    double poll_sleep_us;               /* what one POLL_SLEEP_NS sleep takes here, measured */
    /* a reducing model (kind row, gated or mlp); w and bias above are its first GEMM's */
    enum plan_kind kind;
    int act;                     /* enum plan_act */
    int ctl_fd;                  /* watched while the host reduce waits for the other ranks */
    int64_t first, count;        /* this rank's part of what the ranks split */
    int64_t out;                 /* outputs of the model */
    int64_t n0;                  /* columns of the first GEMM: 2·count (gated), count (mlp) */
    void *w1;                    /* a block: down's piece [out, count] of dtype, device */
    float *rbias;                /* the row-split layer's bias [out], device (NCCL, rank 0) */
    float *rbias_host;           /* the same, host (the host reduce adds it) */
    float *t32;                  /* a block's first GEMM out, [max_batch, n0], device */
    float *h32;                  /* its activation, [max_batch, count], device */
    void *h16;                   /* the same as FP16/BF16; NULL with FP32 */
    unsigned long long *h_inf;   /* FP16/BF16: first element of h that overflowed, device */
    unsigned long long *h_inf_host; /* its copy, pinned host */
    float *part;                 /* the partial sum [max_batch, out], device */
};

/* The file a loaded function comes from, for the log. */
static const char *library_file(void *fn)
{
    Dl_info info;

    return dladdr(fn, &info) && info.dli_fname ? info.dli_fname : "?";
}

static int load_blas(struct tp_err *err)
{
    const char *missing = NULL;
    int v[3] = {0, 0, 0};

    if (blas.handle)
        return 0;
    blas.handle = cudalib_open(CUBLAS_SONAME, "cuBLAS", "", err);
    if (!blas.handle)
        return -1;
    if (LOAD_SYM(blas, cublasCreate, &missing) < 0 || LOAD_SYM(blas, cublasDestroy, &missing) < 0 ||
        LOAD_SYM(blas, cublasSetStream, &missing) < 0 ||
        LOAD_SYM(blas, cublasSetMathMode, &missing) < 0 ||
        LOAD_SYM(blas, cublasSetWorkspace, &missing) < 0 ||
        LOAD_SYM(blas, cublasSgemm, &missing) < 0 || LOAD_SYM(blas, cublasGemmEx, &missing) < 0 ||
        LOAD_SYM(blas, cublasGetStatusString, &missing) < 0 ||
        LOAD_SYM(blas, cublasGetProperty, &missing) < 0) {
        tp_err_set(err, TP_ENOTFOUND, "%s from %s has no %s", CUBLAS_SONAME,
                   library_file(dlsym(blas.handle, STR(cublasCreate))), missing);
        dlclose(blas.handle);
        memset(&blas, 0, sizeof(blas));
        return -1;
    }
    blas.cublasGetProperty(MAJOR_VERSION, &v[0]);
    blas.cublasGetProperty(MINOR_VERSION, &v[1]);
    blas.cublasGetProperty(PATCH_LEVEL, &v[2]);
    tp_log(TP_LOG_NOTICE, "cuBLAS %d.%d.%d from %s", v[0], v[1], v[2],
           library_file((void *)blas.cublasCreate));
    return 0;
}

static int load_nccl(struct tp_err *err)
{
    const char *missing = NULL;
    int v = 0;

    if (nccl.handle)
        return 0;
    nccl.handle = cudalib_open(NCCL_SONAME, "NCCL, for --gather nccl", ", or use --gather host", err);
    if (!nccl.handle)
        return -1;
    if (LOAD_SYM(nccl, ncclGetVersion, &missing) < 0 ||
        LOAD_SYM(nccl, ncclCommInitRankConfig, &missing) < 0 ||
        LOAD_SYM(nccl, ncclCommGetAsyncError, &missing) < 0 ||
        LOAD_SYM(nccl, ncclCommAbort, &missing) < 0 ||
        LOAD_SYM(nccl, ncclAllGather, &missing) < 0 ||
        LOAD_SYM(nccl, ncclAllReduce, &missing) < 0 ||
        LOAD_SYM(nccl, ncclGetErrorString, &missing) < 0 ||
        LOAD_SYM(nccl, ncclGetLastError, &missing) < 0 || nccl.ncclGetVersion(&v) != ncclSuccess ||
        v < NCCL_OLDEST) {
        if (missing)
            tp_err_set(err, TP_ENOTFOUND, "%s has no %s: NCCL 2.14 or newer is needed", NCCL_SONAME,
                       missing);
        else
            tp_err_set(err, TP_ENOTFOUND,
                       "NCCL %d.%d.%d from %s is older than 2.14, which tpd needs", v / 10000,
                       v / 100 % 100, v % 100, library_file((void *)nccl.ncclGetVersion));
        dlclose(nccl.handle);
        memset(&nccl, 0, sizeof(nccl));
        return -1;
    }
    tp_log(TP_LOG_NOTICE, "NCCL %d.%d.%d from %s", v / 10000, v / 100 % 100, v % 100,
           library_file((void *)nccl.ncclGetVersion));
    return 0;
}

static int nccl_error(struct tp_err *err, const char *call, ncclResult_t r, ncclComm_t comm)
{
    char msg[200];
    const char *last = comm ? nccl.ncclGetLastError(comm) : NULL;

    snprintf(msg, sizeof(msg), "%s%s%.150s", nccl.ncclGetErrorString(r),
             last && last[0] ? ": " : "", last ? last : "");
    /* a remote or system error means a peer or the network is gone: the group must be rebuilt */
    return cuda_call_error(
        err, r == ncclRemoteError || r == ncclSystemError ? TP_EUNAVAIL : TP_EDEVICE, call, msg);
}

/* One pause of a poll loop that began at t0, now being now: none while spinning. */
static void poll_pause(double t0, double now)
{
    if (now - t0 > SPIN_S)
        nanosleep(&(struct timespec){.tv_nsec = POLL_SLEEP_NS}, NULL);
}

/* What a poll sleep costs on this machine, in microseconds: its length plus the timer slack and
 * the kernel's wake-up. Measured once at start, for the start line. */
static double measure_poll_sleep_us(void)
{
    double t0 = timing_now_s();

    for (int i = 0; i < 20; i++)
        nanosleep(&(struct timespec){.tv_nsec = POLL_SLEEP_NS}, NULL);
    return (timing_now_s() - t0) / 20 * 1e6;
}

/* Waits until the non-blocking communicator has finished its pending call (init or enqueue). */
static int nccl_settle(struct backend *b, const char *call, double timeout_s, struct tp_err *err)
{
    double t0 = timing_now_s(), now;
    ncclResult_t st = ncclInProgress;

    for (;;) {
        ncclResult_t r = nccl.ncclCommGetAsyncError(b->comm, &st);

        if (r != ncclSuccess)
            return nccl_error(err, "ncclCommGetAsyncError", r, b->comm);
        if (st == ncclSuccess)
            return 0;
        if (st != ncclInProgress)
            return nccl_error(err, call, st, b->comm);
        now = timing_now_s();
        if (now - t0 > timeout_s)
            return tp_err_set(err, TP_EUNAVAIL,
                              "%s did not complete in %.0f s: a peer rank is gone or stuck", call,
                              timeout_s);
        poll_pause(t0, now);
    }
}

/* The communicator's asynchronous error, as the all-gather's; 0 without one or without NCCL. */
static int comm_check(struct backend *b, struct tp_err *err)
{
    ncclResult_t st = ncclSuccess, r;

    if (!b->comm)
        return 0;
    r = nccl.ncclCommGetAsyncError(b->comm, &st);
    if (r != ncclSuccess)
        return nccl_error(err, "ncclCommGetAsyncError", r, b->comm);
    if (st != ncclSuccess && st != ncclInProgress)
        return nccl_error(err, b->kind == PLAN_COLUMN ? "ncclAllGather" : "ncclAllReduce", st,
                          b->comm);
    return 0;
}

/* Waits for the stream to drain while watching the communicator, at most timeout_s. A stream
 * that is done gets one more look at the communicator: it may have failed while the last of the
 * stream ran, and a failed collective does not always fail the stream. */
static int wait_stream(struct backend *b, double timeout_s, struct tp_err *err)
{
    double t0 = timing_now_s(), now;

    for (;;) {
        cudaError_t e = cudaStreamQuery(b->stream);

        if (e == cudaSuccess)
            return comm_check(b, err);
        if (e != cudaErrorNotReady)
            return cuda_call_error(err, TP_EDEVICE, "cudaStreamQuery", cudaGetErrorString(e));
        if (comm_check(b, err) < 0)
            return -1;
        now = timing_now_s();
        if (now - t0 > timeout_s)
            return tp_err_set(err, TP_EUNAVAIL, "GPU work did not complete in %.0f s: %s",
                              timeout_s,
                              b->comm ? "a peer rank is gone or stuck" : "the GPU is stuck");
        poll_pause(t0, now);
    }
}

/* Waits at most timeout_s for the stream to hold no more work, whatever its state: 0 when it
 * holds none (done, or failed for good), -1 when work is still running. */
static int drain(struct backend *b, double timeout_s)
{
    double t0 = timing_now_s(), now;

    while (cudaStreamQuery(b->stream) == cudaErrorNotReady) {
        now = timing_now_s();
        if (now - t0 > timeout_s)
            return -1;
        poll_pause(t0, now);
    }
    cudaGetLastError(); /* a failed stream's error is not this caller's */
    return 0;
}

/* Selects the device, failing with a message a user can act on. */
static int select_device(int device, struct tp_err *err)
{
    struct cudaDeviceProp p;
    cudaError_t e;
    int n = 0;
    const char *vis = getenv("CUDA_VISIBLE_DEVICES");

    e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess)
        return tp_err_set(err, TP_EDEVICE, "no usable GPU: cudaGetDeviceCount: %s",
                          cudaGetErrorString(e));
    if (n < 1)
        return tp_err_set(err, TP_EDEVICE, "no usable GPU: no CUDA device is visible");
    if (device < 0 || device >= n)
        return tp_err_set(err, TP_EINVAL, "no GPU %d: %d visible (0 to %d)%s%s", device, n, n - 1,
                          vis ? ", CUDA_VISIBLE_DEVICES=" : "", vis ? vis : "");
    e = cudaSetDevice(device);
    if (e != cudaSuccess)
        return tp_err_set(err, TP_EDEVICE, "GPU %d: cudaSetDevice: %s", device,
                          cudaGetErrorString(e));
    e = cudaGetDeviceProperties(&p, device);
    if (e != cudaSuccess)
        return tp_err_set(err, TP_EDEVICE, "GPU %d: cudaGetDeviceProperties: %s", device,
                          cudaGetErrorString(e));
    if (p.major < 8)
        return tp_err_set(err, TP_EDEVICE,
                          "GPU %d (%s) has compute capability %d.%d; tpd needs 8.0 or newer",
                          device, p.name, p.major, p.minor);
    tp_log(TP_LOG_NOTICE, "GPU %d: %s, compute capability %d.%d, %.1f GiB", device, p.name, p.major,
           p.minor, (double)p.totalGlobalMem / (1024.0 * 1024.0 * 1024.0));
    return 0;
}

/* Allocates bytes of device memory for what ("the weights") into *p. Out of memory is TP_ENOMEM
 * and says what was asked and what the GPU has free, so that a model too big for what the
 * models already loaded left reads as that, not as a broken device: the context stays usable,
 * and the worker goes on serving the others. */
static int dev_alloc(const struct backend *b, void **p, size_t bytes, const char *what,
                     struct tp_err *err)
{
    size_t free_b = 0, total = 0;
    cudaError_t e = cudaMalloc(p, bytes);

    if (e == cudaSuccess)
        return 0;
    *p = NULL;
    if (e != cudaErrorMemoryAllocation)
        return cuda_call_error(err, TP_EDEVICE, "cudaMalloc", cudaGetErrorString(e));
    cudaGetLastError(); /* not sticky: clear it */
    if (cudaMemGetInfo(&free_b, &total) != cudaSuccess) {
        cudaGetLastError();
        return tp_err_set(err, TP_ENOMEM, "GPU %d is out of memory: %.1f MiB for %s", b->device,
                          (double)bytes / (1 << 20), what);
    }
    return tp_err_set(err, TP_ENOMEM,
                      "GPU %d is out of memory: %.1f MiB for %s, and %.1f MiB of its %.1f MiB are "
                      "free",
                      b->device, (double)bytes / (1 << 20), what, (double)free_b / (1 << 20),
                      (double)total / (1 << 20));
}

/* Enqueues out [rows, n] = x [rows, k] · W [n, k]ᵀ (+ bias [n], written first), every matrix
 * dense and row-major; W and x of the GEMM's dtype (x: x32 for FP32, x16 otherwise). */
static int gemm(struct backend *b, uint32_t rows, int64_t n, int64_t k, const void *w,
                const float *x32, const void *x16, const float *bias, float *out,
                struct tp_err *err)
{
    struct cuda_gemm_shape g;
    const float one = 1.0f, zero = 0.0f;
    const float *beta = &zero;
    cublasOperation_t ta, tb;

    if (cuda_plan_gemm(rows, n, k, &g, err) < 0)
        return -1;
    ta = g.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
    tb = g.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    if (bias) {
        CUDA_GOTO(cuda_kern_fill_bias(out, bias, rows, (uint32_t)n, b->stream), err, fail);
        beta = &one;
    }
    if (b->dtype == TP_F32) {
        /* A = W (column-major Wᵀ), B = x (column-major xᵀ): see backend_cuda_plan.c */
        BLAS_GOTO(blas.cublasSgemm(b->blas, ta, tb, g.m, g.n, g.k, &one, (const float *)w, g.lda,
                                   x32, g.ldb, beta, out, g.ldc),
                  err, fail);
    } else {
        cudaDataType t = b->dtype == TP_BF16 ? CUDA_R_16BF : CUDA_R_16F;

        /* FP16/BF16 inputs, FP32 accumulation and FP32 output (a combination cublasGemmEx
         * lists for CUBLAS_COMPUTE_32F): only the inputs are rounded. */
        BLAS_GOTO(blas.cublasGemmEx(b->blas, ta, tb, g.m, g.n, g.k, &one, w, t, g.lda, x16, t,
                                    g.ldb, beta, out, CUDA_R_32F, g.ldc, CUBLAS_COMPUTE_32F,
                                    CUBLAS_GEMM_DEFAULT),
                  err, fail);
    }
    return 0;
fail:
    return -1;
}

/* Enqueues the conversion of n floats of src to the GEMM's half dtype into dst, noting the first
 * element that overflowed in *flag (device). Nothing with FP32. */
static int to_half(struct backend *b, void *dst, const float *src, size_t n,
                   unsigned long long *flag, struct tp_err *err)
{
    if (b->dtype == TP_F32)
        return 0;
    CUDA_GOTO(cudaMemsetAsync(flag, 0xff, sizeof(*flag), b->stream), err, fail);
    CUDA_GOTO(cuda_kern_to_half(dst, src, n, b->dtype == TP_BF16, flag, b->stream), err, fail);
    return 0;
fail:
    return -1;
}

/* Enqueues the GEMM of a column layer's rows rows into out (dense, row pitch lay.cols), bias
 * first. FP16/BF16: the conversion of x notes the first element that overflowed in first_inf. */
static int enqueue_gemm(struct backend *b, uint32_t rows, float *out, struct tp_err *err)
{
    if (to_half(b, b->x16, b->x32, (size_t)rows * (size_t)b->in, b->first_inf, err) < 0)
        return -1;
    return gemm(b, rows, b->lay.cols, b->in, b->w, b->x32, b->x16, b->bias, out, err);
}

/* Enqueues a reducing model's device work on x (already on the device: [rows, in], or the row
 * layer's [rows, count] slice), up to the partial sum in part and, with NCCL, its in-place
 * all-reduce. */
static int enqueue_partial(struct backend *b, uint32_t rows, double timeout_s, struct tp_err *err)
{
    int64_t k = b->kind == PLAN_ROW ? b->count : b->in;
    /* with NCCL the bias is added once: by rank 0, into its partial, before the sum */
    const float *rb = b->gather == BACKEND_GATHER_NCCL && b->rank == 0 ? b->rbias : NULL;
    ncclResult_t r;

    if (to_half(b, b->x16, b->x32, (size_t)rows * (size_t)k, b->first_inf, err) < 0)
        return -1;
    if (b->kind == PLAN_ROW) {
        if (gemm(b, rows, b->out, k, b->w, b->x32, b->x16, rb, b->part, err) < 0)
            return -1;
    } else {
        if (gemm(b, rows, b->n0, k, b->w, b->x32, b->x16, b->bias, b->t32, err) < 0)
            return -1;
        CUDA_GOTO(cuda_kern_act(b->h32, b->t32, (size_t)b->n0, rows, (uint32_t)b->count, b->act,
                                b->kind == PLAN_GATED, b->stream),
                  err, fail);
        if (to_half(b, b->h16, b->h32, (size_t)rows * (size_t)b->count, b->h_inf, err) < 0 ||
            gemm(b, rows, b->out, b->count, b->w1, b->h32, b->h16, rb, b->part, err) < 0)
            return -1;
    }
    if (b->gather != BACKEND_GATHER_NCCL)
        return 0;
    r = nccl.ncclAllReduce(b->part, b->part, (size_t)rows * (size_t)b->out, ncclFloat32, ncclSum,
                           b->comm, b->stream);
    if (r == ncclInProgress)
        return nccl_settle(b, "ncclAllReduce", timeout_s, err);
    if (r != ncclSuccess)
        return nccl_error(err, "ncclAllReduce", r, b->comm);
    return 0;
fail:
    return -1;
}

/* Enqueues the in-place all-gather of a job of rows rows: every rank sends rows·pad elements,
 * its shard and then padding, which nobody copies. */
static int enqueue_gather(struct backend *b, uint32_t rows, double timeout_s, struct tp_err *err)
{
    ncclResult_t r =
        nccl.ncclAllGather(b->y + cuda_plan_block(&b->lay, rows), b->y,
                           cuda_plan_count(&b->lay, rows), ncclFloat32, b->comm, b->stream);

    if (r == ncclInProgress)
        return nccl_settle(b, "ncclAllGather", timeout_s, err);
    if (r != ncclSuccess)
        return nccl_error(err, "ncclAllGather", r, b->comm);
    return 0;
}

/* The worker's one communicator, shared by the backends of every model it serves: a GPU has one
 * communicator, not one per model, and the coordinator's unique id makes one only. Jobs run one
 * at a time in the order the coordinator sent them, the same order on every rank, so the models'
 * collectives never interleave. The first backend joins it; the last one destroyed aborts it. */
static struct {
    ncclComm_t comm;
    int users;
} shared_comm;

/* The worker's one stream, cuBLAS handle and cuBLAS workspace, shared by the backends of every
 * model it serves, as the communicator is: jobs and loads run one at a time on the main thread,
 * so one of each serves them all, and a model costs its weights and buffers, not another
 * workspace. The first backend makes them, the last one destroyed frees them. */
static struct {
    cudaStream_t stream;
    cublasHandle_t blas;
    void *ws; /* BLAS_WORKSPACE bytes, device */
    int users;
} shared_dev;

static void free_device(void)
{
    /* the handle before its workspace: cuBLAS may use the workspace until it is destroyed */
    if (shared_dev.blas)
        blas.cublasDestroy(shared_dev.blas);
    cudaFree(shared_dev.ws);
    if (shared_dev.stream)
        cudaStreamDestroy(shared_dev.stream);
    memset(&shared_dev, 0, sizeof(shared_dev));
}

/* Gives b the worker's stream and cuBLAS handle, making them first. tf32 is the daemon's, the
 * same for every model. */
static int join_device(struct backend *b, int tf32, struct tp_err *err)
{
    if (shared_dev.users == 0) {
        CUDA_GOTO(cudaStreamCreateWithFlags(&shared_dev.stream, cudaStreamNonBlocking), err, fail);
        BLAS_GOTO(blas.cublasCreate(&shared_dev.blas), err, fail);
        BLAS_GOTO(blas.cublasSetStream(shared_dev.blas, shared_dev.stream), err, fail);
        /* CUBLAS_DEFAULT_MATH keeps FP32 GEMMs in FP32; TF32 tensor cores only when asked. */
        BLAS_GOTO(blas.cublasSetMathMode(shared_dev.blas,
                                         tf32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH),
                  err, fail);
        /* Our own workspace, so cuBLAS allocates nothing while serving; set after
         * cublasSetStream, which resets it to cuBLAS's own pool. */
        if (dev_alloc(b, &shared_dev.ws, BLAS_WORKSPACE, "cuBLAS's workspace", err) < 0)
            goto fail;
        BLAS_GOTO(blas.cublasSetWorkspace(shared_dev.blas, shared_dev.ws, BLAS_WORKSPACE), err,
                  fail);
    }
    shared_dev.users++;
    b->stream = shared_dev.stream;
    b->blas = shared_dev.blas;
    return 0;
fail:
    free_device();
    return -1;
}

/* Drops b's use of the stream and the handle; the last user frees them. */
static void leave_device(struct backend *b)
{
    if (!b->stream)
        return;
    b->stream = NULL;
    b->blas = NULL;
    if (--shared_dev.users == 0)
        free_device();
}

/* Drops b's use of the communicator; the last user aborts it (abort, not finalize: it is local
 * and never waits for peers, which may be gone already). A broken backend aborts it at once: it
 * may be stuck in a collective, and nothing more runs in this process. */
static void leave_nccl(struct backend *b, int broken)
{
    if (!b->comm)
        return;
    if (b->comm == shared_comm.comm && (broken || --shared_comm.users == 0)) {
        nccl.ncclCommAbort(shared_comm.comm);
        shared_comm.comm = NULL;
        shared_comm.users = 0;
    }
    b->comm = NULL;
}

/* After a failed job nothing more runs in this process. The communicator is aborted, which
 * also ends its kernels, and the stream is given DRAIN_TIMEOUT_S to drain, so that no copy is
 * still writing the slot when the job is answered. A stream that does not drain even then could
 * still write the slot after the answer: the process leaves at once, without answering; the
 * supervisor sees the exit, fails the job and rebuilds the group, and the exit ends the
 * context and its copies. */
static void abandon(struct backend *b, struct tp_err *err)
{
    b->broken = 1;
    leave_nccl(b, 1);
    if (err->code != TP_EUNAVAIL)
        err->code = TP_EDEVICE;
    if (drain(b, DRAIN_TIMEOUT_S) < 0) {
        tp_log(TP_LOG_ERR, "%s; the GPU's stream still runs %.0f s after it: exiting unanswered",
               err->msg, DRAIN_TIMEOUT_S);
        _exit(1);
    }
}

/* A job whose input holds a value that the GEMM's dtype turns into an infinity: refused, and
 * the backend goes on (every rank saw the same input and refuses it too). */
static int input_overflow(const struct backend *b, const float *x, unsigned long long i,
                          struct tp_err *err)
{
    return tp_err_set(err, TP_EINVAL,
                      "input row %llu, column %llu is %g, which %s turns into an infinity "
                      "(|x| >= %g): scale the input or serve with --dtype %s",
                      i / (unsigned long long)b->in, i % (unsigned long long)b->in, x[i],
                      tp_dtype_wire_name(b->dtype), cuda_plan_half_limit(b->dtype),
                      b->dtype == TP_F16 ? "bf16 or fp32" : "fp32");
}

/* Enqueues the copies of the overflow flags (input, intermediate) to the host, for after the
 * wait. */
static int copy_flags(struct backend *b, struct tp_err *err)
{
    if (b->first_inf)
        CUDA_GOTO(cudaMemcpyAsync(b->first_inf_host, b->first_inf, sizeof(*b->first_inf),
                                  cudaMemcpyDeviceToHost, b->stream),
                  err, fail);
    if (b->h_inf)
        CUDA_GOTO(cudaMemcpyAsync(b->h_inf_host, b->h_inf, sizeof(*b->h_inf),
                                  cudaMemcpyDeviceToHost, b->stream),
                  err, fail);
    return 0;
fail:
    return -1;
}

static int forward_rows(struct backend *b, const float *x, uint32_t rows, float *y,
                        struct tp_err *err)
{
    const struct cuda_copy2d *copies;
    char *dst;
    int ncopies;

    if (b->broken)
        return tp_err_set(err, TP_EUNAVAIL, "the GPU worker failed before and is restarting");
    if (rows < 1 || rows > b->max_batch)
        return tp_err_set(err, TP_EINVAL, "%u rows, expected 1 to %u", rows, b->max_batch);
    CUDA_GOTO(cudaMemcpyAsync(b->x32, x, (size_t)rows * (size_t)b->in * sizeof(float),
                              cudaMemcpyHostToDevice, b->stream),
              err, fail);
    if (enqueue_gemm(b, rows, b->y + cuda_plan_block(&b->lay, rows), err) < 0)
        goto fail;
    if (b->gather == BACKEND_GATHER_NCCL && enqueue_gather(b, rows, FORWARD_TIMEOUT_S, err) < 0)
        goto fail;
    ncopies = cuda_plan_copyout(&b->lay, rows, sizeof(float), b->plan);
    copies = b->plan;
    dst = (char *)y;
    if (b->stage) {
        /* the arena is not pinned: to the stage, moved to the slot after the bounded wait */
        cuda_plan_stage(&b->lay, b->plan, ncopies, b->staged);
        copies = b->staged;
        dst = (char *)b->stage;
    }
    for (int i = 0; i < ncopies; i++) {
        const struct cuda_copy2d *c = &copies[i];

        CUDA_GOTO(cudaMemcpy2DAsync(dst + c->dst_off, c->dpitch, (char *)b->y + c->src_off,
                                    c->spitch, c->width, c->height, cudaMemcpyDeviceToHost,
                                    b->stream),
                  err, fail);
    }
    if (copy_flags(b, err) < 0 || wait_stream(b, FORWARD_TIMEOUT_S, err) < 0)
        goto fail;
    if (b->first_inf && *b->first_inf_host != NO_OVERFLOW)
        return input_overflow(b, x, *b->first_inf_host, err);
    if (b->stage)
        cuda_plan_unstage(b->plan, b->staged, ncopies, b->stage, y);
    return 0;
fail:
    /* The stream may still hold work that reads or writes the slot, and the context or the
     * communicator may be broken. */
    abandon(b, err);
    return -1;
}

/* A block's intermediate that the GEMM's half dtype turned into an infinity: the block's answer
 * would be infinite or NaN. The job fails on this rank, which still meets the others. */
static int intermediate_overflow(const struct backend *b, unsigned long long i, struct tp_err *err)
{
    return tp_err_set(err, TP_EINVAL,
                      "the block's intermediate at row %llu, column %lld became an infinity in %s "
                      "(|h| >= %g): serve with --dtype %s",
                      i / (unsigned long long)b->count,
                      (long long)(b->first + (int64_t)(i % (unsigned long long)b->count)),
                      tp_dtype_wire_name(b->dtype), cuda_plan_half_limit(b->dtype),
                      b->dtype == TP_F16 ? "bf16 or fp32" : "fp32");
}

/* A reducing model's forward (see the top of this file). With the host gather every rank meets
 * the others at the slot's counter even when its own part failed (an overflow): a rank that
 * stayed away would hold the others there until the job's bound; the job still fails, since
 * this rank reports its failure. */
static int forward_reduce(struct backend *b, struct backend_job *job, struct tp_err *err)
{
    uint32_t rows = job->rows;
    size_t bytes = (size_t)rows * (size_t)b->out * sizeof(float);
    int copy = b->gather == BACKEND_GATHER_HOST || b->rank == 0;
    float *dst = b->gather == BACKEND_GATHER_HOST ? job->partial[b->rank] : job->y;
    int failed = 0;
    double t0;

    if (b->broken)
        return tp_err_set(err, TP_EUNAVAIL, "the GPU worker failed before and is restarting");
    if (rows < 1 || rows > b->max_batch)
        return tp_err_set(err, TP_EINVAL, "%u rows, expected 1 to %u", rows, b->max_batch);
    if (b->kind == PLAN_ROW)
        CUDA_GOTO(cudaMemcpy2DAsync(b->x32, (size_t)b->count * sizeof(float), job->x + b->first,
                                    (size_t)b->in * sizeof(float),
                                    (size_t)b->count * sizeof(float), rows,
                                    cudaMemcpyHostToDevice, b->stream),
                  err, fail);
    else
        CUDA_GOTO(cudaMemcpyAsync(b->x32, job->x, (size_t)rows * (size_t)b->in * sizeof(float),
                                  cudaMemcpyHostToDevice, b->stream),
                  err, fail);
    if (enqueue_partial(b, rows, FORWARD_TIMEOUT_S, err) < 0)
        goto fail;
    if (copy)
        CUDA_GOTO(cudaMemcpyAsync(b->stage ? b->stage : dst, b->part, bytes,
                                  cudaMemcpyDeviceToHost, b->stream),
                  err, fail);
    if (copy_flags(b, err) < 0 || wait_stream(b, FORWARD_TIMEOUT_S, err) < 0)
        goto fail;
    if (copy && b->stage)
        memcpy(dst, b->stage, bytes);
    job->collectives = 1;
    if (b->first_inf && *b->first_inf_host != NO_OVERFLOW)
        failed = input_overflow(b, job->x, *b->first_inf_host, err);
    else if (b->h_inf && *b->h_inf_host != NO_OVERFLOW)
        failed = intermediate_overflow(b, *b->h_inf_host, err);
    if (b->gather == BACKEND_GATHER_NCCL)
        return failed;
    t0 = timing_now_s();
    if (block_arrive(job->sync, (uint32_t)b->nranks, b->ctl_fd, (int64_t)(SPIN_S * 1e9), err) < 0)
        return -1; /* the group is going down: the worker exits */
    job->wait_s = timing_now_s() - t0;
    if (failed)
        return -1;
    {
        int64_t c0, nc;

        block_stripe(b->out, b->nranks, b->rank, &c0, &nc);
        t0 = timing_now_s();
        block_reduce(job->y, job->partial, (uint32_t)b->nranks, (size_t)b->out, rows, c0, nc,
                     b->rbias_host);
        job->reduce_s = timing_now_s() - t0;
    }
    return 0;
fail:
    abandon(b, err);
    return -1;
}

static int cuda_forward(struct backend *b, struct backend_job *job, struct tp_err *err)
{
    if (b->kind != PLAN_COLUMN)
        return forward_reduce(b, job, err);
    job->collectives = b->gather == BACKEND_GATHER_NCCL; /* the all-gather */
    return forward_rows(b, job->x, job->rows, job->y, err);
}

/* Uploads n float32 values of host as the GEMM's dtype into a new device buffer *dev; the
 * float32 copy on the device is temporary when converting. Every copy and kernel runs on the
 * backend's stream, which does not synchronize with the legacy default stream: a plain cudaMemcpy
 * from pageable memory may return before its DMA has landed, and a kernel on our stream could
 * then read stale memory. The stream is synchronized before returning, so the host values may be
 * freed afterwards. as_float keeps float32 whatever the dtype (biases); what names the values
 * for an out-of-memory error. */
static int upload(struct backend *b, const float *host, size_t n, int as_float, void **dev,
                  const char *what, struct tp_err *err)
{
    float *tmp = NULL;

    if (b->dtype == TP_F32 || as_float) {
        if (dev_alloc(b, dev, n * sizeof(float), what, err) < 0)
            goto fail;
        CUDA_GOTO(cudaMemcpyAsync(*dev, host, n * sizeof(float), cudaMemcpyHostToDevice,
                                  b->stream),
                  err, fail);
    } else {
        if (dev_alloc(b, dev, n * 2, what, err) < 0 ||
            dev_alloc(b, (void **)&tmp, n * sizeof(float), "the weights' float32 copy", err) < 0)
            goto fail;
        CUDA_GOTO(cudaMemcpyAsync(tmp, host, n * sizeof(float), cudaMemcpyHostToDevice, b->stream),
                  err, fail);
        CUDA_GOTO(cuda_kern_to_half(*dev, tmp, n, b->dtype == TP_BF16, NULL, b->stream), err, fail);
    }
    CUDA_GOTO(cudaStreamSynchronize(b->stream), err, fail);
    if (tmp)
        CUDA_GOTO(cudaFree(tmp), err, fail_freed);
    return 0;
fail:
    if (tmp)
        cudaFree(tmp);
fail_freed:
    return -1;
}

/* Uploads the shard: its GEMMs' weights as dtype, their biases as float32. */
static int upload_weights(struct backend *b, const struct shard *s, struct tp_err *err)
{
    const struct shard_gemm *g0 = &s->g[0], *g1 = &s->g[1];

    if (upload(b, g0->w, (size_t)g0->n * g0->k, 0, &b->w, "the weights", err) < 0 ||
        (g0->b && upload(b, g0->b, g0->n, 1, (void **)&b->bias, "the biases", err) < 0) ||
        (s->ngemm > 1 &&
         upload(b, g1->w, (size_t)g1->n * g1->k, 0, &b->w1, "the second weights", err) < 0) ||
        (s->rbias &&
         upload(b, s->rbias, (size_t)s->out, 1, (void **)&b->rbias, "the biases", err) < 0))
        return -1;
    return 0;
}

/* Refuses weights that the GEMM's dtype would turn into infinities (FP16: |w| >= 65520), which
 * would make every answer of their output infinite or NaN, naming the element. A block's
 * GEMMs are checked in turn: the first one's rows are gate's then up's (or fc's), the second's
 * down's (proj's) piece of columns. */
static int check_weight_range(const struct backend *b, const struct shard *s, struct tp_err *err)
{
    for (int j = 0; j < s->ngemm; j++) {
        const struct shard_gemm *g = &s->g[j];
        size_t i = cuda_plan_first_overflow(g->w, (size_t)g->n * g->k, b->dtype);

        if (i == SIZE_MAX)
            continue;
        if (s->kind == PLAN_COLUMN)
            return tp_err_set(err, TP_EINVAL,
                              "tensor '%.64s' has element [out %lld, in %lld] = %g, which %s "
                              "turns into an infinity (|w| >= %g): serve with --dtype %s",
                              s->name, (long long)(s->first + (int64_t)(i / g->k)),
                              (long long)(i % g->k), g->w[i], tp_dtype_wire_name(b->dtype),
                              cuda_plan_half_limit(b->dtype),
                              b->dtype == TP_F16 ? "bf16 or fp32" : "fp32");
        return tp_err_set(err, TP_EINVAL,
                          "%s weight %d of this rank ('%.64s' is the model's first) has element "
                          "[%zu, %zu] = %g, which %s turns into an infinity (|w| >= %g): serve "
                          "with --dtype %s",
                          plan_kind_name(s->kind), j, s->name, i / g->k, i % g->k, g->w[i],
                          tp_dtype_wire_name(b->dtype), cuda_plan_half_limit(b->dtype),
                          b->dtype == TP_F16 ? "bf16 or fp32" : "fp32");
    }
    return 0;
}

/* Pins the arena; when it cannot be pinned, allocates the pinned stage instead (see struct
 * backend). Fails only when neither is possible with the NCCL gather. TPD_CUDA_PIN=0 leaves the
 * arena unpinned, for the tests of the stage. */
static int pin_or_stage(struct backend *b, const struct backend_config *c, struct tp_err *err)
{
    const char *pin = getenv("TPD_CUDA_PIN");
    /* a reducing model stages what it copies out: its partial (host gather) or rank 0's sum */
    size_t bytes = b->kind == PLAN_COLUMN
                       ? cuda_plan_stage_bytes(&b->lay, c->max_batch, sizeof(float))
                   : b->gather == BACKEND_GATHER_HOST || b->rank == 0
                       ? (size_t)c->max_batch * (size_t)b->out * sizeof(float)
                       : 0;
    cudaError_t e = cudaErrorNotPermitted;

    if (!c->arena || !c->arena_size)
        return 0;
    if (pin && strcmp(pin, "0") == 0)
        tp_log(TP_LOG_NOTICE, "TPD_CUDA_PIN=0: the arena is not pinned");
    else
        e = cudaHostRegister(c->arena, c->arena_size, cudaHostRegisterDefault);
    if (e == cudaSuccess) {
        b->pinned = c->arena;
        return 0;
    }
    if (!pin || strcmp(pin, "0") != 0) {
        tp_log(TP_LOG_WARN, "cudaHostRegister of the %zu-byte arena: %s; copies go through a stage",
               c->arena_size, cudaGetErrorString(e));
        cudaGetLastError(); /* not sticky: clear it */
    }
    if (bytes == 0)
        return 0;
    e = cudaMallocHost((void **)&b->stage, bytes);
    if (e == cudaSuccess)
        return 0;
    b->stage = NULL;
    cudaGetLastError();
    if (b->gather == BACKEND_GATHER_NCCL)
        return tp_err_set(err, TP_EDEVICE,
                          "neither the arena nor a %zu-byte stage could be pinned (%s), and "
                          "--gather nccl cannot bound its wait without: raise the memlock "
                          "limit or use --gather host",
                          bytes, cudaGetErrorString(e));
    tp_log(TP_LOG_WARN,
           "cudaMallocHost of a %zu-byte stage: %s; copies stay pageable, and a stuck GPU can "
           "hold this rank past its deadline",
           bytes, cudaGetErrorString(e));
    return 0;
}

static int join_nccl(struct backend *b, const uint8_t *id_bytes, struct tp_err *err)
{
    ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
    ncclUniqueId id;
    ncclResult_t r;
    double t0 = timing_now_s();

    if (shared_comm.comm) {
        b->comm = shared_comm.comm;
        shared_comm.users++;
        return 0;
    }
    if (!id_bytes)
        return tp_err_set(err, TP_EINTERNAL, "the NCCL gather needs the coordinator's unique id");
    memcpy(id.internal, id_bytes, sizeof(id.internal));
    cfg.blocking = 0;
    r = nccl.ncclCommInitRankConfig(&b->comm, b->nranks, id, b->rank, &cfg);
    if (r != ncclSuccess && r != ncclInProgress) {
        nccl_error(err, "ncclCommInitRankConfig", r, NULL);
        b->comm = NULL;
        return -1;
    }
    if (nccl_settle(b, "ncclCommInitRankConfig", INIT_TIMEOUT_S, err) < 0) {
        nccl.ncclCommAbort(b->comm);
        b->comm = NULL;
        return -1;
    }
    shared_comm.comm = b->comm;
    shared_comm.users = 1;
    tp_log(TP_LOG_INFO, "joined the NCCL communicator of %d ranks in %.3f s", b->nranks,
           timing_now_s() - t0);
    return 0;
}

/* Warm-up, at one row and at max_batch rows: the first GEMM of a shape loads its kernels (CUDA
 * loads them lazily, one by one), and NCCL connects an algorithm's peers at its first use, and
 * which algorithm runs depends on the size; all of that belongs to the start, not to the first
 * requests. The input is zeros; nothing is copied out. */
static int warm_up(struct backend *b, struct tp_err *err)
{
    uint32_t sizes[2] = {1, b->max_batch};

    CUDA_GOTO(
        cudaMemsetAsync(b->x32, 0, (size_t)b->max_batch * (size_t)b->in * sizeof(float), b->stream),
        err, fail);
    for (int i = 0; i < (b->max_batch > 1 ? 2 : 1); i++) {
        if (b->kind != PLAN_COLUMN) {
            if (enqueue_partial(b, sizes[i], INIT_TIMEOUT_S, err) < 0)
                return -1;
            continue;
        }
        if (enqueue_gemm(b, sizes[i], b->y + cuda_plan_block(&b->lay, sizes[i]), err) < 0)
            return -1;
        if (b->gather == BACKEND_GATHER_NCCL &&
            enqueue_gather(b, sizes[i], INIT_TIMEOUT_S, err) < 0)
            return -1;
    }
    return wait_stream(b, INIT_TIMEOUT_S, err);
fail:
    return -1;
}

static void cuda_destroy(struct backend *b)
{
    if (!b)
        return;
    leave_nccl(b, b->broken);
    /* Nothing is freed while the stream may still use it. A start that failed midway may have
     * left work behind; if it does not drain, the process is about to exit anyway. */
    if (b->stream && drain(b, b->broken ? DRAIN_TIMEOUT_S : FORWARD_TIMEOUT_S) < 0) {
        tp_log(TP_LOG_WARN, "the GPU's stream did not drain; leaving its memory to the exit");
        free(b->plan);
        free(b->staged);
        free(b);
        return;
    }
    cudaFree(b->w);
    cudaFree(b->bias);
    cudaFree(b->x32);
    cudaFree(b->x16);
    cudaFree(b->y);
    cudaFree(b->first_inf);
    cudaFreeHost(b->first_inf_host);
    cudaFree(b->w1);
    cudaFree(b->rbias);
    cudaFree(b->t32);
    cudaFree(b->h32);
    cudaFree(b->h16);
    cudaFree(b->h_inf);
    cudaFreeHost(b->h_inf_host);
    cudaFree(b->part);
    free(b->rbias_host);
    cudaFreeHost(b->stage);
    if (b->pinned)
        cudaHostUnregister(b->pinned);
    leave_device(b);
    free(b->plan);
    free(b->staged);
    free(b);
}

/* A reducing model's device buffers, for max_batch rows. */
static int alloc_reduce(struct backend *b, struct tp_err *err)
{
    size_t rows = b->max_batch;

    if (dev_alloc(b, (void **)&b->part, rows * (size_t)b->out * sizeof(float), "the partial sums",
                  err) < 0)
        goto fail;
    if (b->kind == PLAN_ROW)
        return 0;
    if (dev_alloc(b, (void **)&b->t32, rows * (size_t)b->n0 * sizeof(float),
                  "the first GEMM's outputs", err) < 0 ||
        dev_alloc(b, (void **)&b->h32, rows * (size_t)b->count * sizeof(float), "the intermediate",
                  err) < 0)
        goto fail;
    if (b->dtype != TP_F32) {
        if (dev_alloc(b, &b->h16, rows * (size_t)b->count * 2, "the intermediate", err) < 0 ||
            dev_alloc(b, (void **)&b->h_inf, sizeof(*b->h_inf), "a flag", err) < 0)
            goto fail;
        CUDA_GOTO(cudaMallocHost((void **)&b->h_inf_host, sizeof(*b->h_inf_host)), err, fail);
    }
    return 0;
fail:
    return -1;
}

static int cuda_create(struct backend **out, const struct backend_config *c, struct shard *s,
                       struct tp_err *err)
{
    struct backend *b = calloc(1, sizeof(*b));
    size_t ybytes;
    double t0 = timing_now_s();

    *out = NULL;
    if (!b)
        return tp_err_set(err, TP_ENOMEM, "no memory for the cuda backend");
    *b = (struct backend){.rank = c->rank,
                          .nranks = c->nranks,
                          .device = c->device,
                          .gather = c->gather,
                          .dtype = c->dtype,
                          .max_batch = c->max_batch,
                          .in = s->in,
                          .kind = s->kind,
                          .act = (int)s->act,
                          .ctl_fd = c->ctl_fd,
                          .first = s->first,
                          .count = s->count,
                          .out = s->out,
                          .n0 = s->g[0].n};
    if (b->kind == PLAN_COLUMN) {
        if (cuda_plan_layout(&b->lay, c->gather, s->out, c->nranks, c->rank, err) < 0)
            goto fail;
        /* The copy-out places every rank's columns by plan_split; a shard loaded by another
         * split would be written to the wrong columns. */
        if (s->first != b->lay.row0 || s->count != b->lay.cols) {
            tp_err_set(err, TP_EINTERNAL,
                       "the shard holds rows [%lld, %lld) of %lld, but rank %d of %d owns [%lld, "
                       "%lld)",
                       (long long)s->first, (long long)(s->first + s->count), (long long)s->out,
                       c->rank, c->nranks, (long long)b->lay.row0,
                       (long long)(b->lay.row0 + b->lay.cols));
            goto fail;
        }
    } else if (s->rbias) { /* the host reduce adds it: keep a copy, the shard goes */
        b->rbias_host = malloc((size_t)s->out * sizeof(float));
        if (!b->rbias_host) {
            tp_err_set(err, TP_ENOMEM, "no memory for the bias");
            goto fail;
        }
        memcpy(b->rbias_host, s->rbias, (size_t)s->out * sizeof(float));
    }
    b->plan = calloc((size_t)c->nranks, sizeof(*b->plan));
    b->staged = calloc((size_t)c->nranks, sizeof(*b->staged));
    if (!b->plan || !b->staged) {
        tp_err_set(err, TP_ENOMEM, "no memory for the cuda backend");
        goto fail;
    }
    if (b->dtype != TP_F32 && b->dtype != TP_F16 && b->dtype != TP_BF16) {
        tp_err_set(err, TP_EINVAL, "the cuda backend computes in FP32, FP16 or BF16, not %s",
                   tp_dtype_wire_name(b->dtype));
        goto fail;
    }
    if (check_weight_range(b, s, err) < 0)
        goto fail;
    /* cuda_probe loaded the libraries and checked the device and its compute capability */
    if (load_blas(err) < 0 || (b->gather == BACKEND_GATHER_NCCL && load_nccl(err) < 0))
        goto fail;
    if (prctl(PR_SET_TIMERSLACK, (unsigned long)TIMER_SLACK_NS, 0UL, 0UL, 0UL) < 0)
        tp_log(TP_LOG_WARN, "prctl(PR_SET_TIMERSLACK): %s; poll sleeps take longer",
               strerror(errno));
    b->poll_sleep_us = measure_poll_sleep_us();
    CUDA_GOTO(cudaSetDevice(c->device < 0 ? 0 : c->device), err, fail);
    if (join_device(b, c->tf32, err) < 0 || upload_weights(b, s, err) < 0)
        goto fail;
    if (dev_alloc(b, (void **)&b->x32, (size_t)c->max_batch * (size_t)b->in * sizeof(float),
                  "the inputs", err) < 0)
        goto fail;
    if (b->dtype != TP_F32) {
        if (dev_alloc(b, &b->x16, (size_t)c->max_batch * (size_t)b->in * 2, "the inputs", err) <
                0 ||
            dev_alloc(b, (void **)&b->first_inf, sizeof(*b->first_inf), "a flag", err) < 0)
            goto fail;
        CUDA_GOTO(cudaMallocHost((void **)&b->first_inf_host, sizeof(*b->first_inf_host)), err,
                  fail);
    }
    if (b->kind == PLAN_COLUMN) {
        ybytes = cuda_plan_buffer(&b->lay, c->max_batch) * sizeof(float);
        if (dev_alloc(b, (void **)&b->y, ybytes, "the outputs", err) < 0)
            goto fail;
        /* The padding of a rank block is gathered but never copied out; zeroing it once keeps
         * what the all-gather moves defined. */
        CUDA_GOTO(cudaMemsetAsync(b->y, 0, ybytes, b->stream), err, fail);
    } else if (alloc_reduce(b, err) < 0) {
        goto fail;
    }
    if (pin_or_stage(b, c, err) < 0)
        goto fail;
    if (b->gather == BACKEND_GATHER_NCCL && join_nccl(b, c->nccl_id, err) < 0)
        goto fail;
    if (warm_up(b, err) < 0)
        goto fail;
    tp_log(TP_LOG_NOTICE,
           "cuda backend on GPU %d: %s model, %s GEMM%s, %s %s, arena %s, poll sleep %.0f us, "
           "ready in %.3f s",
           c->device, plan_kind_name(b->kind), tp_dtype_wire_name(b->dtype),
           c->tf32 && b->dtype == TP_F32 ? " (TF32)" : "",
           b->kind == PLAN_COLUMN ? "gather" : "all-reduce",
           b->gather == BACKEND_GATHER_NCCL ? "nccl" : "host",
           b->pinned  ? "pinned"
           : b->stage ? "staged"
                      : "unpinned",
           b->poll_sleep_us, timing_now_s() - t0);
    shard_free(s);
    *out = b;
    return 0;
fail:
    b->broken = 1;
    cuda_destroy(b);
    return -1;
}

/* Before the shard is read: the device, and the libraries this configuration needs. */
static int cuda_probe(const struct backend_config *c, struct tp_err *err)
{
    if (select_device(c->device < 0 ? 0 : c->device, err) < 0 || load_blas(err) < 0 ||
        (c->gather == BACKEND_GATHER_NCCL && load_nccl(err) < 0))
        return -1;
    return 0;
}

const struct backend_ops backend_cuda = {.name = "cuda",
                                         .probe = cuda_probe,
                                         .create = cuda_create,
                                         .forward = cuda_forward,
                                         .destroy = cuda_destroy};
