/* ref.h -- the CPU reference for y = x·Wᵀ + b and for MLP blocks: plain loops, double
 * accumulation, written from the formulas without reading the worker's code. The tests and `tpclient forward --verify` use it to judge every
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

/* The activations by their PyTorch definitions, in double. */
enum ref_act { REF_SILU, REF_GELU, REF_GELU_TANH, REF_RELU };

/* An MLP block. gated: y = down(act(gate(x)) · up(x)); otherwise y = down(act(up(x))) (GPT-2's
 * proj(act(fc(x))): up is fc, down is proj, gate unused). Each layer [out, in] with its bias. */
struct ref_block {
    int gated;
    enum ref_act act;
    struct ref_layer gate, up, down;
};

/* want and mag receive [batch, down.out] doubles. mag is the first-order scale of a float32
 * computation's error: the down layer's own Σ|h·w| + |b|, plus each intermediate's error scale
 * (its layers' Σ|x·w| + |b| carried through the activation's derivative, and |h| for the
 * activation's and product's own rounding) times |w| of down. */
void ref_block(const struct ref_block *b, const float *x, int64_t batch, double *want, double *mag);

void ref_block_free(struct ref_block *b);

/* Compares n floats against the reference. */
void ref_compare(const float *got, const double *want, const double *mag, size_t n,
                 struct ref_stats *s);

#endif
