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
#include <unistd.h>

#include <grpc/grpc.h>
#include <grpc/support/log.h>

#if defined(__SANITIZE_ADDRESS__)
#define TP_LEAK_CHECK 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define TP_LEAK_CHECK 1
#endif
#endif
#ifdef TP_LEAK_CHECK
#include <sanitizer/lsan_interface.h>
#endif

#include "api.h"
#include "config.h"
#include "log.h"
#include "metrics.h"
#include "model.h"
#include "ncclid.h"
#include "notify.h"
#include "plan.h"
#include "proc.h"
#include "repo.h"
#include "rest.h"
#include "rpc.h"
#include "sched.h"
#include "shm.h"
#include "sup.h"

#define EX_USAGE 64
#define EX_CONFIG 78
#define DRAIN_GRACE_MS 30000
#define MSG_HEADROOM (1L << 20) /* bytes of a message beyond its tensor data */
#define MAX_MSG (1L << 30)      /* the largest gRPC message tpd accepts or sends */

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
 * wakes every half interval to ping it, after checking that the models' and their schedulers'
 * locks can be taken (a deadlock then stops the pings and systemd restarts tpd). Returns the
 * signal. */
static int wait_for_stop(const sigset_t *sigs, uint64_t wd_usec, struct repo *repo)
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
            (void)repo_busy(repo);
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

/* The HTTP health endpoints' model readiness: the gRPC methods' own rule. */
static int http_model_ready(void *ctx, const char *name)
{
    struct api *a = ctx;
    int r = repo_ready(a->repo, name, "");

    return r < 0 ? -1 : r && api_ready(a);
}

/* Every model a repository model's file leaves out takes these: the command line's flags. */
static struct repo_conf flag_conf(const struct config *c)
{
    struct repo_conf f = {.no_bias = c->no_bias,
                          .row = c->row,
                          .layout = c->layout,
                          .act = c->act,
                          .io_dtype = c->io_dtype,
                          .max_batch = c->max_batch,
                          .slots = c->slots,
                          .max_queue = c->max_queue,
                          .max_queue_mb = c->max_queue_mb,
                          .batch_delay_us = c->batch_delay_us};

    snprintf(f.name, sizeof(f.name), "%s", c->model);
    snprintf(f.weight, sizeof(f.weight), "%s", c->weight ? c->weight : "weight");
    if (c->weights)
        snprintf(f.weights, sizeof(f.weights), "%s", c->weights);
    if (c->bias)
        snprintf(f.bias, sizeof(f.bias), "%s", c->bias);
    if (c->block)
        snprintf(f.block, sizeof(f.block), "%s", c->block);
    return f;
}

/* Whether the model called name is to be loaded at start: every model without explicit control,
 * else the --load-model ones. */
static int load_at_start(const struct config *c, const char *name)
{
    if (!c->control_explicit || !c->repository)
        return 1;
    for (int i = 0; i < c->nload; i++)
        if (strcmp(c->load[i], "*") == 0 || strcmp(c->load[i], name) == 0)
            return 1;
    return 0;
}

/* Loads the models to load at start, one after the other. The one model of --weights must load:
 * 1 (the exit status) when it does not; a repository's models fail on their own, each logged. */
static int load_models(const struct config *c, struct repo *repo)
{
    struct repo_entry *e = NULL;
    struct tp_err err = {0};
    size_t n = 0;
    int loaded = 0;

    if (repo_index(repo, &e, &n) < 0) {
        tp_log(TP_LOG_ERR, "no memory for the model index");
        return 1;
    }
    for (int i = 0; i < c->nload; i++) {
        int found = strcmp(c->load[i], "*") == 0;

        for (size_t k = 0; k < n && !found; k++)
            found = strcmp(e[k].name, c->load[i]) == 0;
        if (!found)
            tp_log(TP_LOG_ERR, "--load-model %s: no such model in %s", c->load[i], c->repository);
    }
    for (size_t k = 0; k < n; k++) {
        if (!load_at_start(c, e[k].name))
            continue;
        notify_status("starting: loading model '%s'", e[k].name);
        if (repo_load(repo, e[k].name, &err) == 0) {
            loaded++;
        } else if (!c->repository) {
            tp_err_prefix(&err, "starting workers: ");
            tp_log(TP_LOG_ERR, "%s", err.msg);
            free(e);
            return 1;
        }
    }
    free(e);
    if (c->repository)
        tp_log(TP_LOG_NOTICE, "model repository %s: %zu models, %d loaded at start%s",
               c->repository, n, loaded, c->control_explicit ? " (explicit model control)" : "");
    return 0;
}

int main(int argc, char **argv)
{
    static const char *const level_names[] = {[TP_LOG_ERR] = "err",
                                              [TP_LOG_WARN] = "warn",
                                              [TP_LOG_NOTICE] = "notice",
                                              [TP_LOG_INFO] = "info",
                                              [TP_LOG_DEBUG] = "debug"};
    struct config c;
    struct repo *repo = NULL;
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
    int sig, status = 1, threads, ranks;
    uint64_t max_in, max_out;
    struct repo_conf one;

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
    notify_status("starting: reading %s", c.repository ? c.repository : c.weights);
    ranks = c.ngpus ? c.ngpus : c.cpu;
    if (repo_create(&repo,
                    &(struct repo_config){.dir = c.repository,
                                          .backend = c.ngpus ? "cuda" : "cpu",
                                          .ranks = ranks,
                                          .batch_invariant =
                                              !c.ngpus && strcmp(c.cpu_gemm, "invariant") == 0,
                                          .gemm_dtype = (enum tp_dtype)c.dtype,
                                          .split_flag = c.ngpus ? "--gpus lists" : "--cpu",
                                          .control_explicit = c.control_explicit,
                                          .defaults = flag_conf(&c),
                                          .state_changed = health_changed,
                                          .state_ctx = &api},
                    &err) < 0 ||
        (status = repo_add(repo, c.repository ? NULL : (one = flag_conf(&c), &one), &err)) < 0) {
        tp_log(TP_LOG_ERR, "%s", err.msg);
        repo_destroy(repo);
        return status == -2 ? EX_USAGE : 1;
    }
    status = 1;
    repo_limits(repo, &max_in, &max_out);
    if (metrics_init(ranks, REPO_MAX_SLOTS, &err) < 0) {
        tp_log(TP_LOG_ERR, "%s", err.msg);
        repo_destroy(repo);
        return 1;
    }
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
    if (c.ngpus)
        tp_log(TP_LOG_NOTICE, "%d GPU ranks, %s GEMM%s, gather %s", ranks,
               tp_dtype_wire_name((enum tp_dtype)c.dtype), c.tf32 ? " (TF32)" : "",
               c.gather_nccl ? "nccl" : "host");
    else
        tp_log(TP_LOG_NOTICE, "%d cpu ranks, %d threads each, %s GEMM", ranks, threads, c.cpu_gemm);
    metrics_set_pending(repo_pending, repo);
    api.repo = repo;
    /* Health answers 503 while the shards load; a busy address fails here, before any worker. */
    if (c.metrics_listen &&
        metrics_server_start(&http, c.metrics_listen, http_ready, http_model_ready, &api, &err) < 0)
        goto fail;
    /* Bind before starting workers, so that a bad --listen fails at once. */
    grpc_init();
    gpr_set_log_function(grpc_log);
    if (shmreg_create(&api.shm, &err) < 0)
        goto fail_grpc;
    /* bodies: the binary input with headroom, or its JSON text, at most 32 bytes a number; the
     * largest model of the repository sets the limits */
    if (c.http_listen &&
        rest_start(&rest,
                   &(struct rest_config){.listen = c.http_listen,
                                         .api = &api,
                                         .max_body = max_in * 8 + MSG_HEADROOM,
                                         .max_buffered = (uint64_t)c.max_queue_mb << 20,
                                         .reply_timeout_ms =
                                             c.reply_timeout_ms ? c.reply_timeout_ms : 30000,
                                         .threads = online_cpus() < 4 ? 2 : 4,
                                         .tls_cert = c.tls_cert,
                                         .tls_key = c.tls_key,
                                         .tls_client_ca = c.tls_client_ca},
                   &err) < 0)
        goto fail_grpc;
    if (rpc_server_create(
            &rpc,
            &(struct rpc_config){
                .listen = c.listen,
                .nlisten = c.nlisten,
                .threads = c.grpc_threads,
                .max_recv = (long)(max_in > MAX_MSG ? MAX_MSG : max_in) + MSG_HEADROOM,
                .max_send = (long)(max_out > MAX_MSG ? MAX_MSG : max_out) + MSG_HEADROOM,
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
                                       .backend = c.ngpus ? "cuda" : "cpu",
                                       .nranks = ranks,
                                       .devices = c.ngpus ? c.gpus : NULL,
                                       .gather_nccl = c.gather_nccl,
                                       .dtype = c.dtype == TP_BF16  ? "bf16"
                                                : c.dtype == TP_F16 ? "fp16"
                                                                    : "fp32",
                                       .tf32 = c.tf32,
                                       .cpu_gemm = c.ngpus ? NULL : c.cpu_gemm,
                                       .threads = threads,
                                       .slots = REPO_MAX_SLOTS,
                                       .max_batch = 1 << 20,
                                       .backoff_ms = c.restart_backoff_ms,
                                       .job_timeout_ms = c.job_timeout_ms,
                                       .log_level = level_names[c.log_level]},
                  &err) < 0) {
        tp_err_prefix(&err, "starting workers: ");
        goto fail_grpc;
    }
    repo_attach(repo, sup);
    api.sup = sup;
    if (load_models(&c, repo) != 0) {
        status = 1;
        err.msg[0] = '\0';
        goto fail_grpc;
    }
    if (rpc_server_start(rpc, &err) < 0)
        goto fail_grpc;
    atomic_store(&api.serving, 1);
    api_health_changed(&api);
    for (int i = 0; i < c.nlisten; i++)
        tp_log(TP_LOG_NOTICE, "ready: serving %s%s%s on %s", c.repository ? "the models of " : "'",
               c.repository ? c.repository : c.model, c.repository ? "" : "'", c.listen[i]);
    notify_send("READY=1");
    notify_status("serving %s%s%s with %d ranks on %s", c.repository ? "the models of " : "'",
                  c.repository ? c.repository : c.model, c.repository ? "" : "'", ranks,
                  c.listen[0]);
    stop_startup_watchdog(&wd_started, wd_thread);

    sig = wait_for_stop(&sigs, startup.usec, repo);
    tp_log(TP_LOG_NOTICE, "%s: draining %u requests, then stopping", strsignal(sig),
           repo_busy(repo));
    notify_send("STOPPING=1");
    notify_status("draining %u requests", repo_busy(repo));
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
    if (status && err.msg[0])
        tp_log(TP_LOG_ERR, "%s", err.msg);
    rest_stop(rest, DRAIN_GRACE_MS);
    metrics_server_stop(http);
    api_control_wait(&api); /* a load or unload still running ends first */
    repo_destroy(repo);     /* before the workers stop: each model is unloaded from them */
    sup_stop(sup);
    shmreg_destroy(api.shm);
    if (status == 0)
        tp_log(TP_LOG_NOTICE, "stopped");
    /* gRPC's own threads (its timers, its executor) still run, grpc_shutdown being left out
     * (above): returning from main would run the libraries' exit handlers and static destructors
     * under them, which is a known source of aborts at exit. Everything of tpd's has stopped and
     * its log is written, so the process ends here, after the leak check that a sanitized build
     * runs at exit. */
    fflush(NULL);
#ifdef TP_LEAK_CHECK
    __lsan_do_leak_check();
#endif
    _exit(status);
}
