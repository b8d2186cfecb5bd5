/* test_cuda_plan.c -- the host-side arithmetic of the cuda backend, on the CPU: the cuBLAS
 * parameters of the GEMM run through a column-major GEMM written from the BLAS definition must
 * give the row-major x·Wᵀ; a whole forward of every rank, simulated on the host step by step as
 * the backend runs it (GEMM into the planned block, all-gather as concatenation of the padded
 * blocks, the planned 2-D copies), must give exactly the [rows, out] product, for both gathers,
 * even and uneven splits, with every output element written once and no padding in the output;
 * a plan with any one offset, pitch, width or height off by one must fail that check; the same
 * forward with its copies detoured through the pinned stage of an unpinned arena must give the
 * same output; the FP16 and BF16 overflow limits agree with round-to-nearest-even conversions
 * written here; error texts name the call. Shapes with rows > 1, nranks > 1 and cols not a power of
 * two, where a wrong layout shows. */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "backend_cuda_plan.h"
#include "plan.h"
#include "test.h"

/* C = alpha op(A) op(B) + beta C, column-major, as the BLAS reference defines it (alpha = 1;
 * with beta = 0, C is not read, so it may hold anything) */
static void gemm_colmajor(const struct cuda_gemm_shape *g, const float *a, const float *b,
                          float beta, float *c)
{
    for (int j = 0; j < g->n; j++)
        for (int i = 0; i < g->m; i++) {
            double acc = 0;

            for (int l = 0; l < g->k; l++) {
                float av = g->trans_a ? a[l + (size_t)i * g->lda] : a[i + (size_t)l * g->lda];
                float bv = g->trans_b ? b[j + (size_t)l * g->ldb] : b[l + (size_t)j * g->ldb];

                acc += (double)av * bv;
            }
            if (beta != 0.0f)
                acc += (double)beta * c[i + (size_t)j * g->ldc];
            c[i + (size_t)j * g->ldc] = (float)acc;
        }
}

static float val(uint32_t seed)
{
    seed = seed * 2654435761u + 12345u;
    return (float)((seed >> 8) % 2001) / 1000.0f - 1.0f;
}

static void test_gemm_parameters(void)
{
    const uint32_t rows = 7;
    const int64_t cols = 6, in = 5;
    float x[7 * 5], w[6 * 5], bias[6], y[7 * 6];
    struct cuda_gemm_shape g;
    struct tp_err err = {0};

    for (size_t i = 0; i < sizeof(x) / sizeof(x[0]); i++)
        x[i] = val((uint32_t)i);
    for (size_t i = 0; i < sizeof(w) / sizeof(w[0]); i++)
        w[i] = val((uint32_t)i + 1000);
    for (int j = 0; j < cols; j++)
        bias[j] = val((uint32_t)j + 5000);
    ASSERT_EQ(cuda_plan_gemm(rows, cols, in, &g, &err), 0);
    ASSERT_EQ(g.trans_a, 1);
    ASSERT_EQ(g.trans_b, 0);
    /* the bias broadcast first, then beta = 1, as the backend does */
    for (uint32_t i = 0; i < rows; i++)
        memcpy(y + i * cols, bias, sizeof(bias));
    gemm_colmajor(&g, w, x, 1.0f, y);
    for (uint32_t b = 0; b < rows; b++)
        for (int64_t o = 0; o < cols; o++) {
            double ref = bias[o];

            for (int64_t k = 0; k < in; k++)
                ref += (double)x[b * in + k] * w[o * in + k];
            ASSERT_NEAR(y[b * cols + o], ref, 1e-5);
        }
}

static void test_gemm_too_big(void)
{
    struct cuda_gemm_shape g;
    struct tp_err err = {0};

    ASSERT_EQ(cuda_plan_gemm(1, (int64_t)1 << 31, 4, &g, &err), -1);
    ASSERT_EQ(err.code, TP_EINVAL);
    ASSERT_STR_HAS(err.msg, "2147483648");
}

/* One planned copy on host memory, as cudaMemcpy2DAsync would do it, with both sides' bounds
 * checked (src_len, dst_len bytes) and every destination element of elem bytes counted in
 * writes. Returns -1, copying nothing, for a copy that cudaMemcpy2D would refuse (width above a
 * pitch) or that leaves either buffer. */
static int copy2d(char *dst, size_t dst_len, const char *src, size_t src_len,
                  const struct cuda_copy2d *c, size_t elem, unsigned char *writes)
{
    size_t last_dst, last_src;

    if (c->height == 0 || c->width == 0)
        return 0;
    if (c->width > c->dpitch || c->width > c->spitch)
        return -1;
    last_dst = c->dst_off + (c->height - 1) * c->dpitch + c->width;
    last_src = c->src_off + (c->height - 1) * c->spitch + c->width;
    if (last_dst > dst_len || last_src > src_len)
        return -1;
    for (size_t r = 0; r < c->height; r++) {
        size_t d = c->dst_off + r * c->dpitch;

        memcpy(dst + d, src + c->src_off + r * c->spitch, c->width);
        for (size_t e = d / elem; e < (d + c->width + elem - 1) / elem; e++)
            if (writes[e] < 255)
                writes[e]++;
    }
    return 0;
}

/* y[b, o] of the whole layer, the value every plan must reproduce */
static float expect(uint32_t b, int64_t o)
{
    return (float)b * 1000.0f + (float)o;
}

/* The even split, with values only: the layout before padding existed must be unchanged. */
static void check_gather(enum backend_gather mode, int nranks, uint32_t rows, int64_t cols)
{
    int64_t out = cols * nranks;
    size_t ylen = (size_t)rows * (size_t)out * sizeof(float);
    size_t dlen = (size_t)nranks * rows * (size_t)cols * sizeof(float);
    float *y = calloc((size_t)rows * (size_t)out, sizeof(float));
    float *dev = calloc((size_t)nranks * rows * (size_t)cols, sizeof(float));
    unsigned char *writes = calloc((size_t)rows * (size_t)out, 1);
    struct cuda_copy2d *plan = calloc((size_t)nranks, sizeof(*plan));
    struct cuda_layout l;
    struct tp_err err = {0};

    ASSERT_TRUE(y && dev && plan && writes);
    for (size_t i = 0; i < (size_t)rows * (size_t)out; i++)
        y[i] = -1.0f;
    if (mode == BACKEND_GATHER_NCCL) {
        /* each rank's GEMM writes its block in place; the all-gather leaves [N][rows][cols] */
        for (int q = 0; q < nranks; q++) {
            size_t off;

            ASSERT_EQ(cuda_plan_layout(&l, mode, out, nranks, q, &err), 0);
            ASSERT_EQ(l.pad, cols);
            ASSERT_EQ(l.cols, cols);
            ASSERT_EQ(l.row0, q * cols);
            ASSERT_EQ(cuda_plan_buffer(&l, rows), (size_t)nranks * rows * (size_t)cols);
            off = cuda_plan_block(&l, rows);
            ASSERT_EQ(off, (size_t)q * rows * (size_t)cols);
            for (uint32_t b = 0; b < rows; b++)
                for (int64_t j = 0; j < cols; j++)
                    dev[off + b * cols + j] = expect(b, q * cols + j);
        }
        for (int q = 0; q < nranks; q++) {
            int n;

            ASSERT_EQ(cuda_plan_layout(&l, mode, out, nranks, q, &err), 0);
            n = cuda_plan_copyout(&l, rows, sizeof(float), plan);
            ASSERT_EQ(n, q == 0 ? nranks : 0);
            for (int i = 0; i < n; i++)
                ASSERT_EQ(copy2d((char *)y, ylen, (const char *)dev, dlen, &plan[i], sizeof(float),
                                 writes),
                          0);
        }
    } else {
        /* each rank has only its own [rows][cols] block and copies it */
        for (int q = 0; q < nranks; q++) {
            ASSERT_EQ(cuda_plan_layout(&l, mode, out, nranks, q, &err), 0);
            ASSERT_EQ(cuda_plan_block(&l, rows), 0);
            ASSERT_EQ(cuda_plan_buffer(&l, rows), (size_t)rows * (size_t)cols);
            for (uint32_t b = 0; b < rows; b++)
                for (int64_t j = 0; j < cols; j++)
                    dev[b * cols + j] = expect(b, q * cols + j);
            ASSERT_EQ(cuda_plan_copyout(&l, rows, sizeof(float), plan), 1);
            ASSERT_EQ(
                copy2d((char *)y, ylen, (const char *)dev, dlen, &plan[0], sizeof(float), writes),
                0);
        }
    }
    for (uint32_t b = 0; b < rows; b++)
        for (int64_t o = 0; o < out; o++)
            if (y[b * out + o] != expect(b, o) || writes[b * out + o] != 1)
                TEST_FAIL_("%s gather, %d ranks, %u rows, %lld cols: y[%u, %lld] = %g written "
                           "%d times, expected %g once",
                           mode == BACKEND_GATHER_NCCL ? "nccl" : "host", nranks, rows,
                           (long long)cols, b, (long long)o, y[b * out + o], writes[b * out + o],
                           expect(b, o));
    free(y);
    free(dev);
    free(writes);
    free(plan);
}

static void test_copyout_layouts(void)
{
    static const uint32_t rows[] = {1, 7, 64, 1024};
    static const int nranks[] = {1, 2, 3, 8};

    for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++)
        for (size_t j = 0; j < sizeof(nranks) / sizeof(nranks[0]); j++) {
            check_gather(BACKEND_GATHER_NCCL, nranks[j], rows[i], 6);
            check_gather(BACKEND_GATHER_HOST, nranks[j], rows[i], 6);
        }
    check_gather(BACKEND_GATHER_NCCL, 2, 5, 420);
}

/* One forward of the whole group, simulated. */
struct sim {
    enum backend_gather mode;
    int64_t out, in;
    int nranks;
    uint32_t rows;      /* rows of the job */
    uint32_t max_batch; /* rows the device buffers are sized for, >= rows */
    int bias;
    int staged; /* the copies go through the stage (cuda_plan_stage), then unstaged on the host */
    /* a deliberate fault, for the test of the test: add delta bytes to one field of copy
     * number fault_copy of rank fault_rank's plan (field: 0 none, 1 dst_off, 2 dpitch,
     * 3 src_off, 4 spitch, 5 width, 6 height, in rows) */
    int fault_rank, fault_copy, fault_field;
    long long delta;
};

#define PAD_MARK 1.0e30f    /* what the padding and the rest of a device buffer hold */
#define UNSET_MARK -1.0e30f /* what the output holds before the copies */

static void apply_fault(struct cuda_copy2d *c, int field, long long delta)
{
    size_t *f[] = {NULL, &c->dst_off, &c->dpitch, &c->src_off, &c->spitch, &c->width, &c->height};

    *f[field] = (size_t)((long long)*f[field] + delta);
}

/* Counts the elem-byte destination elements that copy c writes, as copy2d does. */
static void count_writes(const struct cuda_copy2d *c, size_t elem, unsigned char *writes)
{
    for (size_t r = 0; r < c->height && c->width; r++) {
        size_t d = c->dst_off + r * c->dpitch;

        for (size_t e = d / elem; e < (d + c->width + elem - 1) / elem; e++)
            if (writes[e] < 255)
                writes[e]++;
    }
}

/* Runs the copies of one rank through its stage, as the backend does with an unpinned arena:
 * the device copies into the stage (bounds checked against cuda_plan_stage_bytes), then
 * cuda_plan_unstage on the host. Returns the number of copies that left the stage. */
static long staged_copies(const struct cuda_layout *l, uint32_t max_batch,
                          const struct cuda_copy2d *plan, int n, const float *src, size_t srclen,
                          float *y, unsigned char *writes)
{
    size_t sb = cuda_plan_stage_bytes(l, max_batch, sizeof(float));
    float *stage = malloc(sb + sizeof(float));
    unsigned char *stage_writes = calloc(sb / sizeof(float) + 1, 1);
    struct cuda_copy2d st[16];
    long bad = 0;

    ASSERT_TRUE(stage && stage_writes && n <= 16);
    for (size_t i = 0; i < sb / sizeof(float) + 1; i++)
        stage[i] = PAD_MARK;
    cuda_plan_stage(l, plan, n, st);
    for (int i = 0; i < n; i++)
        if (copy2d((char *)stage, sb, (const char *)src, srclen * sizeof(float), &st[i],
                   sizeof(float), stage_writes) < 0)
            bad++;
    if (!bad) {
        cuda_plan_unstage(plan, st, n, stage, y);
        for (int i = 0; i < n; i++)
            count_writes(&plan[i], sizeof(float), writes);
    }
    free(stage);
    free(stage_writes);
    return bad;
}

/* Runs s; returns the number of wrong output elements (a value other than the direct product,
 * written other than once), counting a copy out of bounds or a failed plan as one more. Prints
 * the first wrong element when verbose. */
static long simulate(const struct sim *s, int verbose)
{
    const int64_t out = s->out, in = s->in;
    const uint32_t rows = s->rows;
    size_t ylen = (size_t)rows * (size_t)out;
    float *x = malloc((size_t)rows * (size_t)in * sizeof(float));
    float *w = malloc((size_t)out * (size_t)in * sizeof(float));
    float *bias = malloc((size_t)out * sizeof(float));
    float *ref = malloc(ylen * sizeof(float));
    float *y = malloc(ylen * sizeof(float));
    unsigned char *writes = calloc(ylen, 1);
    float **dev = calloc((size_t)s->nranks, sizeof(*dev));
    size_t *devlen = calloc((size_t)s->nranks, sizeof(*devlen));
    struct cuda_layout *lay = calloc((size_t)s->nranks, sizeof(*lay));
    struct cuda_copy2d *plan = calloc((size_t)s->nranks, sizeof(*plan));
    float *gathered = NULL;
    size_t count = 0;
    long bad = 0;
    int64_t next_row0 = 0;
    struct tp_err err = {0};

    ASSERT_TRUE(x && w && bias && ref && y && writes && dev && devlen && lay && plan);
    ASSERT_TRUE(s->max_batch >= rows);
    for (size_t i = 0; i < (size_t)rows * (size_t)in; i++)
        x[i] = val((uint32_t)i + 77);
    for (size_t i = 0; i < (size_t)out * (size_t)in; i++)
        w[i] = val((uint32_t)i + 100000);
    for (int64_t o = 0; o < out; o++)
        bias[o] = s->bias ? val((uint32_t)o + 900000) : 0.0f;
    /* the direct product, summed in the order gemm_colmajor sums, so that equality is exact */
    for (uint32_t b = 0; b < rows; b++)
        for (int64_t o = 0; o < out; o++) {
            double acc = 0;

            for (int64_t k = 0; k < in; k++)
                acc += (double)w[o * in + k] * x[b * in + k];
            if (s->bias)
                acc += (double)bias[o];
            ref[b * out + o] = (float)acc;
        }
    for (size_t i = 0; i < ylen; i++)
        y[i] = UNSET_MARK;

    /* every rank: its columns by the plan, its shard of W and b as shard_load reads them, its
     * GEMM into its block of its own device buffer */
    for (int q = 0; q < s->nranks; q++) {
        struct cuda_layout *l = &lay[q];
        struct cuda_gemm_shape g;
        int64_t row0, cols;
        size_t block;
        float *d;

        ASSERT_EQ(cuda_plan_layout(l, s->mode, out, s->nranks, q, &err), 0);
        ASSERT_EQ(plan_split(out, s->nranks, q, &row0, &cols, &err), 0);
        ASSERT_EQ(l->row0, row0);
        ASSERT_EQ(l->cols, cols);
        /* the ranges tile [0, out) in rank order */
        ASSERT_EQ(l->row0, next_row0);
        next_row0 += l->cols;
        ASSERT_TRUE(l->cols >= 1 && l->cols <= l->pad);
        devlen[q] = cuda_plan_buffer(l, s->max_batch);
        dev[q] = malloc(devlen[q] * sizeof(float));
        ASSERT_TRUE(dev[q]);
        for (size_t i = 0; i < devlen[q]; i++)
            dev[q][i] = PAD_MARK;
        block = cuda_plan_block(l, rows);
        ASSERT_TRUE(block + (size_t)rows * (size_t)l->cols <= devlen[q]);
        d = dev[q] + block;
        /* cuda_kern_fill_bias: a dense [rows, cols] broadcast, then the GEMM with beta = 1 */
        if (s->bias)
            for (uint32_t b = 0; b < rows; b++)
                for (int64_t j = 0; j < l->cols; j++)
                    d[b * l->cols + j] = bias[l->row0 + j];
        ASSERT_EQ(cuda_plan_gemm(rows, l->cols, in, &g, &err), 0);
        gemm_colmajor(&g, w + (size_t)l->row0 * (size_t)in, x, s->bias ? 1.0f : 0.0f, d);
    }
    ASSERT_EQ(next_row0, out);

    /* the all-gather: every rank sends count elements from its block, in place, and every rank
     * receives the concatenation; rank 0's copy is the one copied out */
    if (s->mode == BACKEND_GATHER_NCCL) {
        count = cuda_plan_count(&lay[0], rows);
        gathered = malloc(devlen[0] * sizeof(float));
        ASSERT_TRUE(gathered);
        memcpy(gathered, dev[0], devlen[0] * sizeof(float));
        for (int q = 0; q < s->nranks; q++) {
            ASSERT_EQ(cuda_plan_count(&lay[q], rows), count);
            ASSERT_EQ(devlen[q], devlen[0]);
            /* NCCL's in-place rule: sendbuff == recvbuff + rank·count */
            ASSERT_EQ(cuda_plan_block(&lay[q], rows), (size_t)q * count);
            ASSERT_TRUE((size_t)s->nranks * count <= devlen[q]);
            memcpy(gathered + (size_t)q * count, dev[q] + (size_t)q * count, count * sizeof(float));
        }
    }

    /* the copies each rank plans, applied to what that rank's buffer holds */
    for (int q = 0; q < s->nranks; q++) {
        const float *src = s->mode == BACKEND_GATHER_NCCL ? gathered : dev[q];
        int n = cuda_plan_copyout(&lay[q], rows, sizeof(float), plan);

        if (s->mode == BACKEND_GATHER_NCCL)
            ASSERT_EQ(n, q == 0 ? s->nranks : 0);
        else
            ASSERT_EQ(n, 1);
        for (int i = 0; i < n; i++)
            if (s->fault_field && q == s->fault_rank && i == s->fault_copy)
                apply_fault(&plan[i], s->fault_field, s->delta);
        if (s->staged) {
            long left = staged_copies(&lay[q], s->max_batch, plan, n, src, devlen[q], y, writes);

            if (left && verbose)
                fprintf(stderr, "rank %d: %ld copies leave the stage\n", q, left);
            bad += left;
            continue;
        }
        for (int i = 0; i < n; i++) {
            if (copy2d((char *)y, ylen * sizeof(float), (const char *)src,
                       devlen[q] * sizeof(float), &plan[i], sizeof(float), writes) < 0) {
                if (verbose)
                    fprintf(stderr, "rank %d copy %d leaves its buffers\n", q, i);
                bad++;
            }
        }
    }

    for (uint32_t b = 0; b < rows; b++)
        for (int64_t o = 0; o < out; o++) {
            size_t i = b * (size_t)out + (size_t)o;

            if (y[i] == ref[i] && writes[i] == 1)
                continue;
            if (verbose && bad == 0)
                fprintf(stderr, "y[%u, %lld] = %g%s, written %d times; expected %g once\n", b,
                        (long long)o, y[i],
                        y[i] == PAD_MARK     ? " (padding)"
                        : y[i] == UNSET_MARK ? " (never written)"
                                             : "",
                        writes[i], ref[i]);
            bad++;
        }
    for (int q = 0; q < s->nranks; q++)
        free(dev[q]);
    free(gathered);
    free(dev);
    free(devlen);
    free(lay);
    free(plan);
    free(x);
    free(w);
    free(bias);
    free(ref);
    free(y);
    free(writes);
    return bad;
}

static void test_uneven_splits(void)
{
    static const struct {
        int64_t out;
        int nranks;
    } splits[] = {{750, 4}, {1003, 2}, {1003, 3}, {1003, 4}, {7, 3},   {3, 3},   {8, 8},   {9, 8},
                  {15, 8},  {12, 5},   {60, 7},   {1536, 5}, {841, 2}, {840, 2}, {840, 8}, {5, 1}};
    static const uint32_t rows[] = {1, 5};
    static const enum backend_gather modes[] = {BACKEND_GATHER_NCCL, BACKEND_GATHER_HOST};

    for (size_t i = 0; i < sizeof(splits) / sizeof(splits[0]); i++)
        for (size_t j = 0; j < sizeof(rows) / sizeof(rows[0]); j++)
            for (size_t m = 0; m < 2; m++)
                for (uint32_t extra = 0; extra <= 2; extra += 2) {
                    /* max_batch above the job's rows: the blocks follow the job, not the buffer;
                     * staged with it, so that the stage's size follows max_batch too */
                    struct sim s = {.mode = modes[m],
                                    .staged = extra > 0,
                                    .out = splits[i].out,
                                    .in = 9,
                                    .nranks = splits[i].nranks,
                                    .rows = rows[j],
                                    .max_batch = rows[j] + extra,
                                    .bias = (int)((i + j) % 2 == 0)};
                    long bad = simulate(&s, 1);

                    if (bad)
                        TEST_FAIL_("%s gather, out %lld over %d ranks, %u rows (buffers for %u), "
                                   "%s bias%s: %ld wrong output elements",
                                   modes[m] == BACKEND_GATHER_NCCL ? "nccl" : "host",
                                   (long long)s.out, s.nranks, s.rows, s.max_batch,
                                   s.bias ? "with" : "without", s.staged ? ", staged" : "", bad);
                }
}

/* The layout of an uneven split, spelled out: 750 over 4 is 188, 188, 187, 187. */
static void test_uneven_layout(void)
{
    static const int64_t row0[] = {0, 188, 376, 563}, cols[] = {188, 188, 187, 187};
    struct cuda_layout l;
    struct cuda_copy2d c[4];
    struct tp_err err = {0};

    for (int q = 0; q < 4; q++) {
        ASSERT_EQ(cuda_plan_layout(&l, BACKEND_GATHER_NCCL, 750, 4, q, &err), 0);
        ASSERT_EQ(l.row0, row0[q]);
        ASSERT_EQ(l.cols, cols[q]);
        ASSERT_EQ(l.pad, 188);
        ASSERT_EQ(cuda_plan_count(&l, 5), 5 * 188);
        ASSERT_EQ(cuda_plan_block(&l, 5), (size_t)q * 5 * 188);
        ASSERT_EQ(cuda_plan_buffer(&l, 7), 4 * 7 * 188);
    }
    ASSERT_EQ(cuda_plan_layout(&l, BACKEND_GATHER_NCCL, 750, 4, 0, &err), 0);
    ASSERT_EQ(cuda_plan_copyout(&l, 5, 4, c), 4);
    for (int q = 0; q < 4; q++) {
        ASSERT_EQ(c[q].dst_off, (size_t)row0[q] * 4);
        ASSERT_EQ(c[q].dpitch, 750 * 4);
        ASSERT_EQ(c[q].src_off, (size_t)q * 5 * 188 * 4);
        ASSERT_EQ(c[q].spitch, (size_t)cols[q] * 4);
        ASSERT_EQ(c[q].width, (size_t)cols[q] * 4);
        ASSERT_EQ(c[q].height, 5);
    }
    ASSERT_EQ(cuda_plan_layout(&l, BACKEND_GATHER_HOST, 750, 4, 3, &err), 0);
    ASSERT_EQ(cuda_plan_buffer(&l, 7), 7 * 187);
    ASSERT_EQ(cuda_plan_copyout(&l, 5, 2, c), 1);
    ASSERT_EQ(c[0].dst_off, 563 * 2);
    ASSERT_EQ(c[0].dpitch, 750 * 2);
    ASSERT_EQ(c[0].src_off, 0);
    ASSERT_EQ(c[0].spitch, 187 * 2);
    ASSERT_EQ(c[0].width, 187 * 2);
}

static void test_layout_refused(void)
{
    struct cuda_layout l = {.out = -5};
    struct tp_err err = {0};

    ASSERT_EQ(cuda_plan_layout(&l, BACKEND_GATHER_NCCL, 3, 4, 0, &err), -1);
    ASSERT_EQ(err.code, TP_EINVAL);
    ASSERT_EQ(l.out, -5);
    err = (struct tp_err){0};
    ASSERT_EQ(cuda_plan_layout(&l, BACKEND_GATHER_HOST, 8, 4, 4, &err), -1);
    ASSERT_EQ(err.code, TP_EINVAL);
}

/* The test of the test: the simulation must notice any one field of any one copy off by an
 * element (a row for the height), in both directions, where the result can show it (rows > 1). */
static void test_simulation_catches_faults(void)
{
    static const struct {
        enum backend_gather mode;
        int64_t out;
        int nranks;
    } cases[] = {{BACKEND_GATHER_NCCL, 750, 4},
                 {BACKEND_GATHER_NCCL, 7, 3},
                 {BACKEND_GATHER_HOST, 1003, 3},
                 {BACKEND_GATHER_HOST, 7, 3}};
    long caught = 0, tried = 0;

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        for (int q = 0; q < cases[i].nranks; q++) {
            int ncopies = cases[i].mode == BACKEND_GATHER_NCCL ? (q == 0 ? cases[i].nranks : 0) : 1;

            for (int c = 0; c < ncopies; c++)
                for (int field = 1; field <= 6; field++)
                    for (int sign = -1; sign <= 1; sign += 2) {
                        struct sim s = {.mode = cases[i].mode,
                                        .out = cases[i].out,
                                        .in = 4,
                                        .nranks = cases[i].nranks,
                                        .rows = 5,
                                        .max_batch = 6,
                                        .bias = 1,
                                        .fault_rank = q,
                                        .fault_copy = c,
                                        .fault_field = field,
                                        .delta =
                                            sign * (field == 6 ? 1 : (long long)sizeof(float))};
                        struct cuda_layout l;
                        struct cuda_copy2d plan[8];
                        struct tp_err err = {0};

                        /* a destination offset of rank 0's first copy cannot go below 0 */
                        ASSERT_EQ(cuda_plan_layout(&l, s.mode, s.out, s.nranks, q, &err), 0);
                        cuda_plan_copyout(&l, s.rows, sizeof(float), plan);
                        if (sign < 0 && ((field == 1 && plan[c].dst_off == 0) ||
                                         (field == 3 && plan[c].src_off == 0)))
                            continue;
                        tried++;
                        if (simulate(&s, 0) > 0)
                            caught++;
                        else
                            TEST_FAIL_("%s gather, out %lld over %d ranks: field %d of rank %d's "
                                       "copy %d off by %lld went unnoticed",
                                       s.mode == BACKEND_GATHER_NCCL ? "nccl" : "host",
                                       (long long)s.out, s.nranks, field, q, c, s.delta);
                    }
        }
    ASSERT_EQ(caught, tried);
    ASSERT_GT(tried, 100);
}

/* The trap the plan avoids: copying the gathered buffer flat is right only for one row. */
static void test_flat_copy_is_wrong(void)
{
    const int nranks = 2;
    const uint32_t rows = 3;
    const int64_t cols = 3;
    float dev[2 * 3 * 3], y[3 * 6];
    int wrong = 0;

    for (int q = 0; q < nranks; q++)
        for (uint32_t b = 0; b < rows; b++)
            for (int64_t j = 0; j < cols; j++)
                dev[(q * rows + b) * cols + j] = expect(b, q * cols + j);
    memcpy(y, dev, sizeof(y));
    for (uint32_t b = 0; b < rows; b++)
        for (int64_t o = 0; o < nranks * cols; o++)
            wrong += y[b * nranks * cols + o] != expect(b, o);
    ASSERT_GT(wrong, 0);
}

/* The stage's size and layout: rank 0 of the NCCL gather stages [rows, out] as the output is
 * laid out, the others nothing; the host gather stages its own columns dense. */
static void test_stage_layout(void)
{
    struct cuda_layout l;
    struct cuda_copy2d c[4], st[4];
    struct tp_err err = {0};

    ASSERT_EQ(cuda_plan_layout(&l, BACKEND_GATHER_NCCL, 750, 4, 0, &err), 0);
    ASSERT_EQ(cuda_plan_stage_bytes(&l, 7, 4), 7 * 750 * 4);
    ASSERT_EQ(cuda_plan_copyout(&l, 5, 4, c), 4);
    cuda_plan_stage(&l, c, 4, st);
    ASSERT_EQ(memcmp(c, st, sizeof(c)), 0);
    ASSERT_EQ(cuda_plan_layout(&l, BACKEND_GATHER_NCCL, 750, 4, 2, &err), 0);
    ASSERT_EQ(cuda_plan_stage_bytes(&l, 7, 4), 0);
    ASSERT_EQ(cuda_plan_layout(&l, BACKEND_GATHER_HOST, 750, 4, 3, &err), 0);
    ASSERT_EQ(cuda_plan_stage_bytes(&l, 7, 4), 7 * 187 * 4);
    ASSERT_EQ(cuda_plan_copyout(&l, 5, 4, c), 1);
    cuda_plan_stage(&l, c, 1, st);
    ASSERT_EQ(st[0].dst_off, 0);
    ASSERT_EQ(st[0].dpitch, 187 * 4);
    ASSERT_EQ(st[0].width, c[0].width);
    ASSERT_EQ(st[0].height, 5);
    ASSERT_EQ(st[0].src_off, c[0].src_off);
    ASSERT_EQ(st[0].spitch, c[0].spitch);
}

/* Does float f become an infinity in FP16 or BF16, by round-to-nearest-even, computed another
 * way than the limit: FP16 has steps of 32 in [32768, 65536), so |f| rounds to a multiple of 32
 * (ties to even, nearbyint's default mode) and overflows when that is 65536 or more; BF16 keeps
 * the top 16 bits of the float after adding the rounding bias of the bits it drops. */
static int overflows_f16(float f)
{
    float a = fabsf(f);

    return isfinite(f) && a >= 32768.0f && nearbyintf(a / 32.0f) * 32.0f >= 65536.0f;
}

static int overflows_bf16(float f)
{
    uint32_t u;

    memcpy(&u, &f, sizeof(u));
    u = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return isfinite(f) && (u & 0x7fffu) == 0x7f80u;
}

static void test_half_limits(void)
{
    float v[4] = {1.0f, -65504.0f, 65520.0f, -70000.0f};
    uint32_t u;
    float f;

    ASSERT_EQ(cuda_plan_half_limit(TP_F16) == 65520.0f, 1);
    ASSERT_EQ(isinf(cuda_plan_half_limit(TP_F32)), 1);
    /* every float from 60000 to 70000, both signs, against the conversion above */
    for (f = 60000.0f; f < 70000.0f; f = nextafterf(f, INFINITY))
        for (int sign = 0; sign < 2; sign++) {
            float x = sign ? -f : f;

            if ((fabsf(x) >= cuda_plan_half_limit(TP_F16)) != overflows_f16(x))
                TEST_FAIL_("fp16: %.9g: limit says %d, rounding says %d", x,
                           fabsf(x) >= cuda_plan_half_limit(TP_F16), overflows_f16(x));
        }
    for (u = 0x7f7e0000u; u <= 0x7f7fffffu; u++) {
        memcpy(&f, &u, sizeof(f));
        if ((f >= cuda_plan_half_limit(TP_BF16)) != overflows_bf16(f))
            TEST_FAIL_("bf16: 0x%08x: limit says %d, rounding says %d", u,
                       f >= cuda_plan_half_limit(TP_BF16), overflows_bf16(f));
    }
    ASSERT_EQ(cuda_plan_first_overflow(v, 4, TP_F16), 2);
    ASSERT_EQ(cuda_plan_first_overflow(v, 2, TP_F16), SIZE_MAX);
    ASSERT_EQ(cuda_plan_first_overflow(v, 4, TP_BF16), SIZE_MAX);
    ASSERT_EQ(cuda_plan_first_overflow(v, 4, TP_F32), SIZE_MAX);
    /* infinities and NaNs are the input's own, not an overflow */
    v[2] = INFINITY;
    v[3] = NAN;
    ASSERT_EQ(cuda_plan_first_overflow(v, 4, TP_F16), SIZE_MAX);
    v[0] = nextafterf(65520.0f, 0.0f);
    ASSERT_EQ(cuda_plan_first_overflow(v, 1, TP_F16), SIZE_MAX);
    v[0] = FLT_MAX;
    ASSERT_EQ(cuda_plan_first_overflow(v, 1, TP_BF16), 0);
}

static void test_error_text(void)
{
    struct tp_err err = {0};

    ASSERT_EQ(cuda_call_error(&err, TP_EDEVICE, "cudaMalloc(&b->w, n * 2)", "out of memory"), -1);
    ASSERT_EQ(err.code, TP_EDEVICE);
    ASSERT_STR_EQ(err.msg, "cudaMalloc: out of memory");
    cuda_call_error(&err, TP_EUNAVAIL, "ncclAllGather", "remote process exited");
    ASSERT_STR_EQ(err.msg, "ncclAllGather: remote process exited");
    cuda_call_error(&err, TP_EDEVICE, "cublasSgemm (h, ...)", NULL);
    ASSERT_STR_EQ(err.msg, "cublasSgemm: unknown error");
    /* calls through a loaded library's table name the function, not the table */
    cuda_call_error(&err, TP_EDEVICE, "blas.cublasSgemm(b->blas, ta, tb, g.m)", "not supported");
    ASSERT_STR_EQ(err.msg, "cublasSgemm: not supported");
    cuda_call_error(&err, TP_EDEVICE, "lib->ncclCommAbort(c)", "x");
    ASSERT_STR_EQ(err.msg, "ncclCommAbort: x");
}

int main(void)
{
    TEST_RUN(test_gemm_parameters);
    TEST_RUN(test_gemm_too_big);
    TEST_RUN(test_copyout_layouts);
    TEST_RUN(test_uneven_layout);
    TEST_RUN(test_layout_refused);
    TEST_RUN(test_uneven_splits);
    TEST_RUN(test_simulation_catches_faults);
    TEST_RUN(test_flat_copy_is_wrong);
    TEST_RUN(test_stage_layout);
    TEST_RUN(test_half_limits);
    TEST_RUN(test_error_text);
    return 0;
}
