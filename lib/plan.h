/* plan.h -- the description of the layer that tpd serves: which tensor of which file is W, in
 * which orientation it is stored, which is b, and how the output rows are split between ranks.
 * The coordinator builds it once at start from the checkpoint (checkpoint.h) and the command
 * line, logs it, and sends it to every worker over its control socket (ctl.h), at every start of
 * the group. Each worker reads its rows by the plan and first checks that the files are still
 * the ones the coordinator read (device, inode, size, mtime) and that their headers still give
 * the same dtypes, shapes and byte ranges: weights that changed since start are refused, never
 * served.
 *
 * The split: rank r of N owns output rows [row0, row0 + rows) of W, as even as possible; the
 * first out mod N ranks own one row more (Megatron's split when N divides out). */
#ifndef TP_PLAN_H
#define TP_PLAN_H

#include <stdint.h>

#include "err.h"
#include "safetensors.h"

#define PLAN_MAGIC 0x74706c31u /* "tpl1" */
#define PLAN_VERSION 1
#define PLAN_MAX_PATH 4096 /* bytes of a file's path, with the terminating NUL */

/* How W is stored. */
enum plan_layout {
    PLAN_LAYOUT_AUTO = 0, /* only in a request: decide from the checkpoint */
    PLAN_LINEAR = 1,      /* [out, in], y = x·Wᵀ + b (torch.nn.Linear) */
    PLAN_CONV1D = 2,      /* [in, out], y = x·W + b (transformers' Conv1D, the GPT-2 family) */
};

/* One tensor of the plan, and the identity of the file that holds it when the plan was made. */
struct plan_tensor {
    char name[ST_MAX_NAME];   /* as stored in the file */
    char path[PLAN_MAX_PATH]; /* the safetensors file that holds it */
    uint64_t dev, ino;        /* st_dev, st_ino of that file */
    uint64_t size;            /* its size in bytes */
    int64_t mtime_ns;         /* its st_mtim, in ns since the epoch */
    uint64_t begin, end;      /* absolute byte range of the tensor in the file */
    uint32_t dtype;           /* enum tp_dtype: F32, F16, BF16 or F64 */
    uint32_t ndim;            /* 2 for W, 1 for b */
    int64_t shape[2];         /* as stored */
};

/* The wire format too: the coordinator sends it as one control datagram (ctl_send_plan). */
struct plan {
    uint32_t magic;   /* PLAN_MAGIC */
    uint16_t version; /* PLAN_VERSION */
    uint16_t type;    /* CTL_PLAN on the control socket */
    uint32_t layout;  /* enum plan_layout: PLAN_LINEAR or PLAN_CONV1D */
    uint32_t has_bias;
    int64_t in, out;               /* the layer: x [.., in] -> y [.., out] */
    char requested[ST_MAX_NAME];   /* the weight's name as the user gave it */
    char tied_from[ST_MAX_NAME];   /* "" or the absent tensor that W stands in for */
    char layout_why[128];          /* how the layout was decided, for the log */
    struct plan_tensor w, b;       /* b is all zero without bias */
};

_Static_assert(sizeof(struct plan) == 9520, "plan is a wire format");

/* What the user asked for. */
struct plan_request {
    const char *weights;    /* a .safetensors file, a checkpoint directory or an index file */
    const char *weight;     /* a tensor name, or a module name whose "<module>.weight" exists */
    const char *bias;       /* NULL: the weight's sibling "<module>.bias" when it exists */
    int no_bias;            /* serve without a bias even when the checkpoint has one */
    enum plan_layout layout; /* PLAN_LAYOUT_AUTO: from the checkpoint's config.json and names */
};

/* Builds the plan: opens the checkpoint, finds the tensors (a module name, a tied lm_head), decides
 * the layout and checks the shapes and dtypes. Fails (TP_EINVAL, TP_ENOTFOUND) with a message
 * that names the tensor, the file and what to do: an absent tensor, an ambiguous layout, a bias
 * that does not fit. notes, when not NULL, receives up to notes_len bytes of text for the log
 * (one line per decision, e.g. the tensor used for a tied lm_head), "" when there is none. */
int plan_build(struct plan *p, const struct plan_request *req, char *notes, size_t notes_len,
               struct tp_err *err);

/* Checks a plan that came from another process: magic, version, NUL-terminated strings, a known
 * layout and dtypes, shapes that agree with in and out and with the byte ranges. Exposed for
 * tests and fuzzing. */
int plan_validate(const struct plan *p, struct tp_err *err);

/* The output rows of rank of nranks: [*row0, *row0 + *rows). Fails (TP_EINVAL) unless
 * 0 <= rank < nranks and out >= nranks (every rank owns at least one row). */
int plan_split(int64_t out, int nranks, int rank, int64_t *row0, int64_t *rows,
               struct tp_err *err);

/* Reads output rows [row0, row0 + rows) of W as float32 into w ([rows, in], row-major, whatever
 * the layout: a CONV1D plan reads a column range of every stored row) and, with a bias, the same
 * slice of b into b ([rows]; NULL without bias). Before reading, checks every file against the
 * plan: its identity, and its header's entry for the tensor; a difference fails (TP_EINVAL) with
 * "weights changed since start: ...". Reads only those bytes: *w_bytes and *b_bytes (either may
 * be NULL) get the counts. */
int plan_read(const struct plan *p, int64_t row0, int64_t rows, float *w, float *b,
              uint64_t *w_bytes, uint64_t *b_bytes, struct tp_err *err);

/* Receives chunk rows [r, r + n) of a plan_read_chunks read (r counts from its row0): [n, in]
 * float32 at w, valid during the call only. Returns 0, or -1 with err set to stop the read. */
typedef int (*plan_chunk_fn)(void *ctx, int64_t r, int64_t n, const float *w, struct tp_err *err);

/* plan_read, with W handed to fn in chunks of at most chunk rows instead of written whole: the
 * reader never holds more than chunk rows of W at once (the invariant GEMM packs each chunk as
 * it comes). b and the counts as in plan_read. */
int plan_read_chunks(const struct plan *p, int64_t row0, int64_t rows, int64_t chunk,
                     plan_chunk_fn fn, void *ctx, float *b, uint64_t *w_bytes, uint64_t *b_bytes,
                     struct tp_err *err);

/* Formats the split of out over nranks for metadata: "251,251,250" (rows per rank). */
void plan_split_text(int64_t out, int nranks, char *buf, size_t len);

#endif
