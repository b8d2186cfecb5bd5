/* test_ctl.c -- control messages over a real SEQPACKET socketpair: round trip, EOF, STOP, a LOAD
 * that carries its arena's descriptor, and every field ctl_validate must refuse. */
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include "ctl.h"
#include "test.h"

static void test_round_trip_and_eof(void)
{
    struct ctl_msg m = {.type = CTL_JOB, .id = 42, .slot = 3, .rows = 7}, got;
    struct tp_err err = {0};
    int sv[2];

    ASSERT_EQ(socketpair(AF_UNIX, SOCK_SEQPACKET, 0, sv), 0);
    ASSERT_EQ(ctl_send(sv[0], &m, &err), 0);
    ASSERT_EQ(ctl_recv(sv[1], &got, &err), 1);
    ASSERT_EQ(got.magic, CTL_MAGIC);
    ASSERT_EQ(got.version, CTL_VERSION);
    ASSERT_EQ(got.id, 42);
    ASSERT_EQ(got.slot, 3);
    ASSERT_EQ(got.rows, 7);
    ASSERT_EQ(ctl_validate(&got, 4, 8, &err), 0);
    close(sv[0]);
    ASSERT_EQ(ctl_recv(sv[1], &got, &err), 0);
    ASSERT_EQ(ctl_send(sv[1], &m, &err), -1);
    ASSERT_EQ(err.code, TP_EUNAVAIL);
    close(sv[1]);
}

static void test_wrong_size(void)
{
    struct ctl_msg got;
    struct tp_err err = {0};
    char small[10] = {0};
    int sv[2];

    ASSERT_EQ(socketpair(AF_UNIX, SOCK_SEQPACKET, 0, sv), 0);
    ASSERT_EQ(send(sv[0], small, sizeof(small), 0), (ssize_t)sizeof(small));
    ASSERT_EQ(ctl_recv(sv[1], &got, &err), -1);
    ASSERT_STR_HAS(err.msg, "10 bytes");
    close(sv[0]);
    close(sv[1]);
}

static void test_validate_rejects(void)
{
    struct ctl_msg ok = {.magic = CTL_MAGIC,
                         .version = CTL_VERSION,
                         .type = CTL_JOB,
                         .slot = 1,
                         .rows = 4},
                   m;
    struct tp_err err = {0};

    ASSERT_EQ(ctl_validate(&ok, 4, 8, &err), 0);
    m = ok, m.magic = 1;
    ASSERT_EQ(ctl_validate(&m, 4, 8, &err), -1);
    ASSERT_STR_HAS(err.msg, "magic");
    m = ok, m.version = 9;
    ASSERT_EQ(ctl_validate(&m, 4, 8, &err), -1);
    ASSERT_STR_HAS(err.msg, "version");
    m = ok, m.type = 77;
    ASSERT_EQ(ctl_validate(&m, 4, 8, &err), -1);
    ASSERT_STR_HAS(err.msg, "type");
    m = ok, m.slot = 4;
    ASSERT_EQ(ctl_validate(&m, 4, 8, &err), -1);
    ASSERT_STR_HAS(err.msg, "slot");
    m = ok, m.rows = 0;
    ASSERT_EQ(ctl_validate(&m, 4, 8, &err), -1);
    ASSERT_STR_HAS(err.msg, "rows");
    m = ok, m.rows = 9;
    ASSERT_EQ(ctl_validate(&m, 4, 8, &err), -1);
    m = ok, m.status = -3;
    ASSERT_EQ(ctl_validate(&m, 4, 8, &err), -1);
    ASSERT_STR_HAS(err.msg, "status");
    m = ok;
    memset(m.text, 'x', sizeof(m.text));
    ASSERT_EQ(ctl_validate(&m, 4, 8, &err), -1);
    ASSERT_STR_HAS(err.msg, "text");
}

/* INIT carries the NCCL unique id: 128 opaque bytes, any value, intact; no slot is checked. */
static void test_init_carries_id(void)
{
    struct ctl_msg m = {.type = CTL_INIT, .slot = 999}, got;
    struct tp_err err = {0};
    int sv[2];

    for (int i = 0; i < CTL_NCCL_ID_BYTES; i++)
        m.nccl_id[i] = (uint8_t)(255 - i);
    ASSERT_EQ(socketpair(AF_UNIX, SOCK_SEQPACKET, 0, sv), 0);
    ASSERT_EQ(ctl_send(sv[0], &m, &err), 0);
    ASSERT_EQ(ctl_recv(sv[1], &got, &err), 1);
    ASSERT_EQ(got.type, CTL_INIT);
    ASSERT_EQ(got.version, CTL_VERSION);
    ASSERT_EQ(ctl_validate(&got, 4, 8, &err), 0);
    for (int i = 0; i < CTL_NCCL_ID_BYTES; i++)
        ASSERT_EQ(got.nccl_id[i], 255 - i);
    close(sv[0]);
    close(sv[1]);
}

/* STOP names no slot and no rows, like READY; after it, the sender's close reads as EOF. A
 * version-2 peer (whose EOF meant "stop") is refused by its version. */
static void test_stop(void)
{
    struct ctl_msg m = {.type = CTL_STOP, .slot = 999, .rows = 0}, got;
    struct tp_err err = {0};
    int sv[2];

    ASSERT_EQ(socketpair(AF_UNIX, SOCK_SEQPACKET, 0, sv), 0);
    ASSERT_EQ(ctl_send(sv[0], &m, &err), 0);
    close(sv[0]);
    ASSERT_EQ(ctl_recv(sv[1], &got, &err), 1);
    ASSERT_EQ(got.type, CTL_STOP);
    ASSERT_EQ(ctl_validate(&got, 4, 8, &err), 0);
    ASSERT_EQ(ctl_recv(sv[1], &got, &err), 0);
    close(sv[1]);
    got.version = 2;
    ASSERT_EQ(ctl_validate(&got, 4, 8, &err), -1);
    ASSERT_STR_HAS(err.msg, "version 2");
    got.version = CTL_VERSION, got.type = CTL_STOP + 1;
    ASSERT_EQ(ctl_validate(&got, 4, 8, &err), -1);
    ASSERT_STR_HAS(err.msg, "type 6 unknown");
}

/* A version-1 peer sent 296-byte messages: refused by size, never read as version 2. */
static void test_old_size_refused(void)
{
    struct ctl_msg got;
    struct tp_err err = {0};
    char old[296] = {0};
    int sv[2];

    ASSERT_EQ(socketpair(AF_UNIX, SOCK_SEQPACKET, 0, sv), 0);
    ASSERT_EQ(send(sv[0], old, sizeof(old), 0), (ssize_t)sizeof(old));
    ASSERT_EQ(ctl_recv(sv[1], &got, &err), -1);
    ASSERT_STR_HAS(err.msg, "296 bytes");
    close(sv[0]);
    close(sv[1]);
}

/* A LOAD carries its model's arena: the received descriptor is another open of the same memfd
 * (what one side writes, the other reads), close-on-exec. ctl_recv, which takes no descriptor,
 * refuses such a message and leaks nothing. */
static void test_load_passes_fd(void)
{
    struct ctl_msg m = {.type = CTL_LOAD, .id = 5, .slot = 4, .rows = 8, .bytes = 4}, got;
    struct tp_err err = {0};
    int sv[2], mfd = memfd_create("arena", MFD_CLOEXEC), passed = -1;
    char buf[6] = {0};

    ASSERT_TRUE(mfd >= 0);
    ASSERT_EQ(write(mfd, "arena", 5), 5);
    ASSERT_EQ(socketpair(AF_UNIX, SOCK_SEQPACKET, 0, sv), 0);
    ASSERT_EQ(ctl_send_fd(sv[0], &m, mfd, &err), 0);
    ASSERT_EQ(ctl_recv_fd(sv[1], &got, &passed, &err), 1);
    ASSERT_TRUE(passed >= 0 && passed != mfd);
    ASSERT_EQ(pread(passed, buf, 5, 0), 5);
    ASSERT_STR_HAS(buf, "arena");
    ASSERT_TRUE(fcntl(passed, F_GETFD) & FD_CLOEXEC);
    ASSERT_EQ(ctl_validate(&got, 8, 8, &err), 0);
    ASSERT_EQ(got.id, 5);
    close(passed);
    /* a plain message: no descriptor */
    m = (struct ctl_msg){.type = CTL_UNLOAD, .id = 5};
    ASSERT_EQ(ctl_send(sv[0], &m, &err), 0);
    ASSERT_EQ(ctl_recv_fd(sv[1], &got, &passed, &err), 1);
    ASSERT_EQ(passed, -1);
    /* a descriptor where none is taken */
    m = (struct ctl_msg){.type = CTL_JOB, .id = 1, .slot = 0, .rows = 1};
    ASSERT_EQ(ctl_send_fd(sv[0], &m, mfd, &err), 0);
    ASSERT_EQ(ctl_recv(sv[1], &got, &err), -1);
    ASSERT_STR_HAS(err.msg, "file descriptor");
    close(sv[0]);
    close(sv[1]);
    close(mfd);
}

/* The fields of the model messages that ctl_validate checks. */
static void test_validate_models(void)
{
    struct ctl_msg ok = {.magic = CTL_MAGIC,
                         .version = CTL_VERSION,
                         .type = CTL_LOAD,
                         .id = CTL_MAX_MODELS - 1,
                         .slot = 4,
                         .rows = 8,
                         .bytes = 4},
                   m;
    struct tp_err err = {0};

    ASSERT_EQ(ctl_validate(&ok, 8, 8, &err), 0);
    m = ok, m.id = CTL_MAX_MODELS;
    ASSERT_EQ(ctl_validate(&m, 8, 8, &err), -1);
    ASSERT_STR_HAS(err.msg, "model 64");
    m = ok, m.rows = 0;
    ASSERT_EQ(ctl_validate(&m, 8, 8, &err), -1);
    m = ok, m.rows = 9;
    ASSERT_EQ(ctl_validate(&m, 8, 8, &err), -1);
    m = ok, m.bytes = 0;
    ASSERT_EQ(ctl_validate(&m, 8, 8, &err), -1);
    m = ok, m.bytes = 5; /* slots 4 to 8 of 8 */
    ASSERT_EQ(ctl_validate(&m, 8, 8, &err), -1);
    m = ok, m.slot = 8, m.bytes = 1;
    ASSERT_EQ(ctl_validate(&m, 8, 8, &err), -1);
    m = ok, m.slot = 4, m.bytes = UINT64_MAX; /* no wrap */
    ASSERT_EQ(ctl_validate(&m, 8, 8, &err), -1);
    m = ok, m.type = CTL_LOADED, m.id = 200;
    ASSERT_EQ(ctl_validate(&m, 8, 8, &err), -1);
    m = ok, m.type = CTL_UNLOADED, m.slot = 999, m.rows = 0;
    ASSERT_EQ(ctl_validate(&m, 8, 8, &err), 0);
    m = ok, m.type = CTL_UNLOADED + 1;
    ASSERT_EQ(ctl_validate(&m, 8, 8, &err), -1);
}

int main(void)
{
    TEST_RUN(test_load_passes_fd);
    TEST_RUN(test_validate_models);
    TEST_RUN(test_round_trip_and_eof);
    TEST_RUN(test_wrong_size);
    TEST_RUN(test_validate_rejects);
    TEST_RUN(test_init_carries_id);
    TEST_RUN(test_stop);
    TEST_RUN(test_old_size_refused);
    return 0;
}
