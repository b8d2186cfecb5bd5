/* test_sched.c -- the scheduler without workers: sup_dispatch is a stub that records jobs, and the
 * test plays the supervisor by calling sched_on_done. A lone request starts at once; requests that
 * arrive while a job computes wait for it to end (whatever the delay) and are batched into one job
 * at their own row offsets, and each gets its own rows of the output; a slot whose rows a reply
 * still holds is not reused, and the last slot not lent out says so (keep 0); a queued request
 * cancelled or past its deadline never runs; a running one cancelled is answered with an error
 * when its job ends and frees its slot; with a delay of 0 every job has one request; once the
 * workers are free a young batch waits out the delay, never less; the queue's bytes are bounded
 * (a request that finds it empty is always taken), and memory is given back once after a burst,
 * when the scheduler idles, not before. */
#include <pthread.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "../../daemon/sched.h"
#include "test.h"

#define IN 2
#define OUT 3

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static struct job {
    uint32_t slot, rows;
    uint64_t id;
} jobs[32];
static int njobs;

/* the statistics the scheduler reports: not what this test looks at */
void metrics_job_fill(uint32_t slot, int64_t ns)
{
    (void)slot, (void)ns;
}

int sup_dispatch(struct sup *s, uint32_t slot, uint64_t id, uint32_t rows, struct tp_err *err)
{
    (void)s;
    (void)err;
    pthread_mutex_lock(&mu);
    jobs[njobs++] = (struct job){slot, rows, id};
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mu);
    return 0;
}

/* waits up to 2 s for job n (0-based) to be dispatched; returns 1 if it was */
static int wait_job(int n, int ms)
{
    struct timespec ts;
    int ok;

    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += ms / 1000;
    ts.tv_nsec += (long)(ms % 1000) * 1000000;
    if (ts.tv_nsec >= 1000000000) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000;
    }
    pthread_mutex_lock(&mu);
    while (njobs <= n && pthread_cond_timedwait(&cv, &mu, &ts) == 0)
        ;
    ok = njobs > n;
    pthread_mutex_unlock(&mu);
    return ok;
}

struct treq {
    struct sched_req r;
    float x[8 * IN];
    const float *y; /* as completed */
    struct tp_err err;
    int completions;
};

static void fill(struct sched_req *r, float *x)
{
    memcpy(x, ((struct treq *)r)->x, (size_t)r->rows * IN * sizeof(float));
}

static void complete(struct sched_req *r, const float *y, const struct tp_err *err)
{
    struct treq *t = (struct treq *)r;

    t->y = y;
    t->err = err ? *err : (struct tp_err){0};
    t->completions++;
}

static void init(struct treq *t, uint32_t rows, float base)
{
    *t = (struct treq){
        .r = {.rows = rows, .deadline_ns = INT64_MAX, .fill = fill, .complete = complete}};
    for (uint32_t i = 0; i < rows * IN; i++)
        t->x[i] = base + (float)i;
}

static int64_t mono_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void test_batching_holds_cancel(void)
{
    struct shm_arena a;
    struct sched *s;
    struct tp_err err = {0};
    struct treq r1, r2, r3, r4, r5, r6;
    float *in0, *in1;

    ASSERT_EQ(shm_arena_create(&a, &(struct shm_layout){2, 8, IN, OUT, 0}, &err), 0);
    ASSERT_EQ(
        sched_create(&s, &a, &(struct sched_config){.max_queue = 8, .batch_delay_us = 30000}, &err),
        0);
    sched_on_state(s, 1);
    in0 = shm_slot_input(&a, 0);
    in1 = shm_slot_input(&a, 1);

    /* idle: a lone request starts at once */
    init(&r1, 2, 100);
    ASSERT_EQ(sched_submit(s, &r1.r, &err), 0);
    ASSERT_EQ(njobs, 1);
    ASSERT_EQ(jobs[0].slot, 0);
    ASSERT_EQ(jobs[0].rows, 2);
    ASSERT_EQ(memcmp(in0, r1.x, 2 * IN * sizeof(float)), 0);

    /* while job 1 computes, two requests gather, past the 30 ms delay: the workers are busy, so
     * they could not start sooner */
    init(&r2, 3, 200);
    init(&r3, 1, 300);
    ASSERT_EQ(sched_submit(s, &r2.r, &err), 0);
    ASSERT_EQ(sched_submit(s, &r3.r, &err), 0);
    ASSERT_TRUE(!wait_job(1, 100));
    ASSERT_EQ(sched_busy(s), 3);

    /* job 1 done: the two go as one job of 4 rows, on the other slot (r1's reply holds slot 0) */
    sched_on_done(s, 0, jobs[0].id, NULL);
    ASSERT_EQ(r1.completions, 1);
    ASSERT_TRUE(r1.y == shm_slot_output(&a, 0));
    ASSERT_TRUE(wait_job(1, 2000));
    ASSERT_EQ(jobs[1].slot, 1);
    ASSERT_EQ(jobs[1].rows, 4);
    ASSERT_EQ(memcmp(in1, r2.x, 3 * IN * sizeof(float)), 0);
    ASSERT_EQ(memcmp(in1 + 3 * IN, r3.x, 1 * IN * sizeof(float)), 0);
    ASSERT_EQ(sched_busy(s), 2);

    /* each gets its own rows of its slot's output */
    sched_on_done(s, 1, jobs[1].id, NULL);
    ASSERT_TRUE(r2.y == shm_slot_output(&a, 1));
    ASSERT_TRUE(r3.y == shm_slot_output(&a, 1) + 3 * OUT);
    ASSERT_EQ(r3.err.code, TP_OK);
    /* r1 may keep slot 0; slot 1 is the last one not lent out: its requests are to copy */
    ASSERT_EQ(r1.r.keep, 1);
    ASSERT_EQ(r2.r.keep, 0);
    ASSERT_EQ(r3.r.keep, 0);

    /* both slots still held by replies: a new request waits */
    init(&r4, 1, 400);
    ASSERT_EQ(sched_submit(s, &r4.r, &err), 0);
    ASSERT_TRUE(!wait_job(2, 100));
    sched_unhold(r2.r.hold);
    ASSERT_TRUE(!wait_job(2, 100)); /* r3 still holds slot 1 */
    sched_unhold(r1.r.hold);
    ASSERT_TRUE(wait_job(2, 2000));
    ASSERT_EQ(jobs[2].slot, 0);

    /* a queued request cancelled leaves at once and never runs */
    init(&r5, 1, 500);
    ASSERT_EQ(sched_submit(s, &r5.r, &err), 0);
    sched_cancel(s, &r5.r);
    ASSERT_EQ(r5.completions, 1);
    ASSERT_TRUE(r5.y == NULL);
    ASSERT_STR_HAS(r5.err.msg, "cancelled");
    sched_cancel(s, &r5.r); /* again: nothing */
    ASSERT_EQ(r5.completions, 1);

    /* a queued request whose deadline passes before a slot frees is dropped, not run */
    init(&r6, 1, 600);
    r6.r.deadline_ns = mono_ns() + 20 * 1000000;
    ASSERT_EQ(sched_submit(s, &r6.r, &err), 0);
    usleep(40000);
    /* a running request cancelled: its job ends with an error for it, and frees the slot */
    sched_cancel(s, &r4.r);
    ASSERT_EQ(r4.completions, 0);
    sched_on_done(s, 0, jobs[2].id, NULL);
    ASSERT_EQ(r4.completions, 1);
    ASSERT_TRUE(r4.y == NULL);
    ASSERT_STR_HAS(r4.err.msg, "cancelled");
    for (int i = 0; i < 200 && r6.completions == 0; i++)
        usleep(5000);
    ASSERT_EQ(r6.completions, 1);
    ASSERT_EQ(r6.err.code, TP_ETIMEDOUT);
    ASSERT_TRUE(!wait_job(3, 100));
    /* a deadline already gone is refused at once */
    init(&r6, 1, 600);
    r6.r.deadline_ns = mono_ns() - 1;
    ASSERT_EQ(sched_submit(s, &r6.r, &err), -1);
    ASSERT_EQ(err.code, TP_ETIMEDOUT);
    sched_unhold(r3.r.hold);
    {
        struct sched_stats st;

        sched_get_stats(s, &st);
        ASSERT_EQ(st.batches, 3);
        ASSERT_EQ(st.requests, 4);
        ASSERT_EQ(st.multi, 1);
        ASSERT_EQ(st.max_reqs, 2);
        ASSERT_EQ(st.expired, 1);
        ASSERT_EQ(st.cancelled, 2);
        ASSERT_EQ(st.by_reqs[0], 2); /* r1, r4 */
        ASSERT_EQ(st.by_reqs[1], 1); /* r2 + r3 */
        ASSERT_EQ(st.by_reqs[2], 0);
    }
    ASSERT_EQ(sched_busy(s), 0);
    sched_destroy(s);
    shm_arena_destroy(&a);
}

static void test_no_batching(void)
{
    struct shm_arena a;
    struct sched *s;
    struct tp_err err = {0};
    struct treq r[3];

    njobs = 0;
    ASSERT_EQ(shm_arena_create(&a, &(struct shm_layout){1, 8, IN, OUT, 0}, &err), 0);
    ASSERT_EQ(
        sched_create(&s, &a, &(struct sched_config){.max_queue = 1, .batch_delay_us = 0}, &err), 0);
    for (int i = 0; i < 3; i++)
        init(&r[i], 1, (float)i);
    ASSERT_EQ(sched_submit(s, &r[0].r, &err), -1); /* not ready yet */
    ASSERT_EQ(err.code, TP_EUNAVAIL);
    sched_on_state(s, 1);
    ASSERT_EQ(sched_submit(s, &r[0].r, &err), 0);  /* runs */
    ASSERT_EQ(sched_submit(s, &r[1].r, &err), 0);  /* queued */
    ASSERT_EQ(sched_submit(s, &r[2].r, &err), -1); /* queue of 1 is full */
    ASSERT_EQ(err.code, TP_EBUSY);
    sched_on_done(s, 0, jobs[0].id, NULL);
    sched_unhold(r[0].r.hold);
    ASSERT_TRUE(wait_job(1, 2000));
    ASSERT_EQ(jobs[1].rows, 1);
    /* the group fails: the running job fails, nothing is held */
    {
        struct tp_err down;

        tp_err_set(&down, TP_EUNAVAIL, "worker group died");
        sched_on_done(s, 0, jobs[1].id, &down);
        ASSERT_EQ(r[1].err.code, TP_EUNAVAIL);
        ASSERT_TRUE(r[1].y == NULL);
    }
    ASSERT_EQ(sched_busy(s), 0);
    sched_destroy(s);
    shm_arena_destroy(&a);
}

/* Workers just freed and the queued batch is young: it waits until its oldest request is
 * --batch-delay-us old, never less (and gathers what comes meanwhile). */
static void test_delay_once_free(void)
{
    struct shm_arena a;
    struct sched *s;
    struct tp_err err = {0};
    struct treq r1, r2, r3;
    int64_t t0, waited;
    int base = njobs;

    ASSERT_EQ(shm_arena_create(&a, &(struct shm_layout){2, 8, IN, OUT, 0}, &err), 0);
    ASSERT_EQ(
        sched_create(&s, &a, &(struct sched_config){.max_queue = 8, .batch_delay_us = 50000}, &err),
        0);
    sched_on_state(s, 1);
    init(&r1, 1, 100);
    ASSERT_EQ(sched_submit(s, &r1.r, &err), 0); /* idle: starts at once */
    ASSERT_EQ(njobs, base + 1);
    t0 = mono_ns();
    init(&r2, 1, 200);
    ASSERT_EQ(sched_submit(s, &r2.r, &err), 0);
    sched_on_done(s, jobs[base].slot, jobs[base].id, NULL); /* free again, r2 is young */
    init(&r3, 2, 300);
    ASSERT_EQ(sched_submit(s, &r3.r, &err), 0);
    ASSERT_TRUE(wait_job(base + 1, 5000));
    waited = mono_ns() - t0;
    ASSERT_TRUE(waited >= 50 * 1000000);
    ASSERT_EQ(jobs[base + 1].rows, 3); /* r2 and r3 together */
    sched_on_done(s, jobs[base + 1].slot, jobs[base + 1].id, NULL);
    sched_unhold(r1.r.hold);
    sched_unhold(r2.r.hold);
    sched_unhold(r3.r.hold);
    ASSERT_EQ(sched_busy(s), 0);
    sched_destroy(s);
    shm_arena_destroy(&a);
}

static uint64_t trims(struct sched *s)
{
    struct sched_stats st;

    sched_get_stats(s, &st);
    return st.trims;
}

static void test_queue_bytes(void)
{
    struct shm_arena a;
    struct sched *s;
    struct tp_err err = {0};
    struct treq r[4];
    struct sched_stats st;
    int64_t until;

    njobs = 0;
    ASSERT_EQ(shm_arena_create(&a, &(struct shm_layout){1, 8, IN, OUT, 0}, &err), 0);
    ASSERT_EQ(sched_create(&s, &a,
                           &(struct sched_config){
                               .max_queue = 8, .max_queue_bytes = 10240, .batch_delay_us = 0},
                           &err),
              0);
    sched_on_state(s, 1);
    for (int i = 0; i < 4; i++)
        init(&r[i], 1, (float)i);
    r[0].r.bytes = 100;
    r[1].r.bytes = 20000; /* more than the bound, but the queue is empty */
    r[2].r.bytes = 100;
    r[3].r.bytes = 100;
    ASSERT_EQ(sched_submit(s, &r[0].r, &err), 0); /* runs */
    ASSERT_EQ(sched_submit(s, &r[1].r, &err), 0); /* queued alone */
    ASSERT_EQ(sched_submit(s, &r[2].r, &err), -1);
    ASSERT_EQ(err.code, TP_EBUSY);
    ASSERT_TRUE(strstr(err.msg, "--max-queue-mb") != NULL);
    sched_on_done(s, 0, jobs[0].id, NULL);
    sched_unhold(r[0].r.hold);
    ASSERT_TRUE(wait_job(1, 2000));               /* r1 runs: the queue is empty again */
    ASSERT_EQ(sched_submit(s, &r[3].r, &err), 0); /* so there is room */
    sched_get_stats(s, &st);
    ASSERT_EQ(st.refused, 1);
    ASSERT_EQ(st.max_queued_bytes, 20000);
    sched_on_done(s, 0, jobs[1].id, NULL);
    sched_unhold(r[1].r.hold);
    ASSERT_TRUE(wait_job(2, 2000)); /* r3 */
    sched_on_done(s, 0, jobs[2].id, NULL);
    /* the burst is over, but a reply still holds its slot: memory stays */
    usleep(300000);
    ASSERT_EQ(trims(s), 0);
    sched_unhold(r[3].r.hold);
    until = mono_ns() + 2000000000LL;
    while (trims(s) == 0 && mono_ns() < until)
        usleep(10000);
    ASSERT_EQ(trims(s), 1);
    usleep(300000);
    ASSERT_EQ(trims(s), 1); /* once per burst */
    ASSERT_EQ(sched_busy(s), 0);
    sched_destroy(s);
    shm_arena_destroy(&a);
}

int main(void)
{
    TEST_RUN(test_batching_holds_cancel);
    TEST_RUN(test_no_batching);
    TEST_RUN(test_delay_once_free);
    TEST_RUN(test_queue_bytes);
    return 0;
}
