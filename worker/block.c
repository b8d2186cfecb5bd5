/* block.c -- activations and the arena all-reduce (see block.h). */
#include "block.h"

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <math.h>
#include <poll.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "timing.h"

#define LINE 16            /* floats of a 64-byte cache line */
#define WAIT_STEP_NS 50000000L /* futex wait between looks at the control socket: 50 ms */

/* As PyTorch defines them (torch.nn.functional), in float, written so that nothing cancels:
 * 1 + erf(t/√2) is erfc(-t/√2), and 0.5·(1 + tanh(u)) is sigmoid(2u), the same values without
 * the loss of 1 + (-0.9999...) for negative t. */
static inline float act1(enum plan_act act, float t)
{
    switch (act) {
    case PLAN_ACT_SILU: return t / (1.0f + expf(-t));
    case PLAN_ACT_GELU: return 0.5f * t * erfcf(-t * 0.70710678118654752f);
    case PLAN_ACT_GELU_TANH:
        return t / (1.0f + expf(-1.5957691216057308f * (t + 0.044715f * t * t * t)));
    case PLAN_ACT_RELU: return t > 0.0f || isnan(t) ? t : 0.0f;
    default: return t;
    }
}

void block_act(enum plan_act act, float *t, size_t ld, uint32_t rows, uint32_t n)
{
    for (uint32_t i = 0; i < rows; i++) {
        float *r = t + (size_t)i * ld;

        for (uint32_t j = 0; j < n; j++)
            r[j] = act1(act, r[j]);
    }
}

void block_act_mul(enum plan_act act, float *t, size_t ld, uint32_t rows, uint32_t n)
{
    for (uint32_t i = 0; i < rows; i++) {
        float *r = t + (size_t)i * ld;

        for (uint32_t j = 0; j < n; j++)
            r[j] = act1(act, r[j]) * r[n + j];
    }
}

void block_stripe(int64_t out, int nranks, int rank, int64_t *c0, int64_t *nc)
{
    int64_t lines = (out + LINE - 1) / LINE, base = lines / nranks, extra = lines % nranks;
    int64_t l0 = (int64_t)rank * base + (rank < extra ? rank : extra);
    int64_t l1 = l0 + base + (rank < extra);

    *c0 = l0 * LINE < out ? l0 * LINE : out;
    *nc = (l1 * LINE < out ? l1 * LINE : out) - *c0;
}

int block_arrive(uint32_t *sync, uint32_t nranks, int ctl_fd, int64_t spin_ns,
                 struct tp_err *err)
{
    uint32_t v = __atomic_add_fetch(sync, 1, __ATOMIC_ACQ_REL);
    double t0, spin_s = (double)spin_ns * 1e-9;

    if (v >= nranks) { /* the last one: the others may be asleep */
        if (nranks > 1)
            syscall(SYS_futex, sync, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
        return 0;
    }
    t0 = timing_now_s();
    while (timing_now_s() - t0 < spin_s) {
        if (__atomic_load_n(sync, __ATOMIC_ACQUIRE) >= nranks)
            return 0;
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
    }
    for (;;) {
        struct timespec step = {0, WAIT_STEP_NS};
        struct pollfd pfd = {.fd = ctl_fd, .events = 0};

        v = __atomic_load_n(sync, __ATOMIC_ACQUIRE);
        if (v >= nranks)
            return 0;
        /* sleeps only while the counter still reads v: a wake in between is not lost */
        if (syscall(SYS_futex, sync, FUTEX_WAIT, v, &step, NULL, 0) < 0 && errno != EAGAIN &&
            errno != ETIMEDOUT && errno != EINTR)
            return tp_err_sys(err, "waiting for the other ranks");
        if (ctl_fd >= 0 && poll(&pfd, 1, 0) > 0 && (pfd.revents & (POLLHUP | POLLERR)))
            return tp_err_set(err, TP_EUNAVAIL,
                              "the control socket closed while %u of %u ranks had arrived",
                              __atomic_load_n(sync, __ATOMIC_ACQUIRE), nranks);
    }
}

/* GCC's -O2 vectorizes only loops it needs no run-time checks for; these need one (partials and
 * y may not overlap), and they are the whole cost of the reduce: memcpy speed, not 8x less. */
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("tree-vectorize")))
#endif
static void add_row(float *restrict y, const float *restrict p, int64_t n)
{
    for (int64_t j = 0; j < n; j++)
        y[j] += p[j];
}

void block_add_bias(float *y, size_t ld, uint32_t rows, const float *bias, int64_t n)
{
    for (uint32_t i = 0; i < rows; i++)
        add_row(y + (size_t)i * ld, bias, n);
}

void block_reduce(float *y, float *const *partial, uint32_t nranks, size_t ld, uint32_t rows,
                  int64_t c0, int64_t nc, const float *bias)
{
    for (uint32_t i = 0; i < rows; i++) {
        float *yr = y + (size_t)i * ld + c0;

        memcpy(yr, partial[0] + (size_t)i * ld + c0, (size_t)nc * sizeof(float));
        for (uint32_t r = 1; r < nranks; r++)
            add_row(yr, partial[r] + (size_t)i * ld + c0, nc);
        if (bias)
            add_row(yr, bias + c0, nc);
    }
}
