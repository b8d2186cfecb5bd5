/* backend_cuda.c -- the cuda backend: one GPU per worker process. At start it selects its device,
 * uploads its shard once (converted to the GEMM's dtype), allocates every device buffer for
 * max_batch rows, pins the shared arena (cudaHostRegister) and, with the NCCL gather, joins a
 * non-blocking communicator of nranks ranks with the unique id the coordinator made. A forward
 * is, on one stream:
 *
 *   x (pinned slot) --H2D--> [to FP16/BF16] --> bias broadcast --> cuBLAS GEMM (FP32 accumulate)
 *     GATHER_NCCL: in-place ncclAllGather of blocks padded to the widest shard, then rank 0
 *                  copies the [N][rows·pad] result to the slot's [rows, out] output with one
 *                  cudaMemcpy2DAsync per rank block, each as wide as that rank's shard
 *     GATHER_HOST: each rank copies its [rows, cols] shard to its columns of the slot's output
 *
 * and the worker then polls the stream (cudaStreamQuery) and the communicator's asynchronous
 * error with a deadline, so a dead or stuck peer never hangs a rank: the communicator is
 * aborted, the job fails with TP_EUNAVAIL, and the worker exits so that the supervisor rebuilds
 * the group. Every CUDA, cuBLAS and NCCL call is checked; a failure names the call and the
 * library's message, and the supervisor prefixes the rank. Ranks own uneven column ranges when
 * N does not divide out (plan_split); where each shard goes is computed in backend_cuda_plan.c,
 * which the unit tests check on the CPU. */
#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#include <nccl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend.h"
#include "backend_cuda_kern.h"
#include "backend_cuda_plan.h"
#include "log.h"
#include "timing.h"

_Static_assert(NCCL_UNIQUE_ID_BYTES == CTL_NCCL_ID_BYTES, "the ctl INIT message carries the id");

#define INIT_TIMEOUT_S 120.0   /* NCCL communicator creation: every rank must have started */
#define FORWARD_TIMEOUT_S 30.0 /* one forward, including the all-gather */
#define BLAS_WORKSPACE (32u << 20)

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
            cuda_call_error((err), TP_EDEVICE, #call, cublasGetStatusString(s_));                  \
            goto label;                                                                            \
        }                                                                                          \
    } while (0)

struct backend {
    int rank, nranks, device;
    enum backend_gather gather;
    enum tp_dtype dtype;
    uint32_t max_batch;
    int64_t in;             /* inputs of the layer */
    struct cuda_layout lay; /* this rank's columns of y (its rows of W) and the gather's blocks */
    cudaStream_t stream;
    cublasHandle_t blas;
    ncclComm_t comm;
    int broken;               /* a device or communicator error: nothing more runs */
    void *w;                  /* [lay.cols, in] of dtype, device */
    float *bias;              /* [lay.cols] or NULL, device */
    float *x32;               /* [max_batch, in] float32, device */
    void *x16;                /* [max_batch, in] FP16/BF16, device; NULL with FP32 */
    float *y;                 /* cuda_plan_buffer: NCCL [nranks][max_batch·lay.pad]; host
                                 [max_batch, lay.cols] */
    void *ws;                 /* cuBLAS workspace, device */
    void *pinned;             /* the registered arena, or NULL */
    struct cuda_copy2d *plan; /* nranks entries */
};

static int nccl_error(struct tp_err *err, const char *call, ncclResult_t r, ncclComm_t comm)
{
    char msg[200];
    const char *last = comm ? ncclGetLastError(comm) : NULL;

    snprintf(msg, sizeof(msg), "%s%s%.150s", ncclGetErrorString(r), last && last[0] ? ": " : "",
             last ? last : "");
    /* a remote or system error means a peer or the network is gone: the group must be rebuilt */
    return cuda_call_error(
        err, r == ncclRemoteError || r == ncclSystemError ? TP_EUNAVAIL : TP_EDEVICE, call, msg);
}

/* Waits until the non-blocking communicator has finished its pending call (init or enqueue). */
static int nccl_settle(struct backend *b, const char *call, double timeout_s, struct tp_err *err)
{
    double deadline = timing_now_s() + timeout_s;
    ncclResult_t st = ncclInProgress;

    for (;;) {
        ncclResult_t r = ncclCommGetAsyncError(b->comm, &st);

        if (r != ncclSuccess)
            return nccl_error(err, "ncclCommGetAsyncError", r, b->comm);
        if (st == ncclSuccess)
            return 0;
        if (st != ncclInProgress)
            return nccl_error(err, call, st, b->comm);
        if (timing_now_s() > deadline)
            return tp_err_set(err, TP_EUNAVAIL,
                              "%s did not complete in %.0f s: a peer rank is gone or stuck", call,
                              timeout_s);
        nanosleep(&(struct timespec){.tv_nsec = 100000}, NULL);
    }
}

/* Waits for the stream to drain while watching the communicator, at most timeout_s. Spins
 * briefly (a forward of a few rows takes tens of microseconds), then sleeps between polls. */
static int wait_stream(struct backend *b, double timeout_s, struct tp_err *err)
{
    double deadline = timing_now_s() + timeout_s;

    for (unsigned spins = 0;; spins++) {
        cudaError_t e = cudaStreamQuery(b->stream);

        if (e == cudaSuccess)
            return 0;
        if (e != cudaErrorNotReady)
            return cuda_call_error(err, TP_EDEVICE, "cudaStreamQuery", cudaGetErrorString(e));
        if (b->comm) {
            ncclResult_t st = ncclSuccess, r = ncclCommGetAsyncError(b->comm, &st);

            if (r != ncclSuccess)
                return nccl_error(err, "ncclCommGetAsyncError", r, b->comm);
            if (st != ncclSuccess && st != ncclInProgress)
                return nccl_error(err, "ncclAllGather", st, b->comm);
        }
        if ((spins & 1023) == 1023 && timing_now_s() > deadline)
            return tp_err_set(err, TP_EUNAVAIL, "GPU work did not complete in %.0f s: %s",
                              timeout_s,
                              b->comm ? "a peer rank is gone or stuck" : "the GPU is stuck");
        if (spins > 2000)
            nanosleep(&(struct timespec){.tv_nsec = 20000}, NULL);
    }
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

/* Enqueues the GEMM of rows rows into out (dense, row pitch lay.cols), bias first. */
static int enqueue_gemm(struct backend *b, uint32_t rows, float *out, struct tp_err *err)
{
    struct cuda_gemm_shape g;
    const float one = 1.0f, zero = 0.0f;
    const float *beta = &zero;
    cublasOperation_t ta, tb;

    if (cuda_plan_gemm(rows, b->lay.cols, b->in, &g, err) < 0)
        return -1;
    ta = g.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
    tb = g.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    if (b->bias) {
        CUDA_GOTO(cuda_kern_fill_bias(out, b->bias, rows, (uint32_t)b->lay.cols, b->stream), err,
                  fail);
        beta = &one;
    }
    if (b->dtype == TP_F32) {
        /* A = W (column-major Wᵀ), B = x (column-major xᵀ): see backend_cuda_plan.c */
        BLAS_GOTO(cublasSgemm(b->blas, ta, tb, g.m, g.n, g.k, &one, (const float *)b->w, g.lda,
                              b->x32, g.ldb, beta, out, g.ldc),
                  err, fail);
    } else {
        cudaDataType t = b->dtype == TP_BF16 ? CUDA_R_16BF : CUDA_R_16F;
        size_t n = (size_t)rows * (size_t)b->in;

        CUDA_GOTO(cuda_kern_to_half(b->x16, b->x32, n, b->dtype == TP_BF16, b->stream), err, fail);
        /* FP16/BF16 inputs, FP32 accumulation and FP32 output (a combination cublasGemmEx
         * lists for CUBLAS_COMPUTE_32F): only the inputs are rounded. */
        BLAS_GOTO(cublasGemmEx(b->blas, ta, tb, g.m, g.n, g.k, &one, b->w, t, g.lda, b->x16, t,
                               g.ldb, beta, out, CUDA_R_32F, g.ldc, CUBLAS_COMPUTE_32F,
                               CUBLAS_GEMM_DEFAULT),
                  err, fail);
    }
    return 0;
fail:
    return -1;
}

static int cuda_forward(struct backend *b, const float *x, uint32_t rows, float *y,
                        struct tp_err *err)
{
    size_t block;
    int ncopies;

    if (b->broken)
        return tp_err_set(err, TP_EUNAVAIL, "the GPU worker failed before and is restarting");
    if (rows < 1 || rows > b->max_batch)
        return tp_err_set(err, TP_EINVAL, "%u rows, expected 1 to %u", rows, b->max_batch);
    CUDA_GOTO(cudaMemcpyAsync(b->x32, x, (size_t)rows * (size_t)b->in * sizeof(float),
                              cudaMemcpyHostToDevice, b->stream),
              err, fail);
    block = cuda_plan_block(&b->lay, rows);
    if (enqueue_gemm(b, rows, b->y + block, err) < 0)
        goto fail;
    if (b->gather == BACKEND_GATHER_NCCL) {
        /* every rank sends rows·pad elements, its shard and then padding, which nobody copies */
        size_t count = cuda_plan_count(&b->lay, rows);
        ncclResult_t r = ncclAllGather(b->y + block, b->y, count, ncclFloat32, b->comm, b->stream);

        if (r == ncclInProgress) {
            if (nccl_settle(b, "ncclAllGather", FORWARD_TIMEOUT_S, err) < 0)
                goto fail;
        } else if (r != ncclSuccess) {
            nccl_error(err, "ncclAllGather", r, b->comm);
            goto fail;
        }
    }
    ncopies = cuda_plan_copyout(&b->lay, rows, sizeof(float), b->plan);
    for (int i = 0; i < ncopies; i++) {
        const struct cuda_copy2d *c = &b->plan[i];

        CUDA_GOTO(cudaMemcpy2DAsync((char *)y + c->dst_off, c->dpitch, (char *)b->y + c->src_off,
                                    c->spitch, c->width, c->height, cudaMemcpyDeviceToHost,
                                    b->stream),
                  err, fail);
    }
    if (wait_stream(b, FORWARD_TIMEOUT_S, err) < 0)
        goto fail;
    return 0;
fail:
    /* The stream may still hold work that reads or writes the slot, and the context or the
     * communicator may be broken: nothing more runs in this process. */
    b->broken = 1;
    if (b->comm)
        ncclCommAbort(b->comm);
    b->comm = NULL;
    if (err->code != TP_EUNAVAIL)
        err->code = TP_EDEVICE;
    return -1;
}

/* Uploads the shard's float32 rows as dtype; the float32 copy on the device is temporary when
 * converting. Every copy and kernel runs on the backend's stream, which does not synchronize
 * with the legacy default stream: a plain cudaMemcpy from pageable memory may return before its
 * DMA has landed, and a kernel on our stream could then read stale memory. The stream is
 * synchronized before returning, so the host rows may be freed afterwards. */
static int upload_weights(struct backend *b, const struct shard *s, struct tp_err *err)
{
    size_t n = (size_t)s->rows * (size_t)s->in;
    float *tmp = NULL;

    if (b->dtype == TP_F32) {
        CUDA_GOTO(cudaMalloc(&b->w, n * sizeof(float)), err, fail);
        CUDA_GOTO(cudaMemcpyAsync(b->w, s->w, n * sizeof(float), cudaMemcpyHostToDevice, b->stream),
                  err, fail);
    } else {
        CUDA_GOTO(cudaMalloc(&b->w, n * 2), err, fail);
        CUDA_GOTO(cudaMalloc((void **)&tmp, n * sizeof(float)), err, fail);
        CUDA_GOTO(cudaMemcpyAsync(tmp, s->w, n * sizeof(float), cudaMemcpyHostToDevice, b->stream),
                  err, fail);
        CUDA_GOTO(cuda_kern_to_half(b->w, tmp, n, b->dtype == TP_BF16, b->stream), err, fail);
    }
    if (s->b) {
        CUDA_GOTO(cudaMalloc((void **)&b->bias, (size_t)s->rows * sizeof(float)), err, fail);
        CUDA_GOTO(cudaMemcpyAsync(b->bias, s->b, (size_t)s->rows * sizeof(float),
                                  cudaMemcpyHostToDevice, b->stream),
                  err, fail);
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

static int join_nccl(struct backend *b, const uint8_t *id_bytes, struct tp_err *err)
{
    ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
    ncclUniqueId id;
    ncclResult_t r;
    double t0 = timing_now_s();

    if (!id_bytes)
        return tp_err_set(err, TP_EINTERNAL, "the NCCL gather needs the coordinator's unique id");
    memcpy(id.internal, id_bytes, sizeof(id.internal));
    cfg.blocking = 0;
    r = ncclCommInitRankConfig(&b->comm, b->nranks, id, b->rank, &cfg);
    if (r != ncclSuccess && r != ncclInProgress) {
        nccl_error(err, "ncclCommInitRankConfig", r, NULL);
        b->comm = NULL;
        return -1;
    }
    if (nccl_settle(b, "ncclCommInitRankConfig", INIT_TIMEOUT_S, err) < 0)
        return -1;
    tp_log(TP_LOG_INFO, "joined the NCCL communicator of %d ranks in %.3f s", b->nranks,
           timing_now_s() - t0);
    return 0;
}

static void cuda_destroy(struct backend *b)
{
    if (!b)
        return;
    /* Abort, not finalize: it is local and never waits for peers, which may be gone already. */
    if (b->comm)
        ncclCommAbort(b->comm);
    if (b->stream && !b->broken)
        cudaStreamSynchronize(b->stream);
    if (b->pinned)
        cudaHostUnregister(b->pinned);
    cudaFree(b->w);
    cudaFree(b->bias);
    cudaFree(b->x32);
    cudaFree(b->x16);
    cudaFree(b->y);
    cudaFree(b->ws);
    if (b->blas)
        cublasDestroy(b->blas);
    if (b->stream)
        cudaStreamDestroy(b->stream);
    free(b->plan);
    free(b);
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
                          .in = s->in};
    if (cuda_plan_layout(&b->lay, c->gather, s->out, c->nranks, c->rank, err) < 0)
        goto fail;
    /* The copy-out places every rank's columns by plan_split; a shard loaded by another split
     * would be written to the wrong columns. */
    if (s->row0 != b->lay.row0 || s->rows != b->lay.cols) {
        tp_err_set(err, TP_EINTERNAL,
                   "the shard holds rows [%lld, %lld) of %lld, but rank %d of %d owns [%lld, %lld)",
                   (long long)s->row0, (long long)(s->row0 + s->rows), (long long)s->out, c->rank,
                   c->nranks, (long long)b->lay.row0, (long long)(b->lay.row0 + b->lay.cols));
        goto fail;
    }
    b->plan = calloc((size_t)c->nranks, sizeof(*b->plan));
    if (!b->plan) {
        tp_err_set(err, TP_ENOMEM, "no memory for the cuda backend");
        goto fail;
    }
    if (b->dtype != TP_F32 && b->dtype != TP_F16 && b->dtype != TP_BF16) {
        tp_err_set(err, TP_EINVAL, "the cuda backend computes in FP32, FP16 or BF16, not %s",
                   tp_dtype_wire_name(b->dtype));
        goto fail;
    }
    /* cuda_probe checked the device and its compute capability already */
    CUDA_GOTO(cudaSetDevice(c->device < 0 ? 0 : c->device), err, fail);
    CUDA_GOTO(cudaStreamCreateWithFlags(&b->stream, cudaStreamNonBlocking), err, fail);
    BLAS_GOTO(cublasCreate(&b->blas), err, fail);
    BLAS_GOTO(cublasSetStream(b->blas, b->stream), err, fail);
    /* CUBLAS_DEFAULT_MATH keeps FP32 GEMMs in FP32; TF32 tensor cores only when asked. */
    BLAS_GOTO(
        cublasSetMathMode(b->blas, c->tf32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH), err,
        fail);
    /* Our own workspace, so cuBLAS allocates nothing while serving. */
    CUDA_GOTO(cudaMalloc(&b->ws, BLAS_WORKSPACE), err, fail);
    BLAS_GOTO(cublasSetWorkspace(b->blas, b->ws, BLAS_WORKSPACE), err, fail);
    if (upload_weights(b, s, err) < 0)
        goto fail;
    CUDA_GOTO(cudaMalloc((void **)&b->x32, (size_t)c->max_batch * (size_t)b->in * sizeof(float)),
              err, fail);
    if (b->dtype != TP_F32)
        CUDA_GOTO(cudaMalloc(&b->x16, (size_t)c->max_batch * (size_t)b->in * 2), err, fail);
    ybytes = cuda_plan_buffer(&b->lay, c->max_batch) * sizeof(float);
    CUDA_GOTO(cudaMalloc((void **)&b->y, ybytes), err, fail);
    /* The padding of a rank block is gathered but never copied out; zeroing it once keeps what
     * the all-gather moves defined. */
    CUDA_GOTO(cudaMemsetAsync(b->y, 0, ybytes, b->stream), err, fail);
    /* Pinning makes the slot copies run at full PCIe speed; without it they are correct, only
     * slower (e.g. a memlock limit), so it is a warning. */
    if (c->arena && c->arena_size) {
        cudaError_t e = cudaHostRegister(c->arena, c->arena_size, cudaHostRegisterDefault);

        if (e == cudaSuccess)
            b->pinned = c->arena;
        else {
            tp_log(TP_LOG_WARN, "cudaHostRegister of the %zu-byte arena: %s; copies stay pageable",
                   c->arena_size, cudaGetErrorString(e));
            cudaGetLastError(); /* not sticky: clear it */
        }
    }
    if (b->gather == BACKEND_GATHER_NCCL && join_nccl(b, c->nccl_id, err) < 0)
        goto fail;
    /* Warm-up: the first GEMM loads kernels and the first all-gather sets up NCCL's connections;
     * both belong to the start, not to the first request. Its input is zeros. */
    CUDA_GOTO(
        cudaMemsetAsync(b->x32, 0, (size_t)c->max_batch * (size_t)b->in * sizeof(float), b->stream),
        err, fail);
    if (enqueue_gemm(b, c->max_batch, b->y + cuda_plan_block(&b->lay, c->max_batch), err) < 0)
        goto fail;
    if (b->gather == BACKEND_GATHER_NCCL) {
        ncclResult_t r =
            ncclAllGather(b->y + (size_t)b->rank, b->y, 1, ncclFloat32, b->comm, b->stream);

        if (r == ncclInProgress) {
            if (nccl_settle(b, "ncclAllGather", INIT_TIMEOUT_S, err) < 0)
                goto fail;
        } else if (r != ncclSuccess) {
            nccl_error(err, "ncclAllGather", r, b->comm);
            goto fail;
        }
    }
    if (wait_stream(b, INIT_TIMEOUT_S, err) < 0)
        goto fail;
    tp_log(TP_LOG_NOTICE, "cuda backend on GPU %d: %s GEMM%s, gather %s, ready in %.3f s",
           c->device, tp_dtype_wire_name(b->dtype), c->tf32 && b->dtype == TP_F32 ? " (TF32)" : "",
           b->gather == BACKEND_GATHER_NCCL ? "nccl" : "host", timing_now_s() - t0);
    shard_free(s);
    *out = b;
    return 0;
fail:
    b->broken = 1;
    cuda_destroy(b);
    return -1;
}

static int cuda_probe(const struct backend_config *c, struct tp_err *err)
{
    return select_device(c->device < 0 ? 0 : c->device, err);
}

const struct backend_ops backend_cuda = {.name = "cuda",
                                         .probe = cuda_probe,
                                         .create = cuda_create,
                                         .forward = cuda_forward,
                                         .destroy = cuda_destroy};
