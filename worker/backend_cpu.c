/* backend_cpu.c -- the CPU backend: one cblas_sgemm per forward, writing this rank's column block
 * of the shared output directly (ldc = out), so no gather step is needed. The bias is written
 * first and the GEMM accumulates onto it (beta = 1). OpenBLAS threads per rank are set by the
 * coordinator so that all ranks together use the machine's cores, not ranks x cores. */
#include <cblas.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"

struct backend {
    struct shard s;
};

static int cpu_create(struct backend **out, const struct backend_config *c, struct shard *s,
                      struct tp_err *err)
{
    struct backend *b = calloc(1, sizeof(*b));

    if (!b)
        return tp_err_set(err, TP_ENOMEM, "no memory for the cpu backend");
    b->s = *s;
    *s = (struct shard){0};
    openblas_set_num_threads(c->threads > 0 ? c->threads : 1);
    *out = b;
    return 0;
}

static int cpu_forward(struct backend *b, const float *x, uint32_t rows, float *y,
                       struct tp_err *err)
{
    const struct shard *s = &b->s;
    float *yc = y + s->row0; /* this rank's first column */
    float beta = 0.0f;

    (void)err;
    if (s->b) {
        for (uint32_t i = 0; i < rows; i++)
            memcpy(yc + (size_t)i * (size_t)s->out, s->b, (size_t)s->rows * sizeof(float));
        beta = 1.0f;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)rows, (int)s->rows, (int)s->in, 1.0f,
                x, (int)s->in, s->w, (int)s->in, beta, yc, (int)s->out);
    return 0;
}

static void cpu_destroy(struct backend *b)
{
    if (!b)
        return;
    shard_free(&b->s);
    free(b);
}

const struct backend_ops backend_cpu = {
    .name = "cpu", .create = cpu_create, .forward = cpu_forward, .destroy = cpu_destroy};
