/* metrics.c -- counters, histograms and the HTTP server of tpd (see metrics.h). One mutex guards
 * every counter: events are a few per request and the critical sections a handful of additions,
 * so a lock is cheaper to get right than a set of atomics that a scrape would read torn (a
 * histogram's buckets, _sum and _count must agree). The HTTP server is tpd's own, one thread
 * that polls every connection and holds none past a deadline (see "HTTP" below); it renders the
 * exposition under the same lock. */
#include "metrics.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "tcp.h"

#define NCODES 17 /* gRPC status codes 0..16 */

static const char *const code_names[NCODES] = {
    "OK",        "CANCELLED",      "UNKNOWN",           "INVALID_ARGUMENT",   "DEADLINE_EXCEEDED",
    "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED",   "OUT_OF_RANGE",   "UNIMPLEMENTED",     "INTERNAL",           "UNAVAILABLE",
    "DATA_LOSS", "UNAUTHENTICATED"};

/* seconds: 100 us to 10 s; rows: powers of two */
static const double time_bounds[] = {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                     0.05,   0.1,     0.25,   0.5,   1,      2.5,   5,    10};
static const double row_bounds[] = {1,   2,    4,    8,    16,   32,    64,    128,  256,
                                    512, 1024, 2048, 4096, 8192, 16384, 32768, 65536};
#define NTIME (sizeof(time_bounds) / sizeof(time_bounds[0]))
#define NROWS (sizeof(row_bounds) / sizeof(row_bounds[0]))
#define MAXB 17

struct hist {
    const double *bounds;
    unsigned nb;
    uint64_t bucket[MAXB]; /* observations <= bounds[i], not cumulative */
    uint64_t count;
    double sum;
};

#define MAX_BATCH_SIZES 1024 /* batch sizes kept apart in batch_stats; the rest only in totals */

/* The counters of one loaded model, by its id (metrics_model_add). */
struct mmodel {
    int used;
    char name[128];
    uint32_t slot0, nslots; /* its slots in the one numbering */
    uint64_t requests[NCODES];
    uint64_t rows;
    struct hist latency, queue, compute, batch;
    uint64_t jobs;        /* jobs dispatched */
    uint64_t collectives; /* collectives the ranks ran for finished jobs */
    /* Triton's statistics (metrics_get_stats) */
    struct metrics_stats st;             /* st.batch unused here: by_size below */
    struct metrics_batch_stats *by_size; /* batch_stats by batch size, sorted; nbatch of them */
    size_t nbatch;
};

static struct {
    pthread_mutex_t lock;
    int on; /* metrics_init succeeded */
    int nranks;
    uint32_t nslots;
    struct mmodel models[METRICS_MAX_MODELS];
    int16_t *slot_model;    /* nslots: the model that owns the slot, -1 for none */
    uint64_t other[NCODES]; /* requests that named no loaded model */
    uint64_t bytes_in, bytes_out;
    int *up;            /* nranks */
    uint64_t *restarts; /* nranks */
    int64_t *job_t0;    /* nslots: when the slot's job was dispatched, ns */
    uint32_t *job_rows; /* nslots: the rows of the slot's job, set at dispatch */
    int64_t *job_fill_ns;  /* nslots: its requests' copies into the slot */
    int64_t *job_infer_ns; /* nslots: its time on the workers, once done */
    metrics_pending_fn pending;
    void *pending_ctx;
} M = {.lock = PTHREAD_MUTEX_INITIALIZER};

int metrics_init(int nranks, uint32_t nslots, struct tp_err *err)
{
    pthread_mutex_lock(&M.lock);
    M.nranks = nranks;
    M.nslots = nslots;
    M.up = calloc((size_t)nranks, sizeof(*M.up));
    M.restarts = calloc((size_t)nranks, sizeof(*M.restarts));
    M.job_t0 = calloc(nslots, sizeof(*M.job_t0));
    M.job_rows = calloc(nslots, sizeof(*M.job_rows));
    M.job_fill_ns = calloc(nslots, sizeof(*M.job_fill_ns));
    M.job_infer_ns = calloc(nslots, sizeof(*M.job_infer_ns));
    M.slot_model = malloc(nslots * sizeof(*M.slot_model));
    for (uint32_t i = 0; M.slot_model && i < nslots; i++)
        M.slot_model[i] = -1;
    M.on = M.up && M.restarts && M.job_t0 && M.job_rows && M.job_fill_ns && M.job_infer_ns &&
           M.slot_model;
    pthread_mutex_unlock(&M.lock);
    if (!M.on)
        return tp_err_set(err, TP_ENOMEM, "no memory for the metrics");
    return 0;
}

int metrics_model_add(int id, const char *name, uint32_t slot0, uint32_t nslots)
{
    struct mmodel *m;
    struct metrics_batch_stats *by_size;

    if (id < 0 || id >= METRICS_MAX_MODELS)
        return -1;
    by_size = calloc(MAX_BATCH_SIZES, sizeof(*by_size));
    if (!by_size)
        return -1;
    pthread_mutex_lock(&M.lock);
    m = &M.models[id];
    if (!M.on || m->used || slot0 > M.nslots || nslots > M.nslots - slot0) {
        pthread_mutex_unlock(&M.lock);
        free(by_size);
        return -1;
    }
    *m = (struct mmodel){.used = 1,
                         .slot0 = slot0,
                         .nslots = nslots,
                         .latency = {.bounds = time_bounds, .nb = NTIME},
                         .queue = {.bounds = time_bounds, .nb = NTIME},
                         .compute = {.bounds = time_bounds, .nb = NTIME},
                         .batch = {.bounds = row_bounds, .nb = NROWS},
                         .by_size = by_size};
    snprintf(m->name, sizeof(m->name), "%s", name);
    for (uint32_t i = 0; i < nslots; i++) {
        M.slot_model[slot0 + i] = (int16_t)id;
        M.job_t0[slot0 + i] = 0;
    }
    pthread_mutex_unlock(&M.lock);
    return 0;
}

void metrics_model_remove(int id)
{
    struct mmodel *m;

    if (id < 0 || id >= METRICS_MAX_MODELS)
        return;
    pthread_mutex_lock(&M.lock);
    m = &M.models[id];
    if (m->used) {
        for (uint32_t i = 0; i < m->nslots; i++)
            M.slot_model[m->slot0 + i] = -1;
        free(m->by_size);
        *m = (struct mmodel){0};
    }
    pthread_mutex_unlock(&M.lock);
}

int64_t metrics_now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

double metrics_since(int64_t t0_ns)
{
    return (double)(metrics_now_ns() - t0_ns) / 1e9;
}

static void observe(struct hist *h, double v)
{
    for (unsigned i = 0; i < h->nb; i++) {
        if (v <= h->bounds[i]) {
            h->bucket[i]++;
            break;
        }
    }
    h->count++;
    h->sum += v;
}

/* The loaded model called name, or NULL. Lock held. */
static struct mmodel *model_named(const char *name)
{
    for (int i = 0; name && i < METRICS_MAX_MODELS; i++)
        if (M.models[i].used && strcmp(M.models[i].name, name) == 0)
            return &M.models[i];
    return NULL;
}

/* The model whose slot it is, or NULL. Lock held. */
static struct mmodel *slot_owner(uint32_t slot)
{
    return M.on && slot < M.nslots && M.slot_model[slot] >= 0 ? &M.models[M.slot_model[slot]]
                                                              : NULL;
}

void metrics_request_done(const char *model, int code, double seconds, uint32_t rows,
                          size_t bytes_in, size_t bytes_out)
{
    struct mmodel *m;

    pthread_mutex_lock(&M.lock);
    if (!M.on)
        goto out;
    if (code < 0 || code >= NCODES)
        code = 2; /* UNKNOWN */
    m = model_named(model);
    if (!m) {
        M.other[code]++;
    } else {
        struct timespec now;
        struct metrics_duration *d = code == 0 ? &m->st.success : &m->st.fail;

        m->requests[code]++;
        observe(&m->latency, seconds);
        m->rows += rows;
        d->count++;
        d->ns += (uint64_t)(seconds * 1e9);
        if (code == 0)
            m->st.inference_count += rows;
        clock_gettime(CLOCK_REALTIME, &now);
        m->st.last_inference_ms = (uint64_t)now.tv_sec * 1000 + (uint64_t)now.tv_nsec / 1000000;
    }
    M.bytes_in += bytes_in;
    M.bytes_out += bytes_out;
out:
    pthread_mutex_unlock(&M.lock);
}

void metrics_job_fill(uint32_t slot, int64_t ns)
{
    pthread_mutex_lock(&M.lock);
    if (slot_owner(slot))
        M.job_fill_ns[slot] = ns;
    pthread_mutex_unlock(&M.lock);
}

void metrics_job_start(uint32_t slot, uint32_t rows)
{
    int64_t now = metrics_now_ns();
    struct mmodel *m;

    pthread_mutex_lock(&M.lock);
    if ((m = slot_owner(slot))) {
        M.job_t0[slot] = now;
        M.job_rows[slot] = rows;
        m->jobs++;
        observe(&m->batch, rows);
    }
    pthread_mutex_unlock(&M.lock);
}

/* The statistics of batch size rows, made when first seen (sorted); NULL past MAX_BATCH_SIZES
 * sizes. Lock held. */
static struct metrics_batch_stats *batch_of(struct mmodel *m, uint32_t rows)
{
    size_t lo = 0, hi = m->nbatch;

    while (lo < hi) {
        size_t mid = (lo + hi) / 2;

        if (m->by_size[mid].batch_size < rows)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo < m->nbatch && m->by_size[lo].batch_size == rows)
        return &m->by_size[lo];
    if (m->nbatch == MAX_BATCH_SIZES)
        return NULL;
    memmove(&m->by_size[lo + 1], &m->by_size[lo], (m->nbatch - lo) * sizeof(m->by_size[0]));
    m->nbatch++;
    m->by_size[lo] = (struct metrics_batch_stats){.batch_size = rows};
    return &m->by_size[lo];
}

void metrics_job_done(uint32_t slot, uint32_t collectives, int ok)
{
    int64_t now = metrics_now_ns();
    struct mmodel *m;

    pthread_mutex_lock(&M.lock);
    m = slot_owner(slot);
    if (m)
        m->collectives += collectives;
    if (m && M.job_t0[slot] > 0) {
        uint64_t infer = (uint64_t)(now - M.job_t0[slot]), fill = (uint64_t)M.job_fill_ns[slot];
        struct metrics_batch_stats *b;

        observe(&m->compute, (double)infer / 1e9);
        M.job_infer_ns[slot] = (int64_t)infer;
        if (ok) {
            m->st.execution_count++;
            if ((b = batch_of(m, M.job_rows[slot]))) {
                b->compute_input.count++;
                b->compute_input.ns += fill;
                b->compute_infer.count++;
                b->compute_infer.ns += infer;
                b->compute_output.count++; /* its requests add their times */
            }
        }
    }
    pthread_mutex_unlock(&M.lock);
}

void metrics_request_served(uint32_t slot, int64_t t0_ns, int64_t ns)
{
    struct metrics_batch_stats *b;
    struct mmodel *m;

    pthread_mutex_lock(&M.lock);
    m = slot_owner(slot);
    if (m && M.job_t0[slot] >= t0_ns) {
        observe(&m->queue, (double)(M.job_t0[slot] - t0_ns) / 1e9);
        m->st.queue.count++;
        m->st.queue.ns += (uint64_t)(M.job_t0[slot] - t0_ns);
    }
    if (m) {
        /* all three at once, so that a reader never sees them apart (perf_analyzer insists);
         * as Triton does, every request of a job is charged the job's input and infer time */
        m->st.compute_input.count++;
        m->st.compute_input.ns += (uint64_t)M.job_fill_ns[slot];
        m->st.compute_infer.count++;
        m->st.compute_infer.ns += (uint64_t)M.job_infer_ns[slot];
        m->st.compute_output.count++;
        m->st.compute_output.ns += (uint64_t)ns;
        if ((b = batch_of(m, M.job_rows[slot])))
            b->compute_output.ns += (uint64_t)ns;
    }
    pthread_mutex_unlock(&M.lock);
}

void metrics_set_pending(metrics_pending_fn fn, void *ctx)
{
    pthread_mutex_lock(&M.lock);
    M.pending = fn;
    M.pending_ctx = ctx;
    pthread_mutex_unlock(&M.lock);
}

int metrics_get_stats(int id, struct metrics_stats *st)
{
    const struct mmodel *m;

    *st = (struct metrics_stats){0};
    pthread_mutex_lock(&M.lock);
    m = id >= 0 && id < METRICS_MAX_MODELS ? &M.models[id] : NULL;
    if (!M.on || !m || !m->used) {
        pthread_mutex_unlock(&M.lock);
        return -1;
    }
    *st = m->st;
    st->batch = malloc((m->nbatch ? m->nbatch : 1) * sizeof(*st->batch));
    if (st->batch) {
        memcpy(st->batch, m->by_size, m->nbatch * sizeof(*st->batch));
        st->nbatch = m->nbatch;
    }
    pthread_mutex_unlock(&M.lock);
    return st->batch ? 0 : -1;
}

void metrics_worker_up(int rank, int up)
{
    pthread_mutex_lock(&M.lock);
    if (M.on && rank >= 0 && rank < M.nranks)
        M.up[rank] = up != 0;
    pthread_mutex_unlock(&M.lock);
}

void metrics_worker_restart(int rank)
{
    pthread_mutex_lock(&M.lock);
    if (M.on && rank >= 0 && rank < M.nranks)
        M.restarts[rank]++;
    pthread_mutex_unlock(&M.lock);
}

/* A label value with \, " and newline escaped, as the exposition format requires. */
static void put_label(FILE *f, const char *s)
{
    for (; *s; s++) {
        if (*s == '\\' || *s == '"')
            fputc('\\', f), fputc(*s, f);
        else if (*s == '\n')
            fputs("\\n", f);
        else
            fputc(*s, f);
    }
}

static void head(FILE *f, const char *name, const char *type, const char *help)
{
    fprintf(f, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* "name{model="M"" of one series, its labels still open. */
static void series(FILE *f, const char *name, const char *suffix, const struct mmodel *m)
{
    fprintf(f, "%s%s{model=\"", name, suffix);
    put_label(f, m->name);
    fputc('"', f);
}

/* A histogram family: every loaded model's series, the histogram at offset off in its struct. */
static void put_hist(FILE *f, const char *name, const char *help, size_t off)
{
    head(f, name, "histogram", help);
    for (int i = 0; i < METRICS_MAX_MODELS; i++) {
        const struct mmodel *m = &M.models[i];
        const struct hist *h = (const struct hist *)(const void *)((const char *)m + off);
        uint64_t cum = 0;

        if (!m->used)
            continue;
        for (unsigned b = 0; b < h->nb; b++) {
            cum += h->bucket[b];
            series(f, name, "_bucket", m);
            fprintf(f, ",le=\"%g\"} %llu\n", h->bounds[b], (unsigned long long)cum);
        }
        series(f, name, "_bucket", m);
        fprintf(f, ",le=\"+Inf\"} %llu\n", (unsigned long long)h->count);
        series(f, name, "_sum", m);
        fprintf(f, "} %.9g\n", h->sum);
        series(f, name, "_count", m);
        fprintf(f, "} %llu\n", (unsigned long long)h->count);
    }
}

static uint32_t pending_now[METRICS_MAX_MODELS]; /* asked before the lock, per scrape */

/* What a family of one value per model counts. */
enum value_of {
    V_ROWS,
    V_COLLECTIVES,
    V_SUCCESS,
    V_FAILURE,
    V_COUNT,
    V_EXEC,
    V_REQUEST_US,
    V_QUEUE_US,
    V_INPUT_US,
    V_INFER_US,
    V_OUTPUT_US,
    V_PENDING
};

struct family {
    const char *name, *type, *help;
    enum value_of v;
};

/* tpd's own families of one value per model, and Triton's, which its dashboards read, from the
 * statistics above (with Triton's version label). */
static const struct family own_families[] = {
    {"tpd_request_rows_total", "counter", "Rows carried by ModelInfer requests", V_ROWS},
    {"tpd_collectives_total", "counter",
     "Collectives the ranks ran for finished jobs: one all-reduce per job of a row layer or "
     "block, one all-gather per job with the NCCL gather",
     V_COLLECTIVES},
};

static const struct family triton_families[] = {
    {"nv_inference_request_success", "counter",
     "Number of successful inference requests, all batch sizes", V_SUCCESS},
    {"nv_inference_request_failure", "counter",
     "Number of failed inference requests, all batch sizes", V_FAILURE},
    {"nv_inference_count", "counter",
     "Number of inferences performed (a request of N rows counts N)", V_COUNT},
    {"nv_inference_exec_count", "counter",
     "Number of model executions performed (a batch of requests counts 1)", V_EXEC},
    {"nv_inference_request_duration_us", "counter",
     "Cumulative inference request duration in microseconds", V_REQUEST_US},
    {"nv_inference_queue_duration_us", "counter",
     "Cumulative inference queuing duration in microseconds", V_QUEUE_US},
    {"nv_inference_compute_input_duration_us", "counter",
     "Cumulative compute input duration in microseconds", V_INPUT_US},
    {"nv_inference_compute_infer_duration_us", "counter",
     "Cumulative compute inference duration in microseconds", V_INFER_US},
    {"nv_inference_compute_output_duration_us", "counter",
     "Cumulative inference compute output duration in microseconds", V_OUTPUT_US},
    {"nv_inference_pending_request_count", "gauge",
     "Instantaneous number of pending requests awaiting execution per-model", V_PENDING},
};

static uint64_t value(const struct mmodel *m, int id, enum value_of v)
{
    const struct metrics_stats *st = &m->st;

    switch (v) {
    case V_ROWS: return m->rows;
    case V_COLLECTIVES: return m->collectives;
    case V_SUCCESS: return st->success.count;
    case V_FAILURE: return st->fail.count;
    case V_COUNT: return st->inference_count;
    case V_EXEC: return st->execution_count;
    case V_REQUEST_US: return (st->success.ns + st->fail.ns) / 1000;
    case V_QUEUE_US: return st->queue.ns / 1000;
    case V_INPUT_US: return st->compute_input.ns / 1000;
    case V_INFER_US: return st->compute_infer.ns / 1000;
    case V_OUTPUT_US: return st->compute_output.ns / 1000;
    case V_PENDING: return pending_now[id];
    }
    return 0;
}

/* n families of one value per loaded model, each series labelled with its model, and with
 * Triton's version label when nv. Lock held. */
static void put_families(FILE *f, const struct family *fam, size_t n, int nv)
{
    for (size_t k = 0; k < n; k++) {
        head(f, fam[k].name, fam[k].type, fam[k].help);
        for (int i = 0; i < METRICS_MAX_MODELS; i++) {
            if (!M.models[i].used)
                continue;
            series(f, fam[k].name, "", &M.models[i]);
            fprintf(f, "%s} %llu\n", nv ? ",version=\"1\"" : "",
                    (unsigned long long)value(&M.models[i], i, fam[k].v));
        }
    }
}

char *metrics_render(size_t *len)
{
    static pthread_mutex_t render_lock = PTHREAD_MUTEX_INITIALIZER; /* guards pending_now */
    char *buf = NULL;
    size_t n = 0;
    FILE *f = open_memstream(&buf, &n);
    metrics_pending_fn pending_fn;

    if (!f)
        return NULL;
    pthread_mutex_lock(&render_lock);
    pending_fn = M.pending; /* set once at start, before any scrape */
    for (int i = 0; i < METRICS_MAX_MODELS; i++)
        pending_now[i] = pending_fn ? pending_fn(M.pending_ctx, i) : 0;
    pthread_mutex_lock(&M.lock);
    head(f, "tpd_requests_total", "counter",
         "ModelInfer calls answered, by model and gRPC status code");
    for (int i = 0; i < METRICS_MAX_MODELS; i++) {
        const struct mmodel *m = &M.models[i];

        for (int c = 0; m->used && c < NCODES; c++) {
            /* OK of a loaded model always exists, so that rate() has a series from the start */
            if (!m->requests[c] && c)
                continue;
            series(f, "tpd_requests_total", "", m);
            fprintf(f, ",code=\"%s\"} %llu\n", code_names[c], (unsigned long long)m->requests[c]);
        }
    }
    for (int c = 0; c < NCODES; c++)
        if (M.other[c])
            fprintf(f, "tpd_requests_total{model=\"\",code=\"%s\"} %llu\n", code_names[c],
                    (unsigned long long)M.other[c]);
    put_hist(f, "tpd_request_duration_seconds",
             "Time from a ModelInfer call's arrival to its reply, any status",
             offsetof(struct mmodel, latency));
    put_hist(f, "tpd_request_queue_seconds",
             "Time a successful request waited from arrival until its job went to the workers",
             offsetof(struct mmodel, queue));
    put_hist(f, "tpd_compute_seconds",
             "Time from a job's dispatch to the workers until every rank finished it",
             offsetof(struct mmodel, compute));
    put_hist(f, "tpd_batch_rows", "Rows of each job dispatched to the workers",
             offsetof(struct mmodel, batch));
    put_families(f, own_families, sizeof(own_families) / sizeof(own_families[0]), 0);
    head(f, "tpd_received_bytes_total", "counter", "Bytes of ModelInfer request messages");
    fprintf(f, "tpd_received_bytes_total %llu\n", (unsigned long long)M.bytes_in);
    head(f, "tpd_sent_bytes_total", "counter", "Bytes of ModelInfer response messages");
    fprintf(f, "tpd_sent_bytes_total %llu\n", (unsigned long long)M.bytes_out);
    put_families(f, triton_families, sizeof(triton_families) / sizeof(triton_families[0]), 1);
    head(f, "tpd_worker_up", "gauge", "1 while the worker of this rank is running");
    for (int r = 0; r < M.nranks; r++)
        fprintf(f, "tpd_worker_up{rank=\"%d\"} %d\n", r, M.up[r]);
    head(f, "tpd_worker_restarts_total", "counter",
         "Times the worker of this rank was started again after its group went down");
    for (int r = 0; r < M.nranks; r++)
        fprintf(f, "tpd_worker_restarts_total{rank=\"%d\"} %llu\n", r,
                (unsigned long long)M.restarts[r]);
    pthread_mutex_unlock(&M.lock);
    pthread_mutex_unlock(&render_lock);
    if (fclose(f) != 0) {
        free(buf);
        return NULL;
    }
    *len = n;
    return buf;
}

/* ---- HTTP ----
 * A small HTTP/1.x server of tpd's own. The one thing it must do under any load is answer a
 * health probe within a second; libmicrohttpd's only defence against slow clients is an idle
 * timeout, which a client that trickles one header line every few seconds resets forever, so 70
 * such clients held its 64 connections and every probe timed out. Here:
 *  - a connection's whole request head must arrive within HTTP_HEAD_MS of its accept, however
 *    it trickles, and its whole response must leave within HTTP_SEND_MS;
 *  - with HTTP_MAX_CONNS open, a new connection closes the oldest one still sending its head
 *    (or, if none is, the oldest of all): a newcomer, such as a prober, always gets in, and
 *    is read at once, since its request has usually arrived with it;
 *  - one request per connection (Connection: close), so no idle connection is ever kept; a
 *    handshake per probe or scrape costs nothing on this port.
 * One thread polls the listening socket, an eventfd that stops it, and the connections. */

#define HTTP_MAX_CONNS 64
#define HTTP_HEAD_MAX 8192 /* bytes of a request head (request line and headers) */
#define HTTP_HEAD_MS 5000  /* from accept until the head is complete */
#define HTTP_SEND_MS 10000 /* from the head until the response has left */
/* after the response, what the client still sends is read for up to this long, so that closing
 * does not reset the connection before the client read its answer */
#define HTTP_LINGER_MS 1000
#define HTTP_ACCEPT_PAUSE_MS 100 /* accept failed for lack of descriptors or memory */
#define HTTP_PATH_MAX 1024       /* bytes of a decoded request path */

enum conn_state { C_FREE, C_HEAD, C_SEND, C_LINGER };

struct http_conn {
    enum conn_state state;
    int fd;
    int64_t t0_ns;       /* accepted, metrics_now_ns() */
    int64_t deadline_ns; /* of the current state */
    size_t nhead;        /* bytes of head[] received */
    char head[HTTP_HEAD_MAX + 1];
    char *out; /* the response, status line to body; malloc'ed */
    size_t nout, sent;
};

struct metrics_server {
    int lfd;  /* listening socket */
    int wake; /* eventfd: metrics_server_stop ends the thread through it */
    pthread_t thread;
    int thread_started;
    metrics_ready_fn ready;
    metrics_model_ready_fn model_ready;
    void *ctx;
    int64_t accept_paused_until_ns;
    int64_t accept_warned_ns; /* last warning about a failed accept */
    struct http_conn conns[HTTP_MAX_CONNS];
};

static void conn_close(struct http_conn *c)
{
    close(c->fd);
    free(c->out);
    c->state = C_FREE;
    c->fd = -1;
    c->out = NULL;
}

static const char *reason(unsigned status)
{
    switch (status) {
    case 200: return "OK";
    case 400: return "Bad Request";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 431: return "Request Header Fields Too Large";
    case 503: return "Service Unavailable";
    default: return "Internal Server Error";
    }
}

/* Puts the response into c->out and starts sending it: body of len bytes (its headers only for
 * HEAD, with the same Content-Length). */
static void respond(struct http_conn *c, unsigned status, const char *type, const char *body,
                    size_t len, int head_only)
{
    char hdr[256];
    int n =
        snprintf(hdr, sizeof(hdr),
                 "HTTP/1.1 %u %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n%s"
                 "Connection: close\r\n\r\n",
                 status, reason(status), type, len, status == 405 ? "Allow: GET, HEAD\r\n" : "");
    size_t blen = head_only ? 0 : len;

    c->out = malloc((size_t)n + blen);
    if (!c->out) {
        conn_close(c);
        return;
    }
    memcpy(c->out, hdr, (size_t)n);
    if (blen)
        memcpy(c->out + n, body, blen);
    c->nout = (size_t)n + blen;
    c->sent = 0;
    c->state = C_SEND;
    c->deadline_ns = metrics_now_ns() + (int64_t)HTTP_SEND_MS * 1000000;
}

static void respond_text(struct http_conn *c, unsigned status, const char *text, int head_only)
{
    respond(c, status, "text/plain; charset=utf-8", text, strlen(text), head_only);
}

/* The path of a request target ("/v2/models/a%20b/ready?x" -> "/v2/models/a b/ready"), percent
 * decoded, without query or fragment. -1 for a target that is not a path, a bad or NUL escape,
 * or one too long. */
static int decode_path(const char *t, size_t n, char *path)
{
    size_t o = 0;

    if (n == 0 || t[0] != '/')
        return -1;
    for (size_t i = 0; i < n && t[i] != '?' && t[i] != '#'; i++) {
        char ch = t[i];

        if (ch == '%') {
            int hi = i + 2 < n ? tcp_hex_digit(t[i + 1]) : -1,
                lo = hi >= 0 ? tcp_hex_digit(t[i + 2]) : -1;

            if (lo < 0 || (hi == 0 && lo == 0))
                return -1;
            ch = (char)(hi << 4 | lo);
            i += 2;
        }
        if (o + 1 >= HTTP_PATH_MAX)
            return -1;
        path[o++] = ch;
    }
    path[o] = '\0';
    return 0;
}

/* Splits what follows "/v2/models/": "NAME/ready" or "NAME/versions/V/ready". Returns 1 for
 * either form, with the name's length and whether the version is tpd's one version, "1". */
static int model_ready_path(const char *p, size_t *name_len, int *version_ok)
{
    const char *slash = strchr(p, '/');

    if (!slash || slash == p)
        return 0;
    *name_len = (size_t)(slash - p);
    if (strcmp(slash, "/ready") == 0) {
        *version_ok = 1;
        return 1;
    }
    if (strncmp(slash, "/versions/", 10) == 0) {
        const char *v = slash + 10, *end = strchr(v, '/');

        if (!end || strcmp(end, "/ready") != 0)
            return 0;
        *version_ok = (size_t)(end - v) == 1 && v[0] == '1';
        return 1;
    }
    return 0;
}

/* Answers the complete head in c->head: its request line only, since no request here reads a
 * header or a body (a body is read and dropped while the connection lingers). */
static void answer(struct metrics_server *s, struct http_conn *c)
{
    char path[HTTP_PATH_MAX];
    const char *line = c->head, *eol = strchr(line, '\n');
    const char *sp1 = memchr(line, ' ', (size_t)(eol - line)), *sp2;
    size_t len = (size_t)(eol - line), name_len;
    int head_only, version_ok;

    if (len && line[len - 1] == '\r')
        len--;
    sp2 = sp1 ? memchr(sp1 + 1, ' ', len - (size_t)(sp1 + 1 - line)) : NULL;
    if (!sp1 || !sp2 || (size_t)(line + len - (sp2 + 1)) != 8 ||
        strncmp(sp2 + 1, "HTTP/1.", 7) != 0 ||
        decode_path(sp1 + 1, (size_t)(sp2 - sp1 - 1), path) < 0) {
        respond_text(c, 400, "bad request line\n", 0);
        return;
    }
    head_only = (size_t)(sp1 - line) == 4 && memcmp(line, "HEAD", 4) == 0;
    if (!head_only && !((size_t)(sp1 - line) == 3 && memcmp(line, "GET", 3) == 0)) {
        respond_text(c, 405, "only GET and HEAD\n", 0);
        return;
    }
    if (strcmp(path, "/metrics") == 0) {
        size_t n = 0;
        char *body = metrics_render(&n);

        if (!body) {
            respond_text(c, 500, "out of memory\n", head_only);
            return;
        }
        respond(c, 200, "text/plain; version=0.0.4; charset=utf-8", body, n, head_only);
        free(body);
        return;
    }
    if (strcmp(path, "/v2/health/live") == 0) {
        respond_text(c, 200, "live\n", head_only);
        return;
    }
    if (strcmp(path, "/v2/health/ready") == 0) {
        if (s->ready(s->ctx))
            respond_text(c, 200, "ready\n", head_only);
        else
            respond_text(c, 503, "not ready\n", head_only);
        return;
    }
    if (strncmp(path, "/v2/models/", 11) == 0 &&
        model_ready_path(path + 11, &name_len, &version_ok)) {
        char name[256];
        int r = -1;

        if (version_ok && name_len < sizeof(name)) {
            memcpy(name, path + 11, name_len);
            name[name_len] = '\0';
            r = s->model_ready(s->ctx, name);
        }
        if (r < 0)
            respond_text(c, 404, "unknown model or version\n", head_only);
        else if (r)
            respond_text(c, 200, "ready\n", head_only);
        else
            respond_text(c, 503, "not ready\n", head_only);
        return;
    }
    respond_text(c, 404,
                 "not found: tpd serves /metrics, /v2/health/live, /v2/health/ready and "
                 "/v2/models/NAME/ready\n",
                 head_only);
}

/* Where the head ends (after its empty line, "\r\n\r\n" or a lenient "\n\n"), or NULL. */
static const char *head_end(const char *h)
{
    for (const char *p = strchr(h, '\n'); p; p = strchr(p + 1, '\n'))
        if (p[1] == '\n' || (p[1] == '\r' && p[2] == '\n'))
            return p;
    return NULL;
}

static void on_send(struct http_conn *c)
{
    while (c->sent < c->nout) {
        ssize_t k = send(c->fd, c->out + c->sent, c->nout - c->sent, MSG_NOSIGNAL);

        if (k < 0 && errno == EINTR)
            continue;
        if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return;
        if (k <= 0) {
            conn_close(c);
            return;
        }
        c->sent += (size_t)k;
    }
    free(c->out);
    c->out = NULL;
    shutdown(c->fd, SHUT_WR);
    c->state = C_LINGER;
    c->deadline_ns = metrics_now_ns() + (int64_t)HTTP_LINGER_MS * 1000000;
}

/* Reads what has arrived: more of the head, or (lingering) what is left to drop. */
static void on_read(struct metrics_server *s, struct http_conn *c)
{
    for (;;) {
        char drop[4096];
        ssize_t k = c->state == C_HEAD
                        ? recv(c->fd, c->head + c->nhead, HTTP_HEAD_MAX - c->nhead, 0)
                        : recv(c->fd, drop, sizeof(drop), 0);

        if (k < 0 && errno == EINTR)
            continue;
        if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return;
        if (k <= 0) { /* gone, or done after its answer */
            conn_close(c);
            return;
        }
        if (c->state != C_HEAD)
            continue;
        c->nhead += (size_t)k;
        c->head[c->nhead] = '\0';
        if (memchr(c->head + c->nhead - (size_t)k, '\0', (size_t)k)) {
            respond_text(c, 400, "NUL byte in the request head\n", 0);
        } else if (head_end(c->head)) {
            answer(s, c);
        } else if (c->nhead == HTTP_HEAD_MAX) {
            respond_text(c, 431, "request head over 8192 bytes\n", 0);
        } else {
            continue;
        }
        if (c->state == C_SEND)
            on_send(c);
        return;
    }
}

/* A slot for a new connection: a free one, or the one of the oldest connection still sending
 * its head (the kind a slow client holds), else of the oldest of all, closed for it. */
static struct http_conn *make_room(struct metrics_server *s)
{
    struct http_conn *victim = NULL;

    for (int i = 0; i < HTTP_MAX_CONNS; i++) {
        struct http_conn *c = &s->conns[i];

        if (c->state == C_FREE)
            return c;
        if (!victim || (c->state == C_HEAD && victim->state != C_HEAD) ||
            ((c->state == C_HEAD) == (victim->state == C_HEAD) && c->t0_ns < victim->t0_ns))
            victim = c;
    }
    tp_log(TP_LOG_DEBUG,
           "metrics http: %d connections open: closing the oldest one %s (%zu bytes of its head "
           "in %lld ms) for a new one",
           HTTP_MAX_CONNS, victim->state == C_HEAD ? "still sending its head" : "of all",
           victim->nhead, (long long)((metrics_now_ns() - victim->t0_ns) / 1000000));
    conn_close(victim);
    return victim;
}

static void on_accept(struct metrics_server *s)
{
    for (int n = 0; n < 4 * HTTP_MAX_CONNS; n++) {
        int fd = accept4(s->lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        struct http_conn *c;
        int64_t now = metrics_now_ns();

        if (fd < 0 && (errno == EINTR || errno == ECONNABORTED))
            continue;
        if (fd < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return;
        if (fd < 0) {
            /* out of descriptors or memory: the backlog waits, and the thread does not spin */
            if (now - s->accept_warned_ns > 10 * (int64_t)1000000000) {
                tp_log(TP_LOG_WARN, "metrics http: accepting a connection: %s; pausing %d ms",
                       strerror(errno), HTTP_ACCEPT_PAUSE_MS);
                s->accept_warned_ns = now;
            }
            s->accept_paused_until_ns = now + (int64_t)HTTP_ACCEPT_PAUSE_MS * 1000000;
            return;
        }
        c = make_room(s);
        c->state = C_HEAD;
        c->fd = fd;
        c->t0_ns = now;
        c->deadline_ns = now + (int64_t)HTTP_HEAD_MS * 1000000;
        c->nhead = 0;
        c->head[0] = '\0';
        on_read(s, c);
    }
}

/* Closes the connections past their deadline; returns the nearest deadline of the others. */
static int64_t expire(struct metrics_server *s, int64_t now)
{
    int64_t next = now + 1000000000;

    for (int i = 0; i < HTTP_MAX_CONNS; i++) {
        struct http_conn *c = &s->conns[i];

        if (c->state == C_FREE)
            continue;
        if (now >= c->deadline_ns) {
            if (c->state != C_LINGER)
                tp_log(TP_LOG_DEBUG,
                       "metrics http: closing a connection that %s within %d ms (%zu bytes of "
                       "its head)",
                       c->state == C_HEAD ? "did not send its request head"
                                          : "did not take its response",
                       c->state == C_HEAD ? HTTP_HEAD_MS : HTTP_SEND_MS, c->nhead);
            conn_close(c);
            continue;
        }
        if (c->deadline_ns < next)
            next = c->deadline_ns;
    }
    return next;
}

static void *http_thread(void *arg)
{
    struct metrics_server *s = arg;
    struct pollfd pf[2 + HTTP_MAX_CONNS];
    int idx[HTTP_MAX_CONNS]; /* pf[2 + j] is conns[idx[j]] */

    for (;;) {
        int64_t now = metrics_now_ns(), next = expire(s, now);
        int nc = 0, listening = now >= s->accept_paused_until_ns, r;

        if (!listening && s->accept_paused_until_ns < next)
            next = s->accept_paused_until_ns;
        pf[0] = (struct pollfd){.fd = s->wake, .events = POLLIN};
        pf[1] = (struct pollfd){.fd = listening ? s->lfd : -1, .events = POLLIN};
        for (int i = 0; i < HTTP_MAX_CONNS; i++) {
            if (s->conns[i].state == C_FREE)
                continue;
            pf[2 + nc] = (struct pollfd){.fd = s->conns[i].fd,
                                         .events = s->conns[i].state == C_SEND ? POLLOUT : POLLIN};
            idx[nc++] = i;
        }
        r = poll(pf, (nfds_t)(2 + nc), (int)((next - now + 999999) / 1000000));
        if (r < 0 && errno != EINTR) {
            tp_log(TP_LOG_WARN, "metrics http: poll: %s", strerror(errno));
            usleep(100000);
            continue;
        }
        if (r <= 0)
            continue;
        if (pf[0].revents)
            break;
        /* the connections first: accepting may reuse their slots */
        for (int j = 0; j < nc; j++) {
            struct http_conn *c = &s->conns[idx[j]];

            if (!pf[2 + j].revents || c->fd != pf[2 + j].fd)
                continue;
            if (c->state == C_SEND)
                on_send(c);
            else
                on_read(s, c);
        }
        if (pf[1].revents)
            on_accept(s);
    }
    return NULL;
}

int metrics_server_start(struct metrics_server **out, const char *addr, metrics_ready_fn ready,
                         metrics_model_ready_fn model_ready, void *ctx, struct tp_err *err)
{
    struct metrics_server *s = calloc(1, sizeof(*s));
    char shown[300];
    int e;

    *out = NULL;
    if (!s)
        return tp_err_set(err, TP_ENOMEM, "no memory for the metrics server");
    s->ready = ready;
    s->model_ready = model_ready;
    s->ctx = ctx;
    s->wake = -1;
    for (int i = 0; i < HTTP_MAX_CONNS; i++)
        s->conns[i].fd = -1;
    s->lfd = tcp_listen(addr, "--metrics-listen", "metrics", shown, sizeof(shown), err);
    if (s->lfd < 0)
        goto fail;
    tp_log(TP_LOG_NOTICE, "metrics and health on http://%s/metrics", shown);
    s->wake = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (s->wake < 0) {
        tp_err_sys(err, "metrics server on %s: eventfd", addr);
        goto fail;
    }
    e = pthread_create(&s->thread, NULL, http_thread, s);
    if (e != 0) {
        tp_err_set(err, TP_ESYS, "cannot start the metrics server thread for %s: %s", addr,
                   strerror(e));
        goto fail;
    }
    s->thread_started = 1;
    *out = s;
    return 0;
fail:
    metrics_server_stop(s);
    return -1;
}

void metrics_server_stop(struct metrics_server *s)
{
    if (!s)
        return;
    if (s->thread_started) {
        uint64_t one = 1;

        if (write(s->wake, &one, sizeof(one)) != sizeof(one))
            tp_log(TP_LOG_WARN, "metrics http: cannot wake the server thread: %s", strerror(errno));
        pthread_join(s->thread, NULL);
    }
    for (int i = 0; i < HTTP_MAX_CONNS; i++)
        if (s->conns[i].state != C_FREE)
            conn_close(&s->conns[i]);
    if (s->lfd >= 0)
        close(s->lfd);
    if (s->wake >= 0)
        close(s->wake);
    free(s);
}
