/* plan.c -- building, checking and reading the layer's plan (see plan.h). The coordinator builds
 * it (plan_build), every worker checks it (plan_validate) and reads its rows by it (plan_read),
 * and tpclient reads a whole layer by it for --verify. Deciding how a weight is stored is the one
 * guess this file refuses to make: a checkpoint says it (config.json's model_type), the user says
 * it (--layout), or the layer is not served. */
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
static int find_weight(struct ckpt *c, struct plan *p, const char *name,
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
            snprintf(p->tied_from, sizeof(p->tied_from), "lm_head.weight");
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
static int decide_layout(const struct ckpt *c, struct plan *p, enum plan_layout asked,
                         const char *wname, struct tp_err *err)
{
    const char *type = ckpt_config_string(c, "model_type"), *leaf;
    char module[ST_MAX_NAME];

    module_of(wname, module, sizeof(module), &leaf);
    if (asked != PLAN_LAYOUT_AUTO) {
        p->layout = (uint32_t)asked;
        snprintf(p->layout_why, sizeof(p->layout_why), "given with --layout");
        return 0;
    }
    if (p->tied_from[0]) {
        p->layout = PLAN_LINEAR;
        snprintf(p->layout_why, sizeof(p->layout_why), "an input embedding is [vocab, hidden]");
        return 0;
    }
    if (type && in_list(type, conv1d_models)) {
        if (in_list(leaf, conv1d_leaves)) {
            p->layout = PLAN_CONV1D;
            snprintf(p->layout_why, sizeof(p->layout_why),
                     "config.json: model_type %.32s stores %.32s as Conv1D", type, leaf);
            return 0;
        }
        if (in_list(leaf, linear_leaves)) {
            p->layout = PLAN_LINEAR;
            snprintf(p->layout_why, sizeof(p->layout_why),
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
        p->layout = PLAN_LINEAR;
        snprintf(p->layout_why, sizeof(p->layout_why),
                 "config.json: model_type %.32s uses nn.Linear", type);
        return 0;
    }
    if (in_list(leaf, conv1d_leaves))
        return tp_err_set(err, TP_EINVAL,
                          "'%.*s' is named like a GPT-2 Conv1D weight (stored [in, out]) and no "
                          "config.json says which model this is: give --layout conv1d or "
                          "--layout linear",
                          SHOW, wname);
    p->layout = PLAN_LINEAR;
    snprintf(p->layout_why, sizeof(p->layout_why),
             c->config ? "config.json has no model_type: [out, in] as nn.Linear"
                       : "no config.json: [out, in] as nn.Linear");
    return 0;
}

/* Finds b: the name given, else W's sibling "<module>.bias" when it exists. */
static int find_bias(struct ckpt *c, struct plan *p, const struct plan_request *req,
                     const char *wname, char *notes, size_t notes_len, struct tp_err *err)
{
    const struct ckpt_shard *sh;
    const struct st_tensor *t;
    char name[ST_MAX_NAME + 8], module[ST_MAX_NAME];
    const char *leaf;
    int r;

    if (req->no_bias)
        return 0;
    if (req->bias) {
        snprintf(name, sizeof(name), "%s", req->bias);
    } else {
        module_of(wname, module, sizeof(module), &leaf);
        snprintf(name, sizeof(name), "%s%sbias", module, module[0] ? "." : "");
    }
    r = ckpt_find(c, name, &sh, &t, err);
    if (r < 0)
        return -1;
    if (r == 0) {
        if (req->bias)
            return tp_err_set(err, TP_ENOTFOUND, "%s has no tensor '%.*s' (given with --bias)",
                              c->source, SHOW, name);
        note(notes, notes_len, "no bias: the checkpoint has no '%.*s'", SHOW, name);
        return 0;
    }
    if (!computable(t->dtype))
        return tp_err_set(err, TP_EINVAL, "bias '%.*s' has dtype %s, expected F32, F16, BF16 or F64",
                          SHOW, name, t->dtype_name);
    if (t->ndim != 1 || t->shape[0] != p->out)
        return tp_err_set(err, TP_EINVAL,
                          "bias '%.*s' has %d dims [%" PRId64 "%s], expected [%" PRId64
                          "] for a weight of %" PRId64 " outputs: name it with --bias or "
                          "serve without it with --no-bias",
                          SHOW, name, t->ndim, t->ndim ? t->shape[0] : 0,
                          t->ndim > 1 ? ", ..." : "", p->out, p->out);
    p->has_bias = 1;
    return fill_tensor(&p->b, sh, t, err);
}

int plan_build(struct plan *p, const struct plan_request *req, char *notes, size_t notes_len,
               struct tp_err *err)
{
    struct ckpt c;
    const struct ckpt_shard *sh;
    const struct st_tensor *w;

    *p = (struct plan){.magic = PLAN_MAGIC, .version = PLAN_VERSION};
    if (notes && notes_len)
        notes[0] = '\0';
    if (ckpt_open(&c, req->weights, err) < 0)
        return -1;
    snprintf(p->requested, sizeof(p->requested), "%s", req->weight);
    if (find_weight(&c, p, req->weight, &sh, &w, notes, notes_len, err) < 0)
        goto fail;
    if (!computable(w->dtype)) {
        tp_err_set(err, TP_EINVAL, "tensor '%.*s' has dtype %s, expected F32, F16, BF16 or F64",
                   SHOW, w->name, w->dtype_name);
        goto fail;
    }
    if (w->ndim != 2 || w->shape[0] < 1 || w->shape[1] < 1 || w->shape[0] > UINT32_MAX ||
        w->shape[1] > UINT32_MAX) {
        tp_err_set(err, TP_EINVAL, "tensor '%.*s' in %s has %d dims, expected a 2-d weight",
                   SHOW, w->name, sh->path, w->ndim);
        goto fail;
    }
    if (decide_layout(&c, p, req->layout, w->name, err) < 0 || fill_tensor(&p->w, sh, w, err) < 0)
        goto fail;
    p->out = p->layout == PLAN_CONV1D ? w->shape[1] : w->shape[0];
    p->in = p->layout == PLAN_CONV1D ? w->shape[0] : w->shape[1];
    /* the bias is the served module's: a tied lm_head's sibling, not the embedding's */
    if (find_bias(&c, p, req, p->tied_from[0] ? p->tied_from : w->name, notes, notes_len, err) < 0)
        goto fail;
    ckpt_close(&c);
    return 0;
fail:
    ckpt_close(&c); /* the messages name the file, or need none: "--layout" */
    return -1;
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

int plan_validate(const struct plan *p, struct tp_err *err)
{
    if (p->magic != PLAN_MAGIC || p->version != PLAN_VERSION)
        return tp_err_set(err, TP_EINVAL, "plan: magic 0x%08x version %u, expected 0x%08x %u",
                          p->magic, p->version, PLAN_MAGIC, PLAN_VERSION);
    if (!memchr(p->requested, '\0', sizeof(p->requested)) ||
        !memchr(p->tied_from, '\0', sizeof(p->tied_from)) ||
        !memchr(p->layout_why, '\0', sizeof(p->layout_why)))
        return tp_err_set(err, TP_EINVAL, "plan: text not terminated");
    if (p->layout != PLAN_LINEAR && p->layout != PLAN_CONV1D)
        return tp_err_set(err, TP_EINVAL, "plan: layout %u unknown", p->layout);
    if (p->in < 1 || p->out < 1 || p->in > UINT32_MAX || p->out > UINT32_MAX)
        return tp_err_set(err, TP_EINVAL, "plan: in %" PRId64 " out %" PRId64 " out of range",
                          p->in, p->out);
    if (check_tensor(&p->w, "weight", 2, err) < 0)
        return -1;
    if (p->w.shape[p->layout == PLAN_CONV1D ? 1 : 0] != p->out ||
        p->w.shape[p->layout == PLAN_CONV1D ? 0 : 1] != p->in)
        return tp_err_set(err, TP_EINVAL, "plan: weight shape disagrees with in and out");
    if (p->has_bias > 1)
        return tp_err_set(err, TP_EINVAL, "plan: has_bias %u", p->has_bias);
    if (p->has_bias && (check_tensor(&p->b, "bias", 1, err) < 0 || p->b.shape[0] != p->out))
        return err->code ? -1 : tp_err_set(err, TP_EINVAL, "plan: bias shape is not [out]");
    return 0;
}

int plan_split(int64_t out, int nranks, int rank, int64_t *row0, int64_t *rows, struct tp_err *err)
{
    int64_t base, extra;

    if (nranks < 1 || rank < 0 || rank >= nranks)
        return tp_err_set(err, TP_EINVAL, "rank %d outside 0..%d", rank, nranks - 1);
    if (out < nranks)
        return tp_err_set(err, TP_EINVAL,
                          "out %" PRId64 " is smaller than %d ranks: every rank needs a row", out,
                          nranks);
    base = out / nranks;
    extra = out % nranks;
    *rows = base + (rank < extra);
    *row0 = (int64_t)rank * base + (rank < extra ? rank : extra);
    return 0;
}

void plan_split_text(int64_t out, int nranks, char *buf, size_t len)
{
    size_t n = 0;

    buf[0] = '\0';
    for (int r = 0; r < nranks && n < len; r++) {
        int64_t row0 = 0, rows = 0;
        struct tp_err err;

        if (plan_split(out, nranks, r, &row0, &rows, &err) < 0)
            return;
        n += (size_t)snprintf(buf + n, len - n, r ? ",%" PRId64 : "%" PRId64, rows);
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

/* CONV1D: output rows [row0, row0 + rows) of W are columns of the stored [in, out] tensor. Each
 * stored row's column range is read (one pread each, or whole blocks of rows when the range is
 * every column), converted, and written transposed into w [rows, in]. */
static int read_columns(const struct st_file *f, const struct plan *p, int64_t row0,
                        int64_t rows, float *w, uint64_t *bytes, struct tp_err *err)
{
    enum tp_dtype dt = (enum tp_dtype)p->w.dtype;
    size_t es = tp_dtype_size(dt), piece = (size_t)rows * es;
    size_t per = STAGE_BYTES / piece ? STAGE_BYTES / piece : 1;
    unsigned char *raw = NULL;
    float *row = NULL;
    int rc = -1;

    if (per > (size_t)p->in)
        per = (size_t)p->in;
    raw = malloc(per * piece);
    row = malloc((size_t)rows * sizeof(float));
    if (!raw || !row) {
        tp_err_set(err, TP_ENOMEM, "no memory to read %" PRId64 " columns", rows);
        goto out;
    }
    for (int64_t k0 = 0; k0 < p->in; k0 += (int64_t)per) {
        size_t n = (size_t)(p->in - k0) < per ? (size_t)(p->in - k0) : per;
        uint64_t off = p->w.begin + ((uint64_t)k0 * (uint64_t)p->out + (uint64_t)row0) * es;

        if (rows == p->out) {
            if (fileio_pread_full(f->fd, raw, n * piece, off, err) < 0)
                goto out;
        } else {
            for (size_t k = 0; k < n; k++)
                if (fileio_pread_full(f->fd, raw + k * piece, piece,
                                      off + (uint64_t)k * (uint64_t)p->out * es, err) < 0)
                    goto out;
        }
        for (size_t k = 0; k < n; k++) {
            tp_convert_to_f32(row, raw + k * piece, (size_t)rows, dt);
            for (int64_t j = 0; j < rows; j++)
                w[(size_t)j * (size_t)p->in + (size_t)k0 + k] = row[j];
        }
        *bytes += (uint64_t)(n * piece);
    }
    rc = 0;
out:
    free(raw);
    free(row);
    return rc;
}

/* Output rows [row0, row0 + rows) of W into w [rows, in], from the open, checked file f. */
static int read_w(const struct st_file *f, const struct plan *p, int64_t row0, int64_t rows,
                  float *w, uint64_t *bytes, struct tp_err *err)
{
    uint64_t n = 0;

    if (p->layout == PLAN_CONV1D)
        return read_columns(f, p, row0, rows, w, bytes, err);
    if (st_read_rows_f32(f, st_find(f, p->w.name), row0, rows, w, &n, err) < 0)
        return -1;
    *bytes += n;
    return 0;
}

/* Both readers: W whole into w, or (w NULL) in chunks through fn. */
static int read_plan(const struct plan *p, int64_t row0, int64_t rows, float *w, int64_t chunk,
                     plan_chunk_fn fn, void *ctx, float *b, uint64_t *w_bytes, uint64_t *b_bytes,
                     struct tp_err *err)
{
    struct st_file f = {.fd = -1};
    uint64_t got_w = 0, got_b = 0;
    float *buf = NULL;

    if (row0 < 0 || rows < 1 || row0 > p->out || rows > p->out - row0 || (!w && chunk < 1)) {
        tp_err_set(err, TP_EINVAL,
                   "rows [%" PRId64 ", %" PRId64 ") are outside the %" PRId64 " outputs", row0,
                   row0 + rows, p->out);
        goto fail;
    }
    if (open_checked(&f, &p->w, err) < 0)
        goto fail;
    if (w) {
        if (read_w(&f, p, row0, rows, w, &got_w, err) < 0)
            goto fail;
    } else {
        if (chunk > rows)
            chunk = rows;
        buf = malloc((size_t)chunk * (size_t)p->in * sizeof(float));
        if (!buf) {
            tp_err_set(err, TP_ENOMEM, "no memory for %" PRId64 " rows of weights", chunk);
            goto fail;
        }
        for (int64_t r = 0; r < rows; r += chunk) {
            int64_t n = rows - r < chunk ? rows - r : chunk;

            if (read_w(&f, p, row0 + r, n, buf, &got_w, err) < 0 || fn(ctx, r, n, buf, err) < 0)
                goto fail;
        }
    }
    st_close(&f);
    if (p->has_bias && (open_checked(&f, &p->b, err) < 0 ||
                        st_read_rows_f32(&f, st_find(&f, p->b.name), row0, rows, b, &got_b,
                                         err) < 0))
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

int plan_read(const struct plan *p, int64_t row0, int64_t rows, float *w, float *b,
              uint64_t *w_bytes, uint64_t *b_bytes, struct tp_err *err)
{
    if (!w)
        return tp_err_set(err, TP_EINVAL, "no buffer for the weights");
    return read_plan(p, row0, rows, w, 0, NULL, NULL, b, w_bytes, b_bytes, err);
}

int plan_read_chunks(const struct plan *p, int64_t row0, int64_t rows, int64_t chunk,
                     plan_chunk_fn fn, void *ctx, float *b, uint64_t *w_bytes, uint64_t *b_bytes,
                     struct tp_err *err)
{
    return read_plan(p, row0, rows, NULL, chunk, fn, ctx, b, w_bytes, b_bytes, err);
}
