/* tcp.h -- what tpd's two HTTP servers (metrics, REST) share: the listening socket, and the
 * hex digits of a URL's percent escapes. */
#ifndef TPD_TCP_H
#define TPD_TCP_H

#include <stddef.h>

#include "err.h"

/* Binds addr ("HOST:PORT", "[V6]:PORT"; port 0 picks a free one) and listens, non-blocking and
 * close-on-exec; writes the bound address, "127.0.0.1:43210" or "[::1]:8000", into shown (n
 * bytes). Returns the socket, or -1 with err naming flag (the option that gave addr) and what
 * the socket is for. */
int tcp_listen(const char *addr, const char *flag, const char *what, char *shown, size_t n,
               struct tp_err *err);

/* The value of a hex digit, either case; -1 for any other character. */
int tcp_hex_digit(char c);

#endif
