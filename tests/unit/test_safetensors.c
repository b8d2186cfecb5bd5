/* test_safetensors.c -- unit tests of lib/safetensors.c: small files written to a mkdtemp
 * directory and read back in every supported dtype, row ranges that must read exactly their own
 * bytes, every way a header can lie (each must fail with TP_EINVAL and say what was wrong),
 * st_close on every state a struct can be in, and the seed files from tests/data/seed, where the
 * BF16 copy must hold the round-to-nearest-even of the F32 weights. Tensors of the other dtypes
 * of the format (I64, BOOL, ...) and of unknown dtype strings open beside a weight, checked like
 * it, and fail only when read. Headers under test are parsed from buffers of their exact size so
 * that ASan catches a read past the end. */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <sys/stat.h>
#include <unistd.h>

#include "safetensors.h"
#include "test.h"

static char dir[64];
static int nfiles;

/* Writes the 8-byte length, the header and datalen bytes of data (zeros when data is NULL) to
 * a new file in dir; header_len may lie. Returns the path in a static buffer. */
static const char *write_raw(uint64_t header_len, const char *json, const void *data,
                             size_t datalen)
{
    static char path[128];
    unsigned char len8[8];
    FILE *fp;

    snprintf(path, sizeof(path), "%s/f%d.safetensors", dir, nfiles++);
    for (int i = 0; i < 8; i++)
        len8[i] = (unsigned char)(header_len >> (8 * i));
    fp = fopen(path, "wb");
    ASSERT_TRUE(fp != NULL);
    ASSERT_EQ(fwrite(len8, 1, 8, fp), 8);
    ASSERT_EQ(fwrite(json, 1, strlen(json), fp), strlen(json));
    for (size_t i = 0; i < datalen; i++)
        ASSERT_NE(fputc(data ? ((const unsigned char *)data)[i] : 0, fp), EOF);
    ASSERT_EQ(fclose(fp), 0);
    return path;
}

static const char *write_st(const char *json, const void *data, size_t datalen)
{
    return write_raw(strlen(json), json, data, datalen);
}

/* st_parse_header on an exact-size heap copy of json, with datalen bytes of data after it. */
static int parse_exact(struct st_file *f, const char *json, size_t len, uint64_t datalen,
                       struct tp_err *err)
{
    char *copy = malloc(len ? len : 1);
    int rc;

    ASSERT_TRUE(copy != NULL);
    memcpy(copy, json, len);
    rc = st_parse_header(f, copy, len, 8 + len, 8 + len + datalen, err);
    free(copy);
    return rc;
}

static void expect_parse_fail(const char *json, uint64_t datalen, const char *needle)
{
    struct st_file f = {.fd = -1};
    struct tp_err err = {0};

    if (parse_exact(&f, json, strlen(json), datalen, &err) != -1)
        TEST_FAIL_("header %s parsed, expected an error with \"%s\"", json, needle);
    ASSERT_EQ(err.code, TP_EINVAL);
    ASSERT_STR_HAS(err.msg, needle);
    ASSERT_TRUE(f.tensors == NULL);
    ASSERT_EQ(f.ntensors, 0);
    ASSERT_TRUE(strchr(err.msg, '\n') == NULL);
}

static void expect_open_fail(const char *path, const char *needle)
{
    struct st_file f = {.fd = 7, .ntensors = 3};
    struct tp_err err = {0};

    ASSERT_EQ(st_open(&f, path, &err), -1);
    ASSERT_EQ(err.code, TP_EINVAL);
    ASSERT_STR_HAS(err.msg, path);
    ASSERT_STR_HAS(err.msg, needle);
    /* left closed */
    ASSERT_EQ(f.fd, -1);
    ASSERT_TRUE(f.tensors == NULL);
    ASSERT_EQ(f.ntensors, 0);
    st_close(&f);
}

/* Four tensors, one per dtype, the metadata entry in the middle and space padding at the end. */
static const char *const MIXED =
    "{\"a\":{\"dtype\":\"F32\",\"shape\":[3,4],\"data_offsets\":[0,48]},"
    "\"h\":{\"dtype\":\"F16\",\"shape\":[2,3],\"data_offsets\":[48,60]},"
    "\"__metadata__\":{\"format\":\"pt\"},"
    "\"b\":{\"dtype\":\"BF16\",\"shape\":[4],\"data_offsets\":[60,68]},"
    "\"d\":{\"dtype\":\"F64\",\"shape\":[2,1],\"data_offsets\":[68,84]}}      ";

static void mixed_data(unsigned char *data)
{
    static const uint16_t h[6] = {0x3c00, 0xc000, 0x7bff, 0x3800, 0x0001, 0x8000};
    static const uint16_t b[4] = {0x3f80, 0xc040, 0x3e80, 0x4049};
    static const double d[2] = {1.5, -1e-3};

    for (int i = 0; i < 12; i++) {
        float v = (float)i - 5.5f;

        memcpy(data + 4 * i, &v, 4);
    }
    for (int i = 0; i < 6; i++) {
        data[48 + 2 * i] = (unsigned char)(h[i] & 0xff);
        data[48 + 2 * i + 1] = (unsigned char)(h[i] >> 8);
    }
    for (int i = 0; i < 4; i++) {
        data[60 + 2 * i] = (unsigned char)(b[i] & 0xff);
        data[60 + 2 * i + 1] = (unsigned char)(b[i] >> 8);
    }
    memcpy(data + 68, d, sizeof(d));
}

static void test_read_dtypes(void)
{
    unsigned char data[84];
    const struct st_tensor *a, *h, *b, *d;
    struct st_file f = {.fd = -1};
    struct tp_err err = {0};
    const char *path;
    uint64_t got = 999, ds = 8 + strlen(MIXED);
    float out[16];

    mixed_data(data);
    path = write_st(MIXED, data, sizeof(data));
    if (st_open(&f, path, &err) != 0)
        TEST_FAIL_("%s", err.msg);
    ASSERT_EQ(f.ntensors, 4);
    ASSERT_EQ(f.file_size, ds + 84);
    ASSERT_TRUE(f.fd > 2);
    ASSERT_TRUE(fcntl(f.fd, F_GETFD) & FD_CLOEXEC);
    a = st_find(&f, "a");
    h = st_find(&f, "h");
    b = st_find(&f, "b");
    d = st_find(&f, "d");
    ASSERT_TRUE(a && h && b && d);
    ASSERT_TRUE(st_find(&f, "__metadata__") == NULL);
    ASSERT_TRUE(st_find(&f, "nope") == NULL);
    ASSERT_TRUE(st_find(&f, "") == NULL);
    ASSERT_STR_EQ(f.tensors[0].name, "a"); /* file order */
    ASSERT_STR_EQ(f.tensors[3].name, "d");
    ASSERT_EQ(a->dtype, TP_F32);
    ASSERT_STR_EQ(a->dtype_name, "F32");
    ASSERT_STR_EQ(h->dtype_name, "F16");
    ASSERT_STR_EQ(b->dtype_name, "BF16");
    ASSERT_STR_EQ(d->dtype_name, "F64");
    ASSERT_EQ(a->ndim, 2);
    ASSERT_EQ(a->shape[0], 3);
    ASSERT_EQ(a->shape[1], 4);
    ASSERT_EQ(a->begin, ds);
    ASSERT_EQ(a->end, ds + 48);
    ASSERT_EQ(h->dtype, TP_F16);
    ASSERT_EQ(h->begin, ds + 48);
    ASSERT_EQ(b->dtype, TP_BF16);
    ASSERT_EQ(b->ndim, 1);
    ASSERT_EQ(b->shape[0], 4);
    ASSERT_EQ(d->dtype, TP_F64);
    ASSERT_EQ(d->end, ds + 84);

    /* all of a, then rows [1, 3): 2 rows of 4 floats, nothing more */
    ASSERT_EQ(st_read_rows_f32(&f, a, 0, 3, out, &got, &err), 0);
    ASSERT_EQ(got, 48);
    for (int i = 0; i < 12; i++)
        ASSERT_TRUE(out[i] == (float)i - 5.5f);
    for (int i = 0; i < 16; i++)
        out[i] = 42;
    ASSERT_EQ(st_read_rows_f32(&f, a, 1, 2, out, &got, &err), 0);
    ASSERT_EQ(got, 32);
    for (int i = 0; i < 8; i++)
        ASSERT_TRUE(out[i] == (float)(i + 4) - 5.5f);
    ASSERT_TRUE(out[8] == 42);
    ASSERT_EQ(st_read_rows_f32(&f, a, 2, 1, out, &got, &err), 0);
    ASSERT_EQ(got, 16);
    ASSERT_TRUE(out[0] == 2.5f && out[3] == 5.5f);

    /* F16 row 1: 0.5, 2^-24, -0 */
    out[3] = 42;
    ASSERT_EQ(st_read_rows_f32(&f, h, 1, 1, out, &got, &err), 0);
    ASSERT_EQ(got, 6);
    ASSERT_TRUE(out[0] == 0.5f && out[1] == 0x1p-24f && out[2] == 0 && signbit(out[2]));
    ASSERT_TRUE(out[3] == 42);
    ASSERT_EQ(st_read_rows_f32(&f, h, 0, 2, out, &got, &err), 0);
    ASSERT_EQ(got, 12);
    ASSERT_TRUE(out[0] == 1 && out[1] == -2 && out[2] == 65504);

    /* BF16, 1-D: a row is one element */
    out[2] = 42;
    ASSERT_EQ(st_read_rows_f32(&f, b, 1, 2, out, &got, &err), 0);
    ASSERT_EQ(got, 4);
    ASSERT_TRUE(out[0] == -3.0f && out[1] == 0.25f && out[2] == 42);
    ASSERT_EQ(st_read_rows_f32(&f, b, 3, 1, out, &got, &err), 0);
    ASSERT_TRUE(out[0] == 3.140625f);

    /* F64, rounded to float */
    ASSERT_EQ(st_read_rows_f32(&f, d, 1, 1, out, &got, &err), 0);
    ASSERT_EQ(got, 8);
    ASSERT_TRUE(out[0] == (float)-1e-3);

    /* an empty range at the end reads nothing, and dst may then be NULL */
    got = 999;
    ASSERT_EQ(st_read_rows_f32(&f, a, 3, 0, NULL, &got, &err), 0);
    ASSERT_EQ(got, 0);
    ASSERT_EQ(st_read_rows_f32(&f, a, 0, 1, out, NULL, &err), 0);
    ASSERT_TRUE(out[0] == -5.5f);
    st_close(&f);
    ASSERT_EQ(f.fd, -1);
    ASSERT_TRUE(f.tensors == NULL);
}

static void test_row_range_errors(void)
{
    static const char *const json =
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[3,4],\"data_offsets\":[0,48]},"
        "\"s\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[48,52]}}";
    struct st_file f = {.fd = -1};
    struct tp_err err = {0};
    const struct st_tensor *a;
    uint64_t got = 999;
    float out[16];

    if (st_open(&f, write_st(json, NULL, 52), &err) != 0)
        TEST_FAIL_("%s", err.msg);
    a = st_find(&f, "a");
    ASSERT_TRUE(a != NULL);
    ASSERT_EQ(st_read_rows_f32(&f, a, 1, 3, out, &got, &err), -1);
    ASSERT_EQ(err.code, TP_EINVAL);
    ASSERT_STR_HAS(err.msg, "tensor 'a' has 3 rows, cannot read 3 from row 1");
    ASSERT_EQ(got, 0);
    ASSERT_EQ(st_read_rows_f32(&f, a, -1, 1, out, &got, &err), -1);
    ASSERT_STR_HAS(err.msg, "cannot read 1 from row -1");
    ASSERT_EQ(st_read_rows_f32(&f, a, 0, -1, out, &got, &err), -1);
    ASSERT_STR_HAS(err.msg, "cannot read -1 from row 0");
    ASSERT_EQ(st_read_rows_f32(&f, a, 4, 0, out, &got, &err), -1);
    ASSERT_STR_HAS(err.msg, "cannot read 0 from row 4");
    ASSERT_EQ(st_read_rows_f32(&f, a, 1, INT64_MAX, out, &got, &err), -1);
    ASSERT_STR_HAS(err.msg, "from row 1");
    ASSERT_EQ(st_read_rows_f32(&f, a, INT64_MAX, 1, out, &got, &err), -1);
    ASSERT_STR_HAS(err.msg, "cannot read 1");
    ASSERT_EQ(st_read_rows_f32(&f, st_find(&f, "s"), 0, 1, out, &got, &err), -1);
    ASSERT_STR_HAS(err.msg, "tensor 's' has 0 dims");
    ASSERT_EQ(st_read_rows_f32(&f, NULL, 0, 1, out, &got, &err), -1);
    ASSERT_EQ(err.code, TP_EINVAL);
    st_close(&f);
}

/* A file that shrinks after open: the read hits the end of file and says so. */
static void test_short_read(void)
{
    static const char *const json =
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[3,4],\"data_offsets\":[0,48]}}";
    struct st_file f = {.fd = -1};
    struct tp_err err = {0};
    const char *path = write_st(json, NULL, 48);
    uint64_t got = 999;
    float out[12];

    ASSERT_EQ(st_open(&f, path, &err), 0);
    ASSERT_EQ(truncate(path, (off_t)(8 + strlen(json) + 20)), 0);
    ASSERT_EQ(st_read_rows_f32(&f, st_find(&f, "a"), 0, 3, out, &got, &err), -1);
    ASSERT_EQ(err.code, TP_EINVAL);
    ASSERT_STR_HAS(err.msg, "reading tensor 'a': unexpected end of file");
    ASSERT_STR_HAS(err.msg, "(28 more bytes expected)");
    ASSERT_EQ(got, 0); /* nothing counts as read when the read failed */
    st_close(&f);
    ASSERT_EQ(st_read_rows_f32(
                  &f,
                  &(struct st_tensor){
                      .name = "a", .dtype = TP_F32, .ndim = 1, .shape = {1}, .begin = 0, .end = 4},
                  0, 1, out, &got, &err),
              -1);
    ASSERT_STR_HAS(err.msg, "file is not open");
}

static void test_open_errors(void)
{
    static const char *const json =
        "{\"weight\":{\"dtype\":\"F32\",\"shape\":[3,4],\"data_offsets\":[0,48]}}";
    char msg[160];
    const char *path;
    size_t jl = strlen(json);
    struct st_file f = {.fd = -1};
    struct tp_err err = {0};

    path = write_raw(999999, json, NULL, 48);
    snprintf(msg, sizeof(msg), "%s: header length 999999 exceeds file size %zu", path, 8 + jl + 48);
    expect_open_fail(path, msg);
    /* the header fits the file only without its 8-byte length */
    expect_open_fail(write_raw(jl + 48 + 1, json, NULL, 48), "less the 8-byte length");
    expect_open_fail(write_raw(UINT64_MAX, json, NULL, 48),
                     "header length 18446744073709551615 exceeds the limit of 104857600");
    expect_open_fail(write_raw((uint64_t)ST_MAX_HEADER + 1, json, NULL, 48), "exceeds the limit");
    /* truncated data: the tensor ends past the end of the file */
    expect_open_fail(write_st(json, NULL, 40), "tensor 'weight' has data_offsets [0, 48] past "
                                               "the end of the 40-byte data section");
    /* errors from the header parser come prefixed with the path */
    expect_open_fail(write_st("[1, 2]", NULL, 0), "header is not a JSON object");
    /* too short for the length */
    snprintf(msg, sizeof(msg), "%s/short.safetensors", dir);
    {
        FILE *fp = fopen(msg, "wb");

        ASSERT_TRUE(fp != NULL);
        ASSERT_EQ(fwrite("\x10\0\0", 1, 3, fp), 3);
        ASSERT_EQ(fclose(fp), 0);
    }
    expect_open_fail(msg, "file is 3 bytes, too short for the 8-byte header length");
    ASSERT_EQ(unlink(msg), 0);
    expect_open_fail(dir, "not a regular file");
    snprintf(msg, sizeof(msg), "%s/none.safetensors", dir);
    ASSERT_EQ(st_open(&f, msg, &err), -1);
    ASSERT_EQ(err.code, TP_ESYS);
    ASSERT_STR_HAS(err.msg, msg);
    ASSERT_STR_HAS(err.msg, "No such file");
    ASSERT_EQ(f.fd, -1);
    st_close(&f);
}

#define T(name, dtype, shape, offs)                                                                \
    "\"" name "\":{\"dtype\":\"" dtype "\",\"shape\":" shape ",\"data_offsets\":" offs "}"

static void test_header_errors(void)
{
    /* offsets and sizes */
    expect_parse_fail("{" T("w", "F32", "[3,4]", "[0,48]") "}", 47,
                      "tensor 'w' has data_offsets [0, 48] past the end of the 47-byte data "
                      "section");
    expect_parse_fail("{" T("w", "F32", "[3,4]", "[100,148]") "}", 48, "[100, 148] past the end");
    expect_parse_fail("{" T("w", "F32", "[0]", "[48,0]") "}", 48,
                      "tensor 'w' has data_offsets [48, 0] with begin after end");
    expect_parse_fail("{" T("w", "F32", "[3,4]", "[0,44]") "}", 48,
                      "tensor 'w' has shape [3, 4] of F32 (48 bytes) but data_offsets [0, 44] "
                      "hold 44 bytes");
    expect_parse_fail("{" T("w", "BF16", "[3,4]", "[0,48]") "}", 48, "of BF16 (24 bytes)");
    expect_parse_fail("{" T("w", "F32", "[4294967296,4294967296,4]", "[0,0]") "}", 0,
                      "tensor 'w' has shape [4294967296, 4294967296, 4] whose size overflows");
    expect_parse_fail("{" T("w", "F32", "[3]", "[0,12,24]") "}", 48,
                      "tensor 'w' has no data_offsets array of 2 integers");
    expect_parse_fail("{\"w\":{\"dtype\":\"F32\",\"shape\":[3]}}", 48, "no data_offsets");
    expect_parse_fail("{" T("w", "F32", "[3]", "[-12,0]") "}", 48, "data_offsets[0] -12");
    expect_parse_fail("{" T("w", "F32", "[3]", "[0,12.5]") "}", 48, "data_offsets[1] 12.5");
    expect_parse_fail("{" T("w", "F32", "[3]", "[0,\"12\"]") "}", 48, "data_offsets[1] a string");
    /* dtypes: the other dtypes of the format are checked by their element size */
    expect_parse_fail("{" T("weight", "I64", "[3]", "[0,20]") "}", 48,
                      "tensor 'weight' has shape [3] of I64 (24 bytes) but data_offsets [0, 20] "
                      "hold 20 bytes");
    expect_parse_fail("{" T("w", "I8", "[3]", "[0,4]") "}", 48, "of I8 (3 bytes)");
    expect_parse_fail("{" T("w", "BOOL", "[2,2]", "[0,8]") "}", 48, "[2, 2] of BOOL (4 bytes)");
    expect_parse_fail("{" T("w", "F8_E4M3", "[3]", "[0,6]") "}", 48, "of F8_E4M3 (3 bytes)");
    expect_parse_fail("{" T("w", "U16", "[3]", "[0,3]") "}", 48, "of U16 (6 bytes)");
    expect_parse_fail("{" T("w", "I64", "[4294967296,4294967296]", "[0,8]") "}", 48,
                      "tensor 'w' has shape [4294967296, 4294967296] whose size overflows");
    /* an unknown dtype string: only its byte range is checked */
    expect_parse_fail("{" T("w", "nonsense", "[3]", "[0,50]") "}", 48,
                      "tensor 'w' has data_offsets [0, 50] past the end of the 48-byte data");
    expect_parse_fail("{" T("a", "F32", "[3]", "[0,12]") "," T("b", "F4", "[3]", "[8,10]") "}", 48,
                      "tensors 'a' and 'b' overlap: data_offsets [0, 12] and [8, 10]");
    expect_parse_fail("{" T("a", "I64", "[1]", "[0,8]") "," T("a", "x", "[1]", "[8,10]") "}", 48,
                      "duplicate tensor name 'a'");
    expect_parse_fail("{" T("w", "F4", "[3]", "[4,0]") "}", 48, "[4, 0] with begin after end");
    expect_parse_fail("{" T("w", "F4", "[-3]", "[0,2]") "}", 48, "shape[0] -3, expected");
    expect_parse_fail("{\"w\":{\"dtype\":4,\"shape\":[3],\"data_offsets\":[0,12]}}", 48,
                      "tensor 'w' has no dtype string");
    /* shapes */
    expect_parse_fail("{" T("w", "F32", "[1,1,1,1,1,1,1,1,1]", "[0,4]") "}", 48,
                      "tensor 'w' has 9 dims, at most 8 are supported");
    expect_parse_fail("{" T("w", "F32", "[1.5,2]", "[0,12]") "}", 48,
                      "tensor 'w' has shape[0] 1.5, expected a non-negative integer");
    expect_parse_fail("{" T("w", "F32", "[2,-3]", "[0,12]") "}", 48, "shape[1] -3, expected");
    expect_parse_fail("{" T("w", "F32", "[\"3\"]", "[0,12]") "}", 48, "shape[0] a string");
    expect_parse_fail("{" T("w", "F32", "[null]", "[0,12]") "}", 48, "shape[0] not a number");
    expect_parse_fail("{" T("w", "F32", "[9007199254740992]", "[0,12]") "}", 48,
                      "shape[0] 9007199254740992,");
    expect_parse_fail("{" T("w", "F32", "[1e300]", "[0,12]") "}", 48, "shape[0] 1.0000000");
    expect_parse_fail("{" T("w", "F32", "3", "[0,12]") "}", 48, "tensor 'w' has no shape array");
    /* overlaps and names */
    expect_parse_fail("{" T("a", "F32", "[3,4]", "[0,48]") "," T("b", "F32", "[12]", "[40,88]") "}",
                      88, "tensors 'a' and 'b' overlap: data_offsets [0, 48] and [40, 88]");
    expect_parse_fail("{" T("a", "F32", "[4]", "[32,48]") "," T("b", "F32", "[12]", "[0,48]") "}",
                      48, "tensors 'b' and 'a' overlap: data_offsets [0, 48] and [32, 48]");
    expect_parse_fail("{" T("a", "F32", "[12]", "[0,48]") "," T("b", "F32", "[1]", "[20,24]") "}",
                      48, "tensors 'a' and 'b' overlap");
    expect_parse_fail("{" T("a", "F32", "[1]", "[0,4]") "," T("a", "F32", "[1]", "[4,8]") "}", 48,
                      "duplicate tensor name 'a'");
    expect_parse_fail("{\"a\":5}", 0, "tensor 'a' is not a JSON object");
    expect_parse_fail("{" T("a\\nb", "F32", "[1]", "[0,4]") "," T("c", "I16", "[1]", "[4,8]") "}",
                      48, "tensor 'c' has shape [1] of I16 (2 bytes)");
    expect_parse_fail("{" T("a\\nb", "I16", "[1]", "[0,4]") "}", 48, "tensor 'a?b' has shape [1]");
    {
        char json[512], name[301];

        memset(name, 'x', 300);
        name[300] = '\0';
        snprintf(json, sizeof(json),
                 "{\"%s\":{\"dtype\":\"F32\",\"shape\":[1],"
                 "\"data_offsets\":[0,4]}}",
                 name);
        expect_parse_fail(json, 4, "is 300 bytes, longer than 255");
        expect_parse_fail(json, 4, "xxx...'");
    }
    /* not an object, not JSON, junk after it */
    expect_parse_fail("[1, 2]", 0, "header is not a JSON object");
    expect_parse_fail("\"F32\"", 0, "header is not a JSON object");
    expect_parse_fail("{\"a\": ", 0, "header is not valid JSON");
    expect_parse_fail("", 0, "header is not valid JSON");
    expect_parse_fail("{\"a\":{\"dtype\":\"F32\"},}", 0, "header is not valid JSON");
    expect_parse_fail("{}x", 0, "header has data after the JSON at byte 2 of 3");
    {
        struct st_file f = {.fd = -1};
        struct tp_err err = {0};

        ASSERT_EQ(parse_exact(&f, "{}  \0", 5, 0, &err), -1);
        ASSERT_STR_HAS(err.msg, "header has data after the JSON at byte 4 of 5");
    }
}

/* A checkpoint's weight beside tensors of other dtypes (position ids, a mask, a scale, and a
 * dtype string no version of the format has): the file opens, the weight reads, and each other
 * tensor is listed by its dtype string and fails only when read. */
static void test_other_dtypes(void)
{
    static const char *const json =
        "{\"position_ids\":{\"dtype\":\"I64\",\"shape\":[1,4],\"data_offsets\":[0,32]},"
        "\"weight\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[32,56]},"
        "\"masked_bias\":{\"dtype\":\"BOOL\",\"shape\":[2,2],\"data_offsets\":[56,60]},"
        "\"scale\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[60,64]},"
        "\"packed\":{\"dtype\":\"Q4_K_MAGIC_LONG_NAME\",\"shape\":[7],\"data_offsets\":[64,67]}}";
    static const char *const unknown =
        "{\"w\":{\"dtype\":\"f32\",\"shape\":[3],\"data_offsets\":[0,5]},"
        "\"e\":{\"dtype\":\"\",\"shape\":[9],\"data_offsets\":[5,5]},"
        "\"c\":{\"dtype\":\"I\\u0001X\",\"shape\":[1],\"data_offsets\":[5,6]}}";
    unsigned char data[67] = {0};
    struct st_file f = {.fd = -1};
    struct tp_err err = {0};
    const struct st_tensor *w, *p, *m, *u, *q;
    float out[8];
    uint64_t got = 99;

    for (int i = 0; i < 6; i++) {
        float v = (float)i + 0.5f;

        memcpy(data + 32 + 4 * i, &v, 4);
    }
    if (st_open(&f, write_st(json, data, sizeof(data)), &err) != 0)
        TEST_FAIL_("%s", err.msg);
    ASSERT_EQ(f.ntensors, 5);
    w = st_find(&f, "weight");
    p = st_find(&f, "position_ids");
    m = st_find(&f, "masked_bias");
    u = st_find(&f, "scale");
    q = st_find(&f, "packed");
    ASSERT_TRUE(w && p && m && u && q);
    ASSERT_EQ(w->dtype, TP_F32);
    ASSERT_STR_EQ(w->dtype_name, "F32");
    ASSERT_EQ(p->dtype, TP_DTYPE_INVALID);
    ASSERT_STR_EQ(p->dtype_name, "I64");
    ASSERT_EQ(p->ndim, 2);
    ASSERT_EQ(p->shape[1], 4);
    ASSERT_EQ(m->dtype, TP_DTYPE_INVALID);
    ASSERT_STR_EQ(m->dtype_name, "BOOL");
    ASSERT_STR_EQ(u->dtype_name, "U8");
    ASSERT_EQ(q->dtype, TP_DTYPE_INVALID);
    ASSERT_STR_EQ(q->dtype_name, "Q4_K_MAGIC_LONG"); /* cut to 15 bytes */
    ASSERT_EQ(q->end - q->begin, 3);
    ASSERT_EQ(st_read_rows_f32(&f, w, 0, 2, out, &got, &err), 0);
    ASSERT_EQ(got, 24);
    for (int i = 0; i < 6; i++)
        ASSERT_TRUE(out[i] == (float)i + 0.5f);
    got = 99;
    ASSERT_EQ(st_read_rows_f32(&f, p, 0, 1, out, &got, &err), -1);
    ASSERT_EQ(err.code, TP_EINVAL);
    ASSERT_STR_EQ(err.msg, "tensor 'position_ids' has dtype I64, expected F32, F16, BF16 or F64");
    ASSERT_EQ(got, 0);
    ASSERT_EQ(st_read_rows_f32(&f, m, 0, 0, NULL, NULL, &err), -1);
    ASSERT_STR_EQ(err.msg, "tensor 'masked_bias' has dtype BOOL, expected F32, F16, BF16 or F64");
    ASSERT_EQ(st_read_rows_f32(&f, q, 0, 1, out, NULL, &err), -1);
    ASSERT_STR_HAS(err.msg, "tensor 'packed' has dtype Q4_K_MAGIC_LONG, expected F32");
    st_close(&f);

    /* every dtype of the format, with its element size */
    {
        static const struct {
            const char *name;
            int size;
        } spec[] = {{"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E5M2", 1}, {"F8_E4M3", 1},
                    {"I16", 2},  {"U16", 2}, {"F16", 2}, {"BF16", 2},    {"I32", 4},
                    {"U32", 4},  {"F32", 4}, {"F64", 8}, {"I64", 8},     {"U64", 8}};
        char hdr[160], want[160];

        for (size_t i = 0; i < sizeof(spec) / sizeof(spec[0]); i++) {
            snprintf(hdr, sizeof(hdr),
                     "{\"t\":{\"dtype\":\"%s\",\"shape\":[2,3],\"data_offsets\":[0,%d]}}",
                     spec[i].name, 6 * spec[i].size);
            if (parse_exact(&f, hdr, strlen(hdr), 64, &err) != 0)
                TEST_FAIL_("%s: %s", spec[i].name, err.msg);
            ASSERT_STR_EQ(f.tensors[0].dtype_name, spec[i].name);
            st_close(&f);
            snprintf(hdr, sizeof(hdr),
                     "{\"t\":{\"dtype\":\"%s\",\"shape\":[2,3],\"data_offsets\":[0,%d]}}",
                     spec[i].name, 6 * spec[i].size + 1);
            snprintf(want, sizeof(want), "tensor 't' has shape [2, 3] of %s (%d bytes)",
                     spec[i].name, 6 * spec[i].size);
            expect_parse_fail(hdr, 64, want);
        }
    }

    /* unknown dtype strings: any byte size, an empty range, control bytes kept as '?' */
    if (parse_exact(&f, unknown, strlen(unknown), 48, &err) != 0)
        TEST_FAIL_("%s", err.msg);
    ASSERT_EQ(f.ntensors, 3);
    ASSERT_STR_EQ(st_find(&f, "w")->dtype_name, "f32");
    ASSERT_EQ(st_find(&f, "w")->dtype, TP_DTYPE_INVALID);
    ASSERT_STR_EQ(st_find(&f, "e")->dtype_name, "");
    ASSERT_STR_EQ(st_find(&f, "c")->dtype_name, "I?X");
    ASSERT_EQ(st_read_rows_f32(&f, st_find(&f, "e"), 0, 1, out, NULL, &err), -1);
    ASSERT_STR_HAS(err.msg, "tensor 'e' has dtype ?, expected");
    st_close(&f);
}

static void test_header_ok(void)
{
    static const char *const json =
        "{\"__metadata__\":{\"a\":\"b\"}," T("z", "F32", "[0,5]", "[48,48]") "," T(
            "a", "F32", "[12]", "[0,48]") "," T("e", "F16", "[0]",
                                                "[20,20]") "," T("b", "F16", "[2,2]",
                                                                 "[48,56]") "}\n  ";
    struct st_file f = {.fd = -1};
    struct tp_err err = {0};
    size_t len = strlen(json);

    /* adjacent ranges, and empty tensors anywhere, including inside another's range */
    if (parse_exact(&f, json, len, 56, &err) != 0)
        TEST_FAIL_("%s", err.msg);
    ASSERT_EQ(f.ntensors, 4);
    ASSERT_EQ(f.fd, -1); /* left alone */
    ASSERT_EQ(st_find(&f, "b")->begin, 8 + len + 48);
    ASSERT_EQ(st_find(&f, "z")->shape[1], 5);
    st_close(&f);
    /* no tensors at all still gives a table */
    ASSERT_EQ(parse_exact(&f, "{}", 2, 0, &err), 0);
    ASSERT_EQ(f.ntensors, 0);
    ASSERT_TRUE(f.tensors != NULL);
    st_close(&f);
    ASSERT_EQ(parse_exact(&f, "{\"__metadata__\":{}}", 19, 0, &err), 0);
    ASSERT_EQ(f.ntensors, 0);
    st_close(&f);
    /* a data section that starts past the file */
    ASSERT_EQ(st_parse_header(&f, "{}", 2, 100, 50, &err), -1);
    ASSERT_STR_HAS(err.msg, "data section starts at byte 100, past the end of the 50-byte file");
    /* every proper prefix of a good header fails cleanly */
    for (size_t n = 0; n + 3 < len; n++) {
        err = (struct tp_err){0};
        ASSERT_EQ(parse_exact(&f, json, n, 56, &err), -1);
        ASSERT_EQ(err.code, TP_EINVAL);
    }
}

static void test_max_tensors(void)
{
    size_t cap = (size_t)(ST_MAX_TENSORS + 1) * 96 + 16, n = 0;
    char *json = malloc(cap);
    struct st_file f = {.fd = -1};
    struct tp_err err = {0};

    ASSERT_TRUE(json != NULL);
    n += (size_t)snprintf(json + n, cap - n, "{");
    for (int i = 0; i < ST_MAX_TENSORS; i++)
        n += (size_t)snprintf(json + n, cap - n,
                              "%s\"t%d\":{\"dtype\":\"F32\",\"shape\":[1],"
                              "\"data_offsets\":[%d,%d]}",
                              i ? "," : "", i, 4 * i, 4 * i + 4);
    ASSERT_LT(n + 2, cap);
    json[n] = '}';
    if (parse_exact(&f, json, n + 1, 4u * ST_MAX_TENSORS, &err) != 0)
        TEST_FAIL_("%s", err.msg);
    ASSERT_EQ(f.ntensors, ST_MAX_TENSORS);
    ASSERT_EQ(st_find(&f, "t65535")->begin, 8 + n + 1 + 4 * 65535);
    st_close(&f);
    /* one more is too many */
    n += (size_t)snprintf(json + n, cap - n, ",\"x\":{}}");
    ASSERT_EQ(parse_exact(&f, json, n, 4u * ST_MAX_TENSORS, &err), -1);
    ASSERT_STR_HAS(err.msg, "header has more than 65536 tensors");
    free(json);
}

static void test_close(void)
{
    struct st_file f = {0};
    struct tp_err err = {0};
    int devnull, fd;

    st_close(NULL);
    /* a zeroed struct does not own fd 0 */
    devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);
    ASSERT_TRUE(devnull >= 0);
    ASSERT_EQ(dup2(devnull, 0), 0);
    ASSERT_EQ(close(devnull), 0);
    st_close(&f);
    ASSERT_NE(fcntl(0, F_GETFD), -1);
    ASSERT_EQ(f.fd, -1);
    st_close(&f);
    /* an open file's fd is closed once, and a second close is a no-op */
    ASSERT_EQ(st_open(&f, write_st("{}", NULL, 0), &err), 0);
    fd = f.fd;
    ASSERT_NE(fcntl(fd, F_GETFD), -1);
    st_close(&f);
    ASSERT_EQ(fcntl(fd, F_GETFD), -1);
    ASSERT_EQ(errno, EBADF);
    st_close(&f);
    ASSERT_EQ(f.fd, -1);
    ASSERT_TRUE(f.tensors == NULL);
}

/* bf16 round to nearest, ties to even, of a finite float */
static uint16_t bf16_rne(float x)
{
    uint32_t u;

    memcpy(&u, &x, 4);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

static float *read_all(const struct st_file *f, const char *name, int64_t rows, int64_t cols)
{
    const struct st_tensor *t = st_find(f, name);
    float *out = malloc((size_t)(rows * cols) * sizeof(float));
    struct tp_err err = {0};
    uint64_t got = 0;

    ASSERT_TRUE(t != NULL && out != NULL);
    ASSERT_EQ(t->ndim, cols > 1 ? 2 : 1);
    ASSERT_EQ(t->shape[0], rows);
    if (cols > 1)
        ASSERT_EQ(t->shape[1], cols);
    if (st_read_rows_f32(f, t, 0, rows, out, &got, &err) != 0)
        TEST_FAIL_("%s", err.msg);
    ASSERT_EQ(got, (uint64_t)(rows * cols) * tp_dtype_size(t->dtype));
    return out;
}

/* The F32 file and its BF16 copy: shapes, dtypes, and every BF16 value, read whole and by row
 * range, equal to the rounding of the F32 value. */
static void check_seed_case(const char *seed, const char *name, int64_t out_dim, int64_t in_dim,
                            int has_bias)
{
    struct st_file f32 = {.fd = -1}, b16 = {.fd = -1};
    struct tp_err err = {0};
    char path[512];
    float *w, *wb, *part;
    int64_t r0 = out_dim / 3, nr = out_dim / 2;
    uint64_t got = 0;

    snprintf(path, sizeof(path), "%s/%s.safetensors", seed, name);
    if (st_open(&f32, path, &err) != 0)
        TEST_FAIL_("%s", err.msg);
    snprintf(path, sizeof(path), "%s/%s.bf16.safetensors", seed, name);
    if (st_open(&b16, path, &err) != 0)
        TEST_FAIL_("%s", err.msg);
    ASSERT_EQ(f32.ntensors, has_bias ? 2 : 1);
    ASSERT_EQ(b16.ntensors, has_bias ? 2 : 1);
    ASSERT_EQ(st_find(&f32, "weight")->dtype, TP_F32);
    ASSERT_EQ(st_find(&b16, "weight")->dtype, TP_BF16);
    ASSERT_EQ(st_find(&f32, "bias") != NULL, has_bias);
    ASSERT_EQ(st_find(&b16, "bias") != NULL, has_bias);
    w = read_all(&f32, "weight", out_dim, in_dim);
    wb = read_all(&b16, "weight", out_dim, in_dim);
    for (int64_t i = 0; i < out_dim * in_dim; i++)
        if (wb[i] != tp_bf16_to_f32(bf16_rne(w[i])))
            TEST_FAIL_("%s weight[%" PRId64 "]: bf16 %.9g, f32 %.9g rounds to %.9g", name, i, wb[i],
                       w[i], tp_bf16_to_f32(bf16_rne(w[i])));
    part = malloc((size_t)(nr * in_dim) * sizeof(float));
    ASSERT_TRUE(part != NULL);
    ASSERT_EQ(st_read_rows_f32(&b16, st_find(&b16, "weight"), r0, nr, part, &got, &err), 0);
    ASSERT_EQ(got, (uint64_t)(nr * in_dim) * 2);
    ASSERT_EQ(memcmp(part, wb + r0 * in_dim, (size_t)(nr * in_dim) * sizeof(float)), 0);
    ASSERT_EQ(st_read_rows_f32(&f32, st_find(&f32, "weight"), r0, nr, part, &got, &err), 0);
    ASSERT_EQ(got, (uint64_t)(nr * in_dim) * 4);
    ASSERT_EQ(memcmp(part, w + r0 * in_dim, (size_t)(nr * in_dim) * sizeof(float)), 0);
    if (has_bias) {
        float *b = read_all(&f32, "bias", out_dim, 1), *bb = read_all(&b16, "bias", out_dim, 1);

        for (int64_t i = 0; i < out_dim; i++)
            ASSERT_TRUE(bb[i] == tp_bf16_to_f32(bf16_rne(b[i])));
        free(b);
        free(bb);
    }
    free(part);
    free(w);
    free(wb);
    st_close(&f32);
    st_close(&b16);
}

static void test_seed(void)
{
    const char *seed = getenv("TP_SEED_DIR");

    if (!seed)
        TEST_FAIL_("TP_SEED_DIR is not set (ctest sets it to tests/data/seed)");
    check_seed_case(seed, "seed", 12, 8, 1);
    check_seed_case(seed, "nobias", 60, 96, 0);
    /* 1536 x 512 BF16 is 1.5 MiB: the conversion goes through its buffer more than once */
    check_seed_case(seed, "mlp-up", 1536, 512, 1);
}

int main(void)
{
    char path[128];

    snprintf(dir, sizeof(dir), "/tmp/test_safetensors.XXXXXX");
    if (!mkdtemp(dir))
        TEST_FAIL_("mkdtemp: %s", strerror(errno));
    TEST_RUN(test_read_dtypes);
    TEST_RUN(test_row_range_errors);
    TEST_RUN(test_short_read);
    TEST_RUN(test_open_errors);
    TEST_RUN(test_header_errors);
    TEST_RUN(test_other_dtypes);
    TEST_RUN(test_header_ok);
    TEST_RUN(test_max_tensors);
    TEST_RUN(test_close);
    TEST_RUN(test_seed);
    for (int i = 0; i < nfiles; i++) {
        snprintf(path, sizeof(path), "%s/f%d.safetensors", dir, i);
        ASSERT_EQ(unlink(path), 0);
    }
    ASSERT_EQ(rmdir(dir), 0);
    return 0;
}
