/* backend.h -- the compute interface of a worker. A backend owns one rank's shard on its device
 * and computes y[:, row0:row0+rows] = x · W_shardᵀ + b_shard for a slot of the shared arena,
 * writing its columns straight into the slot's [batch, out] output (the CPU analog of the
 * all-gather). A backend is chosen by name at start; each has a table of the operations below. */
#ifndef TP_BACKEND_H
#define TP_BACKEND_H

#include <stdint.h>

#include "err.h"
#include "shard.h"

struct backend;

struct backend_config {
    int rank;
    int nranks;
    uint32_t max_batch; /* most rows of one forward */
    int threads;        /* compute threads this rank may use */
    int device;         /* device index for GPU backends, -1 for none */
};

typedef int (*backend_create_fn)(struct backend **b, const struct backend_config *c,
                                 struct shard *s, struct tp_err *err);
typedef int (*backend_forward_fn)(struct backend *b, const float *x, uint32_t rows, float *y,
                                  struct tp_err *err);
typedef void (*backend_destroy_fn)(struct backend *b);

struct backend_ops {
    const char *name;
    /* Takes over the shard's buffers (s is left empty on success). */
    backend_create_fn create;
    /* x: [rows, in] float32; y: [rows, out] float32 of which this rank writes its columns. */
    backend_forward_fn forward;
    /* Takes NULL. */
    backend_destroy_fn destroy;
};

/* The backend called name, or NULL. */
const struct backend_ops *backend_find(const char *name);

extern const struct backend_ops backend_cpu;

#endif
