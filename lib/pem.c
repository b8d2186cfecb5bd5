/* pem.c -- PEM files read whole (see pem.h). The content is not parsed here: gRPC (BoringSSL or
 * OpenSSL underneath) does that; this only makes sure a wrong path or a wrong file is reported
 * with its name instead of as a handshake failure later. */
#include "pem.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int pem_read(const char *path, char **text, struct tp_err *err)
{
    struct stat st;
    char *buf = NULL;
    size_t done = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK); /* a FIFO is refused, not waited on */

    *text = NULL;
    if (fd < 0 || fstat(fd, &st) < 0) {
        tp_err_sys(err, "reading %s", path);
        goto fail;
    }
    if (!S_ISREG(st.st_mode) || st.st_size > PEM_MAX_FILE) {
        tp_err_set(err, TP_EINVAL, "%s is not a PEM file (%s)", path,
                   S_ISREG(st.st_mode) ? "over 1 MiB" : "not a regular file");
        goto fail;
    }
    buf = malloc((size_t)st.st_size + 1);
    if (!buf) {
        tp_err_set(err, TP_ENOMEM, "no memory to read %s", path);
        goto fail;
    }
    while (done < (size_t)st.st_size) {
        ssize_t r = read(fd, buf + done, (size_t)st.st_size - done);

        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            tp_err_sys(err, "reading %s", path);
            goto fail;
        }
        if (r == 0)
            break;
        done += (size_t)r;
    }
    buf[done] = '\0';
    if (memchr(buf, '\0', done) || !strstr(buf, "-----BEGIN ")) {
        tp_err_set(err, TP_EINVAL, "%s is not a PEM file (no '-----BEGIN ' line)", path);
        goto fail;
    }
    close(fd);
    *text = buf;
    return 0;
fail:
    free(buf);
    if (fd >= 0)
        close(fd);
    return -1;
}
