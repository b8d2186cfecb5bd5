/* tensor.h -- element types and their conversions, shared by the file readers, the worker and
 * the client. Wire names follow the KServe v2 protocol ("FP32"), file names follow safetensors
 * ("F32"). Half-precision values are converted exactly to float (every F16 and BF16 value is
 * representable in FP32). */
#ifndef TP_TENSOR_H
#define TP_TENSOR_H

#include <stddef.h>
#include <stdint.h>

enum tp_dtype {
    TP_DTYPE_INVALID = 0,
    TP_F32,
    TP_F16,
    TP_BF16,
    TP_F64,
};

#define TP_MAX_DIMS 8

/* Bytes per element; 0 for TP_DTYPE_INVALID. */
size_t tp_dtype_size(enum tp_dtype t);

/* "F32", "F16", "BF16", "F64" (safetensors spelling) and "FP32", "FP16", "BF16", "FP64" (KServe v2
 * spelling); "?" for an invalid type. The parsers return TP_DTYPE_INVALID for unknown names. */
const char *tp_dtype_file_name(enum tp_dtype t);
const char *tp_dtype_wire_name(enum tp_dtype t);
enum tp_dtype tp_dtype_from_file_name(const char *name);
enum tp_dtype tp_dtype_from_wire_name(const char *name);

float tp_f16_to_f32(uint16_t h);
float tp_bf16_to_f32(uint16_t h);

/* Converts n little-endian elements of type t at src into floats at dst (F64 is rounded).
 * src and dst may not overlap. */
void tp_convert_to_f32(float *dst, const void *src, size_t n, enum tp_dtype t);

/* Product of dims into *count, failing (returns -1) when a dim is negative or the product, times
 * elem_size, exceeds limit bytes. Overflow-safe; used on shapes read from files and requests. */
int tp_shape_count(const int64_t *dims, int ndim, size_t elem_size, uint64_t limit,
                   uint64_t *count);

#endif
