/* fileio.c -- exact reads of byte ranges (see fileio.h). */
#include "fileio.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <unistd.h>

#define CHUNK (1u << 20) /* bytes of the conversion buffer */

int fileio_pread_full(int fd, void *buf, size_t n, uint64_t off, struct tp_err *err)
{
    size_t done = 0;

    while (done < n) {
        ssize_t r = pread(fd, (char *)buf + done, n - done, (off_t)(off + done));

        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return tp_err_sys(err, "reading %zu bytes at offset %" PRIu64, n - done, off + done);
        if (r == 0)
            return tp_err_set(err, TP_EINVAL,
                              "unexpected end of file at offset %" PRIu64
                              " (%zu more bytes expected)",
                              off + done, n - done);
        done += (size_t)r;
    }
    return 0;
}

int fileio_read_f32(int fd, uint64_t off, uint64_t n, enum tp_dtype t, float *dst,
                    struct tp_err *err)
{
    size_t es = tp_dtype_size(t), per = CHUNK / es;
    unsigned char *raw;

    if (n == 0)
        return 0;
    if (t == TP_F32)
        return fileio_pread_full(fd, dst, (size_t)n * 4, off, err);
    raw = malloc(n < per ? (size_t)n * es : CHUNK);
    if (!raw)
        return tp_err_set(err, TP_ENOMEM, "no memory for a read buffer");
    for (uint64_t i = 0; i < n; i += per) {
        size_t k = n - i < per ? (size_t)(n - i) : per;

        if (fileio_pread_full(fd, raw, k * es, off + i * es, err) < 0) {
            free(raw);
            return -1;
        }
        tp_convert_to_f32(dst + i, raw, k, t);
    }
    free(raw);
    return 0;
}
