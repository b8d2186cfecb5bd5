/* ref.h -- the CPU reference for y = x·Wᵀ + b: plain loops, double accumulation, written without
 * reading the worker's code. The tests and `tpclient forward --verify` use it to judge every
 * answer. Alongside y it computes mag = sum_k |x_k·w_k| + |b|, the scale of the rounding error any
 * float32 GEMM may make, so that the relative error |y - ref| / mag has one meaning for every
 * shape: a float32 GEMM stays around 1e-7..1e-6, a wrong or misplaced column is near 1. */
#ifndef TP_REF_H
#define TP_REF_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"

struct ref_layer {
    int64_t out, in;
    float *w; /* [out, in], owned */
    float *b; /* [out] or NULL without bias, owned */
};

struct ref_stats {
    double max_abs;    /* max |got - want| */
    double max_rel;    /* max |got - want| / mag */
    int64_t worst;     /* flat index of the element with max_rel, -1 when none */
    int64_t nonfinite; /* elements of got that are NaN or infinite */
};

/* Loads a whole layer from a safetensors file as float32 (the client may hold the whole matrix;
 * a worker never does). bias_name NULL: use "bias" if present. Non-NULL: it must exist. */
int ref_layer_load(struct ref_layer *l, const char *path, const char *weight_name,
                   const char *bias_name, struct tp_err *err);
void ref_layer_free(struct ref_layer *l);

/* want and mag receive [batch, out] doubles. */
void ref_linear(const struct ref_layer *l, const float *x, int64_t batch, double *want,
                double *mag);

/* Compares n floats against the reference. */
void ref_compare(const float *got, const double *want, const double *mag, size_t n,
                 struct ref_stats *s);

#endif
