/* tensor.c -- element types and conversions (see tensor.h). The half-precision decoders are
 * bit-exact and need no FPU support for F16, so the CPU backend and the reference agree on every
 * weight value loaded from a file. The buffer conversions, which tpd runs on every FP16/BF16
 * request and response, use the x86 F16C (FP16) and AVX2 (BF16) instructions when the CPU has
 * them; they give the same bits as the scalar code (tests/unit/test_tensor.c checks both against
 * each other). */
#include "tensor.h"

#include <string.h>
#include <strings.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#include <immintrin.h>
#define HAVE_F16C_PATH 1
#endif

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

enum tp_dtype tp_dtype_from_flag(const char *flag)
{
    return strcasecmp(flag, "fp32") == 0   ? TP_F32
           : strcasecmp(flag, "fp16") == 0 ? TP_F16
           : strcasecmp(flag, "bf16") == 0 ? TP_BF16
                                           : TP_DTYPE_INVALID;
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

    if (exp == 0x1f) /* inf, or a NaN made quiet with its payload kept, as F16C does */
        return bits_to_f32(sign | 0x7f800000u | (man << 13) | (man ? 0x00400000u : 0));
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

#ifdef HAVE_F16C_PATH
/* The F16C instructions convert 8 elements at once, rounding to nearest even (the immediate),
 * with the same results as the scalar code on every input: NaNs keep their sign and top payload
 * bits and become quiet, overflow gives inf, subnormals are exact (tested over every FP16 value
 * and the rounding midpoints). On the coordinator's hot path they are about 10x faster. Chosen
 * at run time, so the build runs on any x86-64. Both loops work in place as the scalar ones do:
 * a vector's source is loaded before its result is stored, and a store never reaches a source
 * byte not yet loaded. Returns how many elements they did (a multiple of 8). */
__attribute__((target("f16c,avx"))) static size_t narrow_f16c(unsigned char *dst, const float *src,
                                                              size_t n)
{
    size_t i = 0;

    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps((const float *)(const void *)((const char *)src + 4 * i));
        __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);

        _mm_storeu_si128((__m128i *)(void *)(dst + 2 * i), h);
    }
    return i;
}

__attribute__((target("f16c,avx"))) static size_t widen_f16c(unsigned char *dst,
                                                             const unsigned char *src, size_t n)
{
    size_t i = 0;

    for (; i + 8 <= n; i += 8) {
        __m128i h = _mm_loadu_si128((const __m128i *)(const void *)(src + 2 * i));

        _mm256_storeu_ps((float *)(void *)(dst + 4 * i), _mm256_cvtph_ps(h));
    }
    return i;
}

/* BF16 with AVX2 integer operations: the same rounding as tp_f32_to_bf16, NaNs included. */
__attribute__((target("avx2"))) static size_t narrow_bf16_avx2(unsigned char *dst, const float *src,
                                                               size_t n)
{
    const __m256i abs = _mm256_set1_epi32(0x7fffffff), inf = _mm256_set1_epi32(0x7f800000);
    const __m256i bias = _mm256_set1_epi32(0x7fff), one = _mm256_set1_epi32(1);
    const __m256i quiet = _mm256_set1_epi32(0x40);
    size_t i = 0;

    for (; i + 8 <= n; i += 8) {
        __m256i u = _mm256_loadu_si256((const __m256i *)(const void *)((const char *)src + 4 * i));
        __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, abs), inf);
        __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), one);
        __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(bias, lsb)), 16);
        __m256i q = _mm256_or_si256(_mm256_srli_epi32(u, 16), quiet);
        __m256i h = _mm256_blendv_epi8(r, q, nan);
        /* 8 x 32 -> 8 x 16: packus works within 128-bit lanes, so gather qwords 0 and 2 */
        __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi32(h, h), 0x08);

        _mm_storeu_si128((__m128i *)(void *)(dst + 2 * i), _mm256_castsi256_si128(p));
    }
    return i;
}

__attribute__((target("avx2"))) static size_t widen_bf16_avx2(unsigned char *dst,
                                                              const unsigned char *src, size_t n)
{
    size_t i = 0;

    for (; i + 8 <= n; i += 8) {
        __m128i h = _mm_loadu_si128((const __m128i *)(const void *)(src + 2 * i));
        __m256i u = _mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);

        _mm256_storeu_si256((__m256i *)(void *)(dst + 4 * i), u);
    }
    return i;
}

/* Each answer is computed once; threads that race to compute it get the same one, and atomics
 * keep the race defined. */
static int have_f16c(void)
{
    static int known = -1;
    int k = __atomic_load_n(&known, __ATOMIC_RELAXED);

    /* CPUID and XGETBV by hand: clang 14 has no "f16c" for __builtin_cpu_supports. F16C needs
     * AVX, and AVX needs the OS to save the YMM registers (OSXSAVE, XCR0 bits 1 and 2). */
    if (k < 0) {
        unsigned a, b, c, d, lo, hi;

        k = 0;
        if (__get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C) && (c & bit_AVX) &&
            (c & bit_OSXSAVE)) {
            __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
            k = (lo & 6) == 6;
        }
        __atomic_store_n(&known, k, __ATOMIC_RELAXED);
    }
    return k;
}

static int have_avx2(void)
{
    static int known = -1;
    int k = __atomic_load_n(&known, __ATOMIC_RELAXED);

    if (k < 0) {
        k = __builtin_cpu_supports("avx2");
        __atomic_store_n(&known, k, __ATOMIC_RELAXED);
    }
    return k;
}
#endif

void tp_convert_from_f32(void *dst, const float *src, size_t n, enum tp_dtype t)
{
    unsigned char *p = dst;
    size_t i = 0;

    if (t == TP_F32) {
        if ((void *)src != dst)
            memcpy(dst, src, n * 4);
        return;
    }
#ifdef HAVE_F16C_PATH
    if (t == TP_F16 && have_f16c())
        i = narrow_f16c(p, src, n);
    else if (t == TP_BF16 && have_avx2())
        i = narrow_bf16_avx2(p, src, n);
#endif
    for (; i < n; i++) {
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
    size_t i = 0;

    /* float i's bytes [4i, 4i+4) end before element i+1's at 2n+2i+2, so every element is read
     * before a float covers it (and 8 floats from i end at 4i+32, no later than the elements
     * from i+8 begin, at 2n+2i+16, while i+8 <= n) */
#ifdef HAVE_F16C_PATH
    if (t == TP_F16 && have_f16c())
        i = widen_f16c(b, src, n);
    else if (t == TP_BF16 && have_avx2())
        i = widen_bf16_avx2(b, src, n);
#endif
    for (; i < n; i++) {
        uint16_t h = (uint16_t)(src[2 * i] | (src[2 * i + 1] << 8));
        float f = t == TP_BF16 ? tp_bf16_to_f32(h) : tp_f16_to_f32(h);

        memcpy(b + 4 * i, &f, sizeof(f));
    }
}

void tp_convert_to_f32(float *dst, const void *src, size_t n, enum tp_dtype t)
{
    const unsigned char *p = src;
    size_t i = 0;

    switch (t) {
    case TP_F32: memcpy(dst, src, n * 4); break;
    case TP_F16:
#ifdef HAVE_F16C_PATH
        if (have_f16c())
            i = widen_f16c((unsigned char *)dst, p, n);
#endif
        for (; i < n; i++)
            dst[i] = tp_f16_to_f32((uint16_t)(p[2 * i] | (p[2 * i + 1] << 8)));
        break;
    case TP_BF16:
#ifdef HAVE_F16C_PATH
        if (have_avx2())
            i = widen_bf16_avx2((unsigned char *)dst, p, n);
#endif
        for (; i < n; i++)
            dst[i] = tp_bf16_to_f32((uint16_t)(p[2 * i] | (p[2 * i + 1] << 8)));
        break;
    case TP_F64:
        for (; i < n; i++) {
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
