/* api.h -- the methods tpd serves: the KServe v2 GRPCInferenceService (ServerLive, ServerReady,
 * ModelReady, ServerMetadata, ModelMetadata, ModelInfer, RepositoryIndex, RepositoryModelLoad
 * and Unload, the system shared-memory extension: SystemSharedMemoryRegister/Status/Unregister,
 * ModelStatistics) and grpc.health.v1.Health/Check and /Watch. Each handler parses its request,
 * finds the model it names in the repository (repo.h), answers from the model's state, or hands
 * ModelInfer to the model's scheduler, which answers when the workers are done. */
#ifndef TPD_API_H
#define TPD_API_H

#include <pthread.h>
#include <stdatomic.h>

#include "grpc_service.pb-c.h"
#include "metrics.h"
#include "model.h"
#include "repo.h"
#include "rpc.h"
#include "sched.h"
#include "shmreg.h"
#include "sup.h"

struct api {
    struct repo *repo;       /* the models */
    struct sup *sup;         /* their workers */
    struct shmreg *shm;      /* system shared-memory regions */
    atomic_int serving;      /* gRPC started with every worker ready */
    atomic_int draining;     /* SIGTERM received: not ready any more */
    atomic_int controls;     /* loads and unloads running on threads of their own */
    /* grpc.health.v1.Health/Watch calls, each told when the readiness changes; the lock
     * (PTHREAD_MUTEX_INITIALIZER) also orders a send against the call's end */
    pthread_mutex_t watch_lock;
    struct api_watch *watches;
    int watches_ended;       /* api_end_watches ran: new watches end at once */
};

/* The one readiness rule, for gRPC's ServerReady, ModelReady and grpc.health.v1 and for the HTTP
 * health endpoints alike: serving, not draining, the workers up, and every model that is to be
 * served loaded on them (repo_all_ready). Any thread. */
int api_ready(struct api *a);

/* The readiness may have changed: every Watch whose client was last told otherwise is sent
 * the new status. Any thread. */
void api_health_changed(struct api *a);

/* Ends every Watch (and every one that comes later) with UNAVAILABLE, after telling it
 * NOT_SERVING: at the start of the drain, so that open watches do not hold the drain up. */
void api_end_watches(struct api *a);

/* The answers of ModelMetadata, ModelConfig and ModelStatistics, built for gRPC and REST alike:
 * r points into the struct's own storage (and, for the statistics, into memory that
 * api_statistics_free releases). */
#define API_METADATA_PARAMS 24

struct api_metadata {
    Inference__ModelMetadataResponse r;
    Inference__ModelMetadataResponse__TensorMetadata in, out, *ins[1], *outs[1];
    Inference__InferParameter pv[API_METADATA_PARAMS];
    Inference__ModelMetadataResponse__ParametersEntry e[API_METADATA_PARAMS];
    Inference__ModelMetadataResponse__ParametersEntry *ep[API_METADATA_PARAMS];
    int64_t in_shape[2], out_shape[2];
    char *versions[1];
};

struct api_config {
    Inference__ModelConfigResponse r;
    Inference__ModelConfig mc;
    Inference__ModelInput in, *ins[1];
    Inference__ModelOutput out, *outs[1];
    Inference__ModelDynamicBatching db;
    int64_t in_dims[1], out_dims[1];
};

struct api_model_stats {
    Inference__ModelStatistics ms;
    Inference__InferStatistics is;
    Inference__StatisticDuration d[6], (*bd)[3];
    Inference__InferBatchStatistics *bs, **bsp;
    struct metrics_stats st;
    char name[128];
};

struct api_statistics {
    Inference__ModelStatisticsResponse r;
    Inference__ModelStatistics **msp;
    struct api_model_stats *m;
    size_t n;
};

void api_metadata(const struct repo_model *m, struct api_metadata *b);
void api_config(const struct repo_model *m, struct api_config *b);
/* The statistics of the model called name (version "" or ours), or of every loaded model when
 * name is "". -1 (nothing to free) with err: an unknown or unready model, or no memory. */
int api_statistics(struct api *a, const char *name, const char *version, struct api_statistics *b,
                   struct tp_err *err);
void api_statistics_free(struct api_statistics *b);

/* Loads (load 1) or unloads the model called name, for gRPC's and REST's model control: refused
 * unless tpd runs with --model-control-mode explicit, or while it drains. Waits for the workers:
 * the handlers run it on a thread of its own (api_control_run). */
int api_model_control(struct api *a, const char *name, int load, struct tp_err *err);

/* Runs fn(arg) on a new thread, counted until it returns; -1 when none can be made. Any thread. */
int api_control_run(struct api *a, void *(*fn)(void *), void *arg);

/* Waits until every thread of api_control_run has returned: before the models go, at exit. */
void api_control_wait(struct api *a);

/* Copies a request's rows ([rows, in] of the model's io dtype) into x, a slot's FP32 rows,
 * widening on the way: from the shared-memory region reg at offset, or from src when reg is
 * NULL. -1 with err when the region cannot be read (its client shrank it). */
int api_fill_rows(const struct model *m, struct shmreg_region *reg, uint64_t offset,
                  const void *src, uint32_t rows, float *x, struct tp_err *err);

/* Narrows a request's output y ([rows, out] FP32, in its slot, which it holds) to the model's io
 * dtype in place and, with reg, writes it into that shared-memory region at offset; -1 with err
 * when it cannot. */
int api_put_rows(const struct model *m, struct shmreg_region *reg, uint64_t offset,
                 const float *y, uint32_t rows, struct tp_err *err);

extern const struct rpc_method api_methods[];
extern const int api_nmethods;

#endif
