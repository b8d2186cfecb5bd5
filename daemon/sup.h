/* sup.h -- the supervisor of the worker group. It starts one tpd-worker per rank (fork+exec, each
 * with its control socket and the arena fd), waits for every READY, hands out jobs, and collects
 * DONE messages on its own thread. A worker that dies takes the whole group down (a collective
 * communicator cannot survive a lost member): every job in flight fails with TP_EUNAVAIL, the
 * other workers are killed, and the group is started again after a backoff that doubles up to
 * 30 s and resets once a group is ready. Every worker gets the layer's plan as its first message,
 * the same plan at every start, so a restarted worker checks its files against what tpd read at
 * start and refuses weights that changed since. With the NCCL gather every group start gets a new unique
 * id (ncclid.h), sent to each worker in an INIT message right after it is spawned. A rank that
 * stops answering without dying (stopped, or stuck in a device call) is found by a bound on the
 * time a job may take (job_timeout_ms, scaled up for long jobs) and takes the group down the same
 * way; so does a restarted rank that does not finish loading in time. Nothing waits on a worker
 * meanwhile: jobs that do not fit in a rank's control socket wait in tpd. */
#ifndef TPD_SUP_H
#define TPD_SUP_H

#include <stdint.h>

#include "err.h"
#include "plan.h"
#include "shm.h"

struct sup;

struct sup_config {
    const char *worker;  /* worker executable */
    const struct plan *plan; /* sent to every worker at every start; stays the caller's */
    const char *backend; /* "cpu" or "cuda" */
    int nranks;
    int threads; /* BLAS threads per rank */
    uint32_t slots, max_batch;
    const struct shm_arena *arena; /* its fd is passed to every worker; stays the caller's */
    int backoff_ms;        /* first restart delay */
    const char *log_level; /* passed to the workers */
    const int *devices;    /* cuda: the GPU of each rank (nranks entries); NULL for cpu */
    int gather_nccl;       /* cuda: all-gather with NCCL; a fresh unique id per group start */
    const char *dtype;     /* cuda: "fp32", "fp16" or "bf16"; NULL for cpu */
    int tf32;              /* cuda: FP32 GEMMs may use TF32 */
    const char *cpu_gemm;  /* cpu: "invariant" or "openblas"; NULL for cuda */
    int job_timeout_ms;    /* least time a rank may take over a job (more for long jobs, sup.c
                            * says how) and a restarted group over its load; 0: no bound */
};

/* Called on the supervisor's thread, with no lock held, when every rank has finished job id on
 * slot (err NULL), or when it failed (err says why; TP_EUNAVAIL when the group died). */
typedef void (*sup_done_fn)(void *ctx, uint32_t slot, uint64_t id, const struct tp_err *err);

/* Called on the supervisor's thread when the group becomes ready (1) or stops being ready (0). */
typedef void (*sup_state_fn)(void *ctx, int ready);

/* Starts the workers and the supervisor's thread, then waits until every rank is READY. Fails,
 * with everything stopped, if a worker cannot start or reports a load error before the first
 * READY. On success *s is owned by the caller (sup_stop). */
int sup_start(struct sup **s, const struct sup_config *c, sup_done_fn done, sup_state_fn state,
              void *ctx, struct tp_err *err);

/* Sends job id (rows of slot) to every rank, after zeroing the slot's arrival counter when the
 * ranks reduce (shm_slot_sync). Any thread; never waits on a worker. Fails with
 * TP_EUNAVAIL when the group is not ready; then no done callback will come for this job. */
int sup_dispatch(struct sup *s, uint32_t slot, uint64_t id, uint32_t rows, struct tp_err *err);

/* Stops the thread and the workers: sends each worker STOP and closes its control socket (a
 * worker that sees EOF without STOP takes tpd for dead: ctl.h), waits up to 5 s, then kills what
 * is left and reaps everything. Takes NULL. */
void sup_stop(struct sup *s);

#endif
