/* notify.h -- tpd's messages to its service manager (sd_notify(3)): READY=1 once every worker is
 * ready and gRPC is serving, STATUS= lines saying what tpd is doing, STOPPING=1 when it drains,
 * WATCHDOG=1 from the main loop. Without NOTIFY_SOCKET in the environment (not started by
 * systemd with Type=notify) every call does nothing. Built on libsystemd when it was found at
 * build time; otherwise a built-in sender of the same datagram protocol, so a build without
 * libsystemd still runs correctly under systemd. Any thread may call these functions. */
#ifndef TPD_NOTIFY_H
#define TPD_NOTIFY_H

#include <stdint.h>

/* Sends one notification ("READY=1", "STATUS=..."; several lines joined by '\n' are one
 * message). Failures are logged at debug and otherwise ignored: the service manager decides what
 * a missing READY=1 means. */
void notify_send(const char *msg);

/* notify_send("STATUS=" + printf text). */
void notify_status(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* The watchdog interval the service manager asked for (WATCHDOG_USEC, for this pid when
 * WATCHDOG_PID is set), in microseconds; 0 when there is none. tpd pings every half of it. */
uint64_t notify_watchdog_usec(void);

#endif
