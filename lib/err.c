/* err.c -- formatting of struct tp_err (see err.h). Messages are truncated to fit, never
 * overflow; a prefix that does not fit cuts the tail of the old message, not the prefix. */
#include "err.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

int tp_err_set(struct tp_err *err, enum tp_code code, const char *fmt, ...)
{
    va_list ap;

    if (!err)
        return -1;
    err->code = code;
    va_start(ap, fmt);
    vsnprintf(err->msg, sizeof(err->msg), fmt, ap);
    va_end(ap);
    return -1;
}

int tp_err_sys(struct tp_err *err, const char *fmt, ...)
{
    int saved = errno;
    va_list ap;
    size_t n;

    if (!err)
        return -1;
    err->code = TP_ESYS;
    va_start(ap, fmt);
    vsnprintf(err->msg, sizeof(err->msg), fmt, ap);
    va_end(ap);
    n = strlen(err->msg);
    snprintf(err->msg + n, sizeof(err->msg) - n, ": %s", strerror(saved));
    errno = saved;
    return -1;
}

void tp_err_prefix(struct tp_err *err, const char *fmt, ...)
{
    char old[sizeof(err->msg)];
    va_list ap;
    int n;

    if (!err)
        return;
    memcpy(old, err->msg, sizeof(old));
    va_start(ap, fmt);
    n = vsnprintf(err->msg, sizeof(err->msg), fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof(err->msg))
        return;
    snprintf(err->msg + n, sizeof(err->msg) - (size_t)n, "%s", old);
}

const char *tp_code_name(enum tp_code code)
{
    switch (code) {
#define TP_ERR_NAME(c, name, grpc)                                                                 \
    case c: return name;
        TP_ERR_MAP(TP_ERR_NAME)
#undef TP_ERR_NAME
    default: return "unknown error";
    }
}

int tp_code_grpc(enum tp_code code)
{
    switch (code) {
#define TP_ERR_GRPC(c, name, grpc)                                                                 \
    case c: return grpc;
        TP_ERR_MAP(TP_ERR_GRPC)
#undef TP_ERR_GRPC
    default: return 13;
    }
}
