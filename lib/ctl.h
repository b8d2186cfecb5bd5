/* ctl.h -- the control messages between the coordinator and a worker. One socketpair
 * (AF_UNIX, SOCK_SEQPACKET) per worker carries fixed-size, versioned messages, one per
 * datagram; the activations themselves travel through the shared-memory arena (shm.h).
 *
 *   coordinator -> worker  PLAN   first, at every start: the layer's plan (plan.h), a datagram of
 *                                 its own size, which the worker checks against its files
 *   coordinator -> worker  INIT   right after the PLAN of a GPU worker that gathers with NCCL:
 *                                 the communicator's unique id (the coordinator made it and
 *                                 hosts its bootstrap root)
 *   worker -> coordinator  READY  once its shard is loaded (status, error text on failure)
 *   coordinator -> worker  JOB    compute rows of a slot: id, slot, rows
 *   worker -> coordinator  DONE   id, slot, status and error text, and the collectives the
 *                                 job ran (an all-reduce of a block, an NCCL all-gather)
 *   coordinator -> worker  STOP   the coordinator is stopping: finish, tear down and exit; the
 *                                 coordinator closes its end next and waits for the exit
 *
 * EOF is how either side learns that the other is gone. A worker tells the two endings apart:
 * after STOP it exits in order, while EOF without STOP means that the coordinator died, and the
 * worker leaves at once with _exit (worker/main.c says why). */
#ifndef TP_CTL_H
#define TP_CTL_H

#include <stdint.h>

#include "err.h"
#include "plan.h"

#define CTL_MAGIC 0x74706431u /* "tpd1" */
#define CTL_VERSION 5 /* 5: blocks in the PLAN, collectives in DONE; 4: PLAN; 3: STOP, and EOF
                       * without it means the coordinator died */
#define CTL_MAX_COLLECTIVES 8 /* the most a DONE may report */
#define CTL_NCCL_ID_BYTES 128 /* NCCL_UNIQUE_ID_BYTES */

enum ctl_type {
    CTL_READY = 1,
    CTL_JOB = 2,
    CTL_DONE = 3,
    CTL_INIT = 4,
    CTL_STOP = 5,
    CTL_PLAN = 6, /* struct plan, not struct ctl_msg */
};

struct ctl_msg {
    uint32_t magic;                     /* CTL_MAGIC */
    uint16_t version;                   /* CTL_VERSION */
    uint16_t type;                      /* enum ctl_type */
    uint64_t id;                        /* job id, echoed by DONE */
    uint32_t slot;                      /* arena slot */
    uint32_t rows;                      /* rows of the slot's input to compute */
    int32_t status;                     /* enum tp_code; TP_OK on success */
    uint32_t rank;                      /* sender's rank (READY, DONE) */
    uint64_t bytes;                     /* READY: bytes of weights and bias read from the files;
                                         * DONE: collectives the job ran */
    char text[256];                     /* NUL-terminated error message when status != TP_OK */
    uint8_t nccl_id[CTL_NCCL_ID_BYTES]; /* INIT: ncclUniqueId, opaque bytes */
};

_Static_assert(sizeof(struct ctl_msg) == 424, "ctl_msg is a wire format");

/* Sends one message (fills magic and version). EINTR is retried. Fails with TP_EUNAVAIL when the
 * peer is gone (EPIPE, ECONNRESET), TP_ESYS otherwise. Never raises SIGPIPE. */
int ctl_send(int fd, struct ctl_msg *m, struct tp_err *err);

/* Receives one message. Returns 1 with *m filled, 0 on EOF (peer gone), -1 on error. */
int ctl_recv(int fd, struct ctl_msg *m, struct tp_err *err);

/* Sends the plan (fills its type) / receives one and checks it with plan_validate: 1, 0 on EOF,
 * -1 on error. */
int ctl_send_plan(int fd, struct plan *p, struct tp_err *err);
int ctl_recv_plan(int fd, struct plan *p, struct tp_err *err);

/* Checks a message that came from outside this process: magic, version, known type, a
 * NUL-terminated text, slot < nslots for JOB and DONE and 1 <= rows <= max_batch for JOB (READY,
 * INIT and STOP carry no slot), at most CTL_MAX_COLLECTIVES for DONE. Returns -1 with a message naming the bad field. Exposed for tests
 * and fuzzing. */
int ctl_validate(const struct ctl_msg *m, uint32_t nslots, uint32_t max_batch, struct tp_err *err);

#endif
