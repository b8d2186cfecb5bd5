/* main.c -- tpd, the coordinator. It reads the weights file's header (never the data), creates
 * the shared-memory arena, starts the metrics/health HTTP server, starts one tpd-worker per rank
 * and waits until all have loaded their shards, then serves gRPC and tells systemd READY=1. The
 * main thread then only waits for SIGTERM/SIGINT (blocked in every thread, taken with sigwait),
 * pinging the systemd watchdog while it waits, and then drains: STOPPING=1, stop accepting,
 * finish what is in flight, stop the workers, exit 0. SIGHUP is taken the same way and only
 * logged: tpd reads its flags and configuration file at start only, and logs to stderr, so there
 * is nothing to reload or reopen, and a hangup must not end a server. */
#include <errno.h>
#include <malloc.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <grpc/grpc.h>
#include <grpc/support/log.h>

#include "api.h"
#include "config.h"
#include "log.h"
#include "metrics.h"
#include "model.h"
#include "ncclid.h"
#include "notify.h"
#include "proc.h"
#include "rest.h"
#include "rpc.h"
#include "plan.h"
#include "sched.h"
#include "shm.h"
#include "sup.h"

#define EX_USAGE 64
#define EX_CONFIG 78
#define DRAIN_GRACE_MS 30000
#define MSG_HEADROOM (1L << 20) /* bytes of a message beyond its tensor data */
#define MAX_MSG (1L << 30)      /* the largest gRPC message tpd accepts or sends */

/* Appends ",item" (or "item" first) to a list of a model's layers. */
static void join(char *buf, size_t len, int first, const char *item)
{
    size_t n = strlen(buf);

    snprintf(buf + n, len - n, "%s%s", first ? "" : ",", item);
}

/* Plans the model from the checkpoint's headers and describes it. Returns 0, or an exit status
 * after logging why. */
static int describe_model(const struct config *c, struct plan *p, struct model *m)
{
    struct tp_err err = {0};
    char notes[2048], *line, *save = NULL;
    int64_t split;
    long biggest;

    if (plan_build(p,
                   &(struct plan_request){.weights = c->weights,
                                          .weight = c->weight,
                                          .block = c->block,
                                          .bias = c->bias,
                                          .no_bias = c->no_bias,
                                          .row = c->row,
                                          .layout = (enum plan_layout)c->layout,
                                          .act = (enum plan_act)c->act},
                   notes, sizeof(notes), &err) < 0) {
        tp_log(TP_LOG_ERR, "%s", err.msg);
        return 1;
    }
    for (line = strtok_r(notes, "\n", &save); line; line = strtok_r(NULL, "\n", &save))
        tp_log(TP_LOG_NOTICE, "%s", line);
    *m = (struct model){.in = p->in,
                        .out = p->out,
                        .wdtype = (enum tp_dtype)p->lin[0].w.dtype,
                        .io_dtype = (enum tp_dtype)c->io_dtype,
                        .gemm_dtype = (enum tp_dtype)c->dtype,
                        .ranks = c->ngpus ? c->ngpus : c->cpu,
                        .backend = c->ngpus ? "cuda" : "cpu",
                        .batch_invariant = !c->ngpus && strcmp(c->cpu_gemm, "invariant") == 0,
                        .max_batch = c->max_batch,
                        .plan = p};
    snprintf(m->name, sizeof(m->name), "%s", c->model);
    split = plan_split_size(p, &m->split_what);
    if (plan_split(split, m->ranks, 0, &(int64_t){0}, &(int64_t){0}, &err) < 0) {
        tp_log(TP_LOG_ERR, "the model's %lld %s cannot be split: %s (%s %d)", (long long)split,
               m->split_what, err.msg, c->ngpus ? "--gpus lists" : "--cpu", m->ranks);
        return EX_USAGE;
    }
    plan_split_text(split, m->ranks, m->split, sizeof(m->split));
    if (p->block[0])
        tp_log(TP_LOG_NOTICE,
               "block '%s': %s, hidden %lld, intermediate %lld, activation %s (%s); one "
               "all-reduce per forward",
               p->block, p->kind == PLAN_GATED ? "down(act(gate(x)) * up(x))" : "proj(act(fc(x)))",
               (long long)p->in, (long long)p->inter, plan_act_name((enum plan_act)p->act),
               p->act_why);
    for (uint32_t j = 0; j < p->nlin; j++) {
        const struct plan_linear *l = &p->lin[j];

        m->has_bias |= (int)l->has_bias;
        join(m->weights, sizeof(m->weights), j == 0, l->w.name);
        join(m->biases, sizeof(m->biases), j == 0, l->has_bias ? l->b.name : "");
        join(m->layouts, sizeof(m->layouts), j == 0,
             l->layout == PLAN_CONV1D ? "[in, out]" : "[out, in]");
        tp_log(TP_LOG_NOTICE, "layer: W '%s' %s [%lld, %lld] in %s, stored %s (%s)%s%s, %s; b %s",
               l->w.name, tp_dtype_file_name((enum tp_dtype)l->w.dtype),
               (long long)l->w.shape[0], (long long)l->w.shape[1], l->w.path,
               l->layout == PLAN_CONV1D ? "[in, out]" : "[out, in]", l->layout_why,
               l->tied_from[0] ? ", standing in for " : "", l->tied_from,
               l->split == PLAN_SPLIT_IN ? "inputs split, partial sums all-reduced"
                                         : "outputs split",
               l->has_bias ? l->b.name : "none");
    }
    biggest = (long)(m->in > m->out ? m->in : m->out);
    if ((long)c->max_batch * biggest * 4 > MAX_MSG - MSG_HEADROOM) {
        tp_log(TP_LOG_ERR, "--max-batch %u rows of %ld floats exceed the %ld-byte message limit",
               c->max_batch, biggest, MAX_MSG);
        return EX_USAGE;
    }
    return 0;
}

/* The model could not be loaded again after a restart (its files changed, say): it stays
 * unavailable, and tpd says why. */
static void model_lost(void *ctx, const struct tp_err *why)
{
    (void)ctx;
    tp_log(TP_LOG_ERR, "the model could not be loaded again, and stays unavailable: %s", why->msg);
    notify_status("not ready: the model could not be loaded again: %s", why->msg);
}

/* The workers came up or went down: the health watches are told. */
static void health_changed(void *ctx)
{
    api_health_changed(ctx);
}

/* gRPC's own log lines, in ours: its errors as warnings (tpd reports the failures it acts on
 * itself, with context), the rest at debug. */
static void grpc_log(gpr_log_func_args *a)
{
    tp_log(a->severity == GPR_LOG_SEVERITY_ERROR ? TP_LOG_WARN : TP_LOG_DEBUG, "grpc: %.700s",
           a->message);
}

static int online_cpus(void)
{
    cpu_set_t set;

    if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0)
        return CPU_COUNT(&set);
    return 1;
}

/* The HTTP health endpoints' readiness: the gRPC methods' own rule. */
static int http_ready(void *ctx)
{
    return api_ready(ctx);
}

/* Loading shards can take longer than the watchdog interval; this thread keeps the watchdog fed
 * until the main thread reaches its serving loop, which takes over. */
static struct {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int done;
    uint64_t usec;
} startup = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0};

static void *startup_watchdog(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&startup.lock);
    while (!startup.done) {
        struct timespec ts;

        notify_send("WATCHDOG=1");
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_sec += (time_t)(startup.usec / 2 / 1000000);
        ts.tv_nsec += (long)(startup.usec / 2 % 1000000) * 1000;
        if (ts.tv_nsec >= 1000000000)
            ts.tv_sec++, ts.tv_nsec -= 1000000000;
        pthread_cond_timedwait(&startup.cond, &startup.lock, &ts);
    }
    pthread_mutex_unlock(&startup.lock);
    return NULL;
}

/* Waits for a stop signal; a SIGHUP on the way is logged, and the wait goes on. With a watchdog,
 * wakes every half interval to ping it, after checking that the scheduler's lock can be taken (a
 * deadlocked scheduler then stops the pings and systemd restarts tpd). Returns the signal. */
static int wait_for_stop(const sigset_t *sigs, uint64_t wd_usec, struct sched *sched)
{
    struct timespec ts = {(time_t)(wd_usec / 2 / 1000000), (long)(wd_usec / 2 % 1000000) * 1000};
    int sig;

    for (;;) {
        if (wd_usec)
            sig = sigtimedwait(sigs, NULL, &ts);
        else if (sigwait(sigs, &sig) != 0)
            sig = -1;
        if (sig == SIGHUP) {
            tp_log(TP_LOG_NOTICE,
                   "SIGHUP: nothing to reload, still serving (flags and the configuration file "
                   "are read at start only: restart tpd to change them)");
            continue;
        }
        if (sig > 0)
            return sig;
        if (wd_usec && errno == EAGAIN) {
            (void)sched_busy(sched);
            notify_send("WATCHDOG=1");
        }
    }
}

static void stop_startup_watchdog(int *started, pthread_t t)
{
    if (!*started)
        return;
    pthread_mutex_lock(&startup.lock);
    startup.done = 1;
    pthread_cond_signal(&startup.cond);
    pthread_mutex_unlock(&startup.lock);
    pthread_join(t, NULL);
    *started = 0;
}

int main(int argc, char **argv)
{
    static const char *const level_names[] = {[TP_LOG_ERR] = "err",
                                              [TP_LOG_WARN] = "warn",
                                              [TP_LOG_NOTICE] = "notice",
                                              [TP_LOG_INFO] = "info",
                                              [TP_LOG_DEBUG] = "debug"};
    struct config c;
    struct model m;
    static struct plan plan; /* read by every thread through m.plan */
    struct shm_arena arena = {.fd = -1};
    struct sched *sched = NULL;
    struct sup *sup = NULL;
    struct rpc_server *rpc = NULL;
    struct api api = {.watch_lock = PTHREAD_MUTEX_INITIALIZER};
    struct metrics_server *http = NULL;
    struct rest *rest = NULL;
    struct tp_err err = {0};
    pthread_t wd_thread = 0;
    int wd_started = 0;
    char worker[4096];
    sigset_t sigs;
    int sig, status = 1, threads;

    /* Keep freed memory: large messages otherwise fault in fresh pages on every call. */
    mallopt(M_MMAP_THRESHOLD, 32 << 20);
    mallopt(M_TRIM_THRESHOLD, 1 << 30);
    tp_log_init("tpd", NULL);
    switch (config_parse(&c, argc, argv)) {
    case CONFIG_OK: break;
    case CONFIG_EXIT_OK: return 0;
    case CONFIG_USAGE: return EX_USAGE;
    case CONFIG_BAD_FILE: return EX_CONFIG;
    }
    tp_log_level = (enum tp_log_level)c.log_level;
    if (c.ngpus && c.gather_nccl && !ncclid_available()) {
        tp_log(TP_LOG_ERR, "--gather nccl (the default with --gpus) needs NCCL, and this tpd was "
                           "built without it: use --gather host");
        return EX_USAGE;
    }
    if (c.config)
        tp_log(TP_LOG_NOTICE, "read configuration file %s", c.config);
    notify_status("starting: reading %s", c.weights);
    status = describe_model(&c, &plan, &m);
    if (status)
        return status;
    if (metrics_init(m.name, m.ranks, c.slots, &err) < 0) {
        tp_log(TP_LOG_ERR, "%s", err.msg);
        return 1;
    }
    status = 1;
    if (c.worker)
        snprintf(worker, sizeof(worker), "%s", c.worker);
    else {
        proc_self_dir(worker, sizeof(worker));
        strncat(worker, "tpd-worker", sizeof(worker) - strlen(worker) - 1);
    }
    /* GPU workers need no BLAS threads */
    threads = c.ngpus ? 1 : online_cpus() / c.cpu;
    if (threads < 1)
        threads = 1;

    /* Block the stop signals and SIGHUP before any thread exists, so every thread inherits the
     * mask and only sigwait below takes them. Workers start with an empty mask and default
     * dispositions (proc_spawn). */
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);

    if (shm_arena_create(&arena,
                         &(struct shm_layout){.nslots = c.slots,
                                              .max_batch = c.max_batch,
                                              .in = (uint32_t)m.in,
                                              .out = (uint32_t)m.out,
                                              .partials = plan_reduces(&plan)
                                                              ? (uint32_t)m.ranks
                                                              : 0},
                         &err) < 0)
        goto fail;
    if (sched_create(&sched, &arena,
                     &(struct sched_config){.max_queue = c.max_queue,
                                            .max_queue_bytes = (uint64_t)c.max_queue_mb << 20,
                                            .batch_delay_us = c.batch_delay_us},
                     &err) < 0)
        goto fail;
    sched_set_state_listener(sched, health_changed, &api);
    if (c.ngpus)
        tp_log(TP_LOG_NOTICE,
               "model '%s': in %lld, out %lld, %s weights%s, %s on the wire; %d GPU ranks of %s "
               "%s, %s GEMM%s, gather %s; %u slots of %u rows, batch delay %u us",
               m.name, (long long)m.in, (long long)m.out, tp_dtype_file_name(m.wdtype),
               m.has_bias ? " with bias" : ", no bias", tp_dtype_wire_name(m.io_dtype), m.ranks,
               m.split, m.split_what, tp_dtype_wire_name((enum tp_dtype)c.dtype),
               c.tf32 ? " (TF32)" : "", c.gather_nccl ? "nccl" : "host", c.slots, c.max_batch,
               c.batch_delay_us);
    else
        tp_log(TP_LOG_NOTICE,
               "model '%s': in %lld, out %lld, %s weights%s, %s on the wire; %d cpu ranks of %s "
               "%s, %d threads each, %s GEMM; %u slots of %u rows, batch delay %u us",
               m.name, (long long)m.in, (long long)m.out, tp_dtype_file_name(m.wdtype),
               m.has_bias ? " with bias" : ", no bias", tp_dtype_wire_name(m.io_dtype), c.cpu,
               m.split, m.split_what, threads, c.cpu_gemm, c.slots, c.max_batch,
               c.batch_delay_us);
    metrics_set_pending(sched_pending, sched);
    /* Health answers 503 while the shards load; a busy address fails here, before any worker. */
    if (c.metrics_listen &&
        metrics_server_start(&http, c.metrics_listen, http_ready, &api, &err) < 0)
        goto fail;
    /* Bind before starting workers, so that a bad --listen fails at once. */
    grpc_init();
    gpr_set_log_function(grpc_log);
    api.model = &m;
    api.sched = sched;
    api.batch_delay_us = c.batch_delay_us;
    if (shmreg_create(&api.shm, &err) < 0)
        goto fail_grpc;
    /* bodies: the binary input with headroom, or its JSON text, at most 32 bytes a number */
    if (c.http_listen &&
        rest_start(&rest,
                   &(struct rest_config){
                       .listen = c.http_listen,
                       .api = &api,
                       .max_body = (uint64_t)c.max_batch * (uint64_t)m.in * 32 + MSG_HEADROOM,
                       .max_buffered = (uint64_t)c.max_queue_mb << 20,
                       .reply_timeout_ms = c.reply_timeout_ms ? c.reply_timeout_ms : 30000,
                       .threads = online_cpus() < 4 ? 2 : 4,
                       .tls_cert = c.tls_cert,
                       .tls_key = c.tls_key,
                       .tls_client_ca = c.tls_client_ca},
                   &err) < 0)
        goto fail_grpc;
    if (rpc_server_create(
            &rpc,
            &(struct rpc_config){.listen = c.listen,
                                 .nlisten = c.nlisten,
                                 .threads = c.grpc_threads,
                                 .max_recv = (long)c.max_batch * m.in * 4 + MSG_HEADROOM,
                                 .max_send = (long)c.max_batch * m.out * 4 + MSG_HEADROOM,
                                 .reply_timeout_ms = c.reply_timeout_ms,
                                 /* the queue's bytes and half as much again in transit */
                                 .memory_bytes = ((long)c.max_queue_mb << 20) * 3 / 2,
                                 .tls_cert = c.tls_cert,
                                 .tls_key = c.tls_key,
                                 .tls_client_ca = c.tls_client_ca,
                                 .socket_mode = c.socket_mode},
            api_methods, api_nmethods, &api, &err) < 0)
        goto fail_grpc;
    startup.usec = notify_watchdog_usec();
    if (startup.usec) {
        int e = pthread_create(&wd_thread, NULL, startup_watchdog, NULL);

        /* not fatal: loading may still fit in the watchdog's interval */
        if (e != 0)
            tp_log(TP_LOG_WARN, "cannot start the startup watchdog thread: %s", strerror(e));
        wd_started = e == 0;
    }
    if (sup_start(&sup,
                  &(struct sup_config){.worker = worker,
                                       .backend = m.backend,
                                       .nranks = m.ranks,
                                       .devices = c.ngpus ? c.gpus : NULL,
                                       .gather_nccl = c.gather_nccl,
                                       .dtype = c.dtype == TP_BF16  ? "bf16"
                                                : c.dtype == TP_F16 ? "fp16"
                                                                    : "fp32",
                                       .tf32 = c.tf32,
                                       .cpu_gemm = c.ngpus ? NULL : c.cpu_gemm,
                                       .threads = threads,
                                       .slots = c.slots,
                                       .max_batch = c.max_batch,
                                       .backoff_ms = c.restart_backoff_ms,
                                       .job_timeout_ms = c.job_timeout_ms,
                                       .log_level = level_names[c.log_level]},
                  &err) < 0) {
        tp_err_prefix(&err, "starting workers: ");
        goto fail_grpc;
    }
    sched_attach(sched, sup);
    if (sup_load(sup, 0,
                 &(struct sup_model){.plan = &plan,
                                     .arena = &arena,
                                     .slot0 = 0,
                                     .done = sched_on_done,
                                     .state = sched_on_state,
                                     .lost = model_lost,
                                     .ctx = sched},
                 &err) < 0) {
        tp_err_prefix(&err, "starting workers: ");
        goto fail_grpc;
    }
    if (rpc_server_start(rpc, &err) < 0)
        goto fail_grpc;
    atomic_store(&api.serving, 1);
    api_health_changed(&api);
    for (int i = 0; i < c.nlisten; i++)
        tp_log(TP_LOG_NOTICE, "ready: serving '%s' on %s", m.name, c.listen[i]);
    notify_send("READY=1");
    notify_status("serving '%s' with %d ranks on %s", m.name, m.ranks, c.listen[0]);
    stop_startup_watchdog(&wd_started, wd_thread);

    sig = wait_for_stop(&sigs, startup.usec, sched);
    tp_log(TP_LOG_NOTICE, "%s: draining %u requests, then stopping", strsignal(sig),
           sched_busy(sched));
    notify_send("STOPPING=1");
    notify_status("draining %u requests", sched_busy(sched));
    atomic_store(&api.draining, 1);
    api_end_watches(&api); /* so that open watches do not hold the drain up */
    rest_quiesce(rest);
    rpc_server_stop(rpc, DRAIN_GRACE_MS);
    rpc = NULL;
    status = 0;
fail_grpc:
    if (rpc)
        rpc_server_stop(rpc, 0);
    rpc = NULL;
    /* grpc_shutdown() is left out on purpose: every call and the server are gone by now, but it
     * can wait up to 10 s for gRPC's pollers to notice client connections that are still open,
     * and the process is about to exit anyway. */
fail:
    stop_startup_watchdog(&wd_started, wd_thread);
    if (status)
        tp_log(TP_LOG_ERR, "%s", err.msg);
    rest_stop(rest, DRAIN_GRACE_MS);
    metrics_server_stop(http);
    sup_stop(sup);
    sched_destroy(sched);
    shmreg_destroy(api.shm);
    shm_arena_destroy(&arena);
    if (status == 0)
        tp_log(TP_LOG_NOTICE, "stopped");
    return status;
}
