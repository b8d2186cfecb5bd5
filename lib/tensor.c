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

static uint32_t f32_to_bits(float f)
{
    uint32_t u;

    memcpy(&u, &f, sizeof(u));
    return u;
}

uint16_t tp_f32_to_bf16(float f)
{
    uint32_t u = f32_to_bits(f);

    if ((u & 0x7fffffffu) > 0x7f800000u) /* NaN: keep the sign and the top of the payload */
        return (uint16_t)((u >> 16) | 0x0040);
    /* adding 0x7fff plus the kept lowest bit rounds to nearest, ties to even; a carry out of the
     * mantissa bumps the exponent, up to inf, which is right */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

uint16_t tp_f32_to_f16(float f)
{
    uint32_t u = f32_to_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    uint32_t a = u & 0x7fffffffu, exp = a >> 23, man = a & 0x7fffff;
    uint32_t shift, h, rest, half;

    if (a > 0x7f800000u) /* NaN: quiet, top payload bits kept */
        return (uint16_t)(sign | 0x7e00 | (man >> 13));
    if (a >= 0x477ff000u) /* >= 65520, the midpoint between 65504 and 2^16, and inf */
        return (uint16_t)(sign | 0x7c00);
    if (exp >= 113) { /* normal in FP16: 2^-14 and up */
        h = ((exp - 112) << 10) | (man >> 13);
        rest = man & 0x1fff;
        half = 0x1000;
    } else { /* FP16 subnormal or zero: the value in units of 2^-24, with 24-bit mantissa */
        if (exp < 102) /* below 2^-25: rounds to zero (2^-25 itself is a tie, to even 0) */
            return sign;
        man |= 0x800000;
        shift = 126 - exp; /* 14..24 */
        h = man >> shift;
        rest = man & ((1u << shift) - 1);
        half = 1u << (shift - 1);
    }
    /* a carry from the mantissa into the exponent gives the next binade, which is right */
    if (rest > half || (rest == half && (h & 1)))
        h++;
    return (uint16_t)(sign | h);
}

void tp_convert_from_f32(void *dst, const float *src, size_t n, enum tp_dtype t)
{
    unsigned char *p = dst;

    if (t == TP_F32) {
        if ((void *)src != dst)
            memcpy(dst, src, n * 4);
        return;
    }
    for (size_t i = 0; i < n; i++) {
        float f;
        uint16_t h;

        /* memcpy, not a float load through dst's type: in place, the bytes are shared */
        memcpy(&f, (const unsigned char *)src + 4 * i, sizeof(f));
        h = t == TP_BF16 ? tp_f32_to_bf16(f) : tp_f32_to_f16(f);
        p[2 * i] = (unsigned char)h;
        p[2 * i + 1] = (unsigned char)(h >> 8);
    }
}

void tp_widen_in_place(float *buf, size_t n, enum tp_dtype t)
{
    unsigned char *b = (unsigned char *)buf, *src = b + 2 * n;

    /* float i's bytes [4i, 4i+4) end before element i+1's at 2n+2i+2, so every element is read
     * before a float covers it */
    for (size_t i = 0; i < n; i++) {
        uint16_t h = (uint16_t)(src[2 * i] | (src[2 * i + 1] << 8));
        float f = t == TP_BF16 ? tp_bf16_to_f32(h) : tp_f16_to_f32(h);

        memcpy(b + 4 * i, &f, sizeof(f));
    }
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
