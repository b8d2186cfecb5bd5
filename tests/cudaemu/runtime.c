/* runtime.c -- libtpcudaemu's CUDA runtime: devices, device memory, pinned host memory, streams
 * and copies, the part of cuda_runtime_api.h that tpd-worker and tp_gpu_probe call (cudaemu.h
 * says why and how strict). Loaded by tpd-worker-emu, and by the fake cuBLAS and NCCL, which
 * queue their work on its streams.
 *
 * Device memory is one sparse memfd mapped twice: a view without access, whose addresses are the
 * device pointers handed out (so that a host access to one faults, as on a GPU), and a writable
 * view that the streams' threads use. Addresses are never reused, so a freed pointer stays
 * recognisable. TPD_CUDAEMU_GPUS says how many devices there are (default 2; 0: none),
 * TPD_CUDAEMU_MEMORY_MB how much memory each has (default 80 GiB),
 * TPD_CUDAEMU_DELAY_US how long each queued operation waits before it runs (default 50), so
 * that host code that reads results without waiting sees stale memory. TPD_CUDAEMU_FAULTS names a
 * file that every fatal misuse is also appended to: a worker that aborts while it stops is seen
 * by no answer, so the tests read that file. */
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "cudaemu.h"

#define DEV_SPACE (256ull << 30) /* bytes of device address space, never reused */
#define DEV_MEMORY (80ull << 30) /* what one device reports and holds, unless told */
#define ALIGN 256                /* cudaMalloc's alignment */

void cudaemu_fatal(const char *fmt, ...)
{
    const char *path = getenv("TPD_CUDAEMU_FAULTS");
    char msg[1024];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    fprintf(stderr, "cudaemu: %s\n", msg);
    if (path && *path) {
        /* one write, so that processes failing at once do not mix their lines */
        int fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
        char line[1100];
        int n = snprintf(line, sizeof(line), "cudaemu: pid %d: %s\n", (int)getpid(), msg);

        if (fd >= 0) {
            if (write(fd, line, (size_t)n) < 0)
                fprintf(stderr, "cudaemu: writing %s: %s\n", path, strerror(errno));
            close(fd);
        }
    }
    abort();
}

/* ---- device memory ---- */

struct alloc {
    uintptr_t start; /* device address */
    size_t size;     /* bytes */
    int live;        /* not freed */
    int workspace;   /* bound to a live cuBLAS handle */
    void *caller;    /* the return address of its cudaMalloc, for the leak report */
};

static struct {
    pthread_mutex_t mu;
    int fd;
    char *dev, *shadow; /* the views: no access, and read-write */
    size_t top;         /* bytes handed out (the next allocation's offset) */
    struct alloc *a;    /* by address (they are handed out in order) */
    size_t n, cap;
    size_t used; /* live bytes */
} mem = {.mu = PTHREAD_MUTEX_INITIALIZER, .fd = -1};

static void mem_init_locked(void)
{
    if (mem.dev)
        return;
    mem.fd = memfd_create("tpd-cudaemu-device", MFD_CLOEXEC);
    if (mem.fd < 0 || ftruncate(mem.fd, (off_t)DEV_SPACE) < 0)
        cudaemu_fatal("device memory: %s", strerror(errno));
    mem.dev = mmap(NULL, DEV_SPACE, PROT_NONE, MAP_SHARED | MAP_NORESERVE, mem.fd, 0);
    mem.shadow =
        mmap(NULL, DEV_SPACE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, mem.fd, 0);
    if (mem.dev == MAP_FAILED || mem.shadow == MAP_FAILED)
        cudaemu_fatal("mapping device memory: %s", strerror(errno));
}

int cudaemu_is_dev(const void *p)
{
    uintptr_t a = (uintptr_t)p;

    return mem.dev && a >= (uintptr_t)mem.dev && a < (uintptr_t)mem.dev + DEV_SPACE;
}

/* The allocation holding address a, or NULL; mem.mu held. */
static struct alloc *find_locked(uintptr_t a)
{
    size_t lo = 0, hi = mem.n;

    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;

        if (mem.a[mid].start + mem.a[mid].size <= a)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < mem.n && mem.a[lo].start <= a && a < mem.a[lo].start + mem.a[lo].size ? &mem.a[lo]
                                                                                      : NULL;
}

void *cudaemu_dev(const void *p, size_t n, const char *call, const char *what)
{
    uintptr_t a = (uintptr_t)p;
    struct alloc *al;

    if (!cudaemu_is_dev(p))
        cudaemu_fatal("%s: %s %p is not device memory", call, what, p);
    pthread_mutex_lock(&mem.mu);
    al = find_locked(a);
    if (!al)
        cudaemu_fatal("%s: %s %p lies in no allocation", call, what, p);
    if (!al->live)
        cudaemu_fatal("%s: %s %p lies in an allocation of %zu bytes that was freed", call, what, p,
                      al->size);
    if (n > al->start + al->size - a)
        cudaemu_fatal("%s: %s [%p, +%zu) overruns its allocation of %zu bytes at offset %zu by "
                      "%zu bytes",
                      call, what, p, n, al->size, (size_t)(a - al->start),
                      n - (size_t)(al->start + al->size - a));
    pthread_mutex_unlock(&mem.mu);
    return mem.shadow + (a - (uintptr_t)mem.dev);
}

void cudaemu_bind_workspace(const void *p, int bind)
{
    struct alloc *al;

    if (!p)
        return;
    pthread_mutex_lock(&mem.mu);
    al = find_locked((uintptr_t)p);
    if (al)
        al->workspace += bind ? 1 : -1;
    pthread_mutex_unlock(&mem.mu);
}

/* ---- errors and devices ---- */

static __thread cudaError_t last_error = cudaSuccess;
static __thread int current_device = 0;

static cudaError_t fail(cudaError_t e)
{
    last_error = e;
    return e;
}

/* Bytes of memory of a device. */
static size_t device_memory(void)
{
    const char *v = getenv("TPD_CUDAEMU_MEMORY_MB");

    return v && *v ? (size_t)strtoull(v, NULL, 10) << 20 : DEV_MEMORY;
}

static int device_count(void)
{
    const char *v = getenv("TPD_CUDAEMU_GPUS");

    return v && *v ? atoi(v) : 2;
}

cudaError_t cudaGetDeviceCount(int *count)
{
    int n = device_count();

    *count = n > 0 ? n : 0;
    return n > 0 ? cudaSuccess : fail(cudaErrorNoDevice);
}

cudaError_t cudaSetDevice(int device)
{
    if (device < 0 || device >= device_count())
        return fail(cudaErrorInvalidDevice);
    current_device = device;
    return cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(struct cudaDeviceProp *prop, int device)
{
    if (device < 0 || device >= device_count())
        return fail(cudaErrorInvalidDevice);
    memset(prop, 0, sizeof(*prop));
    snprintf(prop->name, sizeof(prop->name), "cudaemu device %d (the CPU)", device);
    prop->major = 9;
    prop->minor = 0;
    prop->totalGlobalMem = device_memory();
    prop->multiProcessorCount = 1;
    prop->warpSize = 32;
    return cudaSuccess;
}

const char *cudaGetErrorString(cudaError_t e)
{
    switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorNotReady: return "device not ready";
    case cudaErrorInvalidPitchValue: return "invalid pitch argument";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorHostMemoryAlreadyRegistered:
        return "part or all of the requested memory range is already mapped";
    case cudaErrorHostMemoryNotRegistered:
        return "pointer does not correspond to a registered memory region";
    default: return "unknown error";
    }
}

cudaError_t cudaGetLastError(void)
{
    cudaError_t e = last_error;

    last_error = cudaSuccess;
    return e;
}

/* ---- streams ---- */

struct op {
    struct op *next;
    void (*fn)(void *arg);
    const char *call;
    int collective; /* a collective: it waits for the other ranks, for ever if one never comes */
    size_t bytes;
    _Alignas(16) unsigned char arg[]; /* bytes */
};

struct CUstream_st {
    pthread_mutex_t mu;
    pthread_cond_t cv; /* work queued, work done, or quit */
    struct op *head, *tail;
    int running;     /* the thread runs head (taken off the queue) */
    int collectives; /* queued or running */
    int quit;
    int destroyed;
    pthread_t thread;
    struct CUstream_st *next_all; /* every stream ever made (reachable for leak checkers) */
};

static struct {
    pthread_mutex_t mu;
    struct CUstream_st *all;
    struct CUstream_st *legacy;
    long delay_us;
} streams = {.mu = PTHREAD_MUTEX_INITIALIZER, .delay_us = -1};

static void *stream_main(void *arg)
{
    struct CUstream_st *s = arg;

    pthread_setname_np(pthread_self(), "cudaemu-stream");
    pthread_mutex_lock(&s->mu);
    for (;;) {
        struct op *o;

        while (!s->head && !s->quit)
            pthread_cond_wait(&s->cv, &s->mu);
        if (!s->head)
            break;
        o = s->head;
        s->head = o->next;
        if (!s->head)
            s->tail = NULL;
        s->running = 1;
        pthread_mutex_unlock(&s->mu);
        if (streams.delay_us > 0)
            nanosleep(&(struct timespec){.tv_nsec = streams.delay_us * 1000}, NULL);
        o->fn(o->arg);
        pthread_mutex_lock(&s->mu);
        s->collectives -= o->collective;
        free(o);
        s->running = 0;
        pthread_cond_broadcast(&s->cv);
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

static struct CUstream_st *stream_new(void)
{
    struct CUstream_st *s = calloc(1, sizeof(*s));

    if (!s)
        return NULL;
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    pthread_mutex_lock(&streams.mu);
    if (streams.delay_us < 0) { /* before the first thread reads it */
        const char *v = getenv("TPD_CUDAEMU_DELAY_US");

        streams.delay_us = v && *v ? atol(v) : 50;
        if (streams.delay_us > 999999)
            streams.delay_us = 999999;
    }
    if (pthread_create(&s->thread, NULL, stream_main, s) != 0) {
        pthread_mutex_unlock(&streams.mu);
        free(s);
        return NULL;
    }
    s->next_all = streams.all;
    streams.all = s;
    pthread_mutex_unlock(&streams.mu);
    return s;
}

/* The stream a call names: the legacy default stream for NULL. Fatal for a destroyed one. */
static struct CUstream_st *stream_of(cudaStream_t s, const char *call)
{
    if (!s) {
        pthread_mutex_lock(&streams.mu);
        if (!streams.legacy) {
            pthread_mutex_unlock(&streams.mu);
            s = stream_new();
            if (!s)
                cudaemu_fatal("%s: cannot start the default stream's thread", call);
            pthread_mutex_lock(&streams.mu);
            if (!streams.legacy)
                streams.legacy = s;
        }
        s = streams.legacy;
        pthread_mutex_unlock(&streams.mu);
    }
    if (s->destroyed)
        cudaemu_fatal("%s: the stream %p was destroyed", call, (void *)s);
    return s;
}

static void enqueue(cudaStream_t st, const char *call, void (*fn)(void *arg), const void *arg,
                    size_t bytes, int collective)
{
    struct CUstream_st *s = stream_of(st, call);
    struct op *o = malloc(sizeof(*o) + bytes);

    if (!o)
        cudaemu_fatal("%s: out of host memory", call);
    *o = (struct op){.fn = fn, .call = call, .collective = collective, .bytes = bytes};
    memcpy(o->arg, arg, bytes);
    pthread_mutex_lock(&s->mu);
    s->collectives += collective;
    if (s->tail)
        s->tail->next = o;
    else
        s->head = o;
    s->tail = o;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
}

void cudaemu_enqueue(cudaStream_t st, const char *call, void (*fn)(void *arg), const void *arg,
                     size_t bytes)
{
    enqueue(st, call, fn, arg, bytes, 0);
}

void cudaemu_enqueue_collective(cudaStream_t st, const char *call, void (*fn)(void *arg),
                                const void *arg, size_t bytes)
{
    enqueue(st, call, fn, arg, bytes, 1);
}

/* Waits for the stream's work, for call: fatal when that work holds a collective (see
 * cudaemu.h). */
static void stream_wait(struct CUstream_st *s, const char *call)
{
    pthread_mutex_lock(&s->mu);
    if (s->collectives)
        cudaemu_fatal("%s waits for a stream that holds %d collectives: a peer that never comes "
                      "would hold this thread for ever (poll cudaStreamQuery with a deadline)",
                      call, s->collectives);
    while (s->head || s->running)
        pthread_cond_wait(&s->cv, &s->mu);
    pthread_mutex_unlock(&s->mu);
}

/* Every stream idle: what cudaFree's implicit device synchronization waits for. */
static void wait_all_streams(const char *call)
{
    pthread_mutex_lock(&streams.mu);
    for (struct CUstream_st *s = streams.all; s; s = s->next_all)
        if (!s->destroyed)
            stream_wait(s, call);
    pthread_mutex_unlock(&streams.mu);
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t *ps, unsigned int flags)
{
    if (flags & ~(unsigned)cudaStreamNonBlocking)
        return fail(cudaErrorInvalidValue);
    *ps = stream_new();
    return *ps ? cudaSuccess : fail(cudaErrorMemoryAllocation);
}

cudaError_t cudaStreamQuery(cudaStream_t st)
{
    struct CUstream_st *s = stream_of(st, "cudaStreamQuery");
    int busy;

    pthread_mutex_lock(&s->mu);
    busy = s->head || s->running;
    pthread_mutex_unlock(&s->mu);
    return busy ? cudaErrorNotReady : cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t st)
{
    stream_wait(stream_of(st, "cudaStreamSynchronize"), "cudaStreamSynchronize");
    return cudaSuccess;
}

/* CUDA lets a stream be destroyed with work queued (it is released once done); the emulator
 * waits for that work here, then ends the thread. The struct stays, marked destroyed. */
cudaError_t cudaStreamDestroy(cudaStream_t st)
{
    struct CUstream_st *s = stream_of(st, "cudaStreamDestroy");

    if (s == streams.legacy)
        return fail(cudaErrorInvalidResourceHandle);
    stream_wait(s, "cudaStreamDestroy");
    pthread_mutex_lock(&s->mu);
    s->quit = 1;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    pthread_join(s->thread, NULL);
    s->destroyed = 1;
    return cudaSuccess;
}

/* ---- memory ---- */

cudaError_t cudaMalloc(void **p, size_t size)
{
    size_t rounded = (size + ALIGN - 1) / ALIGN * ALIGN;

    *p = NULL;
    if (size == 0)
        return cudaSuccess;
    pthread_mutex_lock(&mem.mu);
    mem_init_locked();
    if (size > device_memory() - mem.used || rounded > DEV_SPACE - mem.top) {
        pthread_mutex_unlock(&mem.mu);
        return fail(cudaErrorMemoryAllocation);
    }
    if (mem.n == mem.cap) {
        size_t cap = mem.cap ? 2 * mem.cap : 256;
        struct alloc *a = realloc(mem.a, cap * sizeof(*a));

        if (!a) {
            pthread_mutex_unlock(&mem.mu);
            return fail(cudaErrorMemoryAllocation);
        }
        mem.a = a;
        mem.cap = cap;
    }
    mem.a[mem.n++] = (struct alloc){.start = (uintptr_t)mem.dev + mem.top,
                                    .size = size,
                                    .live = 1,
                                    .caller = __builtin_return_address(0)};
    *p = mem.dev + mem.top;
    /* a fresh allocation holds garbage on a GPU: not zeros, so that code relying on zeros fails */
    memset(mem.shadow + mem.top, 0xa5, size);
    mem.top += rounded + ALIGN; /* a gap: the next allocation never starts where this one ends */
    mem.used += size;
    pthread_mutex_unlock(&mem.mu);
    return cudaSuccess;
}

cudaError_t cudaMemGetInfo(size_t *free_bytes, size_t *total)
{
    pthread_mutex_lock(&mem.mu);
    *total = device_memory();
    *free_bytes = *total > mem.used ? *total - mem.used : 0;
    pthread_mutex_unlock(&mem.mu);
    return cudaSuccess;
}

cudaError_t cudaFree(void *p)
{
    struct alloc *al;

    if (!p)
        return cudaSuccess;
    if (!cudaemu_is_dev(p))
        return fail(cudaErrorInvalidValue);
    wait_all_streams("cudaFree");
    pthread_mutex_lock(&mem.mu);
    al = find_locked((uintptr_t)p);
    if (!al || al->start != (uintptr_t)p || !al->live) {
        pthread_mutex_unlock(&mem.mu);
        cudaemu_fatal("cudaFree(%p): %s", p,
                      !al                         ? "not an allocation"
                      : al->start != (uintptr_t)p ? "not the start of its allocation"
                                                  : "freed already");
    }
    if (al->workspace > 0)
        cudaemu_fatal("cudaFree(%p): it is the workspace of a live cuBLAS handle", p);
    al->live = 0;
    mem.used -= al->size;
    /* give the pages back */
    fallocate(mem.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
              (off_t)(al->start - (uintptr_t)mem.dev), (off_t)al->size);
    pthread_mutex_unlock(&mem.mu);
    return cudaSuccess;
}

/* Pinned host memory: cudaMallocHost's and cudaHostRegister's ranges. */
struct pinned {
    char *p;
    size_t size;
    int registered; /* cudaHostRegister, else cudaMallocHost */
};

static struct {
    pthread_mutex_t mu;
    struct pinned *r;
    size_t n, cap;
} pins = {.mu = PTHREAD_MUTEX_INITIALIZER};

static int pin_add(void *p, size_t size, int registered)
{
    int ok = 1;

    pthread_mutex_lock(&pins.mu);
    if (pins.n == pins.cap) {
        size_t cap = pins.cap ? 2 * pins.cap : 32;
        struct pinned *r = realloc(pins.r, cap * sizeof(*r));

        if (r) {
            pins.r = r;
            pins.cap = cap;
        } else {
            ok = 0;
        }
    }
    if (ok)
        pins.r[pins.n++] = (struct pinned){.p = p, .size = size, .registered = registered};
    pthread_mutex_unlock(&pins.mu);
    return ok;
}

/* Removes the range starting at p of the kind given: 0, or -1 when there is none. */
static int pin_remove(void *p, int registered)
{
    int found = -1;

    pthread_mutex_lock(&pins.mu);
    for (size_t i = 0; i < pins.n; i++)
        if (pins.r[i].p == p && pins.r[i].registered == registered) {
            pins.r[i] = pins.r[--pins.n];
            found = 0;
            break;
        }
    pthread_mutex_unlock(&pins.mu);
    return found;
}

/* Whether host range [p, p + n) is pinned; whether it overlaps a pinned range (any). */
static int pinned(const void *p, size_t n, int any)
{
    const char *c = p;
    int yes = 0;

    pthread_mutex_lock(&pins.mu);
    for (size_t i = 0; i < pins.n && !yes; i++) {
        const char *s = pins.r[i].p, *e = s + pins.r[i].size;

        yes = any ? c < e && c + n > s : c >= s && c + n <= e;
    }
    pthread_mutex_unlock(&pins.mu);
    return yes;
}

cudaError_t cudaMallocHost(void **p, size_t size)
{
    void *m = NULL;

    *p = NULL;
    if (posix_memalign(&m, 4096, size ? size : 1) != 0)
        return fail(cudaErrorMemoryAllocation);
    if (!pin_add(m, size, 0)) {
        free(m);
        return fail(cudaErrorMemoryAllocation);
    }
    *p = m;
    return cudaSuccess;
}

cudaError_t cudaFreeHost(void *p)
{
    if (!p)
        return cudaSuccess;
    wait_all_streams("cudaFreeHost");
    if (pin_remove(p, 0) < 0)
        return fail(cudaErrorInvalidValue);
    free(p);
    return cudaSuccess;
}

cudaError_t cudaHostRegister(void *p, size_t size, unsigned int flags)
{
    (void)flags;
    if (!p || !size || cudaemu_is_dev(p))
        return fail(cudaErrorInvalidValue);
    if (pinned(p, size, 1))
        return fail(cudaErrorHostMemoryAlreadyRegistered);
    return pin_add(p, size, 1) ? cudaSuccess : fail(cudaErrorMemoryAllocation);
}

cudaError_t cudaHostUnregister(void *p)
{
    wait_all_streams("cudaHostUnregister");
    return pin_remove(p, 1) == 0 ? cudaSuccess : fail(cudaErrorHostMemoryNotRegistered);
}

/* ---- copies ---- */

struct copy {
    char *dst;
    const char *src;
    size_t dpitch, spitch, width, height;
};

static void run_copy(void *arg)
{
    const struct copy *c = arg;

    for (size_t r = 0; r < c->height; r++)
        memcpy(c->dst + r * c->dpitch, c->src + r * c->spitch, c->width);
}

/* One side of a copy, [p, extent bytes): the emulator's address of it, checked against the
 * copy's kind (dev: the kind says it is device memory); *pageable when it is host memory that is
 * not pinned. */
static char *side(const void *p, size_t extent, int dev, const char *call, const char *what,
                  int *pageable)
{
    if (dev)
        return cudaemu_dev(p, extent, call, what);
    if (cudaemu_is_dev(p))
        cudaemu_fatal("%s: %s %p is device memory, but the copy's kind says host", call, what, p);
    if (!pinned(p, extent, 0))
        *pageable = 1;
    return (char *)p;
}

static cudaError_t copy2d(void *dst, size_t dpitch, const void *src, size_t spitch, size_t width,
                          size_t height, enum cudaMemcpyKind kind, cudaStream_t st,
                          const char *call)
{
    struct copy c;
    int pageable = 0, dst_dev, src_dev;
    size_t dext, sext;

    if (width > dpitch || width > spitch)
        return fail(cudaErrorInvalidPitchValue);
    if (width == 0 || height == 0)
        return cudaSuccess;
    switch (kind) {
    case cudaMemcpyHostToDevice: dst_dev = 1, src_dev = 0; break;
    case cudaMemcpyDeviceToHost: dst_dev = 0, src_dev = 1; break;
    case cudaMemcpyDeviceToDevice: dst_dev = 1, src_dev = 1; break;
    case cudaMemcpyHostToHost: dst_dev = 0, src_dev = 0; break;
    case cudaMemcpyDefault: dst_dev = cudaemu_is_dev(dst), src_dev = cudaemu_is_dev(src); break;
    default: return fail(cudaErrorInvalidValue);
    }
    dext = (height - 1) * dpitch + width;
    sext = (height - 1) * spitch + width;
    c = (struct copy){.dst = side(dst, dext, dst_dev, call, "the destination", &pageable),
                      .src = side(src, sext, src_dev, call, "the source", &pageable),
                      .dpitch = dpitch,
                      .spitch = spitch,
                      .width = width,
                      .height = height};
    if (pageable && (dst_dev != src_dev)) {
        /* CUDA: a copy between device and pageable memory waits for the stream's earlier work
         * and returns once it is done (to pageable memory) or staged (from it) */
        struct CUstream_st *s = stream_of(st, call);

        stream_wait(s, call);
        run_copy(&c);
        return cudaSuccess;
    }
    cudaemu_enqueue(st, call, run_copy, &c, sizeof(c));
    return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t n, enum cudaMemcpyKind kind,
                            cudaStream_t st)
{
    return copy2d(dst, n, src, n, n, 1, kind, st, "cudaMemcpyAsync");
}

cudaError_t cudaMemcpy2DAsync(void *dst, size_t dpitch, const void *src, size_t spitch,
                              size_t width, size_t height, enum cudaMemcpyKind kind,
                              cudaStream_t st)
{
    return copy2d(dst, dpitch, src, spitch, width, height, kind, st, "cudaMemcpy2DAsync");
}

struct fill {
    char *dst;
    int value;
    size_t n;
};

static void run_fill(void *arg)
{
    const struct fill *f = arg;

    memset(f->dst, f->value, f->n);
}

cudaError_t cudaMemsetAsync(void *p, int value, size_t n, cudaStream_t st)
{
    struct fill f = {
        .dst = cudaemu_dev(p, n, "cudaMemsetAsync", "the destination"), .value = value, .n = n};

    if (n)
        cudaemu_enqueue(st, "cudaMemsetAsync", run_fill, &f, sizeof(f));
    return cudaSuccess;
}

/* ---- the exit ---- */

/* A process that exits in order (not by _exit or a signal) has given back everything: device
 * memory, pinned memory, streams. What is left is a leak of a resource that a GPU has far less of
 * than a host, and a model unloaded while serving would leak it for good. */
__attribute__((destructor)) static void check_released(void)
{
    size_t left = 0, first = 0, pinned_left, streams_left = 0;
    char where[300] = "";
    Dl_info info;

    pthread_mutex_lock(&mem.mu);
    for (size_t i = 0; i < mem.n; i++)
        if (mem.a[i].live && left++ == 0) {
            first = mem.a[i].size;
            if (dladdr(mem.a[i].caller, &info) && info.dli_fname)
                snprintf(where, sizeof(where), ", allocated at %s+%#lx", info.dli_fname,
                         (unsigned long)((char *)mem.a[i].caller - (char *)info.dli_fbase));
        }
    pthread_mutex_unlock(&mem.mu);
    pthread_mutex_lock(&pins.mu);
    pinned_left = pins.n;
    pthread_mutex_unlock(&pins.mu);
    pthread_mutex_lock(&streams.mu);
    for (struct CUstream_st *s = streams.all; s; s = s->next_all)
        streams_left += !s->destroyed && s != streams.legacy;
    pthread_mutex_unlock(&streams.mu);
    if (left || pinned_left || streams_left)
        cudaemu_fatal("at exit: %zu device allocations (%zu bytes; the first of %zu bytes%s), %zu "
                      "pinned host ranges and %zu streams were not released",
                      left, mem.used, first, where, pinned_left, streams_left);
}
