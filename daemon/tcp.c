/* tcp.c -- see tcp.h. */
#include "tcp.h"

#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int tcp_hex_digit(char c)
{
    return c >= '0' && c <= '9'   ? c - '0'
           : c >= 'a' && c <= 'f' ? c - 'a' + 10
           : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                  : -1;
}

int tcp_listen(const char *addr, const char *flag, const char *what, char *shown, size_t n,
               struct tp_err *err)
{
    char host[256], serv[16];
    const char *colon = strrchr(addr, ':');
    struct addrinfo hints = {.ai_flags = AI_PASSIVE | AI_NUMERICSERV, .ai_socktype = SOCK_STREAM};
    struct addrinfo *ai = NULL;
    struct sockaddr_storage sa;
    socklen_t salen = sizeof(sa);
    size_t hl;
    int fd = -1, one = 1, r;

    if (!colon || colon == addr || !colon[1] || strlen(colon + 1) >= sizeof(serv) ||
        (size_t)(colon - addr) >= sizeof(host))
        return tp_err_set(err, TP_EINVAL, "%s '%s' is not HOST:PORT (or 'off' to disable)", flag,
                          addr);
    hl = (size_t)(colon - addr);
    memcpy(host, addr, hl);
    host[hl] = '\0';
    if (host[0] == '[' && host[hl - 1] == ']') { /* [v6]:port */
        memmove(host, host + 1, hl - 2);
        host[hl - 2] = '\0';
    }
    snprintf(serv, sizeof(serv), "%s", colon + 1);
    if (strspn(serv, "0123456789") != strlen(serv) || atol(serv) > 65535)
        return tp_err_set(err, TP_EINVAL, "%s '%s': port must be 0 to 65535", flag, addr);
    r = getaddrinfo(host, serv, &hints, &ai);
    if (r != 0)
        return tp_err_set(err, TP_EINVAL, "%s '%s': %s", flag, addr, gai_strerror(r));
    fd = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0 ||
        bind(fd, ai->ai_addr, ai->ai_addrlen) < 0 || listen(fd, 64) < 0 ||
        getsockname(fd, (struct sockaddr *)&sa, &salen) < 0) {
        tp_err_sys(err, "cannot listen on %s for %s (%s)", addr, what, flag);
        if (fd >= 0)
            close(fd);
        freeaddrinfo(ai);
        return -1;
    }
    freeaddrinfo(ai);
    if (getnameinfo((struct sockaddr *)&sa, salen, host, sizeof(host), serv, sizeof(serv),
                    NI_NUMERICHOST | NI_NUMERICSERV) == 0)
        snprintf(shown, n, sa.ss_family == AF_INET6 ? "[%s]:%s" : "%s:%s", host, serv);
    else
        snprintf(shown, n, "%s", addr);
    return fd;
}
