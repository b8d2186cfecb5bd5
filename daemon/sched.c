/* sched.c -- slots, the wait queue and dynamic batching (see sched.h). One lock covers the
 * bookkeeping; the copies into a slot, the dispatch and the complete callbacks run outside it.
 * A slot is busy from the moment a batch takes it until its hold count drops to zero: one hold
 * for the job while the workers compute, plus one per request whose rows were lent out by a
 * successful complete. Only then may the next batch overwrite it. A slot whose rows are lent out
 * after its job is "lent"; at most nslots - 1 slots are: the holds of a client that does not read
 * its replies can last as long as its connection (a socket write gRPC cannot take back), and the
 * slot left over keeps every other client served. Beyond that, requests copy their rows.
 *
 * Memory: a queued request holds its received message until its fill copies it into a slot, so
 * the queue's bytes are bounded as well as its length. tpd keeps freed memory on purpose (see
 * main.c's mallopt), so a burst of large requests would leave the process at its peak for good.
 * After a burst (the queue held half its byte bound), once the scheduler has been idle for
 * TRIM_IDLE_NS (nothing queued, computing or lent out, nothing submitted), its thread gives the
 * free memory back with malloc_trim. A steady load never reaches half the bound, so it keeps its
 * warm buffers; a load that never lets the scheduler idle keeps the memory it has (bounded). */
#include "sched.h"

#include <malloc.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "metrics.h"

#define TRIM_IDLE_NS 200000000LL /* idle time after a burst before memory is given back */

enum req_state { R_QUEUED = 1, R_RUNNING, R_CANCELLED, R_DONE };

struct sched_slot {
    struct sched *s;
    uint32_t idx;
    int busy;               /* taken by a batch, until holds drops to 0 */
    int lent;               /* its job is done and requests still hold its rows */
    uint32_t holds;         /* the job in flight + rows lent out */
    uint64_t id;            /* job id */
    uint32_t rows, n;       /* rows and requests of the job */
    struct sched_req *reqs; /* the batch, in row order */
};

struct sched {
    struct shm_arena *arena;
    struct sup *sup;
    uint32_t slot0; /* its slots' first number among all models' (sup.h) */
    struct sched_config c;
    pthread_mutex_t lock;
    pthread_cond_t cond; /* queue, slots or readiness changed */
    pthread_t thread;
    int thread_started;
    int stopping;
    struct sched_slot *slots;      /* nslots */
    struct sched_req *head, *tail; /* FIFO of requests waiting for a batch */
    uint32_t queued;
    uint64_t queued_bytes; /* sum of their bytes */
    uint64_t burst_bytes;  /* most queued_bytes since memory was last given back */
    int64_t last_busy_ns;  /* the latest sched_submit (taken or not) or slot release */
    uint32_t running;      /* requests in jobs not yet done */
    uint32_t busy;         /* busy slots */
    uint32_t computing;    /* slots whose job the workers have not finished */
    uint32_t lent;         /* lent slots */
    uint64_t next_id;
    int ready;
    void (*listener)(void *ctx); /* told after every change of ready (set before the workers) */
    void *listener_ctx;
    struct sched_stats st;
};

static int64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Completes every request of a list linked by next, with err. */
static void fail_list(struct sched_req *r, const struct tp_err *err)
{
    struct sched_req *next;

    for (; r; r = next) {
        next = r->next;
        r->complete(r, NULL, err);
    }
}

/* Memory is to be given back once the scheduler idles: the queue held half its byte bound since
 * the last time. Called with the lock held. */
static int after_burst(const struct sched *s)
{
    return s->c.max_queue_bytes && s->burst_bytes >= s->c.max_queue_bytes / 2;
}

/* Drops one hold of a slot. Called with the lock held. */
static void unhold_locked(struct sched *s, struct sched_slot *sl)
{
    if (--sl->holds > 0)
        return;
    sl->busy = 0;
    sl->reqs = NULL;
    s->busy--;
    if (sl->lent) {
        sl->lent = 0;
        s->lent--;
    }
    s->last_busy_ns = now_ns();
    if (s->head || s->stopping || (s->busy == 0 && after_burst(s)))
        pthread_cond_broadcast(&s->cond);
}

uint32_t sched_slot_index(const struct sched_slot *hold)
{
    return hold->s->slot0 + hold->idx;
}

void sched_unhold(struct sched_slot *sl)
{
    struct sched *s = sl->s;

    pthread_mutex_lock(&s->lock);
    unhold_locked(s, sl);
    pthread_mutex_unlock(&s->lock);
}

/* Removes r from the queue; 1 if it was there. Called with the lock held. */
static int unqueue(struct sched *s, struct sched_req *r)
{
    struct sched_req **p = &s->head, *prev = NULL;

    for (; *p; prev = *p, p = &(*p)->next) {
        if (*p != r)
            continue;
        *p = r->next;
        if (s->tail == r)
            s->tail = prev;
        s->queued--;
        s->queued_bytes -= r->bytes;
        r->next = NULL;
        return 1;
    }
    return 0;
}

/* Takes the queued requests whose deadline has passed. Called with the lock held. */
static struct sched_req *take_expired(struct sched *s, int64_t now)
{
    struct sched_req *out = NULL, **tailp = &out, *r = s->head, *next;

    for (; r; r = next) {
        next = r->next;
        if (r->deadline_ns > now)
            continue;
        unqueue(s, r);
        r->state = R_DONE;
        s->st.expired++;
        *tailp = r;
        tailp = &r->next;
    }
    return out;
}

static struct sched_slot *free_slot(struct sched *s)
{
    for (uint32_t i = 0; i < s->arena->layout.nslots; i++)
        if (!s->slots[i].busy)
            return &s->slots[i];
    return NULL;
}

/* Moves the queue's first n requests (up to last) into slot sl as one job. Called with the lock
 * held. Returns the batch's rows. */
static uint32_t take_batch(struct sched *s, struct sched_slot *sl, struct sched_req *last,
                           uint32_t n)
{
    uint32_t rows = 0;
    struct sched_req *r;

    sl->reqs = s->head;
    s->head = last->next;
    if (!s->head)
        s->tail = NULL;
    last->next = NULL;
    s->queued -= n;
    for (r = sl->reqs; r; r = r->next) {
        r->state = R_RUNNING;
        r->row0 = rows;
        rows += r->rows;
        s->queued_bytes -= r->bytes;
    }
    sl->busy = 1;
    sl->holds = 1;
    sl->id = s->next_id++;
    sl->rows = rows;
    sl->n = n;
    s->busy++;
    s->computing++;
    s->running += n;
    s->st.batches++;
    s->st.requests += n;
    s->st.rows += rows;
    s->st.multi += n > 1;
    if (n > s->st.max_reqs)
        s->st.max_reqs = n;
    {
        int b = 0;

        while (b < 7 && (n >> (b + 1)) != 0)
            b++;
        s->st.by_reqs[b]++;
    }
    return rows;
}

/* Copies a batch into its slot and sends the job; fails the batch if the group cannot take it.
 * Called without the lock. */
static void launch(struct sched *s, struct sched_slot *sl)
{
    struct tp_err err = {0};
    struct sched_req *r, *failed = NULL;
    float *x = shm_slot_input(s->arena, sl->idx);

    int64_t t0 = now_ns();

    tp_log(TP_LOG_DEBUG, "batch of %u requests, %u rows on slot %u", sl->n, sl->rows, sl->idx);
    for (r = sl->reqs; r; r = r->next)
        r->fill(r, x + (size_t)r->row0 * s->arena->layout.in);
    metrics_job_fill(s->slot0 + sl->idx, now_ns() - t0);
    if (sup_dispatch(s->sup, s->slot0 + sl->idx, sl->id, sl->rows, &err) == 0)
        return;
    pthread_mutex_lock(&s->lock);
    failed = sl->reqs;
    for (r = failed; r; r = r->next) {
        r->state = R_DONE;
        s->running--;
    }
    s->computing--;
    unhold_locked(s, sl);
    pthread_mutex_unlock(&s->lock);
    fail_list(failed, &err);
}

/* Resident memory of this process in KiB, or -1. */
static long rss_kib(void)
{
    FILE *f = fopen("/proc/self/statm", "re");
    long size, resident = -1;

    if (!f)
        return -1;
    if (fscanf(f, "%ld %ld", &size, &resident) != 2)
        resident = -1;
    fclose(f);
    return resident < 0 ? -1 : resident * (sysconf(_SC_PAGESIZE) / 1024);
}

/* Gives the memory freed after a burst back to the system. Called without the lock. */
static void give_back_memory(uint64_t burst_bytes)
{
    long before = rss_kib(), after;
    int64_t t0 = now_ns();

    malloc_trim(0);
    after = rss_kib();
    tp_log(TP_LOG_INFO,
           "queue drained after holding %llu MiB: resident memory %ld -> %ld MiB (malloc_trim, "
           "%.1f ms)",
           (unsigned long long)(burst_bytes >> 20), before / 1024, after / 1024,
           (double)(now_ns() - t0) / 1e6);
}

/* Waits for a change, or until the earliest deadline of a queued request (which then expires in
 * the queue at its time, not when a slot frees), or until until_ns (INT64_MAX: none), whichever
 * comes first. Lock held. */
static void wait_change(struct sched *s, int64_t until_ns)
{
    int64_t at = until_ns;
    struct timespec ts;

    for (const struct sched_req *r = s->head; r; r = r->next)
        if (r->deadline_ns < at)
            at = r->deadline_ns;
    if (at == INT64_MAX) {
        pthread_cond_wait(&s->cond, &s->lock);
        return;
    }
    ts.tv_sec = (time_t)(at / 1000000000);
    ts.tv_nsec = (long)(at % 1000000000);
    pthread_cond_timedwait(&s->cond, &s->lock, &ts);
}

static void *sched_thread(void *arg)
{
    struct sched *s = arg;
    const uint32_t max_rows = s->arena->layout.max_batch;
    const int64_t delay_ns = (int64_t)s->c.batch_delay_us * 1000;

    pthread_mutex_lock(&s->lock);
    while (!s->stopping) {
        int64_t now = now_ns();
        struct sched_req *expired = take_expired(s, now), *r, *last = NULL;
        struct sched_slot *sl;
        uint32_t rows = 0, n = 0;

        if (expired) {
            struct tp_err err;

            pthread_mutex_unlock(&s->lock);
            tp_err_set(&err, TP_ETIMEDOUT, "deadline exceeded while waiting in the queue");
            fail_list(expired, &err);
            pthread_mutex_lock(&s->lock);
            continue;
        }
        if (!s->head && s->busy == 0 && after_burst(s)) {
            int64_t at = s->last_busy_ns + TRIM_IDLE_NS;
            uint64_t burst = s->burst_bytes;

            if (now < at) {
                struct timespec ts = {(time_t)(at / 1000000000), (long)(at % 1000000000)};

                pthread_cond_timedwait(&s->cond, &s->lock, &ts);
                continue;
            }
            s->burst_bytes = 0;
            s->st.trims++;
            pthread_mutex_unlock(&s->lock);
            give_back_memory(burst);
            pthread_mutex_lock(&s->lock);
            continue;
        }
        if (!s->head || !s->ready || !(sl = free_slot(s))) {
            wait_change(s, INT64_MAX);
            continue;
        }
        /* delay 0 turns batching off: one request per job */
        for (r = s->head; r && rows + r->rows <= max_rows && (delay_ns > 0 || n == 0);
             r = r->next) {
            rows += r->rows;
            n++;
            last = r;
        }
        /* A batch that is not full waits for company while the workers compute: they run their
         * jobs one after the other, so it could not start sooner, and every request that comes
         * meanwhile joins it. Once they are free it waits at most until its oldest request is
         * --batch-delay-us old. (A request that finds the workers idle does not come here: the
         * thread that received it starts it at once.) */
        if (r == NULL && rows < max_rows && delay_ns > 0) {
            int64_t until = s->head->enq_ns + delay_ns;

            if (s->computing > 0) {
                wait_change(s, INT64_MAX);
                continue;
            }
            if (now < until) {
                wait_change(s, until);
                continue;
            }
        }
        take_batch(s, sl, last, n);
        pthread_mutex_unlock(&s->lock);
        launch(s, sl);
        pthread_mutex_lock(&s->lock);
    }
    pthread_mutex_unlock(&s->lock);
    return NULL;
}

int sched_create(struct sched **out, struct shm_arena *arena, const struct sched_config *c,
                 struct tp_err *err)
{
    struct sched *s = calloc(1, sizeof(*s));
    int e;

    *out = NULL;
    if (!s || !(s->slots = calloc(arena->layout.nslots, sizeof(*s->slots)))) {
        free(s);
        return tp_err_set(err, TP_ENOMEM, "no memory for the scheduler");
    }
    s->arena = arena;
    s->c = *c;
    s->next_id = 1;
    for (uint32_t i = 0; i < arena->layout.nslots; i++)
        s->slots[i] = (struct sched_slot){.s = s, .idx = i};
    pthread_mutex_init(&s->lock, NULL);
    {
        pthread_condattr_t ca;

        pthread_condattr_init(&ca);
        pthread_condattr_setclock(&ca, CLOCK_MONOTONIC); /* the delay is timed on it */
        pthread_cond_init(&s->cond, &ca);
        pthread_condattr_destroy(&ca);
    }
    e = pthread_create(&s->thread, NULL, sched_thread, s);
    if (e != 0) {
        sched_destroy(s);
        return tp_err_set(err, TP_ESYS, "cannot start the scheduler thread: %s", strerror(e));
    }
    s->thread_started = 1;
    *out = s;
    return 0;
}

void sched_attach(struct sched *s, struct sup *sup, uint32_t slot0)
{
    s->slot0 = slot0;
    s->sup = sup;
}

int sched_submit(struct sched *s, struct sched_req *r, struct tp_err *err)
{
    int64_t now = now_ns();

    if (r->deadline_ns <= now)
        return tp_err_set(err, TP_ETIMEDOUT, "deadline exceeded before the request was queued");
    pthread_mutex_lock(&s->lock);
    s->last_busy_ns = now;
    if (!s->ready) {
        pthread_mutex_unlock(&s->lock);
        return tp_err_set(err, TP_EUNAVAIL, "server is not ready: workers are (re)starting");
    }
    if (s->queued >= s->c.max_queue) {
        uint32_t q = s->queued;

        s->st.refused++;
        pthread_mutex_unlock(&s->lock);
        return tp_err_set(err, TP_EBUSY, "queue full: %u requests waiting (--max-queue %u)", q,
                          s->c.max_queue);
    }
    if (s->c.max_queue_bytes && s->queued > 0 &&
        s->queued_bytes + r->bytes > s->c.max_queue_bytes) {
        uint64_t held = s->queued_bytes;
        uint32_t q = s->queued;

        s->st.refused++;
        pthread_mutex_unlock(&s->lock);
        return tp_err_set(err, TP_EBUSY,
                          "queue full: %u requests of %llu MiB in all waiting, no room for "
                          "%llu KiB more (--max-queue-mb %llu)",
                          q, (unsigned long long)(held >> 20),
                          (unsigned long long)((r->bytes + 1023) >> 10),
                          (unsigned long long)(s->c.max_queue_bytes >> 20));
    }
    r->state = R_QUEUED;
    r->enq_ns = now;
    r->hold = NULL;
    r->next = NULL;
    if (s->tail)
        s->tail->next = r;
    else
        s->head = r;
    s->tail = r;
    s->queued++;
    s->queued_bytes += r->bytes;
    if (s->queued_bytes > s->burst_bytes)
        s->burst_bytes = s->queued_bytes;
    if (s->queued_bytes > s->st.max_queued_bytes)
        s->st.max_queued_bytes = s->queued_bytes;
    /* Alone on an idle server (or batching off): start it on this thread, sparing the hand-off
     * to the scheduler's thread. Otherwise that thread forms the batch. */
    if (s->queued == 1 && (s->computing == 0 || s->c.batch_delay_us == 0)) {
        struct sched_slot *sl = free_slot(s);

        if (sl) {
            take_batch(s, sl, r, 1);
            pthread_mutex_unlock(&s->lock);
            launch(s, sl);
            return 0;
        }
    }
    pthread_cond_broadcast(&s->cond);
    pthread_mutex_unlock(&s->lock);
    return 0;
}

void sched_cancel(struct sched *s, struct sched_req *r)
{
    int was_queued = 0;

    pthread_mutex_lock(&s->lock);
    if (r->state == R_QUEUED) {
        was_queued = unqueue(s, r);
        r->state = R_DONE;
        s->st.cancelled++;
        if (!s->head)
            pthread_cond_broadcast(&s->cond); /* the queue drained: maybe after a burst */
    } else if (r->state == R_RUNNING) {
        r->state = R_CANCELLED;
        s->st.cancelled++;
    }
    pthread_mutex_unlock(&s->lock);
    if (was_queued) {
        struct tp_err err;

        tp_err_set(&err, TP_EUNAVAIL, "call cancelled by the client");
        r->complete(r, NULL, &err);
    }
}

void sched_on_done(void *ctx, uint32_t slot, uint64_t id, const struct tp_err *err)
{
    struct sched *s = ctx;
    struct sched_slot *sl;
    struct sched_req *r, *next;
    const float *y;
    uint32_t out = s->arena->layout.out;
    int keep;

    if (slot >= s->arena->layout.nslots)
        return;
    sl = &s->slots[slot];
    y = shm_slot_output(s->arena, slot);
    pthread_mutex_lock(&s->lock);
    if (!sl->busy || sl->id != id || !sl->reqs) {
        pthread_mutex_unlock(&s->lock);
        return;
    }
    r = sl->reqs;
    sl->reqs = NULL;
    s->computing--;
    if (s->head)
        pthread_cond_broadcast(&s->cond); /* a batch may be waiting for the workers */
    /* decide every request's fate under the lock: a cancel arriving later finds R_DONE */
    keep = s->lent + 1 < s->arena->layout.nslots;
    for (struct sched_req *q = r; q; q = q->next) {
        s->running--;
        if (q->state == R_RUNNING && !err) {
            sl->holds++;
            q->hold = sl;
            q->keep = keep;
            s->st.unlent += !keep;
            if (!sl->lent) {
                sl->lent = 1;
                s->lent++;
            }
        }
        q->state = R_DONE;
    }
    pthread_mutex_unlock(&s->lock);
    for (; r; r = next) {
        next = r->next;
        if (r->hold) {
            r->complete(r, y + (size_t)r->row0 * out, NULL);
        } else if (err) {
            r->complete(r, NULL, err);
        } else {
            struct tp_err e;

            tp_err_set(&e, TP_EUNAVAIL, "call cancelled by the client");
            r->complete(r, NULL, &e);
        }
    }
    sched_unhold(sl); /* the job's own hold */
}

void sched_on_state(void *ctx, int ready)
{
    struct sched *s = ctx;
    struct sched_req *r = NULL;
    struct tp_err err;

    pthread_mutex_lock(&s->lock);
    s->ready = ready;
    if (!ready) {
        r = s->head;
        s->head = s->tail = NULL;
        s->queued = 0;
        s->queued_bytes = 0;
        for (struct sched_req *q = r; q; q = q->next)
            q->state = R_DONE;
    }
    pthread_cond_broadcast(&s->cond);
    pthread_mutex_unlock(&s->lock);
    tp_err_set(&err, TP_EUNAVAIL, "workers failed; the server is restarting them");
    fail_list(r, &err);
    if (s->listener)
        s->listener(s->listener_ctx);
}

void sched_set_state_listener(struct sched *s, void (*fn)(void *ctx), void *ctx)
{
    s->listener = fn;
    s->listener_ctx = ctx;
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

int sched_idle(struct sched *s)
{
    int idle;

    pthread_mutex_lock(&s->lock);
    idle = s->running + s->queued == 0 && s->busy == 0;
    pthread_mutex_unlock(&s->lock);
    return idle;
}

uint32_t sched_pending(void *ctx)
{
    struct sched *s = ctx;
    uint32_t n;

    pthread_mutex_lock(&s->lock);
    n = s->queued;
    pthread_mutex_unlock(&s->lock);
    return n;
}

void sched_get_stats(struct sched *s, struct sched_stats *st)
{
    pthread_mutex_lock(&s->lock);
    *st = s->st;
    pthread_mutex_unlock(&s->lock);
}

void sched_destroy(struct sched *s)
{
    uint32_t busy = 0;

    if (!s)
        return;
    pthread_mutex_lock(&s->lock);
    if (s->st.batches)
        tp_log(TP_LOG_NOTICE,
               "scheduler: %llu jobs for %llu requests of %llu rows, %llu jobs of more than one "
               "request (at most %u), %llu requests expired in the queue, %llu cancelled, %llu "
               "refused (queue full); at most %llu MiB queued; %llu answers copied (the other "
               "slots were lent out)",
               (unsigned long long)s->st.batches, (unsigned long long)s->st.requests,
               (unsigned long long)s->st.rows, (unsigned long long)s->st.multi, s->st.max_reqs,
               (unsigned long long)s->st.expired, (unsigned long long)s->st.cancelled,
               (unsigned long long)s->st.refused,
               (unsigned long long)(s->st.max_queued_bytes >> 20),
               (unsigned long long)s->st.unlent);
    s->stopping = 1;
    pthread_cond_broadcast(&s->cond);
    pthread_mutex_unlock(&s->lock);
    if (s->thread_started)
        pthread_join(s->thread, NULL);
    /* gRPC may still hold a reply slice that points into a slot for a moment after its call
     * ended; its release comes here. Wait a little, and never free under it. */
    for (int i = 0; i < 200; i++) {
        pthread_mutex_lock(&s->lock);
        busy = s->busy;
        pthread_mutex_unlock(&s->lock);
        if (busy == 0)
            break;
        usleep(5000);
    }
    if (busy) {
        tp_log(TP_LOG_WARN, "%u slots still held by replies at exit", busy);
        return;
    }
    pthread_mutex_destroy(&s->lock);
    pthread_cond_destroy(&s->cond);
    free(s->slots);
    free(s);
}
