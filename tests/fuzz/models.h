/* models.h -- the layer the request targets (fuzz_infer, fuzz_rest) check requests against. */
#ifndef TP_FUZZ_MODELS_H
#define TP_FUZZ_MODELS_H

#include "layer.h"

/* the same layer with FP32 and with FP16 on the wire: the byte counts differ */
static const struct model models[2] = {TEST_LAYER(TP_F32), TEST_LAYER(TP_F16)};

#endif
