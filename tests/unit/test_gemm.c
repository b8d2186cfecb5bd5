/* test_gemm.c -- unit tests of lib/gemm.c: every element of every call, bit for bit, against the
 * summation order that gemm.h promises, written here as the plain scalar loop (blocks of
 * GEMM_KC fmaf chains from zero, added to the bias in order). Shapes cover partial panels (n not a multiple of 16), k across the blocking
 * (255, 256, 257, 600), every tile height and its remainders (rows 1 to 20, 64, 70), strides
 * wider than the matrix, split panel ranges (threads), both kernels, and the property it exists
 * for: a row's bits do not change with the rows it is computed with, their number, or its place
 * among them; and a pool of threads changes none of them. */
#include <math.h>
#include <stdint.h>

#include "gemm.h"
#include "test.h"

static uint64_t rng = 0x9e3779b97f4a7c15ull;

static float rnd(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    /* values of mixed magnitude and sign, so that rounding differs between summation orders */
    return (float)((int64_t)(rng >> 11) % 2000001 - 1000000) * 1e-6f *
           (float)(1 << (rng >> 60 & 7));
}

static float *rnd_buf(size_t n)
{
    float *p = malloc(n * sizeof(float));

    ASSERT_TRUE(p);
    for (size_t i = 0; i < n; i++)
        p[i] = rnd();
    return p;
}

/* The promise of gemm.h, element by element. */
static float chain(const float *x, const float *w, uint32_t k, const float *b, uint32_t j)
{
    float c = b ? b[j] : 0.0f;

    for (uint32_t k0 = 0; k0 < k; k0 += GEMM_KC) {
        float s = 0.0f;

        for (uint32_t kk = k0; kk < k && kk < k0 + GEMM_KC; kk++)
            s = fmaf(x[kk], w[kk], s);
        c = c + s;
    }
    return c;
}

static uint32_t bits(float f)
{
    uint32_t u;

    memcpy(&u, &f, sizeof(u));
    return u;
}

/* Runs one call (panels split at `split`, as two threads would) and checks every element of y
 * against the chain, and that y's padding between ldy and n is untouched. */
static void check_call(const struct gemm_weights *g, const float *w, const float *x, size_t ldx,
                       uint32_t rows, const float *b, uint32_t split)
{
    size_t ldy = g->n + 3;
    float *y = malloc((size_t)rows * ldy * sizeof(float));

    ASSERT_TRUE(y);
    for (size_t i = 0; i < (size_t)rows * ldy; i++)
        y[i] = -7.0f;
    if (split > g->np)
        split = g->np;
    gemm_run(g, x, ldx, rows, b, y, ldy, 0, split);
    gemm_run(g, x, ldx, rows, b, y, ldy, split, g->np);
    for (uint32_t i = 0; i < rows; i++) {
        for (uint32_t j = 0; j < g->n; j++) {
            float want = chain(x + (size_t)i * ldx, w + (size_t)j * g->k, g->k, b, j);
            float got = y[(size_t)i * ldy + j];

            if (bits(got) != bits(want))
                TEST_FAIL_("n %u k %u rows %u: y[%u][%u] = %.9g (0x%08x), the chain gives %.9g "
                           "(0x%08x)",
                           g->n, g->k, rows, i, j, got, bits(got), want, bits(want));
        }
        for (size_t j = g->n; j < ldy; j++)
            ASSERT_EQ(bits(y[(size_t)i * ldy + j]), bits(-7.0f));
    }
    free(y);
}

static void check_shapes(void)
{
    static const uint32_t ns[] = {1, 15, 16, 17, 21, 40, 100};
    static const uint32_t ks[] = {1, 7, 255, 256, 257, 600};
    static const uint32_t rowss[] = {1, 2, 3, 5, 6, 7, 11, 12, 13, 20, 64, 70};

    for (size_t a = 0; a < sizeof(ns) / sizeof(ns[0]); a++) {
        for (size_t c = 0; c < sizeof(ks) / sizeof(ks[0]); c++) {
            uint32_t n = ns[a], k = ks[c];
            size_t ldx = k + 5;
            float *w = rnd_buf((size_t)n * k), *b = rnd_buf(n), *x = rnd_buf(70 * ldx);
            struct gemm_weights g;
            struct tp_err err = {0};

            ASSERT_EQ(gemm_pack(&g, w, n, k, k, &err), 0);
            ASSERT_EQ(g.np, (n + GEMM_NR - 1) / GEMM_NR);
            for (size_t r = 0; r < sizeof(rowss) / sizeof(rowss[0]); r++) {
                check_call(&g, w, x, ldx, rowss[r], b, g.np / 2);
                check_call(&g, w, x, ldx, rowss[r], NULL, 1);
            }
            gemm_free(&g);
            free(w);
            free(b);
            free(x);
        }
    }
}

static void test_generic(void)
{
    ASSERT_EQ(gemm_set_kernel("generic"), 0);
    ASSERT_STR_EQ(gemm_kernel_name(), "generic");
    check_shapes();
}

static void test_avx2(void)
{
    if (gemm_set_kernel("avx2") < 0) {
        fprintf(stderr, "this CPU has no AVX2 and FMA: the generic kernel was tested alone\n");
        return;
    }
    ASSERT_STR_EQ(gemm_kernel_name(), "avx2");
    check_shapes();
}

/* The property itself, on a layer of the size tpd serves: row r computed alone, at every place of
 * a 64-row call, and in calls of every size from 1 to 64, is the same bits each time. */
static void test_batch_invariant(void)
{
    const uint32_t n = 300, k = 1000, max = 64;
    float *w = rnd_buf((size_t)n * k), *b = rnd_buf(n), *x = rnd_buf((size_t)max * k);
    float *alone = malloc((size_t)max * n * 4), *y = malloc((size_t)2 * max * k * 4);
    float *xs = malloc((size_t)2 * max * k * 4), *other = rnd_buf((size_t)max * k);
    struct gemm_weights g;
    struct tp_err err = {0};

    ASSERT_TRUE(alone && y && xs);
    ASSERT_EQ(gemm_pack(&g, w, n, k, k, &err), 0);
    for (uint32_t r = 0; r < max; r++)
        gemm_run(&g, x + (size_t)r * k, k, 1, b, alone + (size_t)r * n, n, 0, g.np);
    for (uint32_t m = 1; m <= max; m++) {
        /* rows [0, m) of x placed after m - 1 rows of another request */
        uint32_t off = m - 1;

        memcpy(xs, other, (size_t)off * k * 4);
        memcpy(xs + (size_t)off * k, x, (size_t)m * k * 4);
        gemm_run(&g, xs, k, off + m, b, y, n, 0, g.np);
        for (uint32_t r = 0; r < m; r++)
            if (memcmp(y + (size_t)(off + r) * n, alone + (size_t)r * n, (size_t)n * 4) != 0)
                TEST_FAIL_("row %u at place %u of a %u-row call differs from the row alone", r,
                           off + r, off + m);
    }
    gemm_free(&g);
    free(w);
    free(b);
    free(x);
    free(alone);
    free(y);
    free(xs);
    free(other);
}

/* A pool of 1, 2, 3 or 7 threads (more threads than some layers have panels) gives the bits of
 * one gemm_run, call after call. */
static void test_pool(void)
{
    static const uint32_t ns[] = {5, 40, 300};
    const uint32_t k = 1500, rows = 13; /* 300 columns: above the pool's one-thread size */

    for (size_t a = 0; a < sizeof(ns) / sizeof(ns[0]); a++) {
        uint32_t n = ns[a];
        float *w = rnd_buf((size_t)n * k), *b = rnd_buf(n), *x = rnd_buf((size_t)rows * k);
        float *want = malloc((size_t)rows * n * 4), *got = malloc((size_t)rows * n * 4);
        struct gemm_weights g;
        struct tp_err err = {0};

        ASSERT_TRUE(want && got);
        ASSERT_EQ(gemm_pack(&g, w, n, k, k, &err), 0);
        gemm_run(&g, x, k, rows, b, want, n, 0, g.np);
        for (int t = 1; t <= 7; t += t < 3 ? 1 : 4) {
            struct gemm_pool *p;

            ASSERT_EQ(gemm_pool_create(&p, t, &err), 0);
            for (int call = 0; call < 3; call++) {
                memset(got, 0, (size_t)rows * n * 4);
                gemm_pool_run(p, &g, x, k, rows - (uint32_t)call, b, got, n);
                ASSERT_EQ(memcmp(got, want, (size_t)(rows - (uint32_t)call) * n * 4), 0);
            }
            gemm_pool_destroy(p);
        }
        gemm_free(&g);
        free(w);
        free(b);
        free(x);
        free(want);
        free(got);
    }
    gemm_pool_destroy(NULL);
}

/* packing in chunks of rows, of any size and alignment, gives the panels of one gemm_pack */
static void test_pack_in_chunks(void)
{
    struct tp_err err = {0};
    static const uint32_t ns[] = {1, 15, 16, 17, 37, 64};
    static const uint32_t chunks[] = {1, 5, 16, 23, 64};

    for (size_t i = 0; i < sizeof(ns) / sizeof(ns[0]); i++)
        for (size_t c = 0; c < sizeof(chunks) / sizeof(chunks[0]); c++) {
            uint32_t n = ns[i], k = 19;
            float *w = malloc((size_t)n * k * sizeof(float));
            struct gemm_weights whole, parts;

            for (size_t e = 0; e < (size_t)n * k; e++)
                w[e] = (float)e * 0.5f - 3.0f;
            ASSERT_EQ(gemm_pack(&whole, w, n, k, k, &err), 0);
            ASSERT_EQ(gemm_pack_init(&parts, n, k, &err), 0);
            for (uint32_t j0 = 0; j0 < n; j0 += chunks[c])
                gemm_pack_rows(&parts, w + (size_t)j0 * k, j0,
                               n - j0 < chunks[c] ? n - j0 : chunks[c], k);
            ASSERT_EQ(parts.np, whole.np);
            ASSERT_EQ(memcmp(parts.panels, whole.panels,
                             (size_t)whole.np * GEMM_NR * k * sizeof(float)),
                      0);
            gemm_free(&whole);
            gemm_free(&parts);
            free(w);
        }
}

static void test_errors(void)
{
    struct gemm_weights g;
    struct tp_err err = {0};
    float w[4] = {0};

    ASSERT_EQ(gemm_pack(&g, w, 0, 4, 4, &err), -1);
    ASSERT_EQ(err.code, TP_EINVAL);
    ASSERT_TRUE(g.panels == NULL);
    ASSERT_EQ(gemm_pack(&g, w, 1, 4, 3, &err), -1);
    ASSERT_EQ(gemm_pack(&g, w, UINT32_MAX, UINT32_MAX, UINT32_MAX, &err), -1);
    ASSERT_TRUE(err.code == TP_EINVAL || err.code == TP_ENOMEM);
    ASSERT_EQ(gemm_set_kernel("sse9"), -1);
    gemm_free(&g); /* an empty one */
}

int main(void)
{
    TEST_RUN(test_generic);
    TEST_RUN(test_avx2);
    TEST_RUN(test_batch_invariant);
    TEST_RUN(test_pool);
    TEST_RUN(test_pack_in_chunks);
    TEST_RUN(test_errors);
    return 0;
}
