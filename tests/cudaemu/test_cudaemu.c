/* test_cudaemu.c -- the emulated device itself (cudaemu.h): its cuBLAS computes what cuBLAS's
 * documentation says (column-major, op(A), op(B), leading dimensions, alpha, beta; FP16 and
 * BF16 inputs), against a reference written here; its NCCL gathers and sums between real
 * processes, and reports a peer that is gone; and each misuse it promises to catch ends the
 * process with its message (or a fault, for a host access to device memory). Without these, a
 * pass of the GPU tests on the emulator would say nothing.
 *
 * The cases that must end their process run in a child forked before this process makes any
 * CUDA call of its own, so that each child starts with the emulator's state empty. */
#include <cublas_v2.h>
#include <nccl.h>
#include <signal.h>
#include <stdint.h>
#include <sys/wait.h>
#include <unistd.h>

#include "cudaemu.h"
#include "test.h"

#define CHECK_CUDA(call) ASSERT_EQ((call), cudaSuccess)
#define CHECK_BLAS(call) ASSERT_EQ((call), CUBLAS_STATUS_SUCCESS)

/* Runs fn in a child with its stderr captured: the child must die by sig, saying expect. */
static void expect_death(const char *name, void (*fn)(void), int sig, const char *expect)
{
    char out[4096];
    size_t got = 0;
    ssize_t n;
    int fds[2], status;
    pid_t pid;

    fprintf(stderr, "   %s\n", name);
    ASSERT_EQ(pipe(fds), 0);
    pid = fork();
    ASSERT_TRUE(pid >= 0);
    if (pid == 0) {
        dup2(fds[1], 2);
        close(fds[0]);
        fn();
        _exit(0);
    }
    close(fds[1]);
    while (got < sizeof(out) - 1 && (n = read(fds[0], out + got, sizeof(out) - 1 - got)) > 0)
        got += (size_t)n;
    out[got] = 0;
    close(fds[0]);
    ASSERT_EQ(waitpid(pid, &status, 0), pid);
    /* a sanitizer build reports a fault itself and exits */
    if (sig == SIGSEGV && strstr(out, "SEGV"))
        return;
    if (!WIFSIGNALED(status) || WTERMSIG(status) != sig)
        TEST_FAIL_("%s: expected death by signal %d, got status %#x; stderr: %s", name, sig, status,
                   out);
    ASSERT_STR_HAS(out, expect);
}

static void *dev_alloc(size_t n)
{
    void *p = NULL;

    CHECK_CUDA(cudaMalloc(&p, n));
    return p;
}

static void copy_overrun(void)
{
    float host[65] = {0};
    void *d = dev_alloc(64 * sizeof(float));

    cudaMemcpyAsync(d, host, sizeof(host), cudaMemcpyHostToDevice, NULL);
}

static void use_after_free(void)
{
    void *d = dev_alloc(256);

    cudaFree(d);
    cudaMemsetAsync(d, 0, 16, NULL);
}

static void host_reads_device(void)
{
    volatile float *d = dev_alloc(256);

    fprintf(stderr, "read %g\n", (double)d[0]);
}

static void free_live_workspace(void)
{
    cublasHandle_t h;
    void *ws = dev_alloc(1 << 20);

    cublasCreate(&h);
    cublasSetWorkspace(h, ws, 1 << 20);
    cudaFree(ws);
}

static void gemm_overrun(void)
{
    cublasHandle_t h;
    float one = 1, zero = 0;
    float *a = dev_alloc(4 * 3 * sizeof(float)), *b = dev_alloc(3 * 2 * sizeof(float));
    float *c = dev_alloc(4 * 2 * sizeof(float));

    cublasCreate(&h);
    /* C is 4 x 2 with ldc 5: its last column ends one element past the allocation */
    cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, 4, 2, 3, &one, a, 4, b, 3, &zero, c, 5);
}

static void leak_at_exit(void)
{
    dev_alloc(1000);
    exit(0);
}

/* Waits for s as tpd does once a collective is queued: polling (cudaStreamSynchronize would be
 * fatal, see sync_on_collective). */
static void poll_stream(cudaStream_t s)
{
    cudaError_t e;

    while ((e = cudaStreamQuery(s)) == cudaErrorNotReady)
        usleep(100);
    CHECK_CUDA(e);
}

static void sync_on_collective(void)
{
    ncclUniqueId id;
    ncclComm_t comm;
    float *buf = dev_alloc(64);

    ncclGetUniqueId(&id);
    ncclCommInitRankConfig(&comm, 1, id, 0, NULL);
    ncclAllReduce(buf, buf, 16, ncclFloat32, ncclSum, comm, NULL);
    cudaStreamSynchronize(NULL);
}

static void test_misuse_is_fatal(void)
{
    expect_death("a copy past its allocation", copy_overrun, SIGABRT,
                 "overruns its allocation of 256 bytes at offset 0 by 4 bytes");
    expect_death("a freed pointer", use_after_free, SIGABRT, "was freed");
    expect_death("the host reading device memory", host_reads_device, SIGSEGV, "");
    expect_death("a live handle's workspace freed", free_live_workspace, SIGABRT,
                 "workspace of a live cuBLAS handle");
    expect_death("a GEMM's C past its allocation", gemm_overrun, SIGABRT, "cublasSgemm: C [");
    expect_death("device memory left at exit", leak_at_exit, SIGABRT,
                 "at exit: 1 device allocations (1000 bytes");
    expect_death("a synchronize on a collective", sync_on_collective, SIGABRT,
                 "cudaStreamSynchronize waits for a stream that holds 1 collectives");
}

/* ---- NCCL between processes ---- */

enum { NR = 3, COUNT = 5 };

/* One rank: an in-place all-gather and an in-place all-reduce; exits 0 when both are right. */
static void nccl_rank(ncclUniqueId id, int rank, int mismatch)
{
    ncclComm_t comm;
    ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
    ncclResult_t st = ncclInProgress;
    cudaStream_t s;
    float host[NR * COUNT], *pinned_buf;
    float *buf = dev_alloc(sizeof(host));

    cfg.blocking = 0;
    /* pinned: a copy after a collective into pageable memory would wait on it (fatal) */
    CHECK_CUDA(cudaMallocHost((void **)&pinned_buf, sizeof(host)));
    CHECK_CUDA(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    ASSERT_EQ(ncclCommInitRankConfig(&comm, NR, id, rank, &cfg), ncclInProgress);
    while (st == ncclInProgress)
        ASSERT_EQ(ncclCommGetAsyncError(comm, &st), ncclSuccess);
    ASSERT_EQ(st, ncclSuccess);
    for (int i = 0; i < COUNT; i++)
        host[rank * COUNT + i] = (float)(100 * rank + i);
    CHECK_CUDA(cudaMemcpyAsync(buf + rank * COUNT, host + rank * COUNT, COUNT * sizeof(float),
                               cudaMemcpyHostToDevice, s));
    ASSERT_EQ(ncclAllGather(buf + rank * COUNT, buf, COUNT, ncclFloat32, comm, s), ncclSuccess);
    CHECK_CUDA(cudaMemcpyAsync(pinned_buf, buf, sizeof(host), cudaMemcpyDeviceToHost, s));
    poll_stream(s);
    memcpy(host, pinned_buf, sizeof(host));
    for (int q = 0; q < NR; q++)
        for (int i = 0; i < COUNT; i++)
            ASSERT_NEAR(host[q * COUNT + i], 100 * q + i, 0);
    /* the sum of 100 q + i over the ranks: 300 + 3 i; one rank sends a count of its own */
    CHECK_CUDA(cudaMemcpyAsync(buf, host + rank * COUNT, COUNT * sizeof(float),
                               cudaMemcpyHostToDevice, s));
    ASSERT_EQ(ncclAllReduce(buf, buf, mismatch && rank == 1 ? COUNT + 1 : COUNT, ncclFloat32,
                            ncclSum, comm, s),
              ncclSuccess);
    CHECK_CUDA(cudaMemcpyAsync(pinned_buf, buf, COUNT * sizeof(float), cudaMemcpyDeviceToHost, s));
    poll_stream(s);
    for (int i = 0; i < COUNT; i++)
        ASSERT_NEAR(pinned_buf[i], 300 + 3 * i, 0);
    ASSERT_EQ(ncclCommAbort(comm), ncclSuccess);
    CHECK_CUDA(cudaFreeHost(pinned_buf));
    CHECK_CUDA(cudaStreamDestroy(s));
    CHECK_CUDA(cudaFree(buf));
    exit(0);
}

/* Runs NR ranks; returns their wait statuses. */
static void run_ranks(int mismatch, int status[NR])
{
    ncclUniqueId id;
    pid_t pid[NR];

    ASSERT_EQ(ncclGetUniqueId(&id), ncclSuccess);
    for (int r = 0; r < NR; r++) {
        pid[r] = fork();
        ASSERT_TRUE(pid[r] >= 0);
        if (pid[r] == 0)
            nccl_rank(id, r, mismatch);
    }
    for (int r = 0; r < NR; r++)
        ASSERT_EQ(waitpid(pid[r], &status[r], 0), pid[r]);
}

static void test_nccl_between_processes(void)
{
    int status[NR], aborted = 0;

    run_ranks(0, status);
    for (int r = 0; r < NR; r++)
        ASSERT_EQ(status[r], 0);
    /* collectives that differ between ranks: fatal in whichever rank sees it first (the others
     * then see a peer gone, or the abort, and fail their checks) */
    run_ranks(1, status);
    for (int r = 0; r < NR; r++) {
        ASSERT_NE(status[r], 0);
        aborted += WIFSIGNALED(status[r]) && WTERMSIG(status[r]) == SIGABRT;
    }
    ASSERT_GT(aborted, 0);
}

/* A peer that dies in the middle: the survivor's all-reduce fails with ncclRemoteError. */
static void test_nccl_peer_gone(void)
{
    ncclUniqueId id;
    pid_t pid[2];
    int status[2];

    ASSERT_EQ(ncclGetUniqueId(&id), ncclSuccess);
    for (int r = 0; r < 2; r++) {
        pid[r] = fork();
        ASSERT_TRUE(pid[r] >= 0);
        if (pid[r] == 0) {
            ncclComm_t comm;
            ncclResult_t st = ncclSuccess;
            cudaStream_t s;
            float *buf = dev_alloc(16);

            CHECK_CUDA(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
            ASSERT_EQ(ncclCommInitRankConfig(&comm, 2, id, r, NULL), ncclSuccess);
            if (r == 1)
                _exit(0); /* joined, then gone */
            ASSERT_EQ(ncclAllReduce(buf, buf, 4, ncclFloat32, ncclSum, comm, s), ncclSuccess);
            poll_stream(s);
            ASSERT_EQ(ncclCommGetAsyncError(comm, &st), ncclSuccess);
            ASSERT_EQ(st, ncclRemoteError);
            ASSERT_STR_HAS(ncclGetLastError(comm), "rank 1");
            _exit(0);
        }
    }
    /* rank 1 first: until it is reaped, its pid is a zombie's, which counts as alive */
    for (int r = 1; r >= 0; r--) {
        ASSERT_EQ(waitpid(pid[r], &status[r], 0), pid[r]);
        ASSERT_EQ(status[r], 0);
    }
}

/* ---- in this process ---- */

/* C = alpha op(A) op(B) + beta C, column-major, as cuBLAS documents it, in double. */
static void ref_gemm(int ta, int tb, int m, int n, int k, double alpha, const float *a, int lda,
                     const float *b, int ldb, double beta, double *c, int ldc)
{
    for (int j = 0; j < n; j++)
        for (int i = 0; i < m; i++) {
            double s = 0;

            for (int p = 0; p < k; p++)
                s += (double)(ta ? a[p + i * lda] : a[i + p * lda]) *
                     (double)(tb ? b[j + p * ldb] : b[p + j * ldb]);
            c[i + j * ldc] = alpha * s + beta * c[i + j * ldc];
        }
}

static void test_sgemm_semantics(void)
{
    enum { M = 5, N = 3, K = 4, LD = 7 }; /* leading dimensions wider than any matrix */
    float a[LD * LD], b[LD * LD], c[LD * N], got[LD * N];
    double want[LD * N];
    float alpha = 1.5f, beta = -0.5f;
    cublasHandle_t h;
    cudaStream_t s;
    float *da = dev_alloc(sizeof(a)), *db = dev_alloc(sizeof(b)), *dc = dev_alloc(sizeof(c));

    for (int i = 0; i < LD * LD; i++) {
        a[i] = (float)((i * 7) % 11) - 5;
        b[i] = (float)((i * 5) % 13) - 6;
    }
    CHECK_CUDA(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    CHECK_BLAS(cublasCreate(&h));
    CHECK_BLAS(cublasSetStream(h, s));
    CHECK_CUDA(cudaMemcpyAsync(da, a, sizeof(a), cudaMemcpyHostToDevice, s));
    CHECK_CUDA(cudaMemcpyAsync(db, b, sizeof(b), cudaMemcpyHostToDevice, s));
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++) {
            for (int i = 0; i < LD * N; i++) {
                c[i] = (float)(i % 3);
                want[i] = c[i];
            }
            CHECK_CUDA(cudaMemcpyAsync(dc, c, sizeof(c), cudaMemcpyHostToDevice, s));
            CHECK_BLAS(cublasSgemm(h, ta ? CUBLAS_OP_T : CUBLAS_OP_N,
                                   tb ? CUBLAS_OP_T : CUBLAS_OP_N, M, N, K, &alpha, da, LD, db, LD,
                                   &beta, dc, LD));
            CHECK_CUDA(cudaMemcpyAsync(got, dc, sizeof(got), cudaMemcpyDeviceToHost, s));
            CHECK_CUDA(cudaStreamSynchronize(s));
            ref_gemm(ta, tb, M, N, K, alpha, a, LD, b, LD, beta, want, LD);
            for (int i = 0; i < LD * N; i++)
                ASSERT_NEAR(got[i], want[i], 1e-5 * (1 + fabs(want[i])));
        }
    /* a leading dimension smaller than the rows it spans is refused, as cuBLAS refuses it */
    ASSERT_EQ(
        cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, M, N, K, &alpha, da, M - 1, db, LD, &beta, dc, LD),
        CUBLAS_STATUS_INVALID_VALUE);
    CHECK_BLAS(cublasDestroy(h));
    CHECK_CUDA(cudaStreamDestroy(s));
    CHECK_CUDA(cudaFree(da));
    CHECK_CUDA(cudaFree(db));
    CHECK_CUDA(cudaFree(dc));
}

/* FP16 and BF16 inputs: 1.5, -2.25 and 3 are exact in both, so the products are too. */
static void test_gemm_ex_half(void)
{
    const uint16_t f16[3] = {0x3e00, 0xc080, 0x4200}, bf16[3] = {0x3fc0, 0xc010, 0x4040};
    float one = 1, zero = 0, got;
    cublasHandle_t h;

    CHECK_BLAS(cublasCreate(&h));
    for (int t = 0; t < 2; t++) {
        uint16_t *d = dev_alloc(sizeof(f16));
        float *c = dev_alloc(sizeof(float));

        CHECK_CUDA(cudaMemcpyAsync(d, t ? bf16 : f16, sizeof(f16), cudaMemcpyHostToDevice, NULL));
        /* [1 x 3] · [3 x 1]: 1.5² + 2.25² + 3² */
        CHECK_BLAS(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, 1, 1, 3, &one, d,
                                t ? CUDA_R_16BF : CUDA_R_16F, 3, d, t ? CUDA_R_16BF : CUDA_R_16F, 3,
                                &zero, c, CUDA_R_32F, 1, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        CHECK_CUDA(cudaMemcpyAsync(&got, c, sizeof(got), cudaMemcpyDeviceToHost, NULL));
        CHECK_CUDA(cudaStreamSynchronize(NULL));
        ASSERT_NEAR(got, 2.25 + 5.0625 + 9, 0);
        CHECK_CUDA(cudaFree(d));
        CHECK_CUDA(cudaFree(c));
    }
    CHECK_BLAS(cublasDestroy(h));
}

/* A copy to pinned memory lands only when the stream gets to it; one to pageable memory waits
 * for the stream, as CUDA's does. TPD_CUDAEMU_DELAY_US is 100 ms here (main). */
static void test_streams_run_later(void)
{
    float *pinned_buf, pageable = 0, one = 1;
    float *d = dev_alloc(sizeof(float));
    cudaStream_t s;

    CHECK_CUDA(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    CHECK_CUDA(cudaMallocHost((void **)&pinned_buf, sizeof(float)));
    *pinned_buf = 0;
    CHECK_CUDA(cudaMemcpyAsync(d, &one, sizeof(one), cudaMemcpyHostToDevice, s));
    CHECK_CUDA(cudaMemcpyAsync(pinned_buf, d, sizeof(float), cudaMemcpyDeviceToHost, s));
    ASSERT_EQ(cudaStreamQuery(s), cudaErrorNotReady);
    ASSERT_NEAR(*pinned_buf, 0, 0); /* not yet */
    CHECK_CUDA(cudaStreamSynchronize(s));
    ASSERT_NEAR(*pinned_buf, 1, 0);
    CHECK_CUDA(cudaMemsetAsync(d, 0, sizeof(float), s));
    CHECK_CUDA(cudaMemcpyAsync(&pageable, d, sizeof(float), cudaMemcpyDeviceToHost, s));
    ASSERT_EQ(cudaStreamQuery(s), cudaSuccess); /* the pageable copy waited for the memset */
    ASSERT_NEAR(pageable, 0, 0);
    CHECK_CUDA(cudaFreeHost(pinned_buf));
    CHECK_CUDA(cudaStreamDestroy(s));
    CHECK_CUDA(cudaFree(d));
}

int main(void)
{
    setenv("TPD_CUDAEMU_DELAY_US", "100000", 1);
    unsetenv("TPD_CUDAEMU_FAULTS");
    /* children first: this process has no CUDA state yet */
    TEST_RUN(test_misuse_is_fatal);
    TEST_RUN(test_nccl_between_processes);
    TEST_RUN(test_nccl_peer_gone);
    TEST_RUN(test_sgemm_semantics);
    TEST_RUN(test_gemm_ex_half);
    TEST_RUN(test_streams_run_later);
    return 0;
}
