/* test_npy.c -- unit tests of lib/npy.c: save/load round trips, headers written by hand in every
 * version and spacing numpy and people produce, every way a header or file can be wrong (each
 * must fail with TP_EINVAL and say what was wrong), the other dtypes (bfloat16 as '<V2' and
 * '|V2', float64) and Fortran order, and the seed files from tests/data/seed.
 * Headers under test are copied to buffers of their exact size so that ASan catches a parser
 * that reads past the end. Files go to a fresh mkdtemp directory, removed at the end. */
#include <dirent.h>
#include <errno.h>
#include <stdint.h>
#include <sys/stat.h>
#include <unistd.h>

#include "npy.h"
#include "test.h"

static char dir[64];

static void path_in_dir(char *out, size_t cap, const char *name)
{
    ASSERT_LT(snprintf(out, cap, "%s/%s", dir, name), (long long)cap);
}

static void write_file(const char *path, const void *buf, size_t len)
{
    FILE *fp = fopen(path, "wb");

    ASSERT_TRUE(fp != NULL);
    ASSERT_EQ(fwrite(buf, 1, len, fp), len);
    ASSERT_EQ(fclose(fp), 0);
}

/* A small .npy writer: header dict with descr, fortran_order and shape (a Python tuple as
 * text), then len bytes of data; the file is loaded with npy_load_f32, which must succeed, and
 * removed. Returns the floats (caller frees) and fills info. */
static float *load_npy(const char *name, const char *descr, int fortran, const char *shape,
                       const void *data, size_t len, struct npy_info *info)
{
    char path[128], dict[160];
    unsigned char *buf = malloc(512 + len);
    struct tp_err err = {0};
    float *out = NULL;
    size_t hlen;
    FILE *fp;

    ASSERT_TRUE(buf != NULL);
    path_in_dir(path, sizeof(path), name);
    ASSERT_LT(snprintf(dict, sizeof(dict), "{'descr': '%s', 'fortran_order': %s, 'shape': %s, }\n",
                       descr, fortran ? "True" : "False", shape),
              (long long)sizeof(dict));
    memcpy(buf, "\x93NUMPY\x01\x00", 8);
    hlen = strlen(dict);
    buf[8] = (unsigned char)(hlen & 0xff);
    buf[9] = (unsigned char)(hlen >> 8);
    memcpy(buf + 10, dict, hlen);
    memcpy(buf + 10 + hlen, data, len);
    fp = fopen(path, "wb");
    ASSERT_TRUE(fp != NULL);
    ASSERT_EQ(fwrite(buf, 1, 10 + hlen + len, fp), 10 + hlen + len);
    ASSERT_EQ(fclose(fp), 0);
    free(buf);
    if (npy_load_f32(path, &out, info, &err) != 0)
        TEST_FAIL_("loading %s ('%s', fortran_order %d, shape %s): %s", name, descr, fortran, shape,
                   err.msg);
    ASSERT_EQ(unlink(path), 0);
    return out;
}

static size_t file_size(const char *path)
{
    struct stat st;

    ASSERT_EQ(stat(path, &st), 0);
    return (size_t)st.st_size;
}

static int count_dir_entries(const char *d)
{
    DIR *dp = opendir(d);
    struct dirent *e;
    int n = 0;

    ASSERT_TRUE(dp != NULL);
    while ((e = readdir(dp)))
        if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0)
            n++;
    closedir(dp);
    return n;
}

/* A .npy preamble of the given major version followed by dict, into out (cap bytes); header
 * length as given, or the dict's length when hlen is -1. Returns the bytes used. */
static size_t build(unsigned char *out, size_t cap, int major, const char *dict, long hlen)
{
    size_t d = strlen(dict), pre = major == 1 ? 10 : 12;
    unsigned long h = hlen < 0 ? (unsigned long)d : (unsigned long)hlen;

    ASSERT_LE(pre + d, cap);
    memcpy(out, "\x93NUMPY", 6);
    out[6] = (unsigned char)major;
    out[7] = 0;
    out[8] = (unsigned char)(h & 0xff);
    out[9] = (unsigned char)(h >> 8 & 0xff);
    if (major != 1) {
        out[10] = (unsigned char)(h >> 16 & 0xff);
        out[11] = (unsigned char)(h >> 24 & 0xff);
    }
    memcpy(out + pre, dict, d);
    return pre + d;
}

/* npy_parse_header on an exact-size heap copy of buf. */
static int parse_exact(const unsigned char *buf, size_t len, struct npy_info *info,
                       struct tp_err *err)
{
    unsigned char *copy = malloc(len ? len : 1);
    int rc;

    ASSERT_TRUE(copy != NULL);
    memcpy(copy, buf, len);
    rc = npy_parse_header(copy, len, info, err);
    free(copy);
    return rc;
}

static void expect_parse_ok(int major, const char *dict, enum tp_dtype dtype, int ndim,
                            const int64_t *shape, uint64_t count)
{
    unsigned char buf[512];
    struct npy_info info;
    struct tp_err err = {0};
    size_t len = build(buf, sizeof(buf), major, dict, -1);

    if (parse_exact(buf, len, &info, &err) != 0)
        TEST_FAIL_("parsing %s: %s", dict, err.msg);
    ASSERT_EQ(info.dtype, dtype);
    ASSERT_EQ(info.ndim, ndim);
    for (int i = 0; i < ndim; i++)
        ASSERT_EQ(info.shape[i], shape[i]);
    ASSERT_EQ(info.count, count);
    ASSERT_EQ(info.data_offset, len);
}

static void expect_parse_fail(int major, const char *dict, const char *needle)
{
    unsigned char buf[512];
    struct npy_info info;
    struct tp_err err = {0};
    size_t len = build(buf, sizeof(buf), major, dict, -1);

    if (parse_exact(buf, len, &info, &err) != -1)
        TEST_FAIL_("header %s parsed, expected an error with \"%s\"", dict, needle);
    ASSERT_EQ(err.code, TP_EINVAL);
    ASSERT_STR_HAS(err.msg, needle);
}

static void check_round_trip(const char *name, int ndim, const int64_t *shape, size_t count,
                             const char *shape_text)
{
    char path[128], text[256];
    float *in = malloc((count ? count : 1) * sizeof(float)), *out = NULL;
    struct npy_info info;
    struct tp_err err = {0};
    FILE *fp;

    ASSERT_TRUE(in != NULL);
    for (size_t i = 0; i < count; i++)
        in[i] = (float)i * 0.5f - 3.25f;
    path_in_dir(path, sizeof(path), name);
    if (npy_save_f32(path, in, ndim, shape, &err) != 0)
        TEST_FAIL_("saving %s: %s", path, err.msg);
    if (npy_load_f32(path, &out, &info, &err) != 0)
        TEST_FAIL_("loading %s: %s", path, err.msg);
    ASSERT_EQ(info.dtype, TP_F32);
    ASSERT_EQ(info.ndim, ndim);
    for (int i = 0; i < ndim; i++)
        ASSERT_EQ(info.shape[i], shape[i]);
    ASSERT_EQ(info.count, count);
    ASSERT_EQ(info.data_offset % 64, 0);
    ASSERT_EQ(file_size(path), info.data_offset + count * 4);
    ASSERT_TRUE(out != NULL);
    ASSERT_EQ(memcmp(in, out, count * sizeof(float)), 0);
    /* the header is what numpy itself writes: version 1.0, space padding, '\n' last */
    fp = fopen(path, "rb");
    ASSERT_TRUE(fp != NULL);
    ASSERT_EQ(fread(text, 1, info.data_offset, fp), info.data_offset);
    fclose(fp);
    ASSERT_EQ(text[6], 1);
    ASSERT_EQ(text[7], 0);
    ASSERT_EQ((unsigned char)text[8] | (unsigned char)text[9] << 8, info.data_offset - 10);
    ASSERT_EQ(text[info.data_offset - 1], '\n');
    ASSERT_EQ(text[info.data_offset - 2], ' ');
    text[info.data_offset - 1] = '\0';
    ASSERT_STR_HAS(text + 10, "{'descr': '<f4', 'fortran_order': False, 'shape': ");
    ASSERT_STR_HAS(text + 10, shape_text);
    free(in);
    free(out);
}

static void test_round_trip(void)
{
    int64_t s2[2] = {3, 5}, s1[1] = {7}, s0[1] = {0}, se[2] = {0, 3};

    check_round_trip("a.npy", 2, s2, 15, "'shape': (3, 5), }");
    check_round_trip("b.npy", 1, s1, 7, "'shape': (7,), }");
    check_round_trip("c.npy", 0, s0, 1, "'shape': (), }");
    check_round_trip("d.npy", 2, se, 0, "'shape': (0, 3), }");
    /* the temporary files are gone: only the four results remain */
    ASSERT_EQ(count_dir_entries(dir), 4);
}

static void test_save_overwrites(void)
{
    float a[2] = {1, 2}, b[3] = {3, 4, 5}, *out = NULL;
    int64_t sa[1] = {2}, sb[1] = {3};
    struct npy_info info;
    struct tp_err err = {0};
    char path[128];

    path_in_dir(path, sizeof(path), "over.npy");
    ASSERT_EQ(npy_save_f32(path, a, 1, sa, &err), 0);
    ASSERT_EQ(npy_save_f32(path, b, 1, sb, &err), 0);
    ASSERT_EQ(npy_load_f32(path, &out, &info, &err), 0);
    ASSERT_EQ(info.count, 3);
    ASSERT_TRUE(out[0] == 3 && out[1] == 4 && out[2] == 5);
    free(out);
    ASSERT_EQ(unlink(path), 0);
}

/* float16 files: '<f2' header, 2-byte elements, read back exactly. */
static void test_save_f16(void)
{
    uint16_t h[6] = {0x3c00, 0xc000, 0x0001, 0x7bff, 0x8000, 0x3555};
    int64_t shape[2] = {2, 3};
    struct npy_info info;
    struct tp_err err = {0};
    float *out = NULL;
    char path[128];

    path_in_dir(path, sizeof(path), "h.npy");
    ASSERT_EQ(npy_save_f16(path, h, 2, shape, &err), 0);
    ASSERT_EQ(npy_load_f32(path, &out, &info, &err), 0);
    ASSERT_EQ(info.dtype, TP_F16);
    ASSERT_EQ(info.count, 6);
    ASSERT_EQ(file_size(path), info.data_offset + 6 * 2);
    for (int i = 0; i < 6; i++)
        ASSERT_TRUE(out[i] == tp_f16_to_f32(h[i]));
    free(out);
    ASSERT_EQ(unlink(path), 0);
}

static void test_save_errors(void)
{
    float a[2] = {1, 2};
    int64_t s[TP_MAX_DIMS + 1] = {2, 1, 1, 1, 1, 1, 1, 1, 1}, neg[2] = {2, -1};
    struct tp_err err = {0};
    char path[128], sub[128];
    int before;

    path_in_dir(path, sizeof(path), "missing/x.npy");
    ASSERT_EQ(npy_save_f32(path, a, 1, s, &err), -1);
    ASSERT_EQ(err.code, TP_ESYS);
    ASSERT_STR_HAS(err.msg, path);
    ASSERT_STR_HAS(err.msg, "No such file");

    /* a rename onto a directory fails after the data was written: the temp file must go */
    path_in_dir(sub, sizeof(sub), "sub");
    ASSERT_EQ(mkdir(sub, 0700), 0);
    before = count_dir_entries(dir);
    ASSERT_EQ(npy_save_f32(sub, a, 1, s, &err), -1);
    ASSERT_EQ(err.code, TP_ESYS);
    ASSERT_STR_HAS(err.msg, "renaming");
    ASSERT_EQ(count_dir_entries(dir), before);
    ASSERT_EQ(rmdir(sub), 0);

    path_in_dir(path, sizeof(path), "bad.npy");
    ASSERT_EQ(npy_save_f32(path, a, 2, neg, &err), -1);
    ASSERT_EQ(err.code, TP_EINVAL);
    ASSERT_STR_HAS(err.msg, "negative dim -1");
    ASSERT_EQ(npy_save_f32(path, a, TP_MAX_DIMS + 1, s, &err), -1);
    ASSERT_EQ(err.code, TP_EINVAL);
    ASSERT_STR_HAS(err.msg, "ndim 9");
    ASSERT_EQ(access(path, F_OK), -1);
}

static void test_parse_handwritten(void)
{
    int64_t s48[2] = {4, 8}, s23[2] = {2, 3}, s5[1] = {5};
    int64_t s8[8] = {1, 2, 3, 4, 5, 6, 7, 8};

    /* numpy's own layout, version 1.0 and 2.0 */
    expect_parse_ok(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (4, 8), }    \n", TP_F32,
                    2, s48, 32);
    expect_parse_ok(2, "{'descr': '<f4', 'fortran_order': False, 'shape': (4, 8), }    \n", TP_F32,
                    2, s48, 32);
    expect_parse_ok(3, "{'descr': '<f4', 'fortran_order': False, 'shape': (4, 8), }\n", TP_F32, 2,
                    s48, 32);
    /* any key order, no trailing comma, F16 */
    expect_parse_ok(1, "{'shape': (2, 3), 'fortran_order': False, 'descr': '<f2'}", TP_F16, 2, s23,
                    6);
    /* odd spacing everywhere, a 1-tuple with spaces, F64 */
    expect_parse_ok(2, "  { 'descr' :'<f8' ,'fortran_order':False,\t'shape':( 5 , ) , }\n\n",
                    TP_F64, 1, s5, 5);
    /* double quotes, a 0-d array, newlines inside */
    expect_parse_ok(1, "{\"descr\": \"<f4\",\n \"fortran_order\": False,\n \"shape\": ()}\n",
                    TP_F32, 0, s5, 1);
    /* a trailing comma inside the tuple, and the most dims allowed */
    expect_parse_ok(1, "{'descr':'<f4','fortran_order':False,'shape':(4,8,)}", TP_F32, 2, s48, 32);
    expect_parse_ok(1, "{'descr':'<f4','fortran_order':False,'shape':(1,2,3,4,5,6,7,8)}", TP_F32, 8,
                    s8, 40320);
    /* bfloat16 in both spellings, and Fortran order */
    expect_parse_ok(1, "{'descr': '<V2', 'fortran_order': False, 'shape': (4, 8), }", TP_BF16, 2,
                    s48, 32);
    expect_parse_ok(1, "{'descr': '|V2', 'fortran_order': True, 'shape': (4, 8), }", TP_BF16, 2,
                    s48, 32);
    {
        unsigned char buf[128];
        struct npy_info info;
        struct tp_err err = {0};
        size_t len = build(buf, sizeof(buf), 1,
                           "{'descr': '|V2', 'fortran_order': True, 'shape': (4, 8), }", -1);

        ASSERT_EQ(parse_exact(buf, len, &info, &err), 0);
        ASSERT_EQ(info.fortran_order, 1);
        ASSERT_STR_EQ(info.descr, "|V2");
        len =
            build(buf, sizeof(buf), 1, "{'descr': '<f2', 'fortran_order': False, 'shape': ()}", -1);
        ASSERT_EQ(parse_exact(buf, len, &info, &err), 0);
        ASSERT_EQ(info.fortran_order, 0);
        ASSERT_STR_EQ(info.descr, "<f2");
    }
}

static void test_parse_errors(void)
{
    unsigned char buf[512];
    struct npy_info info;
    struct tp_err err = {0};
    const char *ok = "{'descr': '<f4', 'fortran_order': False, 'shape': (4, 8), }\n";
    size_t len;

    /* bad magic */
    len = build(buf, sizeof(buf), 1, ok, -1);
    buf[1] = 'X';
    ASSERT_EQ(parse_exact(buf, len, &info, &err), -1);
    ASSERT_EQ(err.code, TP_EINVAL);
    ASSERT_STR_HAS(err.msg, "bad magic");
    /* unknown versions */
    len = build(buf, sizeof(buf), 4, ok, -1);
    ASSERT_EQ(parse_exact(buf, len, &info, &err), -1);
    ASSERT_STR_HAS(err.msg, "version 4.0");
    len = build(buf, sizeof(buf), 1, ok, -1);
    buf[7] = 1;
    ASSERT_EQ(parse_exact(buf, len, &info, &err), -1);
    ASSERT_STR_HAS(err.msg, "version 1.1");
    /* a header length past the buffer, and one over the cap */
    len = build(buf, sizeof(buf), 1, ok, 4096);
    ASSERT_EQ(parse_exact(buf, len, &info, &err), -1);
    ASSERT_EQ(err.code, TP_EINVAL);
    ASSERT_STR_HAS(err.msg, "header length 4096 runs past");
    len = build(buf, sizeof(buf), 2, ok, 0x7fffffff);
    ASSERT_EQ(parse_exact(buf, len, &info, &err), -1);
    ASSERT_STR_HAS(err.msg, "header length 2147483647 exceeds the limit");
    /* every proper prefix of a good header fails cleanly, without reading past it */
    len = build(buf, sizeof(buf), 1, ok, -1);
    for (size_t n = 0; n < len; n++) {
        err = (struct tp_err){0};
        ASSERT_EQ(parse_exact(buf, n, &info, &err), -1);
        ASSERT_EQ(err.code, TP_EINVAL);
    }
    ASSERT_EQ(parse_exact(buf, len, &info, &err), 0);

    expect_parse_fail(1, "{'descr': '>f4', 'fortran_order': False, 'shape': (4,)}",
                      "big-endian dtype '>f4' is not supported (save it little-endian, '<f4')");
    expect_parse_fail(1, "{'descr': '>f2', 'fortran_order': False, 'shape': (4,)}", "'>f2'");
    expect_parse_fail(1, "{'descr': '<i8', 'fortran_order': False, 'shape': (4,)}",
                      "unsupported dtype '<i8' (expected '<f4', '<f2', '<f8', or '<V2' or '|V2' "
                      "for bfloat16)");
    expect_parse_fail(1, "{'descr': '<V4', 'fortran_order': False, 'shape': (4,)}", "'<V4'");
    expect_parse_fail(1, "{'descr': '>V2', 'fortran_order': False, 'shape': (4,)}", "'>V2'");
    expect_parse_fail(1, "{'descr': '|f4', 'fortran_order': False, 'shape': (4,)}", "'|f4'");
    expect_parse_fail(1, "{'descr': '<i4', 'fortran_order': False, 'shape': (4,)}", "'<i4'");
    expect_parse_fail(1, "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (4,)}",
                      "descr at byte 10 is not a string");
    expect_parse_fail(1, "{'descr': '<f4', 'fortran_order': Maybe, 'shape': (4,)}",
                      "True or False");
    expect_parse_fail(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (3, -1)}",
                      "negative dim -1");
    expect_parse_fail(1,
                      "{'descr': '<f4', 'fortran_order': False, 'shape': "
                      "(4294967296, 4294967296)}",
                      "shape (4294967296, 4294967296) of F32");
    expect_parse_fail(1, "{'descr': '<f2', 'fortran_order': False, 'shape': (1073741824, 3)}",
                      "exceeds the limit of 4294967296 bytes");
    expect_parse_fail(1,
                      "{'descr': '<f4', 'fortran_order': False, 'shape': "
                      "(99999999999999999999,)}",
                      "does not fit in 64 bits");
    expect_parse_fail(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (5)}",
                      "shape (5) is not a tuple");
    expect_parse_fail(1, "{'descr': '<f4', 'fortran_order': False, 'shape': [5]}",
                      "expected a tuple for 'shape'");
    expect_parse_fail(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (4 8)}",
                      "expected ',' or ')' in shape");
    expect_parse_fail(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (1,2,3,4,5,6,7,8,9)}",
                      "more than 8 dims");
    expect_parse_fail(1, "[('descr', '<f4')]", "header is not a dict");
    expect_parse_fail(1, "{'descr': '<f4', 'shape': (4,)}", "lacks key 'fortran_order'");
    expect_parse_fail(1, "{'descr': '<f4', 'fortran_order': False}", "lacks key 'shape'");
    expect_parse_fail(1, "{'fortran_order': False, 'shape': (4,)}", "lacks key 'descr'");
    expect_parse_fail(1,
                      "{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, "
                      "'shape': (4,)}",
                      "duplicate key 'descr'");
    expect_parse_fail(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (4,), 'x': 1}",
                      "unknown key 'x'");
    expect_parse_fail(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (4,)} x",
                      "only whitespace after the dict");
    expect_parse_fail(1, "{'descr': '<f4' 'fortran_order': False, 'shape': (4,)}",
                      "expected ',' or '}' at byte 16, found '''");
    expect_parse_fail(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (4,)",
                      "found the end of the header");
    expect_parse_fail(1, "{'descr': '<f4", "unterminated string");
    expect_parse_fail(1, "{'descr': '<f\\x34', 'fortran_order': False, 'shape': (4,)}",
                      "unsupported character 0x5c");
    expect_parse_fail(1, "{'descr' '<f4', 'fortran_order': False, 'shape': (4,)}", "expected ':'");
    expect_parse_fail(1, "{, }", "expected a quoted key or '}'");
    expect_parse_fail(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (4,)}\x01",
                      "found byte 0x01");
}

/* Handwritten files in the other dtypes load converted to float. */
static void test_load_f16_f64(void)
{
    static const unsigned char f16[] = {0x00, 0x3c, 0x00, 0xc0, 0xff, 0x7b};
    static const double f64[] = {1.5, -0.25, 1e300};
    unsigned char buf[512];
    struct npy_info info;
    struct tp_err err = {0};
    float *out = NULL;
    char path[128];
    size_t len;

    path_in_dir(path, sizeof(path), "h.npy");
    len = build(buf, sizeof(buf), 1,
                "{'descr': '<f2', 'fortran_order': False, 'shape': (3,), }"
                "\n",
                -1);
    memcpy(buf + len, f16, sizeof(f16));
    write_file(path, buf, len + sizeof(f16));
    if (npy_load_f32(path, &out, &info, &err) != 0)
        TEST_FAIL_("%s", err.msg);
    ASSERT_EQ(info.dtype, TP_F16);
    ASSERT_EQ(info.count, 3);
    ASSERT_TRUE(out[0] == 1.0f && out[1] == -2.0f && out[2] == 65504.0f);
    free(out);
    ASSERT_EQ(unlink(path), 0);

    path_in_dir(path, sizeof(path), "f64.npy");
    len = build(buf, sizeof(buf), 2,
                "{'descr': '<f8', 'fortran_order': False, 'shape': (1, 3)}"
                "\n",
                -1);
    memcpy(buf + len, f64, sizeof(f64));
    write_file(path, buf, len + sizeof(f64));
    if (npy_load_f32(path, &out, &info, &err) != 0)
        TEST_FAIL_("%s", err.msg);
    ASSERT_EQ(info.dtype, TP_F64);
    ASSERT_EQ(info.ndim, 2);
    ASSERT_TRUE(out[0] == 1.5f && out[1] == -0.25f && isinf(out[2]));
    free(out);
    ASSERT_EQ(unlink(path), 0);

    /* float64 that float32 cannot hold exactly is rounded to nearest */
    {
        double d[4] = {0.1, 1.0 / 3.0, -1e-40, 16777217.0};
        float *got = load_npy("f64r.npy", "<f8", 0, "(4,)", d, sizeof(d), &info);

        ASSERT_EQ(info.dtype, TP_F64);
        ASSERT_STR_EQ(info.descr, "<f8");
        for (int i = 0; i < 4; i++)
            ASSERT_TRUE(got[i] == (float)d[i]);
        ASSERT_TRUE(got[3] == 16777216.0f); /* the tie goes to the even neighbour */
        free(got);
    }
}

static uint32_t f32_bits(float f)
{
    uint32_t u;

    memcpy(&u, &f, sizeof(u));
    return u;
}

/* bfloat16 as ml_dtypes saves it ('<V2') and as plain numpy saves the same bits viewed as 'V2'
 * ('|V2'): every element widens to exactly its bits in the top half of a float32, NaN payloads,
 * subnormals and signed zeros included. 37 elements run the vector path and its tail. */
static void test_load_bf16(void)
{
    static const char *const descrs[] = {"<V2", "|V2"};
    uint16_t h[37] = {0x3f80, 0xc000, 0x7f80, 0xff80, 0x0001, 0x8000, 0x0000,
                      0x7fc1, 0xff81, 0x7f7f, 0x0080, 0x807f, 0x4049, 0x3eaa};
    struct npy_info info;

    for (int i = 14; i < 37; i++)
        h[i] = (uint16_t)(0x3c00 + 977 * i);
    for (int d = 0; d < 2; d++) {
        float *got = load_npy("bf.npy", descrs[d], 0, "(37,)", h, sizeof(h), &info);

        ASSERT_EQ(info.dtype, TP_BF16);
        ASSERT_STR_EQ(info.descr, descrs[d]);
        ASSERT_EQ(info.count, 37);
        ASSERT_EQ(info.fortran_order, 0);
        for (int i = 0; i < 37; i++)
            if (f32_bits(got[i]) != (uint32_t)h[i] << 16)
                TEST_FAIL_("%s element %d: bits 0x%08x, expected 0x%04x0000", descrs[d], i,
                           f32_bits(got[i]), h[i]);
        free(got);
    }
}

/* Fortran order: the file holds the array column-major; the loader returns it in C order, for
 * 2, 3 and 4 dims and through a conversion (float16). Each element's value spells its index in
 * decimal digits (element [1, 2, 3] is 123), so a wrong transpose names itself. */
static void test_load_fortran(void)
{
    static const int64_t shapes[3][4] = {{2, 3}, {2, 3, 4}, {3, 1, 2, 5}};
    static const int ndims[3] = {2, 3, 4};
    static const char *const texts[3] = {"(2, 3)", "(2, 3, 4)", "(3, 1, 2, 5)"};
    struct npy_info info;

    for (int t = 0; t < 3; t++) {
        int nd = ndims[t];
        const int64_t *sh = shapes[t];
        uint64_t n = 1;
        float col[120], want[120], *got;
        uint16_t col16[120];

        for (int k = 0; k < nd; k++)
            n *= (uint64_t)sh[k];
        /* walk the C-order indices; column-major puts index k at stride shape[0]*..*shape[k-1] */
        for (uint64_t i = 0; i < n; i++) {
            uint64_t rest = i, value = 0, off = 0, stride = 1, scale = 1;

            for (int k = nd - 1; k >= 0; k--) {
                value += rest % (uint64_t)sh[k] * scale;
                rest /= (uint64_t)sh[k];
                scale *= 10;
            }
            for (int k = 0; k < nd; k++) {
                uint64_t digit = value;

                for (int j = nd - 1; j > k; j--)
                    digit /= 10;
                off += digit % 10 * stride;
                stride *= (uint64_t)sh[k];
            }
            want[i] = (float)value;
            col[off] = (float)value;
            col16[off] = tp_f32_to_f16((float)value);
        }
        for (int half = 0; half < 2; half++) {
            got = half ? load_npy("fo.npy", "<f2", 1, texts[t], col16, n * 2, &info)
                       : load_npy("fo.npy", "<f4", 1, texts[t], col, n * 4, &info);
            ASSERT_EQ(info.fortran_order, 1);
            ASSERT_EQ(info.ndim, nd);
            for (int k = 0; k < nd; k++)
                ASSERT_EQ(info.shape[k], sh[k]);
            ASSERT_EQ(info.count, n);
            for (uint64_t i = 0; i < n; i++)
                if (got[i] != want[i])
                    TEST_FAIL_("%s %s element %llu: %g, expected %g", texts[t],
                               half ? "<f2" : "<f4", (unsigned long long)i, got[i], want[i]);
            free(got);
        }
    }
    /* one dim: both orders are the same bytes */
    {
        float v[3] = {1, 2, 3}, *got = load_npy("f1.npy", "<f4", 1, "(3,)", v, sizeof(v), &info);

        ASSERT_EQ(info.fortran_order, 1);
        ASSERT_TRUE(got[0] == 1 && got[1] == 2 && got[2] == 3);
        free(got);
    }
}

/* Refused dtypes also fail as whole files, naming the path and the descr. */
static void test_load_refused_dtypes(void)
{
    static const char *const bad[] = {">f4", "<i8", "|u1", "<c8"};
    unsigned char zeros[64] = {0};
    unsigned char buf[512];
    struct npy_info info;
    struct tp_err err = {0};
    float *out = NULL;
    char path[128], dict[128], quoted[8];

    path_in_dir(path, sizeof(path), "refused.npy");
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        size_t len;

        snprintf(dict, sizeof(dict), "{'descr': '%s', 'fortran_order': False, 'shape': (2,), }\n",
                 bad[i]);
        len = build(buf, sizeof(buf), 1, dict, -1);
        memcpy(buf + len, zeros, 16);
        write_file(path, buf, len + 16);
        err = (struct tp_err){0};
        ASSERT_EQ(npy_load_f32(path, &out, &info, &err), -1);
        ASSERT_TRUE(out == NULL);
        ASSERT_EQ(err.code, TP_EINVAL);
        ASSERT_STR_HAS(err.msg, path);
        snprintf(quoted, sizeof(quoted), "'%s'", bad[i]);
        ASSERT_STR_HAS(err.msg, quoted);
    }
    ASSERT_EQ(unlink(path), 0);
}

/* File-level errors: the size must match the header exactly, and messages name the path. */
static void test_load_errors(void)
{
    unsigned char buf[512 + 32 * 4 + 8] = {0};
    struct npy_info info;
    struct tp_err err = {0};
    float sentinel, *out = &sentinel; /* must come back NULL */
    char path[128];
    size_t len;

    path_in_dir(path, sizeof(path), "t.npy");
    len = build(buf, 512, 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (4, 8), }\n", -1);
    ASSERT_EQ(len, 70);
    /* shorter than the header says */
    write_file(path, buf, len + 31 * 4);
    ASSERT_EQ(npy_load_f32(path, &out, &info, &err), -1);
    ASSERT_TRUE(out == NULL);
    ASSERT_EQ(err.code, TP_EINVAL);
    ASSERT_STR_HAS(err.msg, path);
    ASSERT_STR_HAS(err.msg, "file is 194 bytes but its header says 198 (70 of header, 128 of");
    /* longer than the header says */
    write_file(path, buf, len + 33 * 4);
    ASSERT_EQ(npy_load_f32(path, &out, &info, &err), -1);
    ASSERT_EQ(err.code, TP_EINVAL);
    ASSERT_STR_HAS(err.msg, "file is 202 bytes but its header says 198");
    /* exactly right loads */
    write_file(path, buf, len + 32 * 4);
    ASSERT_EQ(npy_load_f32(path, &out, &info, &err), 0);
    ASSERT_EQ(info.count, 32);
    free(out);
    /* cut inside the header */
    write_file(path, buf, 40);
    ASSERT_EQ(npy_load_f32(path, &out, &info, &err), -1);
    ASSERT_EQ(err.code, TP_EINVAL);
    ASSERT_STR_HAS(err.msg, "header length 60 runs past the end");
    /* cut inside the preamble, and empty */
    write_file(path, buf, 7);
    ASSERT_EQ(npy_load_f32(path, &out, &info, &err), -1);
    ASSERT_STR_HAS(err.msg, "only 7 bytes");
    write_file(path, buf, 0);
    ASSERT_EQ(npy_load_f32(path, &out, &info, &err), -1);
    ASSERT_STR_HAS(err.msg, "only 0 bytes");
    /* errors from the header parser come with the path too */
    memcpy(buf, "PK\x03\x04", 4);
    write_file(path, buf, len + 32 * 4);
    ASSERT_EQ(npy_load_f32(path, &out, &info, &err), -1);
    ASSERT_STR_HAS(err.msg, path);
    ASSERT_STR_HAS(err.msg, "bad magic");
    ASSERT_EQ(unlink(path), 0);
    /* not there, and not a file */
    ASSERT_EQ(npy_load_f32(path, &out, &info, &err), -1);
    ASSERT_EQ(err.code, TP_ESYS);
    ASSERT_STR_HAS(err.msg, path);
    ASSERT_STR_HAS(err.msg, "No such file");
    ASSERT_EQ(npy_load_f32(dir, &out, &info, &err), -1);
    ASSERT_EQ(err.code, TP_EINVAL);
    ASSERT_STR_HAS(err.msg, "not a regular file");
}

static void test_seed(void)
{
    const char *seed = getenv("TP_SEED_DIR");
    struct npy_info info;
    struct tp_err err = {0};
    float *x = NULL, raw[32];
    char path[512];
    FILE *fp;

    if (!seed)
        TEST_FAIL_("TP_SEED_DIR is not set (ctest sets it to tests/data/seed)");
    snprintf(path, sizeof(path), "%s/seed.x.npy", seed);
    if (npy_load_f32(path, &x, &info, &err) != 0)
        TEST_FAIL_("%s", err.msg);
    ASSERT_EQ(info.dtype, TP_F32);
    ASSERT_EQ(info.ndim, 2);
    ASSERT_EQ(info.shape[0], 4);
    ASSERT_EQ(info.shape[1], 8);
    ASSERT_EQ(info.count, 32);
    ASSERT_EQ(info.data_offset, 128);
    /* the values are the file's last 128 bytes, read here without the loader */
    fp = fopen(path, "rb");
    ASSERT_TRUE(fp != NULL);
    ASSERT_EQ(fseek(fp, -128, SEEK_END), 0);
    ASSERT_EQ(fread(raw, 4, 32, fp), 32);
    fclose(fp);
    ASSERT_EQ(memcmp(raw, x, sizeof(raw)), 0);
    for (int i = 0; i < 32; i++)
        ASSERT_TRUE(isfinite(x[i]) && fabsf(x[i]) < 10);
    free(x);

    snprintf(path, sizeof(path), "%s/seed.y.npy", seed);
    if (npy_load_f32(path, &x, &info, &err) != 0)
        TEST_FAIL_("%s", err.msg);
    ASSERT_EQ(info.ndim, 2);
    ASSERT_EQ(info.shape[0], 4);
    ASSERT_EQ(info.shape[1], 12);
    free(x);
    snprintf(path, sizeof(path), "%s/mlp-up.x.npy", seed);
    if (npy_load_f32(path, &x, &info, &err) != 0)
        TEST_FAIL_("%s", err.msg);
    ASSERT_EQ(info.shape[0], 16);
    ASSERT_EQ(info.shape[1], 512);
    free(x);
}

int main(void)
{
    snprintf(dir, sizeof(dir), "/tmp/test_npy.XXXXXX");
    if (!mkdtemp(dir))
        TEST_FAIL_("mkdtemp: %s", strerror(errno));
    TEST_RUN(test_round_trip);
    TEST_RUN(test_save_overwrites);
    TEST_RUN(test_save_f16);
    TEST_RUN(test_save_errors);
    TEST_RUN(test_parse_handwritten);
    TEST_RUN(test_parse_errors);
    TEST_RUN(test_load_f16_f64);
    TEST_RUN(test_load_bf16);
    TEST_RUN(test_load_fortran);
    TEST_RUN(test_load_refused_dtypes);
    TEST_RUN(test_load_errors);
    TEST_RUN(test_seed);
    /* remove what the round trips left */
    {
        static const char *const names[] = {"a.npy", "b.npy", "c.npy", "d.npy"};
        char path[128];

        for (size_t i = 0; i < 4; i++) {
            path_in_dir(path, sizeof(path), names[i]);
            ASSERT_EQ(unlink(path), 0);
        }
        ASSERT_EQ(rmdir(dir), 0);
    }
    return 0;
}
