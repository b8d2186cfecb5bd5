/* test_ref.c -- the reference itself is checked against PyTorch: for each seed case its output,
 * rounded to float32, must equal NAME.y64.npy (x·Wᵀ+b accumulated in float64 by NumPy) to within
 * one float32 rounding, and ref_compare must flag a single wrong element. */
#include <stdlib.h>

#include "npy.h"
#include "ref.h"
#include "test.h"

static char path_buf[4096];

static const char *seed(const char *name)
{
    snprintf(path_buf, sizeof(path_buf), "%s/%s", getenv("TP_SEED_DIR"), name);
    return path_buf;
}

static void check_case(const char *st, const char *x_npy, const char *y64_npy)
{
    struct ref_layer l;
    struct npy_info xi, yi;
    struct ref_stats s;
    struct tp_err err = {0};
    float *x, *y;
    double *want, *mag;
    size_t n;

    ASSERT_EQ(ref_layer_load(&l, seed(st), "weight", NULL, &err), 0);
    ASSERT_EQ(npy_load_f32(seed(x_npy), &x, &xi, &err), 0);
    ASSERT_EQ(npy_load_f32(seed(y64_npy), &y, &yi, &err), 0);
    ASSERT_EQ(xi.shape[1], l.in);
    ASSERT_EQ(yi.shape[1], l.out);
    n = (size_t)(yi.shape[0] * yi.shape[1]);
    want = malloc(n * sizeof(double));
    mag = malloc(n * sizeof(double));
    ref_linear(&l, x, xi.shape[0], want, mag);
    ref_compare(y, want, mag, n, &s);
    fprintf(stderr, "%s: max rel %.3g, max abs %.3g\n", st, s.max_rel, s.max_abs);
    ASSERT_LE(s.max_rel * 1e9, 1e9 * 1e-7); /* y64 is the same sum rounded once to float32 */
    ASSERT_EQ(s.nonfinite, 0);
    /* one wrong element is found and located */
    y[n / 2] += 0.5f;
    ref_compare(y, want, mag, n, &s);
    ASSERT_GT(s.max_rel * 1e9, 1e9 * 1e-3);
    ASSERT_EQ(s.worst, (int64_t)(n / 2));
    free(want);
    free(mag);
    free(x);
    free(y);
    ref_layer_free(&l);
}

static void test_seed_cases(void)
{
    check_case("seed.safetensors", "seed.x.npy", "seed.y64.npy");
    check_case("mlp-up.safetensors", "mlp-up.x.npy", "mlp-up.y64.npy");
    check_case("nobias.safetensors", "nobias.x.npy", "nobias.y64.npy");
    check_case("seed.bf16.safetensors", "seed.x.npy", "seed.bf16.y64.npy");
    check_case("mlp-up.bf16.safetensors", "mlp-up.x.npy", "mlp-up.bf16.y64.npy");
    check_case("nobias.bf16.safetensors", "nobias.x.npy", "nobias.bf16.y64.npy");
}

static void test_explicit_bias_must_exist(void)
{
    struct ref_layer l;
    struct tp_err err = {0};

    ASSERT_EQ(ref_layer_load(&l, seed("nobias.safetensors"), "weight", "bias", &err), -1);
    ASSERT_STR_HAS(err.msg, "bias");
    ASSERT_EQ(ref_layer_load(&l, seed("nobias.safetensors"), "weight", NULL, &err), 0);
    ASSERT_TRUE(l.b == NULL);
    ref_layer_free(&l);
}

int main(void)
{
    TEST_RUN(test_seed_cases);
    TEST_RUN(test_explicit_bias_must_exist);
    return 0;
}
