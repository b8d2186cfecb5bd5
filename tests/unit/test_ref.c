/* test_ref.c -- the reference itself is checked against PyTorch: for each seed case its output,
 * rounded to float32, must equal NAME.y64.npy (x·Wᵀ+b accumulated in float64 by NumPy) to within
 * one float32 rounding, and ref_compare must flag a single wrong element. Its MLP blocks must
 * equal the block cases of tests/data/hf (the PyTorch modules in float64) to within the one
 * float32 rounding of the stored y64, and another activation must not. */
#include <math.h>
#include <stdlib.h>

#include "npy.h"
#include "plan.h"
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

/* One whole layer of a plan, read by tpd's rules. */
static void read_layer(const struct plan_linear *pl, struct ref_layer *l)
{
    struct tp_err err = {0};

    *l = (struct ref_layer){.out = pl->out, .in = pl->in};
    l->w = malloc((size_t)(pl->out * pl->in) * sizeof(float));
    l->b = pl->has_bias ? malloc((size_t)pl->out * sizeof(float)) : NULL;
    ASSERT_EQ(plan_read(pl, 0, pl->out, 0, pl->in, l->w, l->b, NULL, NULL, &err), 0);
}

/* max |ref_block(x) - y64| / max |y64| for a block case, with the activation act */
static double block_error(const char *ckpt, const char *module, const char *x_npy,
                          const char *y64_npy, enum ref_act act)
{
    char path[3][4096];
    struct plan p;
    struct ref_block b = {.act = act};
    struct npy_info xi;
    struct tp_err err = {0};
    float *x, *y64;
    double *want, *mag, worst = 0, top = 0;
    int64_t rows, hidden;

    snprintf(path[0], sizeof(path[0]), "%s/%s", getenv("TP_HF_DIR"), ckpt);
    snprintf(path[1], sizeof(path[1]), "%s/cases/%s", getenv("TP_HF_DIR"), x_npy);
    snprintf(path[2], sizeof(path[2]), "%s/cases/%s", getenv("TP_HF_DIR"), y64_npy);
    ASSERT_EQ(plan_build(&p, &(struct plan_request){.weights = path[0], .block = module}, NULL, 0,
                         &err),
              0);
    b.gated = p.kind == PLAN_GATED;
    if (b.gated)
        read_layer(&p.lin[0], &b.gate);
    read_layer(&p.lin[b.gated ? 1 : 0], &b.up);
    read_layer(&p.lin[p.nlin - 1], &b.down);
    ASSERT_EQ(npy_load_f32(path[1], &x, &xi, &err), 0);
    hidden = p.in;
    rows = (int64_t)(xi.count / (uint64_t)hidden);
    want = malloc((size_t)(rows * hidden) * sizeof(double));
    mag = malloc((size_t)(rows * hidden) * sizeof(double));
    ref_block(&b, x, rows, want, mag);
    ASSERT_EQ(npy_load_f32(path[2], &y64, &xi, &err), 0); /* y64 rounded once to float32 */
    ASSERT_EQ((int64_t)xi.count, rows * hidden);
    for (int64_t i = 0; i < rows * hidden; i++) {
        worst = fmax(worst, fabs(want[i] - (double)y64[i]));
        top = fmax(top, fabs((double)y64[i]));
        ASSERT_TRUE(mag[i] >= fabs(want[i]) * 0.999); /* the scale bounds the value itself */
    }
    free(x), free(y64), free(want), free(mag);
    ref_block_free(&b);
    return worst / top;
}

static void test_blocks_against_pytorch(void)
{
    static const struct {
        const char *ckpt, *module, *name;
        enum ref_act act, other;
    } cases[] = {
        {"llama-sharded-bf16", "model.layers.0.mlp", "llama.layers.0.mlp", REF_SILU, REF_GELU},
        {"llama-sharded-bf16", "model.layers.0.mlp", "llama.layers.0.mlp.3d", REF_SILU, REF_RELU},
        {"gpt2-tied-fp32", "transformer.h.0.mlp", "gpt2.h.0.mlp", REF_GELU_TANH, REF_GELU},
        {"qwen2-bias-fp16", "model.layers.0.mlp", "qwen2.layers.0.mlp", REF_SILU, REF_GELU_TANH},
    };

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char x[256], y[256];
        double e, other;

        snprintf(x, sizeof(x), "%s.x.npy", cases[i].name);
        snprintf(y, sizeof(y), "%s.y64.npy", cases[i].name);
        e = block_error(cases[i].ckpt, cases[i].module, x, y, cases[i].act);
        other = block_error(cases[i].ckpt, cases[i].module, x, y, cases[i].other);
        fprintf(stderr, "%s: rel %.3g vs y64; %.3g with another activation\n", cases[i].name, e,
                other);
        ASSERT_LE(e * 1e9, 1e9 * 1e-7); /* y64 is the same block in float64, rounded once */
        ASSERT_GT(other * 1e9, 1e9 * 1e-5); /* gelu and gelu_tanh differ by 2e-5 here */
    }
}

int main(void)
{
    TEST_RUN(test_seed_cases);
    TEST_RUN(test_blocks_against_pytorch);
    TEST_RUN(test_explicit_bias_must_exist);
    return 0;
}
