/* test_notify.c -- daemon/notify.c against a datagram socket this test owns, as systemd would:
 * messages on a path socket and on an abstract one, nothing without NOTIFY_SOCKET, and the
 * watchdog interval from WATCHDOG_USEC and WATCHDOG_PID. Built twice: with notify.c's own sender
 * and, where the build found it, with libsystemd's sd_notify. */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include "notify.h"
#include "test.h"

/* Binds a datagram socket at name ('@' for abstract) with a receive timeout of 2 s. */
static int listen_dgram(const char *name)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    struct timeval tv = {2, 0};
    size_t n = strlen(name);
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);

    ASSERT_TRUE(fd >= 0);
    ASSERT_TRUE(n < sizeof(sa.sun_path));
    memcpy(sa.sun_path, name, n);
    if (name[0] == '@')
        sa.sun_path[0] = '\0';
    ASSERT_EQ(bind(fd, (struct sockaddr *)&sa,
                   (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n + (name[0] != '@'))),
              0);
    ASSERT_EQ(setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)), 0);
    return fd;
}

static void expect(int fd, const char *msg)
{
    char buf[512];
    ssize_t n = recv(fd, buf, sizeof(buf) - 1, 0);

    ASSERT_TRUE(n >= 0);
    buf[n] = '\0';
    ASSERT_STR_EQ(buf, msg);
}

static void test_path_and_abstract_sockets(void)
{
    char dir[] = "/tmp/test_notify.XXXXXX", path[128], abstract[64];
    int fd;

    ASSERT_TRUE(mkdtemp(dir) != NULL);
    snprintf(path, sizeof(path), "%s/notify.sock", dir);
    fd = listen_dgram(path);
    ASSERT_EQ(setenv("NOTIFY_SOCKET", path, 1), 0);
    notify_send("READY=1");
    expect(fd, "READY=1");
    notify_status("serving '%s' with %d ranks", "m", 2);
    expect(fd, "STATUS=serving 'm' with 2 ranks");
    notify_send("STOPPING=1");
    expect(fd, "STOPPING=1");
    close(fd);
    unlink(path);
    rmdir(dir);

    snprintf(abstract, sizeof(abstract), "@tpd-test-notify-%d", (int)getpid());
    fd = listen_dgram(abstract);
    ASSERT_EQ(setenv("NOTIFY_SOCKET", abstract, 1), 0);
    notify_send("WATCHDOG=1");
    expect(fd, "WATCHDOG=1");

    /* without NOTIFY_SOCKET nothing is sent (and nothing fails) */
    ASSERT_EQ(unsetenv("NOTIFY_SOCKET"), 0);
    notify_send("READY=1");
    ASSERT_EQ(setenv("NOTIFY_SOCKET", abstract, 1), 0);
    notify_send("STATUS=after");
    expect(fd, "STATUS=after");
    close(fd);
    ASSERT_EQ(unsetenv("NOTIFY_SOCKET"), 0);
}

static void test_watchdog_interval(void)
{
    char pid[32];

    ASSERT_EQ(unsetenv("WATCHDOG_USEC"), 0);
    ASSERT_EQ(unsetenv("WATCHDOG_PID"), 0);
    ASSERT_EQ(notify_watchdog_usec(), 0);
    ASSERT_EQ(setenv("WATCHDOG_USEC", "400000", 1), 0);
    ASSERT_EQ(notify_watchdog_usec(), 400000);
    snprintf(pid, sizeof(pid), "%d", (int)getpid());
    ASSERT_EQ(setenv("WATCHDOG_PID", pid, 1), 0);
    ASSERT_EQ(notify_watchdog_usec(), 400000);
    snprintf(pid, sizeof(pid), "%d", (int)getpid() + 1);
    ASSERT_EQ(setenv("WATCHDOG_PID", pid, 1), 0); /* meant for another process */
    ASSERT_EQ(notify_watchdog_usec(), 0);
    ASSERT_EQ(unsetenv("WATCHDOG_PID"), 0);
    ASSERT_EQ(setenv("WATCHDOG_USEC", "soon", 1), 0);
    ASSERT_EQ(notify_watchdog_usec(), 0);
    ASSERT_EQ(unsetenv("WATCHDOG_USEC"), 0);
}

int main(void)
{
    TEST_RUN(test_path_and_abstract_sockets);
    TEST_RUN(test_watchdog_interval);
    return 0;
}
