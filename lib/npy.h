/* npy.h -- NumPy's .npy format (versions 1.0, 2.0 and 3.0), as tpclient reads inputs and writes
 * outputs. Only little-endian float32/float16/float64 arrays in C order are loaded; everything
 * else is rejected with a message naming what was found. The header is a Python dict literal,
 * parsed here by a small strict parser (keys 'descr', 'fortran_order', 'shape'). */
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
    enum tp_dtype dtype; /* TP_F32, TP_F16 or TP_F64 */
    int ndim;            /* 0..TP_MAX_DIMS */
    int64_t shape[TP_MAX_DIMS];
    uint64_t count;     /* elements: product of shape */
    size_t data_offset; /* bytes from file start to the first element */
};

/* Parses the preamble and header dict at buf (len bytes: the start of a file, at least the whole
 * header). Fills info on success. Errors (TP_EINVAL): bad magic, unknown version, header length
 * past len or over NPY_MAX_HEADER, malformed dict, big-endian or unsupported descr, fortran_order
 * True, negative or overflowing shape. Never reads outside [buf, buf+len). */
int npy_parse_header(const void *buf, size_t len, struct npy_info *info, struct tp_err *err);

/* Loads a whole .npy file as float32 (F16 and F64 are converted). On success *data is a malloc'd
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
