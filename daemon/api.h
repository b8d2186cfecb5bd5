/* api.h -- the methods tpd serves: the KServe v2 GRPCInferenceService (ServerLive, ServerReady,
 * ModelReady, ServerMetadata, ModelMetadata, ModelInfer, RepositoryIndex, the system
 * shared-memory extension: SystemSharedMemoryRegister/Status/Unregister) and
 * grpc.health.v1.Health/Check. Each handler parses its request, answers from the model and the
 * scheduler's state, or hands ModelInfer to the scheduler, which answers when the workers are
 * done. */
#ifndef TPD_API_H
#define TPD_API_H

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
};

/* The one readiness rule, for gRPC's ServerReady, ModelReady, RepositoryIndex and
 * grpc.health.v1 and for the HTTP health endpoints alike: serving, not draining, and the
 * scheduler's workers all up. Any thread. */
int api_ready(struct api *a);

extern const struct rpc_method api_methods[];
extern const int api_nmethods;

#endif
