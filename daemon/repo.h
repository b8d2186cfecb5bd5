/* repo.h -- the models tpd serves, and their loads and unloads. A model is described by its
 * settings (struct repo_conf): from the command line (--weights ..., the one-model shorthand), or
 * from a model repository, a folder with one NAME.json per model (docs/repository.md). Every
 * model is served by the same workers (sup.h), one per rank, and has its own plan, arena, queue
 * and batching (sched.h), metrics and statistics (metrics.h), under one of CTL_MAX_MODELS ids.
 *
 * States, as RepositoryIndex reports them: UNAVAILABLE (not loaded, or its load failed: the
 * reason says which), LOADING, READY, UNLOADING. A load reads the model's file again (a
 * repository model), plans it from the checkpoint's headers, checks that its shards and slots fit
 * in the memory available, makes its arena and scheduler and loads it on every rank; a failure
 * is that model's, never the daemon's. An unload refuses new requests at once (UNAVAILABLE), lets
 * every request already taken finish and be answered, then frees the model on every rank and in
 * tpd. A request handler holds the model it serves (repo_get / repo_put) while it hands a
 * request to the model's scheduler, so an unload never pulls the scheduler from under it. */
#ifndef TPD_REPO_H
#define TPD_REPO_H

#include <limits.h>
#include <pthread.h>
#include <stdint.h>

#include "ctl.h"
#include "err.h"
#include "model.h"
#include "plan.h"
#include "sched.h"
#include "shm.h"
#include "sup.h"

#define REPO_MAX_MODELS CTL_MAX_MODELS
#define REPO_MAX_SLOTS 1024 /* the slots of all models together */

/* One model's settings. */
struct repo_conf {
    char name[128];
    char weights[PATH_MAX];        /* checkpoint: file, directory or index */
    char weight[256];              /* tensor or module name of W */
    char bias[256];                /* "" : W's sibling when it exists */
    char block[256];               /* "" : one layer */
    int no_bias, row, layout, act; /* as struct plan_request */
    int io_dtype;                  /* enum tp_dtype on the wire */
    uint32_t max_batch, slots, max_queue, max_queue_mb, batch_delay_us;
};

enum repo_state { REPO_UNAVAILABLE, REPO_LOADING, REPO_READY, REPO_UNLOADING };

/* A model tpd knows. The table's entries are never freed, so a pointer to one stays valid; what
 * it serves (model, plan, arena, sched) is valid while the caller holds it (repo_get). */
struct repo_model {
    struct repo *repo;
    int id;                /* with the workers and the metrics */
    int known;             /* an entry of the table */
    enum repo_state state; /* guarded by the repository's lock, as refs and reason */
    char reason[512];      /* why UNAVAILABLE */
    int refs;              /* repo_get holds */
    int wanted;            /* loaded, and not unloaded since: the server is ready only with it */
    uint64_t gen;          /* bumped at every unload (repo_cancel) */
    pthread_mutex_t cancel_lock; /* orders repo_cancel against the scheduler's end */
    struct repo_conf conf;       /* of its last load */
    struct model model;
    struct plan plan;
    struct shm_arena arena;
    struct sched *sched;
    uint32_t slot0;
    uint64_t shard_bytes; /* weights and biases, all ranks together */
};

/* What the models share: the workers, and the description of the ranks. */
struct repo_config {
    const char *dir;     /* the repository folder; NULL: models come from repo_add only */
    const char *backend; /* "cpu" or "cuda" */
    int ranks;
    int batch_invariant;              /* the cpu backend's invariant GEMM */
    enum tp_dtype gemm_dtype;         /* GPUs */
    const char *split_flag;           /* "--gpus lists" or "--cpu", for messages */
    int control_explicit;             /* loads and unloads are allowed while serving */
    struct repo_conf defaults;        /* what a repository file leaves out */
    void (*state_changed)(void *ctx); /* a model's readiness changed (grpc.health.v1 Watch) */
    void *state_ctx;
};

struct repo;

/* Sets up an empty repository. -1 without memory. */
int repo_create(struct repo **r, const struct repo_config *c, struct tp_err *err);

/* The workers to load models into (borrowed; set before the first load). */
void repo_attach(struct repo *r, struct sup *sup);

/* Adds a model known by its settings (the command line's one model) or, with conf NULL, reads
 * every NAME.json of the repository folder, each an UNAVAILABLE model ("not loaded"), or one
 * whose file is bad with the reason. -1 when the folder cannot be read, or the one model cannot be
 * planned (-2 when its settings are what cannot be served: a split, a batch size). */
int repo_add(struct repo *r, const struct repo_conf *conf, struct tp_err *err);

/* Loads the model called name (reading its file again, for a repository model): 0 once it is
 * READY, -1 with err (TP_ENOTFOUND: no such model; TP_EBUSY: it is loading or unloading already;
 * else why it failed, which its entry keeps as its reason). Loading a READY model does nothing.
 * Any thread; waits for the workers. */
int repo_load(struct repo *r, const char *name, struct tp_err *err);

/* Unloads the model called name, waiting for its requests in flight (see the top of this
 * file). -1 with err when there is no such model, or it is not loaded. */
int repo_unload(struct repo *r, const char *name, struct tp_err *err);

/* The model called name, when it is READY and version is "" or ours, held for the caller (repo_put
 * releases it); else NULL with err: TP_ENOTFOUND for a model or version tpd does not know,
 * TP_EUNAVAIL with the state and reason for one that is not ready. */
struct repo_model *repo_get(struct repo *r, const char *name, const char *version,
                            struct tp_err *err);
void repo_put(struct repo_model *m);

/* 1 when the model called name (version "" or ours) is READY, 0 when it is known but not, -1
 * when tpd does not know it. */
int repo_ready(struct repo *r, const char *name, const char *version);

/* 1 when every model that was loaded and not unloaded since is READY on workers that are up:
 * the server's readiness (a model lost at a restart of the workers keeps it not ready). */
int repo_all_ready(struct repo *r);

/* sched_cancel(m->sched, req) for a request taken while m had generation gen: nothing when the
 * model has been unloaded since (the request was answered before that). Any thread. */
void repo_cancel(struct repo_model *m, uint64_t gen, struct sched_req *req);

/* One line of RepositoryIndex. */
struct repo_entry {
    char name[128];
    enum repo_state state;
    char reason[512];
};

/* A snapshot of every model, sorted by name: *out (malloc'ed, the caller frees it) and *n. -1
 * without memory. */
int repo_index(struct repo *r, struct repo_entry **out, size_t *n);

/* Triton's name for a state. */
const char *repo_state_name(enum repo_state s);

/* Every model's scheduler: requests waiting and running (for the drain's log). */
uint32_t repo_busy(struct repo *r);

/* Requests waiting for a job in model id's queue (a metrics_pending_fn). */
uint32_t repo_pending(void *r, int id);

/* Whether explicit loads and unloads are allowed (--model-control-mode explicit). */
int repo_explicit(const struct repo *r);

/* The largest request and response, in bytes of tensor data, of the models known now: what the
 * gRPC and REST limits must allow. */
void repo_limits(struct repo *r, uint64_t *max_in, uint64_t *max_out);

/* Unloads every model and frees everything. Takes NULL. */
void repo_destroy(struct repo *r);

#endif
