/* fileio.h -- reading exact byte ranges of files, for the file-format readers (npy, safetensors).
 * A short read is never returned: an early end of file is an error that says where. */
#ifndef TP_FILEIO_H
#define TP_FILEIO_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"
#include "tensor.h"

/* Reads exactly n bytes at offset off. EINTR is retried. */
int fileio_pread_full(int fd, void *buf, size_t n, uint64_t off, struct tp_err *err);

/* Reads n little-endian elements of type t at off into dst as float32. F32 goes straight into
 * dst; other types pass through a bounded buffer (1 MiB), so a large F16 or BF16 range is never
 * held twice in memory. */
int fileio_read_f32(int fd, uint64_t off, uint64_t n, enum tp_dtype t, float *dst,
                    struct tp_err *err);

#endif
