/* nccl.c -- the emulated devices' NCCL (libnccl.so.MAJOR of the emulator's folder): unique ids,
 * non-blocking communicators, in-place or out-of-place all-gather and sum all-reduce of float32,
 * asynchronous errors and abort, between the worker processes of one group, through a POSIX
 * shared-memory object named by the unique id.
 *
 * A collective runs on its stream's thread: every rank first publishes what it calls (the
 * communicator's sequence number, the collective, the count), and collectives that differ
 * between ranks are fatal, since NCCL would hang or mix data. The data then moves in chunks
 * through one slot per rank, between barriers. A barrier waits for ever, as NCCL does, except
 * that it fails with ncclRemoteError when a peer aborted or its process is gone (NCCL's socket
 * transport sees a peer's connection close), and ends when the communicator is aborted. */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <nccl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "cudaemu.h"

#define MAGIC "tpd-cudaemu-nccl-"
#define MAX_RANKS 64
#define CHUNK (1u << 20) /* bytes of one rank's slot */
#define WAIT_NS 10000000 /* one futex wait, between looks at the peers */

enum { COLL_GATHER = 1, COLL_REDUCE = 2 };

struct sig {
    uint64_t seq; /* the communicator's collectives so far */
    int kind;     /* COLL_* */
    uint64_t count;
};

/* The shared object: this header, then nranks slots of CHUNK bytes. */
struct group {
    _Atomic uint32_t nranks; /* set by the first rank to join */
    _Atomic uint32_t joined;
    _Atomic uint32_t arrived; /* at the current barrier */
    _Atomic uint32_t gen;     /* barriers passed: the futex word */
    _Atomic uint32_t aborted; /* 1 + the rank that aborted, or 0 */
    pid_t pid[MAX_RANKS];
    struct sig sig[MAX_RANKS];
};

struct ncclComm {
    int rank, nranks;
    char name[NCCL_UNIQUE_ID_BYTES + 2]; /* of the shared object */
    struct group *g;
    size_t map_bytes;
    _Atomic int async;   /* ncclResult_t: the asynchronous state */
    _Atomic int aborted; /* ncclCommAbort was called */
    int init_thread;     /* the non-blocking init runs on thread */
    pthread_t thread;
    uint64_t seq; /* collectives enqueued */
    char msg[200];
    struct ncclComm *next_all;
};

static struct {
    pthread_mutex_t mu;
    struct ncclComm *all; /* every communicator (they stay: streams may still name them) */
} comms = {.mu = PTHREAD_MUTEX_INITIALIZER};

static long futex(_Atomic uint32_t *word, int op, uint32_t val, const struct timespec *t)
{
    return syscall(SYS_futex, (uint32_t *)word, op, val, t, NULL, 0);
}

ncclResult_t ncclGetVersion(int *version)
{
    *version = NCCL_VERSION_CODE;
    return ncclSuccess;
}

const char *ncclGetErrorString(ncclResult_t r)
{
    switch (r) {
    case ncclSuccess: return "no error";
    case ncclUnhandledCudaError: return "unhandled cuda error";
    case ncclSystemError: return "unhandled system error";
    case ncclInternalError: return "internal error";
    case ncclInvalidArgument: return "invalid argument";
    case ncclInvalidUsage: return "invalid usage";
    case ncclRemoteError: return "remote process exited or there was a network error";
    case ncclInProgress: return "NCCL operation in progress";
    default: return "unknown result code";
    }
}

const char *ncclGetLastError(ncclComm_t c)
{
    return c ? c->msg : "";
}

ncclResult_t ncclGetUniqueId(ncclUniqueId *id)
{
    unsigned char r[12];

    if (getrandom(r, sizeof(r), 0) != (ssize_t)sizeof(r))
        return ncclSystemError;
    memset(id, 0, sizeof(*id));
    snprintf(id->internal, sizeof(id->internal),
             MAGIC "%02x%02x%02x%02x%02x%02x%02x%02x%02x%02x"
                   "%02x%02x",
             r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10], r[11]);
    return ncclSuccess;
}

static ncclResult_t failed(struct ncclComm *c, ncclResult_t r, const char *msg)
{
    snprintf(c->msg, sizeof(c->msg), "%s", msg);
    c->async = r;
    return r;
}

static int peer_gone(struct ncclComm *c, int *who)
{
    for (int q = 0; q < c->nranks; q++) {
        pid_t p = c->g->pid[q];

        if (q != c->rank && p > 0 && kill(p, 0) < 0 && errno == ESRCH) {
            *who = q;
            return 1;
        }
    }
    return 0;
}

/* Waits until word differs from val, with the communicator's failure conditions: 0, or the
 * failure (also set as the asynchronous error). peers: whether the peers are known yet. */
static ncclResult_t wait_word(struct ncclComm *c, _Atomic uint32_t *word, uint32_t val, int peers)
{
    char msg[120];
    int who;

    while (atomic_load(word) == val) {
        uint32_t a = atomic_load(&c->g->aborted);

        if (c->aborted)
            return failed(c, ncclInvalidUsage, "the communicator was aborted");
        if (a) {
            snprintf(msg, sizeof(msg), "rank %u aborted the communicator", a - 1);
            return failed(c, ncclRemoteError, msg);
        }
        if (peers && peer_gone(c, &who)) {
            snprintf(msg, sizeof(msg), "rank %d (pid %d) is gone", who, (int)c->g->pid[who]);
            return failed(c, ncclRemoteError, msg);
        }
        futex(word, FUTEX_WAIT, val, &(struct timespec){.tv_nsec = WAIT_NS});
    }
    return ncclSuccess;
}

static ncclResult_t barrier(struct ncclComm *c)
{
    struct group *g = c->g;
    uint32_t gen = atomic_load(&g->gen);

    if (atomic_fetch_add(&g->arrived, 1) == (uint32_t)c->nranks - 1) {
        atomic_store(&g->arrived, 0);
        atomic_fetch_add(&g->gen, 1);
        futex(&g->gen, FUTEX_WAKE, INT_MAX, NULL);
        return ncclSuccess;
    }
    return wait_word(c, &g->gen, gen, 1);
}

static ncclResult_t join(struct ncclComm *c)
{
    size_t bytes = sizeof(struct group) + (size_t)c->nranks * CHUNK;
    uint32_t zero = 0, n;
    int fd = shm_open(c->name, O_RDWR | O_CREAT, 0600);
    char msg[160];
    void *m;

    if (fd < 0 || ftruncate(fd, (off_t)bytes) < 0) {
        snprintf(msg, sizeof(msg), "shm_open %s: %s", c->name, strerror(errno));
        if (fd >= 0)
            close(fd);
        return failed(c, ncclSystemError, msg);
    }
    m = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (m == MAP_FAILED)
        return failed(c, ncclSystemError, "mmap of the group's shared memory failed");
    c->g = m;
    c->map_bytes = bytes;
    if (!atomic_compare_exchange_strong(&c->g->nranks, &zero, (uint32_t)c->nranks) &&
        zero != (uint32_t)c->nranks) {
        snprintf(msg, sizeof(msg), "rank %d says %d ranks, an earlier rank %u", c->rank, c->nranks,
                 zero);
        return failed(c, ncclInvalidArgument, msg);
    }
    if (c->g->pid[c->rank] != 0) {
        snprintf(msg, sizeof(msg), "rank %d joined twice (pids %d and %d)", c->rank,
                 (int)c->g->pid[c->rank], (int)getpid());
        return failed(c, ncclInvalidArgument, msg);
    }
    c->g->pid[c->rank] = getpid();
    n = atomic_fetch_add(&c->g->joined, 1) + 1;
    if (n == (uint32_t)c->nranks) {
        shm_unlink(c->name); /* every rank has it mapped */
        futex(&c->g->joined, FUTEX_WAKE, INT_MAX, NULL);
    }
    while ((n = atomic_load(&c->g->joined)) < (uint32_t)c->nranks) {
        ncclResult_t r = wait_word(c, &c->g->joined, n, 0);

        if (r != ncclSuccess)
            return r;
    }
    c->async = ncclSuccess;
    return ncclSuccess;
}

static void *init_main(void *arg)
{
    join(arg);
    return NULL;
}

ncclResult_t ncclCommInitRankConfig(ncclComm_t *out, int nranks, ncclUniqueId id, int rank,
                                    ncclConfig_t *config)
{
    struct ncclComm *c;
    int blocking = !config || config->blocking == NCCL_CONFIG_UNDEF_INT || config->blocking;

    *out = NULL;
    if (nranks < 1 || nranks > MAX_RANKS || rank < 0 || rank >= nranks ||
        strncmp(id.internal, MAGIC, strlen(MAGIC)) != 0 ||
        !memchr(id.internal, 0, sizeof(id.internal)))
        return ncclInvalidArgument;
    c = calloc(1, sizeof(*c));
    if (!c)
        return ncclSystemError;
    c->rank = rank;
    c->nranks = nranks;
    snprintf(c->name, sizeof(c->name), "/%s", id.internal);
    c->async = ncclInProgress;
    pthread_mutex_lock(&comms.mu);
    c->next_all = comms.all;
    comms.all = c;
    pthread_mutex_unlock(&comms.mu);
    *out = c;
    if (blocking)
        return join(c);
    if (pthread_create(&c->thread, NULL, init_main, c) != 0)
        return failed(c, ncclSystemError, "cannot start the init thread");
    c->init_thread = 1;
    return ncclInProgress;
}

ncclResult_t ncclCommGetAsyncError(ncclComm_t c, ncclResult_t *state)
{
    if (!c)
        return ncclInvalidArgument;
    *state = (ncclResult_t)c->async;
    return ncclSuccess;
}

ncclResult_t ncclCommAbort(ncclComm_t c)
{
    if (!c)
        return ncclSuccess;
    if (c->aborted)
        cudaemu_fatal("ncclCommAbort: the communicator of rank %d was aborted already", c->rank);
    c->aborted = 1;
    if (c->g) {
        uint32_t zero = 0;

        atomic_compare_exchange_strong(&c->g->aborted, &zero, (uint32_t)c->rank + 1);
        futex(&c->g->gen, FUTEX_WAKE, INT_MAX, NULL);
        futex(&c->g->joined, FUTEX_WAKE, INT_MAX, NULL);
    }
    if (c->init_thread) {
        pthread_join(c->thread, NULL);
        c->init_thread = 0;
    }
    return ncclSuccess;
}

struct coll {
    struct ncclComm *c;
    struct sig sig;
    const char *send; /* the emulator's addresses */
    char *recv;
    size_t bytes; /* per rank: what it sends (all-gather) or the whole vector (all-reduce) */
};

static char *slot(struct ncclComm *c, int q)
{
    return (char *)(c->g + 1) + (size_t)q * CHUNK;
}

static const char *coll_name(int kind)
{
    return kind == COLL_GATHER ? "ncclAllGather" : "ncclAllReduce";
}

/* Publishes this rank's call and checks that every rank makes the same one. */
static ncclResult_t agree(struct ncclComm *c, const struct sig *s)
{
    ncclResult_t r;

    c->g->sig[c->rank] = *s;
    if ((r = barrier(c)) != ncclSuccess)
        return r;
    for (int q = 0; q < c->nranks; q++) {
        const struct sig *o = &c->g->sig[q];

        if (o->seq != s->seq || o->kind != s->kind || o->count != s->count)
            cudaemu_fatal("collective %llu of rank %d is %s of %llu elements, but rank %d's "
                          "collective %llu is %s of %llu: the ranks' collectives differ",
                          (unsigned long long)s->seq, c->rank, coll_name(s->kind),
                          (unsigned long long)s->count, q, (unsigned long long)o->seq,
                          coll_name(o->kind), (unsigned long long)o->count);
    }
    return barrier(c); /* nobody publishes the next call before all have read this one */
}

static void run_coll(void *arg)
{
    const struct coll *x = arg;
    struct ncclComm *c = x->c;

    if (c->aborted || c->async != ncclSuccess || agree(c, &x->sig) != ncclSuccess)
        return;
    for (size_t off = 0; off < x->bytes; off += CHUNK) {
        size_t n = x->bytes - off < CHUNK ? x->bytes - off : CHUNK;

        memcpy(slot(c, c->rank), x->send + off, n);
        if (barrier(c) != ncclSuccess)
            return;
        if (x->sig.kind == COLL_GATHER) {
            for (int q = 0; q < c->nranks; q++)
                memcpy(x->recv + (size_t)q * x->bytes + off, slot(c, q), n);
        } else {
            for (size_t i = 0; i < n / sizeof(float); i++) {
                float s = 0;

                for (int q = 0; q < c->nranks; q++) {
                    float v;

                    memcpy(&v, slot(c, q) + i * sizeof(float), sizeof(v));
                    s += v;
                }
                memcpy(x->recv + off + i * sizeof(float), &s, sizeof(s));
            }
        }
        if (barrier(c) != ncclSuccess)
            return;
    }
}

static ncclResult_t enqueue(struct ncclComm *c, int kind, const void *send, void *recv,
                            size_t count, ncclDataType_t type, cudaStream_t stream)
{
    const char *call = coll_name(kind);
    size_t rank_bytes = count * sizeof(float);
    size_t recv_bytes = kind == COLL_GATHER ? rank_bytes * (size_t)c->nranks : rank_bytes;
    struct coll x;

    if (!c)
        return ncclInvalidArgument;
    if (c->aborted)
        cudaemu_fatal("%s: the communicator of rank %d was aborted", call, c->rank);
    if (c->async == ncclInProgress) {
        snprintf(c->msg, sizeof(c->msg), "the communicator is still being created");
        return ncclInvalidUsage;
    }
    if (c->async != ncclSuccess)
        return (ncclResult_t)c->async;
    if (type != ncclFloat32) {
        snprintf(c->msg, sizeof(c->msg), "the emulator moves float32 only, not type %d", type);
        return ncclInvalidArgument;
    }
    x = (struct coll){.c = c,
                      .sig = {.seq = c->seq++, .kind = kind, .count = count},
                      .send = cudaemu_dev(send, rank_bytes, call, "sendbuff"),
                      .recv = cudaemu_dev(recv, recv_bytes, call, "recvbuff"),
                      .bytes = rank_bytes};
    if (kind == COLL_GATHER && x.send < x.recv + recv_bytes && x.recv < x.send + rank_bytes &&
        x.send != x.recv + (size_t)c->rank * rank_bytes)
        cudaemu_fatal("%s: sendbuff overlaps recvbuff but is not rank %d's block of it (in "
                      "place means sendbuff = recvbuff + rank * sendcount)",
                      call, c->rank);
    if (kind == COLL_REDUCE && x.send != x.recv && x.send < x.recv + recv_bytes &&
        x.recv < x.send + rank_bytes)
        cudaemu_fatal("%s: sendbuff and recvbuff overlap without being the same", call);
    if (count)
        cudaemu_enqueue_collective(stream, call, run_coll, &x, sizeof(x));
    return ncclSuccess;
}

ncclResult_t ncclAllGather(const void *send, void *recv, size_t count, ncclDataType_t type,
                           ncclComm_t c, cudaStream_t stream)
{
    return enqueue(c, COLL_GATHER, send, recv, count, type, stream);
}

ncclResult_t ncclAllReduce(const void *send, void *recv, size_t count, ncclDataType_t type,
                           ncclRedOp_t op, ncclComm_t c, cudaStream_t stream)
{
    if (c && op != ncclSum) {
        snprintf(c->msg, sizeof(c->msg), "the emulator sums only, not op %d", op);
        return ncclInvalidArgument;
    }
    return enqueue(c, COLL_REDUCE, send, recv, count, type, stream);
}
