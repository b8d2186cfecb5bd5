/* infer.h -- checking a ModelInfer request against the model and building its response. Pure
 * functions of their arguments, so every rule is unit-tested without a server. */
#ifndef TPD_INFER_H
#define TPD_INFER_H

#include <grpc/byte_buffer.h>

#include "err.h"
#include "grpc_service.pb-c.h"
#include "model.h"

struct infer_input {
    uint32_t rows;  /* batch rows */
    const float *x; /* [rows, in], points into the request message */
};

/* Accepts the model's name with version "" or MODEL_VERSION; TP_ENOTFOUND otherwise. */
int infer_check_model(const struct model *m, const char *name, const char *version,
                      struct tp_err *err);

/* Accepts exactly one input named MODEL_INPUT, datatype FP32, shape [B, in] with
 * 1 <= B <= max_batch, data in raw_input_contents[0] (exactly B*in*4 bytes) or in
 * contents.fp32_contents (exactly B*in values), for model m (version "" or MODEL_VERSION);
 * requested outputs, if any, must be MODEL_OUTPUT. Errors: TP_ENOTFOUND for the model or version,
 * TP_EINVAL for the rest, each saying what was expected and what came. */
int infer_validate(const struct model *m, const Inference__ModelInferRequest *r,
                   struct infer_input *in, struct tp_err *err);

/* The response for rows of y ([rows, out] float32): echoes the request's id, names the output,
 * datatype FP32, shape [rows, out], data in raw_output_contents. NULL when memory runs out. */
grpc_byte_buffer *infer_response(const struct model *m, const Inference__ModelInferRequest *r,
                                 const float *y, uint32_t rows);

#endif
