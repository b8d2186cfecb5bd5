/* backend.h -- the compute interface of a worker. A backend owns one rank's shard on its device
 * and computes its part of the model for a slot of the shared arena. A column layer's rank
 * computes y[:, first:first+count] = x · W_shardᵀ + b_shard, writing its columns straight into
 * the slot's [batch, out] output (the CPU analog of the all-gather), or, for the cuda backend with
 * NCCL, all-gathering the shards on the devices. A rank of a reducing model (a row layer, a
 * block) computes a partial sum of all of y, and the ranks all-reduce them (block.h on the CPU).
 * A backend is chosen by name at start ("cpu", "cuda"); each has a table of the operations
 * below. */
#ifndef TP_BACKEND_H
#define TP_BACKEND_H

#include <stdint.h>

#include "err.h"
#include "shard.h"

struct backend;

#include <stddef.h>

#include "ctl.h"
#include "tensor.h"

enum backend_gather {
    BACKEND_GATHER_HOST, /* each rank writes its own columns of the shared output */
    BACKEND_GATHER_NCCL, /* all-gather across ranks, then rank 0 writes the whole output */
};

enum backend_cpu_gemm {
    BACKEND_GEMM_INVARIANT, /* lib/gemm.c: a row's bits independent of its batch (the default) */
    BACKEND_GEMM_OPENBLAS,  /* cblas_sgemm: OpenBLAS's kernels, chosen by the call's shape */
};

struct backend_config {
    int rank;
    int nranks;
    uint32_t max_batch;         /* most rows of one forward */
    int threads;                /* compute threads this rank may use */
    int device;                 /* device index for GPU backends, -1 for none */
    enum backend_gather gather; /* the cpu backend always gathers through the host */
    enum tp_dtype dtype;        /* what the GEMM multiplies: TP_F32, TP_F16 or TP_BF16 */
    int tf32;                   /* let FP32 GEMMs use TF32 tensor cores */
    enum backend_cpu_gemm cpu_gemm; /* the cpu backend's GEMM */
    const uint8_t *nccl_id;     /* CTL_NCCL_ID_BYTES from the coordinator, with GATHER_NCCL */
    void *arena;                /* the shared arena's mapping, to pin once */
    size_t arena_size;          /* bytes */
    int ctl_fd;                 /* the control socket, watched while ranks wait for each other */
};

/* One forward: a slot of the arena. */
struct backend_job {
    const float *x;         /* [rows, in] float32 */
    uint32_t rows;
    float *y;               /* [rows, out] float32: the slot's output */
    float *const *partial;  /* reducing models: every rank's partial block of the slot, else NULL */
    uint32_t *sync;         /* reducing models: the slot's arrival counter (shm_slot_sync) */
    uint32_t collectives;   /* set by forward: the collectives the job ran (1 when it reduced) */
    double wait_s;          /* set by a reducing forward: time waiting for the other ranks */
    double reduce_s;        /* and time summing its stripe of the partials */
};

typedef int (*backend_create_fn)(struct backend **b, const struct backend_config *c,
                                 struct shard *s, struct tp_err *err);
typedef int (*backend_forward_fn)(struct backend *b, struct backend_job *job, struct tp_err *err);
typedef void (*backend_destroy_fn)(struct backend *b);

struct backend_ops {
    const char *name;
    /* Optional (NULL: nothing to check); when present, called once before create. Checks the
     * device before the shard is read, so that a missing GPU fails at once, not after loading
     * gigabytes of weights. */
    int (*probe)(const struct backend_config *c, struct tp_err *err);
    /* Takes over the shard's buffers (s is left empty on success). */
    backend_create_fn create;
    /* Writes this rank's columns of job->y (with BACKEND_GATHER_NCCL rank 0 writes all of them;
     * a reducing model's ranks each write a stripe, after the reduce). A failure with TP_EDEVICE
     * or TP_EUNAVAIL leaves the backend unusable: the worker reports it and exits, and the group
     * is rebuilt. */
    backend_forward_fn forward;
    /* Takes NULL. */
    backend_destroy_fn destroy;
};

/* The backend called name, or NULL. */
const struct backend_ops *backend_find(const char *name);

extern const struct backend_ops backend_cpu;
#ifdef TP_HAVE_CUDA
extern const struct backend_ops backend_cuda;
#endif

#endif
