/* sched.h -- the scheduler between the gRPC handlers and the worker group: it owns the arena's
 * slots and forms batches. Requests wait in a bounded FIFO queue; the scheduler's own thread takes
 * as many as fit into max_batch rows, copies each one's rows into one free slot at its own row
 * offset (the request's fill callback), sends one job for all the rows to every rank
 * (sup_dispatch), and when the last rank is done hands each request its own rows of the slot's
 * output (its complete callback). While jobs compute, a batch that is not full gathers requests:
 * as long as two jobs are already with the workers, else up to the batch delay from its oldest
 * request's arrival; a request that finds the server idle starts at once. A slot is reused only
 * after every request of its batch has released its rows (sched_unhold), so a reply can be sent
 * straight from the slot without copying it first; but never from the last slot not lent out
 * (sched_req.keep), so clients that never take their replies cannot hold every slot. The queue is
 * bounded in requests and in the bytes its requests hold; after a burst that filled half of the
 * byte bound, once the scheduler idles, it gives the freed memory back to the system (malloc_trim),
 * which tpd otherwise keeps on purpose for the next large message. */
#ifndef TPD_SCHED_H
#define TPD_SCHED_H

#include <stdint.h>

#include "err.h"
#include "shm.h"
#include "sup.h"

struct sched;
struct sched_req;
struct sched_slot;

/* Copies the request's rows ([rows, in] floats) to x, which lies in the slot's input. Runs on the
 * scheduler's thread, once, before the job is sent. */
typedef void (*sched_fill_fn)(struct sched_req *r, float *x);

/* Called exactly once per accepted request, from any thread. On success err is NULL and y is the
 * request's [rows, out] output in the slot; it stays valid, and the slot stays the request's,
 * until sched_unhold(r->hold), which the callee must call exactly once (at once or later, from
 * any thread). r->keep says whether it may be later: 0 when the slot would be the last one not
 * lent out, and a reply whose client does not read it could then stall every job; the callee
 * then copies what it needs and releases the slot before anything waits on its client. On
 * failure y is NULL, err says why, and there is nothing to release. */
typedef void (*sched_complete_fn)(struct sched_req *r, const float *y, const struct tp_err *err);

struct sched_req {
    uint32_t rows;
    uint64_t bytes;      /* memory the request holds while it waits (its received message) */
    int64_t deadline_ns; /* CLOCK_MONOTONIC ns after which the request is dropped if not started;
                            INT64_MAX for none */
    sched_fill_fn fill;
    sched_complete_fn complete;
    /* owned by the scheduler */
    struct sched_slot *hold; /* set before a successful complete */
    int keep;                /* with it: the slot may stay held after complete returns */
    int state;
    uint32_t row0;  /* first row in the slot */
    int64_t enq_ns; /* when it was queued, CLOCK_MONOTONIC ns */
    struct sched_req *next;
};

struct sched_config {
    uint32_t max_queue;       /* requests waiting; beyond it TP_EBUSY */
    uint64_t max_queue_bytes; /* bytes of the requests waiting; beyond it TP_EBUSY (a request
                                 that finds the queue empty is always taken); 0: no bound */
    uint32_t batch_delay_us;  /* once the workers are free, a batch waits for more until its oldest
                                 request is this old; 0: batching off, one request per job */
};

/* Counters since start, for logs and metrics. */
struct sched_stats {
    uint64_t batches;          /* jobs sent */
    uint64_t requests;         /* requests in those jobs */
    uint64_t rows;             /* rows in those jobs */
    uint64_t multi;            /* jobs that carried more than one request */
    uint32_t max_reqs;         /* most requests in one job */
    uint64_t expired;          /* dropped with TP_ETIMEDOUT before they started */
    uint64_t cancelled;        /* cancelled by their client (queued or running) */
    uint64_t refused;          /* refused with TP_EBUSY: the queue was full, in requests or bytes */
    uint64_t max_queued_bytes; /* most bytes the queue held at once */
    uint64_t trims;            /* times memory was given back after a burst */
    uint64_t unlent;           /* requests told to copy: every other slot was lent out */
    /* jobs by the requests in them: [0] 1, [1] 2-3, [2] 4-7, ..., [7] 128 or more */
    uint64_t by_reqs[8];
};

/* Creates a scheduler over the arena (borrowed) and starts its thread. Not ready until
 * sched_set_ready(…, 1). */
int sched_create(struct sched **s, struct shm_arena *arena, const struct sched_config *c,
                 struct tp_err *err);

/* Connects the supervisor whose jobs this scheduler dispatches (borrowed); the arena's slots are
 * slot0 and up in the supervisor's numbering of all models' slots. */
void sched_attach(struct sched *s, struct sup *sup, uint32_t slot0);

/* Takes a request (r stays the caller's memory, and must stay valid until complete was called and,
 * after that, until any sched_cancel for it has returned). Returns -1 (and never calls complete)
 * when not ready (TP_EUNAVAIL), when the queue is full in requests or in bytes (TP_EBUSY) or when
 * the deadline has already passed (TP_ETIMEDOUT); otherwise complete will be called exactly
 * once. r->bytes count against the byte bound while r waits in the queue. */
int sched_submit(struct sched *s, struct sched_req *r, struct tp_err *err);

/* The client of r is gone. A queued request leaves the queue at once and completes with an
 * error; a running one completes with an error when its job ends (its result is dropped); a
 * completed one is left alone. Any thread. */
void sched_cancel(struct sched *s, struct sched_req *r);

/* The slot of the rows that a successful complete lent, in the supervisor's numbering (for
 * per-slot job metrics). */
uint32_t sched_slot_index(const struct sched_slot *hold);

/* Releases the rows that a successful complete lent. Any thread; never blocks for long. */
void sched_unhold(struct sched_slot *hold);

/* sup_done_fn and sup_state_fn for the supervisor. Becoming not ready fails queued requests. */
void sched_on_done(void *ctx, uint32_t slot, uint64_t id, const struct tp_err *err);
void sched_on_state(void *ctx, int ready);

/* fn(ctx) after every sched_on_state, on the thread that called it (the supervisor's), without
 * the scheduler's lock: for grpc.health.v1 Watch. Set once, before the supervisor starts. */
void sched_set_state_listener(struct sched *s, void (*fn)(void *ctx), void *ctx);

int sched_ready(struct sched *s);

/* Requests waiting or running. */
uint32_t sched_busy(struct sched *s);

/* 1 when no request waits or runs and no reply holds a slot: every request taken has been
 * answered, and nothing points into the arena. */
int sched_idle(struct sched *s);

void sched_get_stats(struct sched *s, struct sched_stats *st);

/* Requests accepted and waiting for a job: what Triton's pending count counts (awaiting
 * execution). ctx is the scheduler (a metrics_pending_fn). */
uint32_t sched_pending(void *ctx);

/* Stops the thread and frees everything. Takes NULL. The caller guarantees that no request will
 * be submitted or is running; it waits (a little) for replies that still hold slots. */
void sched_destroy(struct sched *s);

#endif
