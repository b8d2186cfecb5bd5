/* ncclid.h -- the NCCL unique id of a worker group, made by the coordinator. ncclGetUniqueId
 * needs no GPU; it also starts the communicator's bootstrap root in this process, so the
 * coordinator must stay alive while the workers create their communicator (it does: it
 * supervises them). NCCL is loaded at the first id (dlopen), so tpd needs it only for
 * --gather nccl. Without NCCL's header at build time, tpd refuses --gather nccl. */
#ifndef TPD_NCCLID_H
#define TPD_NCCLID_H

#include <stdint.h>

#include "ctl.h"
#include "err.h"

/* 1 when this tpd was built with NCCL's header (whether the library loads shows at the first
 * ncclid_make). */
int ncclid_available(void);

/* Makes a fresh unique id into id (one per group start: a communicator cannot be rejoined),
 * loading NCCL the first time; TP_ENOTFOUND, saying where it looked, when it cannot. Safe to
 * call from any thread. */
int ncclid_make(uint8_t id[CTL_NCCL_ID_BYTES], struct tp_err *err);

#endif
