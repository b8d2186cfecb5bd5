/* npy.h -- NumPy's .npy format (versions 1.0, 2.0 and 3.0), as tpclient reads inputs and writes
 * outputs. Little-endian float arrays are loaded: float32 ('<f4'), float16 ('<f2'), float64
 * ('<f8') and bfloat16, in C or Fortran order; everything else (big-endian, integers, structured
 * dtypes) is rejected with a message naming the descr found. The header is a Python dict
 * literal, parsed here by a small strict parser (keys 'descr', 'fortran_order', 'shape').
 *
 * NumPy has no bfloat16 of its own. An array of ml_dtypes.bfloat16 (the type tritonclient and
 * JAX use) is saved by np.save with the descr '<V2', and the same bit patterns viewed as 'V2' in
 * plain NumPy with '|V2': so a 2-byte void descr, '<V2' or '|V2', is taken here as bfloat16,
 * because that is what ml_dtypes writes; no other 2-byte void array is worth reading as floats. */
#ifndef TP_NPY_H
#define TP_NPY_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"
#include "tensor.h"

/* Caps on what a file may claim, checked before anything is allocated. */
#define NPY_MAX_HEADER (1u << 20) /* bytes of header dict */
#define NPY_MAX_DATA (4ull << 30) /* bytes of array data */

struct npy_info {
    enum tp_dtype dtype; /* TP_F32, TP_F16, TP_BF16 ('<V2' or '|V2') or TP_F64 */
    char descr[8];       /* the descr as the header spells it, e.g. "<f4" or "|V2" */
    int fortran_order;   /* 1: the file's data is column-major; npy_load_f32 returns C order */
    int ndim;            /* 0..TP_MAX_DIMS */
    int64_t shape[TP_MAX_DIMS];
    uint64_t count;     /* elements: product of shape */
    size_t data_offset; /* bytes from file start to the first element */
};

/* Parses the preamble and header dict at buf (len bytes: the start of a file, at least the whole
 * header). Fills info on success. Errors (TP_EINVAL): bad magic, unknown version, header length
 * past len or over NPY_MAX_HEADER, malformed dict, big-endian or unsupported descr (the message
 * names it), negative or overflowing shape. Never reads outside [buf, buf+len). */
int npy_parse_header(const void *buf, size_t len, struct npy_info *info, struct tp_err *err);

/* Loads a whole .npy file as float32, in C order: F16 and BF16 are widened exactly, F64 is
 * rounded to nearest, and a Fortran-order array is transposed (info->shape is the array's shape
 * either way, info->fortran_order says which order the file had). On success *data is a malloc'd
 * array of info->count floats owned by the caller. Fails if the file is shorter or longer than the
 * header says. On failure *data is NULL. */
int npy_load_f32(const char *path, float **data, struct npy_info *info, struct tp_err *err);

/* Writes a float32 array as .npy version 1.0 ('<f4', C order). The file is written to a temporary
 * name beside path and renamed, so a reader never sees half a file. */
int npy_save_f32(const char *path, const float *data, int ndim, const int64_t *shape,
                 struct tp_err *err);

/* The same for float16 elements (IEEE binary16 bit patterns, '<f2'). */
int npy_save_f16(const char *path, const uint16_t *data, int ndim, const int64_t *shape,
                 struct tp_err *err);

#endif
