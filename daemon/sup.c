/* sup.c -- the worker supervisor (see sup.h). One thread polls the control sockets of all ranks
 * and an eventfd that wakes it to stop; its poll times out at the earliest deadline: a restart
 * due, a rank's job or a restarted group's load. The mutex guards the worker table and the
 * in-flight jobs, and is never held across a wait: callbacks into the scheduler run without it,
 * so that completing requests (the scheduler's lock, replies to clients) never holds up
 * sup_dispatch on the scheduler's threads, and a group going down leaves the table empty under
 * the lock, then kills and reaps its workers without it. Job sends never wait either: the sockets
 * are non-blocking, and the jobs that do not fit in a rank's socket wait in the rank's backlog, in
 * order, until it reads; a rank that has stopped reading is found by its job's bound. */
#include "sup.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
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
#define NS_PER_MS 1000000LL

/* How long a rank may take over a job before it is taken for hung: max(--job-timeout-ms,
 * JOB_SLACK x the job's rows x the time per row). The time per row starts from the layer, at a
 * prior time for each multiply-add of a rank's share (plan_rank_macs): on CPU ranks 5 ns,
 * well over what a sanitizer build measures on a loaded machine (1 to 3 ns; a plain build
 * 0.03 ns with the AVX2 kernel), so even the first job of a big layer keeps its bound; on GPUs
 * 0.05 ns, hundreds of times any GPU's FP32 time, which leaves a hang in the first collective of
 * a restarted group to be found in seconds, not in minutes. Once ranks have answered, the time
 * per row is the slowest measured since tpd started, never more than the prior: a rank that was
 * stopped for a while, then went on, cannot stretch the bound past what the layer's size allows.
 * Rows scale the bound because a job's time grows with them, while the time per row measured on
 * small jobs (a GEMV that reads all of W for one row) is the largest there is. */
#define JOB_SLACK 10
#define PRIOR_NS_PER_MAC_CPU 5.0
#define PRIOR_NS_PER_MAC_GPU 0.05

/* How long a restarted group may take to load: max(--job-timeout-ms, LOAD_SLACK x the slowest
 * load of a group so far), doubled after each restart that did not load in time, so that a host
 * that got slower (a cold page cache, a busy disk) is waited for longer each time instead of
 * being killed forever. The first start has no bound of its own: nothing has been measured yet,
 * a first start may JIT-compile kernels or read a cold disk, and the service manager bounds it
 * (TimeoutStartSec in deploy/tpd.service). */
#define LOAD_SLACK 10
#define MAX_LOAD_DOUBLINGS 10

/* How long a killed worker is waited for before it is left behind: SIGKILL ends a stopped
 * process at once, but not one blocked in the kernel (a device driver call that does not
 * return); tpd must not hang on it. */
#define REAP_WAIT_MS 5000

enum group_state {
    G_STARTING, /* spawned, waiting for every READY */
    G_READY,    /* serving */
    G_KILLING,  /* going down: the table is empty, the thread reaps the workers unlocked */
    G_DOWN,     /* waiting for restart_at_ms */
    G_FAILED,   /* the first start failed; sup_start reports why */
};

struct worker {
    pid_t pid; /* 0 when not running */
    int fd;    /* control socket, -1 when closed */
    int ready;
    int64_t done_ns;  /* CLOCK_MONOTONIC of its last answer in this group, 0 before the first */
    uint32_t bl_head; /* its backlog (struct sup): the first of bl_len messages (jobs, loads, */
    uint32_t bl_len;  /* unloads) that wait for room in its socket, in the order they were sent */
    int half;         /* the backlog's first is a LOAD whose PLAN is still to be sent */
    int loads;        /* LOADs and UNLOADs sent to it and not answered yet */
};

/* A backlog entry is a job's slot, or one of these with the model's id: a LOAD or an UNLOAD. */
#define BL_LOAD 0x80000000u
#define BL_UNLOAD 0x40000000u
#define BL_ID 0x0000ffffu

/* A model the supervisor has loaded, or is loading or unloading. */
struct smodel {
    int used;          /* registered: slots owned, reloaded after a restart */
    int loaded;        /* every rank of this group has it */
    int loading;       /* LOADs sent, answers pending */
    int unloading;     /* UNLOADs sent, answers pending */
    int pending;       /* ranks that have not answered the LOAD or UNLOAD */
    int failed;        /* a rank failed the load: the UNLOAD that follows ends it */
    int waiter;        /* sup_load waits for this load */
    int answered;      /* its wait is over: err says how */
    struct tp_err err; /* the first rank's failure */
    struct sup_model m;
    uint32_t nslots;
    double prior_row_ns;      /* time per row of a job, from the model's size */
    double row_ns;            /* the slowest measured; < 0 before the first answer */
    int64_t load_started_ns;  /* of the load in progress */
    int64_t load_ns;          /* its last load's time; 0 before the first */
};

struct job {
    uint64_t id;
    int pending;       /* ranks that have not answered; 0 when the slot is idle */
    uint32_t rows;     /* rows of the slot's input */
    uint64_t seq;      /* dispatch order: a rank answers its jobs in this order */
    int64_t sent_ns;   /* CLOCK_MONOTONIC, when sup_dispatch took it */
    uint32_t collectives; /* the most that a rank reported running for it */
    struct tp_err err; /* first failure reported by a rank */
};

struct sup {
    struct sup_config c;
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
    int64_t started_ns;                 /* CLOCK_MONOTONIC, when the group was last spawned */
    int64_t load_ns;                    /* the slowest load of a group, spawn to last READY */
    int64_t sleep_until_ns;             /* the deadline the thread polls until; -1: none */
    int load_doublings;                 /* restarts in a row that did not load in time */
    uint64_t next_seq;                  /* of the next job */
    int send_failed;                    /* rank a job could not be sent to; -1: none */
    uint64_t send_job;                  /* the job it could not be sent */
    struct tp_err send_err;             /* why */
    uint32_t *backlog;                  /* nranks rings of bl_cap entries (struct worker) */
    uint32_t bl_cap;                    /* a slot each, and a load and an unload per model */
    struct smodel models[CTL_MAX_MODELS];
    int16_t *owner;                     /* slots: the model that owns the slot, -1 for none */
    struct worker *w;                   /* nranks */
    struct worker *old;                 /* nranks: the group being reaped by group_down */
    uint8_t *late;                      /* nranks: scratch for the ranks past a deadline */
    int *cur;                           /* nranks: scratch, the slot each rank works on */
    uint8_t *answered;                  /* slots x nranks: rank r answered the slot's job */
    struct job *jobs;                   /* slots */
    pid_t *lost;                        /* killed workers that did not exit in REAP_WAIT_MS */
    size_t nlost;                       /* touched only by the supervising thread */
    struct pollfd *pfd;                 /* wake fd + nranks control sockets, for the thread */
    uint8_t nccl_id[CTL_NCCL_ID_BYTES]; /* of the group being started, with gather_nccl */
};

static int64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int64_t now_ms(void)
{
    return now_ns() / NS_PER_MS;
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

/* Starts one rank. Called by start_group without the lock: nobody else reads the table while the
 * group is not ready. */
static int spawn_worker(struct sup *s, int rank, struct tp_err *err)
{
    char a_rank[16], a_ranks[16], a_slots[16], a_batch[16], a_threads[16], env_threads[48];
    char a_device[16];
    char *argv[40];
    char *env[2] = {env_threads, NULL};
    int sv[2], n = 0, fds[1];
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
    if (proc_spawn(argv, env, fds, 1, &pid, err) < 0) {
        close(sv[0]);
        close(sv[1]);
        return -1;
    }
    close(sv[1]);
    s->w[rank] = (struct worker){.pid = pid, .fd = sv[0]};
    /* every send to a worker must return at once, whatever the worker does (sup_dispatch) */
    if (fcntl(sv[0], F_SETFL, O_NONBLOCK) < 0)
        return tp_err_sys(err, "making the control socket of rank %d non-blocking", rank);
    tp_log(TP_LOG_NOTICE, "started worker rank %d pid %d", rank, (int)pid);
    /* A fresh socket's buffer takes the INIT below at once. A worker that exited already (its
     * program failed) is no error here: the supervisor sees its socket's EOF and reports its
     * exit status, which says more than the failed send. */
    if (s->c.devices && s->c.gather_nccl) {
        struct ctl_msg m = {.type = CTL_INIT, .rank = (uint32_t)rank};
        struct tp_err e = {0};

        memcpy(m.nccl_id, s->nccl_id, sizeof(m.nccl_id));
        if (ctl_send(sv[0], &m, &e) < 0 && e.code != TP_EUNAVAIL) {
            *err = e;
            tp_err_prefix(err, "sending the NCCL id to rank %d: ", rank);
            return -1;
        }
    }
    return 0;
}

static void wake(struct sup *s)
{
    uint64_t one = 1;

    if (write(s->wake_fd, &one, sizeof(one)) < 0 && errno != EAGAIN)
        tp_log(TP_LOG_ERR, "supervisor: waking thread: %s", strerror(errno));
}

/* Remembers a worker that did not exit after SIGKILL, to be reaped once it does. */
static void keep_lost(struct sup *s, pid_t pid)
{
    pid_t *p = realloc(s->lost, (s->nlost + 1) * sizeof(*p));

    if (!p)
        return; /* it stays a zombie until tpd exits */
    s->lost = p;
    s->lost[s->nlost++] = pid;
}

/* Reaps the workers left behind that have exited since. */
static void reap_lost(struct sup *s)
{
    for (size_t i = 0; i < s->nlost;) {
        int status;
        pid_t p = waitpid(s->lost[i], &status, WNOHANG);

        if (p == s->lost[i] || (p < 0 && errno == ECHILD))
            s->lost[i] = s->lost[--s->nlost];
        else
            i++;
    }
}

/* Moves the workers out of the table into s->old, leaving the table empty. Lock held. */
static void take_workers(struct sup *s)
{
    memcpy(s->old, s->w, (size_t)s->c.nranks * sizeof(*s->w));
    for (int r = 0; r < s->c.nranks; r++)
        s->w[r] = (struct worker){.fd = -1};
}

/* Kills and reaps the workers in old (taken out of the table by take_workers) and closes their
 * sockets. Called on the supervising thread without the lock. wait_rank (-1: none) failed by
 * itself: it gets a second to exit on its own, and how receives its exit status. A worker still
 * there REAP_WAIT_MS after SIGKILL is left behind (s->lost) rather than waited for. */
static void reap_workers(struct sup *s, struct worker *old, int wait_rank, char *how,
                         size_t how_len)
{
    int64_t deadline;

    for (int r = 0; r < s->c.nranks; r++)
        if (old[r].pid > 0 && r != wait_rank)
            kill(old[r].pid, SIGKILL);
    if (wait_rank >= 0 && old[wait_rank].pid > 0) {
        for (int i = 0; i < 100 && old[wait_rank].pid > 0; i++) {
            int status = 0;
            pid_t p = waitpid(old[wait_rank].pid, &status, WNOHANG);

            if (p == old[wait_rank].pid || (p < 0 && errno != EINTR)) {
                describe_exit(how, how_len, status);
                old[wait_rank].pid = 0;
            } else {
                usleep(10000);
            }
        }
        if (old[wait_rank].pid > 0) {
            kill(old[wait_rank].pid, SIGKILL);
            snprintf(how, how_len, "killed by the supervisor");
        }
    }
    deadline = now_ms() + REAP_WAIT_MS;
    for (int r = 0; r < s->c.nranks; r++) {
        while (old[r].pid > 0) {
            int status;
            pid_t p = waitpid(old[r].pid, &status, WNOHANG);

            if (p == old[r].pid || (p < 0 && errno != EINTR)) {
                old[r].pid = 0;
            } else if (now_ms() >= deadline) {
                tp_log(TP_LOG_WARN,
                       "worker rank %d pid %d has not exited %d ms after SIGKILL (blocked in the "
                       "kernel?): leaving it behind",
                       r, (int)old[r].pid, REAP_WAIT_MS);
                keep_lost(s, old[r].pid);
                old[r].pid = 0;
            } else {
                usleep(1000);
            }
        }
        if (old[r].fd >= 0)
            close(old[r].fd);
        old[r] = (struct worker){.fd = -1};
        metrics_worker_up(r, 0);
    }
}

/* Kills and reaps every worker. Called with the lock held, which it releases while it waits. */
static void kill_group(struct sup *s)
{
    take_workers(s);
    pthread_mutex_unlock(&s->lock);
    reap_workers(s, s->old, -1, NULL, 0);
    pthread_mutex_lock(&s->lock);
}

/* Spawns a group. Called with the lock held and the state not G_READY, so that nobody else reads
 * the table; the lock is released while the workers are forked. On failure every worker spawned
 * is gone again. */
static int start_group(struct sup *s, struct tp_err *err)
{
    int rc = 0;

    s->state = G_STARTING;
    s->started_ns = now_ns();
    pthread_mutex_unlock(&s->lock);
    notify_status("loading shards: starting %d workers", s->c.nranks);
    if (s->c.devices && s->c.gather_nccl && ncclid_make(s->nccl_id, err) < 0) {
        tp_err_prefix(err, "making the NCCL id: ");
        rc = -1;
    }
    for (int r = 0; rc == 0 && r < s->c.nranks; r++) {
        if (s->first_ready)
            metrics_worker_restart(r);
        if (spawn_worker(s, r, err) < 0)
            rc = -1;
    }
    pthread_mutex_lock(&s->lock);
    if (rc < 0)
        kill_group(s);
    return rc;
}

/* Sends rank r the jobs of its backlog, oldest first, until its socket is full. 0 when the
 * backlog is empty or waits for room (the thread then polls for it), -1 when the rank is gone or
 * its socket failed otherwise. Lock held. */
static int flush_jobs(struct sup *s, int r, struct tp_err *err)
{
    struct worker *w = &s->w[r];
    const uint32_t *q = &s->backlog[(size_t)r * s->bl_cap];

    while (w->bl_len) {
        uint32_t entry = q[w->bl_head];
        struct ctl_msg m = {.id = entry & BL_ID};
        struct tp_err e = {0};
        int rc;

        if (entry & BL_LOAD) {
            const struct smodel *md = &s->models[entry & BL_ID];

            m.type = CTL_LOAD;
            m.slot = md->m.slot0;
            m.rows = md->m.arena->layout.max_batch;
            m.bytes = md->nslots;
            if (!w->half) {
                rc = ctl_send_fd(w->fd, &m, md->m.arena->fd, &e);
                if (rc == 0)
                    w->half = 1;
            }
            if (w->half) {
                struct plan p = *md->m.plan;

                rc = ctl_send_plan(w->fd, &p, &e);
                if (rc == 0)
                    w->half = 0;
            }
        } else if (entry & BL_UNLOAD) {
            m.type = CTL_UNLOAD;
            rc = ctl_send(w->fd, &m, &e);
        } else {
            m = (struct ctl_msg){.type = CTL_JOB,
                                 .id = s->jobs[entry].id,
                                 .slot = entry,
                                 .rows = s->jobs[entry].rows};
            rc = ctl_send(w->fd, &m, &e);
        }
        if (rc < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) /* ctl_send keeps send's errno */
                return 0;
            *err = e;
            return -1;
        }
        w->bl_head = (w->bl_head + 1) % s->bl_cap;
        w->bl_len--;
    }
    return 0;
}

/* Queues entry (a job's slot, or a LOAD or UNLOAD) for rank r behind the messages that already
 * wait for room in its socket, and sends what fits. A rank has at most one job per slot that it
 * has not answered, and at most one load and one unload per model, so the backlog cannot
 * overflow. Returns as flush_jobs. Lock held. */
static int send_job(struct sup *s, int r, uint32_t entry, struct tp_err *err)
{
    struct worker *w = &s->w[r];
    int was_empty = w->bl_len == 0;

    if (w->bl_len == s->bl_cap)
        return tp_err_set(err, TP_EINTERNAL, "rank %d has %u messages waiting, its most", r,
                          w->bl_len);
    s->backlog[(size_t)r * s->bl_cap + (w->bl_head + w->bl_len) % s->bl_cap] = entry;
    w->bl_len++;
    if (entry & (BL_LOAD | BL_UNLOAD))
        w->loads++;
    if (flush_jobs(s, r, err) < 0)
        return -1;
    if (was_empty && w->bl_len) {
        tp_log(TP_LOG_DEBUG,
               "worker rank %d is behind: its control socket is full, jobs wait in tpd until it "
               "reads",
               r);
        wake(s); /* to poll for room in its socket */
    }
    return 0;
}

/* "rank 1" or "ranks 0, 2, 5": the ranks flagged in late, the first 8 by number. */
static void rank_list(char *buf, size_t len, const uint8_t *late, int nranks)
{
    int count = 0, named = 0;
    size_t used;

    for (int r = 0; r < nranks; r++)
        count += late[r] != 0;
    used = (size_t)snprintf(buf, len, "rank%s", count == 1 ? "" : "s");
    for (int r = 0; r < nranks && used < len; r++) {
        if (!late[r])
            continue;
        if (named == 8) {
            snprintf(buf + used, len - used, " and %d more", count - named);
            return;
        }
        used += (size_t)snprintf(buf + used, len - used, "%s %d", named ? "," : "", r);
        named++;
    }
}

/* The most a rank may take over a job of rows on slot (the rule is at JOB_SLACK): by the numbers
 * of the slot's model. */
static int64_t job_bound_ns(const struct sup *s, uint32_t slot, uint32_t rows)
{
    const struct smodel *md = &s->models[s->owner[slot] >= 0 ? s->owner[slot] : 0];
    double per_row =
        md->row_ns >= 0 && md->row_ns < md->prior_row_ns ? md->row_ns : md->prior_row_ns;
    double ns = (double)JOB_SLACK * rows * per_row;
    int64_t floor_ns = (int64_t)s->c.job_timeout_ms * NS_PER_MS;

    if (ns <= (double)floor_ns)
        return floor_ns;
    return ns < 1e18 ? (int64_t)ns : (int64_t)1e18;
}

/* The most a restarted group may take to come up, or to load a model again, that took load_ns
 * the last time (the rule is at LOAD_SLACK). */
static int64_t load_bound_ns(const struct sup *s, int64_t load_ns)
{
    int64_t floor_ns = (int64_t)s->c.job_timeout_ms * NS_PER_MS;
    int64_t b = LOAD_SLACK * load_ns > floor_ns ? LOAD_SLACK * load_ns : floor_ns;

    return b << s->load_doublings;
}

/* A reload after a restart, bounded by the model's last load; -1 for none. Lock held. */
static int64_t reload_deadline_ns(const struct sup *s, int *which)
{
    int64_t at = -1;

    for (int i = 0; i < CTL_MAX_MODELS; i++) {
        const struct smodel *md = &s->models[i];
        int64_t d;

        if (!md->used || !md->loading || md->waiter || !md->load_ns)
            continue;
        d = md->load_started_ns + load_bound_ns(s, md->load_ns);
        if (at < 0 || d < at) {
            at = d;
            if (which)
                *which = i;
        }
    }
    return at;
}

/* Finds the job each rank works on, into s->cur (a slot, -1 for none). A rank computes its jobs
 * one at a time in the order they were sent, so that is the oldest it has not answered. Costs a
 * pass over the slots and one over the ranks per job in flight. Lock held. */
static void find_current_jobs(struct sup *s)
{
    for (int r = 0; r < s->c.nranks; r++)
        s->cur[r] = -1;
    for (uint32_t i = 0; i < s->c.slots; i++) {
        /* a rank that loads a model computes no job meanwhile: its jobs wait behind the load,
         * which has a bound of its own */
        const uint8_t *answered = &s->answered[(size_t)i * (size_t)s->c.nranks];

        if (!s->jobs[i].pending)
            continue;
        for (int r = 0; r < s->c.nranks; r++)
            if (!answered[r] && !s->w[r].loads &&
                (s->cur[r] < 0 || s->jobs[i].seq < s->jobs[s->cur[r]].seq))
                s->cur[r] = (int)i;
    }
}

/* When rank r started its current job (find_current_jobs): when the job was sent or when the rank
 * answered the one before, whichever came last. */
static int64_t job_start_ns(const struct sup *s, int r)
{
    const struct job *j = &s->jobs[s->cur[r]];

    return j->sent_ns > s->w[r].done_ns ? j->sent_ns : s->w[r].done_ns;
}

/* When the thread must look again without a message: a restart due, a job's or a load's bound;
 * -1 for none. Lock held. */
static int64_t next_deadline_ns(struct sup *s)
{
    int64_t at = -1;

    if (s->state == G_DOWN)
        return s->restart_at_ms * NS_PER_MS;
    if (!s->c.job_timeout_ms)
        return -1;
    if (s->state == G_STARTING && s->first_ready)
        return s->started_ns + load_bound_ns(s, s->load_ns);
    if (s->state != G_READY)
        return -1;
    at = reload_deadline_ns(s, NULL);
    find_current_jobs(s);
    for (int r = 0; r < s->c.nranks; r++) {
        int64_t d;

        if (s->cur[r] < 0)
            continue;
        d = job_start_ns(s, r) + job_bound_ns(s, (uint32_t)s->cur[r], s->jobs[s->cur[r]].rows);
        if (at < 0 || d < at)
            at = d;
    }
    return at;
}

static void group_down(struct sup *s, int wait_rank, const struct tp_err *why);

/* Takes the group down when a rank is past its deadline: a job it has not finished in its bound,
 * or, on a restart, a load that has not ended in the load bound. A rank whose answer is already
 * in its socket is not late: the thread was slow to read it, not the rank to send it. Lock held,
 * on the supervising thread. */
static void check_deadlines(struct sup *s)
{
    int64_t now = now_ns(), first = -1, first_start = 0, bound;
    int first_slot = -1, nlate = 0;
    struct tp_err e;
    char who[128];

    if (!s->c.job_timeout_ms)
        return;
    memset(s->late, 0, (size_t)s->c.nranks);
    if (s->state == G_STARTING && s->first_ready) {
        bound = load_bound_ns(s, s->load_ns);
        if (now - s->started_ns < bound)
            return;
        for (int r = 0; r < s->c.nranks; r++)
            if (!s->w[r].ready)
                s->late[r] = 1;
        rank_list(who, sizeof(who), s->late, s->c.nranks);
        tp_err_set(&e, TP_EUNAVAIL,
                   "worker %s did not report ready within %lld ms (waited %lld ms)", who,
                   (long long)(bound / NS_PER_MS), (long long)((now - s->started_ns) / NS_PER_MS));
        if (s->load_doublings < MAX_LOAD_DOUBLINGS)
            s->load_doublings++;
        group_down(s, -1, &e);
        return;
    }
    if (s->state != G_READY)
        return;
    {
        int which = -1;
        int64_t at = reload_deadline_ns(s, &which);

        if (at >= 0 && at <= now) {
            const struct smodel *md = &s->models[which];

            tp_err_set(&e, TP_EUNAVAIL,
                       "the workers did not load model %d again within %lld ms (waited %lld ms)",
                       which, (long long)(load_bound_ns(s, md->load_ns) / NS_PER_MS),
                       (long long)((now - md->load_started_ns) / NS_PER_MS));
            if (s->load_doublings < MAX_LOAD_DOUBLINGS)
                s->load_doublings++;
            group_down(s, -1, &e);
            return;
        }
    }
    find_current_jobs(s);
    for (int r = 0; r < s->c.nranks; r++) {
        struct pollfd p = {.fd = s->w[r].fd, .events = POLLIN};
        int64_t start, d;

        if (s->cur[r] < 0)
            continue;
        start = job_start_ns(s, r);
        d = start + job_bound_ns(s, (uint32_t)s->cur[r], s->jobs[s->cur[r]].rows);
        if (d > now || poll(&p, 1, 0) > 0)
            continue;
        s->late[r] = 1;
        nlate++;
        if (first < 0 || d < first)
            first = d, first_slot = s->cur[r], first_start = start;
    }
    if (!nlate)
        return;
    rank_list(who, sizeof(who), s->late, s->c.nranks);
    tp_err_set(&e, TP_EUNAVAIL,
               "worker %s did not finish job %llu (%u row%s, slot %d) within %lld ms (waited %lld "
               "ms)",
               who, (unsigned long long)s->jobs[first_slot].id, s->jobs[first_slot].rows,
               s->jobs[first_slot].rows == 1 ? "" : "s", first_slot,
               (long long)(job_bound_ns(s, (uint32_t)first_slot, s->jobs[first_slot].rows) /
                           NS_PER_MS),
               (long long)((now - first_start) / NS_PER_MS));
    group_down(s, -1, &e);
}

/* Tells the model that owns slot that job id is done (err NULL) or failed. Lock held; released
 * around the callback. */
static void job_done(struct sup *s, uint32_t slot, uint64_t id, const struct tp_err *err)
{
    int o = s->owner[slot];
    sup_done_fn done;
    void *ctx;

    if (o < 0)
        return;
    done = s->models[o].m.done;
    ctx = s->models[o].m.ctx;
    pthread_mutex_unlock(&s->lock);
    done(ctx, slot - s->models[o].m.slot0, id, err);
    pthread_mutex_lock(&s->lock);
}

/* Forgets model i: its slots are free again. Lock held. */
static void unregister(struct sup *s, int i)
{
    struct smodel *md = &s->models[i];

    for (uint32_t k = 0; k < md->nslots; k++)
        s->owner[md->m.slot0 + k] = -1;
    md->used = md->loaded = md->loading = md->unloading = md->pending = 0;
    pthread_cond_broadcast(&s->cond);
}

/* The group went down (why): every model stops being ready, to be loaded again by the next
 * group; a load that sup_load waits for fails, and an unload in progress is over (its workers
 * are gone). Lock held; released around the callbacks. */
static void models_down(struct sup *s, const struct tp_err *why)
{
    for (int i = 0; i < CTL_MAX_MODELS; i++) {
        struct smodel *md = &s->models[i];
        int was_loaded = md->loaded;

        if (!md->used)
            continue;
        md->loaded = 0;
        md->pending = 0;
        if (md->waiter && (md->loading || md->unloading)) {
            if (md->err.code == TP_OK) {
                md->err = *why;
                tp_err_prefix(&md->err, "the worker group went down during the load: ");
            }
            md->answered = 1;
            unregister(s, i);
        } else if (md->unloading && md->failed) {
            struct tp_err lost = md->err;
            sup_lost_fn fn = md->m.lost;
            void *ctx = md->m.ctx;

            unregister(s, i);
            pthread_mutex_unlock(&s->lock);
            fn(ctx, &lost);
            pthread_mutex_lock(&s->lock);
        } else if (md->unloading) {
            unregister(s, i);
        } else {
            md->loading = 0;
        }
        if (was_loaded) {
            sup_state_fn fn = md->m.state;
            void *ctx = md->m.ctx;

            pthread_mutex_unlock(&s->lock);
            fn(ctx, 0);
            pthread_mutex_lock(&s->lock);
        }
    }
}

/* Queues model i's LOAD (or UNLOAD) for every rank, in order with the jobs. Lock held, the group
 * ready. A send that fails is found by the thread, as for a job. */
static void send_model(struct sup *s, int i, int unload)
{
    struct smodel *md = &s->models[i];

    md->pending = s->c.nranks;
    if (unload) {
        md->unloading = 1;
        md->loading = 0;
    } else {
        md->loading = 1;
        md->load_started_ns = now_ns();
    }
    for (int r = 0; r < s->c.nranks; r++) {
        struct tp_err e = {0};

        if (s->send_failed < 0 &&
            send_job(s, r, (unload ? BL_UNLOAD : BL_LOAD) | (uint32_t)i, &e) < 0) {
            s->send_failed = r;
            s->send_job = 0;
            s->send_err = e;
            wake(s);
        }
    }
}

/* Rank r answered model m->id's LOAD or UNLOAD. Lock held; released around the callbacks. */
static void on_model_answer(struct sup *s, int r, const struct ctl_msg *m)
{
    struct smodel *md = &s->models[m->id];
    int is_load = m->type == CTL_LOADED;

    if (!md->used || md->pending <= 0 || (is_load ? !md->loading : !md->unloading)) {
        tp_log(TP_LOG_ERR, "worker rank %d answered a %s of model %llu that it was not sent", r,
               is_load ? "LOAD" : "UNLOAD", (unsigned long long)m->id);
        return;
    }
    s->w[r].loads--;
    s->w[r].done_ns = now_ns(); /* its next job starts now */
    if (m->status != TP_OK) {
        tp_log(TP_LOG_ERR, "worker rank %d failed to load model %llu: %s", r,
               (unsigned long long)m->id, m->text);
        if (md->err.code == TP_OK)
            tp_err_set(&md->err, (enum tp_code)m->status, "rank %d: %.200s", r, m->text);
    }
    if (--md->pending > 0)
        return;
    if (is_load && md->err.code != TP_OK) {
        md->failed = 1;
        send_model(s, (int)m->id, 1); /* from the ranks that loaded it */
        return;
    }
    if (is_load) {
        sup_state_fn fn = md->m.state;
        void *ctx = md->m.ctx;

        md->loading = 0;
        md->loaded = 1;
        md->load_ns = now_ns() - md->load_started_ns;
        s->load_doublings = 0;
        pthread_mutex_unlock(&s->lock);
        fn(ctx, 1);
        pthread_mutex_lock(&s->lock);
        if (md->waiter) {
            md->answered = 1;
            pthread_cond_broadcast(&s->cond);
        }
        return;
    }
    /* unloaded from every rank */
    if (md->failed && md->waiter) {
        md->answered = 1;
        unregister(s, (int)m->id);
    } else if (md->failed) {
        struct tp_err lost = md->err;
        sup_lost_fn fn = md->m.lost;
        void *ctx = md->m.ctx;

        unregister(s, (int)m->id);
        pthread_mutex_unlock(&s->lock);
        fn(ctx, &lost);
        pthread_mutex_lock(&s->lock);
    } else {
        unregister(s, (int)m->id);
    }
}

/* The group is lost: takes it down and, once a group has been ready, schedules a restart; why
 * says what happened (sent to the requests in flight with TP_EUNAVAIL). Called on the supervising
 * thread with the lock held; returns with it held. The table is emptied under the lock, and state
 * G_KILLING turns sup_dispatch away, so the lock is released while the workers are killed and
 * reaped, and around the callbacks. wait_rank (-1: none) is a rank that failed by itself: it gets
 * a second to exit on its own, and its exit status is added to the message. */
static void group_down(struct sup *s, int wait_rank, const struct tp_err *why)
{
    char how[96] = "";
    struct tp_err e = *why;
    int was_ready = s->state == G_READY;

    e.code = TP_EUNAVAIL;
    s->state = G_KILLING;
    s->send_failed = -1;
    take_workers(s);
    pthread_mutex_unlock(&s->lock);
    (void)was_ready;
    reap_workers(s, s->old, wait_rank, how, sizeof(how));
    if (how[0]) {
        size_t n = strlen(e.msg);

        snprintf(e.msg + n, sizeof(e.msg) - n, ", %s", how);
    }
    pthread_mutex_lock(&s->lock);
    if (!s->first_ready) {
        /* never served: no restart, sup_start reports why */
        if (s->fail.code == TP_OK)
            s->fail = e;
        s->state = G_FAILED;
        pthread_cond_broadcast(&s->cond);
        return;
    }
    s->state = G_DOWN;
    models_down(s, &e);
    tp_log(TP_LOG_WARN, "%s; restarting the group in %d ms", e.msg, s->backoff_ms);
    notify_status("not ready: %s; restarting workers in %d ms", e.msg, s->backoff_ms);
    s->restart_at_ms = now_ms() + s->backoff_ms;
    s->backoff_ms = s->backoff_ms * 2 > MAX_BACKOFF_MS ? MAX_BACKOFF_MS : s->backoff_ms * 2;
    pthread_cond_broadcast(&s->cond);
    for (uint32_t slot = 0; slot < s->c.slots; slot++) {
        uint64_t id;
        struct tp_err failed;

        if (!s->jobs[slot].pending)
            continue;
        id = s->jobs[slot].id;
        s->jobs[slot].pending = 0;
        /* a rank that reported its own failure (a device or NCCL error) before the group went
         * down says more than the group's death does */
        failed = s->jobs[slot].err.code != TP_OK ? s->jobs[slot].err : e;
        job_done(s, slot, id, &failed);
    }
}

/* Handles one message from rank r. Called with the lock held; may release it around callbacks. */
static void on_message(struct sup *s, int r, const struct ctl_msg *m)
{
    struct tp_err e = {0};

    if (ctl_validate(m, s->c.slots, s->c.max_batch, &e) < 0 ||
        (m->type != CTL_READY && m->type != CTL_DONE && m->type != CTL_LOADED &&
         m->type != CTL_UNLOADED) ||
        (m->type == CTL_READY && (s->state != G_STARTING || s->w[r].ready))) {
        tp_log(TP_LOG_ERR, "worker rank %d sent a bad control message: %s", r,
               e.msg[0] ? e.msg : "unexpected type");
        tp_err_set(&e, TP_EUNAVAIL, "worker rank %d broke the control protocol", r);
        group_down(s, r, &e);
        return;
    }
    if (m->type == CTL_READY) {
        int64_t took;

        if (m->status != TP_OK) {
            tp_log(TP_LOG_ERR, "worker rank %d failed to start: %s", r, m->text);
            if (s->fail.code == TP_OK)
                tp_err_set(&s->fail, (enum tp_code)m->status, "rank %d: %.200s", r, m->text);
            tp_err_set(&e, TP_EUNAVAIL, "worker rank %d failed to start", r);
            group_down(s, r, &e);
            return;
        }
        s->w[r].ready = 1;
        metrics_worker_up(r, 1);
        for (int i = 0; i < s->c.nranks; i++)
            if (!s->w[i].ready)
                return;
        s->state = G_READY;
        took = now_ns() - s->started_ns;
        if (took > s->load_ns)
            s->load_ns = took;
        s->load_doublings = 0;
        if (s->first_ready) {
            tp_log(TP_LOG_NOTICE, "worker group of %d ranks is up again: loading its models",
                   s->c.nranks);
            notify_status("serving: %d ranks ready again", s->c.nranks);
        }
        s->first_ready = 1;
        s->backoff_ms = s->c.backoff_ms;
        pthread_cond_broadcast(&s->cond);
        /* a restarted group loads every model the last one had, in the order of their ids */
        for (int i = 0; i < CTL_MAX_MODELS; i++)
            if (s->models[i].used && !s->models[i].loading && !s->models[i].unloading)
                send_model(s, i, 0);
        return;
    }
    if (m->type == CTL_LOADED || m->type == CTL_UNLOADED) {
        on_model_answer(s, r, m);
        return;
    }
    /* CTL_DONE */
    {
        struct job *j = &s->jobs[m->slot];
        uint8_t *answered = &s->answered[(size_t)m->slot * (size_t)s->c.nranks + (size_t)r];
        uint64_t id = j->id;
        int64_t now = now_ns(), start;
        double per_row;
        struct tp_err failed;
        struct smodel *md = &s->models[s->owner[m->slot] >= 0 ? s->owner[m->slot] : 0];

        if (!j->pending || j->id != m->id || *answered) {
            tp_log(TP_LOG_ERR, "worker rank %d answered job %llu on slot %u, which %s", r,
                   (unsigned long long)m->id, m->slot,
                   *answered && j->pending && j->id == m->id ? "it had answered already"
                                                             : "is not running");
            return;
        }
        *answered = 1;
        /* the time this rank spent on the job (job_start_ns says when it started) */
        start = j->sent_ns > s->w[r].done_ns ? j->sent_ns : s->w[r].done_ns;
        per_row = (double)(now - start) / (j->rows ? j->rows : 1);
        if (per_row > md->row_ns)
            md->row_ns = per_row;
        s->w[r].done_ns = now;
        if (m->status != TP_OK && j->err.code == TP_OK)
            tp_err_set(&j->err, (enum tp_code)m->status, "rank %d: %.200s", r, m->text);
        if (m->bytes > j->collectives) /* ctl_validate bounds it */
            j->collectives = (uint32_t)m->bytes;
        if (--j->pending > 0)
            return;
        failed = j->err;
        metrics_job_done(m->slot, j->collectives, failed.code == TP_OK);
        job_done(s, m->slot, id, failed.code == TP_OK ? NULL : &failed);
    }
}

/* A job could not be sent to a rank: the rank is gone (its EOF may come too), or its socket
 * failed otherwise. Lock held. */
static void on_send_failed(struct sup *s)
{
    int r = s->send_failed;
    struct tp_err e;

    if (s->send_err.code == TP_EUNAVAIL) {
        tp_err_set(&e, TP_EUNAVAIL, "worker rank %d closed its control socket", r);
        group_down(s, r, &e);
        return;
    }
    tp_err_set(&e, TP_EUNAVAIL, "worker rank %d: sending job %llu: %.180s", r,
               (unsigned long long)s->send_job, s->send_err.msg);
    group_down(s, -1, &e);
}

/* Stops the workers in the table: STOP, then EOF, then a wait of up to 5 s, then SIGKILL. Runs on
 * the thread that spawned the group, since a worker's parent-death signal follows the thread that
 * forked it (PR_SET_PDEATHSIG): the supervising thread's exit would kill a restarted group before
 * it got its STOP. */
static void stop_workers(struct sup *s)
{
    int64_t deadline;

    /* STOP, then EOF: each worker finishes and exits in order. EOF alone would tell a worker
     * that tpd died, and it would leave without its teardown (worker/main.c). The send does not
     * wait (the socket is non-blocking): a worker that no longer reads its socket (stopped, or
     * stuck in a device call) must not hold up the stop; it gets EOF alone, and SIGKILL below if
     * it does not exit. */
    for (int r = 0; s->w && r < s->c.nranks; r++) {
        struct ctl_msg m = {.type = CTL_STOP, .rank = (uint32_t)r};
        struct tp_err e = {0};

        if (s->w[r].fd < 0)
            continue;
        if (ctl_send(s->w[r].fd, &m, &e) < 0)
            tp_log(TP_LOG_WARN, "worker rank %d: sending STOP: %s", r, e.msg);
        close(s->w[r].fd);
        s->w[r].fd = -1;
    }
    deadline = now_ms() + 5000;
    for (int r = 0; s->w && r < s->c.nranks; r++) {
        int status, killed = 0;

        while (s->w[r].pid > 0) {
            pid_t p = waitpid(s->w[r].pid, &status, WNOHANG);

            if (p == s->w[r].pid || (p < 0 && errno != EINTR)) {
                s->w[r].pid = 0;
            } else if (now_ms() > deadline && !killed) {
                tp_log(TP_LOG_WARN, "worker rank %d did not exit, killing it", r);
                kill(s->w[r].pid, SIGKILL);
                killed = 1;
                deadline = now_ms() + REAP_WAIT_MS;
            } else if (now_ms() > deadline) {
                tp_log(TP_LOG_WARN,
                       "worker rank %d pid %d has not exited %d ms after SIGKILL: leaving it "
                       "behind",
                       r, (int)s->w[r].pid, REAP_WAIT_MS);
                s->w[r].pid = 0;
            } else {
                usleep(2000);
            }
        }
    }
    reap_lost(s);
}

static void *sup_thread(void *arg)
{
    struct sup *s = arg;
    struct pollfd *pfd = s->pfd;

    pthread_mutex_lock(&s->lock);
    while (!s->stopping) {
        int n = 1, timeout = -1;
        int64_t at = next_deadline_ns(s);

        pfd[0] = (struct pollfd){.fd = s->wake_fd, .events = POLLIN};
        for (int r = 0; r < s->c.nranks; r++)
            pfd[n++] = (struct pollfd){.fd = s->w[r].fd,
                                       .events = (short)(POLLIN | (s->w[r].bl_len ? POLLOUT : 0))};
        if (at >= 0) {
            int64_t left_ms = (at - now_ns() + NS_PER_MS - 1) / NS_PER_MS;

            timeout = left_ms <= 0 ? 0 : left_ms > INT_MAX ? INT_MAX : (int)left_ms;
        }
        s->sleep_until_ns = at;
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
        if (s->nlost)
            reap_lost(s);
        for (int r = 0; r < s->c.nranks && (s->state == G_STARTING || s->state == G_READY); r++) {
            struct ctl_msg m;
            struct tp_err e = {0};
            short ev = pfd[r + 1].revents;
            int got;

            if (s->w[r].fd < 0 || pfd[r + 1].fd != s->w[r].fd || !ev)
                continue;
            if ((ev & POLLOUT) && s->w[r].bl_len && s->send_failed < 0 &&
                flush_jobs(s, r, &e) < 0) {
                s->send_failed = r;
                uint32_t entry = s->backlog[(size_t)r * s->bl_cap + s->w[r].bl_head];

                s->send_job = entry & (BL_LOAD | BL_UNLOAD) ? 0 : s->jobs[entry].id;
                s->send_err = e;
            }
            if (!(ev & (POLLIN | POLLHUP | POLLERR)))
                continue;
            got = ctl_recv(s->w[r].fd, &m, &e);
            if (got == 1) {
                on_message(s, r, &m);
            } else if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
                continue; /* nothing after all: the socket is non-blocking */
            } else {
                struct tp_err why;

                if (got == 0)
                    tp_err_set(&why, TP_EUNAVAIL, "worker rank %d closed its control socket", r);
                else
                    tp_err_set(&why, TP_EUNAVAIL, "worker rank %d %.200s", r, e.msg);
                group_down(s, r, &why);
            }
        }
        if (s->send_failed >= 0 && s->state == G_READY)
            on_send_failed(s);
        check_deadlines(s);
        if (s->state == G_DOWN && now_ms() >= s->restart_at_ms) {
            struct tp_err e = {0};

            if (start_group(s, &e) < 0) {
                struct tp_err why;

                tp_log(TP_LOG_ERR, "restarting workers: %s", e.msg);
                tp_err_set(&why, TP_EUNAVAIL, "worker group could not be started");
                group_down(s, -1, &why);
            }
        }
    }
    pthread_mutex_unlock(&s->lock);
    stop_workers(s);
    return NULL;
}

int sup_start(struct sup **out, const struct sup_config *c, struct tp_err *err)
{
    struct sup *s = calloc(1, sizeof(*s));
    int e;

    *out = NULL;
    if (!s)
        return tp_err_set(err, TP_ENOMEM, "no memory for the supervisor");
    s->c = *c;
    s->backoff_ms = c->backoff_ms;
    s->sleep_until_ns = -1;
    s->send_failed = -1;
    s->bl_cap = c->slots + 2 * CTL_MAX_MODELS;
    s->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->cond, NULL);
    s->w = calloc((size_t)c->nranks, sizeof(*s->w));
    s->old = calloc((size_t)c->nranks, sizeof(*s->old));
    s->late = calloc((size_t)c->nranks, 1);
    s->cur = calloc((size_t)c->nranks, sizeof(*s->cur));
    s->answered = calloc((size_t)c->slots * (size_t)c->nranks, 1);
    s->backlog = calloc((size_t)s->bl_cap * (size_t)c->nranks, sizeof(*s->backlog));
    s->jobs = calloc(c->slots, sizeof(*s->jobs));
    s->owner = malloc(c->slots * sizeof(*s->owner));
    for (uint32_t i = 0; s->owner && i < c->slots; i++)
        s->owner[i] = -1;
    s->pfd = calloc((size_t)c->nranks + 1, sizeof(*s->pfd));
    for (int r = 0; s->w && r < c->nranks; r++)
        s->w[r] = (struct worker){.fd = -1};
    if (s->wake_fd < 0 || !s->w || !s->old || !s->late || !s->cur || !s->answered || !s->backlog ||
        !s->jobs || !s->owner || !s->pfd) {
        tp_err_sys(err, "creating the supervisor");
        goto fail;
    }
    if (c->job_timeout_ms)
        tp_log(TP_LOG_NOTICE,
               "job timeout: max(%d ms, %d x rows x the time per row), the time per row from each "
               "model's size, then measured once ranks answer",
               c->job_timeout_ms, JOB_SLACK);
    else
        tp_log(TP_LOG_NOTICE, "job timeout: off (--job-timeout-ms 0): a hung rank is not found");
    pthread_mutex_lock(&s->lock);
    if (start_group(s, err) < 0) {
        pthread_mutex_unlock(&s->lock);
        goto fail;
    }
    e = pthread_create(&s->thread, NULL, sup_thread, s);
    if (e != 0) {
        kill_group(s);
        pthread_mutex_unlock(&s->lock);
        tp_err_set(err, TP_ESYS, "cannot start the supervisor thread: %s", strerror(e));
        goto fail;
    }
    s->thread_started = 1;
    while (!s->first_ready && s->state != G_FAILED)
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
    const struct smodel *md;

    pthread_mutex_lock(&s->lock);
    md = slot < s->c.slots && s->owner[slot] >= 0 ? &s->models[s->owner[slot]] : NULL;
    if (s->state != G_READY || s->send_failed >= 0 || !md || !md->loaded) {
        pthread_mutex_unlock(&s->lock);
        return tp_err_set(err, TP_EUNAVAIL, "workers are not ready (restarting)");
    }
    s->jobs[slot] = (struct job){
        .id = id, .pending = s->c.nranks, .rows = rows, .seq = s->next_seq++, .sent_ns = now_ns()};
    memset(&s->answered[(size_t)slot * (size_t)s->c.nranks], 0, (size_t)s->c.nranks);
    /* No rank touches the slot between its jobs: the last DONE of the one before came back. */
    if (md->m.arena->layout.partials)
        __atomic_store_n(shm_slot_sync(md->m.arena, slot - md->m.slot0), 0, __ATOMIC_RELEASE);
    metrics_job_start(slot, rows);
    /* Sent to every rank under the lock, so every rank sees the jobs in the same order: with the
     * NCCL gather each job is a collective, and ranks that issued them in different orders would
     * pair up the wrong all-gathers and hang. A send never waits: a job that does not fit in a
     * rank's socket (the rank is far behind, stopped, or stuck in a device call) waits in its
     * backlog, in order, and the thread sends it when there is room; a stopped rank is found by
     * its job's bound. A send that fails means the rank is gone: no rank gets a job after that,
     * and the thread takes the group down, which fails this job too, so the caller still gets
     * its done callback. */
    for (int r = 0; r < s->c.nranks; r++) {
        struct tp_err e = {0};

        if (send_job(s, r, slot, &e) < 0) {
            s->send_failed = r;
            s->send_job = id;
            s->send_err = e;
            wake(s);
            break;
        }
    }
    /* The thread looks at the deadlines when a rank answers, or when the one it sleeps until
     * comes: if this job's comes first (the thread may sleep without one), it must look again
     * now, or a job that no rank ever answers (every rank stuck, or all of them waiting in a
     * collective for one that is) would never be found late. */
    if (s->c.job_timeout_ms) {
        int64_t due = s->jobs[slot].sent_ns + job_bound_ns(s, slot, rows);

        if (s->sleep_until_ns < 0 || due < s->sleep_until_ns) {
            s->sleep_until_ns = due;
            wake(s);
        }
    }
    pthread_mutex_unlock(&s->lock);
    return 0;
}

void sup_stop(struct sup *s)
{
    if (!s)
        return;
    if (s->thread_started) {
        pthread_mutex_lock(&s->lock);
        s->stopping = 1;
        pthread_cond_broadcast(&s->cond);
        pthread_mutex_unlock(&s->lock);
        wake(s);
        pthread_join(s->thread, NULL); /* it stops the workers on its way out */
    } else {
        stop_workers(s);
    }
    if (s->wake_fd >= 0)
        close(s->wake_fd);
    pthread_mutex_destroy(&s->lock);
    pthread_cond_destroy(&s->cond);
    free(s->w);
    free(s->old);
    free(s->late);
    free(s->cur);
    free(s->answered);
    free(s->backlog);
    free(s->jobs);
    free(s->owner);
    free(s->lost);
    free(s->pfd);
    free(s);
}

int sup_ready(struct sup *s)
{
    int ready;

    pthread_mutex_lock(&s->lock);
    ready = s->state == G_READY;
    pthread_mutex_unlock(&s->lock);
    return ready;
}

int sup_load(struct sup *s, uint32_t id, const struct sup_model *m, struct tp_err *err)
{
    struct smodel *md;
    uint32_t n = m->arena->layout.nslots;

    if (id >= CTL_MAX_MODELS)
        return tp_err_set(err, TP_EINVAL, "model id %u: at most %d models", id, CTL_MAX_MODELS);
    pthread_mutex_lock(&s->lock);
    md = &s->models[id];
    if (md->used || m->slot0 >= s->c.slots || n > s->c.slots - m->slot0 ||
        m->arena->layout.max_batch > s->c.max_batch) {
        pthread_mutex_unlock(&s->lock);
        return tp_err_set(err, TP_EINTERNAL, "model %u: id or slots [%u, +%u) taken or too many", id,
                          m->slot0, n);
    }
    for (uint32_t k = 0; k < n; k++) {
        if (s->owner[m->slot0 + k] >= 0) {
            pthread_mutex_unlock(&s->lock);
            return tp_err_set(err, TP_EINTERNAL, "model %u: slot %u is model %d's", id,
                              m->slot0 + k, s->owner[m->slot0 + k]);
        }
    }
    /* a group coming up (or restarting) is waited for: its models load once it is */
    while (s->state != G_READY && s->state != G_FAILED && !s->stopping)
        pthread_cond_wait(&s->cond, &s->lock);
    if (s->state != G_READY) {
        pthread_mutex_unlock(&s->lock);
        return tp_err_set(err, TP_EUNAVAIL, "the workers are stopping");
    }
    *md = (struct smodel){.used = 1,
                          .waiter = 1,
                          .m = *m,
                          .nslots = n,
                          .row_ns = -1,
                          .prior_row_ns = (s->c.devices ? PRIOR_NS_PER_MAC_GPU
                                                        : PRIOR_NS_PER_MAC_CPU) *
                                          (double)plan_rank_macs(m->plan, s->c.nranks)};
    for (uint32_t k = 0; k < n; k++)
        s->owner[m->slot0 + k] = (int16_t)id;
    send_model(s, (int)id, 0);
    while (!md->answered && !s->stopping)
        pthread_cond_wait(&s->cond, &s->lock);
    md->waiter = 0;
    if (!md->answered || md->err.code != TP_OK) {
        *err = md->answered ? md->err : (struct tp_err){0};
        if (!md->answered) {
            tp_err_set(err, TP_EUNAVAIL, "the workers are stopping");
            unregister(s, (int)id);
        }
        pthread_mutex_unlock(&s->lock);
        return -1;
    }
    md->answered = 0;
    pthread_mutex_unlock(&s->lock);
    return 0;
}

void sup_unload(struct sup *s, uint32_t id)
{
    struct smodel *md;

    if (id >= CTL_MAX_MODELS)
        return;
    pthread_mutex_lock(&s->lock);
    md = &s->models[id];
    /* a reload in progress (after a restart) ends first */
    while (md->used && (md->loading || md->unloading) && !s->stopping)
        pthread_cond_wait(&s->cond, &s->lock);
    if (md->used && md->loaded && s->state == G_READY && !s->stopping) {
        md->loaded = 0;
        md->failed = 0;
        send_model(s, (int)id, 1);
        while (md->used && !s->stopping)
            pthread_cond_wait(&s->cond, &s->lock);
    }
    if (md->used)
        unregister(s, (int)id);
    pthread_mutex_unlock(&s->lock);
}
