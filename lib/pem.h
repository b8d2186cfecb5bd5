/* pem.h -- reading the PEM files of TLS (certificates, private keys, CA bundles) into memory, as
 * gRPC's credential constructors want them: one NUL-terminated string. tpd and tpclient both read
 * them at start; a file that is missing, too big or not PEM fails with its path in the message. */
#ifndef TP_PEM_H
#define TP_PEM_H

#include "err.h"

#define PEM_MAX_FILE (1u << 20) /* bytes of one PEM file */

/* Reads the whole file at path into *text (malloc'd, NUL-terminated, the caller frees it). The
 * file must hold at least one "-----BEGIN " block and no NUL byte. On failure *text is NULL and
 * err names the file (TP_ESYS when it cannot be read, TP_EINVAL when it is not PEM). */
int pem_read(const char *path, char **text, struct tp_err *err);

#endif
