/* kserve.h -- the KServe v2 calls tpclient's commands share: the model's layout from
 * ModelMetadata, and one ModelInfer of float32 rows. */
#ifndef TPC_KSERVE_H
#define TPC_KSERVE_H

#include <stddef.h>
#include <stdint.h>

#include "conn.h"

struct kserve_layout {
    int64_t in;        /* input features */
    int64_t out;       /* output features */
    int64_t max_batch; /* rows per request the server takes; 0 when it does not say */
};

/* The model to use: opt when given, else the server's one model (RepositoryIndex). */
int kserve_model(struct conn *c, const char *opt, char *buf, size_t len, struct tp_err *err);

/* Reads the layout of model; fails unless it is one FP32 [-1, in] -> [-1, out] tensor pair. */
int kserve_layout(struct conn *c, const char *model, struct kserve_layout *l, struct tp_err *err);

/* One ModelInfer of rows of x ([rows, in] float32); writes [rows, out] floats to y after checking
 * the response's datatype, shape and size. */
int kserve_infer(struct conn *c, const char *model, const struct kserve_layout *l, const float *x,
                 int64_t rows, float *y, struct tp_err *err);

#endif
