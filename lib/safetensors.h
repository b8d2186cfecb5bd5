/* safetensors.h -- reading tensors from a safetensors file without loading it whole: the header
 * (8-byte little-endian length, then a JSON object parsed with cJSON) is read once, and tensor
 * rows are then read with pread(2) by range, so a worker holds only its own rows of W. Every
 * offset, shape and dtype from the file is validated against the file size before use. A file
 * may hold tensors of any dtype (real checkpoints carry I64 position ids, BOOL masks, U8 or F8
 * quantisation data beside the weights): they are listed and checked like the others, and only
 * reading one that tpd cannot compute with fails. */
#ifndef TP_SAFETENSORS_H
#define TP_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"
#include "tensor.h"

#define ST_MAX_HEADER (100u << 20) /* bytes of JSON header, the format's own limit */
#define ST_MAX_TENSORS 65536
#define ST_MAX_NAME 256      /* bytes of a tensor name, with the terminating NUL */
#define ST_MAX_DTYPE_NAME 16 /* bytes of a dtype string kept, with the terminating NUL */

struct st_tensor {
    char name[ST_MAX_NAME];
    enum tp_dtype dtype; /* F32, F16, BF16 or F64; TP_DTYPE_INVALID for any other dtype, which
                            can be listed but not read */
    char dtype_name[ST_MAX_DTYPE_NAME]; /* the dtype string of the file ("I64"), of every tensor:
                                           cut to 15 bytes, control bytes as '?' */
    int ndim;
    int64_t shape[TP_MAX_DIMS];
    uint64_t begin; /* absolute file offset of the first byte */
    uint64_t end;   /* absolute file offset one past the last byte */
};

struct st_file {
    int fd;             /* -1 when closed */
    uint64_t file_size; /* bytes */
    int ntensors;
    struct st_tensor *tensors; /* ntensors entries, owned */
};

/* Parses a header: hdr is the JSON text (hdr_len bytes, not NUL-terminated), data_start the
 * absolute offset of the data section (8 + hdr_len) and file_size the size of the whole file.
 * Fills f->ntensors and f->tensors (leaves f->fd alone). Every dtype of the format is accepted
 * (BOOL, U8, I8, F8_E5M2, F8_E4M3, I16, U16, F16, BF16, I32, U32, F32, F64, I64, U64), and its
 * element size checked against the tensor's shape and byte range; any other dtype string is
 * accepted too, with only its byte range checked (its element size is unknown). Errors
 * (TP_EINVAL) name the tensor and the value: no dtype string, shape and byte range that
 * disagree, offsets outside the file, overlapping or backwards ranges (among tensors of every
 * dtype), duplicate names, too many dims or tensors, names too long. "__metadata__" is skipped.
 * f must not hold a table yet. On failure f->tensors is NULL and f->ntensors 0. Exposed for
 * tests and fuzzing; st_open calls it. */
int st_parse_header(struct st_file *f, const char *hdr, size_t hdr_len, uint64_t data_start,
                    uint64_t file_size, struct tp_err *err);

/* Opens path and reads only its header. On failure f is left closed (st_close is safe). */
int st_open(struct st_file *f, const char *path, struct tp_err *err);

/* The tensor called name, or NULL. A tensor found may have dtype TP_DTYPE_INVALID. */
const struct st_tensor *st_find(const struct st_file *f, const char *name);

/* Reads rows [row0, row0 + nrows) of a tensor (its first dim is the row dim; a 1-D tensor has
 * rows of one element) and converts them to float32 into dst, which holds nrows * row_elems
 * floats where row_elems is the product of the other dims. Reads only those bytes. Returns -1
 * (TP_EINVAL) for a tensor of dtype TP_DTYPE_INVALID ("tensor 'NAME' has dtype I64, expected
 * F32, F16, BF16 or F64"), on a range outside the tensor or a short read. *bytes_read, when not
 * NULL, gets the bytes read (0 on failure). */
int st_read_rows_f32(const struct st_file *f, const struct st_tensor *t, int64_t row0,
                     int64_t nrows, float *dst, uint64_t *bytes_read, struct tp_err *err);

/* Closes the fd and frees the table; takes NULL, a file initialised as {.fd = -1}, a file whose
 * st_open failed, and a closed file (a zeroed struct is safe too: without a table it closes
 * nothing, so fd 0 is never closed by mistake). */
void st_close(struct st_file *f);

#endif
