/* model.h -- what tpd serves: one linear layer or an MLP block, described once at start from its
 * plan (plan.h:
 * the checkpoint's headers and the command line), then read (never written) by every thread. The workers always
 * read and write FP32 in the slots; io_dtype is what clients send and receive, and the
 * coordinator converts at its one copy in and out. */
#ifndef TPD_MODEL_H
#define TPD_MODEL_H

#include <stdint.h>

#include "plan.h"
#include "tensor.h"

#define MODEL_INPUT "input"
#define MODEL_OUTPUT "output"
#define MODEL_VERSION "1"
#define MODEL_PLATFORM "tpd_linear"

struct model {
    char name[128];
    int64_t in;               /* input features */
    int64_t out;              /* output features */
    enum tp_dtype wdtype;     /* dtype of W in the file */
    enum tp_dtype io_dtype;   /* input and output on the wire (--io-dtype): F32, F16 or BF16 */
    enum tp_dtype gemm_dtype; /* what the GPU GEMM multiplies in (--dtype); F32 on cpu */
    int has_bias;
    int ranks;
    const char *backend; /* "cpu" or "cuda" */
    int batch_invariant; /* a row's answer never depends on its batch (cpu, --cpu-gemm invariant) */
    uint32_t max_batch;  /* rows per request */
    const struct plan *plan; /* the tensors served and how they are stored */
    const char *split_what;  /* what the ranks split: "outputs", "inputs" or "intermediate" */
    char split[4096];        /* its count per rank, "251,251,250" */
    /* one entry per layer of the plan, in the order the model applies them, joined by ",": */
    char weights[PLAN_MAX_LINEAR * 256];  /* W's tensor names */
    char biases[PLAN_MAX_LINEAR * 256];   /* b's, "" for a layer without one */
    char layouts[PLAN_MAX_LINEAR * 16];   /* "[out, in]" or "[in, out]" */
};

#endif
