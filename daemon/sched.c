/* sched.c -- slots and the wait queue (see sched.h). The lock covers only bookkeeping; the
 * copies into a slot, the dispatch and the complete callbacks run outside it. A slot taken by a
 * request stays its own until its complete callback has returned. */
#include "sched.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

struct sched {
    struct shm_arena *arena;
    struct sup *sup;
    pthread_mutex_t lock;
    struct sched_req **slot;       /* nslots; NULL when free */
    struct sched_req *head, *tail; /* FIFO of requests waiting for a slot */
    uint32_t queued, max_queue;
    uint32_t running;
    uint64_t next_id;
    int ready;
};

int sched_create(struct sched **out, struct shm_arena *arena, uint32_t max_queue,
                 struct tp_err *err)
{
    struct sched *s = calloc(1, sizeof(*s));

    *out = NULL;
    if (!s || !(s->slot = calloc(arena->layout.nslots, sizeof(*s->slot)))) {
        free(s);
        return tp_err_set(err, TP_ENOMEM, "no memory for the scheduler");
    }
    s->arena = arena;
    s->max_queue = max_queue;
    s->next_id = 1;
    pthread_mutex_init(&s->lock, NULL);
    *out = s;
    return 0;
}

void sched_attach(struct sched *s, struct sup *sup)
{
    s->sup = sup;
}

/* Frees a slot and hands it to the first waiting request, which is returned (or NULL). */
static struct sched_req *release_slot(struct sched *s, uint32_t slot)
{
    struct sched_req *next;

    pthread_mutex_lock(&s->lock);
    s->slot[slot] = NULL;
    s->running--;
    next = s->head;
    if (next) {
        s->head = next->next;
        if (!s->head)
            s->tail = NULL;
        s->queued--;
        s->slot[slot] = next;
        next->slot = slot;
        s->running++;
    }
    pthread_mutex_unlock(&s->lock);
    return next;
}

/* Copies r's input into its slot and sends the job. When the group cannot take it, r fails at
 * once and its slot goes to the next request, and so on. */
static void start(struct sched *s, struct sched_req *r)
{
    while (r) {
        struct tp_err err = {0};
        uint32_t slot = r->slot;

        memcpy(shm_slot_input(s->arena, slot), r->x,
               (size_t)r->rows * s->arena->layout.in * sizeof(float));
        if (sup_dispatch(s->sup, slot, r->id, r->rows, &err) == 0)
            return;
        r->complete(r, NULL, &err);
        r = release_slot(s, slot);
    }
}

int sched_submit(struct sched *s, struct sched_req *r, struct tp_err *err)
{
    pthread_mutex_lock(&s->lock);
    if (!s->ready) {
        pthread_mutex_unlock(&s->lock);
        return tp_err_set(err, TP_EUNAVAIL, "server is not ready: workers are (re)starting");
    }
    r->id = s->next_id++;
    r->next = NULL;
    for (uint32_t i = 0; i < s->arena->layout.nslots; i++) {
        if (!s->slot[i]) {
            s->slot[i] = r;
            r->slot = i;
            s->running++;
            pthread_mutex_unlock(&s->lock);
            start(s, r);
            return 0;
        }
    }
    if (s->queued >= s->max_queue) {
        pthread_mutex_unlock(&s->lock);
        return tp_err_set(err, TP_EBUSY, "queue full: %u requests waiting (--max-queue %u)",
                          s->queued, s->max_queue);
    }
    if (s->tail)
        s->tail->next = r;
    else
        s->head = r;
    s->tail = r;
    s->queued++;
    pthread_mutex_unlock(&s->lock);
    return 0;
}

void sched_on_done(void *ctx, uint32_t slot, uint64_t id, const struct tp_err *err)
{
    struct sched *s = ctx;
    struct sched_req *r;

    pthread_mutex_lock(&s->lock);
    r = slot < s->arena->layout.nslots ? s->slot[slot] : NULL;
    pthread_mutex_unlock(&s->lock);
    if (!r || r->id != id)
        return;
    r->complete(r, err ? NULL : shm_slot_output(s->arena, slot), err);
    start(s, release_slot(s, slot));
}

void sched_on_state(void *ctx, int ready)
{
    struct sched *s = ctx;
    struct sched_req *r = NULL, *next;
    struct tp_err err;

    pthread_mutex_lock(&s->lock);
    s->ready = ready;
    if (!ready) {
        r = s->head;
        s->head = s->tail = NULL;
        s->queued = 0;
    }
    pthread_mutex_unlock(&s->lock);
    tp_err_set(&err, TP_EUNAVAIL, "workers failed; the server is restarting them");
    for (; r; r = next) {
        next = r->next;
        r->complete(r, NULL, &err);
    }
}

int sched_ready(struct sched *s)
{
    int ready;

    pthread_mutex_lock(&s->lock);
    ready = s->ready;
    pthread_mutex_unlock(&s->lock);
    return ready;
}

uint32_t sched_busy(struct sched *s)
{
    uint32_t n;

    pthread_mutex_lock(&s->lock);
    n = s->running + s->queued;
    pthread_mutex_unlock(&s->lock);
    return n;
}

void sched_destroy(struct sched *s)
{
    if (!s)
        return;
    pthread_mutex_destroy(&s->lock);
    free(s->slot);
    free(s);
}
