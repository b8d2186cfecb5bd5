/* main.c -- tpd, the coordinator. It reads the weights file's header (never the data), creates
 * the shared-memory arena, starts one tpd-worker per rank and waits until all have loaded their
 * shards, then serves gRPC. The main thread only waits for SIGTERM/SIGINT (blocked in every
 * thread, taken with sigwait) and then drains: stop accepting, finish what is in flight, stop the
 * workers, exit 0. */
#include <malloc.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <grpc/grpc.h>
#include <grpc/support/log.h>

#include "api.h"
#include "config.h"
#include "log.h"
#include "model.h"
#include "proc.h"
#include "rpc.h"
#include "safetensors.h"
#include "sched.h"
#include "shm.h"
#include "sup.h"

#define EX_USAGE 64
#define DRAIN_GRACE_MS 30000
#define MSG_HEADROOM (1L << 20) /* bytes of a message beyond its tensor data */
#define MAX_MSG (1L << 30)      /* the largest gRPC message tpd accepts or sends */

/* Describes the layer from the file's header: shapes, dtype, bias. Returns 0, or an exit status. */
static int describe_model(const struct config *c, struct model *m, const char **bias)
{
    struct st_file f = {.fd = -1};
    const struct st_tensor *w, *b;
    struct tp_err err = {0};
    int status = 1;

    if (st_open(&f, c->weights, &err) < 0) {
        tp_log(TP_LOG_ERR, "%s", err.msg);
        return 1;
    }
    w = st_find(&f, c->weight);
    if (!w) {
        tp_log(TP_LOG_ERR, "%s has no tensor '%s' (use --weight NAME)", c->weights, c->weight);
        goto out;
    }
    if (w->ndim != 2 || w->shape[0] < 1 || w->shape[1] < 1 || w->shape[0] > UINT32_MAX ||
        w->shape[1] > UINT32_MAX) {
        tp_log(TP_LOG_ERR, "tensor '%s' in %s must be 2-d [out, in]", c->weight, c->weights);
        goto out;
    }
    b = st_find(&f, c->bias);
    if (!b && c->bias_explicit) {
        tp_log(TP_LOG_ERR, "%s has no tensor '%s' (given with --bias)", c->weights, c->bias);
        goto out;
    }
    if (b && (b->ndim != 1 || b->shape[0] != w->shape[0])) {
        tp_log(TP_LOG_ERR, "bias '%s' in %s has the wrong shape: expected [%lld]", c->bias,
               c->weights, (long long)w->shape[0]);
        goto out;
    }
    *m = (struct model){.in = w->shape[1],
                        .out = w->shape[0],
                        .wdtype = w->dtype,
                        .has_bias = b != NULL,
                        .ranks = c->cpu,
                        .backend = "cpu",
                        .max_batch = c->max_batch};
    snprintf(m->name, sizeof(m->name), "%s", c->model);
    *bias = b ? c->bias : NULL;
    if (m->out % c->cpu != 0) {
        tp_log(TP_LOG_ERR, "out %lld is not divisible by %d ranks (--cpu %d)", (long long)m->out,
               c->cpu, c->cpu);
        status = EX_USAGE;
        goto out;
    }
    if ((long)c->max_batch * (long)(m->in > m->out ? m->in : m->out) * 4 > MAX_MSG - MSG_HEADROOM) {
        tp_log(TP_LOG_ERR, "--max-batch %u rows of %lld floats exceed the %ld-byte message limit",
               c->max_batch, (long long)(m->in > m->out ? m->in : m->out), MAX_MSG);
        status = EX_USAGE;
        goto out;
    }
    status = 0;
out:
    st_close(&f);
    return status;
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

int main(int argc, char **argv)
{
    static const char *const level_names[] = {[TP_LOG_ERR] = "err",
                                              [TP_LOG_WARN] = "warn",
                                              [TP_LOG_NOTICE] = "notice",
                                              [TP_LOG_INFO] = "info",
                                              [TP_LOG_DEBUG] = "debug"};
    struct config c;
    struct model m;
    struct shm_arena arena = {.fd = -1};
    struct sched *sched = NULL;
    struct sup *sup = NULL;
    struct rpc_server *rpc = NULL;
    struct api api = {0};
    struct tp_err err = {0};
    char worker[4096];
    const char *bias = NULL;
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
    }
    tp_log_level = (enum tp_log_level)c.log_level;
    status = describe_model(&c, &m, &bias);
    if (status)
        return status;
    status = 1;
    if (c.worker)
        snprintf(worker, sizeof(worker), "%s", c.worker);
    else {
        proc_self_dir(worker, sizeof(worker));
        strncat(worker, "tpd-worker", sizeof(worker) - strlen(worker) - 1);
    }
    threads = online_cpus() / c.cpu;
    if (threads < 1)
        threads = 1;

    /* Block the stop signals before any thread exists, so every thread inherits the mask and
     * only sigwait below takes them. Workers unblock them in proc_spawn. */
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);

    if (shm_arena_create(&arena,
                         &(struct shm_layout){.nslots = c.slots,
                                              .max_batch = c.max_batch,
                                              .in = (uint32_t)m.in,
                                              .out = (uint32_t)m.out},
                         &err) < 0)
        goto fail;
    if (sched_create(&sched, &arena, c.max_queue, &err) < 0)
        goto fail;
    tp_log(TP_LOG_NOTICE,
           "model '%s': in %lld, out %lld, %s weights%s; %d cpu ranks of %lld rows, %d BLAS "
           "threads each; %u slots of %u rows",
           m.name, (long long)m.in, (long long)m.out, tp_dtype_file_name(m.wdtype),
           m.has_bias ? " with bias" : ", no bias", c.cpu, (long long)(m.out / c.cpu), threads,
           c.slots, c.max_batch);
    /* Bind before starting workers, so that a bad --listen fails at once. */
    grpc_init();
    gpr_set_log_function(grpc_log);
    api.model = &m;
    api.sched = sched;
    if (rpc_server_create(
            &rpc,
            &(struct rpc_config){.listen = c.listen,
                                 .nlisten = c.nlisten,
                                 .threads = c.grpc_threads,
                                 .max_recv = (long)c.max_batch * m.in * 4 + MSG_HEADROOM,
                                 .max_send = (long)c.max_batch * m.out * 4 + MSG_HEADROOM,
                                 .tls_cert = c.tls_cert,
                                 .tls_key = c.tls_key,
                                 .tls_client_ca = c.tls_client_ca,
                                 .socket_mode = c.socket_mode},
            api_methods, api_nmethods, &api, &err) < 0)
        goto fail_grpc;
    if (sup_start(&sup,
                  &(struct sup_config){.worker = worker,
                                       .weights = c.weights,
                                       .weight = c.weight,
                                       .bias = bias,
                                       .backend = "cpu",
                                       .nranks = c.cpu,
                                       .threads = threads,
                                       .slots = c.slots,
                                       .max_batch = c.max_batch,
                                       .arena_fd = arena.fd,
                                       .backoff_ms = c.restart_backoff_ms,
                                       .log_level = level_names[c.log_level]},
                  sched_on_done, sched_on_state, sched, &err) < 0) {
        tp_err_prefix(&err, "starting workers: ");
        goto fail_grpc;
    }
    sched_attach(sched, sup);
    sched_on_state(sched, 1);
    if (rpc_server_start(rpc, &err) < 0)
        goto fail_grpc;
    for (int i = 0; i < c.nlisten; i++)
        tp_log(TP_LOG_NOTICE, "ready: serving '%s' on %s", m.name, c.listen[i]);

    while (sigwait(&sigs, &sig) != 0)
        ;
    tp_log(TP_LOG_NOTICE, "%s: draining %u requests, then stopping", strsignal(sig),
           sched_busy(sched));
    atomic_store(&api.draining, 1);
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
    if (status)
        tp_log(TP_LOG_ERR, "%s", err.msg);
    sup_stop(sup);
    sched_destroy(sched);
    shm_arena_destroy(&arena);
    if (status == 0)
        tp_log(TP_LOG_NOTICE, "stopped");
    return status;
}
