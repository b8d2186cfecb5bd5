/* cmd_forward.c -- `tpclient forward IN [-o OUT] ...`: reads activations (.npy or raw .bin),
 * sends them in requests of at most the model's max_batch rows, writes or summarises the output,
 * and with --verify checks every element against the independent CPU reference (tests/ref).
 * With --shm the tensors go through a system shared-memory region instead of the messages.
 * A model with FP16 or BF16 on the wire: .npy float16 input goes as it is (to BF16 rounded),
 * float32 input is rounded to the model's datatype here, with a note; a .npy output is float16
 * for FP16 and float32 for BF16 (NumPy has no bfloat16), every value exactly as received; and
 * --verify feeds the reference the rounded input, with a default tolerance of 1e-2. */
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cmd.h"
#include "kserve.h"
#include "npy.h"
#include "ref.h"

#define MAX_BIN (4ull << 30)

static int ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), m = strlen(suffix);

    return n >= m && strcmp(s + n - m, suffix) == 0;
}

/* Reads a raw float32 file of rows x in. */
static int read_bin(const char *path, int64_t in, float **x, int64_t *rows, struct tp_err *err)
{
    struct stat st;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    size_t got = 0;

    *x = NULL;
    if (fd < 0 || fstat(fd, &st) < 0) {
        tp_err_sys(err, "%s", path);
        goto fail;
    }
    if (st.st_size == 0 || (uint64_t)st.st_size % ((uint64_t)in * 4) != 0 ||
        (uint64_t)st.st_size > MAX_BIN) {
        tp_err_set(err, TP_EINVAL,
                   "%s has %lld bytes, not a whole number of rows of %lld float32 (%lld bytes)",
                   path, (long long)st.st_size, (long long)in, (long long)in * 4);
        goto fail;
    }
    *x = malloc((size_t)st.st_size);
    if (!*x) {
        tp_err_set(err, TP_ENOMEM, "no memory for %s", path);
        goto fail;
    }
    while (got < (size_t)st.st_size) {
        ssize_t n = read(fd, (char *)*x + got, (size_t)st.st_size - got);

        if (n <= 0) {
            tp_err_sys(err, "reading %s", path);
            goto fail;
        }
        got += (size_t)n;
    }
    close(fd);
    *rows = st.st_size / (in * 4);
    return 0;
fail:
    if (fd >= 0)
        close(fd);
    free(*x);
    *x = NULL;
    return -1;
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

static void summarise(const float *y, int64_t rows, int64_t out, enum tp_dtype dt)
{
    double lo = INFINITY, hi = -INFINITY, sum = 0;
    size_t n = (size_t)(rows * out);

    for (size_t i = 0; i < n; i++) {
        lo = y[i] < lo ? y[i] : lo;
        hi = y[i] > hi ? y[i] : hi;
        sum += y[i];
    }
    printf("output [%lld, %lld] %s\n", (long long)rows, (long long)out, tp_dtype_wire_name(dt));
    printf("min %.6g  max %.6g  mean %.6g\n", lo, hi, sum / (double)n);
    printf("row 0:");
    for (int64_t j = 0; j < out && j < 6; j++)
        printf(" %.6g", y[j]);
    printf("%s\n", out > 6 ? " ..." : "");
}

/* Writes FP16 outputs (exact FP16 values widened to float) as a float16 .npy. */
static int save_f16(const char *path, const float *y, const int64_t *shape, struct tp_err *err)
{
    size_t n = (size_t)(shape[0] * shape[1]);
    uint16_t *h = malloc(n * sizeof(*h) + 1);
    int rc;

    if (!h)
        return tp_err_set(err, TP_ENOMEM, "no memory for %zu outputs", n);
    for (size_t i = 0; i < n; i++)
        h[i] = tp_f32_to_f16(y[i]);
    rc = npy_save_f16(path, h, 2, shape, err);
    free(h);
    return rc;
}

/* Compares y with the reference. Returns the exit status. */
static int verify(const char *path, const char *weight, const char *bias, double tol,
                  const float *x, const float *y, int64_t rows, const struct kserve_layout *l)
{
    struct ref_layer layer;
    struct ref_stats st;
    struct tp_err err = {0};
    double *want = NULL, *mag = NULL;
    size_t n = (size_t)(rows * l->out);
    int status = EXIT_ERROR;

    if (ref_layer_load(&layer, path, weight, bias, &err) < 0) {
        cmd_error("--verify: %s", err.msg);
        return EXIT_ERROR;
    }
    if (layer.in != l->in || layer.out != l->out) {
        cmd_error("--verify: %s holds a [%lld, %lld] layer, the model is [%lld, %lld]", path,
                  (long long)layer.out, (long long)layer.in, (long long)l->out, (long long)l->in);
        goto out;
    }
    want = malloc(n * sizeof(double));
    mag = malloc(n * sizeof(double));
    if (!want || !mag) {
        cmd_error("--verify: no memory for the reference");
        goto out;
    }
    ref_linear(&layer, x, rows, want, mag);
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
    ref_layer_free(&layer);
    return status;
}

int cmd_forward(struct conn *c, int argc, char **argv)
{
    const char *in_path = NULL, *out_path = NULL, *model_opt = NULL, *verify_path = NULL;
    const char *weight = "weight", *bias = NULL;
    double tol = 0;
    char model[256];
    struct kserve_layout l;
    struct npy_info info;
    struct tp_err err = {0};
    float *x = NULL, *y = NULL;
    int64_t rows = 0, chunk;
    int status = EXIT_ERROR, use_shm = 0;
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
            weight = argv[++i];
        else if (strcmp(a, "--bias") == 0 && has_val)
            bias = argv[++i];
        else if (strcmp(a, "--shm") == 0)
            use_shm = 1;
        else if (strcmp(a, "--tolerance") == 0 && has_val) {
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
    if (!in_path) {
        cmd_error("forward: no input file (usage: tpclient forward IN [-o OUT])");
        return EXIT_USAGE;
    }
    if (kserve_model(c, model_opt, model, sizeof(model), &err) < 0)
        goto fail;
    if (kserve_layout(c, model, &l, &err) < 0)
        goto fail;
    if (ends_with(in_path, ".npy")) {
        if (npy_load_f32(in_path, &x, &info, &err) < 0)
            goto fail;
        if (!((info.ndim == 2 && info.shape[1] == l.in) ||
              (info.ndim == 1 && info.shape[0] == l.in)) ||
            info.count == 0) {
            tp_err_set(&err, TP_EINVAL, "%s has %d dims [%lld, ...], the model takes [B, %lld]",
                       in_path, info.ndim, (long long)(info.ndim ? info.shape[0] : 0),
                       (long long)l.in);
            goto fail;
        }
        rows = info.ndim == 2 ? info.shape[0] : 1;
    } else if (read_bin(in_path, l.in, &x, &rows, &err) < 0) {
        goto fail;
    } else {
        info.dtype = TP_F32;
    }
    if (l.dtype != TP_F32 && info.dtype != l.dtype) {
        size_t n = (size_t)(rows * l.in);

        /* what the server will see, so that --verify checks the server and not the rounding */
        fprintf(stderr,
                "tpclient: note: %s holds %s values; the model takes %s, so they are rounded "
                "to %s (nearest even)\n",
                in_path, tp_dtype_wire_name(info.dtype), tp_dtype_wire_name(l.dtype),
                tp_dtype_wire_name(l.dtype));
        for (size_t i = 0; i < n; i++) {
            uint16_t h = l.dtype == TP_F16 ? tp_f32_to_f16(x[i]) : tp_f32_to_bf16(x[i]);

            x[i] = l.dtype == TP_F16 ? tp_f16_to_f32(h) : tp_bf16_to_f32(h);
        }
    }
    if (tol == 0)
        tol = l.dtype == TP_F32 ? 1e-5 : 1e-2;
    y = malloc((size_t)(rows * l.out) * sizeof(float));
    if (!y) {
        tp_err_set(&err, TP_ENOMEM, "no memory for %lld output rows", (long long)rows);
        goto fail;
    }
    chunk = l.max_batch > 0 && l.max_batch < rows ? l.max_batch : rows;
    if (use_shm &&
        kserve_shm_open(c, (size_t)(chunk * l.in) * 4, (size_t)(chunk * l.out) * 4, &shm, &err) < 0)
        goto fail;
    for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
        int64_t n = rows - r0 < chunk ? rows - r0 : chunk;

        if (use_shm
                ? kserve_infer_shm(c, model, &l, &shm, x + r0 * l.in, n, y + r0 * l.out, &err) < 0
                : kserve_infer(c, model, &l, x + r0 * l.in, n, y + r0 * l.out, &err) < 0)
            goto fail;
    }
    kserve_shm_close(c, &shm);
    if (out_path) {
        int64_t shape[2] = {rows, l.out};

        if (ends_with(out_path, ".npy") && l.dtype == TP_F16) {
            if (save_f16(out_path, y, shape, &err) < 0)
                goto fail;
        } else if (ends_with(out_path, ".npy")
                       ? npy_save_f32(out_path, y, 2, shape, &err) < 0
                       : write_bin(out_path, y, (size_t)(rows * l.out), &err) < 0) {
            goto fail;
        }
    } else {
        summarise(y, rows, l.out, l.dtype);
    }
    status = verify_path ? verify(verify_path, weight, bias, tol, x, y, rows, &l) : 0;
    free(x);
    free(y);
    return status;
fail:
    kserve_shm_close(c, &shm);
    cmd_error("%s", err.msg);
    free(x);
    free(y);
    return EXIT_ERROR;
}
