/* test_tensor.c -- unit tests of lib/tensor.c: the half-precision decoders on known bit patterns,
 * the dtype name tables in both spellings, the conversion of little-endian buffers, and the
 * overflow-safe shape product that every file and request parser relies on. */
#include <stdint.h>

#include "tensor.h"
#include "test.h"

static uint32_t f32_bits(float f)
{
    uint32_t u;

    memcpy(&u, &f, sizeof(u));
    return u;
}

static void test_f16(void)
{
    ASSERT_EQ(f32_bits(tp_f16_to_f32(0x3c00)), f32_bits(1.0f));
    ASSERT_EQ(f32_bits(tp_f16_to_f32(0xc000)), f32_bits(-2.0f));
    ASSERT_EQ(f32_bits(tp_f16_to_f32(0x7bff)), f32_bits(65504.0f));
    ASSERT_EQ(f32_bits(tp_f16_to_f32(0x3555)), f32_bits(0x555p-12f)); /* 1365/4096, ~1/3 */
    /* smallest and largest subnormals: 2^-24 and 1023 * 2^-24 */
    ASSERT_EQ(f32_bits(tp_f16_to_f32(0x0001)), f32_bits(0x1p-24f));
    ASSERT_EQ(f32_bits(tp_f16_to_f32(0x03ff)), f32_bits(1023 * 0x1p-24f));
    ASSERT_EQ(f32_bits(tp_f16_to_f32(0x8001)), f32_bits(-0x1p-24f));
    /* smallest normal: 2^-14 */
    ASSERT_EQ(f32_bits(tp_f16_to_f32(0x0400)), f32_bits(0x1p-14f));
    ASSERT_EQ(f32_bits(tp_f16_to_f32(0x7c00)), f32_bits(INFINITY));
    ASSERT_EQ(f32_bits(tp_f16_to_f32(0xfc00)), f32_bits(-INFINITY));
    ASSERT_TRUE(isnan(tp_f16_to_f32(0x7e00)));
    ASSERT_EQ(f32_bits(tp_f16_to_f32(0x0000)), 0x00000000u);
    ASSERT_EQ(f32_bits(tp_f16_to_f32(0x8000)), 0x80000000u);
}

static void test_bf16(void)
{
    ASSERT_EQ(f32_bits(tp_bf16_to_f32(0x3f80)), f32_bits(1.0f));
    ASSERT_EQ(f32_bits(tp_bf16_to_f32(0xc040)), f32_bits(-3.0f));
    ASSERT_EQ(f32_bits(tp_bf16_to_f32(0x3e80)), f32_bits(0.25f));
    ASSERT_EQ(f32_bits(tp_bf16_to_f32(0x7f80)), f32_bits(INFINITY));
    ASSERT_EQ(f32_bits(tp_bf16_to_f32(0x8000)), 0x80000000u);
    ASSERT_EQ(f32_bits(tp_bf16_to_f32(0x0001)), 0x00010000u);
}

static void test_names(void)
{
    static const enum tp_dtype all[] = {TP_F32, TP_F16, TP_BF16, TP_F64};
    static const char *const file[] = {"F32", "F16", "BF16", "F64"};
    static const char *const wire[] = {"FP32", "FP16", "BF16", "FP64"};
    static const size_t size[] = {4, 2, 2, 8};

    for (size_t i = 0; i < 4; i++) {
        ASSERT_STR_EQ(tp_dtype_file_name(all[i]), file[i]);
        ASSERT_STR_EQ(tp_dtype_wire_name(all[i]), wire[i]);
        ASSERT_EQ(tp_dtype_from_file_name(file[i]), all[i]);
        ASSERT_EQ(tp_dtype_from_wire_name(wire[i]), all[i]);
        ASSERT_EQ(tp_dtype_size(all[i]), size[i]);
    }
    ASSERT_EQ(tp_dtype_size(TP_DTYPE_INVALID), 0);
    ASSERT_STR_EQ(tp_dtype_file_name(TP_DTYPE_INVALID), "?");
    ASSERT_STR_EQ(tp_dtype_wire_name(TP_DTYPE_INVALID), "?");
    /* each spelling belongs to its own table, and names are case-sensitive */
    ASSERT_EQ(tp_dtype_from_file_name("FP32"), TP_DTYPE_INVALID);
    ASSERT_EQ(tp_dtype_from_wire_name("F32"), TP_DTYPE_INVALID);
    ASSERT_EQ(tp_dtype_from_file_name("f32"), TP_DTYPE_INVALID);
    ASSERT_EQ(tp_dtype_from_file_name("I64"), TP_DTYPE_INVALID);
    ASSERT_EQ(tp_dtype_from_file_name(""), TP_DTYPE_INVALID);
}

static void test_convert(void)
{
    /* little-endian bytes of 1.0, -2.0 in each type */
    static const unsigned char f16[] = {0x00, 0x3c, 0x00, 0xc0};
    static const unsigned char bf16[] = {0x80, 0x3f, 0x00, 0xc0};
    static const unsigned char f64[] = {0, 0, 0, 0, 0, 0, 0xf0, 0x3f, 0, 0, 0, 0, 0, 0, 0, 0xc0};
    static const unsigned char f32[] = {0x00, 0x00, 0x80, 0x3f, 0x00, 0x00, 0x00, 0xc0};
    float out[3] = {7, 7, 7};

    tp_convert_to_f32(out, f16, 2, TP_F16);
    ASSERT_TRUE(out[0] == 1.0f && out[1] == -2.0f && out[2] == 7.0f);
    out[0] = out[1] = 7;
    tp_convert_to_f32(out, bf16, 2, TP_BF16);
    ASSERT_TRUE(out[0] == 1.0f && out[1] == -2.0f && out[2] == 7.0f);
    out[0] = out[1] = 7;
    tp_convert_to_f32(out, f64, 2, TP_F64);
    ASSERT_TRUE(out[0] == 1.0f && out[1] == -2.0f && out[2] == 7.0f);
    out[0] = out[1] = 7;
    tp_convert_to_f32(out, f32, 2, TP_F32);
    ASSERT_TRUE(out[0] == 1.0f && out[1] == -2.0f && out[2] == 7.0f);
}

static void test_shape_count(void)
{
    int64_t d[4] = {4, 8, 3, 0};
    int64_t big[3] = {INT64_C(1) << 32, INT64_C(1) << 32, 16};
    int64_t neg[2] = {4, -1};
    uint64_t n = 12345;

    ASSERT_EQ(tp_shape_count(d, 3, 4, UINT64_MAX, &n), 0);
    ASSERT_EQ(n, 96);
    ASSERT_EQ(tp_shape_count(d, 0, 4, UINT64_MAX, &n), 0); /* a scalar has one element */
    ASSERT_EQ(n, 1);
    ASSERT_EQ(tp_shape_count(d, 4, 4, UINT64_MAX, &n), 0); /* a zero dim makes it empty */
    ASSERT_EQ(n, 0);
    /* the limit is in bytes and is inclusive */
    ASSERT_EQ(tp_shape_count(d, 3, 4, 384, &n), 0);
    ASSERT_EQ(n, 96);
    n = 12345;
    ASSERT_EQ(tp_shape_count(d, 3, 4, 383, &n), -1);
    ASSERT_EQ(n, 12345); /* untouched on failure */
    ASSERT_EQ(tp_shape_count(d, 3, 0, 96, &n), 0);
    ASSERT_EQ(n, 96);
    /* 2^32 * 2^32 overflows 64 bits before the limit is reached */
    ASSERT_EQ(tp_shape_count(big, 2, 1, UINT64_MAX, &n), -1);
    ASSERT_EQ(tp_shape_count(big, 3, 1, UINT64_MAX, &n), -1);
    /* 2^32 * 2^31 elements fit, times 4 bytes do not */
    big[1] = INT64_C(1) << 31;
    ASSERT_EQ(tp_shape_count(big, 2, 1, UINT64_MAX, &n), 0);
    ASSERT_EQ(n, UINT64_C(1) << 63);
    ASSERT_EQ(tp_shape_count(big, 2, 4, UINT64_MAX, &n), -1);
    ASSERT_EQ(tp_shape_count(neg, 2, 4, UINT64_MAX, &n), -1);
    neg[1] = INT64_MIN;
    ASSERT_EQ(tp_shape_count(neg, 2, 4, UINT64_MAX, &n), -1);
}

int main(void)
{
    TEST_RUN(test_f16);
    TEST_RUN(test_bf16);
    TEST_RUN(test_names);
    TEST_RUN(test_convert);
    TEST_RUN(test_shape_count);
    return 0;
}
