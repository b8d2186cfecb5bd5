/* plan.c -- building, checking and reading the model's plan (see plan.h). The coordinator builds
 * it (plan_build), every worker checks it (plan_validate) and reads its part by it (plan_read),
 * and tpclient reads a whole model by it for --verify. Deciding how a weight is stored and which
 * activation a block applies are the guesses this file refuses to make: a checkpoint says it
 * (config.json's model_type, hidden_act), the user says it (--layout, --act), or the model is not
 * served. */
#include "plan.h"

#include <fcntl.h>
#include <stdarg.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "checkpoint.h"
#include "fileio.h"

#define SHOW 200               /* bytes of a tensor name in a message */
#define STAGE_BYTES (4u << 20) /* raw bytes of a CONV1D read staged at once */

/* model_type values of the GPT-2 family, whose attention and MLP weights are transformers'
 * Conv1D, stored [in, out]. */
static const char *const conv1d_models[] = {"gpt2", "openai-gpt", "imagegpt",
                                            "decision_transformer", NULL};
/* The Conv1D modules of those models, and the names of theirs that are stored [out, in]. */
static const char *const conv1d_leaves[] = {"c_attn", "c_proj", "c_fc", "q_attn", NULL};
static const char *const linear_leaves[] = {"lm_head", "wte", "wpe", "score", NULL};
/* Where the input embedding of a model with a tied lm_head is, by architecture. */
static const char *const embeddings[] = {"model.embed_tokens.weight",
                                         "transformer.wte.weight",
                                         "model.decoder.embed_tokens.weight",
                                         "transformer.word_embeddings.weight",
                                         "model.embed_in.weight",
                                         "embed_tokens.weight",
                                         "wte.weight",
                                         NULL};

static int in_list(const char *s, const char *const *list)
{
    for (; *list; list++)
        if (strcmp(s, *list) == 0)
            return 1;
    return 0;
}

static int ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), m = strlen(suffix);

    return n >= m && strcmp(s + n - m, suffix) == 0;
}

/* Appends one line to the notes. */
static void note(char *notes, size_t len, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void note(char *notes, size_t len, const char *fmt, ...)
{
    size_t n;
    va_list ap;

    if (!notes || !len)
        return;
    n = strlen(notes);
    if (n && n + 1 < len)
        notes[n++] = '\n', notes[n] = '\0';
    va_start(ap, fmt);
    vsnprintf(notes + n, len - n, fmt, ap);
    va_end(ap);
}

/* The module of a weight name: "a.b.c_attn.weight" -> "a.b.c_attn"; a name without ".weight"
 * is its own module. leaf gets the module's last component. */
static void module_of(const char *name, char *module, size_t len, const char **leaf)
{
    size_t n = strlen(name);
    const char *dot;

    if (ends_with(name, ".weight"))
        n -= 7;
    else if (strcmp(name, "weight") == 0)
        n = 0;
    snprintf(module, len, "%.*s", (int)n, name);
    dot = strrchr(module, '.');
    *leaf = dot ? dot + 1 : module;
}

static int fill_tensor(struct plan_tensor *pt, const struct ckpt_shard *sh,
                       const struct st_tensor *t, struct tp_err *err)
{
    struct stat st;

    if (fstat(sh->st.fd, &st) < 0)
        return tp_err_sys(err, "fstat %s", sh->path);
    *pt = (struct plan_tensor){.dev = (uint64_t)st.st_dev,
                               .ino = (uint64_t)st.st_ino,
                               .size = (uint64_t)st.st_size,
                               .mtime_ns = (int64_t)st.st_mtim.tv_sec * 1000000000 +
                                           st.st_mtim.tv_nsec,
                               .begin = t->begin,
                               .end = t->end,
                               .dtype = (uint32_t)t->dtype,
                               .ndim = (uint32_t)t->ndim};
    if (snprintf(pt->path, sizeof(pt->path), "%s", sh->path) >= (int)sizeof(pt->path))
        return tp_err_set(err, TP_EINVAL, "path %s is too long", sh->path);
    snprintf(pt->name, sizeof(pt->name), "%s", t->name);
    for (int i = 0; i < t->ndim && i < 2; i++)
        pt->shape[i] = t->shape[i];
    return 0;
}

static int computable(enum tp_dtype d)
{
    return d == TP_F32 || d == TP_F16 || d == TP_BF16 || d == TP_F64;
}

/* Finds W by the user's name: the tensor itself, the module's ".weight", or, for an absent
 * lm_head that config.json ties to the input embedding, the embedding. */
static int find_weight(struct ckpt *c, struct plan_linear *l, const char *name,
                       const struct ckpt_shard **sh, const struct st_tensor **t, char *notes,
                       size_t notes_len, struct tp_err *err)
{
    char with[ST_MAX_NAME + 8];
    int r, tie;

    r = ckpt_find(c, name, sh, t, err);
    if (r != 0)
        return r < 0 ? -1 : 0;
    snprintf(with, sizeof(with), "%s.weight", name);
    if (!ends_with(name, ".weight") && (r = ckpt_find(c, with, sh, t, err)) != 0)
        return r < 0 ? -1 : 0;
    if (strcmp(name, "lm_head") == 0 || strcmp(name, "lm_head.weight") == 0) {
        tie = ckpt_config_bool(c, "tie_word_embeddings");
        if (!c->config)
            return tp_err_set(err, TP_ENOTFOUND,
                              "%s has no tensor 'lm_head.weight', and no config.json beside it "
                              "says whether lm_head is tied to the input embedding: name the "
                              "embedding with --weight",
                              c->source);
        if (tie == 0)
            return tp_err_set(err, TP_ENOTFOUND,
                              "%s has no tensor 'lm_head.weight', and config.json sets "
                              "tie_word_embeddings false, so the checkpoint is incomplete",
                              c->source);
        for (const char *const *e = embeddings; *e; e++) {
            r = ckpt_find(c, *e, sh, t, err);
            if (r < 0)
                return -1;
            if (r == 0)
                continue;
            snprintf(l->tied_from, sizeof(l->tied_from), "lm_head.weight");
            note(notes, notes_len,
                 "lm_head.weight is not stored: config.json ties it to the input embedding "
                 "(tie_word_embeddings %s), serving %s",
                 tie == 1 ? "true" : "absent, true by default", *e);
            return 0;
        }
        return tp_err_set(err, TP_ENOTFOUND,
                          "%s has no tensor 'lm_head.weight' and config.json ties it to the input "
                          "embedding, but no embedding tensor was found (tried "
                          "model.embed_tokens.weight, transformer.wte.weight and others): name "
                          "it with --weight",
                          c->source);
    }
    if (ends_with(name, ".weight"))
        return tp_err_set(err, TP_ENOTFOUND, "%s has no tensor '%.*s' (use --weight NAME)",
                          c->source, SHOW, name);
    return tp_err_set(err, TP_ENOTFOUND,
                      "%s has no tensor '%.*s' or '%.*s' (use --weight NAME)", c->source, SHOW,
                      name, SHOW, with);
}

/* Decides how W is stored; see the top of this file. */
static int decide_layout(const struct ckpt *c, struct plan_linear *l, enum plan_layout asked,
                         const char *wname, struct tp_err *err)
{
    const char *type = ckpt_config_string(c, "model_type"), *leaf;
    char module[ST_MAX_NAME];

    module_of(wname, module, sizeof(module), &leaf);
    if (asked != PLAN_LAYOUT_AUTO) {
        l->layout = (uint32_t)asked;
        snprintf(l->layout_why, sizeof(l->layout_why), "given with --layout");
        return 0;
    }
    if (l->tied_from[0]) {
        l->layout = PLAN_LINEAR;
        snprintf(l->layout_why, sizeof(l->layout_why), "an input embedding is [vocab, hidden]");
        return 0;
    }
    if (type && in_list(type, conv1d_models)) {
        if (in_list(leaf, conv1d_leaves)) {
            l->layout = PLAN_CONV1D;
            snprintf(l->layout_why, sizeof(l->layout_why),
                     "config.json: model_type %.32s stores %.32s as Conv1D", type, leaf);
            return 0;
        }
        if (in_list(leaf, linear_leaves)) {
            l->layout = PLAN_LINEAR;
            snprintf(l->layout_why, sizeof(l->layout_why),
                     "config.json: model_type %.32s stores %.32s as nn.Linear", type, leaf);
            return 0;
        }
        return tp_err_set(err, TP_EINVAL,
                          "cannot tell how a model_type %.32s checkpoint stores '%.*s' ([in, out] "
                          "as Conv1D or [out, in] as nn.Linear): give --layout conv1d or "
                          "--layout linear",
                          type, SHOW, wname);
    }
    if (type) {
        l->layout = PLAN_LINEAR;
        snprintf(l->layout_why, sizeof(l->layout_why),
                 "config.json: model_type %.32s uses nn.Linear", type);
        return 0;
    }
    if (in_list(leaf, conv1d_leaves))
        return tp_err_set(err, TP_EINVAL,
                          "'%.*s' is named like a GPT-2 Conv1D weight (stored [in, out]) and no "
                          "config.json says which model this is: give --layout conv1d or "
                          "--layout linear",
                          SHOW, wname);
    l->layout = PLAN_LINEAR;
    snprintf(l->layout_why, sizeof(l->layout_why),
             c->config ? "config.json has no model_type: [out, in] as nn.Linear"
                       : "no config.json: [out, in] as nn.Linear");
    return 0;
}

/* Finds b: the name given, else W's sibling "<module>.bias" when it exists. */
static int find_bias(struct ckpt *c, struct plan_linear *l, const char *given, int no_bias,
                     const char *wname, char *notes, size_t notes_len, struct tp_err *err)
{
    const struct ckpt_shard *sh;
    const struct st_tensor *t;
    char name[ST_MAX_NAME + 8], module[ST_MAX_NAME];
    const char *leaf;
    int r;

    if (no_bias)
        return 0;
    if (given) {
        snprintf(name, sizeof(name), "%s", given);
    } else {
        module_of(wname, module, sizeof(module), &leaf);
        snprintf(name, sizeof(name), "%s%sbias", module, module[0] ? "." : "");
    }
    r = ckpt_find(c, name, &sh, &t, err);
    if (r < 0)
        return -1;
    if (r == 0) {
        if (given)
            return tp_err_set(err, TP_ENOTFOUND, "%s has no tensor '%.*s' (given with --bias)",
                              c->source, SHOW, name);
        note(notes, notes_len, "no bias: the checkpoint has no '%.*s'", SHOW, name);
        return 0;
    }
    if (!computable(t->dtype))
        return tp_err_set(err, TP_EINVAL, "bias '%.*s' has dtype %s, expected F32, F16, BF16 or F64",
                          SHOW, name, t->dtype_name);
    if (t->ndim != 1 || t->shape[0] != l->out)
        return tp_err_set(err, TP_EINVAL,
                          "bias '%.*s' has %d dims [%" PRId64 "%s], expected [%" PRId64
                          "] for a weight of %" PRId64 " outputs: name it with --bias or "
                          "serve without it with --no-bias",
                          SHOW, name, t->ndim, t->ndim ? t->shape[0] : 0,
                          t->ndim > 1 ? ", ..." : "", l->out, l->out);
    l->has_bias = 1;
    return fill_tensor(&l->b, sh, t, err);
}

/* Builds one linear layer of the plan from the weight called name (see find_weight). */
static int build_linear(struct ckpt *c, struct plan_linear *l, const char *name, const char *bias,
                        int no_bias, enum plan_layout layout, enum plan_split_axis split,
                        char *notes, size_t notes_len, struct tp_err *err)
{
    const struct ckpt_shard *sh;
    const struct st_tensor *w;

    *l = (struct plan_linear){.split = (uint32_t)split};
    snprintf(l->requested, sizeof(l->requested), "%s", name);
    if (find_weight(c, l, name, &sh, &w, notes, notes_len, err) < 0)
        return -1;
    if (!computable(w->dtype))
        return tp_err_set(err, TP_EINVAL,
                          "tensor '%.*s' has dtype %s, expected F32, F16, BF16 or F64", SHOW,
                          w->name, w->dtype_name);
    if (w->ndim != 2 || w->shape[0] < 1 || w->shape[1] < 1 || w->shape[0] > UINT32_MAX ||
        w->shape[1] > UINT32_MAX)
        return tp_err_set(err, TP_EINVAL, "tensor '%.*s' in %s has %d dims, expected a 2-d weight",
                          SHOW, w->name, sh->path, w->ndim);
    if (decide_layout(c, l, layout, w->name, err) < 0 || fill_tensor(&l->w, sh, w, err) < 0)
        return -1;
    l->out = l->layout == PLAN_CONV1D ? w->shape[1] : w->shape[0];
    l->in = l->layout == PLAN_CONV1D ? w->shape[0] : w->shape[1];
    /* the bias is the served module's: a tied lm_head's sibling, not the embedding's */
    return find_bias(c, l, bias, no_bias, l->tied_from[0] ? l->tied_from : w->name, notes,
                     notes_len, err);
}

/* The members of a block, by the names that architectures give them. */
static const struct {
    const char *m[PLAN_MAX_LINEAR]; /* gated: gate, up, down; mlp: fc, proj, NULL */
    enum plan_kind kind;
} block_names[] = {
    {{"gate_proj", "up_proj", "down_proj"}, PLAN_GATED}, /* Llama, Mistral, Qwen2, Gemma */
    {{"w1", "w3", "w2"}, PLAN_GATED},                    /* Mixtral's experts */
    {{"c_fc", "c_proj", NULL}, PLAN_MLP},                /* GPT-2 */
    {{"fc1", "fc2", NULL}, PLAN_MLP},                    /* OPT, Phi */
    {{"dense_h_to_4h", "dense_4h_to_h", NULL}, PLAN_MLP}, /* GPT-NeoX, Falcon */
};

/* config.json's activation names (transformers' ACT2FN), as PyTorch computes them. */
static const struct {
    const char *name;
    enum plan_act act;
} act_names[] = {
    {"silu", PLAN_ACT_SILU},          {"swish", PLAN_ACT_SILU},
    {"gelu", PLAN_ACT_GELU},          {"gelu_new", PLAN_ACT_GELU_TANH},
    {"gelu_pytorch_tanh", PLAN_ACT_GELU_TANH}, {"gelu_tanh", PLAN_ACT_GELU_TANH},
    {"relu", PLAN_ACT_RELU},
};

enum plan_act plan_act_from_name(const char *name)
{
    for (size_t i = 0; i < sizeof(act_names) / sizeof(act_names[0]); i++)
        if (strcmp(name, act_names[i].name) == 0)
            return act_names[i].act;
    return PLAN_ACT_AUTO;
}

int plan_layout_from_name(const char *name, enum plan_layout *l)
{
    if (strcmp(name, "auto") == 0)
        *l = PLAN_LAYOUT_AUTO;
    else if (strcmp(name, "linear") == 0)
        *l = PLAN_LINEAR;
    else if (strcmp(name, "conv1d") == 0)
        *l = PLAN_CONV1D;
    else
        return -1;
    return 0;
}

const char *plan_act_name(enum plan_act a)
{
    switch (a) {
    case PLAN_ACT_SILU: return "silu";
    case PLAN_ACT_GELU: return "gelu";
    case PLAN_ACT_GELU_TANH: return "gelu_tanh";
    case PLAN_ACT_RELU: return "relu";
    default: return "none";
    }
}

const char *plan_kind_name(enum plan_kind k)
{
    switch (k) {
    case PLAN_COLUMN: return "column";
    case PLAN_ROW: return "row";
    case PLAN_GATED: return "gated";
    case PLAN_MLP: return "mlp";
    default: return "auto";
    }
}

/* Whether the checkpoint holds "<block>.<member>.weight". */
static int has_member(struct ckpt *c, const char *block, const char *member, struct tp_err *err)
{
    const struct ckpt_shard *sh;
    const struct st_tensor *t;
    char name[2 * ST_MAX_NAME];

    snprintf(name, sizeof(name), "%s.%s.weight", block, member);
    return ckpt_find(c, name, &sh, &t, err);
}

/* Decides the activation: --act, else config.json's hidden_act or activation_function. */
static int decide_act(const struct ckpt *c, struct plan *p, enum plan_act asked,
                      struct tp_err *err)
{
    static const char *const keys[] = {"hidden_act", "activation_function", NULL};
    const char *v = NULL, *key = NULL;

    if (asked != PLAN_ACT_AUTO) {
        p->act = (uint32_t)asked;
        snprintf(p->act_why, sizeof(p->act_why), "given with --act");
        return 0;
    }
    for (const char *const *k = keys; *k && !v; k++)
        if ((v = ckpt_config_string(c, *k)))
            key = *k;
    if (!v)
        return tp_err_set(err, TP_EINVAL,
                          c->config ? "config.json of %s gives no hidden_act or "
                                      "activation_function: give --act silu|gelu|gelu_tanh|relu"
                                    : "no config.json beside %s says which activation the block "
                                      "applies: give --act silu|gelu|gelu_tanh|relu",
                          c->source);
    p->act = (uint32_t)plan_act_from_name(v);
    if (p->act == PLAN_ACT_AUTO)
        return tp_err_set(err, TP_EINVAL,
                          "config.json's %s is '%.64s', an activation tpd does not compute "
                          "(silu, swish, gelu, gelu_new, gelu_pytorch_tanh, relu): give --act to "
                          "serve the block with another",
                          key, v);
    snprintf(p->act_why, sizeof(p->act_why), "config.json: %s %.64s", key, v);
    return 0;
}

/* Builds a block's linear layers: finds which member names the checkpoint uses, and checks
 * that the layers chain. */
static int build_block(struct ckpt *c, struct plan *p, const struct plan_request *req,
                       char *notes, size_t notes_len, struct tp_err *err)
{
    char name[2 * ST_MAX_NAME], fused[2 * ST_MAX_NAME];
    const struct ckpt_shard *sh;
    const struct st_tensor *t;
    size_t i, nb = sizeof(block_names) / sizeof(block_names[0]);
    int r = 0, mlp_bias;
    struct plan_linear *first, *last;

    if (req->bias)
        return tp_err_set(err, TP_EINVAL,
                          "--bias names one layer's bias: a block takes each member's own "
                          "(--no-bias serves it without them)");
    if (req->row)
        return tp_err_set(err, TP_EINVAL,
                          "--parallel row is for one layer: a block splits its layers itself");
    snprintf(p->block, sizeof(p->block), "%s", req->block);
    for (i = 0; i < nb; i++) {
        r = 1;
        for (int j = 0; j < PLAN_MAX_LINEAR && block_names[i].m[j] && r == 1; j++)
            r = has_member(c, req->block, block_names[i].m[j], err);
        if (r < 0)
            return -1;
        if (r == 1)
            break;
    }
    if (i == nb) {
        snprintf(fused, sizeof(fused), "%s.gate_up_proj.weight", req->block);
        if ((r = ckpt_find(c, fused, &sh, &t, err)) != 0)
            return r < 0 ? -1
                         : tp_err_set(err, TP_EINVAL,
                                      "block '%.*s' stores gate and up as one tensor "
                                      "(gate_up_proj): tpd shards gate and up separately and does "
                                      "not split a concatenation",
                                      SHOW, req->block);
        return tp_err_set(err, TP_ENOTFOUND,
                          "%s has no MLP block '%.*s': expected %.*s.gate_proj, .up_proj and "
                          ".down_proj (Llama, Mistral, Qwen2), .w1, .w3 and .w2 (Mixtral), .c_fc "
                          "and .c_proj (GPT-2), .fc1 and .fc2 or .dense_h_to_4h and "
                          ".dense_4h_to_h weights",
                          c->source, SHOW, req->block, SHOW, req->block);
    }
    p->kind = (uint32_t)block_names[i].kind;
    p->nlin = p->kind == PLAN_GATED ? 3 : 2;
    for (uint32_t j = 0; j < p->nlin; j++) {
        snprintf(name, sizeof(name), "%s.%s", req->block, block_names[i].m[j]);
        if (build_linear(c, &p->lin[j], name, NULL, req->no_bias, req->layout,
                         j + 1 == p->nlin ? PLAN_SPLIT_IN : PLAN_SPLIT_OUT, notes, notes_len,
                         err) < 0)
            return -1;
    }
    first = &p->lin[0];
    last = &p->lin[p->nlin - 1];
    p->in = first->in;
    p->out = last->out;
    p->inter = first->out;
    for (uint32_t j = 0; j + 1 < p->nlin; j++)
        if (p->lin[j].in != p->in || p->lin[j].out != p->inter)
            goto chain;
    if (last->in != p->inter || last->out != p->in)
        goto chain;
    mlp_bias = ckpt_config_bool(c, "mlp_bias");
    if (mlp_bias == 1 && !req->no_bias)
        for (uint32_t j = 0; j < p->nlin; j++)
            if (!p->lin[j].has_bias)
                return tp_err_set(err, TP_EINVAL,
                                  "config.json sets mlp_bias true, but %s has no '%.*s.bias': "
                                  "the checkpoint is incomplete (--no-bias serves the block "
                                  "without biases)",
                                  c->source, SHOW, p->lin[j].requested);
    return decide_act(c, p, req->act, err);
chain:
    return tp_err_set(err, TP_EINVAL,
                      "the layers of block '%.*s' do not chain: %s%s%s [in %" PRId64
                      ", out %" PRId64 "] -> ... -> %s [in %" PRId64 ", out %" PRId64
                      "]; a block maps hidden -> intermediate -> hidden",
                      SHOW, req->block, block_names[i].m[0], p->nlin == 3 ? ", " : "",
                      p->nlin == 3 ? block_names[i].m[1] : "", first->in, first->out,
                      block_names[i].m[p->nlin - 1], last->in, last->out);
}

int plan_build(struct plan *p, const struct plan_request *req, char *notes, size_t notes_len,
               struct tp_err *err)
{
    struct ckpt c;
    int rc;

    *p = (struct plan){.magic = PLAN_MAGIC, .version = PLAN_VERSION};
    if (notes && notes_len)
        notes[0] = '\0';
    if (ckpt_open(&c, req->weights, err) < 0)
        return -1;
    if (req->block) {
        rc = build_block(&c, p, req, notes, notes_len, err);
    } else if (req->act != PLAN_ACT_AUTO) {
        rc = tp_err_set(err, TP_EINVAL, "--act is a block's activation: give --block MODULE");
    } else {
        p->kind = req->row ? PLAN_ROW : PLAN_COLUMN;
        p->nlin = 1;
        rc = build_linear(&c, &p->lin[0], req->weight, req->bias, req->no_bias, req->layout,
                          req->row ? PLAN_SPLIT_IN : PLAN_SPLIT_OUT, notes, notes_len, err);
        p->in = p->lin[0].in;
        p->out = p->lin[0].out;
    }
    ckpt_close(&c); /* the messages name the file, or need none: "--layout" */
    return rc;
}

static int check_tensor(const struct plan_tensor *t, const char *what, uint32_t ndim,
                        struct tp_err *err)
{
    uint64_t count;
    size_t es = tp_dtype_size((enum tp_dtype)t->dtype);

    if (!memchr(t->name, '\0', sizeof(t->name)) || !memchr(t->path, '\0', sizeof(t->path)))
        return tp_err_set(err, TP_EINVAL, "plan: %s name or path not terminated", what);
    if (!computable((enum tp_dtype)t->dtype))
        return tp_err_set(err, TP_EINVAL, "plan: %s dtype %u unknown", what, t->dtype);
    if (t->ndim != ndim || tp_shape_count(t->shape, (int)ndim, es, UINT64_MAX, &count) < 0 ||
        t->end < t->begin || t->end - t->begin != count * es)
        return tp_err_set(err, TP_EINVAL, "plan: %s shape and byte range disagree", what);
    return 0;
}

static int validate_linear(const struct plan_linear *l, uint32_t split, struct tp_err *err)
{
    if (!memchr(l->requested, '\0', sizeof(l->requested)) ||
        !memchr(l->tied_from, '\0', sizeof(l->tied_from)) ||
        !memchr(l->layout_why, '\0', sizeof(l->layout_why)))
        return tp_err_set(err, TP_EINVAL, "plan: text not terminated");
    if (l->layout != PLAN_LINEAR && l->layout != PLAN_CONV1D)
        return tp_err_set(err, TP_EINVAL, "plan: layout %u unknown", l->layout);
    if (l->split != split)
        return tp_err_set(err, TP_EINVAL, "plan: split %u, expected %u", l->split, split);
    if (l->in < 1 || l->out < 1 || l->in > UINT32_MAX || l->out > UINT32_MAX)
        return tp_err_set(err, TP_EINVAL, "plan: in %" PRId64 " out %" PRId64 " out of range",
                          l->in, l->out);
    if (check_tensor(&l->w, "weight", 2, err) < 0)
        return -1;
    if (l->w.shape[l->layout == PLAN_CONV1D ? 1 : 0] != l->out ||
        l->w.shape[l->layout == PLAN_CONV1D ? 0 : 1] != l->in)
        return tp_err_set(err, TP_EINVAL, "plan: weight shape disagrees with in and out");
    if (l->has_bias > 1)
        return tp_err_set(err, TP_EINVAL, "plan: has_bias %u", l->has_bias);
    if (l->has_bias && (check_tensor(&l->b, "bias", 1, err) < 0 || l->b.shape[0] != l->out))
        return err->code ? -1 : tp_err_set(err, TP_EINVAL, "plan: bias shape is not [out]");
    return 0;
}

int plan_validate(const struct plan *p, struct tp_err *err)
{
    uint32_t nlin;

    if (p->magic != PLAN_MAGIC || p->version != PLAN_VERSION)
        return tp_err_set(err, TP_EINVAL, "plan: magic 0x%08x version %u, expected 0x%08x %u",
                          p->magic, p->version, PLAN_MAGIC, PLAN_VERSION);
    if (!memchr(p->block, '\0', sizeof(p->block)) || !memchr(p->act_why, '\0', sizeof(p->act_why)))
        return tp_err_set(err, TP_EINVAL, "plan: text not terminated");
    switch (p->kind) {
    case PLAN_COLUMN:
    case PLAN_ROW: nlin = 1; break;
    case PLAN_GATED: nlin = 3; break;
    case PLAN_MLP: nlin = 2; break;
    default: return tp_err_set(err, TP_EINVAL, "plan: kind %u unknown", p->kind);
    }
    if (p->nlin != nlin)
        return tp_err_set(err, TP_EINVAL, "plan: %u layers for a %s model", p->nlin,
                          plan_kind_name((enum plan_kind)p->kind));
    if ((nlin == 1) != (p->act == PLAN_ACT_AUTO) || p->act > PLAN_ACT_RELU)
        return tp_err_set(err, TP_EINVAL, "plan: activation %u for a %s model", p->act,
                          plan_kind_name((enum plan_kind)p->kind));
    for (uint32_t j = 0; j < nlin; j++)
        if (validate_linear(&p->lin[j], p->kind == PLAN_COLUMN || (nlin > 1 && j + 1 < nlin)
                                            ? PLAN_SPLIT_OUT
                                            : PLAN_SPLIT_IN,
                            err) < 0)
            return -1;
    if (p->in != p->lin[0].in || p->out != p->lin[nlin - 1].out)
        return tp_err_set(err, TP_EINVAL, "plan: in and out disagree with the layers");
    if (nlin == 1)
        return p->inter == 0 ? 0 : tp_err_set(err, TP_EINVAL, "plan: inter for one layer");
    for (uint32_t j = 0; j + 1 < nlin; j++)
        if (p->lin[j].in != p->in || p->lin[j].out != p->inter)
            return tp_err_set(err, TP_EINVAL, "plan: the block's layers do not chain");
    if (p->lin[nlin - 1].in != p->inter || p->out != p->in)
        return tp_err_set(err, TP_EINVAL, "plan: the block's layers do not chain");
    return 0;
}

int plan_split(int64_t n, int nranks, int rank, int64_t *first, int64_t *count,
               struct tp_err *err)
{
    int64_t base, extra;

    if (nranks < 1 || rank < 0 || rank >= nranks)
        return tp_err_set(err, TP_EINVAL, "rank %d outside 0..%d", rank, nranks - 1);
    if (n < nranks)
        return tp_err_set(err, TP_EINVAL, "%" PRId64 " is fewer than %d ranks: every rank needs one",
                          n, nranks);
    base = n / nranks;
    extra = n % nranks;
    *count = base + (rank < extra);
    *first = (int64_t)rank * base + (rank < extra ? rank : extra);
    return 0;
}

int64_t plan_split_size(const struct plan *p, const char **what)
{
    switch (p->kind) {
    case PLAN_ROW: *what = "inputs"; return p->in;
    case PLAN_GATED:
    case PLAN_MLP: *what = "intermediate"; return p->inter;
    default: *what = "outputs"; return p->out;
    }
}

double plan_rank_macs(const struct plan *p, int nranks)
{
    const char *what;
    double share = (double)((plan_split_size(p, &what) + nranks - 1) / (nranks < 1 ? 1 : nranks));

    switch (p->kind) {
    case PLAN_ROW: return share * (double)p->out;
    case PLAN_GATED: return share * (double)(2 * p->in + p->out);
    case PLAN_MLP: return share * (double)(p->in + p->out);
    default: return share * (double)p->in;
    }
}

int plan_reduces(const struct plan *p)
{
    return p->kind != PLAN_COLUMN;
}

void plan_split_text(int64_t n, int nranks, char *buf, size_t len)
{
    size_t used = 0;

    buf[0] = '\0';
    for (int r = 0; r < nranks && used < len; r++) {
        int64_t first = 0, count = 0;
        struct tp_err err;

        if (plan_split(n, nranks, r, &first, &count, &err) < 0)
            return;
        used += (size_t)snprintf(buf + used, len - used, r ? ",%" PRId64 : "%" PRId64, count);
    }
}

/* Opens the file of t and checks that it is the file, and the tensor, of the plan. */
static int open_checked(struct st_file *f, const struct plan_tensor *t, struct tp_err *err)
{
    const struct st_tensor *now;
    struct stat st;
    int64_t mtime;

    if (st_open(f, t->path, err) < 0) {
        tp_err_prefix(err, "weights changed since start: ");
        return -1;
    }
    if (fstat(f->fd, &st) < 0)
        return tp_err_sys(err, "fstat %s", t->path);
    mtime = (int64_t)st.st_mtim.tv_sec * 1000000000 + st.st_mtim.tv_nsec;
    if ((uint64_t)st.st_dev != t->dev || (uint64_t)st.st_ino != t->ino ||
        (uint64_t)st.st_size != t->size || mtime != t->mtime_ns)
        return tp_err_set(err, TP_EINVAL,
                          "weights changed since start: %s is not the file tpd read at start "
                          "(inode %" PRIu64 ", %" PRIu64 " bytes, mtime %" PRId64
                          " ns; now inode %" PRIu64 ", %" PRIu64 " bytes, mtime %" PRId64 " ns)",
                          t->path, t->ino, t->size, t->mtime_ns, (uint64_t)st.st_ino,
                          (uint64_t)st.st_size, mtime);
    now = st_find(f, t->name);
    if (!now || (uint32_t)now->dtype != t->dtype || (uint32_t)now->ndim != t->ndim ||
        now->shape[0] != t->shape[0] || (t->ndim == 2 && now->shape[1] != t->shape[1]) ||
        now->begin != t->begin || now->end != t->end)
        return tp_err_set(err, TP_EINVAL,
                          "weights changed since start: tensor '%.*s' in %s is not the one tpd "
                          "read at start",
                          SHOW, t->name, t->path);
    return 0;
}

/* Reads the block [a0, a0 + na) x [b0, b0 + nb) of the stored 2-d tensor t [A, B] from the open,
 * checked file f: each stored row's piece in one pread (or whole blocks of rows when the piece is
 * the whole row), converted to float32 and written into w as [na, nb], or transposed as [nb, na].
 * A CONV1D layer is the transposed read of its stored [in, out]. */
static int read_block(const struct st_file *f, const struct plan_tensor *t, int64_t a0, int64_t na,
                      int64_t b0, int64_t nb, int transpose, float *w, uint64_t *bytes,
                      struct tp_err *err)
{
    enum tp_dtype dt = (enum tp_dtype)t->dtype;
    int64_t B = t->shape[1];
    size_t es = tp_dtype_size(dt), piece = (size_t)nb * es;
    size_t per = STAGE_BYTES / piece ? STAGE_BYTES / piece : 1;
    unsigned char *raw = NULL;
    float *row = NULL;
    int rc = -1;

    if (!transpose && nb == B) { /* whole rows: the file's own reader */
        uint64_t n = 0;

        if (st_read_rows_f32(f, st_find(f, t->name), a0, na, w, &n, err) < 0)
            return -1;
        *bytes += n;
        return 0;
    }
    if (per > (size_t)na)
        per = (size_t)na;
    raw = malloc(per * piece);
    row = transpose ? malloc((size_t)nb * sizeof(float)) : NULL;
    if (!raw || (transpose && !row)) {
        tp_err_set(err, TP_ENOMEM, "no memory to read %" PRId64 " columns", nb);
        goto out;
    }
    for (int64_t i0 = 0; i0 < na; i0 += (int64_t)per) {
        size_t n = (size_t)(na - i0) < per ? (size_t)(na - i0) : per;
        uint64_t off = t->begin + ((uint64_t)(a0 + i0) * (uint64_t)B + (uint64_t)b0) * es;

        if (nb == B) {
            if (fileio_pread_full(f->fd, raw, n * piece, off, err) < 0)
                goto out;
        } else {
            for (size_t i = 0; i < n; i++)
                if (fileio_pread_full(f->fd, raw + i * piece, piece,
                                      off + (uint64_t)i * (uint64_t)B * es, err) < 0)
                    goto out;
        }
        for (size_t i = 0; i < n; i++) {
            if (!transpose) {
                tp_convert_to_f32(w + ((size_t)i0 + i) * (size_t)nb, raw + i * piece, (size_t)nb,
                                  dt);
                continue;
            }
            tp_convert_to_f32(row, raw + i * piece, (size_t)nb, dt);
            for (int64_t j = 0; j < nb; j++)
                w[(size_t)j * (size_t)na + (size_t)i0 + i] = row[j];
        }
        *bytes += (uint64_t)(n * piece);
    }
    rc = 0;
out:
    free(raw);
    free(row);
    return rc;
}

/* The block [row0, row0 + rows) x [col0, col0 + cols) of W [out, in] into w [rows, cols], from the
 * open, checked file f. */
static int read_w(const struct st_file *f, const struct plan_linear *l, int64_t row0, int64_t rows,
                  int64_t col0, int64_t cols, float *w, uint64_t *bytes, struct tp_err *err)
{
    if (l->layout == PLAN_CONV1D)
        return read_block(f, &l->w, col0, cols, row0, rows, 1, w, bytes, err);
    return read_block(f, &l->w, row0, rows, col0, cols, 0, w, bytes, err);
}

/* Both readers: W whole into w, or (w NULL) in chunks through fn. */
static int read_plan(const struct plan_linear *l, int64_t row0, int64_t rows, int64_t col0,
                     int64_t cols, float *w, int64_t chunk, plan_chunk_fn fn, void *ctx, float *b,
                     uint64_t *w_bytes, uint64_t *b_bytes, struct tp_err *err)
{
    struct st_file f = {.fd = -1};
    uint64_t got_w = 0, got_b = 0;
    float *buf = NULL;

    if (row0 < 0 || rows < 1 || row0 > l->out || rows > l->out - row0 || col0 < 0 || cols < 1 ||
        col0 > l->in || cols > l->in - col0 || (!w && chunk < 1)) {
        tp_err_set(err, TP_EINVAL,
                   "rows [%" PRId64 ", %" PRId64 ") and columns [%" PRId64 ", %" PRId64
                   ") are outside the %" PRId64 " x %" PRId64 " weight",
                   row0, row0 + rows, col0, col0 + cols, l->out, l->in);
        goto fail;
    }
    if (open_checked(&f, &l->w, err) < 0)
        goto fail;
    if (w) {
        if (read_w(&f, l, row0, rows, col0, cols, w, &got_w, err) < 0)
            goto fail;
    } else {
        if (chunk > rows)
            chunk = rows;
        buf = malloc((size_t)chunk * (size_t)cols * sizeof(float));
        if (!buf) {
            tp_err_set(err, TP_ENOMEM, "no memory for %" PRId64 " rows of weights", chunk);
            goto fail;
        }
        for (int64_t r = 0; r < rows; r += chunk) {
            int64_t n = rows - r < chunk ? rows - r : chunk;

            if (read_w(&f, l, row0 + r, n, col0, cols, buf, &got_w, err) < 0 ||
                fn(ctx, r, n, buf, err) < 0)
                goto fail;
        }
    }
    st_close(&f);
    if (l->has_bias && b &&
        (open_checked(&f, &l->b, err) < 0 ||
         st_read_rows_f32(&f, st_find(&f, l->b.name), row0, rows, b, &got_b, err) < 0))
        goto fail;
    st_close(&f);
    free(buf);
    if (w_bytes)
        *w_bytes = got_w;
    if (b_bytes)
        *b_bytes = got_b;
    return 0;
fail:
    st_close(&f);
    free(buf);
    return -1;
}

int plan_read(const struct plan_linear *l, int64_t row0, int64_t rows, int64_t col0, int64_t cols,
              float *w, float *b, uint64_t *w_bytes, uint64_t *b_bytes, struct tp_err *err)
{
    if (!w)
        return tp_err_set(err, TP_EINVAL, "no buffer for the weights");
    return read_plan(l, row0, rows, col0, cols, w, 0, NULL, NULL, b, w_bytes, b_bytes, err);
}

int plan_read_chunks(const struct plan_linear *l, int64_t row0, int64_t rows, int64_t col0,
                     int64_t cols, int64_t chunk, plan_chunk_fn fn, void *ctx, float *b,
                     uint64_t *w_bytes, uint64_t *b_bytes, struct tp_err *err)
{
    return read_plan(l, row0, rows, col0, cols, NULL, chunk, fn, ctx, b, w_bytes, b_bytes, err);
}
