/* fuzz_plan.c -- the layer's plan as a worker receives it from the coordinator: the bytes go
 * through a real SOCK_SEQPACKET socketpair as one datagram of any size, ctl_recv_plan takes it
 * and checks it with plan_validate. A plan that passes must satisfy what the worker then relies
 * on before it opens a file: terminated strings, a known layout and dtypes, in and out in range
 * and agreeing with W's shape, byte ranges that hold the shapes, a bias of [out]. */
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "ctl.h"
#include "fuzz.h"
#include "plan.h"

static int computable(uint32_t d)
{
    return d == TP_F32 || d == TP_F16 || d == TP_BF16 || d == TP_F64;
}

static void check_tensor(const struct plan_tensor *t, uint32_t ndim)
{
    uint64_t count = 1;

    if (!memchr(t->name, '\0', sizeof(t->name)) || !memchr(t->path, '\0', sizeof(t->path)))
        abort();
    if (!computable(t->dtype) || t->ndim != ndim)
        abort();
    for (uint32_t i = 0; i < ndim; i++) {
        if (t->shape[i] < 0)
            abort();
        count *= (uint64_t)t->shape[i];
    }
    if (t->end < t->begin || t->end - t->begin != count * tp_dtype_size((enum tp_dtype)t->dtype))
        abort();
}

static void check(const struct plan *p)
{
    struct tp_err err = {0};
    int conv1d;

    if (plan_validate(p, &err) < 0) {
        if (!memchr(err.msg, '\0', sizeof(err.msg)))
            abort();
        return;
    }
    if (p->layout != PLAN_LINEAR && p->layout != PLAN_CONV1D)
        abort();
    if (p->in < 1 || p->out < 1 || p->in > UINT32_MAX || p->out > UINT32_MAX)
        abort();
    check_tensor(&p->w, 2);
    conv1d = p->layout == PLAN_CONV1D;
    if (p->w.shape[conv1d ? 1 : 0] != p->out || p->w.shape[conv1d ? 0 : 1] != p->in)
        abort();
    if (p->has_bias > 1)
        abort();
    if (p->has_bias) {
        check_tensor(&p->b, 1);
        if (p->b.shape[0] != p->out)
            abort();
    }
    for (int n = 1; n <= 5; n++) {
        int64_t next = 0;

        for (int r = 0; r < n && p->out >= n; r++) {
            int64_t row0, rows;

            if (plan_split(p->out, n, r, &row0, &rows, &err) < 0 || row0 != next || rows < 1)
                abort();
            next = row0 + rows;
        }
        if (p->out >= n && next != p->out)
            abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static struct plan p;
    struct tp_err err = {0};
    int sv[2];

    memset(&p, 0, sizeof(p));
    memcpy(&p, data, size < sizeof(p) ? size : sizeof(p));
    check(&p);

    if (size > sizeof(p) + 64 || socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0)
        return 0;
    if (send(sv[0], data, size, MSG_NOSIGNAL) == (ssize_t)size) {
        memset(&p, 0xa5, sizeof(p));
        if (ctl_recv_plan(sv[1], &p, &err) == 1)
            check(&p);
    }
    close(sv[0]);
    close(sv[1]);
    return 0;
}
