/* cmd_forward.c -- `tpclient forward IN [-o OUT] ...`: reads activations (.npy or raw .bin),
 * sends them in requests of at most the model's max_batch rows, writes or summarises the output,
 * and with --verify CKPT checks every element against the independent CPU reference (tests/ref)
 * on the whole layer or block, found in the checkpoint by tpd's own rules (--weight, --bias,
 * --no-bias, --layout, --block, --act as tpd takes them: lib/plan.c), so that every layout and
 * block tpd serves can be verified.
 * With --shm the tensors go through a system shared-memory region instead of the messages.
 *
 * An input has 1 to 4 dims, [in], [B, in], [B, S, in] or [A, B, S, in]: its leading dims are
 * flattened into rows, and requests are always 2-D [rows, in] chunks; the .npy output gets the
 * input's leading dims and [out] (an [in] input gives an [out] output), a .bin output is raw
 * float32 rows. A .npy input may hold float32, float16, float64 or bfloat16 (descr '<V2' or
 * '|V2', as ml_dtypes saves it; see npy.h), in C or Fortran order. A raw .bin input holds
 * elements of the type --input-dtype names, by default the model's wire datatype: never guessed
 * from the file, which carries no type; a note on stderr says what was assumed. Any other file
 * name extension (.npz, .pt, .safetensors, ...) is refused by name before anything is read.
 *
 * A model with FP16 or BF16 on the wire: input already of that type goes as it is; input of a
 * type that does not convert to it exactly (float32 or float64, and BF16 for an FP16 model or the
 * reverse) is rounded to the model's datatype here, with a note; a .npy output is float16 for
 * FP16 and float32 for BF16, every value exactly as received; and --verify feeds the reference
 * the rounded input, with a default tolerance of 1e-2. */
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cmd.h"
#include "fileio.h"
#include "kserve.h"
#include "npy.h"
#include "plan.h"
#include "ref.h"

#define MAX_BIN (4ull << 30) /* bytes of a raw .bin input */
#define MAX_RANK 4           /* dims of an input: [A, B, S, in] at most */
#define DIMS_TEXT 160        /* bytes of dims formatted for a message */

/* An input as read: float32 rows in C order, and the dims its output keeps. */
struct input {
    float *x;                   /* [rows, in], malloc'd */
    int64_t rows;               /* product of the leading dims; 1 for an [in] input */
    int nlead;                  /* leading dims: 0 for an [in] input */
    int64_t lead[MAX_RANK - 1]; /* the leading dims, outermost first */
    enum tp_dtype dtype;        /* element type in the file */
};

/* The file name's extension, from its last '.' ("x.npy" -> ".npy"), or NULL when it has none. */
static const char *extension(const char *path)
{
    const char *base = strrchr(path, '/'), *dot;

    base = base ? base + 1 : path;
    dot = strrchr(base, '.');
    return dot && dot[1] ? dot : NULL;
}

/* Sets *npy to 1 for a .npy name, 0 for .bin; anything else fails with a message naming the
 * extension. what is "input" or "output". */
static int file_format(const char *path, const char *what, int *npy, struct tp_err *err)
{
    const char *ext = extension(path);

    if (ext && strcasecmp(ext, ".npy") == 0)
        *npy = 1;
    else if (ext && strcasecmp(ext, ".bin") == 0)
        *npy = 0;
    else if (ext)
        return tp_err_set(err, TP_EINVAL,
                          "%s: unsupported %s format '%s' (expected .npy or raw .bin)", path, what,
                          ext);
    else
        return tp_err_set(err, TP_EINVAL,
                          "%s: unsupported %s format, the name has no extension (expected .npy "
                          "or raw .bin)",
                          path, what);
    return 0;
}

static void format_dims(char *buf, size_t cap, const int64_t *dims, int ndim)
{
    size_t n = (size_t)snprintf(buf, cap, "[");

    for (int i = 0; i < ndim && n < cap; i++)
        n += (size_t)snprintf(buf + n, cap - n, i ? ", %lld" : "%lld", (long long)dims[i]);
    if (n < cap)
        snprintf(buf + n, cap - n, "]");
}

/* Reads a .npy input and checks its shape against the model: 1 to MAX_RANK dims, the last one
 * the model's inputs, none 0. */
static int read_npy(const char *path, int64_t in, struct input *inp, struct tp_err *err)
{
    struct npy_info info;
    char dims[DIMS_TEXT];
    int last;

    if (npy_load_f32(path, &inp->x, &info, err) < 0)
        return -1;
    format_dims(dims, sizeof(dims), info.shape, info.ndim);
    last = info.ndim - 1;
    if (info.ndim == 0) {
        tp_err_set(err, TP_EINVAL,
                   "%s has shape []: a scalar, but an input has 1 to %d dims, the last one the "
                   "model's %lld inputs",
                   path, MAX_RANK, (long long)in);
        goto fail;
    }
    if (info.ndim > MAX_RANK) {
        tp_err_set(err, TP_EINVAL,
                   "%s has shape %s: %d dims, but an input has 1 to %d ([in], [B, in], "
                   "[B, S, in] or [A, B, S, in])",
                   path, dims, info.ndim, MAX_RANK);
        goto fail;
    }
    if (info.shape[last] != in) {
        tp_err_set(err, TP_EINVAL,
                   "%s has shape %s: its last dim %lld is not the model's %lld inputs", path, dims,
                   (long long)info.shape[last], (long long)in);
        goto fail;
    }
    inp->rows = 1;
    inp->nlead = last;
    for (int k = 0; k < last; k++) {
        if (info.shape[k] == 0) {
            tp_err_set(err, TP_EINVAL, "%s has shape %s: dim %d is 0, so there is nothing to send",
                       path, dims, k);
            goto fail;
        }
        inp->lead[k] = info.shape[k];
        inp->rows *= info.shape[k];
    }
    inp->dtype = info.dtype;
    if (info.dtype == TP_BF16)
        fprintf(stderr,
                "tpclient: note: %s has dtype '%s', read as bfloat16 (a 2-byte void is how "
                "ml_dtypes saves bfloat16)\n",
                path, info.descr);
    return 0;
fail:
    free(inp->x);
    inp->x = NULL;
    return -1;
}

/* Reads a raw .bin input of rows of in elements of dtype (from the flag when flag, else the
 * model's wire datatype). */
static int read_bin(const char *path, int64_t in, enum tp_dtype dtype, int flag, struct input *inp,
                    struct tp_err *err)
{
    const char *src =
        flag ? "--input-dtype" : "the model's wire datatype; --input-dtype names another";
    size_t es = tp_dtype_size(dtype);
    uint64_t size, row = (uint64_t)in * es, n;
    struct stat st;
    int fd = open(path, O_RDONLY | O_CLOEXEC);

    inp->x = NULL;
    if (fd < 0 || fstat(fd, &st) < 0) {
        tp_err_sys(err, "%s", path);
        goto fail;
    }
    if (!S_ISREG(st.st_mode)) {
        tp_err_set(err, TP_EINVAL, "%s is not a regular file", path);
        goto fail;
    }
    size = (uint64_t)st.st_size;
    if (size > MAX_BIN) {
        tp_err_set(err, TP_EINVAL, "%s has %llu bytes, over the limit of %llu", path,
                   (unsigned long long)size, MAX_BIN);
        goto fail;
    }
    if (size == 0) {
        tp_err_set(err, TP_EINVAL, "%s is empty: no rows to send", path);
        goto fail;
    }
    if (size % row != 0) {
        tp_err_set(err, TP_EINVAL,
                   "%s has %llu bytes, not a whole number of rows of %lld %s elements, %llu bytes "
                   "each (%s)",
                   path, (unsigned long long)size, (long long)in, tp_dtype_wire_name(dtype),
                   (unsigned long long)row, src);
        goto fail;
    }
    n = size / es;
    inp->x = malloc((size_t)n * sizeof(float));
    if (!inp->x) {
        tp_err_set(err, TP_ENOMEM, "no memory for the %llu values of %s", (unsigned long long)n,
                   path);
        goto fail;
    }
    if (fileio_read_f32(fd, 0, n, dtype, inp->x, err) < 0) {
        tp_err_prefix(err, "%s: ", path);
        goto fail;
    }
    close(fd);
    inp->rows = (int64_t)(size / row);
    inp->nlead = 1;
    inp->lead[0] = inp->rows;
    inp->dtype = dtype;
    fprintf(stderr, "tpclient: note: %s read as raw %s, %lld rows of %lld (%s)\n", path,
            tp_dtype_wire_name(dtype), (long long)inp->rows, (long long)in, src);
    return 0;
fail:
    if (fd >= 0)
        close(fd);
    free(inp->x);
    inp->x = NULL;
    return -1;
}

/* Rounds the input to the model's wire datatype where the file's type does not convert to it
 * exactly, so that --verify checks the server and not the rounding, and says so. FP16 and BF16
 * widen to FP32 exactly; FP64 was rounded to FP32 by the loader, and for an FP16 or BF16 model
 * rounding it once more gives the same as rounding it once, since FP32 has more than twice their
 * significand bits plus two. */
static void round_to_wire(const char *path, struct input *inp, const struct kserve_layout *l)
{
    size_t n = (size_t)(inp->rows * l->in);

    if (inp->dtype == l->dtype ||
        (l->dtype == TP_F32 && (inp->dtype == TP_F16 || inp->dtype == TP_BF16)))
        return;
    fprintf(stderr,
            "tpclient: note: %s holds %s values; the model takes %s, so they are rounded "
            "to %s (nearest even)\n",
            path, tp_dtype_wire_name(inp->dtype), tp_dtype_wire_name(l->dtype),
            tp_dtype_wire_name(l->dtype));
    if (l->dtype == TP_F32)
        return;
    for (size_t i = 0; i < n; i++) {
        uint16_t h = l->dtype == TP_F16 ? tp_f32_to_f16(inp->x[i]) : tp_f32_to_bf16(inp->x[i]);

        inp->x[i] = l->dtype == TP_F16 ? tp_f16_to_f32(h) : tp_bf16_to_f32(h);
    }
}

static int write_bin(const char *path, const float *y, size_t n, struct tp_err *err)
{
    FILE *f = fopen(path, "wbe");

    if (!f)
        return tp_err_sys(err, "%s", path);
    if (fwrite(y, sizeof(float), n, f) != n) {
        tp_err_sys(err, "writing %s", path);
        fclose(f);
        return -1;
    }
    if (fclose(f) != 0)
        return tp_err_sys(err, "writing %s", path);
    return 0;
}

static void summarise(const float *y, int ndim, const int64_t *shape, int64_t out, enum tp_dtype dt)
{
    double lo = INFINITY, hi = -INFINITY, sum = 0;
    size_t n = 1;
    char dims[DIMS_TEXT];

    for (int k = 0; k < ndim; k++)
        n *= (size_t)shape[k];
    for (size_t i = 0; i < n; i++) {
        lo = y[i] < lo ? y[i] : lo;
        hi = y[i] > hi ? y[i] : hi;
        sum += y[i];
    }
    format_dims(dims, sizeof(dims), shape, ndim);
    printf("output %s %s\n", dims, tp_dtype_wire_name(dt));
    printf("min %.6g  max %.6g  mean %.6g\n", lo, hi, sum / (double)n);
    printf("row 0:");
    for (int64_t j = 0; j < out && j < 6; j++)
        printf(" %.6g", y[j]);
    printf("%s\n", out > 6 ? " ..." : "");
}

/* Writes FP16 outputs (exact FP16 values widened to float) as a float16 .npy of n elements. */
static int save_f16(const char *path, const float *y, size_t n, int ndim, const int64_t *shape,
                    struct tp_err *err)
{
    uint16_t *h = malloc(n * sizeof(*h) + 1);
    int rc;

    if (!h)
        return tp_err_set(err, TP_ENOMEM, "no memory for %zu outputs", n);
    for (size_t i = 0; i < n; i++)
        h[i] = tp_f32_to_f16(y[i]);
    rc = npy_save_f16(path, h, ndim, shape, err);
    free(h);
    return rc;
}

/* Reads a whole linear layer of the plan into l, by tpd's own rules. */
static int read_layer(const struct plan_linear *pl, struct ref_layer *l, struct tp_err *err)
{
    *l = (struct ref_layer){.out = pl->out, .in = pl->in};
    l->w = malloc((size_t)(pl->out * pl->in) * sizeof(float));
    l->b = pl->has_bias ? malloc((size_t)pl->out * sizeof(float)) : NULL;
    if (!l->w || (pl->has_bias && !l->b))
        return tp_err_set(err, TP_ENOMEM, "no memory for a [%lld, %lld] layer",
                          (long long)pl->out, (long long)pl->in);
    return plan_read(pl, 0, pl->out, 0, pl->in, l->w, l->b, NULL, NULL, err);
}

/* Compares y with the reference. Returns the exit status. */
static int verify(const struct plan_request *req, double tol, const float *x, const float *y,
                  int64_t rows, const struct kserve_layout *l)
{
    static const enum ref_act acts[] = {[PLAN_ACT_SILU] = REF_SILU,
                                        [PLAN_ACT_GELU] = REF_GELU,
                                        [PLAN_ACT_GELU_TANH] = REF_GELU_TANH,
                                        [PLAN_ACT_RELU] = REF_RELU};
    struct ref_block blk = {0};
    struct ref_stats st;
    struct tp_err err = {0};
    struct plan p;
    double *want = NULL, *mag = NULL;
    size_t n = (size_t)(rows * l->out);
    int status = EXIT_ERROR;

    /* the model is found and read by tpd's own rules (the plan), each matrix whole */
    if (plan_build(&p, req, NULL, 0, &err) < 0) {
        cmd_error("--verify: %s", err.msg);
        return EXIT_ERROR;
    }
    if (p.in != l->in || p.out != l->out) {
        cmd_error("--verify: %s holds a %s model of %lld inputs and %lld outputs ('%s'), the "
                  "server's has %lld and %lld",
                  req->weights, plan_kind_name((enum plan_kind)p.kind), (long long)p.in,
                  (long long)p.out, p.block[0] ? p.block : p.lin[0].w.name, (long long)l->in,
                  (long long)l->out);
        return EXIT_ERROR;
    }
    /* one layer: up; gated: gate, up, down; mlp: up (fc), down (proj) */
    if (p.nlin == 1 ? read_layer(&p.lin[0], &blk.up, &err) < 0
        : p.nlin == 3
            ? read_layer(&p.lin[0], &blk.gate, &err) < 0 ||
                  read_layer(&p.lin[1], &blk.up, &err) < 0 ||
                  read_layer(&p.lin[2], &blk.down, &err) < 0
            : read_layer(&p.lin[0], &blk.up, &err) < 0 ||
                  read_layer(&p.lin[1], &blk.down, &err) < 0) {
        cmd_error("--verify: %s", err.msg);
        goto out;
    }
    want = malloc(n * sizeof(double));
    mag = malloc(n * sizeof(double));
    if (!want || !mag) {
        cmd_error("--verify: no memory for the reference");
        goto out;
    }
    if (p.nlin == 1) {
        ref_linear(&blk.up, x, rows, want, mag);
    } else {
        blk.gated = p.nlin == 3;
        blk.act = acts[p.act];
        ref_block(&blk, x, rows, want, mag);
    }
    ref_compare(y, want, mag, n, &st);
    printf("verify: max abs error %.3g, max rel error %.3g (tolerance %.3g): %s\n", st.max_abs,
           st.max_rel, tol, st.max_rel <= tol ? "ok" : "FAILED");
    if (st.max_rel <= tol) {
        status = 0;
    } else {
        printf("verify: worst element row %lld column %lld: got %.9g, expected %.9g\n",
               (long long)(st.worst / l->out), (long long)(st.worst % l->out), y[st.worst],
               want[st.worst]);
        status = EXIT_VERIFY;
    }
out:
    free(want);
    free(mag);
    ref_block_free(&blk);
    return status;
}

int cmd_forward(struct conn *c, int argc, char **argv)
{
    const char *in_path = NULL, *out_path = NULL, *model_opt = NULL, *verify_path = NULL;
    struct plan_request vreq = {.weight = "weight"};
    double tol = 0;
    char model[256];
    struct kserve_layout l;
    struct tp_err err = {0};
    struct input inp = {0};
    float *y = NULL;
    int64_t chunk, oshape[MAX_RANK];
    int status = EXIT_ERROR, use_shm = 0, in_npy = 0, out_npy = 0, ondim;
    enum tp_dtype bin_dtype = TP_DTYPE_INVALID;
    struct kserve_shm shm = {0};

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        int has_val = i + 1 < argc;

        if ((strcmp(a, "-o") == 0 || strcmp(a, "--output") == 0) && has_val)
            out_path = argv[++i];
        else if (strcmp(a, "--model") == 0 && has_val)
            model_opt = argv[++i];
        else if (strcmp(a, "--verify") == 0 && has_val)
            verify_path = argv[++i];
        else if (strcmp(a, "--weight") == 0 && has_val)
            vreq.weight = argv[++i];
        else if (strcmp(a, "--bias") == 0 && has_val)
            vreq.bias = argv[++i];
        else if (strcmp(a, "--no-bias") == 0)
            vreq.no_bias = 1;
        else if (strcmp(a, "--block") == 0 && has_val)
            vreq.block = argv[++i];
        else if (strcmp(a, "--act") == 0 && has_val) {
            const char *v = argv[++i];

            vreq.act = plan_act_from_name(v);
            if (vreq.act == PLAN_ACT_AUTO) {
                cmd_error("forward: --act takes silu, gelu, gelu_tanh or relu, got '%s'", v);
                return EXIT_USAGE;
            }
        }
        else if (strcmp(a, "--layout") == 0 && has_val) {
            const char *v = argv[++i];

            vreq.layout = strcmp(v, "linear") == 0   ? PLAN_LINEAR
                          : strcmp(v, "conv1d") == 0 ? PLAN_CONV1D
                                                     : PLAN_LAYOUT_AUTO;
            if (vreq.layout == PLAN_LAYOUT_AUTO && strcmp(v, "auto") != 0) {
                cmd_error("forward: --layout takes auto, linear or conv1d, got '%s'", v);
                return EXIT_USAGE;
            }
        }
        else if (strcmp(a, "--shm") == 0)
            use_shm = 1;
        else if (strcmp(a, "--input-dtype") == 0 && has_val) {
            bin_dtype = tp_dtype_from_flag(argv[++i]);
            if (bin_dtype == TP_DTYPE_INVALID) {
                cmd_error("forward: --input-dtype takes fp32, fp16 or bf16, got '%s'", argv[i]);
                return EXIT_USAGE;
            }
        } else if (strcmp(a, "--tolerance") == 0 && has_val) {
            char *end;

            tol = strtod(argv[++i], &end);
            if (*end || end == argv[i] || !(tol > 0)) {
                cmd_error("forward: --tolerance takes a positive number, got '%s'", argv[i]);
                return EXIT_USAGE;
            }
        } else if (a[0] == '-' && a[1]) {
            cmd_error("forward: unknown option or missing value '%s'", a);
            return EXIT_USAGE;
        } else if (!in_path)
            in_path = a;
        else {
            cmd_error("forward: unexpected argument '%s'", a);
            return EXIT_USAGE;
        }
    }
    if (vreq.bias && vreq.no_bias) {
        cmd_error("forward: --bias and --no-bias are exclusive");
        return EXIT_USAGE;
    }
    if (!in_path) {
        cmd_error("forward: no input file (usage: tpclient forward IN [-o OUT])");
        return EXIT_USAGE;
    }
    /* the names decide the formats: refuse what cannot be read or written before any call */
    if (file_format(in_path, "input", &in_npy, &err) < 0 ||
        (out_path && file_format(out_path, "output", &out_npy, &err) < 0)) {
        cmd_error("%s", err.msg);
        return EXIT_USAGE;
    }
    if (in_npy && bin_dtype != TP_DTYPE_INVALID) {
        cmd_error("forward: --input-dtype is for raw .bin input; %s names its own dtype", in_path);
        return EXIT_USAGE;
    }
    if (kserve_model(c, model_opt, model, sizeof(model), &err) < 0)
        goto fail;
    if (kserve_layout(c, model, &l, &err) < 0)
        goto fail;
    if (in_npy ? read_npy(in_path, l.in, &inp, &err) < 0
               : read_bin(in_path, l.in, bin_dtype != TP_DTYPE_INVALID ? bin_dtype : l.dtype,
                          bin_dtype != TP_DTYPE_INVALID, &inp, &err) < 0)
        goto fail;
    round_to_wire(in_path, &inp, &l);
    if (tol == 0)
        tol = l.dtype == TP_F32 ? 1e-5 : 1e-2;
    y = malloc((size_t)(inp.rows * l.out) * sizeof(float));
    if (!y) {
        tp_err_set(&err, TP_ENOMEM, "no memory for %lld output rows", (long long)inp.rows);
        goto fail;
    }
    /* the server takes [rows, in] requests of at most max_batch rows, whatever the input's rank */
    chunk = l.max_batch > 0 && l.max_batch < inp.rows ? l.max_batch : inp.rows;
    if (use_shm &&
        kserve_shm_open(c, (size_t)(chunk * l.in) * 4, (size_t)(chunk * l.out) * 4, &shm, &err) < 0)
        goto fail;
    for (int64_t r0 = 0; r0 < inp.rows; r0 += chunk) {
        int64_t n = inp.rows - r0 < chunk ? inp.rows - r0 : chunk;

        if (use_shm ? kserve_infer_shm(c, model, &l, &shm, inp.x + r0 * l.in, n, y + r0 * l.out,
                                       &err) < 0
                    : kserve_infer(c, model, &l, inp.x + r0 * l.in, n, y + r0 * l.out, &err) < 0)
            goto fail;
    }
    kserve_shm_close(c, &shm);
    /* the output keeps the input's leading dims: [A, B, S, in] gives [A, B, S, out] */
    ondim = inp.nlead + 1;
    memcpy(oshape, inp.lead, (size_t)inp.nlead * sizeof(int64_t));
    oshape[inp.nlead] = l.out;
    if (out_path) {
        size_t n = (size_t)(inp.rows * l.out);

        if (out_npy && l.dtype == TP_F16) {
            if (save_f16(out_path, y, n, ondim, oshape, &err) < 0)
                goto fail;
        } else if (out_npy ? npy_save_f32(out_path, y, ondim, oshape, &err) < 0
                           : write_bin(out_path, y, n, &err) < 0) {
            goto fail;
        }
    } else {
        summarise(y, ondim, oshape, l.out, l.dtype);
    }
    vreq.weights = verify_path;
    status = verify_path ? verify(&vreq, tol, inp.x, y, inp.rows, &l) : 0;
    free(inp.x);
    free(y);
    return status;
fail:
    kserve_shm_close(c, &shm);
    cmd_error("%s", err.msg);
    free(inp.x);
    free(y);
    return EXIT_ERROR;
}
