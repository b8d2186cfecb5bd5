/* fuzz_ctl.c -- control messages as the coordinator receives them from a worker (and a worker from
 * the coordinator): the bytes go through a real SOCK_SEQPACKET socketpair as one datagram of any
 * size, ctl_recv takes it, and ctl_validate checks it. A message that passes must satisfy what
 * the supervisor then relies on: known type and status, a terminated text, slot and rows in
 * range for JOB and DONE (READY, INIT and STOP name no slot), a DONE's collectives bounded, a
 * model's id in range for LOAD, LOADED, UNLOAD and UNLOADED, and a LOAD's slots and rows. */
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "ctl.h"
#include "fuzz.h"

#define NSLOTS 4
#define MAX_BATCH 256

static void check(const struct ctl_msg *m)
{
    struct tp_err err = {0};

    if (ctl_validate(m, NSLOTS, MAX_BATCH, &err) < 0) {
        if (!memchr(err.msg, '\0', sizeof(err.msg)))
            abort();
        return;
    }
    if (m->type < CTL_READY || m->type > CTL_UNLOADED || m->type == CTL_PLAN)
        abort();
    if (m->type >= CTL_LOAD && m->id >= CTL_MAX_MODELS)
        abort();
    /* a LOAD's slots lie within the arena's numbering, and its rows within the bound */
    if (m->type == CTL_LOAD && (m->rows < 1 || m->rows > MAX_BATCH || m->bytes < 1 ||
                                m->slot >= NSLOTS || m->bytes > NSLOTS - m->slot))
        abort();
    if (m->status < 0 || m->status >= TP_ERR_COUNT || !memchr(m->text, '\0', sizeof(m->text)))
        abort();
    if ((m->type == CTL_JOB || m->type == CTL_DONE) && m->slot >= NSLOTS)
        abort();
    if (m->type == CTL_JOB && (m->rows < 1 || m->rows > MAX_BATCH))
        abort();
    if (m->type == CTL_DONE && m->bytes > CTL_MAX_COLLECTIVES) /* what a job's counts add up */
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct ctl_msg m;
    struct tp_err err = {0};
    int sv[2];

    memset(&m, 0, sizeof(m));
    memcpy(&m, data, size < sizeof(m) ? size : sizeof(m));
    check(&m);

    if (size > 4096 || socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0)
        return 0;
    if (send(sv[0], data, size, MSG_NOSIGNAL) == (ssize_t)size) {
        int got;

        memset(&m, 0xa5, sizeof(m));
        got = ctl_recv(sv[1], &m, &err);
        if (got == 1)
            check(&m);
        else if (got == -1 && size == sizeof(m))
            abort(); /* a datagram of the right size is always received */
    }
    close(sv[0]);
    close(sv[1]);
    return 0;
}
