/* err.h -- the one error type of tpd. Every function that can fail returns int (0 ok, -1 failed)
 * and takes `struct tp_err *err` last. The first error is the most specific: callers prepend
 * context with tp_err_prefix and never overwrite. A message is one line, lower case, with no
 * final period; it travels unchanged from a worker to the client. */
#ifndef TP_ERR_H
#define TP_ERR_H

#include <stdarg.h>

/* code, name, gRPC status code (grpc/status.h numbering) */
#define TP_ERR_MAP(X)                                                                              \
    X(TP_OK, "ok", 0)                                                                              \
    X(TP_EINVAL, "invalid argument", 3)                                                            \
    X(TP_ENOTFOUND, "not found", 5)                                                                \
    X(TP_EUNAVAIL, "unavailable", 14)                                                              \
    X(TP_EBUSY, "resource exhausted", 8)                                                           \
    X(TP_ETIMEDOUT, "deadline exceeded", 4)                                                        \
    X(TP_ENOMEM, "out of memory", 8)                                                               \
    X(TP_ESYS, "system error", 13)                                                                 \
    X(TP_EDEVICE, "device error", 13)                                                              \
    X(TP_EINTERNAL, "internal error", 13)

enum tp_code {
#define TP_ERR_ENUM(code, name, grpc) code,
    TP_ERR_MAP(TP_ERR_ENUM)
#undef TP_ERR_ENUM
        TP_ERR_COUNT
};

struct tp_err {
    enum tp_code code;
    char msg[256];
};

/* Sets code and message (printf format). Returns -1 so that `return tp_err_set(...)` reads well. */
int tp_err_set(struct tp_err *err, enum tp_code code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Like tp_err_set with TP_ESYS, appending ": strerror(errno)". Reads errno before anything else. */
int tp_err_sys(struct tp_err *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Prepends context to an error already set: "loading x.safetensors: " + old message. */
void tp_err_prefix(struct tp_err *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Name of a code ("invalid argument"), its gRPC status number, and the code for a gRPC status. */
const char *tp_code_name(enum tp_code code);
int tp_code_grpc(enum tp_code code);

#endif
