/* test_shmreg.c -- the registry of system shared-memory regions: registering checks the object's
 * size against offset + byte_size (overflow-safe), names are unique, lookups check the range
 * inside the region at its edges and against wrap-around, the bytes read and written through a
 * region are the object's at the region's offset, a region unregistered while in use stays
 * usable until released, and an object shrunk under a held region makes reads and writes fail
 * (not SIGBUS) without growing it back. A key that cannot name an object ('..', '/', a '/' inside,
 * a directory, a FIFO, a symlink) is the client's error, INVALID_ARGUMENT naming the key; a key of
 * no object NOT_FOUND; neither is ever a system error. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../../daemon/shmreg.h"
#include "test.h"

/* keys that name no shared-memory object of the client's */
static void test_bad_keys(struct shmreg *r)
{
    static const char *const bad[] = {"..", "/..", ".", "/.", "/", "//", "//x", "/a/b", "a/",
                                      "/../x", "/dev/shm/x"};
    char dir[64], fifo[64], link[64], path[80];
    struct tp_err err = {0};

    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        err = (struct tp_err){0};
        ASSERT_EQ(shmreg_register(r, "k", bad[i], 0, 8, &err), -1);
        if (err.code != TP_EINVAL)
            TEST_FAIL_("key '%s': code %d, expected TP_EINVAL: %s", bad[i], err.code, err.msg);
        ASSERT_STR_HAS(err.msg, bad[i]);
    }
    snprintf(dir, sizeof(dir), "/test_shmreg-dir-%d", (int)getpid());
    snprintf(fifo, sizeof(fifo), "/test_shmreg-fifo-%d", (int)getpid());
    snprintf(link, sizeof(link), "/test_shmreg-link-%d", (int)getpid());
    snprintf(path, sizeof(path), "/dev/shm%s", dir);
    ASSERT_EQ(mkdir(path, 0700), 0);
    snprintf(path, sizeof(path), "/dev/shm%s", fifo);
    ASSERT_EQ(mkfifo(path, 0600), 0);
    snprintf(path, sizeof(path), "/dev/shm%s", link);
    ASSERT_EQ(symlink("/etc/hostname", path), 0);
    {
        const char *const special[] = {dir, fifo, link};

        for (int i = 0; i < 3; i++) {
            err = (struct tp_err){0};
            ASSERT_EQ(shmreg_register(r, "k", special[i], 0, 8, &err), -1);
            if (err.code != TP_EINVAL)
                TEST_FAIL_("key '%s': code %d, expected TP_EINVAL: %s", special[i], err.code,
                           err.msg);
            ASSERT_STR_HAS(err.msg, special[i]);
        }
    }
    snprintf(path, sizeof(path), "/dev/shm%s", dir);
    ASSERT_EQ(rmdir(path), 0);
    snprintf(path, sizeof(path), "/dev/shm%s", fifo);
    ASSERT_EQ(unlink(path), 0);
    snprintf(path, sizeof(path), "/dev/shm%s", link);
    ASSERT_EQ(unlink(path), 0);
    ASSERT_EQ(shmreg_register(r, "k", "no-such-object-for-tpd", 0, 8, &err), -1);
    ASSERT_EQ(err.code, TP_ENOTFOUND);
    ASSERT_STR_HAS(err.msg, "'no-such-object-for-tpd'");
}

int main(void)
{
    char key[64];
    struct shmreg *r;
    struct shmreg_region *g, *g2;
    struct shmreg_info info[4];
    struct tp_err err = {0};
    int fd;
    unsigned char pattern[10000], buf[10000];
    struct stat st;

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
    test_bad_keys(r);
    ASSERT_EQ(shmreg_status(r, "", info, 4), 0);
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
    ASSERT_EQ(shmreg_acquire(r, "a", 0, 5001, &g, &err), 0);
    ASSERT_EQ(shmreg_read(g, 0, buf, 5001, &err), 0);
    ASSERT_EQ(memcmp(buf, pattern + 4999, 5001), 0);
    ASSERT_EQ(shmreg_read(g, 5000, buf, 1, &err), 0);
    ASSERT_EQ(buf[0], pattern[9999]);
    ASSERT_EQ(shmreg_read(g, 5000, buf, 2, &err), -1); /* past the region: refused */
    shmreg_release(g);
    ASSERT_EQ(shmreg_acquire(r, "a", 5000, 2, &g, &err), -1);
    ASSERT_EQ(err.code, TP_EINVAL);
    ASSERT_EQ(shmreg_acquire(r, "a", 5002, 0, &g, &err), -1);
    ASSERT_EQ(shmreg_acquire(r, "a", UINT64_MAX, 2, &g, &err), -1);
    ASSERT_EQ(shmreg_acquire(r, "a", 2, UINT64_MAX - 1, &g, &err), -1);
    ASSERT_EQ(shmreg_acquire(r, "c", 0, 1, &g, &err), -1);
    ASSERT_EQ(err.code, TP_ENOTFOUND);

    /* writes land at the region's offset in the object */
    ASSERT_EQ(shmreg_acquire(r, "b", 0, 100, &g, &err), 0);
    memset(buf, 0xab, 4);
    ASSERT_EQ(shmreg_write(g, 20, buf, 4, &err), 0);
    pattern[20] = pattern[21] = pattern[22] = pattern[23] = 0xab;
    ASSERT_EQ(shmreg_read(g, 0, buf, 100, &err), 0);
    ASSERT_EQ(memcmp(buf, pattern, 100), 0);
    shmreg_release(g);

    /* unregistered while in use: gone by name, still readable for the holder */
    ASSERT_EQ(shmreg_acquire(r, "b", 10, 90, &g, &err), 0);
    ASSERT_EQ(shmreg_unregister(r, "b", &err), 0);
    ASSERT_EQ(shmreg_acquire(r, "b", 0, 1, &g2, &err), -1);
    ASSERT_EQ(err.code, TP_ENOTFOUND);
    ASSERT_EQ(shmreg_read(g, 10, buf, 90, &err), 0);
    ASSERT_EQ(memcmp(buf, pattern + 10, 90), 0);
    shmreg_release(g);
    ASSERT_EQ(shmreg_unregister(r, "b", &err), 0); /* idempotent */

    /* the object shrinks under a held region a: reads and writes fail, tpd lives, and the
     * object is not grown back */
    ASSERT_EQ(shmreg_acquire(r, "a", 0, 5001, &g, &err), 0);
    fd = shm_open(key, O_RDWR, 0);
    ASSERT_TRUE(fd >= 0);
    ASSERT_EQ(ftruncate(fd, 6000), 0);
    err = (struct tp_err){0};
    ASSERT_EQ(shmreg_read(g, 0, buf, 5001, &err), -1);
    ASSERT_EQ(err.code, TP_EINVAL);
    ASSERT_STR_HAS(err.msg, "shrank");
    ASSERT_EQ(shmreg_read(g, 0, buf, 8, &err), 0); /* what is left is still there */
    ASSERT_EQ(memcmp(buf, pattern + 4999, 8), 0);
    ASSERT_EQ(shmreg_write(g, 4000, buf, 8, &err), -1);
    ASSERT_STR_HAS(err.msg, "shrank");
    ASSERT_EQ(fstat(fd, &st), 0);
    ASSERT_EQ(st.st_size, 6000);
    ASSERT_EQ(ftruncate(fd, 0), 0);
    ASSERT_EQ(shmreg_read(g, 0, buf, 1, &err), -1);
    close(fd);
    shmreg_release(g);
    ASSERT_EQ(shmreg_acquire(r, "a", 0, 8, &g, &err), -1);
    ASSERT_STR_HAS(err.msg, "shrank");
    ASSERT_EQ(shmreg_unregister(r, "", &err), 0);
    ASSERT_EQ(shmreg_status(r, "", info, 4), 0);
    shmreg_destroy(r);
    shm_unlink(key);
    return 0;
}
