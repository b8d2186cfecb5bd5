/* test_shmreg.c -- the registry of system shared-memory regions: registering checks the object's
 * size against offset + byte_size (overflow-safe), names are unique, lookups check the range
 * inside the region at its edges and against wrap-around, the bytes seen through a region are the
 * object's at the region's offset, and a region unregistered while in use stays mapped until
 * released. */
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "../../daemon/shmreg.h"
#include "test.h"

int main(void)
{
    char key[64];
    struct shmreg *r;
    struct shmreg_region *g, *g2;
    struct shmreg_info info[4];
    struct tp_err err = {0};
    void *p, *held;
    int fd;
    unsigned char pattern[10000];

    snprintf(key, sizeof(key), "/test_shmreg-%d", (int)getpid());
    fd = shm_open(key, O_CREAT | O_EXCL | O_RDWR, 0600);
    ASSERT_TRUE(fd >= 0);
    for (int i = 0; i < 10000; i++)
        pattern[i] = (unsigned char)(i * 13);
    ASSERT_EQ(write(fd, pattern, sizeof(pattern)), (long)sizeof(pattern));
    close(fd);
    ASSERT_EQ(shmreg_create(&r, &err), 0);

    /* registering */
    ASSERT_EQ(shmreg_register(r, "a", key, 5000, 5001, &err), -1);
    ASSERT_EQ(err.code, TP_EINVAL);
    ASSERT_STR_HAS(err.msg, "10000 bytes");
    ASSERT_EQ(shmreg_register(r, "a", key, UINT64_MAX - 4, 8, &err), -1);
    ASSERT_EQ(err.code, TP_EINVAL);
    ASSERT_EQ(shmreg_register(r, "a", key, 0, 0, &err), -1);
    ASSERT_EQ(shmreg_register(r, "", key, 0, 8, &err), -1);
    ASSERT_EQ(shmreg_register(r, "a", "/no-such-object-for-tpd", 0, 8, &err), -1);
    ASSERT_EQ(err.code, TP_ENOTFOUND);
    ASSERT_EQ(shmreg_register(r, "a", key, 4999, 5001, &err), 0); /* unaligned, to the end */
    ASSERT_EQ(shmreg_register(r, "a", key, 0, 8, &err), -1);
    ASSERT_STR_HAS(err.msg, "already registered");
    ASSERT_EQ(shmreg_register(r, "b", key, 0, 100, &err), 0);
    ASSERT_EQ(shmreg_status(r, "", info, 4), 2);
    ASSERT_EQ(shmreg_status(r, "a", info, 4), 1);
    ASSERT_EQ(info[0].offset, 4999);
    ASSERT_EQ(info[0].byte_size, 5001);
    ASSERT_EQ(shmreg_status(r, "zz", info, 4), 0);

    /* lookups */
    ASSERT_EQ(shmreg_acquire(r, "a", 0, 5001, &g, &p, &err), 0);
    ASSERT_EQ(memcmp(p, pattern + 4999, 5001), 0);
    shmreg_release(g);
    ASSERT_EQ(shmreg_acquire(r, "a", 5000, 1, &g, &p, &err), 0);
    ASSERT_EQ(*(unsigned char *)p, pattern[9999]);
    shmreg_release(g);
    ASSERT_EQ(shmreg_acquire(r, "a", 5000, 2, &g, &p, &err), -1);
    ASSERT_EQ(err.code, TP_EINVAL);
    ASSERT_EQ(shmreg_acquire(r, "a", 5002, 0, &g, &p, &err), -1);
    ASSERT_EQ(shmreg_acquire(r, "a", UINT64_MAX, 2, &g, &p, &err), -1);
    ASSERT_EQ(shmreg_acquire(r, "a", 2, UINT64_MAX - 1, &g, &p, &err), -1);
    ASSERT_EQ(shmreg_acquire(r, "c", 0, 1, &g, &p, &err), -1);
    ASSERT_EQ(err.code, TP_ENOTFOUND);

    /* unregistered while in use: gone by name, still mapped for the holder */
    ASSERT_EQ(shmreg_acquire(r, "b", 10, 90, &g, &held, &err), 0);
    ASSERT_EQ(shmreg_unregister(r, "b", &err), 0);
    ASSERT_EQ(shmreg_acquire(r, "b", 0, 1, &g2, &p, &err), -1);
    ASSERT_EQ(err.code, TP_ENOTFOUND);
    ASSERT_EQ(memcmp(held, pattern + 10, 90), 0);
    shmreg_release(g);
    ASSERT_EQ(shmreg_unregister(r, "b", &err), 0); /* idempotent */
    /* the object shrinks under region a: refused, not a SIGBUS */
    fd = shm_open(key, O_RDWR, 0);
    ASSERT_TRUE(fd >= 0);
    ASSERT_EQ(ftruncate(fd, 6000), 0);
    close(fd);
    ASSERT_EQ(shmreg_acquire(r, "a", 0, 8, &g, &p, &err), -1);
    ASSERT_STR_HAS(err.msg, "shrank");
    ASSERT_EQ(shmreg_unregister(r, "", &err), 0);
    ASSERT_EQ(shmreg_status(r, "", info, 4), 0);
    shmreg_destroy(r);
    shm_unlink(key);
    return 0;
}
