/* models.h -- the layer the request targets (fuzz_infer, fuzz_rest) check requests against. */
#ifndef TP_FUZZ_MODELS_H
#define TP_FUZZ_MODELS_H

#include "model.h"

/* the same layer with FP32 and with FP16 on the wire: the byte counts differ */
static const struct model models[2] = {{.name = "lin",
                                        .in = 3,
                                        .out = 2,
                                        .wdtype = TP_F32,
                                        .io_dtype = TP_F32,
                                        .gemm_dtype = TP_F32,
                                        .has_bias = 1,
                                        .ranks = 2,
                                        .backend = "cpu",
                                        .max_batch = 4},
                                       {.name = "lin",
                                        .in = 3,
                                        .out = 2,
                                        .wdtype = TP_F32,
                                        .io_dtype = TP_F16,
                                        .gemm_dtype = TP_F32,
                                        .has_bias = 1,
                                        .ranks = 2,
                                        .backend = "cpu",
                                        .max_batch = 4}};

#endif
