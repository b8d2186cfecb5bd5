/* metrics.c -- counters, histograms and the HTTP server of tpd (see metrics.h). One mutex guards
 * every counter: events are a few per request and the critical sections a handful of additions,
 * so a lock is cheaper to get right than a set of atomics that a scrape would read torn (a
 * histogram's buckets, _sum and _count must agree). The HTTP server is libmicrohttpd with one
 * internal thread; it renders the exposition under the same lock. */
#include "metrics.h"

#include <errno.h>
#include <netdb.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <microhttpd.h>

#include "log.h"

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

static struct {
    pthread_mutex_t lock;
    int on; /* metrics_init succeeded */
    char model[128];
    int nranks;
    uint32_t nslots;
    uint64_t requests[2][NCODES]; /* [0] the served model, [1] any other name */
    uint64_t rows, bytes_in, bytes_out;
    struct hist latency, queue, compute, batch;
    int *up;            /* nranks */
    uint64_t *restarts; /* nranks */
    int64_t *job_t0;    /* nslots: when the slot's job was dispatched, ns */
    uint64_t jobs;      /* jobs dispatched */
} M = {.lock = PTHREAD_MUTEX_INITIALIZER};

int metrics_init(const char *model, int nranks, uint32_t nslots, struct tp_err *err)
{
    pthread_mutex_lock(&M.lock);
    snprintf(M.model, sizeof(M.model), "%s", model);
    M.nranks = nranks;
    M.nslots = nslots;
    M.up = calloc((size_t)nranks, sizeof(*M.up));
    M.restarts = calloc((size_t)nranks, sizeof(*M.restarts));
    M.job_t0 = calloc(nslots, sizeof(*M.job_t0));
    M.latency = (struct hist){.bounds = time_bounds, .nb = NTIME};
    M.queue = (struct hist){.bounds = time_bounds, .nb = NTIME};
    M.compute = (struct hist){.bounds = time_bounds, .nb = NTIME};
    M.batch = (struct hist){.bounds = row_bounds, .nb = NROWS};
    M.on = M.up && M.restarts && M.job_t0;
    pthread_mutex_unlock(&M.lock);
    if (!M.on)
        return tp_err_set(err, TP_ENOMEM, "no memory for the metrics");
    return 0;
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

void metrics_request_done(const char *model, int code, double seconds, uint32_t rows,
                          size_t bytes_in, size_t bytes_out)
{
    int other;

    pthread_mutex_lock(&M.lock);
    if (!M.on)
        goto out;
    other = !model || strcmp(model, M.model) != 0;
    if (code < 0 || code >= NCODES)
        code = 2; /* UNKNOWN */
    M.requests[other][code]++;
    if (!other) {
        observe(&M.latency, seconds);
        M.rows += rows;
    }
    M.bytes_in += bytes_in;
    M.bytes_out += bytes_out;
out:
    pthread_mutex_unlock(&M.lock);
}

void metrics_queue_time(uint32_t slot, int64_t t0_ns)
{
    pthread_mutex_lock(&M.lock);
    if (M.on && slot < M.nslots && M.job_t0[slot] >= t0_ns)
        observe(&M.queue, (double)(M.job_t0[slot] - t0_ns) / 1e9);
    pthread_mutex_unlock(&M.lock);
}

void metrics_job_start(uint32_t slot, uint32_t rows)
{
    int64_t now = metrics_now_ns();

    pthread_mutex_lock(&M.lock);
    if (M.on && slot < M.nslots) {
        M.job_t0[slot] = now;
        M.jobs++;
        observe(&M.batch, rows);
    }
    pthread_mutex_unlock(&M.lock);
}

void metrics_job_done(uint32_t slot)
{
    int64_t now = metrics_now_ns();

    pthread_mutex_lock(&M.lock);
    if (M.on && slot < M.nslots && M.job_t0[slot] > 0)
        observe(&M.compute, (double)(now - M.job_t0[slot]) / 1e9);
    pthread_mutex_unlock(&M.lock);
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

static void put_hist(FILE *f, const char *name, const char *help, const struct hist *h)
{
    uint64_t cum = 0;

    head(f, name, "histogram", help);
    for (unsigned i = 0; i < h->nb; i++) {
        cum += h->bucket[i];
        fprintf(f, "%s_bucket{model=\"", name);
        put_label(f, M.model);
        fprintf(f, "\",le=\"%g\"} %llu\n", h->bounds[i], (unsigned long long)cum);
    }
    fprintf(f, "%s_bucket{model=\"", name);
    put_label(f, M.model);
    fprintf(f, "\",le=\"+Inf\"} %llu\n", (unsigned long long)h->count);
    fprintf(f, "%s_sum{model=\"", name);
    put_label(f, M.model);
    fprintf(f, "\"} %.9g\n", h->sum);
    fprintf(f, "%s_count{model=\"", name);
    put_label(f, M.model);
    fprintf(f, "\"} %llu\n", (unsigned long long)h->count);
}

static void put_model_counter(FILE *f, const char *name, const char *help, uint64_t v)
{
    head(f, name, "counter", help);
    fprintf(f, "%s{model=\"", name);
    put_label(f, M.model);
    fprintf(f, "\"} %llu\n", (unsigned long long)v);
}

char *metrics_render(size_t *len)
{
    char *buf = NULL;
    size_t n = 0;
    FILE *f = open_memstream(&buf, &n);

    if (!f)
        return NULL;
    pthread_mutex_lock(&M.lock);
    head(f, "tpd_requests_total", "counter",
         "ModelInfer calls answered, by model and gRPC status code");
    for (int o = 0; o < 2; o++) {
        for (int c = 0; c < NCODES; c++) {
            /* OK of the served model always exists, so that rate() has a series from the start */
            if (!M.requests[o][c] && (o || c))
                continue;
            fputs("tpd_requests_total{model=\"", f);
            put_label(f, o ? "" : M.model);
            fprintf(f, "\",code=\"%s\"} %llu\n", code_names[c],
                    (unsigned long long)M.requests[o][c]);
        }
    }
    put_hist(f, "tpd_request_duration_seconds",
             "Time from a ModelInfer call's arrival to its reply, any status", &M.latency);
    put_hist(f, "tpd_request_queue_seconds",
             "Time a successful request waited from arrival until its job went to the workers",
             &M.queue);
    put_hist(f, "tpd_compute_seconds",
             "Time from a job's dispatch to the workers until every rank finished it", &M.compute);
    put_hist(f, "tpd_batch_rows", "Rows of each job dispatched to the workers", &M.batch);
    put_model_counter(f, "tpd_request_rows_total", "Rows carried by ModelInfer requests", M.rows);
    head(f, "tpd_received_bytes_total", "counter", "Bytes of ModelInfer request messages");
    fprintf(f, "tpd_received_bytes_total %llu\n", (unsigned long long)M.bytes_in);
    head(f, "tpd_sent_bytes_total", "counter", "Bytes of ModelInfer response messages");
    fprintf(f, "tpd_sent_bytes_total %llu\n", (unsigned long long)M.bytes_out);
    head(f, "tpd_worker_up", "gauge", "1 while the worker of this rank is running and loaded");
    for (int r = 0; r < M.nranks; r++)
        fprintf(f, "tpd_worker_up{rank=\"%d\"} %d\n", r, M.up[r]);
    head(f, "tpd_worker_restarts_total", "counter",
         "Times the worker of this rank was started again after its group went down");
    for (int r = 0; r < M.nranks; r++)
        fprintf(f, "tpd_worker_restarts_total{rank=\"%d\"} %llu\n", r,
                (unsigned long long)M.restarts[r]);
    pthread_mutex_unlock(&M.lock);
    if (fclose(f) != 0) {
        free(buf);
        return NULL;
    }
    *len = n;
    return buf;
}

/* ---- HTTP ---- */

struct metrics_server {
    struct MHD_Daemon *d;
    metrics_ready_fn ready;
    void *ctx;
};

static enum MHD_Result respond(struct MHD_Connection *conn, unsigned status, const char *type,
                               char *body, size_t len, enum MHD_ResponseMemoryMode mode)
{
    struct MHD_Response *r = MHD_create_response_from_buffer(len, body, mode);
    enum MHD_Result ret;

    if (!r)
        return MHD_NO;
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, type);
    ret = MHD_queue_response(conn, status, r);
    MHD_destroy_response(r);
    return ret;
}

static enum MHD_Result answer_text(struct MHD_Connection *conn, unsigned status, const char *text)
{
    return respond(conn, status, "text/plain; charset=utf-8", (char *)text, strlen(text),
                   MHD_RESPMEM_PERSISTENT);
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

static enum MHD_Result handle(void *cls, struct MHD_Connection *conn, const char *url,
                              const char *method, const char *version, const char *upload,
                              size_t *upload_size, void **con_cls)
{
    struct metrics_server *s = cls;
    size_t name_len;
    int version_ok;

    (void)version;
    (void)upload;
    (void)con_cls;
    if (*upload_size)
        return MHD_NO; /* no request here has a body */
    if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0)
        return answer_text(conn, MHD_HTTP_METHOD_NOT_ALLOWED, "only GET and HEAD\n");
    if (strcmp(url, "/metrics") == 0) {
        size_t len = 0;
        char *body = metrics_render(&len);

        if (!body)
            return answer_text(conn, MHD_HTTP_INTERNAL_SERVER_ERROR, "out of memory\n");
        return respond(conn, MHD_HTTP_OK, "text/plain; version=0.0.4; charset=utf-8", body, len,
                       MHD_RESPMEM_MUST_FREE);
    }
    if (strcmp(url, "/v2/health/live") == 0)
        return answer_text(conn, MHD_HTTP_OK, "live\n");
    if (strcmp(url, "/v2/health/ready") == 0)
        return s->ready(s->ctx) ? answer_text(conn, MHD_HTTP_OK, "ready\n")
                                : answer_text(conn, MHD_HTTP_SERVICE_UNAVAILABLE, "not ready\n");
    if (strncmp(url, "/v2/models/", 11) == 0 &&
        model_ready_path(url + 11, &name_len, &version_ok)) {
        if (!version_ok || name_len != strlen(M.model) || memcmp(url + 11, M.model, name_len) != 0)
            return answer_text(conn, MHD_HTTP_NOT_FOUND, "unknown model or version\n");
        return s->ready(s->ctx) ? answer_text(conn, MHD_HTTP_OK, "ready\n")
                                : answer_text(conn, MHD_HTTP_SERVICE_UNAVAILABLE, "not ready\n");
    }
    return answer_text(conn, MHD_HTTP_NOT_FOUND,
                       "not found: tpd serves /metrics, /v2/health/live, /v2/health/ready and "
                       "/v2/models/NAME/ready\n");
}

static void mhd_log(void *cls, const char *fmt, va_list ap)
{
    char msg[256];
    size_t n;

    (void)cls;
    vsnprintf(msg, sizeof(msg), fmt, ap);
    n = strlen(msg);
    while (n && (msg[n - 1] == '\n' || msg[n - 1] == '\r'))
        msg[--n] = '\0';
    tp_log(TP_LOG_WARN, "metrics http: %s", msg);
}

/* Binds and listens on addr; returns the socket, or -1 with err set. */
static int listen_on(const char *addr, struct tp_err *err)
{
    char host[256], serv[16], shown[300];
    const char *colon = strrchr(addr, ':');
    struct addrinfo hints = {.ai_flags = AI_PASSIVE | AI_NUMERICSERV, .ai_socktype = SOCK_STREAM};
    struct addrinfo *ai = NULL;
    struct sockaddr_storage sa;
    socklen_t salen = sizeof(sa);
    size_t hl;
    int fd = -1, one = 1, r;

    if (!colon || colon == addr || !colon[1] || strlen(colon + 1) >= sizeof(serv) ||
        (size_t)(colon - addr) >= sizeof(host))
        return tp_err_set(err, TP_EINVAL,
                          "--metrics-listen '%s' is not HOST:PORT (or 'off' to disable)", addr);
    hl = (size_t)(colon - addr);
    memcpy(host, addr, hl);
    host[hl] = '\0';
    if (host[0] == '[' && host[hl - 1] == ']') { /* [v6]:port */
        memmove(host, host + 1, hl - 2);
        host[hl - 2] = '\0';
    }
    snprintf(serv, sizeof(serv), "%s", colon + 1);
    if (strspn(serv, "0123456789") != strlen(serv) || atol(serv) > 65535)
        return tp_err_set(err, TP_EINVAL, "--metrics-listen '%s': port must be 0 to 65535", addr);
    r = getaddrinfo(host, serv, &hints, &ai);
    if (r != 0)
        return tp_err_set(err, TP_EINVAL, "--metrics-listen '%s': %s", addr, gai_strerror(r));
    fd = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0 ||
        bind(fd, ai->ai_addr, ai->ai_addrlen) < 0 || listen(fd, 64) < 0 ||
        getsockname(fd, (struct sockaddr *)&sa, &salen) < 0) {
        tp_err_sys(err, "cannot listen on %s for metrics (--metrics-listen)", addr);
        goto fail;
    }
    r = getnameinfo((struct sockaddr *)&sa, salen, host, sizeof(host), serv, sizeof(serv),
                    NI_NUMERICHOST | NI_NUMERICSERV);
    if (r == 0) {
        snprintf(shown, sizeof(shown), sa.ss_family == AF_INET6 ? "[%s]:%s" : "%s:%s", host, serv);
        tp_log(TP_LOG_NOTICE, "metrics and health on http://%s/metrics", shown);
    }
    freeaddrinfo(ai);
    return fd;
fail:
    if (fd >= 0)
        close(fd);
    freeaddrinfo(ai);
    return -1;
}

int metrics_server_start(struct metrics_server **out, const char *addr, metrics_ready_fn ready,
                         void *ctx, struct tp_err *err)
{
    struct metrics_server *s = calloc(1, sizeof(*s));
    int fd = -1;

    *out = NULL;
    if (!s)
        return tp_err_set(err, TP_ENOMEM, "no memory for the metrics server");
    s->ready = ready;
    s->ctx = ctx;
    fd = listen_on(addr, err);
    if (fd < 0)
        goto fail;
    s->d = MHD_start_daemon(MHD_USE_AUTO_INTERNAL_THREAD | MHD_USE_ERROR_LOG, 0, NULL, NULL, handle,
                            s, MHD_OPTION_EXTERNAL_LOGGER, mhd_log, NULL, MHD_OPTION_LISTEN_SOCKET,
                            fd, MHD_OPTION_CONNECTION_LIMIT, 64u, MHD_OPTION_CONNECTION_TIMEOUT,
                            10u, MHD_OPTION_END);
    if (!s->d) {
        tp_err_set(err, TP_ESYS, "cannot start the metrics server on %s", addr);
        goto fail;
    }
    *out = s;
    return 0;
fail:
    if (fd >= 0)
        close(fd);
    free(s);
    return -1;
}

void metrics_server_stop(struct metrics_server *s)
{
    if (!s)
        return;
    MHD_stop_daemon(s->d); /* closes the listening socket too */
    free(s);
}
