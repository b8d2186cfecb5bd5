/* notify.c -- sd_notify for tpd (see notify.h). With libsystemd (TP_HAVE_LIBSYSTEMD) the
 * messages go through sd_notify() and sd_watchdog_enabled(). Without it, the protocol is small
 * enough to speak directly: one datagram on the AF_UNIX socket named by $NOTIFY_SOCKET (a path,
 * or an abstract name when it starts with '@'), and the watchdog from $WATCHDOG_USEC and
 * $WATCHDOG_PID. Nothing is cached, so the environment is the one truth, as in libsystemd. */
#include "notify.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "log.h"

#ifdef TP_HAVE_LIBSYSTEMD
#include <systemd/sd-daemon.h>

void notify_send(const char *msg)
{
    int r = sd_notify(0, msg);

    if (r < 0)
        tp_log(TP_LOG_DEBUG, "sd_notify '%s': %s", msg, strerror(-r));
}

uint64_t notify_watchdog_usec(void)
{
    uint64_t usec = 0;

    return sd_watchdog_enabled(0, &usec) > 0 ? usec : 0;
}

#else
#include <stddef.h>
#include <sys/socket.h>
#include <sys/un.h>

void notify_send(const char *msg)
{
    const char *path = getenv("NOTIFY_SOCKET");
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    socklen_t len;
    size_t n;
    int fd;

    if (!path || !path[0])
        return;
    n = strlen(path);
    if ((path[0] != '/' && path[0] != '@') || n >= sizeof(sa.sun_path)) {
        tp_log(TP_LOG_DEBUG, "NOTIFY_SOCKET '%s' is not a unix socket path", path);
        return;
    }
    memcpy(sa.sun_path, path, n);
    if (path[0] == '@')
        sa.sun_path[0] = '\0'; /* abstract namespace; the length counts the name exactly */
    len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n + (path[0] == '/'));
    fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || sendto(fd, msg, strlen(msg), MSG_NOSIGNAL, (struct sockaddr *)&sa, len) < 0)
        tp_log(TP_LOG_DEBUG, "notify '%s' on %s: %s", msg, path, strerror(errno));
    if (fd >= 0)
        close(fd);
}

uint64_t notify_watchdog_usec(void)
{
    const char *usec = getenv("WATCHDOG_USEC"), *pid = getenv("WATCHDOG_PID");
    unsigned long long v;
    char *end;

    if (!usec)
        return 0;
    if (pid && strtol(pid, NULL, 10) != (long)getpid())
        return 0;
    errno = 0;
    v = strtoull(usec, &end, 10);
    if (errno || end == usec || *end || v == 0)
        return 0;
    return (uint64_t)v;
}
#endif

void notify_status(const char *fmt, ...)
{
    char msg[256] = "STATUS=";
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(msg + 7, sizeof(msg) - 7, fmt, ap);
    va_end(ap);
    notify_send(msg);
}
