/* test_tensor.c -- unit tests of lib/tensor.c: the half-precision decoders on known bit patterns,
 * the dtype name tables in both spellings, the conversion of little-endian buffers, and the
 * overflow-safe shape product that every file and request parser relies on; the FP32 -> FP16/BF16
 * encoders against a reference that finds the nearest value by comparing with the exact midpoints
 * between neighbouring half-precision values (in double), a method independent of the bit tricks
 * of the encoders. */
#include <float.h>
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
    /* the command line's spelling, in any case */
    ASSERT_EQ(tp_dtype_from_flag("fp32"), TP_F32);
    ASSERT_EQ(tp_dtype_from_flag("FP16"), TP_F16);
    ASSERT_EQ(tp_dtype_from_flag("Bf16"), TP_BF16);
    ASSERT_EQ(tp_dtype_from_flag("fp64"), TP_DTYPE_INVALID);
    ASSERT_EQ(tp_dtype_from_flag("f32"), TP_DTYPE_INVALID);
    ASSERT_EQ(tp_dtype_from_flag(""), TP_DTYPE_INVALID);
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

/* The reference: tab[k] holds the k-th finite non-negative value (bit pattern k; patterns of
 * non-negative values are increasing), ntab of them. Returns the bit pattern (without sign) x
 * rounds to, nearest with ties to even, or inf_bits when it rounds past the largest finite
 * value, whose virtual successor is 2^(emax+1) (top). */
static uint16_t ref_round(double ax, const double *tab, int ntab, double top, uint16_t inf_bits)
{
    int lo = 0, hi = ntab - 1;
    double next, mid;

    if (ax >= tab[ntab - 1]) {
        mid = (tab[ntab - 1] + top) / 2; /* exact in double: a few more bits than the values */
        if (ax < mid)
            return (uint16_t)(ntab - 1);
        if (ax > mid || ((ntab - 1) & 1))
            return inf_bits;
        return (uint16_t)(ntab - 1);
    }
    while (lo < hi) { /* the largest k with tab[k] <= ax */
        int m = (lo + hi + 1) / 2;

        if (tab[m] <= ax)
            lo = m;
        else
            hi = m - 1;
    }
    next = tab[lo + 1];
    mid = (tab[lo] + next) / 2;
    if (ax < mid)
        return (uint16_t)lo;
    if (ax > mid)
        return (uint16_t)(lo + 1);
    return (uint16_t)((lo & 1) ? lo + 1 : lo);
}

static uint32_t lcg(uint64_t *s)
{
    *s = *s * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t)(*s >> 32);
}

static float bits_f32(uint32_t u)
{
    float f;

    memcpy(&f, &u, sizeof(f));
    return f;
}

/* Checks enc against the reference on x; returns 1 when they differ (printing the first few). */
static int check_round(uint16_t (*enc)(float), float x, const double *tab, int ntab, double top,
                       uint16_t inf_bits, const char *what)
{
    static int shown;
    uint16_t want = ref_round(fabs((double)x), tab, ntab, top, inf_bits);
    uint16_t got = enc(x);

    want |= signbit(x) ? 0x8000 : 0;
    if (got == want)
        return 0;
    if (shown++ < 5)
        fprintf(stderr, "%s(%a = 0x%08x) = 0x%04x, expected 0x%04x\n", what, (double)x, f32_bits(x),
                got, want);
    return 1;
}

/* Every FP16 and BF16 value survives the trip through float unchanged (NaNs stay NaN). */
static void test_round_trip(void)
{
    int bad = 0;

    for (uint32_t h = 0; h < 65536; h++) {
        float f = tp_f16_to_f32((uint16_t)h), g = tp_bf16_to_f32((uint16_t)h);

        if (isnan(f))
            bad += !((tp_f32_to_f16(f) & 0x7c00) == 0x7c00 && (tp_f32_to_f16(f) & 0x3ff) &&
                     (tp_f32_to_f16(f) & 0x8000) == (h & 0x8000));
        else
            bad += tp_f32_to_f16(f) != h;
        if (isnan(g))
            bad += !isnan(tp_bf16_to_f32(tp_f32_to_bf16(g))) ||
                   (tp_f32_to_bf16(g) & 0x8000) != (h & 0x8000);
        else
            bad += tp_f32_to_bf16(g) != h;
    }
    ASSERT_EQ(bad, 0);
}

static void test_round_f16(void)
{
    static double tab[0x7c00];
    uint64_t seed = 42;
    int bad = 0;

    for (int k = 0; k < 0x7c00; k++) /* finite non-negative FP16 values, decoded by hand */
        tab[k] = (k >> 10) ? ldexp(1024 + (k & 0x3ff), (k >> 10) - 25) : ldexp(k, -24);
    ASSERT_TRUE(tab[0x7bff] == 65504.0 && tab[1] == 0x1p-24);
    /* every midpoint between neighbours, and the floats on either side of it */
    for (int k = 0; k < 0x7c00; k++) {
        double mid = (tab[k] + (k + 1 < 0x7c00 ? tab[k + 1] : 65536.0)) / 2;
        float m = (float)mid; /* exact: 12 significant bits at most */

        ASSERT_TRUE((double)m == mid);
        bad += check_round(tp_f32_to_f16, m, tab, 0x7c00, 65536.0, 0x7c00, "f16");
        bad += check_round(tp_f32_to_f16, -m, tab, 0x7c00, 65536.0, 0x7c00, "f16");
        bad += check_round(tp_f32_to_f16, nextafterf(m, 0), tab, 0x7c00, 65536.0, 0x7c00, "f16");
        bad += check_round(tp_f32_to_f16, nextafterf(m, INFINITY), tab, 0x7c00, 65536.0, 0x7c00,
                           "f16");
    }
    /* random finite floats, and random floats near FP16's range */
    for (int i = 0; i < 1000000; i++) {
        uint32_t u = lcg(&seed);
        float x = bits_f32(u);

        if (!isfinite(x))
            continue;
        bad += check_round(tp_f32_to_f16, x, tab, 0x7c00, 65536.0, 0x7c00, "f16");
        x = bits_f32((u & 0x83ffffffu) | 0x34000000u); /* 2^-23 .. 2^16 */
        bad += check_round(tp_f32_to_f16, x, tab, 0x7c00, 65536.0, 0x7c00, "f16");
        x = bits_f32((u & 0x807fffffu) | (uint32_t)(96 + (u >> 27)) << 23); /* 2^-31 .. 2^0 */
        bad += check_round(tp_f32_to_f16, x, tab, 0x7c00, 65536.0, 0x7c00, "f16");
    }
    ASSERT_EQ(bad, 0);
    /* the special cases by name */
    ASSERT_EQ(tp_f32_to_f16(65504.0f), 0x7bff);
    ASSERT_EQ(tp_f32_to_f16(65519.996f), 0x7bff);
    ASSERT_EQ(tp_f32_to_f16(65520.0f), 0x7c00);
    ASSERT_EQ(tp_f32_to_f16(-1e30f), 0xfc00);
    ASSERT_EQ(tp_f32_to_f16(INFINITY), 0x7c00);
    ASSERT_EQ(tp_f32_to_f16(-INFINITY), 0xfc00);
    ASSERT_EQ(tp_f32_to_f16(0x1p-25f), 0x0000);                /* tie, to even zero */
    ASSERT_EQ(tp_f32_to_f16(nextafterf(0x1p-25f, 1)), 0x0001); /* past the tie */
    ASSERT_EQ(tp_f32_to_f16(0x1.8p-24f), 0x0002);              /* tie between 1 and 2: even */
    ASSERT_EQ(tp_f32_to_f16(0x1p-149f), 0x0000);               /* FP32 subnormal */
    ASSERT_EQ(tp_f32_to_f16(-0.0f), 0x8000);
    ASSERT_EQ(tp_f32_to_f16(0x3ffp-24f + 0x1p-25f), 0x0400); /* last subnormal up to normal */
    ASSERT_EQ(tp_f32_to_f16(1.0f + 0x1p-11f), 0x3c00);       /* tie, to even */
    ASSERT_EQ(tp_f32_to_f16(1.0f + 0x3p-11f), 0x3c02);       /* tie, to even */
    ASSERT_TRUE((tp_f32_to_f16(NAN) & 0x7c00) == 0x7c00 && (tp_f32_to_f16(NAN) & 0x3ff));
    ASSERT_TRUE((tp_f32_to_f16(bits_f32(0xff800001u)) & 0xfc00) == 0xfc00 &&
                (tp_f32_to_f16(bits_f32(0xff800001u)) & 0x3ff)); /* payload in low bits only */
}

static void test_round_bf16(void)
{
    static double tab[0x7f80];
    uint64_t seed = 7;
    int bad = 0;

    for (int k = 0; k < 0x7f80; k++)
        tab[k] = (k >> 7) ? ldexp(128 + (k & 0x7f), (k >> 7) - 134) : ldexp(k, -133);
    ASSERT_TRUE(tab[0x3f80] == 1.0 && tab[1] == 0x1p-133);
    for (int k = 0; k < 0x7f80; k++) {
        double mid = (tab[k] + (k + 1 < 0x7f80 ? tab[k + 1] : 0x1p128)) / 2;
        float m;

        if (mid > FLT_MAX) { /* the midpoint past bf16's largest value is no float */
            bad += check_round(tp_f32_to_bf16, FLT_MAX, tab, 0x7f80, 0x1p128, 0x7f80, "bf16");
            continue;
        }
        m = (float)mid; /* exact: 9 significant bits */
        ASSERT_TRUE((double)m == mid);
        bad += check_round(tp_f32_to_bf16, m, tab, 0x7f80, 0x1p128, 0x7f80, "bf16");
        bad += check_round(tp_f32_to_bf16, -m, tab, 0x7f80, 0x1p128, 0x7f80, "bf16");
        bad += check_round(tp_f32_to_bf16, nextafterf(m, 0), tab, 0x7f80, 0x1p128, 0x7f80, "bf16");
        bad += check_round(tp_f32_to_bf16, nextafterf(m, INFINITY), tab, 0x7f80, 0x1p128, 0x7f80,
                           "bf16");
    }
    for (int i = 0; i < 1000000; i++) {
        float x = bits_f32(lcg(&seed));

        if (isfinite(x))
            bad += check_round(tp_f32_to_bf16, x, tab, 0x7f80, 0x1p128, 0x7f80, "bf16");
    }
    ASSERT_EQ(bad, 0);
    ASSERT_EQ(tp_f32_to_bf16(FLT_MAX), 0x7f80);
    ASSERT_EQ(tp_f32_to_bf16(-INFINITY), 0xff80);
    ASSERT_EQ(tp_f32_to_bf16(bits_f32(0x3f808000u)), 0x3f80); /* tie, to even */
    ASSERT_EQ(tp_f32_to_bf16(bits_f32(0x3f818000u)), 0x3f82); /* tie, to even */
    ASSERT_EQ(tp_f32_to_bf16(bits_f32(0x00008000u)), 0x0000); /* subnormal tie, to even zero */
    ASSERT_TRUE(isnan(tp_bf16_to_f32(tp_f32_to_bf16(bits_f32(0x7f800001u)))));
    ASSERT_TRUE(isnan(tp_bf16_to_f32(tp_f32_to_bf16(bits_f32(0xffffffffu)))));
    ASSERT_EQ(tp_f32_to_bf16(bits_f32(0xffffffffu)) & 0x8000, 0x8000);
}

/* The buffer conversions, in place both ways, as the coordinator uses them on a slot's rows. */
static void test_convert_in_place(void)
{
    enum tp_dtype types[2] = {TP_F16, TP_BF16};

    for (int t = 0; t < 2; t++) {
        float buf[37], want[37];
        unsigned char *b = (unsigned char *)buf;

        for (int i = 0; i < 37; i++)
            want[i] = buf[i] = (float)(i - 18) * 0.375f; /* exact in both types */
        tp_convert_from_f32(buf, buf, 37, types[t]);
        for (int i = 0; i < 37; i++) {
            uint16_t h = (uint16_t)(b[2 * i] | b[2 * i + 1] << 8);

            ASSERT_TRUE((types[t] == TP_F16 ? tp_f16_to_f32(h) : tp_bf16_to_f32(h)) == want[i]);
        }
        memmove(b + 2 * 37, b, 2 * 37); /* the narrow elements in the second half */
        tp_widen_in_place(buf, 37, types[t]);
        for (int i = 0; i < 37; i++)
            ASSERT_TRUE(buf[i] == want[i]);
    }
}

/* The buffer conversions (which may use vector instructions) give the scalar ones' bits on every
 * FP16/BF16 value, on every FP16 rounding midpoint and its neighbours, and on random floats, in
 * place and not, at lengths that are not multiples of the vector width: NaNs included, since
 * where an element falls (vector body or scalar tail) depends on the rows before it, and a row's
 * answer must not. */
static void test_buffers_match_scalar(void)
{
    enum { N = 65536 + 3 * 0x7c00 + 5 };
    static float f[N], g[N];
    static uint16_t h[N];
    uint64_t seed = 99;
    int bad = 0;
    size_t n = 0;

    for (uint32_t k = 0; k < 65536; k++)
        h[k] = (uint16_t)k;
    for (int t = 0; t < 2; t++) {
        enum tp_dtype dt = t ? TP_BF16 : TP_F16;

        tp_convert_to_f32(f, h, 65536, dt);
        for (uint32_t k = 0; k < 65536; k++) {
            float s = dt == TP_F16 ? tp_f16_to_f32((uint16_t)k) : tp_bf16_to_f32((uint16_t)k);

            bad += f32_bits(s) != f32_bits(f[k]);
        }
    }
    ASSERT_EQ(bad, 0);
    /* floats to narrow: every FP16 value, midpoints and neighbours, specials, random bits */
    for (uint32_t k = 0; k < 65536; k++)
        f[n++] = tp_f16_to_f32((uint16_t)k);
    for (int k = 0; k < 0x7c00; k++) {
        float a = tp_f16_to_f32((uint16_t)k),
              b = k + 1 < 0x7c00 ? tp_f16_to_f32((uint16_t)(k + 1)) : 65536.0f;
        float m = (float)(((double)a + (double)b) / 2);

        f[n++] = m;
        f[n++] = nextafterf(m, 0);
        f[n++] = -nextafterf(m, INFINITY);
    }
    f[n++] = INFINITY;
    f[n++] = bits_f32(0x7f800001u);
    f[n++] = bits_f32(0xffc00000u);
    f[n++] = FLT_MAX;
    f[n++] = 0x1p-149f;
    ASSERT_EQ(n, N);
    for (int t = 0; t < 2; t++) {
        enum tp_dtype dt = t ? TP_BF16 : TP_F16;
        uint16_t (*enc)(float) = t ? tp_f32_to_bf16 : tp_f32_to_f16;

        for (int pass = 0; pass < 2; pass++) {
            unsigned char *out = pass ? (unsigned char *)g : (unsigned char *)h;

            if (pass) {                          /* in place, on random floats */
                for (size_t i = 0; i < N; i++) { /* a quarter of them BF16 ties */
                    uint32_t u = lcg(&seed);

                    f[i] = bits_f32(i % 4 ? u : (u & 0xffff0000u) | 0x8000u);
                }
                memcpy(g, f, sizeof(g));
                tp_convert_from_f32(g, g, N - 1, dt); /* an odd length */
            } else {
                tp_convert_from_f32(h, f, N - 1, dt);
            }
            for (size_t i = 0; i < N - 1; i++) {
                uint16_t want = enc(f[i]), got = (uint16_t)(out[2 * i] | out[2 * i + 1] << 8);

                bad += got != want;
            }
        }
    }
    ASSERT_EQ(bad, 0);
    /* widening in place at an odd length, from the second half */
    for (int t = 0; t < 2; t++) {
        enum tp_dtype dt = t ? TP_BF16 : TP_F16;
        size_t m = 1001;

        for (size_t i = 0; i < m; i++)
            h[i] = (uint16_t)(lcg(&seed) & 0x7bff); /* finite in both types */
        memcpy((unsigned char *)g + 2 * m, h, 2 * m);
        tp_widen_in_place(g, m, dt);
        for (size_t i = 0; i < m; i++)
            bad += f32_bits(g[i]) !=
                   f32_bits(dt == TP_F16 ? tp_f16_to_f32(h[i]) : tp_bf16_to_f32(h[i]));
    }
    ASSERT_EQ(bad, 0);
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
    TEST_RUN(test_round_trip);
    TEST_RUN(test_round_f16);
    TEST_RUN(test_round_bf16);
    TEST_RUN(test_convert_in_place);
    TEST_RUN(test_buffers_match_scalar);
    TEST_RUN(test_shape_count);
    return 0;
}
