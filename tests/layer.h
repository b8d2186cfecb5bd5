/* layer.h -- the small layer the unit tests and fuzz targets check requests against: in 3, out
 * 2, FP32 weights with a bias, 2 cpu ranks, at most 4 rows; IO is its datatype on the wire. */
#ifndef TP_TEST_LAYER_H
#define TP_TEST_LAYER_H

#include "model.h"

#define TEST_LAYER(IO)                                                                           \
    {                                                                                            \
        .name = "lin", .in = 3, .out = 2, .wdtype = TP_F32, .io_dtype = (IO),                    \
        .gemm_dtype = TP_F32, .has_bias = 1, .ranks = 2, .backend = "cpu", .max_batch = 4        \
    }

#endif
