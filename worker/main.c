/* main.c -- tpd-worker: one rank of every tensor-parallel model tpd serves (column or row
 * layers, MLP blocks). Started by tpd (fork+exec), never by hand: fd 3 is its control socket
 * (ctl.h). With --gather nccl the first message it reads is INIT, which carries the NCCL unique
 * id; once its device is checked it reports READY. Then, one message at a time, in the order the
 * coordinator sent them: a LOAD loads a model's part by its plan (shard.h), with the model's
 * shared-memory arena (shm.h) passed along, and is answered LOADED (a failure is reported there,
 * and the worker goes on with the others); an UNLOAD frees a model; a JOB is computed on its
 * model's slot. On STOP it exits in order: everything freed, so that a sanitizer build checks it
 * for leaks. A failure before READY is reported in it, and the worker exits 1. A device or
 * communicator failure during a job is reported in its DONE message, and then the worker exits
 * 1: the device state is unknown, and the supervisor rebuilds the whole group.
 *
 * EOF on the control socket without a STOP before it means that the coordinator died; the worker
 * then logs one line and leaves with _exit(1), skipping its teardown and atexit handlers. Nothing
 * is lost: the kernel frees its memory and the arena is a memfd. The hurry matters because the
 * kernel closes a dead coordinator's sockets before it sends the parent-death signal (proc.c), so
 * without it, a worker could still be in its exit path when the SIGKILL arrives. In a sanitizer
 * build that path is LeakSanitizer's check, whose tracer is a separate process sharing the
 * worker's memory (and so its command line): SIGKILL takes the worker first and the tracer a
 * moment later, a process that outlives the worker it belongs to. */
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <malloc.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "backend.h"
#include "ctl.h"
#include "log.h"
#include "proc.h"
#include "shard.h"
#include "shm.h"
#include "timing.h"

#define CTL_FD 3

struct worker_args {
    int rank, nranks, threads, device, tf32;
    enum backend_cpu_gemm cpu_gemm;
    uint32_t slots, max_batch;
    enum backend_gather gather;
    enum tp_dtype dtype;
    const char *backend;
};

static void usage(void)
{
    fprintf(
        stderr,
        "usage: tpd-worker --rank R --ranks N --slots S --max-batch B [--threads T]\n"
        "                  [--backend cpu|cuda]\n"
        "                  [--device D] [--gather host|nccl] [--dtype fp32|fp16|bf16] [--tf32]\n"
        "                  [--cpu-gemm invariant|openblas]\n"
        "                  [--log-level LEVEL]\n"
        "tpd-worker is started by tpd, with its control socket on fd 3, and reads\n"
        "the models' plans and arenas from the socket; --slots and --max-batch bound\n"
        "the slots of all models and the rows of a job. It is not meant to be run by hand.\n");
}

static int parse_int(const char *s, long lo, long hi, long *v)
{
    char *end;

    errno = 0;
    *v = strtol(s, &end, 10);
    return (errno || end == s || *end || *v < lo || *v > hi) ? -1 : 0;
}

static int parse_args(int argc, char **argv, struct worker_args *a)
{
    static const struct option opts[] = {{"rank", required_argument, NULL, 'r'},
                                         {"ranks", required_argument, NULL, 'n'},
                                         {"slots", required_argument, NULL, 's'},
                                         {"max-batch", required_argument, NULL, 'm'},
                                         {"threads", required_argument, NULL, 't'},
                                         {"backend", required_argument, NULL, 'k'},
                                         {"device", required_argument, NULL, 'd'},
                                         {"gather", required_argument, NULL, 'g'},
                                         {"dtype", required_argument, NULL, 'y'},
                                         {"tf32", no_argument, NULL, 'T'},
                                         {"cpu-gemm", required_argument, NULL, 'G'},
                                         {"log-level", required_argument, NULL, 'l'},
                                         {"help", no_argument, NULL, 'h'},
                                         {NULL, 0, NULL, 0}};
    long v;
    int c;

    *a = (struct worker_args){.rank = -1,
                              .threads = 1,
                              .device = -1,
                              .backend = "cpu",
                              .gather = BACKEND_GATHER_HOST,
                              .dtype = TP_F32};
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'r':
            if (parse_int(optarg, 0, 4095, &v))
                return -1;
            a->rank = (int)v;
            break;
        case 'n':
            if (parse_int(optarg, 1, 4096, &v))
                return -1;
            a->nranks = (int)v;
            break;
        case 's':
            if (parse_int(optarg, 1, 1 << 16, &v))
                return -1;
            a->slots = (uint32_t)v;
            break;
        case 'm':
            if (parse_int(optarg, 1, 1 << 20, &v))
                return -1;
            a->max_batch = (uint32_t)v;
            break;
        case 't':
            if (parse_int(optarg, 1, 1024, &v))
                return -1;
            a->threads = (int)v;
            break;
        case 'k': a->backend = optarg; break;
        case 'd':
            if (parse_int(optarg, 0, 1023, &v))
                return -1;
            a->device = (int)v;
            break;
        case 'g':
            if (strcmp(optarg, "nccl") == 0)
                a->gather = BACKEND_GATHER_NCCL;
            else if (strcmp(optarg, "host") == 0)
                a->gather = BACKEND_GATHER_HOST;
            else
                return -1;
            break;
        case 'y':
            a->dtype = tp_dtype_from_flag(optarg);
            if (a->dtype == TP_DTYPE_INVALID)
                return -1;
            break;
        case 'T': a->tf32 = 1; break;
        case 'G':
            if (strcmp(optarg, "invariant") == 0)
                a->cpu_gemm = BACKEND_GEMM_INVARIANT;
            else if (strcmp(optarg, "openblas") == 0)
                a->cpu_gemm = BACKEND_GEMM_OPENBLAS;
            else
                return -1;
            break;
        case 'l':
            if (tp_log_parse_level(optarg) < 0)
                return -1;
            tp_log_level = (enum tp_log_level)tp_log_parse_level(optarg);
            break;
        default: return -1;
        }
    }
    if (optind != argc || a->rank < 0 || a->nranks < 1 || a->rank >= a->nranks || !a->slots ||
        !a->max_batch)
        return -1;
    return 0;
}

static void send_ready(const struct worker_args *a, const struct tp_err *failed)
{
    struct ctl_msg m = {.type = CTL_READY, .rank = (uint32_t)a->rank};
    struct tp_err err = {0};

    if (failed) {
        m.status = failed->code ? failed->code : TP_EINTERNAL;
        snprintf(m.text, sizeof(m.text), "%s", failed->msg);
    }
    if (ctl_send(CTL_FD, &m, &err) < 0)
        tp_log(TP_LOG_ERR, "reporting readiness: %s", err.msg);
}

/* The control socket reached EOF without a STOP: the coordinator is gone (see the top of this
 * file). Logging is one write(2) to stderr, which the coordinator's death leaves open; if stderr
 * is a pipe that nobody reads any more, SIGPIPE ends the worker just as well. */
static _Noreturn void coordinator_gone(void)
{
    tp_log(TP_LOG_WARN, "control socket closed without STOP: the coordinator is gone, exiting");
    _exit(1);
}

/* Reads the INIT message that carries the NCCL unique id. */
static int recv_init(uint8_t id[CTL_NCCL_ID_BYTES], struct tp_err *err)
{
    struct ctl_msg m;
    int r = ctl_recv(CTL_FD, &m, err);

    if (r == 0)
        coordinator_gone();
    if (r < 0 || ctl_validate(&m, 1, 1, err) < 0)
        return -1;
    if (m.type != CTL_INIT)
        return tp_err_set(err, TP_EINTERNAL, "expected the INIT message, got type %u", m.type);
    memcpy(id, m.nccl_id, CTL_NCCL_ID_BYTES);
    return 0;
}

/* A model this worker serves: its part of the weights on the backend, and its arena. */
struct wmodel {
    int loaded;
    uint32_t slot0, nslots; /* its slots, in the coordinator's one numbering */
    struct backend *be;
    struct shm_arena arena;
    float **partial; /* [nranks] scratch for a reducing model's jobs */
};

/* A LOAD received and not answered yet: its message, plan and arena fd, and, once done, the
 * model and the outcome. */
struct pending_load {
    struct ctl_msg msg;
    struct plan plan;
    int arena_fd;
    struct wmodel m;
    uint64_t bytes;
    struct tp_err err;
    int rc;
};

/* The cpu backend loads on a thread of its own, so that the other models' jobs go on meanwhile:
 * loads wait in a queue (every model at most once), are done one at a time in the order they
 * came, and each is answered (LOADED) by the main thread, which installs the model, once the
 * loader's eventfd says it is done. A GPU backend loads on the main thread, between jobs: its
 * load runs collectives (the communicator's creation, the warm-up) that must come in the same
 * order on every rank as the jobs' own. */
struct loader {
    int async;
    int efd; /* eventfd: a load is done */
    pthread_t thread;
    int started, stop;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    struct pending_load *q[CTL_MAX_MODELS];
    int head, len;  /* the queue, q[head] loading (async) */
    int running;    /* the loader works on q[head] */
    int done;       /* it finished q[head] */
};

struct worker {
    const struct worker_args *a;
    const struct backend_ops *ops;
    struct backend_config bc; /* the worker's part; each load adds its model's */
    struct wmodel models[CTL_MAX_MODELS];
    struct loader ld;
};

static void unload(struct wmodel *m, const struct backend_ops *ops)
{
    if (m->be)
        ops->destroy(m->be);
    shm_arena_destroy(&m->arena);
    free(m->partial);
    *m = (struct wmodel){.arena = {.fd = -1}};
}

/* Loads pl's model into pl->m by its plan, with its arena (pl->arena_fd, taken over). Only this
 * rank's part of the weights is read (shard.h), after checking that the files are still the ones
 * the coordinator planned. -1 with err when it cannot be; the worker goes on serving the other
 * models. Touches nothing of w but its settings, so it may run on the loader's thread. */
static int load(const struct worker *w, struct pending_load *pl, struct tp_err *err)
{
    const struct worker_args *a = w->a;
    const struct ctl_msg *msg = &pl->msg;
    const struct plan *plan = &pl->plan;
    struct wmodel *m = &pl->m;
    struct shard s = {0};
    struct backend_config bc = w->bc;
    int arena_fd = pl->arena_fd;
    const char *what;
    int64_t split;
    double t0;

    pl->arena_fd = -1;
    *m = (struct wmodel){.slot0 = msg->slot, .nslots = (uint32_t)msg->bytes, .arena = {.fd = -1}};
    t0 = timing_now_s();
    /* the cpu backend's invariant GEMM takes W packed: read it so, never whole */
    if (strcmp(w->ops->name, "cpu") == 0 && a->cpu_gemm == BACKEND_GEMM_INVARIANT
            ? shard_load_packed(&s, plan, a->rank, a->nranks, a->threads, err) < 0
            : shard_load(&s, plan, a->rank, a->nranks, err) < 0) {
        close(arena_fd);
        goto fail;
    }
    split = plan_split_size(plan, &what);
    tp_log(TP_LOG_NOTICE,
           "loaded %s [%lld, %lld) of %lld from '%s' (%s)%s: read %llu bytes of weight and %llu "
           "bytes of bias in %.3f s (model %llu)",
           plan->kind == PLAN_COLUMN ? "rows" : what, (long long)s.first,
           (long long)(s.first + s.count), (long long)split, plan->lin[0].w.name,
           tp_dtype_file_name(s.dtype), plan->nlin > 1 ? " and the block's other layers" : "",
           (unsigned long long)s.w_bytes, (unsigned long long)s.b_bytes, timing_now_s() - t0,
           (unsigned long long)msg->id);
    pl->bytes = s.w_bytes + s.b_bytes;
    if (shm_arena_attach(&m->arena, arena_fd,
                         &(struct shm_layout){.nslots = m->nslots,
                                              .max_batch = msg->rows,
                                              .in = (uint32_t)s.in,
                                              .out = (uint32_t)s.out,
                                              .partials = plan_reduces(plan) ? (uint32_t)a->nranks
                                                                             : 0},
                         err) < 0)
        goto fail;
    bc.max_batch = msg->rows;
    bc.arena = m->arena.base;
    bc.arena_size = m->arena.size;
    if (w->ops->create(&m->be, &bc, &s, err) < 0) {
        m->be = NULL;
        goto fail;
    }
    m->partial = calloc((size_t)a->nranks, sizeof(*m->partial));
    if (!m->partial) {
        tp_err_set(err, TP_ENOMEM, "no memory for %d partials", a->nranks);
        goto fail;
    }
    shard_free(&s);
    /* what reading the files took from the heap goes back: a loaded model costs its shard */
    malloc_trim(0);
    return 0;
fail:
    shard_free(&s);
    unload(m, w->ops);
    malloc_trim(0);
    return -1;
}

static void *loader_main(void *arg)
{
    struct worker *w = arg;
    struct loader *ld = &w->ld;

    pthread_setname_np(pthread_self(), "tpd-loader");
    proc_thread_background("the loader thread"); /* jobs first, loads in what they leave */
    pthread_mutex_lock(&ld->lock);
    for (;;) {
        struct pending_load *pl;
        uint64_t one = 1;

        while (!ld->stop && !(ld->len && !ld->running && !ld->done))
            pthread_cond_wait(&ld->cond, &ld->lock);
        if (ld->stop)
            break;
        pl = ld->q[ld->head];
        ld->running = 1;
        pthread_mutex_unlock(&ld->lock);
        pl->err = (struct tp_err){0};
        pl->rc = load(w, pl, &pl->err);
        pthread_mutex_lock(&ld->lock);
        ld->running = 0;
        ld->done = 1;
        if (write(ld->efd, &one, sizeof(one)) < 0)
            tp_log(TP_LOG_ERR, "loader: waking the main thread: %s", strerror(errno));
    }
    pthread_mutex_unlock(&ld->lock);
    return NULL;
}

/* Answers a finished load: the model installed (or freed, with its error), LOADED sent. -1
 * when the control channel failed. Main thread. */
static int finish_load(struct worker *w, struct pending_load *pl)
{
    struct ctl_msg reply = {.type = CTL_LOADED, .id = pl->msg.id, .rank = (uint32_t)w->a->rank};
    struct tp_err err = {0};

    if (pl->rc == 0) {
        pl->m.loaded = 1;
        w->models[pl->msg.id] = pl->m;
        reply.bytes = pl->bytes;
    } else {
        reply.status = pl->err.code ? pl->err.code : TP_EINTERNAL;
        snprintf(reply.text, sizeof(reply.text), "%s", pl->err.msg);
        tp_log(TP_LOG_ERR, "model %llu: %s", (unsigned long long)pl->msg.id, pl->err.msg);
    }
    if (pl->arena_fd >= 0)
        close(pl->arena_fd);
    free(pl);
    if (ctl_send(CTL_FD, &reply, &err) < 0) {
        tp_log(TP_LOG_ERR, "control channel: %s", err.msg);
        return -1;
    }
    return 0;
}

/* A LOAD came (its plan is read here, before anything can fail, so that it never stays in the
 * socket): checked, then loaded now (a GPU backend) or queued for the loader. -1 when the
 * control channel failed. */
static int start_load(struct worker *w, const struct ctl_msg *msg, int arena_fd)
{
    struct pending_load *pl = calloc(1, sizeof(*pl));
    struct loader *ld = &w->ld;
    struct tp_err err = {0};
    int r;

    if (!pl) {
        if (arena_fd >= 0)
            close(arena_fd);
        tp_log(TP_LOG_ERR, "no memory for a load");
        return -1;
    }
    pl->msg = *msg;
    pl->arena_fd = arena_fd;
    r = ctl_recv_plan(CTL_FD, &pl->plan, &err);
    if (r == 0)
        coordinator_gone();
    if (r < 0) {
        tp_err_prefix(&err, "receiving the plan: ");
        tp_log(TP_LOG_ERR, "control channel: %s", err.msg);
        if (arena_fd >= 0)
            close(arena_fd);
        free(pl);
        return -1;
    }
    pl->rc = -1;
    if (arena_fd < 0) {
        tp_err_set(&pl->err, TP_EINTERNAL, "the LOAD of model %llu carried no arena",
                   (unsigned long long)msg->id);
        return finish_load(w, pl);
    }
    for (int i = 0; i < CTL_MAX_MODELS; i++) {
        const struct wmodel *o = &w->models[i];

        if (o->loaded && (i == (int)msg->id || (msg->slot < o->slot0 + o->nslots &&
                                                o->slot0 < msg->slot + msg->bytes))) {
            tp_err_set(&pl->err, TP_EINTERNAL, "model %llu is loaded already, or its slots "
                                               "overlap model %d's",
                       (unsigned long long)msg->id, i);
            return finish_load(w, pl);
        }
    }
    if (!ld->async) {
        pl->rc = load(w, pl, &pl->err);
        return finish_load(w, pl);
    }
    pthread_mutex_lock(&ld->lock);
    if (ld->len == CTL_MAX_MODELS) {
        pthread_mutex_unlock(&ld->lock);
        tp_err_set(&pl->err, TP_EINTERNAL, "%d loads waiting already", CTL_MAX_MODELS);
        return finish_load(w, pl);
    }
    ld->q[(ld->head + ld->len) % CTL_MAX_MODELS] = pl;
    ld->len++;
    pthread_cond_signal(&ld->cond);
    pthread_mutex_unlock(&ld->lock);
    return 0;
}

/* The loader finished its load: it is answered, and the next one starts. -1 when the control
 * channel failed. */
static int on_loaded(struct worker *w)
{
    struct loader *ld = &w->ld;
    struct pending_load *pl;
    uint64_t v;

    if (read(ld->efd, &v, sizeof(v)) < 0 && errno != EAGAIN)
        tp_log(TP_LOG_ERR, "loader: reading its eventfd: %s", strerror(errno));
    pthread_mutex_lock(&ld->lock);
    if (!ld->done) {
        pthread_mutex_unlock(&ld->lock);
        return 0;
    }
    pl = ld->q[ld->head];
    ld->head = (ld->head + 1) % CTL_MAX_MODELS;
    ld->len--;
    ld->done = 0;
    pthread_cond_signal(&ld->cond);
    pthread_mutex_unlock(&ld->lock);
    return finish_load(w, pl);
}

static int loader_start(struct worker *w, struct tp_err *err)
{
    struct loader *ld = &w->ld;
    int e;

    pthread_mutex_init(&ld->lock, NULL);
    pthread_cond_init(&ld->cond, NULL);
    ld->efd = -1;
    ld->async = strcmp(w->ops->name, "cpu") == 0;
    if (!ld->async)
        return 0;
    ld->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (ld->efd < 0)
        return tp_err_sys(err, "creating the loader's eventfd");
    e = pthread_create(&ld->thread, NULL, loader_main, w);
    if (e != 0)
        return tp_err_set(err, TP_ESYS, "cannot start the loader thread: %s", strerror(e));
    ld->started = 1;
    return 0;
}

/* Stops the loader (after the load it works on) and frees what waits. */
static void loader_stop(struct worker *w)
{
    struct loader *ld = &w->ld;

    if (ld->started) {
        pthread_mutex_lock(&ld->lock);
        ld->stop = 1;
        pthread_cond_signal(&ld->cond);
        pthread_mutex_unlock(&ld->lock);
        pthread_join(ld->thread, NULL);
    }
    for (int i = 0; i < ld->len; i++) {
        struct pending_load *pl = ld->q[(ld->head + i) % CTL_MAX_MODELS];

        if (i == 0 && ld->done && pl->rc == 0)
            unload(&pl->m, w->ops);
        if (pl->arena_fd >= 0)
            close(pl->arena_fd);
        free(pl);
    }
    ld->len = 0;
    if (ld->efd >= 0)
        close(ld->efd);
}

/* The loaded model that owns slot, or NULL. */
static struct wmodel *slot_model(struct worker *w, uint32_t slot)
{
    for (int i = 0; i < CTL_MAX_MODELS; i++) {
        struct wmodel *m = &w->models[i];

        if (m->loaded && slot >= m->slot0 && slot - m->slot0 < m->nslots)
            return m;
    }
    return NULL;
}

/* Computes one job; fatal is set when the backend cannot go on. */
static void run_job(struct worker *w, const struct ctl_msg *m, struct ctl_msg *done, int *fatal)
{
    struct wmodel *wm = slot_model(w, m->slot);
    struct backend_job job;
    struct tp_err err = {0};
    uint32_t slot;
    double t0;

    if (!wm || m->rows > wm->arena.layout.max_batch) {
        tp_err_set(&err, TP_EINTERNAL, "job %llu: slot %u with %u rows belongs to no loaded model",
                   (unsigned long long)m->id, m->slot, m->rows);
        goto failed;
    }
    slot = m->slot - wm->slot0;
    job = (struct backend_job){.x = shm_slot_input(&wm->arena, slot),
                               .rows = m->rows,
                               .y = shm_slot_output(&wm->arena, slot)};
    if (wm->arena.layout.partials) {
        for (uint32_t i = 0; i < wm->arena.layout.partials; i++)
            wm->partial[i] = shm_slot_partial(&wm->arena, slot, i);
        job.partial = wm->partial;
        job.sync = shm_slot_sync(&wm->arena, slot);
    }
    t0 = timing_now_s();
    if (w->ops->forward(wm->be, &job, &err) < 0) {
        *fatal = err.code == TP_EDEVICE || err.code == TP_EUNAVAIL;
        goto failed;
    }
    done->bytes = job.collectives;
    if (job.collectives && job.partial)
        tp_log(TP_LOG_DEBUG,
               "job %llu: %u rows in %.3f ms, of which %.3f ms waiting for the other ranks "
               "and %.3f ms reducing",
               (unsigned long long)m->id, m->rows, (timing_now_s() - t0) * 1e3, job.wait_s * 1e3,
               job.reduce_s * 1e3);
    else
        tp_log(TP_LOG_DEBUG, "job %llu: %u rows in %.3f ms", (unsigned long long)m->id, m->rows,
               (timing_now_s() - t0) * 1e3);
    return;
failed:
    done->status = err.code ? err.code : TP_EINTERNAL;
    snprintf(done->text, sizeof(done->text), "%s", err.msg);
    tp_log(TP_LOG_ERR, "job %llu: %s", (unsigned long long)m->id, err.msg);
}

/* Serves loads, unloads and jobs until the coordinator sends STOP; returns the exit status.
 * Does not return when the coordinator is gone. */
static int serve(struct worker *w)
{
    const struct worker_args *a = w->a;
    struct ctl_msg m, reply;
    struct tp_err err;
    int r, fatal = 0, fd;

    for (;;) {
        if (w->ld.async) {
            struct pollfd p[2] = {{.fd = CTL_FD, .events = POLLIN},
                                  {.fd = w->ld.efd, .events = POLLIN}};

            if (poll(p, 2, -1) < 0) {
                if (errno == EINTR)
                    continue;
                tp_log(TP_LOG_ERR, "poll: %s", strerror(errno));
                return 1;
            }
            if ((p[1].revents & POLLIN) && on_loaded(w) < 0)
                return 1;
            if (!(p[0].revents & (POLLIN | POLLHUP | POLLERR)))
                continue;
        }
        err = (struct tp_err){0};
        r = ctl_recv_fd(CTL_FD, &m, &fd, &err);
        if (r == 0)
            coordinator_gone();
        if (r == 1 && fd >= 0 && m.type != CTL_LOAD) {
            close(fd);
            tp_err_set(&err, TP_EINTERNAL, "a message of type %u carried a descriptor", m.type);
            r = -1;
        }
        if (r < 0 || ctl_validate(&m, a->slots, a->max_batch, &err) < 0) {
            if (r == 1 && fd >= 0)
                close(fd);
            tp_log(TP_LOG_ERR, "control channel: %s", err.msg);
            return 1;
        }
        if (m.type == CTL_STOP)
            return 0;
        if (m.type == CTL_LOAD) {
            if (start_load(w, &m, fd) < 0)
                return 1;
            continue;
        }
        reply = (struct ctl_msg){.id = m.id, .rank = (uint32_t)a->rank};
        switch (m.type) {
        case CTL_UNLOAD:
            reply.type = CTL_UNLOADED;
            if (w->models[m.id].loaded) {
                unload(&w->models[m.id], w->ops);
                malloc_trim(0); /* its memory goes back to the system, not to the heap */
                tp_log(TP_LOG_NOTICE, "model %llu: unloaded", (unsigned long long)m.id);
            }
            break;
        case CTL_JOB:
            reply.type = CTL_DONE;
            reply.slot = m.slot;
            reply.rows = m.rows;
            run_job(w, &m, &reply, &fatal);
            break;
        default:
            tp_log(TP_LOG_ERR, "control channel: unexpected message type %u", m.type);
            return 1;
        }
        err = (struct tp_err){0};
        if (ctl_send(CTL_FD, &reply, &err) < 0) {
            tp_log(TP_LOG_ERR, "control channel: %s", err.msg);
            return 1;
        }
        if (fatal) {
            tp_log(TP_LOG_ERR, "the backend cannot continue; exiting so that the group restarts");
            return 1;
        }
    }
}

int main(int argc, char **argv)
{
    static struct worker w; /* 64 models: kept off the stack */
    struct worker_args a;
    struct tp_err err = {0};
    char prefix[32];
    uint8_t nccl_id[CTL_NCCL_ID_BYTES];
    int status = 1;

    tp_log_init("tpd-worker", NULL);
    /* A hangup sent to tpd's whole process group (a closing terminal, systemctl kill -s HUP) is
     * tpd's to handle: it logs it and goes on serving, so its workers must not die of it. */
    signal(SIGHUP, SIG_IGN);
    if (parse_args(argc, argv, &a) < 0) {
        usage();
        return 64;
    }
    snprintf(prefix, sizeof(prefix), "rank %d", a.rank);
    tp_log_init("tpd-worker", prefix);
    for (int i = 0; i < CTL_MAX_MODELS; i++)
        w.models[i].arena.fd = -1;
    w.a = &a;
    /* Every message the coordinator sent at the start is read before anything can fail: a unix
     * socket closed with unread data resets the connection, and the coordinator's recv would
     * then report the reset instead of the READY that says why the start failed. */
    if (a.gather == BACKEND_GATHER_NCCL && recv_init(nccl_id, &err) < 0) {
        tp_err_prefix(&err, "receiving the NCCL id: ");
        goto fail;
    }
    w.ops = backend_find(a.backend);
    if (!w.ops) {
        if (strcmp(a.backend, "cuda") == 0)
            tp_err_set(&err, TP_EINVAL,
                       "this tpd-worker has no cuda backend: it was built without the CUDA "
                       "toolkit and NCCL");
        else
            tp_err_set(&err, TP_EINVAL, "backend '%s' is not built into this worker", a.backend);
        goto fail;
    }
    w.bc = (struct backend_config){.rank = a.rank,
                                   .nranks = a.nranks,
                                   .max_batch = a.max_batch,
                                   .threads = a.threads,
                                   .device = a.device,
                                   .gather = a.gather,
                                   .dtype = a.dtype,
                                   .tf32 = a.tf32,
                                   .cpu_gemm = a.cpu_gemm,
                                   .nccl_id = nccl_id,
                                   .ctl_fd = CTL_FD};
    if (w.ops->probe && w.ops->probe(&w.bc, &err) < 0)
        goto fail;
    if (loader_start(&w, &err) < 0)
        goto fail;
    send_ready(&a, NULL);
    status = serve(&w);
    goto out;
fail:
    tp_log(TP_LOG_ERR, "%s", err.msg);
    send_ready(&a, &err);
out:
    loader_stop(&w);
    for (int i = 0; i < CTL_MAX_MODELS; i++)
        if (w.models[i].loaded)
            unload(&w.models[i], w.ops);
    return status;
}
