/* ctl.h -- the control messages between the coordinator and a worker. One socketpair
 * (AF_UNIX, SOCK_SEQPACKET) per worker carries fixed-size, versioned messages, one per
 * datagram; the activations themselves travel through the shared-memory arenas (shm.h), one per
 * model. A worker serves every model the coordinator has loaded; the slots of all the models are
 * numbered in one space, each model owning a range, so a JOB names only its slot.
 *
 *   coordinator -> worker  INIT    first, for a GPU worker that gathers with NCCL: the
 *                                  communicator's unique id (the coordinator made it and hosts
 *                                  its bootstrap root)
 *   worker -> coordinator  READY   once the worker is up (its device checked), before any model
 *                                  (status, error text on failure)
 *   coordinator -> worker  LOAD    load model id: its slots [slot, slot + bytes), at most rows
 *                                  rows a job; the datagram carries the model's arena fd
 *                                  (SCM_RIGHTS), and the model's PLAN (plan.h) follows in a
 *                                  datagram of its own size, which the worker checks against
 *                                  its files
 *   worker -> coordinator  LOADED  model id is loaded (bytes: of weights and bias read from the
 *                                  files), or could not be (status, text); the worker goes on
 *                                  serving the others either way
 *   coordinator -> worker  UNLOAD  model id has no job left: free it
 *   worker -> coordinator  UNLOADED  it is freed
 *   coordinator -> worker  JOB     compute rows of a slot: id, slot, rows
 *   worker -> coordinator  DONE    id, slot, status and error text, and the collectives the
 *                                  job ran (an all-reduce of a block, an NCCL all-gather)
 *   coordinator -> worker  STOP    the coordinator is stopping: finish, tear down and exit; the
 *                                  coordinator closes its end next and waits for the exit
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
#define CTL_VERSION 6 /* 6: many models (LOAD, LOADED, UNLOAD, UNLOADED), READY before them;
                       * 5: blocks in the PLAN, collectives in DONE; 4: PLAN; 3: STOP, and EOF
                       * without it means the coordinator died */
#define CTL_MAX_COLLECTIVES 8 /* the most a DONE may report */
#define CTL_NCCL_ID_BYTES 128 /* NCCL_UNIQUE_ID_BYTES */
#define CTL_MAX_MODELS 64     /* models a worker holds at once: ids 0 to 63 */

enum ctl_type {
    CTL_READY = 1,
    CTL_JOB = 2,
    CTL_DONE = 3,
    CTL_INIT = 4,
    CTL_STOP = 5,
    CTL_PLAN = 6, /* struct plan, not struct ctl_msg */
    CTL_LOAD = 7,
    CTL_LOADED = 8,
    CTL_UNLOAD = 9,
    CTL_UNLOADED = 10,
};

struct ctl_msg {
    uint32_t magic;                     /* CTL_MAGIC */
    uint16_t version;                   /* CTL_VERSION */
    uint16_t type;                      /* enum ctl_type */
    uint64_t id;                        /* job id, echoed by DONE; the model's id in LOAD,
                                         * LOADED, UNLOAD and UNLOADED */
    uint32_t slot;                      /* slot (JOB, DONE); the model's first slot (LOAD) */
    uint32_t rows;                      /* rows of the slot's input to compute (JOB); the most
                                         * rows of the model's jobs (LOAD) */
    int32_t status;                     /* enum tp_code; TP_OK on success */
    uint32_t rank;                      /* sender's rank (READY, DONE) */
    uint64_t bytes;                     /* LOADED: bytes of weights and bias read from the
                                         * files; DONE: collectives the job ran; LOAD: the
                                         * model's slots */
    char text[256];                     /* NUL-terminated error message when status != TP_OK */
    uint8_t nccl_id[CTL_NCCL_ID_BYTES]; /* INIT: ncclUniqueId, opaque bytes */
};

_Static_assert(sizeof(struct ctl_msg) == 424, "ctl_msg is a wire format");

/* Sends one message (fills magic and version). EINTR is retried. Fails with TP_EUNAVAIL when the
 * peer is gone (EPIPE, ECONNRESET), TP_ESYS otherwise. Never raises SIGPIPE. */
int ctl_send(int fd, struct ctl_msg *m, struct tp_err *err);

/* Receives one message. Returns 1 with *m filled, 0 on EOF (peer gone), -1 on error. A message
 * that carries a file descriptor is refused here (its fd closed): only ctl_recv_fd takes one. */
int ctl_recv(int fd, struct ctl_msg *m, struct tp_err *err);

/* ctl_send with one file descriptor passed along (SCM_RIGHTS), for LOAD; and ctl_recv that
 * takes one: *passed is the received fd (CLOEXEC; the caller owns it) or -1 when the message
 * carried none. */
int ctl_send_fd(int fd, struct ctl_msg *m, int pass, struct tp_err *err);
int ctl_recv_fd(int fd, struct ctl_msg *m, int *passed, struct tp_err *err);

/* Sends the plan (fills its type) / receives one and checks it with plan_validate: 1, 0 on EOF,
 * -1 on error. */
int ctl_send_plan(int fd, struct plan *p, struct tp_err *err);
int ctl_recv_plan(int fd, struct plan *p, struct tp_err *err);

/* Checks a message that came from outside this process: magic, version, known type, a
 * NUL-terminated text, slot < nslots for JOB and DONE and 1 <= rows <= max_batch for JOB (READY,
 * INIT and STOP carry no slot), at most CTL_MAX_COLLECTIVES for DONE, a model id below
 * CTL_MAX_MODELS for LOAD, LOADED, UNLOAD and UNLOADED, and for LOAD 1 to max_batch rows and a
 * non-empty range of slots within nslots. Returns -1 with a message naming the bad field. Exposed
 * for tests and fuzzing. */
int ctl_validate(const struct ctl_msg *m, uint32_t nslots, uint32_t max_batch, struct tp_err *err);

#endif
