/* test_plan.c -- the layer's plan (lib/plan.c, lib/checkpoint.c) and a rank's shard
 * (worker/shard.c): the uneven split, finding tensors in the Hugging Face checkpoints of
 * tests/data/hf (sharded, a bias in another shard, GPT-2's Conv1D, a tied lm_head), the layouts
 * that are refused because they cannot be known, reading a rank's rows against the whole tensor
 * read independently (and packed for the invariant GEMM as it is read), and weights that changed
 * after the plan was made. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "plan.h"
#include "safetensors.h"
#include "shard.h"
#include "test.h"

static char tmpdir[256];

static const char *hf(const char *rel)
{
    static char buf[4][4096];
    static int i;

    i = (i + 1) % 4;
    snprintf(buf[i], sizeof(buf[i]), "%s/%s", getenv("TP_HF_DIR"), rel);
    return buf[i];
}

static const char *tmp(const char *rel)
{
    static char buf[4][4096];
    static int i;

    i = (i + 1) % 4;
    snprintf(buf[i], sizeof(buf[i]), "%s/%s", tmpdir, rel);
    return buf[i];
}

static void write_file(const char *path, const void *data, size_t n)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);

    ASSERT_TRUE(fd >= 0);
    ASSERT_EQ((long)write(fd, data, n), (long)n);
    close(fd);
}

static void copy_file(const char *from, const char *to)
{
    int fd = open(from, O_RDONLY | O_CLOEXEC);
    struct stat st;
    char *buf;

    ASSERT_TRUE(fd >= 0 && fstat(fd, &st) == 0);
    buf = malloc((size_t)st.st_size);
    ASSERT_EQ((long)read(fd, buf, (size_t)st.st_size), (long)st.st_size);
    close(fd);
    write_file(to, buf, (size_t)st.st_size);
    free(buf);
}

static int build(struct plan *p, const char *weights, const char *weight, const char *bias,
                 enum plan_layout layout, struct tp_err *err)
{
    *err = (struct tp_err){0};
    return plan_build(p,
                      &(struct plan_request){
                          .weights = weights, .weight = weight, .bias = bias, .layout = layout},
                      NULL, 0, err);
}

static int build_req(struct plan *p, const struct plan_request *req, struct tp_err *err)
{
    *err = (struct tp_err){0};
    return plan_build(p, req, NULL, 0, err);
}

static void test_split(void)
{
    static const int64_t outs[] = {1, 2, 3, 5, 7, 12, 13, 60, 750, 1003};
    struct tp_err err = {0};

    for (size_t i = 0; i < sizeof(outs) / sizeof(outs[0]); i++)
        for (int n = 1; n <= 6; n++) {
            int64_t next = 0, row0 = -1, rows = -1;

            if (outs[i] < n) {
                ASSERT_EQ(plan_split(outs[i], n, 0, &row0, &rows, &err), -1);
                ASSERT_STR_HAS(err.msg, "fewer than");
                continue;
            }
            for (int r = 0; r < n; r++) {
                ASSERT_EQ(plan_split(outs[i], n, r, &row0, &rows, &err), 0);
                ASSERT_EQ(row0, next);
                /* as even as possible, the first out mod n ranks one row more */
                ASSERT_EQ(rows, outs[i] / n + (r < outs[i] % n));
                next = row0 + rows;
            }
            ASSERT_EQ(next, outs[i]);
        }
    ASSERT_EQ(plan_split(12, 2, 2, &(int64_t){0}, &(int64_t){0}, &err), -1);
    ASSERT_EQ(plan_split(12, 0, 0, &(int64_t){0}, &(int64_t){0}, &err), -1);
    {
        char text[64];

        plan_split_text(1003, 4, text, sizeof(text));
        ASSERT_STR_EQ(text, "251,251,251,250");
    }
}

/* a sharded checkpoint by directory, index and module name; a bias found in another shard */
static void test_find(void)
{
    struct plan p;
    struct tp_err err;

    ASSERT_EQ(build(&p, hf("llama-sharded-bf16"), "model.layers.0.self_attn.q_proj", NULL,
                    PLAN_LAYOUT_AUTO, &err),
              0);
    ASSERT_STR_EQ(p.lin[0].w.name, "model.layers.0.self_attn.q_proj.weight");
    ASSERT_STR_HAS(p.lin[0].w.path, "model-00001-of-00004.safetensors");
    ASSERT_EQ(p.in, 160);
    ASSERT_EQ(p.out, 160);
    ASSERT_EQ(p.lin[0].layout, PLAN_LINEAR);
    ASSERT_EQ(p.lin[0].has_bias, 0);
    ASSERT_EQ(p.lin[0].w.dtype, TP_BF16);
    ASSERT_EQ(plan_validate(&p, &err), 0);

    ASSERT_EQ(build(&p, hf("llama-sharded-bf16/model.safetensors.index.json"),
                    "model.layers.1.mlp.down_proj.weight", NULL, PLAN_LAYOUT_AUTO, &err),
              0);
    ASSERT_STR_HAS(p.lin[0].w.path, "model-00003-of-00004.safetensors");
    ASSERT_EQ(p.in, 432);
    ASSERT_EQ(p.out, 160);

    ASSERT_EQ(build(&p, hf("qwen2-bias-fp16"), "model.layers.0.self_attn.q_proj", NULL,
                    PLAN_LAYOUT_AUTO, &err),
              0);
    ASSERT_EQ(p.lin[0].has_bias, 1);
    ASSERT_STR_EQ(p.lin[0].b.name, "model.layers.0.self_attn.q_proj.bias");
    ASSERT_STR_HAS(p.lin[0].w.path, "model-00002-of-00002.safetensors");
    ASSERT_STR_HAS(p.lin[0].b.path, "model-00001-of-00002.safetensors");
    ASSERT_EQ(plan_validate(&p, &err), 0);

    ASSERT_EQ(build(&p, hf("qwen2-bias-fp16"), "model.layers.0.self_attn.q_proj", "nosuch.bias",
                    PLAN_LAYOUT_AUTO, &err),
              -1);
    ASSERT_STR_HAS(err.msg, "nosuch.bias");
    ASSERT_EQ(build(&p, hf("qwen2-bias-fp16"), "model.layers.0.self_attn.q_proj",
                    "model.layers.0.self_attn.v_proj.bias", PLAN_LAYOUT_AUTO, &err),
              -1);
    ASSERT_STR_HAS(err.msg, "expected [128]");
    ASSERT_EQ(build(&p, hf("qwen2-bias-fp16"), "model.layers.9.mlp", NULL, PLAN_LAYOUT_AUTO, &err),
              -1);
    ASSERT_EQ(err.code, TP_ENOTFOUND);
    ASSERT_STR_HAS(err.msg, "model.layers.9.mlp.weight");
    ASSERT_EQ(build(&p, hf("qwen2-bias-fp16"), "model.norm.weight", NULL, PLAN_LAYOUT_AUTO, &err),
              -1);
    ASSERT_STR_HAS(err.msg, "1 dims");
    ASSERT_EQ(build(&p, hf("cases"), "weight", NULL, PLAN_LAYOUT_AUTO, &err), -1);
    ASSERT_STR_HAS(err.msg, "no model.safetensors");
}

/* GPT-2: Conv1D from config.json, the tied lm_head; and what is refused without config.json */
static void test_gpt2(void)
{
    struct plan p;
    struct tp_err err;
    char path[4096];

    ASSERT_EQ(build(&p, hf("gpt2-tied-fp32"), "transformer.h.0.attn.c_attn", NULL,
                    PLAN_LAYOUT_AUTO, &err),
              0);
    ASSERT_EQ(p.lin[0].layout, PLAN_CONV1D);
    ASSERT_EQ(p.in, 120);
    ASSERT_EQ(p.out, 360);
    ASSERT_STR_EQ(p.lin[0].b.name, "transformer.h.0.attn.c_attn.bias");
    ASSERT_EQ(build(&p, hf("gpt2-tied-fp32"), "transformer.h.0.attn.c_proj", NULL,
                    PLAN_LAYOUT_AUTO, &err),
              0);
    ASSERT_EQ(p.lin[0].layout, PLAN_CONV1D);
    ASSERT_EQ(build(&p, hf("gpt2-tied-fp32"), "lm_head", NULL, PLAN_LAYOUT_AUTO, &err), 0);
    ASSERT_STR_EQ(p.lin[0].w.name, "transformer.wte.weight");
    ASSERT_STR_EQ(p.lin[0].tied_from, "lm_head.weight");
    ASSERT_EQ(p.lin[0].layout, PLAN_LINEAR);
    ASSERT_EQ(p.out, 1003);
    ASSERT_EQ(p.lin[0].has_bias, 0);
    ASSERT_EQ(build(&p, hf("gpt2-tied-fp32"), "transformer.h.0.ln_1.weight", NULL,
                    PLAN_LAYOUT_AUTO, &err),
              -1);

    /* the same file without its config.json: a square Conv1D cannot be told from nn.Linear */
    snprintf(path, sizeof(path), "%s", tmp("model.safetensors"));
    copy_file(hf("gpt2-tied-fp32/model.safetensors"), path);
    ASSERT_EQ(build(&p, path, "transformer.h.0.attn.c_proj", NULL, PLAN_LAYOUT_AUTO, &err), -1);
    ASSERT_STR_HAS(err.msg, "--layout");
    ASSERT_EQ(build(&p, path, "transformer.h.0.attn.c_proj", NULL, PLAN_CONV1D, &err), 0);
    ASSERT_EQ(p.lin[0].layout, PLAN_CONV1D);
    ASSERT_EQ(build(&p, path, "lm_head", NULL, PLAN_LAYOUT_AUTO, &err), -1);
    ASSERT_STR_HAS(err.msg, "no config.json");
    write_file(tmp("config.json"), "{\"model_type\": \"gpt2\", \"tie_word_embeddings\": false}", 52);
    ASSERT_EQ(build(&p, tmpdir, "lm_head", NULL, PLAN_LAYOUT_AUTO, &err), -1);
    ASSERT_STR_HAS(err.msg, "tie_word_embeddings false");
    write_file(tmp("config.json"), "{\"model_type\": \"gpt2\",", 22);
    ASSERT_EQ(build(&p, tmpdir, "lm_head", NULL, PLAN_LAYOUT_AUTO, &err), -1);
    ASSERT_STR_HAS(err.msg, "not valid JSON");
    unlink(tmp("config.json"));
}

static void test_refused_indexes(void)
{
    static const char outside[] = "{\"weight_map\": {\"weight\": \"../x.safetensors\"}}";
    static const char missing[] = "{\"weight_map\": {\"weight\": \"model.safetensors\", "
                                  "\"other\": \"model.safetensors\"}}";
    struct plan p;
    struct tp_err err;

    write_file(tmp("model.safetensors.index.json"), outside, sizeof(outside) - 1);
    ASSERT_EQ(build(&p, tmp("model.safetensors.index.json"), "weight", NULL, PLAN_LAYOUT_AUTO,
                    &err),
              -1);
    ASSERT_STR_HAS(err.msg, "not the name of a file beside the index");
    /* a directory with both files is ambiguous */
    ASSERT_EQ(build(&p, tmpdir, "weight", NULL, PLAN_LAYOUT_AUTO, &err), -1);
    ASSERT_STR_HAS(err.msg, "holds both");
    /* the index names a tensor its shard does not hold */
    write_file(tmp("model.safetensors.index.json"), missing, sizeof(missing) - 1);
    ASSERT_EQ(build(&p, tmp("model.safetensors.index.json"), "other", NULL, PLAN_LAYOUT_AUTO,
                    &err),
              -1);
    ASSERT_STR_HAS(err.msg, "which has no such tensor");
    unlink(tmp("model.safetensors.index.json"));
}

/* W [out, in] of a layer, whole, read independently of plan.c (as stored, then transposed for
 * Conv1D), and its bias. */
struct whole {
    float *w, *b;
    int64_t out, in;
};

static void read_whole(const struct plan_linear *l, struct whole *wh)
{
    struct st_file f = {.fd = -1};
    const struct st_tensor *t;
    struct tp_err err = {0};
    float *st;
    int conv1d = l->layout == PLAN_CONV1D;

    ASSERT_EQ(st_open(&f, l->w.path, &err), 0);
    t = st_find(&f, l->w.name);
    ASSERT_TRUE(t != NULL);
    wh->out = conv1d ? t->shape[1] : t->shape[0];
    wh->in = conv1d ? t->shape[0] : t->shape[1];
    st = malloc((size_t)(wh->out * wh->in) * sizeof(float));
    wh->w = malloc((size_t)(wh->out * wh->in) * sizeof(float));
    ASSERT_EQ(st_read_rows_f32(&f, t, 0, t->shape[0], st, NULL, &err), 0);
    for (int64_t j = 0; j < wh->out; j++)
        for (int64_t k = 0; k < wh->in; k++)
            wh->w[j * wh->in + k] = conv1d ? st[k * wh->out + j] : st[j * wh->in + k];
    free(st);
    st_close(&f);
    wh->b = NULL;
    if (l->has_bias) {
        ASSERT_EQ(st_open(&f, l->b.path, &err), 0);
        wh->b = malloc((size_t)wh->out * sizeof(float));
        ASSERT_EQ(st_read_rows_f32(&f, st_find(&f, l->b.name), 0, wh->out, wh->b, NULL, &err), 0);
        st_close(&f);
    }
}

/* Rows [r0, r0 + rows) x columns [c0, c0 + cols) of wh are rows [d0, ...) of g (k = cols). */
static void check_piece(const struct shard_gemm *g, int64_t d0, const struct whole *wh,
                        int64_t r0, int64_t rows, int64_t c0, int64_t cols, const char *what)
{
    ASSERT_EQ((int64_t)g->k, cols);
    for (int64_t j = 0; j < rows; j++)
        for (int64_t k = 0; k < cols; k++) {
            float got = g->w[(d0 + j) * cols + k], want = wh->w[(r0 + j) * wh->in + c0 + k];

            if (got != want)
                TEST_FAIL_("%s: w[%lld][%lld] = %g, want W[%lld][%lld] = %g", what,
                           (long long)(d0 + j), (long long)k, got, (long long)(r0 + j),
                           (long long)(c0 + k), want);
        }
}

/* Every rank's GEMMs, at N = 1 to 4, hold exactly its pieces of the whole layers (shard.h), in
 * both layouts, read by byte range (only a piece's bytes), the biases where they belong; and
 * read and packed in chunks they give the same panels as packing the row-major shard. */
static void check_shards(const struct plan *p)
{
    struct whole wh[PLAN_MAX_LINEAR];
    const char *what;
    int64_t split = plan_split_size(p, &what);
    struct tp_err err = {0};

    for (uint32_t j = 0; j < p->nlin; j++)
        read_whole(&p->lin[j], &wh[j]);
    for (int n = 1; n <= 4; n++)
        for (int r = 0; r < n; r++) {
            struct shard s, sp;
            int64_t f, c;
            uint64_t want_bytes = 0;
            char name[64];

            snprintf(name, sizeof(name), "%s n=%d r=%d", plan_kind_name(p->kind), n, r);
            ASSERT_EQ(plan_split(split, n, r, &f, &c, &err), 0);
            ASSERT_EQ(shard_load(&s, p, r, n, &err), 0);
            ASSERT_EQ(s.first, f);
            ASSERT_EQ(s.count, c);
            if (p->kind == PLAN_COLUMN) {
                check_piece(&s.g[0], 0, &wh[0], f, c, 0, p->in, name);
                if (p->lin[0].has_bias)
                    ASSERT_EQ(memcmp(s.g[0].b, wh[0].b + f, (size_t)c * sizeof(float)), 0);
                ASSERT_TRUE(s.rbias == NULL);
                want_bytes = (uint64_t)(c * p->in);
            } else if (p->kind == PLAN_ROW) {
                check_piece(&s.g[0], 0, &wh[0], 0, p->out, f, c, name);
                ASSERT_TRUE(s.g[0].b == NULL);
                want_bytes = (uint64_t)(c * p->out);
            } else {
                for (uint32_t j = 0; j + 1 < p->nlin; j++) {
                    check_piece(&s.g[0], (int64_t)j * c, &wh[j], f, c, 0, p->in, name);
                    if (p->lin[j].has_bias)
                        ASSERT_EQ(memcmp(s.g[0].b + j * c, wh[j].b + f, (size_t)c * 4), 0);
                }
                ASSERT_EQ((int64_t)s.g[0].n, c * (p->nlin - 1));
                check_piece(&s.g[1], 0, &wh[p->nlin - 1], 0, p->out, f, c, name);
                ASSERT_TRUE(s.g[1].b == NULL);
                want_bytes = (uint64_t)(c * p->in * (p->nlin - 1) + c * p->out);
            }
            if (p->kind != PLAN_COLUMN && p->lin[p->nlin - 1].has_bias)
                ASSERT_EQ(memcmp(s.rbias, wh[p->nlin - 1].b, (size_t)p->out * 4), 0);
            ASSERT_EQ(s.w_bytes, want_bytes * tp_dtype_size((enum tp_dtype)p->lin[0].w.dtype));
            ASSERT_EQ(shard_load_packed(&sp, p, r, n, 1 + (r + n) % 3, &err), 0);
            ASSERT_EQ(sp.w_bytes, s.w_bytes);
            ASSERT_EQ(sp.b_bytes, s.b_bytes);
            for (int i = 0; i < s.ngemm; i++) {
                struct gemm_weights whole;

                ASSERT_TRUE(sp.g[i].w == NULL);
                ASSERT_EQ(gemm_pack(&whole, s.g[i].w, s.g[i].n, s.g[i].k, s.g[i].k, &err), 0);
                ASSERT_EQ(sp.g[i].packed.np, whole.np);
                ASSERT_EQ(memcmp(sp.g[i].packed.panels, whole.panels,
                                 (size_t)whole.np * GEMM_NR * whole.k * sizeof(float)),
                          0);
                ASSERT_EQ(!sp.g[i].b, !s.g[i].b);
                if (s.g[i].b)
                    ASSERT_EQ(memcmp(sp.g[i].b, s.g[i].b, s.g[i].n * sizeof(float)), 0);
                gemm_free(&whole);
            }
            if (s.rbias)
                ASSERT_EQ(memcmp(sp.rbias, s.rbias, (size_t)p->out * sizeof(float)), 0);
            shard_free(&sp);
            shard_free(&s);
        }
    for (uint32_t j = 0; j < p->nlin; j++)
        free(wh[j].w), free(wh[j].b);
}

static void check_layer(const char *weights, const char *weight, int row, int conv1d)
{
    struct plan p;
    struct tp_err err;

    ASSERT_EQ(build_req(&p, &(struct plan_request){.weights = weights, .weight = weight, .row = row},
                        &err),
              0);
    ASSERT_EQ(p.kind, row ? PLAN_ROW : PLAN_COLUMN);
    ASSERT_EQ(p.lin[0].layout, conv1d ? PLAN_CONV1D : PLAN_LINEAR);
    ASSERT_EQ(plan_validate(&p, &err), 0);
    check_shards(&p);
}

static void test_shards(void)
{
    check_layer(hf("gpt2-tied-fp32"), "transformer.h.0.attn.c_attn", 0, 1);
    check_layer(hf("gpt2-tied-fp32"), "transformer.h.1.mlp.c_proj", 0, 1);
    check_layer(hf("gpt2-tied-fp32"), "transformer.h.1.mlp.c_proj", 1, 1);
    check_layer(hf("gpt2-tied-fp32"), "lm_head", 0, 0);
    check_layer(hf("llama-sharded-bf16"), "lm_head", 0, 0);
    check_layer(hf("llama-sharded-bf16"), "model.layers.1.mlp.down_proj", 1, 0);
    check_layer(hf("qwen2-bias-fp16"), "model.layers.0.self_attn.v_proj", 0, 0);
    check_layer(hf("qwen2-bias-fp16"), "model.layers.0.self_attn.q_proj", 1, 0);
}

/* Blocks: the members found by name, the activation from config.json, the layers chained; and
 * what is refused. */
static void test_blocks(void)
{
    struct plan p;
    struct tp_err err;
    char path[4096];

    ASSERT_EQ(build_req(&p,
                        &(struct plan_request){.weights = hf("llama-sharded-bf16"),
                                               .block = "model.layers.0.mlp"},
                        &err),
              0);
    ASSERT_EQ(p.kind, PLAN_GATED);
    ASSERT_EQ(p.nlin, 3);
    ASSERT_EQ(p.act, PLAN_ACT_SILU);
    ASSERT_STR_HAS(p.act_why, "hidden_act silu");
    ASSERT_EQ(p.in, 160);
    ASSERT_EQ(p.out, 160);
    ASSERT_EQ(p.inter, 432);
    ASSERT_STR_EQ(p.lin[0].w.name, "model.layers.0.mlp.gate_proj.weight");
    ASSERT_STR_EQ(p.lin[1].w.name, "model.layers.0.mlp.up_proj.weight");
    ASSERT_STR_EQ(p.lin[2].w.name, "model.layers.0.mlp.down_proj.weight");
    ASSERT_STR_HAS(p.lin[0].w.path, "model-00001-of-00004");
    ASSERT_STR_HAS(p.lin[1].w.path, "model-00002-of-00004");
    ASSERT_EQ(p.lin[2].split, PLAN_SPLIT_IN);
    ASSERT_EQ(plan_validate(&p, &err), 0);
    check_shards(&p);

    ASSERT_EQ(build_req(&p,
                        &(struct plan_request){.weights = hf("gpt2-tied-fp32"),
                                               .block = "transformer.h.0.mlp"},
                        &err),
              0);
    ASSERT_EQ(p.kind, PLAN_MLP);
    ASSERT_EQ(p.act, PLAN_ACT_GELU_TANH);
    ASSERT_EQ(p.inter, 480);
    ASSERT_EQ(p.lin[0].layout, PLAN_CONV1D);
    ASSERT_EQ(p.lin[1].layout, PLAN_CONV1D);
    ASSERT_EQ(p.lin[0].has_bias, 1);
    ASSERT_EQ(p.lin[1].has_bias, 1);
    ASSERT_EQ(plan_validate(&p, &err), 0);
    check_shards(&p);

    ASSERT_EQ(build_req(&p,
                        &(struct plan_request){.weights = hf("qwen2-bias-fp16"),
                                               .block = "model.layers.0.mlp",
                                               .act = PLAN_ACT_RELU},
                        &err),
              0);
    ASSERT_EQ(p.act, PLAN_ACT_RELU);
    ASSERT_STR_EQ(p.act_why, "given with --act");
    check_shards(&p);

    /* refused: no such block, a block of the wrong module, flags that belong to one layer */
    ASSERT_EQ(build_req(&p,
                        &(struct plan_request){.weights = hf("qwen2-bias-fp16"),
                                               .block = "model.layers.0.self_attn"},
                        &err),
              -1);
    ASSERT_EQ(err.code, TP_ENOTFOUND);
    ASSERT_STR_HAS(err.msg, "gate_proj");
    ASSERT_EQ(build_req(&p,
                        &(struct plan_request){.weights = hf("qwen2-bias-fp16"),
                                               .block = "model.layers.0.mlp",
                                               .bias = "x"},
                        &err),
              -1);
    ASSERT_STR_HAS(err.msg, "--bias");
    ASSERT_EQ(build_req(&p,
                        &(struct plan_request){.weights = hf("qwen2-bias-fp16"),
                                               .weight = "lm_head",
                                               .act = PLAN_ACT_SILU},
                        &err),
              -1);
    ASSERT_STR_HAS(err.msg, "--block");
    /* without config.json: the activation must be given */
    snprintf(path, sizeof(path), "%s", tmp("model.safetensors"));
    copy_file(hf("gpt2-tied-fp32/model.safetensors"), path);
    ASSERT_EQ(build_req(&p,
                        &(struct plan_request){.weights = path,
                                               .block = "transformer.h.0.mlp",
                                               .layout = PLAN_CONV1D},
                        &err),
              -1);
    ASSERT_STR_HAS(err.msg, "--act");
    ASSERT_EQ(build_req(&p,
                        &(struct plan_request){.weights = path,
                                               .block = "transformer.h.0.mlp",
                                               .layout = PLAN_CONV1D,
                                               .act = PLAN_ACT_GELU_TANH},
                        &err),
              0);
    /* an activation tpd does not compute, and mlp_bias true without the biases */
    write_file(tmp("config.json"), "{\"hidden_act\": \"quick_gelu\"}", 28);
    ASSERT_EQ(build_req(&p,
                        &(struct plan_request){.weights = tmpdir,
                                               .block = "transformer.h.0.mlp",
                                               .layout = PLAN_CONV1D},
                        &err),
              -1);
    ASSERT_STR_HAS(err.msg, "quick_gelu");
    write_file(tmp("config.json"), "{\"hidden_act\": \"gelu\", \"mlp_bias\": true}", 40);
    ASSERT_EQ(build_req(&p,
                        &(struct plan_request){.weights = tmpdir,
                                               .block = "transformer.h.0.mlp",
                                               .layout = PLAN_CONV1D},
                        &err),
              0); /* GPT-2's members have biases */
    ASSERT_EQ(p.act, PLAN_ACT_GELU);
    unlink(tmp("config.json"));
}

/* A plan made before the file changed is refused by the worker's read, never served. */
static void test_weights_changed(void)
{
    struct plan p;
    struct shard s;
    struct tp_err err;
    struct timespec times[2] = {{0, UTIME_OMIT}, {12345, 0}};
    char path[4096];

    snprintf(path, sizeof(path), "%s", tmp("layer.safetensors"));
    copy_file(hf("gpt2-tied-fp32/model.safetensors"), path);
    ASSERT_EQ(build(&p, path, "lm_head", NULL, PLAN_LAYOUT_AUTO, &err), -1); /* no config */
    ASSERT_EQ(build(&p, path, "transformer.wte.weight", NULL, PLAN_LAYOUT_AUTO, &err), 0);
    ASSERT_EQ(shard_load(&s, &p, 1, 2, &err), 0);
    shard_free(&s);
    /* same bytes, new mtime */
    ASSERT_EQ(utimensat(AT_FDCWD, path, times, 0), 0);
    ASSERT_EQ(shard_load(&s, &p, 1, 2, &err), -1);
    ASSERT_STR_HAS(err.msg, "weights changed since start");
    /* replaced by another file */
    copy_file(hf("qwen2-bias-fp16/model-00002-of-00002.safetensors"), tmp("other"));
    ASSERT_EQ(rename(tmp("other"), path), 0);
    ASSERT_EQ(shard_load(&s, &p, 0, 2, &err), -1);
    ASSERT_STR_HAS(err.msg, "weights changed since start");
    err = (struct tp_err){0};
    ASSERT_EQ(shard_load_packed(&s, &p, 0, 2, 3, &err), -1);
    ASSERT_STR_HAS(err.msg, "weights changed since start");
    unlink(path);
    ASSERT_EQ(shard_load(&s, &p, 0, 2, &err), -1);
    ASSERT_STR_HAS(err.msg, "weights changed since start");
}

/* a plan from another process is checked field by field */
static void test_validate(void)
{
    struct plan good, p;
    struct tp_err err;

    ASSERT_EQ(build(&good, hf("qwen2-bias-fp16"), "model.layers.0.self_attn.q_proj", NULL,
                    PLAN_LAYOUT_AUTO, &err),
              0);
    p = good, p.magic ^= 1;
    ASSERT_EQ(plan_validate(&p, &err), -1);
    p = good, p.lin[0].layout = 7;
    ASSERT_EQ(plan_validate(&p, &err), -1);
    ASSERT_STR_HAS(err.msg, "layout 7");
    p = good, memset(p.lin[0].w.path, 'x', sizeof(p.lin[0].w.path));
    ASSERT_EQ(plan_validate(&p, &err), -1);
    p = good, p.in++;
    ASSERT_EQ(plan_validate(&p, &err), -1);
    p = good, p.lin[0].w.end += 2;
    ASSERT_EQ(plan_validate(&p, &err), -1);
    p = good, p.lin[0].b.shape[0] = 64;
    ASSERT_EQ(plan_validate(&p, &err), -1);
    p = good, p.lin[0].w.dtype = 99;
    ASSERT_EQ(plan_validate(&p, &err), -1);
    p = good, p.kind = PLAN_GATED;
    ASSERT_EQ(plan_validate(&p, &err), -1);
    p = good, p.act = PLAN_ACT_SILU;
    ASSERT_EQ(plan_validate(&p, &err), -1);
    p = good, p.lin[0].split = PLAN_SPLIT_IN;
    ASSERT_EQ(plan_validate(&p, &err), -1);
    p = good, p.kind = 9;
    ASSERT_EQ(plan_validate(&p, &err), -1);
    p = good;
    ASSERT_EQ(plan_validate(&p, &err), 0);
    /* a block whose layers do not chain */
    ASSERT_EQ(build_req(&good,
                        &(struct plan_request){.weights = hf("llama-sharded-bf16"),
                                               .block = "model.layers.0.mlp"},
                        &err),
              0);
    p = good, p.inter = 431;
    ASSERT_EQ(plan_validate(&p, &err), -1);
    p = good, p.lin[2] = good.lin[1];
    ASSERT_EQ(plan_validate(&p, &err), -1);
    p = good, p.nlin = 2;
    ASSERT_EQ(plan_validate(&p, &err), -1);
    p = good, p.act = 0;
    ASSERT_EQ(plan_validate(&p, &err), -1);
    p = good;
    ASSERT_EQ(plan_validate(&p, &err), 0);
}

int main(void)
{
    snprintf(tmpdir, sizeof(tmpdir), "/tmp/test_plan.XXXXXX");
    ASSERT_TRUE(mkdtemp(tmpdir) != NULL);
    TEST_RUN(test_split);
    TEST_RUN(test_find);
    TEST_RUN(test_gpt2);
    TEST_RUN(test_refused_indexes);
    TEST_RUN(test_shards);
    TEST_RUN(test_blocks);
    TEST_RUN(test_weights_changed);
    TEST_RUN(test_validate);
    unlink(tmp("model.safetensors"));
    rmdir(tmpdir);
    return 0;
}
