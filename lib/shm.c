/* shm.c -- the shared-memory arena (see shm.h). One memfd, nothing in /dev/shm, so a crash leaves
 * nothing behind. Each slot is page aligned and its output block starts on a page of its own, so
 * the ranks writing a slot's output never share a page with the coordinator filling the next
 * slot's input. */
#include "shm.h"

#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define PAGE 4096u

static size_t round_up(size_t n)
{
    return (n + PAGE - 1) / PAGE * PAGE;
}

/* bytes of one slot, 0 on overflow */
static size_t slot_bytes(const struct shm_layout *l)
{
    uint64_t in = (uint64_t)l->max_batch * l->in * 4;
    uint64_t out = (uint64_t)l->max_batch * l->out * 4;

    if (in > SIZE_MAX / 8 || out > SIZE_MAX / 8 / ((uint64_t)l->partials + 2))
        return 0;
    return round_up((size_t)in) + round_up((size_t)out) * (1 + l->partials) +
           (l->partials ? PAGE : 0);
}

size_t shm_arena_bytes(const struct shm_layout *l, size_t limit)
{
    size_t s = slot_bytes(l);

    if (s == 0 || l->nslots == 0 || s > limit / l->nslots)
        return 0;
    return s * l->nslots;
}

static int map_arena(struct shm_arena *a, int fd, const struct shm_layout *l, struct tp_err *err)
{
    size_t size = shm_arena_bytes(l, SIZE_MAX);
    void *base;

    if (size == 0)
        return tp_err_set(err, TP_EINVAL,
                          "arena of %u slots of %u rows x (%u + %u) floats is too big", l->nslots,
                          l->max_batch, l->in, l->out);
    base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
    if (base == MAP_FAILED)
        return tp_err_sys(err, "mapping arena of %zu bytes", size);
    *a = (struct shm_arena){
        .fd = fd, .base = base, .size = size, .slot_size = slot_bytes(l), .layout = *l};
    return 0;
}

int shm_arena_create(struct shm_arena *a, const struct shm_layout *l, struct tp_err *err)
{
    size_t size = shm_arena_bytes(l, SIZE_MAX);
    int fd = -1;

    *a = (struct shm_arena){.fd = -1};
    if (size == 0)
        return tp_err_set(err, TP_EINVAL,
                          "arena of %u slots of %u rows x (%u + %u) floats is too big", l->nslots,
                          l->max_batch, l->in, l->out);
    fd = memfd_create("tpd-arena", MFD_CLOEXEC);
    if (fd < 0 || ftruncate(fd, (off_t)size) < 0) {
        tp_err_sys(err, "creating arena of %zu bytes", size);
        goto fail;
    }
    if (map_arena(a, fd, l, err) < 0)
        goto fail;
    return 0;
fail:
    if (fd >= 0)
        close(fd);
    *a = (struct shm_arena){.fd = -1};
    return -1;
}

int shm_arena_attach(struct shm_arena *a, int fd, const struct shm_layout *l, struct tp_err *err)
{
    struct stat st;

    *a = (struct shm_arena){.fd = -1};
    if (fstat(fd, &st) < 0) {
        tp_err_sys(err, "arena fd %d", fd);
        goto fail;
    }
    if ((uint64_t)st.st_size != shm_arena_bytes(l, SIZE_MAX)) {
        tp_err_set(err, TP_EINVAL, "arena fd %d has %lld bytes, layout needs %zu", fd,
                   (long long)st.st_size, shm_arena_bytes(l, SIZE_MAX));
        goto fail;
    }
    if (map_arena(a, fd, l, err) < 0)
        goto fail;
    return 0;
fail:
    close(fd);
    *a = (struct shm_arena){.fd = -1};
    return -1;
}

float *shm_slot_input(const struct shm_arena *a, uint32_t slot)
{
    return (float *)((char *)a->base + (size_t)slot * a->slot_size);
}

float *shm_slot_output(const struct shm_arena *a, uint32_t slot)
{
    size_t in = round_up((size_t)a->layout.max_batch * a->layout.in * 4);

    return (float *)((char *)a->base + (size_t)slot * a->slot_size + in);
}

float *shm_slot_partial(const struct shm_arena *a, uint32_t slot, uint32_t rank)
{
    size_t out = round_up((size_t)a->layout.max_batch * a->layout.out * 4);

    return (float *)((char *)shm_slot_output(a, slot) + out * (1 + (size_t)rank));
}

uint32_t *shm_slot_sync(const struct shm_arena *a, uint32_t slot)
{
    return (uint32_t *)((char *)a->base + (size_t)(slot + 1) * a->slot_size - PAGE);
}

void shm_arena_destroy(struct shm_arena *a)
{
    if (!a)
        return;
    if (a->base)
        munmap(a->base, a->size);
    if (a->fd >= 0)
        close(a->fd);
    *a = (struct shm_arena){.fd = -1};
}
