/* safetensors.c -- reading a safetensors file by tensor rows (see safetensors.h). Workers read
 * their own rows of W with it, the reference and the tests whole tensors. Only the header is
 * read at open; it is parsed with cJSON and every value in it is checked before it is trusted:
 * numbers must be exact integers (cJSON keeps them as doubles), each tensor's byte range must
 * match its shape and dtype, lie inside the file and overlap no other tensor. After that, row
 * reads need no checks beyond the row range. Tensors of dtypes tpd does not compute with are
 * checked all the same, so that a file is accepted or refused whole at open; only a dtype
 * string outside the format's list has no element size to check its shape against. */
#include "safetensors.h"

#include <cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fileio.h"

#define EXACT_LIMIT 9007199254740992.0 /* 2^53: a double below it that is integral is exact */
#define SHOW 64                        /* bytes of a name or dtype from the file in a message */
#define SHAPE_TEXT 200                 /* bytes of a shape formatted for a message */

/* The dtypes of the safetensors format and the bytes of one element. */
static const struct {
    const char *name;
    size_t size;
} spec_dtypes[] = {{"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E5M2", 1}, {"F8_E4M3", 1},
                   {"I16", 2},  {"U16", 2}, {"F16", 2}, {"BF16", 2},    {"I32", 4},
                   {"U32", 4},  {"F32", 4}, {"F64", 8}, {"I64", 8},     {"U64", 8}};

/* Bytes of an element of the dtype called name; 0 for a name outside the format's list. */
static size_t spec_size(const char *name)
{
    for (size_t i = 0; i < sizeof(spec_dtypes) / sizeof(spec_dtypes[0]); i++)
        if (strcmp(name, spec_dtypes[i].name) == 0)
            return spec_dtypes[i].size;
    return 0;
}

/* Copies a string from the file for a message: control bytes become '?' so that the message
 * stays one line, and a long string is cut with "...". */
static const char *show(const char *s, char *buf)
{
    size_t n = 0;

    for (; n < SHOW - 1 && s[n]; n++)
        buf[n] = ((unsigned char)s[n] < 0x20 || s[n] == 0x7f) ? '?' : s[n];
    buf[n] = '\0';
    if (s[n])
        memcpy(buf + SHOW - 4, "...", 4);
    return buf;
}

/* The dtype string as a table keeps it: cut to fit, control bytes as '?', so that it can be
 * printed as it is. */
static void keep_dtype_name(char *dst, const char *s)
{
    size_t n = 0;

    for (; n < ST_MAX_DTYPE_NAME - 1 && s[n]; n++)
        dst[n] = ((unsigned char)s[n] < 0x20 || s[n] == 0x7f) ? '?' : s[n];
    dst[n] = '\0';
}

static void format_shape(char *buf, size_t cap, const int64_t *shape, int ndim)
{
    size_t n = (size_t)snprintf(buf, cap, "[");

    for (int i = 0; i < ndim && n < cap; i++)
        n += (size_t)snprintf(buf + n, cap - n, i ? ", %" PRId64 : "%" PRId64, shape[i]);
    if (n < cap)
        snprintf(buf + n, cap - n, "]");
}

/* A JSON number that is a non-negative integer exactly representable as a double. */
static int get_uint(const cJSON *item, uint64_t *v)
{
    double d;

    if (!cJSON_IsNumber(item))
        return -1;
    d = item->valuedouble;
    if (!(d >= 0 && d < EXACT_LIMIT) || (double)(uint64_t)d != d)
        return -1;
    *v = (uint64_t)d;
    return 0;
}

/* Says what a bad number was, for "shape[1] is -3, expected ...". */
static const char *describe(const cJSON *item, char *buf, size_t cap)
{
    if (cJSON_IsNumber(item))
        snprintf(buf, cap, "%.17g", item->valuedouble);
    else if (cJSON_IsString(item))
        snprintf(buf, cap, "a string");
    else
        snprintf(buf, cap, "not a number");
    return buf;
}

/* Fills t from one entry of the header; data_start and file_size bound its byte range. */
static int parse_tensor(struct st_tensor *t, const cJSON *item, uint64_t data_start,
                        uint64_t file_size, struct tp_err *err)
{
    const cJSON *dtype, *shape, *offs, *d;
    char nm[SHOW], dt[SHOW], sh[SHAPE_TEXT], what[40];
    uint64_t begin = 0, end = 0, count, v;
    size_t len = strlen(item->string), es;
    int i;

    show(item->string, nm);
    if (len >= ST_MAX_NAME)
        return tp_err_set(err, TP_EINVAL, "tensor name '%s' is %zu bytes, longer than %d", nm, len,
                          ST_MAX_NAME - 1);
    memcpy(t->name, item->string, len + 1);
    if (!cJSON_IsObject(item))
        return tp_err_set(err, TP_EINVAL, "tensor '%s' is not a JSON object", nm);
    dtype = cJSON_GetObjectItemCaseSensitive(item, "dtype");
    shape = cJSON_GetObjectItemCaseSensitive(item, "shape");
    offs = cJSON_GetObjectItemCaseSensitive(item, "data_offsets");
    if (!cJSON_IsString(dtype))
        return tp_err_set(err, TP_EINVAL, "tensor '%s' has no dtype string", nm);
    /* F32, F16, BF16 and F64 can be read; every other dtype is kept by name only */
    t->dtype = tp_dtype_from_file_name(dtype->valuestring);
    keep_dtype_name(t->dtype_name, dtype->valuestring);
    es = spec_size(dtype->valuestring);
    show(dtype->valuestring, dt);
    if (!cJSON_IsArray(shape))
        return tp_err_set(err, TP_EINVAL, "tensor '%s' has no shape array", nm);
    t->ndim = cJSON_GetArraySize(shape);
    if (t->ndim > TP_MAX_DIMS)
        return tp_err_set(err, TP_EINVAL, "tensor '%s' has %d dims, at most %d are supported", nm,
                          t->ndim, TP_MAX_DIMS);
    i = 0;
    cJSON_ArrayForEach(d, shape)
    {
        if (get_uint(d, &v) < 0)
            return tp_err_set(err, TP_EINVAL,
                              "tensor '%s' has shape[%d] %s, expected a "
                              "non-negative integer",
                              nm, i, describe(d, what, sizeof(what)));
        t->shape[i++] = (int64_t)v;
    }
    if (!cJSON_IsArray(offs) || cJSON_GetArraySize(offs) != 2)
        return tp_err_set(err, TP_EINVAL,
                          "tensor '%s' has no data_offsets array of 2 "
                          "integers",
                          nm);
    i = 0;
    cJSON_ArrayForEach(d, offs)
    {
        if (get_uint(d, i ? &end : &begin) < 0)
            return tp_err_set(err, TP_EINVAL,
                              "tensor '%s' has data_offsets[%d] %s, expected a "
                              "non-negative integer",
                              nm, i, describe(d, what, sizeof(what)));
        i++;
    }
    if (begin > end)
        return tp_err_set(err, TP_EINVAL,
                          "tensor '%s' has data_offsets [%" PRIu64 ", %" PRIu64
                          "] with begin after end",
                          nm, begin, end);
    if (end > file_size - data_start)
        return tp_err_set(err, TP_EINVAL,
                          "tensor '%s' has data_offsets [%" PRIu64 ", %" PRIu64
                          "] past the end of the %" PRIu64 "-byte data section",
                          nm, begin, end, file_size - data_start);
    t->begin = data_start + begin;
    t->end = data_start + end;
    /* a dtype outside the format's list (a newer format's F4, a typo) has no known element size:
     * its bytes stay inside the file and apart from the others, which is all a reader needs to
     * skip it safely */
    if (es == 0)
        return 0;
    format_shape(sh, sizeof(sh), t->shape, t->ndim);
    if (tp_shape_count(t->shape, t->ndim, es, UINT64_MAX, &count) < 0)
        return tp_err_set(err, TP_EINVAL, "tensor '%s' has shape %s whose size overflows 64 bits",
                          nm, sh);
    if (count * es != end - begin)
        return tp_err_set(err, TP_EINVAL,
                          "tensor '%s' has shape %s of %s (%" PRIu64 " bytes) "
                          "but data_offsets [%" PRIu64 ", %" PRIu64 "] hold %" PRIu64 " bytes",
                          nm, sh, dt, count * es, begin, end, end - begin);
    return 0;
}

static int by_begin(const void *a, const void *b)
{
    const struct st_tensor *x = *(const struct st_tensor *const *)a;
    const struct st_tensor *y = *(const struct st_tensor *const *)b;

    if (x->begin != y->begin)
        return x->begin < y->begin ? -1 : 1;
    return x->end < y->end ? -1 : x->end > y->end;
}

static int by_name(const void *a, const void *b)
{
    const struct st_tensor *x = *(const struct st_tensor *const *)a;
    const struct st_tensor *y = *(const struct st_tensor *const *)b;

    return strcmp(x->name, y->name);
}

/* Duplicate names and overlapping byte ranges, found in sorted order so that a header with
 * ST_MAX_TENSORS entries costs n log n, not n^2. An empty range overlaps nothing. */
static int check_table(const struct st_tensor *tab, int n, uint64_t data_start, struct tp_err *err)
{
    const struct st_tensor **s = malloc((size_t)(n ? n : 1) * sizeof(*s));
    const struct st_tensor *last = NULL; /* the non-empty range that ends furthest */
    char a[SHOW], b[SHOW];
    int rc = -1;

    if (!s)
        return tp_err_set(err, TP_ENOMEM, "no memory to check %d tensors", n);
    for (int i = 0; i < n; i++)
        s[i] = &tab[i];
    qsort(s, (size_t)n, sizeof(*s), by_name);
    for (int i = 1; i < n; i++)
        if (strcmp(s[i - 1]->name, s[i]->name) == 0) {
            tp_err_set(err, TP_EINVAL, "duplicate tensor name '%s'", show(s[i]->name, a));
            goto out;
        }
    qsort(s, (size_t)n, sizeof(*s), by_begin);
    for (int i = 0; i < n; i++) {
        if (s[i]->begin == s[i]->end)
            continue;
        if (last && last->end > s[i]->begin) {
            tp_err_set(err, TP_EINVAL,
                       "tensors '%s' and '%s' overlap: data_offsets [%" PRIu64 ", %" PRIu64
                       "] and [%" PRIu64 ", %" PRIu64 "]",
                       show(last->name, a), show(s[i]->name, b), last->begin - data_start,
                       last->end - data_start, s[i]->begin - data_start, s[i]->end - data_start);
            goto out;
        }
        if (!last || s[i]->end > last->end)
            last = s[i];
    }
    rc = 0;
out:
    free(s);
    return rc;
}

int st_parse_header(struct st_file *f, const char *hdr, size_t hdr_len, uint64_t data_start,
                    uint64_t file_size, struct tp_err *err)
{
    struct st_tensor *tab = NULL;
    const char *end = NULL;
    cJSON *root = NULL;
    const cJSON *item;
    int n = 0, i = 0;

    if (data_start > file_size) {
        tp_err_set(err, TP_EINVAL,
                   "data section starts at byte %" PRIu64 ", past the end of "
                   "the %" PRIu64 "-byte file",
                   data_start, file_size);
        goto fail;
    }
    root = cJSON_ParseWithLengthOpts(hdr, hdr_len, &end, 0);
    if (!root) {
        tp_err_set(err, TP_EINVAL, "header is not valid JSON (error at byte %td of %zu)",
                   end ? end - hdr : (ptrdiff_t)0, hdr_len);
        goto fail;
    }
    /* The format allows padding the header with spaces; anything else after the JSON is not. */
    for (; end < hdr + hdr_len; end++)
        if (*end != ' ' && *end != '\t' && *end != '\n' && *end != '\r') {
            tp_err_set(err, TP_EINVAL, "header has data after the JSON at byte %td of %zu",
                       end - hdr, hdr_len);
            goto fail;
        }
    if (!cJSON_IsObject(root)) {
        tp_err_set(err, TP_EINVAL, "header is not a JSON object");
        goto fail;
    }
    cJSON_ArrayForEach(item, root)
    {
        if (strcmp(item->string, "__metadata__") != 0 && ++n > ST_MAX_TENSORS) {
            tp_err_set(err, TP_EINVAL, "header has more than %d tensors", ST_MAX_TENSORS);
            goto fail;
        }
    }
    /* At least one entry, so that an open file always has a table (see st_close). */
    tab = calloc((size_t)(n ? n : 1), sizeof(*tab));
    if (!tab) {
        tp_err_set(err, TP_ENOMEM, "no memory for %d tensors", n);
        goto fail;
    }
    cJSON_ArrayForEach(item, root)
    {
        if (strcmp(item->string, "__metadata__") == 0)
            continue;
        if (parse_tensor(&tab[i++], item, data_start, file_size, err) < 0)
            goto fail;
    }
    if (check_table(tab, n, data_start, err) < 0)
        goto fail;
    cJSON_Delete(root);
    f->tensors = tab;
    f->ntensors = n;
    return 0;
fail:
    cJSON_Delete(root);
    free(tab);
    f->tensors = NULL;
    f->ntensors = 0;
    return -1;
}

int st_open(struct st_file *f, const char *path, struct tp_err *err)
{
    unsigned char len8[8];
    char *hdr = NULL;
    struct stat st;
    uint64_t n = 0;

    *f = (struct st_file){.fd = -1};
    /* O_NONBLOCK: a FIFO opens at once and is refused below, instead of blocking the open;
     * reads of a regular file ignore the flag */
    f->fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (f->fd < 0) {
        tp_err_sys(err, "opening");
        goto fail;
    }
    if (fstat(f->fd, &st) < 0) {
        tp_err_sys(err, "fstat");
        goto fail;
    }
    if (!S_ISREG(st.st_mode)) {
        tp_err_set(err, TP_EINVAL, "not a regular file");
        goto fail;
    }
    f->file_size = (uint64_t)st.st_size;
    if (f->file_size < sizeof(len8)) {
        tp_err_set(err, TP_EINVAL,
                   "file is %" PRIu64 " bytes, too short for the 8-byte header "
                   "length",
                   f->file_size);
        goto fail;
    }
    if (fileio_pread_full(f->fd, len8, sizeof(len8), 0, err) < 0)
        goto fail;
    for (int i = 7; i >= 0; i--)
        n = n << 8 | len8[i];
    if (n > ST_MAX_HEADER) {
        tp_err_set(err, TP_EINVAL, "header length %" PRIu64 " exceeds the limit of %u bytes", n,
                   ST_MAX_HEADER);
        goto fail;
    }
    if (n > f->file_size - sizeof(len8)) {
        tp_err_set(err, TP_EINVAL, "header length %" PRIu64 " exceeds file size %" PRIu64 "%s", n,
                   f->file_size, n > f->file_size ? "" : " less the 8-byte length");
        goto fail;
    }
    hdr = malloc(n ? (size_t)n : 1);
    if (!hdr) {
        tp_err_set(err, TP_ENOMEM, "no memory for a header of %" PRIu64 " bytes", n);
        goto fail;
    }
    if (fileio_pread_full(f->fd, hdr, (size_t)n, sizeof(len8), err) < 0 ||
        st_parse_header(f, hdr, (size_t)n, sizeof(len8) + n, f->file_size, err) < 0)
        goto fail;
    free(hdr);
    return 0;
fail:
    tp_err_prefix(err, "%s: ", path);
    free(hdr);
    if (f->fd >= 0)
        close(f->fd);
    free(f->tensors);
    *f = (struct st_file){.fd = -1};
    return -1;
}

const struct st_tensor *st_find(const struct st_file *f, const char *name)
{
    if (!f || !name)
        return NULL;
    for (int i = 0; i < f->ntensors; i++)
        if (strcmp(f->tensors[i].name, name) == 0)
            return &f->tensors[i];
    return NULL;
}

int st_read_rows_f32(const struct st_file *f, const struct st_tensor *t, int64_t row0,
                     int64_t nrows, float *dst, uint64_t *bytes_read, struct tp_err *err)
{
    size_t es = t ? tp_dtype_size(t->dtype) : 0;
    uint64_t row_elems, n, off;
    char nm[SHOW];

    if (bytes_read)
        *bytes_read = 0;
    if (!f || !t) {
        tp_err_set(err, TP_EINVAL, "no tensor to read");
        goto fail;
    }
    show(t->name, nm);
    if (es == 0) {
        char dt[ST_MAX_DTYPE_NAME];

        keep_dtype_name(dt, t->dtype_name[0] ? t->dtype_name : "?");
        tp_err_set(err, TP_EINVAL, "tensor '%s' has dtype %s, expected F32, F16, BF16 or F64", nm,
                   dt);
        goto fail;
    }
    if (f->fd < 0) {
        tp_err_set(err, TP_EINVAL, "reading tensor '%s': file is not open", nm);
        goto fail;
    }
    if (t->ndim < 1) {
        tp_err_set(err, TP_EINVAL, "tensor '%s' has 0 dims, so no rows to read", nm);
        goto fail;
    }
    if (row0 < 0 || nrows < 0 || row0 > t->shape[0] || nrows > t->shape[0] - row0) {
        tp_err_set(err, TP_EINVAL,
                   "tensor '%s' has %" PRId64 " rows, cannot read %" PRId64 " from row %" PRId64,
                   nm, t->shape[0], nrows, row0);
        goto fail;
    }
    /* st_parse_header checked that the whole tensor fits its byte range; a table built some
     * other way gets the same check here, so the reads below stay inside the tensor. */
    if (tp_shape_count(t->shape + 1, t->ndim - 1, es, UINT64_MAX, &row_elems) < 0 ||
        t->end < t->begin ||
        (row_elems && (uint64_t)(row0 + nrows) > (t->end - t->begin) / es / row_elems)) {
        tp_err_set(err, TP_EINVAL, "tensor '%s' byte range does not hold its shape", nm);
        goto fail;
    }
    n = (uint64_t)nrows * row_elems;
    off = t->begin + (uint64_t)row0 * row_elems * es;
    if (n > SIZE_MAX / sizeof(float)) {
        tp_err_set(err, TP_ENOMEM, "%" PRIu64 " elements do not fit in memory", n);
        goto fail;
    }
    if (n == 0)
        goto done;
    if (!dst) {
        tp_err_set(err, TP_EINVAL, "no buffer for %" PRIu64 " elements of tensor '%s'", n, nm);
        goto fail;
    }
    if (fileio_read_f32(f->fd, off, n, t->dtype, dst, err) < 0) {
        tp_err_prefix(err, "reading tensor '%s': ", nm);
        goto fail;
    }
done:
    if (bytes_read)
        *bytes_read = n * es;
    return 0;
fail:
    return -1;
}

/* A zeroed struct has fd 0, which st_open never gave it: only a struct that holds a table (an
 * open file always does, even with no tensors) owns its fd. */
void st_close(struct st_file *f)
{
    if (!f)
        return;
    if (f->tensors && f->fd >= 0)
        close(f->fd);
    free(f->tensors);
    *f = (struct st_file){.fd = -1};
}
