/* ctl.c -- sending and receiving control messages (see ctl.h). SOCK_SEQPACKET keeps message
 * boundaries, so a datagram of any other size than struct ctl_msg is a protocol error, not a
 * partial read to be continued. */
#include "ctl.h"

#include <errno.h>
#include <string.h>
#include <sys/socket.h>

int ctl_send(int fd, struct ctl_msg *m, struct tp_err *err)
{
    ssize_t n;

    m->magic = CTL_MAGIC;
    m->version = CTL_VERSION;
    do
        n = send(fd, m, sizeof(*m), MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    if (n == (ssize_t)sizeof(*m))
        return 0;
    if (n < 0 && (errno == EPIPE || errno == ECONNRESET))
        return tp_err_set(err, TP_EUNAVAIL, "control socket closed by peer");
    if (n < 0)
        return tp_err_sys(err, "sending control message");
    return tp_err_set(err, TP_ESYS, "short control message send: %zd of %zu bytes", n, sizeof(*m));
}

int ctl_recv(int fd, struct ctl_msg *m, struct tp_err *err)
{
    ssize_t n;

    do
        n = recv(fd, m, sizeof(*m), MSG_TRUNC);
    while (n < 0 && errno == EINTR);
    if (n == 0)
        return 0;
    if (n < 0 && errno == ECONNRESET)
        return 0;
    if (n < 0)
        return tp_err_sys(err, "receiving control message");
    if ((size_t)n != sizeof(*m))
        return tp_err_set(err, TP_EINTERNAL, "control message of %zd bytes, expected %zu", n,
                          sizeof(*m));
    return 1;
}

int ctl_validate(const struct ctl_msg *m, uint32_t nslots, uint32_t max_batch, struct tp_err *err)
{
    if (m->magic != CTL_MAGIC)
        return tp_err_set(err, TP_EINTERNAL, "control message magic 0x%08x, expected 0x%08x",
                          m->magic, CTL_MAGIC);
    if (m->version != CTL_VERSION)
        return tp_err_set(err, TP_EINTERNAL, "control message version %u, expected %u", m->version,
                          CTL_VERSION);
    if (m->type != CTL_READY && m->type != CTL_JOB && m->type != CTL_DONE && m->type != CTL_INIT &&
        m->type != CTL_STOP)
        return tp_err_set(err, TP_EINTERNAL, "control message type %u unknown", m->type);
    if (!memchr(m->text, '\0', sizeof(m->text)))
        return tp_err_set(err, TP_EINTERNAL, "control message text not terminated");
    if (m->status < 0 || m->status >= TP_ERR_COUNT)
        return tp_err_set(err, TP_EINTERNAL, "control message status %d unknown", m->status);
    if (m->type == CTL_READY || m->type == CTL_INIT || m->type == CTL_STOP)
        return 0;
    if (m->slot >= nslots)
        return tp_err_set(err, TP_EINTERNAL, "control message slot %u, arena has %u", m->slot,
                          nslots);
    if (m->type == CTL_JOB && (m->rows < 1 || m->rows > max_batch))
        return tp_err_set(err, TP_EINTERNAL, "control message rows %u, expected 1 to %u", m->rows,
                          max_batch);
    return 0;
}
