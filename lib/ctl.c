/* ctl.c -- sending and receiving control messages (see ctl.h). SOCK_SEQPACKET keeps message
 * boundaries, so a datagram of any other size than struct ctl_msg is a protocol error, not a
 * partial read to be continued. */
#include "ctl.h"

#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* One datagram of exactly len bytes. */
static int send_raw(int fd, const void *buf, size_t len, struct tp_err *err)
{
    ssize_t n;

    do
        n = send(fd, buf, len, MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    if (n == (ssize_t)len)
        return 0;
    if (n < 0 && (errno == EPIPE || errno == ECONNRESET))
        return tp_err_set(err, TP_EUNAVAIL, "control socket closed by peer");
    if (n < 0)
        return tp_err_sys(err, "sending control message");
    return tp_err_set(err, TP_ESYS, "short control message send: %zd of %zu bytes", n, len);
}

/* One datagram that must be exactly len bytes: 1, 0 on EOF, -1 on error. With passed, a file
 * descriptor that came with it is stored there (-1 for none); without, one is closed and the
 * message refused. */
static int recv_raw(int fd, void *buf, size_t len, int *passed, struct tp_err *err)
{
    union {
        struct cmsghdr h;
        char buf[CMSG_SPACE(sizeof(int))];
    } cbuf;
    struct iovec iov = {.iov_base = buf, .iov_len = len};
    struct msghdr mh = {
        .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf.buf, .msg_controllen = sizeof(cbuf)};
    struct cmsghdr *c;
    int got = -1;
    ssize_t n;

    if (passed)
        *passed = -1;
    do
        n = recvmsg(fd, &mh, MSG_TRUNC | MSG_CMSG_CLOEXEC);
    while (n < 0 && errno == EINTR);
    for (c = n >= 0 ? CMSG_FIRSTHDR(&mh) : NULL; c; c = CMSG_NXTHDR(&mh, c)) {
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS &&
            c->cmsg_len == CMSG_LEN(sizeof(int))) {
            if (got >= 0)
                close(got);
            memcpy(&got, CMSG_DATA(c), sizeof(got));
        }
    }
    if (got >= 0 && !passed) {
        close(got);
        return tp_err_set(err, TP_EINTERNAL, "control message carried a file descriptor");
    }
    if (mh.msg_flags & MSG_CTRUNC) {
        if (got >= 0)
            close(got);
        return tp_err_set(err, TP_EINTERNAL, "control message carried more than one descriptor");
    }
    if (passed)
        *passed = got;
    if (n == 0)
        return 0;
    if (n < 0 && errno == ECONNRESET)
        return 0;
    if (n < 0)
        return tp_err_sys(err, "receiving control message");
    if ((size_t)n != len) {
        if (passed && *passed >= 0) {
            close(*passed);
            *passed = -1;
        }
        return tp_err_set(err, TP_EINTERNAL, "control message of %zd bytes, expected %zu", n,
                          len);
    }
    return 1;
}

int ctl_send(int fd, struct ctl_msg *m, struct tp_err *err)
{
    m->magic = CTL_MAGIC;
    m->version = CTL_VERSION;
    return send_raw(fd, m, sizeof(*m), err);
}

int ctl_recv(int fd, struct ctl_msg *m, struct tp_err *err)
{
    return recv_raw(fd, m, sizeof(*m), NULL, err);
}

int ctl_send_fd(int fd, struct ctl_msg *m, int pass, struct tp_err *err)
{
    union {
        struct cmsghdr h;
        char buf[CMSG_SPACE(sizeof(int))];
    } cbuf;
    struct iovec iov = {.iov_base = m, .iov_len = sizeof(*m)};
    struct msghdr mh = {
        .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf.buf, .msg_controllen = sizeof(cbuf)};
    struct cmsghdr *c;
    ssize_t n;

    memset(&cbuf, 0, sizeof(cbuf));
    c = CMSG_FIRSTHDR(&mh);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &pass, sizeof(pass));
    m->magic = CTL_MAGIC;
    m->version = CTL_VERSION;
    do
        n = sendmsg(fd, &mh, MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    if (n == (ssize_t)sizeof(*m))
        return 0;
    if (n < 0 && (errno == EPIPE || errno == ECONNRESET))
        return tp_err_set(err, TP_EUNAVAIL, "control socket closed by peer");
    if (n < 0)
        return tp_err_sys(err, "sending control message");
    return tp_err_set(err, TP_ESYS, "short control message send: %zd of %zu bytes", n, sizeof(*m));
}

int ctl_recv_fd(int fd, struct ctl_msg *m, int *passed, struct tp_err *err)
{
    return recv_raw(fd, m, sizeof(*m), passed, err);
}

int ctl_send_plan(int fd, struct plan *p, struct tp_err *err)
{
    p->type = CTL_PLAN;
    return send_raw(fd, p, sizeof(*p), err);
}

int ctl_recv_plan(int fd, struct plan *p, struct tp_err *err)
{
    int r = recv_raw(fd, p, sizeof(*p), NULL, err);

    if (r != 1)
        return r;
    if (p->type != CTL_PLAN)
        return tp_err_set(err, TP_EINTERNAL, "expected the PLAN message, got type %u", p->type);
    return plan_validate(p, err) < 0 ? -1 : 1;
}

int ctl_validate(const struct ctl_msg *m, uint32_t nslots, uint32_t max_batch, struct tp_err *err)
{
    if (m->magic != CTL_MAGIC)
        return tp_err_set(err, TP_EINTERNAL, "control message magic 0x%08x, expected 0x%08x",
                          m->magic, CTL_MAGIC);
    if (m->version != CTL_VERSION)
        return tp_err_set(err, TP_EINTERNAL, "control message version %u, expected %u", m->version,
                          CTL_VERSION);
    if (m->type < CTL_READY || m->type > CTL_UNLOADED || m->type == CTL_PLAN)
        return tp_err_set(err, TP_EINTERNAL, "control message type %u unknown", m->type);
    if (!memchr(m->text, '\0', sizeof(m->text)))
        return tp_err_set(err, TP_EINTERNAL, "control message text not terminated");
    if (m->status < 0 || m->status >= TP_ERR_COUNT)
        return tp_err_set(err, TP_EINTERNAL, "control message status %d unknown", m->status);
    if (m->type == CTL_READY || m->type == CTL_INIT || m->type == CTL_STOP)
        return 0;
    if (m->type >= CTL_LOAD && m->id >= CTL_MAX_MODELS)
        return tp_err_set(err, TP_EINTERNAL, "control message model %llu, at most %d models",
                          (unsigned long long)m->id, CTL_MAX_MODELS);
    if (m->type == CTL_LOAD &&
        (m->rows < 1 || m->rows > max_batch || m->bytes < 1 || m->slot >= nslots ||
         m->bytes > nslots - m->slot))
        return tp_err_set(err, TP_EINTERNAL,
                          "control message LOAD: %u rows, slots [%u, +%llu); expected 1 to %u rows "
                          "within %u slots",
                          m->rows, m->slot, (unsigned long long)m->bytes, max_batch, nslots);
    if (m->type >= CTL_LOAD)
        return 0;
    if (m->slot >= nslots)
        return tp_err_set(err, TP_EINTERNAL, "control message slot %u, arena has %u", m->slot,
                          nslots);
    if (m->type == CTL_JOB && (m->rows < 1 || m->rows > max_batch))
        return tp_err_set(err, TP_EINTERNAL, "control message rows %u, expected 1 to %u", m->rows,
                          max_batch);
    if (m->type == CTL_DONE && m->bytes > CTL_MAX_COLLECTIVES)
        return tp_err_set(err, TP_EINTERNAL, "control message collectives %llu, at most %d",
                          (unsigned long long)m->bytes, CTL_MAX_COLLECTIVES);
    return 0;
}
