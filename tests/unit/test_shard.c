/* test_shard.c -- the row split of W between ranks and loading exactly a rank's rows: checked
 * against the whole matrix read independently, for every rank of N = 1..4 and the seed files. */
#include <stdlib.h>

#include "safetensors.h"
#include "shard.h"
#include "test.h"

static char path_buf[4096];

static const char *seed(const char *name)
{
    snprintf(path_buf, sizeof(path_buf), "%s/%s", getenv("TP_SEED_DIR"), name);
    return path_buf;
}

static void test_range_partitions(void)
{
    struct tp_err err = {0};

    for (int n = 1; n <= 6; n++) {
        int64_t next = 0;

        for (int r = 0; r < n; r++) {
            int64_t row0, rows;

            ASSERT_EQ(shard_range(60, n, r, &row0, &rows, &err), 0);
            ASSERT_EQ(row0, next);
            ASSERT_EQ(rows, 60 / n);
            next = row0 + rows;
        }
        ASSERT_EQ(next, 60);
    }
}

static void test_range_errors(void)
{
    struct tp_err err = {0};
    int64_t row0, rows;

    ASSERT_EQ(shard_range(12, 5, 0, &row0, &rows, &err), -1);
    ASSERT_EQ(err.code, TP_EINVAL);
    ASSERT_STR_HAS(err.msg, "12");
    ASSERT_STR_HAS(err.msg, "5 ranks");
    ASSERT_EQ(shard_range(12, 2, 2, &row0, &rows, &err), -1);
    ASSERT_EQ(shard_range(12, 2, -1, &row0, &rows, &err), -1);
    ASSERT_EQ(shard_range(12, 0, 0, &row0, &rows, &err), -1);
}

/* every rank's rows equal the matching rows of the whole matrix, and only those bytes are read */
static void check_file(const char *name, const char *bias, size_t elem)
{
    struct st_file f = {.fd = -1};
    struct tp_err err = {0};
    const struct st_tensor *w;
    float *all;

    ASSERT_EQ(st_open(&f, seed(name), &err), 0);
    w = st_find(&f, "weight");
    ASSERT_TRUE(w != NULL);
    all = malloc((size_t)(w->shape[0] * w->shape[1]) * sizeof(float));
    ASSERT_EQ(st_read_rows_f32(&f, w, 0, w->shape[0], all, NULL, &err), 0);
    for (int n = 1; n <= 4; n++) {
        for (int r = 0; r < n; r++) {
            struct shard s;

            if (w->shape[0] % n)
                continue;
            ASSERT_EQ(shard_load(&s, seed(name), "weight", bias, r, n, &err), 0);
            ASSERT_EQ(s.rows, w->shape[0] / n);
            ASSERT_EQ(s.row0, r * s.rows);
            ASSERT_EQ(s.in, w->shape[1]);
            ASSERT_EQ(s.w_bytes, (uint64_t)(s.rows * s.in) * elem);
            ASSERT_EQ(s.b_bytes, bias ? (uint64_t)s.rows * elem : 0);
            ASSERT_EQ(memcmp(s.w, all + s.row0 * s.in, (size_t)(s.rows * s.in) * sizeof(float)), 0);
            ASSERT_TRUE(bias ? s.b != NULL : s.b == NULL);
            shard_free(&s);
        }
    }
    free(all);
    st_close(&f);
}

static void test_load_seed(void)
{
    check_file("seed.safetensors", "bias", 4);
    check_file("seed.bf16.safetensors", "bias", 2);
    check_file("mlp-up.safetensors", "bias", 4);
    check_file("nobias.safetensors", NULL, 4);
}

static void test_load_errors(void)
{
    struct shard s;
    struct tp_err err = {0};

    ASSERT_EQ(shard_load(&s, seed("seed.safetensors"), "nosuch", "bias", 0, 2, &err), -1);
    ASSERT_STR_HAS(err.msg, "nosuch");
    ASSERT_EQ(shard_load(&s, seed("nobias.safetensors"), "weight", "bias", 0, 2, &err), -1);
    ASSERT_STR_HAS(err.msg, "'bias'");
    ASSERT_EQ(shard_load(&s, seed("seed.safetensors"), "bias", NULL, 0, 1, &err), -1);
    ASSERT_STR_HAS(err.msg, "2-d");
    ASSERT_EQ(shard_load(&s, seed("seed.safetensors"), "weight", "bias", 0, 5, &err), -1);
    ASSERT_STR_HAS(err.msg, "divisible");
    ASSERT_EQ(shard_load(&s, "/nonexistent/x.safetensors", "weight", NULL, 0, 1, &err), -1);
    ASSERT_STR_HAS(err.msg, "/nonexistent/x.safetensors");
    ASSERT_TRUE(s.w == NULL && s.b == NULL);
}

int main(void)
{
    TEST_RUN(test_range_partitions);
    TEST_RUN(test_range_errors);
    TEST_RUN(test_load_seed);
    TEST_RUN(test_load_errors);
    return 0;
}
