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

static void test_split(void)
{
    static const int64_t outs[] = {1, 2, 3, 5, 7, 12, 13, 60, 750, 1003};
    struct tp_err err = {0};

    for (size_t i = 0; i < sizeof(outs) / sizeof(outs[0]); i++)
        for (int n = 1; n <= 6; n++) {
            int64_t next = 0, row0 = -1, rows = -1;

            if (outs[i] < n) {
                ASSERT_EQ(plan_split(outs[i], n, 0, &row0, &rows, &err), -1);
                ASSERT_STR_HAS(err.msg, "smaller than");
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
    ASSERT_STR_EQ(p.w.name, "model.layers.0.self_attn.q_proj.weight");
    ASSERT_STR_HAS(p.w.path, "model-00001-of-00004.safetensors");
    ASSERT_EQ(p.in, 160);
    ASSERT_EQ(p.out, 160);
    ASSERT_EQ(p.layout, PLAN_LINEAR);
    ASSERT_EQ(p.has_bias, 0);
    ASSERT_EQ(p.w.dtype, TP_BF16);
    ASSERT_EQ(plan_validate(&p, &err), 0);

    ASSERT_EQ(build(&p, hf("llama-sharded-bf16/model.safetensors.index.json"),
                    "model.layers.1.mlp.down_proj.weight", NULL, PLAN_LAYOUT_AUTO, &err),
              0);
    ASSERT_STR_HAS(p.w.path, "model-00003-of-00004.safetensors");
    ASSERT_EQ(p.in, 432);
    ASSERT_EQ(p.out, 160);

    ASSERT_EQ(build(&p, hf("qwen2-bias-fp16"), "model.layers.0.self_attn.q_proj", NULL,
                    PLAN_LAYOUT_AUTO, &err),
              0);
    ASSERT_EQ(p.has_bias, 1);
    ASSERT_STR_EQ(p.b.name, "model.layers.0.self_attn.q_proj.bias");
    ASSERT_STR_HAS(p.w.path, "model-00002-of-00002.safetensors");
    ASSERT_STR_HAS(p.b.path, "model-00001-of-00002.safetensors");
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
    ASSERT_EQ(p.layout, PLAN_CONV1D);
    ASSERT_EQ(p.in, 120);
    ASSERT_EQ(p.out, 360);
    ASSERT_STR_EQ(p.b.name, "transformer.h.0.attn.c_attn.bias");
    ASSERT_EQ(build(&p, hf("gpt2-tied-fp32"), "transformer.h.0.attn.c_proj", NULL,
                    PLAN_LAYOUT_AUTO, &err),
              0);
    ASSERT_EQ(p.layout, PLAN_CONV1D);
    ASSERT_EQ(build(&p, hf("gpt2-tied-fp32"), "lm_head", NULL, PLAN_LAYOUT_AUTO, &err), 0);
    ASSERT_STR_EQ(p.w.name, "transformer.wte.weight");
    ASSERT_STR_EQ(p.tied_from, "lm_head.weight");
    ASSERT_EQ(p.layout, PLAN_LINEAR);
    ASSERT_EQ(p.out, 1003);
    ASSERT_EQ(p.has_bias, 0);
    ASSERT_EQ(build(&p, hf("gpt2-tied-fp32"), "transformer.h.0.ln_1.weight", NULL,
                    PLAN_LAYOUT_AUTO, &err),
              -1);

    /* the same file without its config.json: a square Conv1D cannot be told from nn.Linear */
    snprintf(path, sizeof(path), "%s", tmp("model.safetensors"));
    copy_file(hf("gpt2-tied-fp32/model.safetensors"), path);
    ASSERT_EQ(build(&p, path, "transformer.h.0.attn.c_proj", NULL, PLAN_LAYOUT_AUTO, &err), -1);
    ASSERT_STR_HAS(err.msg, "--layout");
    ASSERT_EQ(build(&p, path, "transformer.h.0.attn.c_proj", NULL, PLAN_CONV1D, &err), 0);
    ASSERT_EQ(p.layout, PLAN_CONV1D);
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

/* Every rank's rows, for both layouts, equal the rows of the whole matrix read independently,
 * and only a shard's bytes are read. */
static void check_shards(const char *weights, const char *weight, int conv1d)
{
    struct st_file f = {.fd = -1};
    const struct st_tensor *t;
    struct plan p;
    struct tp_err err = {0};
    float *all;
    int64_t rows_st, cols_st;

    ASSERT_EQ(build(&p, weights, weight, NULL, PLAN_LAYOUT_AUTO, &err), 0);
    ASSERT_EQ(p.layout, conv1d ? PLAN_CONV1D : PLAN_LINEAR);
    ASSERT_EQ(st_open(&f, p.w.path, &err), 0);
    t = st_find(&f, p.w.name);
    ASSERT_TRUE(t != NULL);
    rows_st = t->shape[0];
    cols_st = t->shape[1];
    all = malloc((size_t)(rows_st * cols_st) * sizeof(float));
    ASSERT_EQ(st_read_rows_f32(&f, t, 0, rows_st, all, NULL, &err), 0);
    for (int n = 1; n <= 4; n++)
        for (int r = 0; r < n; r++) {
            struct shard s;

            ASSERT_EQ(shard_load(&s, &p, r, n, &err), 0);
            ASSERT_EQ(s.w_bytes, (uint64_t)(s.rows * s.in) * tp_dtype_size(t->dtype));
            for (int64_t j = 0; j < s.rows; j++)
                for (int64_t k = 0; k < s.in; k++) {
                    float want = conv1d ? all[k * cols_st + s.row0 + j]
                                        : all[(s.row0 + j) * cols_st + k];

                    if (s.w[j * s.in + k] != want)
                        TEST_FAIL_("%s n=%d r=%d: w[%lld][%lld] = %g, want %g", weight, n, r,
                                   (long long)j, (long long)k, s.w[j * s.in + k], want);
                }
            if (p.has_bias)
                ASSERT_EQ(s.b_bytes, (uint64_t)s.rows * tp_dtype_size((enum tp_dtype)p.b.dtype));
            /* read and packed in chunks: the same panels as packing the whole shard */
            {
                struct shard sp;
                struct gemm_weights whole;

                ASSERT_EQ(shard_load_packed(&sp, &p, r, n, 1 + (r + n) % 3, &err), 0);
                ASSERT_TRUE(sp.w == NULL);
                ASSERT_EQ(sp.w_bytes, s.w_bytes);
                ASSERT_EQ(sp.b_bytes, s.b_bytes);
                ASSERT_EQ(gemm_pack(&whole, s.w, (uint32_t)s.rows, (uint32_t)s.in, (size_t)s.in,
                                    &err),
                          0);
                ASSERT_EQ(sp.packed.np, whole.np);
                ASSERT_EQ(memcmp(sp.packed.panels, whole.panels,
                                 (size_t)whole.np * GEMM_NR * whole.k * sizeof(float)),
                          0);
                if (p.has_bias)
                    ASSERT_EQ(memcmp(sp.b, s.b, (size_t)s.rows * sizeof(float)), 0);
                gemm_free(&whole);
                shard_free(&sp);
            }
            shard_free(&s);
        }
    free(all);
    st_close(&f);
}

static void test_shards(void)
{
    check_shards(hf("gpt2-tied-fp32"), "transformer.h.0.attn.c_attn", 1);
    check_shards(hf("gpt2-tied-fp32"), "transformer.h.1.mlp.c_proj", 1);
    check_shards(hf("gpt2-tied-fp32"), "lm_head", 0);
    check_shards(hf("llama-sharded-bf16"), "lm_head", 0);
    check_shards(hf("qwen2-bias-fp16"), "model.layers.0.self_attn.v_proj", 0);
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
    p = good, p.layout = 7;
    ASSERT_EQ(plan_validate(&p, &err), -1);
    ASSERT_STR_HAS(err.msg, "layout 7");
    p = good, memset(p.w.path, 'x', sizeof(p.w.path));
    ASSERT_EQ(plan_validate(&p, &err), -1);
    p = good, p.in++;
    ASSERT_EQ(plan_validate(&p, &err), -1);
    p = good, p.w.end += 2;
    ASSERT_EQ(plan_validate(&p, &err), -1);
    p = good, p.b.shape[0] = 64;
    ASSERT_EQ(plan_validate(&p, &err), -1);
    p = good, p.w.dtype = 99;
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
    TEST_RUN(test_weights_changed);
    TEST_RUN(test_validate);
    unlink(tmp("model.safetensors"));
    rmdir(tmpdir);
    return 0;
}
