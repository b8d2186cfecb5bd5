/* fuzz_npy.c -- .npy files as tpclient reads them: the header parser over the raw bytes, then the
 * whole loader over the same bytes as a file. Whatever the loader accepts must hold exactly the
 * element count its header claims, all of it readable. */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fuzz.h"
#include "npy.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct npy_info info;
    struct tp_err err = {0};
    float *x = NULL;
    char path[64];
    int fd;

    if (npy_parse_header(data, size, &info, &err) == 0) {
        if (info.data_offset > size || info.ndim < 0 || info.ndim > TP_MAX_DIMS)
            abort();
    } else if (!memchr(err.msg, '\0', sizeof(err.msg))) {
        abort();
    }
    fd = fuzz_memfile(data, size, path, sizeof(path));
    if (fd < 0)
        return 0;
    if (npy_load_f32(path, &x, &info, &err) == 0) {

        for (uint64_t i = 0; i < info.count; i++)
            fuzz_sink += x[i];
        free(x);
    } else if (x) {
        abort(); /* the contract: *data is NULL on failure */
    }
    close(fd);
    return 0;
}
