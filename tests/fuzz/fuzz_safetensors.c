/* fuzz_safetensors.c -- safetensors files as tpd (header) and tpd-worker (rows) read them. The
 * input is a whole file: an 8-byte little-endian header length, the JSON header, the data. The
 * header goes to st_parse_header as st_open would hand it over; then the file is opened for real
 * and the first rows of every tensor it accepts are read, which must stay inside the file. */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fuzz.h"
#include "safetensors.h"

#define MAX_READ 4096 /* floats read per tensor */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct st_file f = {.fd = -1};
    struct tp_err err = {0};
    uint64_t hlen = 0;
    char path[64];
    int fd;

    if (size < 8)
        return 0;
    for (int i = 7; i >= 0; i--)
        hlen = hlen << 8 | data[i];
    if (hlen > size - 8)
        hlen = size - 8;
    if (st_parse_header(&f, (const char *)data + 8, (size_t)hlen, 8 + hlen, size, &err) == 0) {
        for (int i = 0; i < f.ntensors; i++)
            if (f.tensors[i].begin > f.tensors[i].end || f.tensors[i].end > size)
                abort();
        st_close(&f);
    } else if (f.tensors || f.ntensors) {
        abort();
    }

    fd = fuzz_memfile(data, size, path, sizeof(path));
    if (fd < 0)
        return 0;
    if (st_open(&f, path, &err) == 0) {
        static float dst[MAX_READ];

        for (int i = 0; i < f.ntensors; i++) {
            const struct st_tensor *t = &f.tensors[i];
            int64_t row = 1, rows;

            for (int d = 1; d < t->ndim; d++)
                row = t->shape[d] > 0 && row <= MAX_READ ? row * t->shape[d] : MAX_READ + 1;
            if (t->ndim == 0 || row > MAX_READ || row == 0)
                continue;
            rows = MAX_READ / row;
            if (rows > t->shape[0])
                rows = t->shape[0];
            st_read_rows_f32(&f, t, 0, rows, dst, NULL, &err);
        }
    }
    st_close(&f);
    close(fd);
    return 0;
}
