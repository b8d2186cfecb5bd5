/* sched.h -- the scheduler between the gRPC handlers and the worker group: it owns the arena's
 * slots. A request gets a free slot at once or waits in a bounded FIFO queue; its input is copied
 * into the slot, the job goes to every rank (sup_dispatch), and when the last rank is done the
 * request's complete callback reads its rows straight from the slot's output. Then the slot
 * passes to the next request in the queue. */
#ifndef TPD_SCHED_H
#define TPD_SCHED_H

#include <stdint.h>

#include "err.h"
#include "shm.h"
#include "sup.h"

struct sched;
struct sched_req;

/* y: [rows, out] in the slot, valid only during the call; NULL when err is set. Any thread. */
typedef void (*sched_complete_fn)(struct sched_req *r, const float *y, const struct tp_err *err);

struct sched_req {
    const float *x; /* [rows, in]; must stay valid until complete is called */
    uint32_t rows;
    sched_complete_fn complete;
    /* owned by the scheduler */
    uint32_t slot;
    uint64_t id;
    struct sched_req *next;
};

/* Creates a scheduler over the arena (borrowed). Not ready until sched_set_ready(…, 1). */
int sched_create(struct sched **s, struct shm_arena *arena, uint32_t max_queue, struct tp_err *err);

/* Connects the supervisor whose jobs this scheduler dispatches (borrowed). */
void sched_attach(struct sched *s, struct sup *sup);

/* Takes a request. Returns -1 (and never calls complete) when not ready (TP_EUNAVAIL) or when
 * the queue is full (TP_EBUSY); otherwise complete will be called exactly once. */
int sched_submit(struct sched *s, struct sched_req *r, struct tp_err *err);

/* sup_done_fn and sup_state_fn for the supervisor. Becoming not ready fails queued requests. */
void sched_on_done(void *ctx, uint32_t slot, uint64_t id, const struct tp_err *err);
void sched_on_state(void *ctx, int ready);

int sched_ready(struct sched *s);

/* Requests waiting or running. */
uint32_t sched_busy(struct sched *s);

/* Takes NULL. The caller guarantees no request is running. */
void sched_destroy(struct sched *s);

#endif
