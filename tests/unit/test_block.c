/* test_block.c -- the CPU pieces of a reducing model (worker/block.c): the activations against
 * their float64 definitions, the stripes of the reduce (every column once, whole 64-byte lines,
 * ranks without columns when out is small), the reduce's sum order (rank order, then the bias),
 * and the arrival counter across real processes sharing a memfd: nobody passes before the last
 * one arrives, and a closed control socket ends the wait with UNAVAILABLE. */
#include <math.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "block.h"
#include "test.h"

static double act64(enum plan_act a, double t)
{
    switch (a) {
    case PLAN_ACT_SILU: return t / (1.0 + exp(-t));
    /* 1 + erf(x) = erfc(-x) and 1 + tanh(u) = 2·sigmoid(2u): the same values, without the
     * cancellation that leaves 0 for t far below 0 even in double */
    case PLAN_ACT_GELU: return 0.5 * t * erfc(-t / sqrt(2.0));
    case PLAN_ACT_GELU_TANH:
        return t / (1.0 + exp(-2.0 * sqrt(2.0 / M_PI) * (t + 0.044715 * t * t * t)));
    default: return t > 0 ? t : 0;
    }
}

static void test_activations(void)
{
    static const enum plan_act acts[] = {PLAN_ACT_SILU, PLAN_ACT_GELU, PLAN_ACT_GELU_TANH,
                                         PLAN_ACT_RELU};
    enum { N = 2001 };
    static float t[2][2 * N];

    for (size_t a = 0; a < 4; a++) {
        double worst = 0;

        for (int j = 0; j < N; j++) {
            t[0][j] = t[1][j] = (float)(j - N / 2) / 125.0f; /* -8 .. 8 */
            t[1][N + j] = 1.5f;                              /* up's output, for the product */
        }
        block_act(acts[a], t[0], 2 * N, 1, N);
        block_act_mul(acts[a], t[1], 2 * N, 1, N);
        for (int j = 0; j < N; j++) {
            double x = (double)(j - N / 2) / 125.0, want = act64(acts[a], (double)(float)x);
            double scale = fabs(want) > 1e-30 ? fabs(want) : 1e-30;

            worst = fmax(worst, fabs(t[0][j] - want) / scale);
            ASSERT_LE(fabs(t[1][j] - 1.5 * want) / (1.5 * scale) * 1e9, 1e9 * 1e-5);
            ASSERT_EQ(t[1][N + j], 1.5f); /* up's half is left alone */
        }
        fprintf(stderr, "%s: worst relative error %.3g\n", plan_act_name(acts[a]), worst);
        /* float rounding, relative to every value, however small: a few ulps, and up to 1e-5
         * in the far tail (t near -8), where erfc(-t/√2) moves 2·|t|/√2 times faster than its
         * argument, whose own rounding is then what shows */
        ASSERT_LE(worst * 1e9, 1e9 * 1e-5);
    }
}

static void test_stripes(void)
{
    static const int64_t outs[] = {1, 15, 16, 17, 160, 4096, 4097};

    for (size_t i = 0; i < sizeof(outs) / sizeof(outs[0]); i++)
        for (int n = 1; n <= 5; n++) {
            int64_t next = 0;

            for (int r = 0; r < n; r++) {
                int64_t c0, nc;

                block_stripe(outs[i], n, r, &c0, &nc);
                ASSERT_EQ(c0, next);
                ASSERT_TRUE(nc >= 0);
                ASSERT_TRUE(c0 % 16 == 0 || nc == 0);
                next = c0 + nc;
            }
            ASSERT_EQ(next, outs[i]);
        }
}

static void test_reduce_order(void)
{
    /* 1 + 2^-24 + 2^-24 is 1 in float when summed left to right, 1 + 2^-23 right to left */
    float p0[2] = {1.0f, 1.0f}, p1[2] = {0x1p-24f, 0x1p-24f}, p2[2] = {0x1p-24f, 0x1p-24f};
    float *parts[3] = {p0, p1, p2}, y[2] = {0, 0}, bias[2] = {0.5f, -1.0f};

    block_reduce(y, parts, 3, 2, 1, 0, 2, NULL);
    ASSERT_EQ(y[0], 1.0f); /* ((p0 + p1) + p2): rank order */
    block_reduce(y, parts, 3, 2, 1, 1, 1, bias);
    ASSERT_EQ(y[1], 0.0f); /* the bias after the partials */
    ASSERT_EQ(y[0], 1.0f); /* another stripe, untouched */
}

/* N processes meet at one counter: each sleeps a different time first, then arrives; none may
 * pass before all have arrived (the last one's arrival time is in shared memory too). */
static void test_arrive(void)
{
    enum { N = 3 };
    struct shared {
        uint32_t sync;
        uint32_t arrived_last_us, passed_early;
    } *sh = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    pid_t pids[N];
    int status;

    ASSERT_TRUE(sh != MAP_FAILED);
    memset(sh, 0, sizeof(*sh));
    for (int r = 0; r < N; r++) {
        pids[r] = fork();
        ASSERT_TRUE(pids[r] >= 0);
        if (pids[r] == 0) {
            struct tp_err err = {0};

            usleep((useconds_t)(r * 30000));
            if (r == N - 1)
                __atomic_store_n(&sh->arrived_last_us, 1, __ATOMIC_SEQ_CST);
            /* rank 0 sleeps on the futex at once, rank 1 spins first */
            if (block_arrive(&sh->sync, N, -1, r == 1 ? 50000000 : 0, &err) < 0)
                _exit(2);
            if (!__atomic_load_n(&sh->arrived_last_us, __ATOMIC_SEQ_CST))
                __atomic_add_fetch(&sh->passed_early, 1, __ATOMIC_SEQ_CST);
            _exit(0);
        }
    }
    for (int r = 0; r < N; r++) {
        ASSERT_EQ(waitpid(pids[r], &status, 0), pids[r]);
        ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    }
    ASSERT_EQ(sh->sync, N);
    ASSERT_EQ(sh->passed_early, 0);
    munmap(sh, 4096);
}

/* A rank waiting for a peer that never comes gives up when its control socket closes. */
static void test_arrive_gives_up_on_hangup(void)
{
    uint32_t sync = 0;
    struct tp_err err = {0};
    int sv[2];
    pid_t pid;

    ASSERT_EQ(socketpair(AF_UNIX, SOCK_SEQPACKET, 0, sv), 0);
    pid = fork();
    ASSERT_TRUE(pid >= 0);
    if (pid == 0) { /* the coordinator, going away */
        close(sv[1]);
        usleep(100000);
        _exit(0);
    }
    close(sv[0]);
    ASSERT_EQ(block_arrive(&sync, 2, sv[1], 0, &err), -1);
    ASSERT_EQ(err.code, TP_EUNAVAIL);
    ASSERT_STR_HAS(err.msg, "1 of 2 ranks");
    waitpid(pid, NULL, 0);
    close(sv[1]);
}

int main(void)
{
    TEST_RUN(test_activations);
    TEST_RUN(test_stripes);
    TEST_RUN(test_reduce_order);
    TEST_RUN(test_arrive);
    TEST_RUN(test_arrive_gives_up_on_hangup);
    return 0;
}
