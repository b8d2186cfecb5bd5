/* npy.c -- loading and saving NumPy .npy files (see npy.h). tpclient reads request inputs and
 * writes response outputs with it, and the tests read the seed cases. The header dict is a Python
 * literal; it is never evaluated, but read by a small strict parser that accepts exactly the three
 * keys numpy writes, each once, and nothing but whitespace around them. Every size the header
 * implies is checked against the caps in npy.h, and when loading against the real file size,
 * before anything is allocated. Data is little-endian, as on every host tpd runs on; a
 * Fortran-order array is read as it lies and then transposed into C order, which costs a second
 * buffer of the same size for as long as the transpose runs. */
#include "npy.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fileio.h"

#define MAGIC "\x93NUMPY"
#define MAGIC_LEN 6
#define ALIGN 64       /* numpy starts the data at a multiple of this many bytes */
#define MAX_STR 32     /* bytes kept of a key or string value, with the NUL */
#define SHAPE_TEXT 200 /* bytes of a shape formatted for a message */

enum { KEY_DESCR, KEY_FORTRAN, KEY_SHAPE, NKEYS };

static const char *const keys[NKEYS] = {"descr", "fortran_order", "shape"};

/* Position in the header dict; offsets in messages count from the dict's first byte. */
struct cursor {
    const char *p;
    const char *start;
    const char *end;
};

static size_t pos(const struct cursor *c)
{
    return (size_t)(c->p - c->start);
}

static void skip_ws(struct cursor *c)
{
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\t' || *c->p == '\n' || *c->p == '\r'))
        c->p++;
}

static int eat(struct cursor *c, char ch)
{
    if (c->p < c->end && *c->p == ch) {
        c->p++;
        return 1;
    }
    return 0;
}

static int syntax(const struct cursor *c, const char *expected, struct tp_err *err)
{
    if (c->p >= c->end)
        return tp_err_set(err, TP_EINVAL,
                          "malformed header dict: expected %s at byte %zu, "
                          "found the end of the header",
                          expected, pos(c));
    if (*c->p >= 0x20 && *c->p < 0x7f)
        return tp_err_set(err, TP_EINVAL,
                          "malformed header dict: expected %s at byte %zu, "
                          "found '%c'",
                          expected, pos(c), *c->p);
    return tp_err_set(err, TP_EINVAL,
                      "malformed header dict: expected %s at byte %zu, "
                      "found byte 0x%02x",
                      expected, pos(c), (unsigned char)*c->p);
}

/* A quoted string without escapes, printable ASCII only, so that it can go into a message. */
static int parse_str(struct cursor *c, char *out, const char *expected, struct tp_err *err)
{
    size_t at = pos(c), n = 0;
    char quote;

    if (c->p >= c->end || (*c->p != '\'' && *c->p != '"'))
        return syntax(c, expected, err);
    quote = *c->p++;
    for (;;) {
        if (c->p >= c->end)
            return tp_err_set(err, TP_EINVAL,
                              "unterminated string at byte %zu of the header "
                              "dict",
                              at);
        if (*c->p == quote)
            break;
        if (*c->p == '\\' || *c->p < 0x20 || *c->p >= 0x7f)
            return tp_err_set(err, TP_EINVAL,
                              "unsupported character 0x%02x in the string at "
                              "byte %zu of the header dict",
                              (unsigned char)*c->p, at);
        if (n + 1 >= MAX_STR)
            return tp_err_set(err, TP_EINVAL,
                              "string at byte %zu of the header dict is longer "
                              "than %d bytes",
                              at, MAX_STR - 1);
        out[n++] = *c->p++;
    }
    c->p++;
    out[n] = '\0';
    return 0;
}

/* A decimal integer with an optional minus sign; the caller rejects negative values. */
static int parse_int(struct cursor *c, int64_t *v, struct tp_err *err)
{
    size_t at = pos(c);
    uint64_t u = 0;
    int neg = eat(c, '-');

    if (c->p >= c->end || *c->p < '0' || *c->p > '9')
        return syntax(c, "an integer", err);
    while (c->p < c->end && *c->p >= '0' && *c->p <= '9') {
        unsigned d = (unsigned)(*c->p++ - '0');

        if (u > ((uint64_t)INT64_MAX - d) / 10)
            return tp_err_set(err, TP_EINVAL,
                              "dim at byte %zu of the header dict does not "
                              "fit in 64 bits",
                              at);
        u = u * 10 + d;
    }
    *v = neg ? -(int64_t)u : (int64_t)u;
    return 0;
}

static void format_shape(char *buf, size_t cap, const int64_t *shape, int ndim)
{
    size_t n = (size_t)snprintf(buf, cap, "(");

    for (int i = 0; i < ndim && n < cap; i++)
        n += (size_t)snprintf(buf + n, cap - n, i ? ", %" PRId64 : "%" PRId64, shape[i]);
    if (n < cap)
        snprintf(buf + n, cap - n, ndim == 1 ? ",)" : ")");
}

/* A tuple of non-negative integers: "()", "(5,)", "(4, 8)", "(4, 8,)". "(5)" is an int in
 * Python, not a tuple, and is rejected. */
static int parse_shape(struct cursor *c, struct npy_info *info, struct tp_err *err)
{
    int n = 0;

    if (!eat(c, '('))
        return syntax(c, "a tuple for 'shape'", err);
    skip_ws(c);
    while (!eat(c, ')')) {
        int64_t v = 0;

        if (parse_int(c, &v, err) < 0)
            return -1;
        if (v < 0)
            return tp_err_set(err, TP_EINVAL, "negative dim %" PRId64 " in shape", v);
        if (n == TP_MAX_DIMS)
            return tp_err_set(err, TP_EINVAL, "shape has more than %d dims", TP_MAX_DIMS);
        info->shape[n++] = v;
        skip_ws(c);
        if (n == 1 && c->p < c->end && *c->p == ')')
            return tp_err_set(err, TP_EINVAL,
                              "shape (%" PRId64 ") is not a tuple (a 1-tuple "
                              "needs a trailing comma)",
                              v);
        if (!eat(c, ',') && !(c->p < c->end && *c->p == ')'))
            return syntax(c, "',' or ')' in shape", err);
        skip_ws(c);
    }
    info->ndim = n;
    return 0;
}

/* The descrs npy.h lists, each with its type. '<V2' and '|V2' are bfloat16 (see npy.h). */
static const struct {
    const char *descr;
    enum tp_dtype dtype;
} descrs[] = {
    {"<f4", TP_F32}, {"<f2", TP_F16}, {"<f8", TP_F64}, {"<V2", TP_BF16}, {"|V2", TP_BF16},
};

static int parse_descr(struct cursor *c, struct npy_info *info, struct tp_err *err)
{
    char s[MAX_STR];

    if (c->p < c->end && *c->p != '\'' && *c->p != '"')
        return tp_err_set(err, TP_EINVAL,
                          "descr at byte %zu is not a string (structured "
                          "dtypes are not supported)",
                          pos(c));
    if (parse_str(c, s, "a string for 'descr'", err) < 0)
        return -1;
    for (size_t i = 0; i < sizeof(descrs) / sizeof(descrs[0]); i++)
        if (strcmp(s, descrs[i].descr) == 0) {
            info->dtype = descrs[i].dtype;
            memcpy(info->descr, s, strlen(s) + 1);
            return 0;
        }
    if (s[0] == '>' && s[1] == 'f')
        return tp_err_set(err, TP_EINVAL,
                          "big-endian dtype '%s' is not supported (save it little-endian, "
                          "'<%s')",
                          s, s + 1);
    return tp_err_set(err, TP_EINVAL,
                      "unsupported dtype '%s' (expected '<f4', '<f2', '<f8', or '<V2' or '|V2' "
                      "for bfloat16)",
                      s);
}

static int parse_fortran(struct cursor *c, struct npy_info *info, struct tp_err *err)
{
    char word[8];
    size_t n = 0;

    while (c->p < c->end && n + 1 < sizeof(word) &&
           ((*c->p >= 'a' && *c->p <= 'z') || (*c->p >= 'A' && *c->p <= 'Z')))
        word[n++] = *c->p++;
    word[n] = '\0';
    if (strcmp(word, "False") == 0 || strcmp(word, "True") == 0) {
        info->fortran_order = word[0] == 'T';
        return 0;
    }
    return syntax(c, "True or False for 'fortran_order'", err);
}

static int parse_dict(struct cursor *c, struct npy_info *info, struct tp_err *err)
{
    unsigned seen = 0;

    skip_ws(c);
    if (!eat(c, '{'))
        return tp_err_set(err, TP_EINVAL, "header is not a dict (expected '{' at byte %zu)",
                          pos(c));
    for (;;) {
        char key[MAX_STR];
        int k;

        skip_ws(c);
        if (eat(c, '}'))
            break;
        if (parse_str(c, key, "a quoted key or '}'", err) < 0)
            return -1;
        for (k = 0; k < NKEYS && strcmp(key, keys[k]) != 0; k++)
            ;
        if (k == NKEYS)
            return tp_err_set(err, TP_EINVAL, "unknown key '%s' in header dict", key);
        if (seen & (1u << k))
            return tp_err_set(err, TP_EINVAL, "duplicate key '%s' in header dict", key);
        seen |= 1u << k;
        skip_ws(c);
        if (!eat(c, ':'))
            return syntax(c, "':'", err);
        skip_ws(c);
        if (k == KEY_DESCR && parse_descr(c, info, err) < 0)
            return -1;
        if (k == KEY_FORTRAN && parse_fortran(c, info, err) < 0)
            return -1;
        if (k == KEY_SHAPE && parse_shape(c, info, err) < 0)
            return -1;
        skip_ws(c);
        if (eat(c, ','))
            continue;
        if (eat(c, '}'))
            break;
        return syntax(c, "',' or '}'", err);
    }
    skip_ws(c);
    if (c->p != c->end)
        return syntax(c, "only whitespace after the dict", err);
    for (int k = 0; k < NKEYS; k++)
        if (!(seen & (1u << k)))
            return tp_err_set(err, TP_EINVAL, "header dict lacks key '%s'", keys[k]);
    return 0;
}

/* The magic, version and header length: where the dict starts and how long it is. Needs only
 * the first 10 (version 1.0) or 12 (2.0, 3.0) bytes. */
static int parse_preamble(const unsigned char *b, size_t len, size_t *dict_start,
                          uint32_t *dict_len, struct tp_err *err)
{
    size_t m = len < MAGIC_LEN ? len : MAGIC_LEN;

    if (m > 0 && memcmp(b, MAGIC, m) != 0)
        return tp_err_set(err, TP_EINVAL, "bad magic (not a .npy file)");
    if (len < MAGIC_LEN + 4)
        return tp_err_set(err, TP_EINVAL, "only %zu bytes, too short for a .npy preamble", len);
    if (b[6] == 1 && b[7] == 0) {
        *dict_start = 10;
        *dict_len = (uint32_t)b[8] | (uint32_t)b[9] << 8;
    } else if ((b[6] == 2 || b[6] == 3) && b[7] == 0) {
        if (len < 12)
            return tp_err_set(err, TP_EINVAL,
                              "only %zu bytes, too short for a .npy %u.0 "
                              "preamble",
                              len, b[6]);
        *dict_start = 12;
        *dict_len =
            (uint32_t)b[8] | (uint32_t)b[9] << 8 | (uint32_t)b[10] << 16 | (uint32_t)b[11] << 24;
    } else {
        return tp_err_set(err, TP_EINVAL,
                          "unsupported .npy version %u.%u (expected 1.0, 2.0 "
                          "or 3.0)",
                          b[6], b[7]);
    }
    if (*dict_len > NPY_MAX_HEADER)
        return tp_err_set(err, TP_EINVAL,
                          "header length %" PRIu32 " exceeds the limit of %u "
                          "bytes",
                          *dict_len, NPY_MAX_HEADER);
    return 0;
}

int npy_parse_header(const void *buf, size_t len, struct npy_info *info, struct tp_err *err)
{
    struct npy_info ni = {.dtype = TP_DTYPE_INVALID};
    struct cursor c;
    size_t start;
    uint32_t dict_len;

    if (parse_preamble(buf, len, &start, &dict_len, err) < 0)
        return -1;
    if (dict_len > len - start)
        return tp_err_set(err, TP_EINVAL,
                          "header length %" PRIu32 " runs past the end of the "
                          "data (%zu bytes after the preamble)",
                          dict_len, len - start);
    c.start = c.p = (const char *)buf + start;
    c.end = c.start + dict_len;
    if (parse_dict(&c, &ni, err) < 0)
        return -1;
    if (tp_shape_count(ni.shape, ni.ndim, tp_dtype_size(ni.dtype), NPY_MAX_DATA, &ni.count) < 0) {
        char s[SHAPE_TEXT];

        format_shape(s, sizeof(s), ni.shape, ni.ndim);
        return tp_err_set(err, TP_EINVAL,
                          "shape %s of %s exceeds the limit of %llu bytes of "
                          "data",
                          s, tp_dtype_file_name(ni.dtype), NPY_MAX_DATA);
    }
    ni.data_offset = start + dict_len;
    *info = ni;
    return 0;
}

/* Rearranges the column-major array src of the given shape into C order at dst. Walks dst in
 * order, keeping the multi-index and the matching offset into src; the first axis of src is the
 * one that varies fastest. */
static void fortran_to_c(float *dst, const float *src, const int64_t *shape, int ndim,
                         uint64_t count)
{
    int64_t idx[TP_MAX_DIMS] = {0}, stride[TP_MAX_DIMS];
    uint64_t off = 0;

    for (int k = 0; k < ndim; k++)
        stride[k] = k ? stride[k - 1] * shape[k - 1] : 1;
    for (uint64_t i = 0; i < count; i++) {
        dst[i] = src[off];
        for (int k = ndim - 1; k >= 0; k--) {
            off += (uint64_t)stride[k];
            if (++idx[k] < shape[k])
                break;
            off -= (uint64_t)(shape[k] * stride[k]);
            idx[k] = 0;
        }
    }
}

int npy_load_f32(const char *path, float **data, struct npy_info *info, struct tp_err *err)
{
    unsigned char pre[12], *hdr = NULL;
    float *out = NULL, *col = NULL;
    struct npy_info ni;
    struct stat st;
    uint64_t size, expect;
    size_t start, need;
    uint32_t dict_len;
    int fd;

    *data = NULL;
    fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK); /* a FIFO is refused, not waited on */
    if (fd < 0) {
        tp_err_sys(err, "opening");
        goto fail;
    }
    if (fstat(fd, &st) < 0) {
        tp_err_sys(err, "fstat");
        goto fail;
    }
    if (!S_ISREG(st.st_mode)) {
        tp_err_set(err, TP_EINVAL, "not a regular file");
        goto fail;
    }
    size = (uint64_t)st.st_size;
    /* The preamble says how long the header is; read that much and no more. */
    need = size < sizeof(pre) ? (size_t)size : sizeof(pre);
    if (fileio_pread_full(fd, pre, need, 0, err) < 0 ||
        parse_preamble(pre, need, &start, &dict_len, err) < 0)
        goto fail;
    need = start + dict_len;
    if (need > size)
        need = (size_t)size; /* npy_parse_header then says the header runs past the end */
    hdr = malloc(need);
    if (!hdr) {
        tp_err_set(err, TP_ENOMEM, "no memory for a header of %zu bytes", need);
        goto fail;
    }
    if (fileio_pread_full(fd, hdr, need, 0, err) < 0 || npy_parse_header(hdr, need, &ni, err) < 0)
        goto fail;
    expect = ni.data_offset + ni.count * tp_dtype_size(ni.dtype);
    if (size != expect) {
        tp_err_set(err, TP_EINVAL,
                   "file is %" PRIu64 " bytes but its header says %" PRIu64
                   " (%zu of header, %" PRIu64 " of data)",
                   size, expect, ni.data_offset, expect - ni.data_offset);
        goto fail;
    }
    if (ni.count > SIZE_MAX / sizeof(float)) {
        tp_err_set(err, TP_ENOMEM, "%" PRIu64 " elements do not fit in memory", ni.count);
        goto fail;
    }
    out = malloc(ni.count ? (size_t)ni.count * sizeof(float) : 1);
    if (!out) {
        tp_err_set(err, TP_ENOMEM, "no memory for %" PRIu64 " floats", ni.count);
        goto fail;
    }
    if (fileio_read_f32(fd, ni.data_offset, ni.count, ni.dtype, out, err) < 0)
        goto fail;
    /* with one dim or fewer, or a single element, both orders are the same bytes */
    if (ni.fortran_order && ni.ndim > 1 && ni.count > 1) {
        col = out;
        out = malloc((size_t)ni.count * sizeof(float));
        if (!out) {
            tp_err_set(err, TP_ENOMEM,
                       "no memory for %" PRIu64 " floats to transpose the fortran-order array",
                       ni.count);
            goto fail;
        }
        fortran_to_c(out, col, ni.shape, ni.ndim, ni.count);
        free(col);
        col = NULL;
    }
    free(hdr);
    close(fd);
    *data = out;
    *info = ni;
    return 0;
fail:
    tp_err_prefix(err, "%s: ", path);
    free(hdr);
    free(out);
    free(col);
    if (fd >= 0)
        close(fd);
    return -1;
}

static int write_full(int fd, const void *buf, size_t n)
{
    size_t done = 0;

    while (done < n) {
        ssize_t w = write(fd, (const char *)buf + done, n - done);

        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0)
            return -1;
        done += (size_t)w;
    }
    return 0;
}

/* The preamble and a header dict padded with spaces and ended by '\n', as numpy writes it, so
 * that the data starts at a multiple of ALIGN. Returns the length; buf holds 512 bytes, enough
 * for TP_MAX_DIMS dims of 19 digits. */
static size_t build_header(char *buf, const char *descr, int ndim, const int64_t *shape)
{
    char s[SHAPE_TEXT];
    size_t n, total;

    format_shape(s, sizeof(s), shape, ndim);
    memcpy(buf, MAGIC "\x01\x00", MAGIC_LEN + 2);
    n = 10 + (size_t)snprintf(buf + 10, 512 - 10,
                              "{'descr': '%s', 'fortran_order': False, 'shape': %s, }", descr, s);
    total = (n + 1 + ALIGN - 1) / ALIGN * ALIGN;
    memset(buf + n, ' ', total - 1 - n);
    buf[total - 1] = '\n';
    buf[8] = (char)((total - 10) & 0xff);
    buf[9] = (char)((total - 10) >> 8);
    return total;
}

/* Writes count elements of esize bytes described by descr ('<f4', '<f2'). */
static int save(const char *path, const void *data, const char *descr, size_t esize, int ndim,
                const int64_t *shape, struct tp_err *err)
{
    char tmp[PATH_MAX], hdr[512];
    uint64_t count;
    size_t hlen;
    int fd = -1, created = 0;

    if (ndim < 0 || ndim > TP_MAX_DIMS || (ndim > 0 && !shape)) {
        tp_err_set(err, TP_EINVAL, "ndim %d outside 0..%d", ndim, TP_MAX_DIMS);
        goto fail;
    }
    for (int i = 0; i < ndim; i++)
        if (shape[i] < 0) {
            tp_err_set(err, TP_EINVAL, "negative dim %" PRId64 " in shape", shape[i]);
            goto fail;
        }
    if (tp_shape_count(shape, ndim, esize, NPY_MAX_DATA, &count) < 0) {
        char s[SHAPE_TEXT];

        format_shape(s, sizeof(s), shape, ndim);
        tp_err_set(err, TP_EINVAL, "shape %s exceeds the limit of %llu bytes of data", s,
                   NPY_MAX_DATA);
        goto fail;
    }
    if (count && !data) {
        tp_err_set(err, TP_EINVAL, "data is NULL for a shape of %" PRIu64 " elements", count);
        goto fail;
    }
    if ((size_t)snprintf(tmp, sizeof(tmp), "%s.tmp.%ld", path, (long)getpid()) >= sizeof(tmp)) {
        tp_err_set(err, TP_EINVAL, "path longer than %d bytes", PATH_MAX);
        goto fail;
    }
    hlen = build_header(hdr, descr, ndim, shape);
    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0644);
    if (fd < 0) {
        tp_err_sys(err, "creating %s", tmp);
        goto fail;
    }
    created = 1;
    if (write_full(fd, hdr, hlen) < 0 || write_full(fd, data, (size_t)count * esize) < 0) {
        tp_err_sys(err, "writing %s", tmp);
        goto fail;
    }
    /* Without fsync a crash after the rename can leave an empty file under the final name. */
    if (fsync(fd) < 0) {
        tp_err_sys(err, "fsync of %s", tmp);
        goto fail;
    }
    if (close(fd) < 0) {
        fd = -1;
        tp_err_sys(err, "closing %s", tmp);
        goto fail;
    }
    fd = -1;
    if (rename(tmp, path) < 0) {
        tp_err_sys(err, "renaming %s", tmp);
        goto fail;
    }
    return 0;
fail:
    tp_err_prefix(err, "%s: ", path);
    if (fd >= 0)
        close(fd);
    if (created)
        unlink(tmp);
    return -1;
}

int npy_save_f32(const char *path, const float *data, int ndim, const int64_t *shape,
                 struct tp_err *err)
{
    return save(path, data, "<f4", 4, ndim, shape, err);
}

int npy_save_f16(const char *path, const uint16_t *data, int ndim, const int64_t *shape,
                 struct tp_err *err)
{
    return save(path, data, "<f2", 2, ndim, shape, err);
}
