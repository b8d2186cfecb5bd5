/* ref.c -- the CPU reference (see ref.h). Deliberately the simplest code that is right: one dot
 * product per output element, in double, no blocking, no BLAS. */
#include "ref.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "safetensors.h"

int ref_layer_load(struct ref_layer *l, const char *path, const char *weight_name,
                   const char *bias_name, struct tp_err *err)
{
    struct st_file f = {.fd = -1};
    const struct st_tensor *w, *b;
    const char *bname = bias_name ? bias_name : "bias";

    *l = (struct ref_layer){0};
    if (st_open(&f, path, err) < 0)
        goto fail;
    w = st_find(&f, weight_name);
    if (!w || w->ndim != 2) {
        tp_err_set(err, TP_EINVAL, "%s: no 2-d tensor '%s'", path, weight_name);
        goto fail;
    }
    if (w->dtype == TP_DTYPE_INVALID) {
        tp_err_set(err, TP_EINVAL, "%s: weight '%s' has dtype %s, expected F32, F16, BF16 or F64",
                   path, weight_name, w->dtype_name);
        goto fail;
    }
    b = st_find(&f, bname);
    if (!b && bias_name) {
        tp_err_set(err, TP_EINVAL, "%s: no tensor '%s'", path, bias_name);
        goto fail;
    }
    if (b && b->dtype == TP_DTYPE_INVALID) {
        tp_err_set(err, TP_EINVAL, "%s: bias '%s' has dtype %s, expected F32, F16, BF16 or F64",
                   path, bname, b->dtype_name);
        goto fail;
    }
    if (b && (b->ndim != 1 || b->shape[0] != w->shape[0])) {
        tp_err_set(err, TP_EINVAL, "%s: bias '%s' does not match %lld outputs", path, bname,
                   (long long)w->shape[0]);
        goto fail;
    }
    l->out = w->shape[0];
    l->in = w->shape[1];
    l->w = malloc((size_t)(l->out * l->in) * sizeof(float) + 1);
    if (!l->w || st_read_rows_f32(&f, w, 0, l->out, l->w, NULL, err) < 0)
        goto fail;
    if (b) {
        l->b = malloc((size_t)l->out * sizeof(float));
        if (!l->b || st_read_rows_f32(&f, b, 0, l->out, l->b, NULL, err) < 0)
            goto fail;
    }
    st_close(&f);
    return 0;
fail:
    if (err->msg[0] == '\0')
        tp_err_set(err, TP_ENOMEM, "%s: no memory for the reference layer", path);
    st_close(&f);
    ref_layer_free(l);
    return -1;
}

void ref_layer_free(struct ref_layer *l)
{
    free(l->w);
    free(l->b);
    *l = (struct ref_layer){0};
}

void ref_linear(const struct ref_layer *l, const float *x, int64_t batch, double *want, double *mag)
{
    for (int64_t i = 0; i < batch; i++) {
        for (int64_t j = 0; j < l->out; j++) {
            double acc = l->b ? (double)l->b[j] : 0.0;
            double m = l->b ? fabs((double)l->b[j]) : 0.0;

            for (int64_t k = 0; k < l->in; k++) {
                double p = (double)x[i * l->in + k] * (double)l->w[j * l->in + k];

                acc += p;
                m += fabs(p);
            }
            want[i * l->out + j] = acc;
            mag[i * l->out + j] = m;
        }
    }
}

static double act(enum ref_act a, double t)
{
    switch (a) {
    case REF_SILU: return t / (1.0 + exp(-t));
    /* 1 + erf(x) as erfc(-x) and 1 + tanh(u) as 2·sigmoid(2u): the same values, without the
     * cancellation that leaves 0 for t far below 0 even in double */
    case REF_GELU: return 0.5 * t * erfc(-t / sqrt(2.0));
    case REF_GELU_TANH:
        return t / (1.0 + exp(-2.0 * sqrt(2.0 / M_PI) * (t + 0.044715 * t * t * t)));
    default: return t > 0 ? t : 0.0;
    }
}

/* d act / dt */
static double act_slope(enum ref_act a, double t)
{
    double s, u, th;

    switch (a) {
    case REF_SILU:
        s = 1.0 / (1.0 + exp(-t));
        return s * (1.0 + t * (1.0 - s));
    case REF_GELU: return 0.5 * erfc(-t / sqrt(2.0)) + t * exp(-0.5 * t * t) / sqrt(2.0 * M_PI);
    case REF_GELU_TANH:
        u = sqrt(2.0 / M_PI) * (t + 0.044715 * t * t * t);
        th = tanh(u);
        return 0.5 * (1.0 + th) +
               0.5 * t * (1.0 - th * th) * sqrt(2.0 / M_PI) * (1.0 + 3.0 * 0.044715 * t * t);
    default: return t > 0 ? 1.0 : 0.0;
    }
}

void ref_block(const struct ref_block *b, const float *x, int64_t batch, double *want, double *mag)
{
    int64_t inter = b->up.out, hidden = b->down.out;
    double *u = malloc((size_t)inter * sizeof(double)), *mu = malloc((size_t)inter * sizeof(double));
    double *g = malloc((size_t)inter * sizeof(double)), *mg = malloc((size_t)inter * sizeof(double));
    double *h = malloc((size_t)inter * sizeof(double)), *mh = malloc((size_t)inter * sizeof(double));

    if (!u || !mu || !g || !mg || !h || !mh)
        abort();
    for (int64_t i = 0; i < batch; i++) {
        const float *xi = x + i * b->up.in;

        ref_linear(&b->up, xi, 1, u, mu);
        if (b->gated)
            ref_linear(&b->gate, xi, 1, g, mg);
        for (int64_t k = 0; k < inter; k++) {
            if (b->gated) {
                h[k] = act(b->act, g[k]) * u[k];
                mh[k] = fabs(act_slope(b->act, g[k]) * u[k]) * mg[k] +
                        fabs(act(b->act, g[k])) * mu[k] + fabs(h[k]);
            } else {
                h[k] = act(b->act, u[k]);
                mh[k] = fabs(act_slope(b->act, u[k])) * mu[k] + fabs(h[k]);
            }
        }
        for (int64_t j = 0; j < hidden; j++) {
            double acc = b->down.b ? (double)b->down.b[j] : 0.0;
            double m = b->down.b ? fabs((double)b->down.b[j]) : 0.0;

            for (int64_t k = 0; k < inter; k++) {
                double w = (double)b->down.w[j * inter + k];

                acc += h[k] * w;
                m += fabs(h[k] * w) + fabs(w) * mh[k];
            }
            want[i * hidden + j] = acc;
            mag[i * hidden + j] = m;
        }
    }
    free(u), free(mu), free(g), free(mg), free(h), free(mh);
}

void ref_block_free(struct ref_block *b)
{
    ref_layer_free(&b->gate);
    ref_layer_free(&b->up);
    ref_layer_free(&b->down);
}

void ref_compare(const float *got, const double *want, const double *mag, size_t n,
                 struct ref_stats *s)
{
    *s = (struct ref_stats){.worst = -1};
    for (size_t i = 0; i < n; i++) {
        double d, rel;

        if (!isfinite(got[i])) {
            s->nonfinite++;
            s->max_abs = s->max_rel = INFINITY;
            s->worst = (int64_t)i;
            continue;
        }
        d = fabs((double)got[i] - want[i]);
        rel = mag[i] > 0 ? d / mag[i] : (d == 0 ? 0 : INFINITY);
        if (d > s->max_abs)
            s->max_abs = d;
        if (s->worst < 0 || rel > s->max_rel) {
            s->max_rel = rel;
            s->worst = (int64_t)i;
        }
    }
}
