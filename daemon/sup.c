/* sup.c -- the worker supervisor (see sup.h). One thread polls the control sockets of all ranks
 * and an eventfd that wakes it to stop. The mutex guards the worker table and the in-flight jobs;
 * callbacks into the scheduler run without it, so that completing requests (the scheduler's
 * lock, replies to clients) never holds up sup_dispatch on the scheduler's threads. */
#include "sup.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "ctl.h"
#include "log.h"
#include "metrics.h"
#include "notify.h"
#include "ncclid.h"
#include "proc.h"

#define MAX_BACKOFF_MS 30000

enum group_state { G_STARTING, G_READY, G_DOWN, G_FAILED };

struct worker {
    pid_t pid; /* 0 when not running */
    int fd;    /* control socket, -1 when closed */
    int ready;
};

struct job {
    uint64_t id;
    int pending;       /* ranks that have not answered; 0 when the slot is idle */
    struct tp_err err; /* first failure reported by a rank */
};

struct sup {
    struct sup_config c;
    sup_done_fn done;
    sup_state_fn state_cb;
    void *ctx;
    pthread_t thread;
    int thread_started;
    int wake_fd; /* eventfd */
    pthread_mutex_t lock;
    pthread_cond_t cond; /* signalled on every change of state */
    enum group_state state;
    int first_ready; /* a group has been ready once */
    int stopping;
    struct tp_err fail; /* why the group failed before its first READY */
    int backoff_ms;
    int64_t restart_at_ms;              /* CLOCK_MONOTONIC, when state is G_DOWN */
    struct worker *w;                   /* nranks */
    struct job *jobs;                   /* slots */
    struct pollfd *pfd;                 /* wake fd + nranks control sockets, for the thread */
    uint8_t nccl_id[CTL_NCCL_ID_BYTES]; /* of the group being started, with gather_nccl */
};

static int64_t now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void describe_exit(char *buf, size_t len, int status)
{
    if (WIFSIGNALED(status))
        snprintf(buf, len, "killed by signal %d (%s)", WTERMSIG(status),
                 strsignal(WTERMSIG(status)));
    else if (WIFEXITED(status))
        snprintf(buf, len, "exited with status %d", WEXITSTATUS(status));
    else
        snprintf(buf, len, "stopped");
}

/* Starts one rank. Called with the lock held. */
static int spawn_worker(struct sup *s, int rank, struct tp_err *err)
{
    char a_rank[16], a_ranks[16], a_slots[16], a_batch[16], a_threads[16], env_threads[48];
    char a_device[16];
    char *argv[40];
    char *env[2] = {env_threads, NULL};
    int sv[2], n = 0, fds[2];
    pid_t pid;

    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0)
        return tp_err_sys(err, "creating control socket for rank %d", rank);
    snprintf(a_rank, sizeof(a_rank), "%d", rank);
    snprintf(a_ranks, sizeof(a_ranks), "%d", s->c.nranks);
    snprintf(a_slots, sizeof(a_slots), "%u", s->c.slots);
    snprintf(a_batch, sizeof(a_batch), "%u", s->c.max_batch);
    snprintf(a_threads, sizeof(a_threads), "%d", s->c.threads);
    snprintf(env_threads, sizeof(env_threads), "OPENBLAS_NUM_THREADS=%d", s->c.threads);
    argv[n++] = (char *)s->c.worker;
    argv[n++] = "--rank", argv[n++] = a_rank;
    argv[n++] = "--ranks", argv[n++] = a_ranks;
    argv[n++] = "--slots", argv[n++] = a_slots;
    argv[n++] = "--max-batch", argv[n++] = a_batch;
    argv[n++] = "--threads", argv[n++] = a_threads;
    argv[n++] = "--backend", argv[n++] = (char *)s->c.backend;
    argv[n++] = "--log-level", argv[n++] = (char *)s->c.log_level;
    if (s->c.devices) {
        snprintf(a_device, sizeof(a_device), "%d", s->c.devices[rank]);
        argv[n++] = "--device", argv[n++] = a_device;
        argv[n++] = "--gather", argv[n++] = s->c.gather_nccl ? "nccl" : "host";
        argv[n++] = "--dtype", argv[n++] = (char *)(s->c.dtype ? s->c.dtype : "fp32");
        if (s->c.tf32)
            argv[n++] = "--tf32";
    }
    if (s->c.cpu_gemm)
        argv[n++] = "--cpu-gemm", argv[n++] = (char *)s->c.cpu_gemm;
    argv[n] = NULL;
    fds[0] = sv[1];
    fds[1] = s->c.arena_fd;
    if (proc_spawn(argv, env, fds, 2, &pid, err) < 0) {
        close(sv[0]);
        close(sv[1]);
        return -1;
    }
    close(sv[1]);
    s->w[rank] = (struct worker){.pid = pid, .fd = sv[0]};
    tp_log(TP_LOG_NOTICE, "started worker rank %d pid %d", rank, (int)pid);
    {
        /* a fresh socket's buffer takes the plan and the INIT below without blocking */
        struct plan p = *s->c.plan;

        if (ctl_send_plan(sv[0], &p, err) < 0) {
            tp_err_prefix(err, "sending the plan to rank %d: ", rank);
            return -1;
        }
    }
    if (s->c.devices && s->c.gather_nccl) {
        struct ctl_msg m = {.type = CTL_INIT, .rank = (uint32_t)rank};

        memcpy(m.nccl_id, s->nccl_id, sizeof(m.nccl_id));
        if (ctl_send(sv[0], &m, err) < 0) {
            tp_err_prefix(err, "sending the NCCL id to rank %d: ", rank);
            return -1;
        }
    }
    return 0;
}

/* Reaps rank r, which is gone or going: it gets a second to exit by itself (its exit status says
 * why it died), then SIGKILL. */
static void reap_dead(struct sup *s, int r, char *why, size_t why_len)
{
    pid_t pid = s->w[r].pid;
    int status = 0;

    for (int i = 0; i < 100; i++) {
        pid_t p = waitpid(pid, &status, WNOHANG);

        if (p == pid || (p < 0 && errno != EINTR)) {
            describe_exit(why, why_len, status);
            s->w[r].pid = 0;
            return;
        }
        usleep(10000);
    }
    kill(pid, SIGKILL);
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
        ;
    snprintf(why, why_len, "killed by the supervisor");
    s->w[r].pid = 0;
}

/* Kills and reaps every worker, closing their sockets. Called with the lock held. The rank that
 * failed first (dead >= 0) is reaped first, so that its exit status can be reported in why. */
static void kill_group(struct sup *s, int dead, char *why, size_t why_len)
{
    int status;

    if (dead >= 0 && s->w[dead].pid > 0)
        reap_dead(s, dead, why, why_len);
    for (int r = 0; r < s->c.nranks; r++) {
        if (s->w[r].pid > 0) {
            kill(s->w[r].pid, SIGKILL);
            while (waitpid(s->w[r].pid, &status, 0) < 0 && errno == EINTR)
                ;
        }
        if (s->w[r].fd >= 0)
            close(s->w[r].fd);
        s->w[r] = (struct worker){.fd = -1};
        metrics_worker_up(r, 0);
    }
}

static int start_group(struct sup *s, struct tp_err *err)
{
    s->state = G_STARTING;
    notify_status("loading shards: starting %d workers", s->c.nranks);
    if (s->c.devices && s->c.gather_nccl && ncclid_make(s->nccl_id, err) < 0) {
        tp_err_prefix(err, "making the NCCL id: ");
        return -1;
    }
    for (int r = 0; r < s->c.nranks; r++) {
        if (s->first_ready)
            metrics_worker_restart(r);
        if (spawn_worker(s, r, err) < 0) {
            kill_group(s, -1, NULL, 0);
            return -1;
        }
    }
    return 0;
}

/* The group is lost: fails in-flight jobs and schedules a restart. Called with the lock held;
 * returns with it held, having released it around the callbacks. */
static void group_down(struct sup *s, int dead, const char *cause)
{
    char how[96] = "";
    struct tp_err e;
    int was_ready = s->state == G_READY;

    kill_group(s, dead, how, sizeof(how));
    if (dead >= 0)
        tp_err_set(&e, TP_EUNAVAIL, "worker rank %d %s%s%s", dead, cause, how[0] ? ", " : "", how);
    else
        tp_err_set(&e, TP_EUNAVAIL, "worker group %s", cause);
    if (!s->first_ready) {
        /* never served: no restart, sup_start reports why */
        if (s->fail.code == TP_OK)
            s->fail = e;
        s->state = G_FAILED;
        pthread_cond_broadcast(&s->cond);
        return;
    }
    s->state = G_DOWN;
    tp_log(TP_LOG_WARN, "%s; restarting the group in %d ms", e.msg, s->backoff_ms);
    notify_status("not ready: %s; restarting workers in %d ms", e.msg, s->backoff_ms);
    s->restart_at_ms = now_ms() + s->backoff_ms;
    s->backoff_ms = s->backoff_ms * 2 > MAX_BACKOFF_MS ? MAX_BACKOFF_MS : s->backoff_ms * 2;
    pthread_cond_broadcast(&s->cond);
    pthread_mutex_unlock(&s->lock);
    if (was_ready)
        s->state_cb(s->ctx, 0);
    for (uint32_t slot = 0; slot < s->c.slots; slot++) {
        uint64_t id;
        struct tp_err why;

        pthread_mutex_lock(&s->lock);
        id = s->jobs[slot].id;
        if (!s->jobs[slot].pending) {
            pthread_mutex_unlock(&s->lock);
            continue;
        }
        s->jobs[slot].pending = 0;
        /* a rank that reported its own failure (a device or NCCL error) before the group went
         * down says more than the group's death does */
        why = s->jobs[slot].err.code != TP_OK ? s->jobs[slot].err : e;
        pthread_mutex_unlock(&s->lock);
        s->done(s->ctx, slot, id, &why);
    }
    pthread_mutex_lock(&s->lock);
}

/* Handles one message from rank r. Called with the lock held; may release it around callbacks. */
static void on_message(struct sup *s, int r, const struct ctl_msg *m)
{
    struct tp_err e = {0};

    if (ctl_validate(m, s->c.slots, s->c.max_batch, &e) < 0 ||
        (m->type != CTL_READY && m->type != CTL_DONE)) {
        tp_log(TP_LOG_ERR, "worker rank %d sent a bad control message: %s", r,
               e.msg[0] ? e.msg : "unexpected type");
        group_down(s, r, "broke the control protocol");
        return;
    }
    if (m->type == CTL_READY) {
        if (m->status != TP_OK) {
            tp_log(TP_LOG_ERR, "worker rank %d failed to load: %s", r, m->text);
            if (s->fail.code == TP_OK)
                tp_err_set(&s->fail, (enum tp_code)m->status, "rank %d: %.200s", r, m->text);
            group_down(s, r, "failed to load");
            return;
        }
        s->w[r].ready = 1;
        metrics_worker_up(r, 1);
        for (int i = 0; i < s->c.nranks; i++)
            if (!s->w[i].ready)
                return;
        s->state = G_READY;
        if (s->first_ready) {
            tp_log(TP_LOG_NOTICE, "worker group of %d ranks is ready again", s->c.nranks);
            notify_status("serving: %d ranks ready again", s->c.nranks);
        }
        s->first_ready = 1;
        s->backoff_ms = s->c.backoff_ms;
        pthread_cond_broadcast(&s->cond);
        pthread_mutex_unlock(&s->lock);
        s->state_cb(s->ctx, 1);
        pthread_mutex_lock(&s->lock);
        return;
    }
    /* CTL_DONE */
    {
        struct job *j = &s->jobs[m->slot];
        uint64_t id = j->id;
        struct tp_err failed;

        if (!j->pending || j->id != m->id) {
            tp_log(TP_LOG_ERR, "worker rank %d answered job %llu on slot %u, which is not running",
                   r, (unsigned long long)m->id, m->slot);
            return;
        }
        if (m->status != TP_OK && j->err.code == TP_OK)
            tp_err_set(&j->err, (enum tp_code)m->status, "rank %d: %.200s", r, m->text);
        if (--j->pending > 0)
            return;
        metrics_job_done(m->slot);
        failed = j->err;
        pthread_mutex_unlock(&s->lock);
        s->done(s->ctx, m->slot, id, failed.code == TP_OK ? NULL : &failed);
        pthread_mutex_lock(&s->lock);
    }
}

static void *sup_thread(void *arg)
{
    struct sup *s = arg;
    struct pollfd *pfd = s->pfd;

    pthread_mutex_lock(&s->lock);
    while (!s->stopping) {
        int n = 1, timeout = -1;

        pfd[0] = (struct pollfd){.fd = s->wake_fd, .events = POLLIN};
        for (int r = 0; r < s->c.nranks; r++)
            pfd[n++] = (struct pollfd){.fd = s->w[r].fd, .events = POLLIN};
        if (s->state == G_DOWN)
            timeout = s->restart_at_ms > now_ms() ? (int)(s->restart_at_ms - now_ms()) : 0;
        pthread_mutex_unlock(&s->lock);
        while (poll(pfd, (nfds_t)n, timeout) < 0 && errno == EINTR)
            ;
        pthread_mutex_lock(&s->lock);
        if (pfd[0].revents & POLLIN) {
            uint64_t v;

            if (read(s->wake_fd, &v, sizeof(v)) < 0 && errno != EAGAIN)
                tp_log(TP_LOG_ERR, "supervisor: reading wake fd: %s", strerror(errno));
        }
        if (s->stopping)
            break;
        for (int r = 0; r < s->c.nranks && s->state != G_DOWN && s->state != G_FAILED; r++) {
            struct ctl_msg m;
            struct tp_err e = {0};
            int got;

            if (s->w[r].fd < 0 || pfd[r + 1].fd != s->w[r].fd || !pfd[r + 1].revents)
                continue;
            got = ctl_recv(s->w[r].fd, &m, &e);
            if (got == 1)
                on_message(s, r, &m);
            else
                group_down(s, r, got == 0 ? "closed its control socket" : e.msg);
        }
        if (s->state == G_DOWN && now_ms() >= s->restart_at_ms) {
            struct tp_err e = {0};

            if (start_group(s, &e) < 0) {
                tp_log(TP_LOG_ERR, "restarting workers: %s", e.msg);
                group_down(s, -1, "could not be started");
            }
        }
    }
    pthread_mutex_unlock(&s->lock);
    return NULL;
}

int sup_start(struct sup **out, const struct sup_config *c, sup_done_fn done, sup_state_fn state,
              void *ctx, struct tp_err *err)
{
    struct sup *s = calloc(1, sizeof(*s));

    *out = NULL;
    if (!s)
        return tp_err_set(err, TP_ENOMEM, "no memory for the supervisor");
    s->c = *c;
    s->done = done;
    s->state_cb = state;
    s->ctx = ctx;
    s->backoff_ms = c->backoff_ms;
    s->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->cond, NULL);
    s->w = calloc((size_t)c->nranks, sizeof(*s->w));
    s->jobs = calloc(c->slots, sizeof(*s->jobs));
    s->pfd = calloc((size_t)c->nranks + 1, sizeof(*s->pfd));
    for (int r = 0; s->w && r < c->nranks; r++)
        s->w[r] = (struct worker){.fd = -1};
    if (s->wake_fd < 0 || !s->w || !s->jobs || !s->pfd) {
        tp_err_sys(err, "creating the supervisor");
        goto fail;
    }
    pthread_mutex_lock(&s->lock);
    if (start_group(s, err) < 0) {
        pthread_mutex_unlock(&s->lock);
        goto fail;
    }
    if (pthread_create(&s->thread, NULL, sup_thread, s) != 0) {
        kill_group(s, -1, NULL, 0);
        pthread_mutex_unlock(&s->lock);
        tp_err_set(err, TP_ESYS, "cannot start the supervisor thread");
        goto fail;
    }
    s->thread_started = 1;
    while (s->state == G_STARTING)
        pthread_cond_wait(&s->cond, &s->lock);
    if (s->state == G_FAILED) {
        *err = s->fail;
        pthread_mutex_unlock(&s->lock);
        goto fail;
    }
    pthread_mutex_unlock(&s->lock);
    *out = s;
    return 0;
fail:
    sup_stop(s);
    return -1;
}

int sup_dispatch(struct sup *s, uint32_t slot, uint64_t id, uint32_t rows, struct tp_err *err)
{
    struct ctl_msg m = {.type = CTL_JOB, .id = id, .slot = slot, .rows = rows};

    pthread_mutex_lock(&s->lock);
    if (s->state != G_READY) {
        pthread_mutex_unlock(&s->lock);
        return tp_err_set(err, TP_EUNAVAIL, "workers are not ready (restarting)");
    }
    s->jobs[slot] = (struct job){.id = id, .pending = s->c.nranks};
    metrics_job_start(slot, rows);
    /* Sent to every rank under the lock, so every rank sees the jobs in the same order: with the
     * NCCL gather each job is a collective, and ranks that issued them in different orders would
     * pair up the wrong all-gathers and hang. */
    for (int r = 0; r < s->c.nranks; r++) {
        struct tp_err e = {0};

        /* A failed send means the worker is gone: the supervisor thread sees the EOF and fails
         * this job with the rest of the group, so the caller still gets its done callback. */
        if (ctl_send(s->w[r].fd, &m, &e) < 0) {
            tp_log(TP_LOG_WARN, "sending job %llu to rank %d: %s", (unsigned long long)id, r,
                   e.msg);
            break;
        }
    }
    pthread_mutex_unlock(&s->lock);
    return 0;
}

void sup_stop(struct sup *s)
{
    int64_t deadline;

    if (!s)
        return;
    if (s->thread_started) {
        uint64_t one = 1;

        pthread_mutex_lock(&s->lock);
        s->stopping = 1;
        pthread_mutex_unlock(&s->lock);
        if (write(s->wake_fd, &one, sizeof(one)) < 0)
            tp_log(TP_LOG_ERR, "supervisor: waking thread: %s", strerror(errno));
        pthread_join(s->thread, NULL);
    }
    /* STOP, then EOF: each worker finishes and exits in order. EOF alone would tell a worker
     * that tpd died, and it would leave without its teardown (worker/main.c). The send does not
     * wait: a worker that no longer reads its socket (stopped, or stuck in a device call) must not
     * hold up the stop; it gets EOF alone, and SIGKILL below if it does not exit. */
    for (int r = 0; s->w && r < s->c.nranks; r++) {
        struct ctl_msg m = {.type = CTL_STOP, .rank = (uint32_t)r};
        struct tp_err e = {0};

        if (s->w[r].fd < 0)
            continue;
        if (fcntl(s->w[r].fd, F_SETFL, O_NONBLOCK) < 0)
            tp_err_sys(&e, "making the control socket non-blocking");
        else
            ctl_send(s->w[r].fd, &m, &e);
        if (e.code != TP_OK)
            tp_log(TP_LOG_WARN, "worker rank %d: sending STOP: %s", r, e.msg);
        close(s->w[r].fd);
        s->w[r].fd = -1;
    }
    deadline = now_ms() + 5000;
    for (int r = 0; s->w && r < s->c.nranks; r++) {
        int status;

        while (s->w[r].pid > 0) {
            pid_t p = waitpid(s->w[r].pid, &status, WNOHANG);

            if (p == s->w[r].pid || (p < 0 && errno != EINTR)) {
                s->w[r].pid = 0;
            } else if (now_ms() > deadline) {
                tp_log(TP_LOG_WARN, "worker rank %d did not exit, killing it", r);
                kill(s->w[r].pid, SIGKILL);
                deadline = now_ms() + 5000;
            } else {
                usleep(2000);
            }
        }
    }
    if (s->wake_fd >= 0)
        close(s->wake_fd);
    pthread_mutex_destroy(&s->lock);
    pthread_cond_destroy(&s->cond);
    free(s->w);
    free(s->jobs);
    free(s->pfd);
    free(s);
}
