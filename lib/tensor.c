/* tensor.c -- element types and conversions (see tensor.h). The half-precision decoders are
 * bit-exact and need no FPU support for F16, so the CPU backend and the reference agree on every
 * weight value loaded from a file. */
#include "tensor.h"

#include <string.h>

/* Files and the wire are little-endian; F32 and F64 are copied as they are. */
_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "tpd assumes a little-endian host");

static const struct {
    enum tp_dtype t;
    size_t size;
    const char *file;
    const char *wire;
} dtypes[] = {
    {TP_F32, 4, "F32", "FP32"},
    {TP_F16, 2, "F16", "FP16"},
    {TP_BF16, 2, "BF16", "BF16"},
    {TP_F64, 8, "F64", "FP64"},
};

#define NDTYPES (sizeof(dtypes) / sizeof(dtypes[0]))

size_t tp_dtype_size(enum tp_dtype t)
{
    for (size_t i = 0; i < NDTYPES; i++)
        if (dtypes[i].t == t)
            return dtypes[i].size;
    return 0;
}

const char *tp_dtype_file_name(enum tp_dtype t)
{
    for (size_t i = 0; i < NDTYPES; i++)
        if (dtypes[i].t == t)
            return dtypes[i].file;
    return "?";
}

const char *tp_dtype_wire_name(enum tp_dtype t)
{
    for (size_t i = 0; i < NDTYPES; i++)
        if (dtypes[i].t == t)
            return dtypes[i].wire;
    return "?";
}

enum tp_dtype tp_dtype_from_file_name(const char *name)
{
    for (size_t i = 0; i < NDTYPES; i++)
        if (strcmp(dtypes[i].file, name) == 0)
            return dtypes[i].t;
    return TP_DTYPE_INVALID;
}

enum tp_dtype tp_dtype_from_wire_name(const char *name)
{
    for (size_t i = 0; i < NDTYPES; i++)
        if (strcmp(dtypes[i].wire, name) == 0)
            return dtypes[i].t;
    return TP_DTYPE_INVALID;
}

static float bits_to_f32(uint32_t u)
{
    float f;

    memcpy(&f, &u, sizeof(f));
    return f;
}

float tp_bf16_to_f32(uint16_t h)
{
    return bits_to_f32((uint32_t)h << 16);
}

float tp_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t man = h & 0x3ff;

    if (exp == 0x1f) /* inf or nan */
        return bits_to_f32(sign | 0x7f800000u | (man << 13));
    if (exp == 0) {
        if (man == 0)
            return bits_to_f32(sign);
        /* subnormal: normalise the mantissa */
        exp = 127 - 15 + 1;
        while (!(man & 0x400)) {
            man <<= 1;
            exp--;
        }
        man &= 0x3ff;
        return bits_to_f32(sign | (exp << 23) | (man << 13));
    }
    return bits_to_f32(sign | ((exp + 127 - 15) << 23) | (man << 13));
}

void tp_convert_to_f32(float *dst, const void *src, size_t n, enum tp_dtype t)
{
    const unsigned char *p = src;

    switch (t) {
    case TP_F32: memcpy(dst, src, n * 4); break;
    case TP_F16:
        for (size_t i = 0; i < n; i++)
            dst[i] = tp_f16_to_f32((uint16_t)(p[2 * i] | (p[2 * i + 1] << 8)));
        break;
    case TP_BF16:
        for (size_t i = 0; i < n; i++)
            dst[i] = tp_bf16_to_f32((uint16_t)(p[2 * i] | (p[2 * i + 1] << 8)));
        break;
    case TP_F64:
        for (size_t i = 0; i < n; i++) {
            double d;

            memcpy(&d, p + 8 * i, sizeof(d));
            dst[i] = (float)d;
        }
        break;
    case TP_DTYPE_INVALID: break;
    }
}

int tp_shape_count(const int64_t *dims, int ndim, size_t elem_size, uint64_t limit, uint64_t *count)
{
    uint64_t n = 1;

    for (int i = 0; i < ndim; i++) {
        if (dims[i] < 0)
            return -1;
        if (dims[i] != 0 && n > limit / (uint64_t)dims[i])
            return -1;
        n *= (uint64_t)dims[i];
    }
    if (elem_size && n > limit / elem_size)
        return -1;
    *count = n;
    return 0;
}
