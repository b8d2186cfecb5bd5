/* sup.h -- the supervisor of the worker group. It starts one tpd-worker per rank (fork+exec, each
 * with its control socket), waits for every READY, then loads models into it and hands out
 * jobs, and collects the answers on its own thread. Every rank serves every loaded model: a
 * model is loaded by a LOAD to each rank (with the model's plan and its arena's fd) and is ready
 * once every rank has answered LOADED; the slots of all models share one numbering, each model
 * owning a range, so a job names only its slot. A model that fails to load on any rank is
 * unloaded from the others and reported; the group and the other models go on. A worker that
 * dies takes the whole group down (a collective communicator cannot survive a lost member):
 * every job in flight fails with TP_EUNAVAIL, the other workers are killed, and the group is
 * started again after a backoff that doubles up to 30 s and resets once a group is ready; every
 * loaded model is then loaded again, by the same plan, so a restarted worker checks its files
 * against what tpd read and refuses weights that changed since (that model fails; the others
 * come back). With the NCCL gather every group start gets a new unique id (ncclid.h), sent to
 * each worker in an INIT message right after it is spawned. A rank that stops answering without
 * dying (stopped, or stuck in a device call) is found by a bound on the time a job may take
 * (job_timeout_ms, scaled up for long jobs) and takes the group down the same way; so does a
 * restarted rank that does not come up, or reload a model, in time. Nothing waits on a worker
 * meanwhile: messages that do not fit in a rank's control socket wait in tpd, in order. */
#ifndef TPD_SUP_H
#define TPD_SUP_H

#include <stdint.h>

#include "err.h"
#include "plan.h"
#include "shm.h"

struct sup;

struct sup_config {
    const char *worker;  /* worker executable */
    const char *backend; /* "cpu" or "cuda" */
    int nranks;
    int threads; /* BLAS threads per rank */
    uint32_t slots;     /* the slots of all models together, at most */
    uint32_t max_batch; /* the most rows of any model's job */
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
 * the model's slot (its own number, from 0; err NULL), or when it failed (err says why;
 * TP_EUNAVAIL when the group died). */
typedef void (*sup_done_fn)(void *ctx, uint32_t slot, uint64_t id, const struct tp_err *err);

/* Called on the supervisor's thread, with no lock held, when a model becomes ready (1: loaded on
 * every rank) or stops being ready (0: the group went down; it comes back once reloaded). */
typedef void (*sup_state_fn)(void *ctx, int ready);

/* Called when a loaded model could not be loaded again after a restart: it is unloaded for good,
 * why says why. */
typedef void (*sup_lost_fn)(void *ctx, const struct tp_err *why);

/* A model to load. Everything stays the caller's until sup_unload returns. */
struct sup_model {
    const struct plan *plan;
    const struct shm_arena *arena; /* its fd goes to every worker */
    uint32_t slot0;                /* its slots: [slot0, slot0 + arena->layout.nslots) */
    sup_done_fn done;
    sup_state_fn state;
    sup_lost_fn lost;
    void *ctx;
};

/* Starts the workers and the supervisor's thread, then waits until every rank is READY. Fails,
 * with everything stopped, if a worker cannot start or reports an error before the first READY.
 * On success *s is owned by the caller (sup_stop). */
int sup_start(struct sup **s, const struct sup_config *c, struct tp_err *err);

/* Loads model id (< CTL_MAX_MODELS, not loaded) on every rank and waits until each has answered:
 * 0 once it is ready (its state callback has said 1), or -1 with the first rank's reason (the
 * model is then unloaded from every rank again). Any thread but the supervisor's. */
int sup_load(struct sup *s, uint32_t id, const struct sup_model *m, struct tp_err *err);

/* Unloads model id from every rank and waits until each has freed it (or the group is gone).
 * The caller has no job of the model in flight. */
void sup_unload(struct sup *s, uint32_t id);

/* The group is up: every rank READY (models aside). */
int sup_ready(struct sup *s);

/* Sends job id (rows of slot, in the one numbering) to every rank, after zeroing the slot's
 * arrival counter when the ranks reduce (shm_slot_sync). Any thread; never waits on a worker.
 * Fails with TP_EUNAVAIL when the group or the slot's model is not ready; then no done callback
 * will come for this job. */
int sup_dispatch(struct sup *s, uint32_t slot, uint64_t id, uint32_t rows, struct tp_err *err);

/* Stops the thread and the workers: sends each worker STOP and closes its control socket (a
 * worker that sees EOF without STOP takes tpd for dead: ctl.h), waits up to 5 s, then kills what
 * is left and reaps everything. Takes NULL. */
void sup_stop(struct sup *s);

#endif
