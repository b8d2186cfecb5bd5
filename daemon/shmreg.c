/* shmreg.c -- registered system shared-memory regions (see shmreg.h). One mutex over a small
 * list; the reference count of a region is changed under it too. A region is the object's
 * descriptor and a byte range: tpd copies with pread and pwrite, never through a mapping, so an
 * object that its owner shrinks costs a request an error instead of killing tpd by SIGBUS. */
#include "shmreg.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

struct shmreg_region {
    struct shmreg *owner;
    struct shmreg_info info;
    int fd;   /* the object: every copy goes through it */
    int refs; /* the registry's (while registered) + one per acquire */
    struct shmreg_region *next;
};

struct shmreg {
    pthread_mutex_t lock;
    struct shmreg_region *head;
    size_t count;
};

int shmreg_create(struct shmreg **out, struct tp_err *err)
{
    struct shmreg *r = calloc(1, sizeof(*r));

    *out = NULL;
    if (!r)
        return tp_err_set(err, TP_ENOMEM, "no memory for the shared-memory registry");
    pthread_mutex_init(&r->lock, NULL);
    *out = r;
    return 0;
}

static void close_region(struct shmreg_region *g)
{
    close(g->fd);
    free(g);
}

/* Drops one reference. Called with the lock held; returns the region to close after unlocking. */
static struct shmreg_region *unref_locked(struct shmreg_region *g)
{
    return --g->refs == 0 ? g : NULL;
}

void shmreg_destroy(struct shmreg *r)
{
    struct shmreg_region *g, *next;

    if (!r)
        return;
    for (g = r->head; g; g = next) {
        next = g->next;
        close_region(g);
    }
    pthread_mutex_destroy(&r->lock);
    free(r);
}

static struct shmreg_region *find(struct shmreg *r, const char *name)
{
    for (struct shmreg_region *g = r->head; g; g = g->next)
        if (strcmp(g->info.name, name) == 0)
            return g;
    return NULL;
}

/* Whether key can name a POSIX shared-memory object as shm_open(3) takes it: "/NAME" or "NAME",
 * NAME neither empty nor "." nor "..", without '/'. Any other key is the client's mistake, or a
 * probe of paths beside /dev/shm: refused here, by name, before shm_open sees it. */
static int key_ok(const char *key)
{
    const char *n = key[0] == '/' ? key + 1 : key;

    return n[0] && !strchr(n, '/') && strcmp(n, ".") != 0 && strcmp(n, "..") != 0;
}

int shmreg_register(struct shmreg *r, const char *name, const char *key, uint64_t offset,
                    uint64_t byte_size, struct tp_err *err)
{
    struct shmreg_region *g = NULL;
    struct stat st;
    int fd = -1;

    if (!name[0] || strlen(name) >= SHMREG_NAME_MAX)
        return tp_err_set(err, TP_EINVAL, "region name must have 1 to %d bytes, got %zu",
                          SHMREG_NAME_MAX - 1, strlen(name));
    if (!key[0] || strlen(key) >= SHMREG_NAME_MAX)
        return tp_err_set(err, TP_EINVAL, "region '%s': key must have 1 to %d bytes, got %zu", name,
                          SHMREG_NAME_MAX - 1, strlen(key));
    if (byte_size == 0)
        return tp_err_set(err, TP_EINVAL, "region '%s': byte_size is 0", name);
    if (offset > UINT64_MAX - byte_size || offset + byte_size > (uint64_t)INT64_MAX)
        return tp_err_set(err, TP_EINVAL,
                          "region '%s': offset %llu + byte_size %llu is out of range", name,
                          (unsigned long long)offset, (unsigned long long)byte_size);
    if (!key_ok(key))
        return tp_err_set(err, TP_EINVAL,
                          "region '%s': key '%.100s' cannot name a shared-memory object: "
                          "expected '/NAME', NAME without '/' and not '.' or '..'",
                          name, key);
    fd = shm_open(key, O_RDWR | O_CLOEXEC, 0);
    if (fd < 0) {
        int e = errno;

        if (e == ENOENT)
            return tp_err_set(err, TP_ENOTFOUND, "region '%s': no shared-memory object '%.100s'",
                              name, key);
        /* the client's to fix: glibc reports a directory (EISDIR) as EINVAL, and adds
         * O_NOFOLLOW, so a symlink is ELOOP */
        if (e == EINVAL || e == EISDIR)
            return tp_err_set(err, TP_EINVAL,
                              "region '%s': '%.100s' is a directory, not a shared-memory object",
                              name, key);
        if (e == ELOOP)
            return tp_err_set(err, TP_EINVAL,
                              "region '%s': '%.100s' is a symlink, which tpd does not follow", name,
                              key);
        if (e == EACCES || e == EPERM)
            return tp_err_set(err, TP_EINVAL,
                              "region '%s': tpd may not open shared-memory object '%.100s' "
                              "read-write: %s",
                              name, key, strerror(e));
        return tp_err_sys(err, "region '%s': opening shared-memory object '%.100s'", name, key);
    }
    if (fstat(fd, &st) < 0) {
        tp_err_sys(err, "region '%s': fstat of '%.100s'", name, key);
        goto fail;
    }
    if (!S_ISREG(st.st_mode)) {
        tp_err_set(err, TP_EINVAL, "region '%s': '%.100s' is %s, not a shared-memory object", name,
                   key, S_ISFIFO(st.st_mode) ? "a FIFO" : "a special file");
        goto fail;
    }
    if ((uint64_t)st.st_size < offset + byte_size) {
        tp_err_set(err, TP_EINVAL,
                   "region '%s': shared-memory object '%.100s' has %lld bytes, offset %llu + "
                   "byte_size %llu needs %llu",
                   name, key, (long long)st.st_size, (unsigned long long)offset,
                   (unsigned long long)byte_size, (unsigned long long)(offset + byte_size));
        goto fail;
    }
    g = calloc(1, sizeof(*g));
    if (!g) {
        tp_err_set(err, TP_ENOMEM, "no memory for region '%s'", name);
        goto fail;
    }
    *g = (struct shmreg_region){.owner = r, .fd = fd, .refs = 1};
    snprintf(g->info.name, sizeof(g->info.name), "%s", name);
    snprintf(g->info.key, sizeof(g->info.key), "%s", key);
    g->info.offset = offset;
    g->info.byte_size = byte_size;
    pthread_mutex_lock(&r->lock);
    if (find(r, name)) {
        pthread_mutex_unlock(&r->lock);
        tp_err_set(err, TP_EINVAL, "region '%s' is already registered", name);
        goto fail;
    }
    if (r->count >= SHMREG_MAX_REGIONS) {
        pthread_mutex_unlock(&r->lock);
        tp_err_set(err, TP_EBUSY, "too many shared-memory regions (at most %d)",
                   SHMREG_MAX_REGIONS);
        goto fail;
    }
    g->next = r->head;
    r->head = g;
    r->count++;
    pthread_mutex_unlock(&r->lock);
    return 0;
fail:
    free(g);
    if (fd >= 0)
        close(fd);
    return -1;
}

int shmreg_unregister(struct shmreg *r, const char *name, struct tp_err *err)
{
    struct shmreg_region **p, *dead = NULL, *g;

    pthread_mutex_lock(&r->lock);
    for (p = &r->head; *p;) {
        g = *p;
        if (name[0] && strcmp(g->info.name, name) != 0) {
            p = &g->next;
            continue;
        }
        *p = g->next;
        r->count--;
        if (unref_locked(g)) {
            g->next = dead;
            dead = g;
        }
        if (name[0])
            break;
    }
    pthread_mutex_unlock(&r->lock);
    (void)err; /* an unknown name is not an error: unregistering is idempotent, as upstream */
    for (; dead; dead = g) {
        g = dead->next;
        close_region(dead);
    }
    return 0;
}

size_t shmreg_status(struct shmreg *r, const char *name, struct shmreg_info *out, size_t max)
{
    size_t n = 0;

    pthread_mutex_lock(&r->lock);
    for (struct shmreg_region *g = r->head; g && n < max; g = g->next)
        if (!name[0] || strcmp(g->info.name, name) == 0)
            out[n++] = g->info;
    pthread_mutex_unlock(&r->lock);
    return n;
}

/* The region's object still covers the region. */
static int check_size(const struct shmreg_region *g, struct tp_err *err)
{
    struct stat st;

    if (fstat(g->fd, &st) < 0 || (uint64_t)st.st_size < g->info.offset + g->info.byte_size)
        return tp_err_set(err, TP_EINVAL,
                          "shared-memory region '%.100s': its object '%.100s' shrank below the "
                          "region",
                          g->info.name, g->info.key);
    return 0;
}

int shmreg_acquire(struct shmreg *r, const char *name, uint64_t offset, uint64_t size,
                   struct shmreg_region **reg, struct tp_err *err)
{
    struct shmreg_region *g;
    uint64_t have;

    *reg = NULL;
    pthread_mutex_lock(&r->lock);
    g = find(r, name);
    if (!g) {
        pthread_mutex_unlock(&r->lock);
        return tp_err_set(err, TP_ENOTFOUND, "no shared-memory region '%.100s'", name);
    }
    have = g->info.byte_size;
    if (offset > have || size > have - offset) {
        pthread_mutex_unlock(&r->lock);
        return tp_err_set(err, TP_EINVAL,
                          "shared-memory region '%.100s' has %llu bytes: offset %llu + %llu "
                          "bytes lies outside it",
                          name, (unsigned long long)have, (unsigned long long)offset,
                          (unsigned long long)size);
    }
    g->refs++;
    pthread_mutex_unlock(&r->lock);
    /* refused early if it shrank already; shmreg_read and shmreg_write notice it later too */
    if (check_size(g, err) < 0) {
        shmreg_release(g);
        return -1;
    }
    *reg = g;
    return 0;
}

/* pread (write 0) or pwrite (write 1) of n bytes at offset of the region, to the end. */
static int transfer(const struct shmreg_region *g, int write, uint64_t offset, void *buf, size_t n,
                    struct tp_err *err)
{
    uint64_t at = g->info.offset + offset;
    size_t done = 0;

    if (offset > g->info.byte_size || n > g->info.byte_size - offset)
        return tp_err_set(err, TP_EINTERNAL, "shared-memory region '%.100s': %zu bytes at %llu "
                          "lie outside it",
                          g->info.name, n, (unsigned long long)offset);
    while (done < n) {
        ssize_t k = write ? pwrite(g->fd, (const char *)buf + done, n - done, (off_t)(at + done))
                          : pread(g->fd, (char *)buf + done, n - done, (off_t)(at + done));

        if (k < 0 && errno == EINTR)
            continue;
        if (k < 0)
            return tp_err_sys(err, "shared-memory region '%.100s': %s", g->info.name,
                              write ? "writing the output" : "reading the input");
        if (k == 0) /* end of the object: it shrank since the check */
            return check_size(g, err) < 0
                       ? -1
                       : tp_err_set(err, TP_EINVAL, "shared-memory region '%.100s' ended early",
                                    g->info.name);
        done += (size_t)k;
    }
    return 0;
}

int shmreg_read(const struct shmreg_region *g, uint64_t offset, void *dst, size_t n,
                struct tp_err *err)
{
    return transfer(g, 0, offset, dst, n, err);
}

int shmreg_write(const struct shmreg_region *g, uint64_t offset, const void *src, size_t n,
                 struct tp_err *err)
{
    /* writing past the end would grow a shrunk object back: refuse instead, and look again
     * after, in case it shrank during the copy */
    if (check_size(g, err) < 0 || transfer(g, 1, offset, (void *)(uintptr_t)src, n, err) < 0)
        return -1;
    return check_size(g, err);
}

void shmreg_release(struct shmreg_region *g)
{
    struct shmreg_region *dead;

    if (!g)
        return;
    pthread_mutex_lock(&g->owner->lock);
    dead = unref_locked(g);
    pthread_mutex_unlock(&g->owner->lock);
    if (dead)
        close_region(dead);
}
