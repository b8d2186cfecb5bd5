/* fuzz_plan.c -- the model's plan as a worker receives it from the coordinator: the bytes go
 * through a real SOCK_SEQPACKET socketpair as one datagram of any size, ctl_recv_plan takes it
 * and checks it with plan_validate. A plan that passes must satisfy what the worker then relies
 * on before it opens a file: terminated strings, a known kind, layouts and dtypes, each layer's
 * in and out in range and agreeing with W's shape, byte ranges that hold the shapes, biases of
 * [out], and a block's layers that chain. */
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

static void check_linear(const struct plan_linear *l)
{
    int conv1d;

    if (l->layout != PLAN_LINEAR && l->layout != PLAN_CONV1D)
        abort();
    if (l->split != PLAN_SPLIT_OUT && l->split != PLAN_SPLIT_IN)
        abort();
    if (l->in < 1 || l->out < 1 || l->in > UINT32_MAX || l->out > UINT32_MAX)
        abort();
    check_tensor(&l->w, 2);
    conv1d = l->layout == PLAN_CONV1D;
    if (l->w.shape[conv1d ? 1 : 0] != l->out || l->w.shape[conv1d ? 0 : 1] != l->in)
        abort();
    if (l->has_bias > 1)
        abort();
    if (l->has_bias) {
        check_tensor(&l->b, 1);
        if (l->b.shape[0] != l->out)
            abort();
    }
}

static void check(const struct plan *p)
{
    struct tp_err err = {0};
    const char *what;
    int64_t n_split;

    if (plan_validate(p, &err) < 0) {
        if (!memchr(err.msg, '\0', sizeof(err.msg)))
            abort();
        return;
    }
    if (p->nlin < 1 || p->nlin > PLAN_MAX_LINEAR)
        abort();
    for (uint32_t j = 0; j < p->nlin; j++)
        check_linear(&p->lin[j]);
    /* the layers chain: what the worker's GEMMs and the arena's blocks are sized by */
    if (p->in != p->lin[0].in || p->out != p->lin[p->nlin - 1].out)
        abort();
    for (uint32_t j = 0; j + 1 < p->nlin; j++)
        if (p->lin[j].out != p->inter || p->lin[j + 1].in != (j + 2 < p->nlin ? p->in : p->inter))
            abort();
    if ((p->kind == PLAN_GATED) != (p->nlin == 3) || (p->nlin > 1) != (p->act != PLAN_ACT_AUTO))
        abort();
    n_split = plan_split_size(p, &what);
    for (int n = 1; n <= 5; n++) {
        int64_t next = 0;

        for (int r = 0; r < n && n_split >= n; r++) {
            int64_t first, count;

            if (plan_split(n_split, n, r, &first, &count, &err) < 0 || first != next || count < 1)
                abort();
            next = first + count;
        }
        if (n_split >= n && next != n_split)
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
