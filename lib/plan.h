/* plan.h -- the description of the model that tpd serves: its linear layers, which tensor of
 * which file is each W, in which orientation it is stored, which is its b, and how each is split
 * between ranks. The coordinator builds it once at start from the checkpoint (checkpoint.h) and
 * the command line, logs it, and sends it to every worker over its control socket (ctl.h), at
 * every start of the group. Each worker reads its part by the plan and first checks that the
 * files are still the ones the coordinator read (device, inode, size, mtime) and that their
 * headers still give the same dtypes, shapes and byte ranges: weights that changed since start
 * are refused, never served.
 *
 * A model is one of four kinds (docs/blocks.md has the math):
 *
 *   column   one linear layer, its output rows split: rank r computes y[:, rows_r]
 *   row      one linear layer, its inputs split: rank r computes x[:, in_r]·W[:, in_r]ᵀ, the
 *            partial sums are all-reduced and b is added once, after the reduce
 *   gated    down(act(gate(x)) · up(x)) (Llama, Mistral, Qwen2): gate and up column-split, each
 *            sharded on its own, down row-split by the same rule, one all-reduce
 *   mlp      proj(act(fc(x))) (GPT-2's c_fc and c_proj): fc column-split, proj row-split
 *
 * Every split, of outputs or of inputs, is as even as possible: of n over N ranks, the first
 * n mod N ranks own one more (Megatron's split when N divides n). */
#ifndef TP_PLAN_H
#define TP_PLAN_H

#include <stdint.h>

#include "err.h"
#include "safetensors.h"

#define PLAN_MAGIC 0x74706c31u /* "tpl1" */
#define PLAN_VERSION 2         /* 2: kinds and up to three linear layers */
#define PLAN_MAX_PATH 4096 /* bytes of a file's path, with the terminating NUL */
#define PLAN_MAX_LINEAR 3  /* linear layers of one model: gate, up, down */

/* How W is stored. */
enum plan_layout {
    PLAN_LAYOUT_AUTO = 0, /* only in a request: decide from the checkpoint */
    PLAN_LINEAR = 1,      /* [out, in], y = x·Wᵀ + b (torch.nn.Linear) */
    PLAN_CONV1D = 2,      /* [in, out], y = x·W + b (transformers' Conv1D, the GPT-2 family) */
};

enum plan_kind {
    PLAN_KIND_AUTO = 0, /* only in a request: column for a weight, from the tensors for a block */
    PLAN_COLUMN = 1,
    PLAN_ROW = 2,
    PLAN_GATED = 3, /* lin: gate, up, down */
    PLAN_MLP = 4,   /* lin: fc, proj */
};

/* The activation of a block, as PyTorch defines it. */
enum plan_act {
    PLAN_ACT_AUTO = 0,  /* in a request: from config.json; in a plan: none (one linear layer) */
    PLAN_ACT_SILU = 1,  /* t·sigmoid(t) ("silu", "swish") */
    PLAN_ACT_GELU = 2,  /* 0.5·t·(1 + erf(t/√2)) ("gelu") */
    PLAN_ACT_GELU_TANH = 3, /* 0.5·t·(1 + tanh(√(2/π)·(t + 0.044715·t³))) ("gelu_new",
                             * "gelu_pytorch_tanh") */
    PLAN_ACT_RELU = 4,  /* max(t, 0) */
};

/* Which axis of a linear layer's W [out, in] the ranks split. */
enum plan_split_axis {
    PLAN_SPLIT_OUT = 1, /* rank r owns output rows out_r: its columns of y */
    PLAN_SPLIT_IN = 2,  /* rank r owns input columns in_r: a partial sum of all of y */
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

/* One linear layer of the model. */
struct plan_linear {
    uint32_t layout;   /* enum plan_layout: PLAN_LINEAR or PLAN_CONV1D */
    uint32_t has_bias;
    uint32_t split;    /* enum plan_split_axis */
    uint32_t pad;
    int64_t in, out;               /* x [.., in] -> y [.., out] */
    char requested[ST_MAX_NAME];   /* the weight's name as the user gave it or the block made it */
    char tied_from[ST_MAX_NAME];   /* "" or the absent tensor that W stands in for */
    char layout_why[128];          /* how the layout was decided, for the log */
    struct plan_tensor w, b;       /* b is all zero without bias */
};

/* The wire format too: the coordinator sends it as one control datagram (ctl_send_plan). */
struct plan {
    uint32_t magic;   /* PLAN_MAGIC */
    uint16_t version; /* PLAN_VERSION */
    uint16_t type;    /* CTL_PLAN on the control socket */
    uint32_t kind;    /* enum plan_kind, never AUTO */
    uint32_t act;     /* enum plan_act: a block's activation; AUTO (none) for one layer */
    uint32_t nlin;    /* linear layers in lin: 1 (column, row), 3 (gated) or 2 (mlp) */
    uint32_t pad;
    int64_t in, out;            /* the model: x [.., in] -> y [.., out] */
    int64_t inter;              /* a block's intermediate size (split over the ranks); 0 else */
    char block[ST_MAX_NAME];    /* a block's module path, "" for one layer */
    char act_why[128];          /* how the activation was decided, for the log */
    struct plan_linear lin[PLAN_MAX_LINEAR];
};

_Static_assert(sizeof(struct plan_linear) == 9520, "plan is a wire format");
_Static_assert(sizeof(struct plan) == 28992, "plan is a wire format");

/* What the user asked for. */
struct plan_request {
    const char *weights;    /* a .safetensors file, a checkpoint directory or an index file */
    const char *weight;     /* one layer: a tensor name, or a module whose "<module>.weight" exists */
    const char *block;      /* NULL, or the module path of an MLP block (weight then unused) */
    const char *bias;       /* one layer; NULL: the weight's sibling "<module>.bias" if it exists */
    int no_bias;            /* serve without biases even when the checkpoint has them */
    int row;                /* one layer: split its inputs (PLAN_ROW) instead of its outputs */
    enum plan_layout layout; /* PLAN_LAYOUT_AUTO: from the checkpoint's config.json and names */
    enum plan_act act;      /* a block's; PLAN_ACT_AUTO: from config.json */
};

/* Builds the plan: opens the checkpoint, finds the tensors (a module name, a tied lm_head, a
 * block's members), decides each layout and the activation and checks the shapes and dtypes.
 * Fails (TP_EINVAL, TP_ENOTFOUND) with a message that names the tensor, the file and what to do:
 * an absent tensor, an ambiguous layout or activation, a bias that does not fit. notes, when not
 * NULL, receives up to notes_len bytes of text for the log (one line per decision, e.g. the
 * tensor used for a tied lm_head), "" when there is none. */
int plan_build(struct plan *p, const struct plan_request *req, char *notes, size_t notes_len,
               struct tp_err *err);

/* Checks a plan that came from another process: magic, version, NUL-terminated strings, a known
 * kind, layouts, dtypes and activation, linear layers that chain (each one's shapes agree with
 * its in and out, and with the byte ranges). Exposed for tests and fuzzing. */
int plan_validate(const struct plan *p, struct tp_err *err);

/* The part of n (outputs or inputs) that rank of nranks owns: [*first, *first + *count). Fails
 * (TP_EINVAL) unless 0 <= rank < nranks and n >= nranks (every rank owns at least one). */
int plan_split(int64_t n, int nranks, int rank, int64_t *first, int64_t *count,
               struct tp_err *err);

/* What the ranks split in the model, and its size: a column layer's outputs, a row layer's
 * inputs, a block's intermediate size. "outputs", "inputs" or "intermediate" into *what. */
int64_t plan_split_size(const struct plan *p, const char **what);

/* The multiply-adds of one row of input on the rank with the largest share, over nranks ranks. */
double plan_rank_macs(const struct plan *p, int nranks);

/* Whether the model ends in a row-split layer, whose partial sums are all-reduced. */
int plan_reduces(const struct plan *p);

/* The names of kinds and activations, as the command line and metadata give them. */
const char *plan_kind_name(enum plan_kind k);
const char *plan_act_name(enum plan_act a);
enum plan_act plan_act_from_name(const char *name); /* PLAN_ACT_AUTO when unknown */
/* "auto", "linear" or "conv1d" as a --layout takes it: 0 with *l set, -1 for another name. */
int plan_layout_from_name(const char *name, enum plan_layout *l);

/* Reads the block [row0, row0 + rows) x [col0, col0 + cols) of W [out, in] (output rows, input
 * columns, whatever the layout: a CONV1D layer reads the transposed block of its stored [in, out]
 * tensor) as float32 into w ([rows, cols], row-major) and, with a bias, b[row0, row0 + rows) into
 * b ([rows]; NULL without bias, or to skip it). Before reading, checks every file against the
 * plan: its identity, and its header's entry for the tensor; a difference fails (TP_EINVAL) with
 * "weights changed since start: ...". Reads only those bytes: *w_bytes and *b_bytes (either may
 * be NULL) get the counts. */
int plan_read(const struct plan_linear *l, int64_t row0, int64_t rows, int64_t col0, int64_t cols,
              float *w, float *b, uint64_t *w_bytes, uint64_t *b_bytes, struct tp_err *err);

/* Receives chunk rows [r, r + n) of a plan_read_chunks read (r counts from its row0): [n, cols]
 * float32 at w, valid during the call only. Returns 0, or -1 with err set to stop the read. */
typedef int (*plan_chunk_fn)(void *ctx, int64_t r, int64_t n, const float *w, struct tp_err *err);

/* plan_read, with W handed to fn in chunks of at most chunk rows instead of written whole: the
 * reader never holds more than chunk rows of W at once (the invariant GEMM packs each chunk as
 * it comes). b and the counts as in plan_read. */
int plan_read_chunks(const struct plan_linear *l, int64_t row0, int64_t rows, int64_t col0,
                     int64_t cols, int64_t chunk, plan_chunk_fn fn, void *ctx, float *b,
                     uint64_t *w_bytes, uint64_t *b_bytes, struct tp_err *err);

/* Formats the split of n over nranks for metadata: "251,251,250" (count per rank). */
void plan_split_text(int64_t n, int nranks, char *buf, size_t len);

#endif
