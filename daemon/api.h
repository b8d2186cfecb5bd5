/* api.h -- the methods tpd serves: the KServe v2 GRPCInferenceService (ServerLive, ServerReady,
 * ModelReady, ServerMetadata, ModelMetadata, ModelInfer, RepositoryIndex, the system
 * shared-memory extension: SystemSharedMemoryRegister/Status/Unregister, ModelStatistics) and
 * grpc.health.v1.Health/Check and /Watch. Each handler parses its request, answers from the model and the
 * scheduler's state, or hands ModelInfer to the scheduler, which answers when the workers are
 * done. */
#ifndef TPD_API_H
#define TPD_API_H

#include <pthread.h>
#include <stdatomic.h>

#include "model.h"
#include "rpc.h"
#include "sched.h"
#include "shmreg.h"

struct api {
    const struct model *model;
    struct sched *sched;
    struct shmreg *shm;      /* system shared-memory regions */
    uint32_t batch_delay_us; /* dynamic batching's delay (ModelConfig); 0: off */
    atomic_int serving;      /* gRPC started with every worker ready */
    atomic_int draining;     /* SIGTERM received: not ready any more */
    /* grpc.health.v1.Health/Watch calls, each told when the readiness changes; the lock
     * (PTHREAD_MUTEX_INITIALIZER) also orders a send against the call's end */
    pthread_mutex_t watch_lock;
    struct api_watch *watches;
    int watches_ended;       /* api_end_watches ran: new watches end at once */
};

/* The one readiness rule, for gRPC's ServerReady, ModelReady, RepositoryIndex and
 * grpc.health.v1 and for the HTTP health endpoints alike: serving, not draining, and the
 * scheduler's workers all up. Any thread. */
int api_ready(struct api *a);

/* The readiness may have changed: every Watch whose client was last told otherwise is sent
 * the new status. Any thread. */
void api_health_changed(struct api *a);

/* Ends every Watch (and every one that comes later) with UNAVAILABLE, after telling it
 * NOT_SERVING: at the start of the drain, so that open watches do not hold the drain up. */
void api_end_watches(struct api *a);

extern const struct rpc_method api_methods[];
extern const int api_nmethods;

#endif
