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
/* The value of a --dtype or --io-dtype flag: fp32, fp16 or bf16, in any case; TP_DTYPE_INVALID
 * for anything else. */
enum tp_dtype tp_dtype_from_flag(const char *flag);

float tp_f16_to_f32(uint16_t h);
float tp_bf16_to_f32(uint16_t h);

/* float to FP16 / BF16, rounding to nearest, ties to even. NaN stays NaN (quiet, sign kept),
 * infinities stay infinite; FP16 overflows to +-inf from 65520 in magnitude on and rounds into
 * its subnormals below 2^-14; BF16 has FP32's range, so only values that round past its largest
 * finite value become inf. */
uint16_t tp_f32_to_f16(float f);
uint16_t tp_f32_to_bf16(float f);

/* Converts n floats at src into little-endian elements of type t (F32, F16 or BF16) at dst.
 * dst may be src itself (in place: each element is read before its bytes are overwritten, and
 * F16/BF16 are narrower), otherwise they may not overlap. */
void tp_convert_from_f32(void *dst, const float *src, size_t n, enum tp_dtype t);

/* Converts n F16 or BF16 elements into floats in place: the elements lie in the second half of
 * the n floats' bytes at buf, i.e. at (char *)buf + 2 * n, and are widened front to back. */
void tp_widen_in_place(float *buf, size_t n, enum tp_dtype t);

/* Converts n little-endian elements of type t at src into floats at dst (F64 is rounded).
 * src and dst may not overlap. */
void tp_convert_to_f32(float *dst, const void *src, size_t n, enum tp_dtype t);

/* Product of dims into *count, failing (returns -1) when a dim is negative or the product, times
 * elem_size, exceeds limit bytes. Overflow-safe; used on shapes read from files and requests. */
int tp_shape_count(const int64_t *dims, int ndim, size_t elem_size, uint64_t limit,
                   uint64_t *count);

#endif
