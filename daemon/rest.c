/* rest.c -- the KServe v2 REST API over libmicrohttpd (see rest.h). A request is read whole into
 * one buffer sized from its Content-Length (refused at once when that is too much), then routed.
 * An inference is read by restjson_infer, which decides as gRPC's ModelInfer does, and handed to
 * the scheduler; its connection is suspended while the job runs, the scheduler's completion
 * resumes it, and the answer is built on the server's thread. */
#include "rest.h"

#include <cjson/cJSON.h>
#include <gnutls/gnutls.h>
#include <grpc/status.h>
#include <inttypes.h>
#include <math.h>
#include <microhttpd.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>

#include "infer.h"
#include "log.h"
#include "pem.h"
#include "restjson.h"
#include "tcp.h"

#define REST_MAX_CONNS 256
#define REST_IDLE_S 30               /* a connection silent this long is closed */
#define REST_SMALL_BODY (64 << 10)   /* most bytes of any body but an inference's */
#define REST_CONN_MEMORY (128 << 10) /* per connection: headers and reads */

struct rest {
    struct MHD_Daemon *d;
    struct rest_config c;
    atomic_uint_fast64_t buffered; /* bytes of bodies held */
    atomic_int outstanding;        /* inferences accepted and not yet answered */
    atomic_int unsent;             /* inferences accepted whose request has not ended: the
                                      answer not sent whole, the connection not closed */
    atomic_int quiesced;
    char *cert, *key, *ca; /* PEM text of the TLS files, kept while the server runs */
    /* inferences waiting for their jobs, watched for their clients going away; the lock
     * (taken after a request's own, never before it) also guards their cancels and list links */
    pthread_mutex_t wlock;
    pthread_cond_t wcond;
    struct rest_req *waiting;
    int wstop, watching;
    pthread_t watcher;
};

enum route {
    R_NONE,
    R_SERVER_META,
    R_LIVE,
    R_READY,
    R_MODEL_META,
    R_MODEL_READY,
    R_MODEL_CONFIG,
    R_MODEL_STATS,
    R_ALL_STATS,
    R_INFER,
    R_INDEX,
    R_SHM_STATUS,
    R_SHM_REGISTER,
    R_SHM_UNREGISTER,
    R_CUDA_STATUS,
    R_CUDA_REGISTER,
    R_CUDA_UNREGISTER,
    R_REPO_LOAD,
    R_REPO_UNLOAD,
};

/* One HTTP request, from its first byte to the end of its answer (MHD's per-request pointer). */
struct rest_req {
    struct sched_req req; /* first: the scheduler's callbacks get back to the request from it */
    struct rest *rest;
    struct repo_model *rm; /* an inference's model, and its generation (repo_cancel) */
    uint64_t gen;
    struct MHD_Connection *conn;
    enum route route;
    char path[512];                     /* the URL's path, split in place at '/' */
    const char *model, *version, *name; /* in path: model and version, or the region's name */
    int post;                           /* a POST (else GET or HEAD) */
    char *body;                         /* the body as received */
    size_t len, cap;                    /* bytes received, and allocated */
    uint64_t charged;                   /* bytes charged to rest->buffered */
    int refused;                        /* answered before its body was read */
    int64_t t0_ns;                      /* arrival, metrics_now_ns() */
    /* an inference */
    struct restjson_infer inf;
    struct shmreg_region *in_reg, *out_reg;
    struct tp_err fill_err;
    pthread_mutex_t lock; /* orders the completion against the suspend and the request's end */
    int submitted, done, gone, answered;
    struct rest_req *wprev, *wnext; /* on rest->waiting while its job is to come */
    int listed, cancelled, cancels; /* cancels: the watcher's sched_cancel calls in progress */
    int free_later;                 /* the last of them frees it */
    const float *y;    /* the output in the slot (req.hold), after a successful completion */
    struct tp_err err; /* the completion's error */
};

/* ---- answers ---- */

static enum MHD_Result send_buf(struct MHD_Connection *conn, unsigned status, const char *type,
                                char *buf, size_t len)
{
    struct MHD_Response *resp = MHD_create_response_from_buffer(len, buf, MHD_RESPMEM_MUST_FREE);
    enum MHD_Result r;

    if (!resp) {
        free(buf);
        return MHD_NO;
    }
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, type);
    if (status == 405)
        MHD_add_response_header(resp, MHD_HTTP_HEADER_ALLOW, "GET, HEAD, POST");
    r = MHD_queue_response(conn, status, resp);
    MHD_destroy_response(resp);
    return r;
}

/* Sends j (taken) as the body. */
static enum MHD_Result send_json(struct MHD_Connection *conn, unsigned status, cJSON *j)
{
    char *s = j ? cJSON_PrintUnformatted(j) : NULL;

    cJSON_Delete(j);
    if (!s)
        return MHD_NO;
    return send_buf(conn, status, "application/json", s, strlen(s));
}

static enum MHD_Result send_error(struct MHD_Connection *conn, unsigned status, const char *msg)
{
    cJSON *j = cJSON_CreateObject();
    char clean[512];

    snprintf(clean, sizeof(clean), "%s", msg);
    restjson_clean_utf8(clean);
    if (j)
        cJSON_AddStringToObject(j, "error", clean);
    return send_json(conn, status, j);
}

static enum MHD_Result send_err(struct MHD_Connection *conn, const struct tp_err *err)
{
    return send_error(conn, restjson_status(tp_code_grpc(err->code)), err->msg);
}

static enum MHD_Result send_pb(struct MHD_Connection *conn, const ProtobufCMessage *m)
{
    return send_json(conn, 200, restjson_pb(m));
}

/* ---- routes ---- */

/* Splits path (a copy of the URL) into at most max segments; the count, or -1 when it does not
 * start with "/v2". */
static int split(char *path, char **seg, int max)
{
    int n = 0;

    if (strncmp(path, "/v2", 3) != 0 || (path[3] && path[3] != '/'))
        return -1;
    for (char *p = path + 1; p && n < max + 1;) {
        char *slash = strchr(p, '/');

        if (slash)
            *slash = '\0';
        if (n == max)
            return max + 1;
        seg[n++] = p;
        p = slash ? slash + 1 : NULL;
    }
    return n;
}

/* Finds q's route from its URL; R_NONE when there is none. */
static enum route route(struct rest_req *q, const char *url)
{
    char *s[8];
    int n;

    if (strlen(url) >= sizeof(q->path))
        return R_NONE;
    strcpy(q->path, url);
    n = split(q->path, s, 8);
    if (n < 1)
        return R_NONE;
    if (n == 1)
        return R_SERVER_META;
    if (n == 3 && strcmp(s[1], "health") == 0)
        return strcmp(s[2], "live") == 0 ? R_LIVE : strcmp(s[2], "ready") == 0 ? R_READY : R_NONE;
    if (n == 3 && strcmp(s[1], "repository") == 0 && strcmp(s[2], "index") == 0)
        return R_INDEX;
    if (n == 5 && strcmp(s[1], "repository") == 0 && strcmp(s[2], "models") == 0 && s[3][0]) {
        q->model = s[3];
        q->version = "";
        return strcmp(s[4], "load") == 0     ? R_REPO_LOAD
               : strcmp(s[4], "unload") == 0 ? R_REPO_UNLOAD
                                             : R_NONE;
    }
    if (strcmp(s[1], "systemsharedmemory") == 0 || strcmp(s[1], "cudasharedmemory") == 0) {
        int cuda = s[1][0] == 'c';
        const char *verb = s[n - 1];

        if (n == 5 && strcmp(s[2], "region") == 0 && s[3][0])
            q->name = s[3];
        else if (n != 3)
            return R_NONE;
        if (strcmp(verb, "status") == 0)
            return cuda ? R_CUDA_STATUS : R_SHM_STATUS;
        if (strcmp(verb, "unregister") == 0)
            return cuda ? R_CUDA_UNREGISTER : R_SHM_UNREGISTER;
        if (strcmp(verb, "register") == 0 && q->name)
            return cuda ? R_CUDA_REGISTER : R_SHM_REGISTER;
        return R_NONE;
    }
    if (strcmp(s[1], "models") != 0)
        return R_NONE;
    if (n == 3 && strcmp(s[2], "stats") == 0)
        return R_ALL_STATS;
    if (n < 3 || !s[2][0])
        return R_NONE;
    q->model = s[2];
    q->version = "";
    if (n >= 5 && strcmp(s[3], "versions") == 0) {
        q->version = s[4];
        n -= 2;
        s[3] = n > 3 ? s[5] : NULL;
    }
    if (n == 3)
        return R_MODEL_META;
    if (n != 4)
        return R_NONE;
    return strcmp(s[3], "ready") == 0    ? R_MODEL_READY
           : strcmp(s[3], "config") == 0 ? R_MODEL_CONFIG
           : strcmp(s[3], "stats") == 0  ? R_MODEL_STATS
           : strcmp(s[3], "infer") == 0  ? R_INFER
                                         : R_NONE;
}

static int route_posts(enum route r)
{
    return r == R_INFER || r == R_INDEX || r == R_SHM_REGISTER || r == R_SHM_UNREGISTER ||
           r == R_CUDA_REGISTER || r == R_CUDA_UNREGISTER || r == R_REPO_LOAD || r == R_REPO_UNLOAD;
}

/* ---- inference ---- */

/* The most bytes q's body may have. */
static uint64_t body_limit(const struct rest_req *q)
{
    return q->route == R_INFER ? q->rest->c.max_body : REST_SMALL_BODY;
}

static void free_body(struct rest_req *q)
{
    atomic_fetch_sub(&q->rest->buffered, q->charged);
    free(q->body);
    free(q->inf.xs);
    q->body = NULL;
    q->inf.xs = NULL;
    q->cap = q->charged = 0; /* len stays: the request's size, for the metrics */
}

/* Frees q and what it holds, on any thread; its output's slot stays held if it has a reply. */
static void free_req(struct rest_req *q)
{
    free_body(q);
    restjson_infer_free(&q->inf);
    shmreg_release(q->in_reg);
    shmreg_release(q->out_reg);
    pthread_mutex_destroy(&q->lock);
    free(q);
}

static void rest_fill(struct sched_req *req, float *x)
{
    struct rest_req *q = (struct rest_req *)req;

    api_fill_rows(&q->rm->model, q->in_reg, q->inf.in.in_offset, q->inf.in.x, req->rows, x,
                  &q->fill_err);
    free_body(q); /* the rows are in the slot: the body's memory is free for the next one */
}

static void unlist(struct rest_req *q)
{
    struct rest *rs = q->rest;

    if (!q->listed)
        return;
    if (q->wprev)
        q->wprev->wnext = q->wnext;
    else
        rs->waiting = q->wnext;
    if (q->wnext)
        q->wnext->wprev = q->wprev;
    q->wprev = q->wnext = NULL;
    q->listed = 0;
}

/* Frees q now, or leaves it to the watcher's cancel still in progress on it. */
static void release_req(struct rest_req *q)
{
    struct rest *rs = q->rest;
    int later;

    pthread_mutex_lock(&rs->wlock);
    unlist(q);
    later = q->cancels > 0;
    q->free_later = later;
    pthread_mutex_unlock(&rs->wlock);
    if (!later)
        free_req(q);
}

#define WATCH_MS 20    /* how often waiting inferences' connections are looked at */
#define WATCH_BATCH 64 /* cancels made per look, at most */

/* The client of a waiting inference is gone (the peer closed or reset its connection): its
 * request leaves the queue, or its job's answer is dropped, as a cancelled gRPC call's. A client
 * that only half-closes its side after sending counts as gone too, as in HTTP servers
 * generally: nothing can be sent to it that it would read differently. */
static int client_gone(struct rest_req *q)
{
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(q->conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    struct pollfd pf;

    if (!ci)
        return 0;
    pf = (struct pollfd){.fd = ci->connect_fd, .events = POLLRDHUP};
    return poll(&pf, 1, 0) == 1 && (pf.revents & (POLLRDHUP | POLLHUP | POLLERR));
}

static void *watch_thread(void *arg)
{
    struct rest *rs = arg;

    pthread_mutex_lock(&rs->wlock);
    while (!rs->wstop) {
        struct rest_req *gone[WATCH_BATCH];
        struct timespec nap = {0, WATCH_MS * 1000000L};
        int n = 0;

        if (!rs->waiting) {
            pthread_cond_wait(&rs->wcond, &rs->wlock);
            continue;
        }
        for (struct rest_req *q = rs->waiting; q && n < WATCH_BATCH; q = q->wnext)
            if (!q->cancelled && client_gone(q)) {
                q->cancelled = 1;
                q->cancels++;
                gone[n++] = q;
            }
        pthread_mutex_unlock(&rs->wlock);
        for (int i = 0; i < n; i++) { /* may complete it at once: outside the lock */
            int free_now;

            tp_log(TP_LOG_DEBUG, "rest: the client of request '%s' went away: cancelled",
                   gone[i]->inf.id);
            repo_cancel(gone[i]->rm, gone[i]->gen, &gone[i]->req);
            pthread_mutex_lock(&rs->wlock);
            free_now = --gone[i]->cancels == 0 && gone[i]->free_later;
            pthread_mutex_unlock(&rs->wlock);
            if (free_now)
                free_req(gone[i]);
        }
        nanosleep(&nap, NULL);
        pthread_mutex_lock(&rs->wlock);
    }
    pthread_mutex_unlock(&rs->wlock);
    return NULL;
}

/* The scheduler's answer: kept for the server's thread, which the resumed connection calls. */
static void rest_complete(struct sched_req *req, const float *y, const struct tp_err *err)
{
    struct rest_req *q = (struct rest_req *)req;
    struct rest *rs = q->rest;
    int gone;

    pthread_mutex_lock(&q->lock);
    q->y = y;
    if (err)
        q->err = *err;
    q->done = 1;
    gone = q->gone;
    pthread_mutex_unlock(&q->lock);
    pthread_mutex_lock(&rs->wlock);
    unlist(q);
    pthread_mutex_unlock(&rs->wlock);
    if (!gone) {
        /* still suspended (a suspended connection is never closed, rest_stop waits for every
         * inference): resuming it hands the answer to the server's thread */
        MHD_resume_connection(q->conn);
    } else { /* the connection was closed all the same: nobody to answer */
        if (y)
            sched_unhold(req->hold);
        release_req(q);
    }
    atomic_fetch_sub(&rs->outstanding, 1);
}

/* What a binary reply holds until libmicrohttpd has sent it: its JSON header, and its slot or
 * a copy of its data. */
struct reply_hold {
    struct sched_slot *hold;
    char *head;
    void *copy;
};

static void reply_free(void *cls)
{
    struct reply_hold *h = cls;

    if (h->hold)
        sched_unhold(h->hold);
    free(h->head);
    free(h->copy);
    free(h);
}

/* ---- compression ----
 * As Triton: a request body may come gzip'd or deflate'd (zlib's format, which is what HTTP's
 * "deflate" means and what tritonclient sends), and an inference's answer is compressed when
 * the client's Accept-Encoding asks for one of them. */

enum coding { CODING_NONE, CODING_GZIP, CODING_DEFLATE, CODING_OTHER };

static enum coding coding_of(const char *name, size_t n)
{
    if (n == 8 && strncasecmp(name, "identity", 8) == 0)
        return CODING_NONE;
    if (n == 4 && strncasecmp(name, "gzip", 4) == 0)
        return CODING_GZIP;
    if (n == 7 && strncasecmp(name, "deflate", 7) == 0)
        return CODING_DEFLATE;
    return CODING_OTHER;
}

/* The first of gzip or deflate that an Accept-Encoding value lists without q=0. */
static enum coding accepted(const char *v)
{
    for (const char *p = v; p && *p; p = strchr(p, ',') ? strchr(p, ',') + 1 : NULL) {
        const char *t = p + strspn(p, " \t"), *end = strchr(t, ','), *qv = strstr(t, "q=");
        enum coding c = coding_of(t, strcspn(t, ",; \t"));

        if ((c == CODING_GZIP || c == CODING_DEFLATE) &&
            !(qv && (!end || qv < end) && strtod(qv + 2, NULL) == 0))
            return c;
    }
    return CODING_NONE;
}

/* Inflates q's body in place of itself, within the body limit and the server's budget. -1 with
 * err for data that is not the coding's, -2 (err set) for too much. */
static int inflate_body(struct rest_req *q, struct tp_err *err)
{
    struct rest *rs = q->rest;
    uint64_t limit = body_limit(q);
    size_t cap = q->len * 4 < (64 << 10) ? (64 << 10) : q->len * 4, n = 0;
    z_stream z = {0};
    char *out = NULL;
    uint64_t charged = 0;
    int r, rc = -1;

    if (inflateInit2(&z, 15 + 32) != Z_OK) /* gzip or zlib, by their headers */
        return tp_err_set(err, TP_ENOMEM, "no memory to decompress the body");
    z.next_in = (Bytef *)q->body;
    z.avail_in = (uInt)q->len;
    for (;;) {
        if (n == cap || !out) {
            char *p;

            cap = out ? cap * 2 : cap;
            cap = cap > limit ? limit : cap;
            if (n == cap) {
                tp_err_set(err, TP_EINVAL,
                           "the body decompresses to more than the %" PRIu64 " bytes taken here",
                           limit);
                rc = -2;
                break;
            }
            if (atomic_fetch_add(&rs->buffered, cap - charged) + (cap - charged) >
                rs->c.max_buffered) {
                atomic_fetch_sub(&rs->buffered, cap - charged);
                tp_err_set(err, TP_EUNAVAIL,
                           "tpd holds %" PRIu64 " MiB of request bodies already: try again",
                           rs->c.max_buffered >> 20);
                break;
            }
            charged = cap;
            p = realloc(out, cap);
            if (!p) {
                tp_err_set(err, TP_ENOMEM, "no memory to decompress the body");
                break;
            }
            out = p;
        }
        z.next_out = (Bytef *)out + n;
        z.avail_out = (uInt)(cap - n);
        r = inflate(&z, Z_NO_FLUSH);
        n = cap - z.avail_out;
        if (r == Z_STREAM_END && z.avail_in == 0) {
            rc = 0;
            break;
        }
        if ((r != Z_OK && r != Z_BUF_ERROR) || r == Z_STREAM_END ||
            (z.avail_in == 0 && z.avail_out > 0)) {
            tp_err_set(err, TP_EINVAL, "the body is not whole compressed data (%s)",
                       z.msg ? z.msg : "it ends too soon, or goes on after its end");
            break;
        }
    }
    inflateEnd(&z);
    if (rc < 0) {
        atomic_fetch_sub(&rs->buffered, charged);
        free(out);
        return rc;
    }
    free_body(q);
    q->body = out;
    q->len = n;
    q->cap = cap;
    q->charged = charged;
    return 0;
}

/* n bytes in iov's pieces, compressed into one new buffer (*len bytes); NULL when that fails,
 * and the answer then goes uncompressed. */
static char *compress_iov(enum coding c, const struct MHD_IoVec *iov, int niov, size_t *len)
{
    z_stream z = {0};
    size_t total = 0, cap;
    char *out;
    int r = Z_OK;

    for (int i = 0; i < niov; i++)
        total += iov[i].iov_len;
    if (deflateInit2(&z, Z_BEST_SPEED, Z_DEFLATED, c == CODING_GZIP ? 15 + 16 : 15, 8,
                     Z_DEFAULT_STRATEGY) != Z_OK)
        return NULL;
    cap = deflateBound(&z, total);
    out = malloc(cap);
    z.next_out = (Bytef *)out;
    z.avail_out = (uInt)cap;
    for (int i = 0; out && i < niov && r == Z_OK; i++) {
        z.next_in = (Bytef *)(uintptr_t)iov[i].iov_base;
        z.avail_in = (uInt)iov[i].iov_len;
        r = deflate(&z, i + 1 == niov ? Z_FINISH : Z_NO_FLUSH);
    }
    deflateEnd(&z);
    if (!out || r != Z_STREAM_END) {
        free(out);
        return NULL;
    }
    *len = cap - z.avail_out;
    return out;
}

/* Sends an answer of iov's pieces compressed, as the client accepts; 0 when it does not (or
 * compressing failed), and the caller sends it as it is. */
static int send_compressed(struct rest_req *q, const struct MHD_IoVec *iov, int niov,
                           const char *type, size_t hlen, enum MHD_Result *r)
{
    enum coding c = accepted(
        MHD_lookup_connection_value(q->conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_ACCEPT_ENCODING));
    struct MHD_Response *resp;
    size_t n;
    char *z, num[24];

    if (c == CODING_NONE || !(z = compress_iov(c, iov, niov, &n)))
        return 0;
    resp = MHD_create_response_from_buffer(n, z, MHD_RESPMEM_MUST_FREE);
    if (!resp) {
        free(z);
        return 0;
    }
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, type);
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_ENCODING,
                            c == CODING_GZIP ? "gzip" : "deflate");
    if (niov > 1) { /* the binary data's header: its length before compression, as Triton */
        snprintf(num, sizeof(num), "%zu", hlen);
        MHD_add_response_header(resp, RESTJSON_HEADER, num);
    }
    *r = MHD_queue_response(q->conn, 200, resp);
    MHD_destroy_response(resp);
    return 1;
}

/* Answers a completed inference, on the server's thread. */
static enum MHD_Result answer_infer(struct rest_req *q)
{
    const struct model *m = &q->rm->model;
    struct tp_err failed = {0};
    const struct tp_err *err = q->y ? NULL : &q->err;
    struct sched_slot *hold = q->y ? q->req.hold : NULL;
    int64_t t0 = metrics_now_ns();
    size_t n = (size_t)q->req.rows * (size_t)m->out, hlen = 0;
    size_t bytes = n * tp_dtype_size(m->io_dtype);
    char *text = NULL;
    FILE *f;
    struct MHD_Response *resp;
    enum MHD_Result r;

    q->answered = 1;
    if (!err && q->fill_err.code != TP_OK)
        failed = q->fill_err;
    else if (!err && q->out_reg)
        api_put_rows(m, q->out_reg, q->inf.in.out_offset, q->y, q->req.rows, &failed);
    if (!err && failed.code == TP_OK) {
        /* FP16/BF16 binary data: narrowed in place, in the slot, from which it is sent */
        if (q->inf.binary_out && !q->out_reg)
            api_put_rows(m, NULL, 0, q->y, q->req.rows, NULL);
        f = open_memstream(&text, &hlen);
        if (!f || restjson_answer(f, m, q->inf.id, &q->inf.in,
                                  q->inf.binary_out || q->out_reg ? NULL : q->y,
                                  q->inf.binary_out && !q->out_reg ? bytes : (size_t)-1) < 0) {
            tp_err_set(&failed, f ? TP_EINVAL : TP_ENOMEM,
                       f ? "the output has values that are not finite, which JSON cannot carry: "
                           "ask for binary data (parameter binary_data)"
                         : "no memory for the answer");
        }
        if (f && fclose(f) != 0 && failed.code == TP_OK)
            tp_err_set(&failed, TP_ENOMEM, "no memory for the answer");
    }
    if (!err && failed.code != TP_OK) {
        sched_unhold(hold);
        hold = NULL;
        err = &failed;
    }
    if (err) {
        free(text);
        tp_log(TP_LOG_DEBUG, "request '%s' failed: %s", q->inf.id, err->msg);
        metrics_request_done(q->model, tp_code_grpc(err->code), metrics_since(q->t0_ns),
                             q->req.rows, q->len, 0);
        return send_err(q->conn, err);
    }
    metrics_request_served(sched_slot_index(hold), q->t0_ns, metrics_now_ns() - t0);
    if (!q->inf.binary_out || q->out_reg) { /* JSON: the slot is free once it is written */
        struct MHD_IoVec iov[1] = {{text, hlen}};

        sched_unhold(hold);
        metrics_request_done(q->model, GRPC_STATUS_OK, metrics_since(q->t0_ns), q->req.rows, q->len,
                             hlen);
        if (send_compressed(q, iov, 1, "application/json", hlen, &r)) {
            free(text);
            return r;
        }
        return send_buf(q->conn, 200, "application/json", text, hlen);
    }
    {
        struct MHD_IoVec both[2] = {{text, hlen}, {q->y, bytes}};

        /* compressed: a copy, and the slot is free at once */
        if (send_compressed(q, both, 2, "application/octet-stream", hlen, &r)) {
            sched_unhold(hold);
            free(text);
            metrics_request_done(q->model, GRPC_STATUS_OK, metrics_since(q->t0_ns), q->req.rows,
                                 q->len, hlen + bytes);
            return r;
        }
    }
    {
        /* binary: header and data, the data sent from the slot, which the reply holds; or from
         * a copy, when the slot is the last one not lent out (sched_req.keep) */
        struct reply_hold *h = calloc(1, sizeof(*h));
        void *copy = h && !q->req.keep ? malloc(bytes) : NULL;
        struct MHD_IoVec iov[2] = {{text, hlen}, {copy ? copy : q->y, bytes}};
        char num[24];

        if (copy) {
            memcpy(copy, q->y, bytes);
            sched_unhold(hold);
            hold = NULL;
        }
        resp = h && (copy || q->req.keep) ? MHD_create_response_from_iovec(iov, 2, reply_free, h)
                                          : NULL;
        if (!resp) {
            free(h);
            free(copy);
            free(text);
            if (hold)
                sched_unhold(hold);
            metrics_request_done(q->model, GRPC_STATUS_RESOURCE_EXHAUSTED, metrics_since(q->t0_ns),
                                 q->req.rows, q->len, 0);
            return send_error(q->conn, 500, "no memory for the answer");
        }
        h->hold = hold;
        h->head = text;
        h->copy = copy;
        snprintf(num, sizeof(num), "%zu", hlen);
        MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "application/octet-stream");
        MHD_add_response_header(resp, RESTJSON_HEADER, num);
        /* a client that does not read its reply holds the slot: not for longer than this */
        MHD_set_connection_option(q->conn, MHD_CONNECTION_OPTION_TIMEOUT,
                                  (unsigned)(q->rest->c.reply_timeout_ms + 999) / 1000);
        metrics_request_done(q->model, GRPC_STATUS_OK, metrics_since(q->t0_ns), q->req.rows, q->len,
                             hlen + bytes);
        r = MHD_queue_response(q->conn, 200, resp);
        MHD_destroy_response(resp);
        return r;
    }
}

/* Reads, checks and submits an inference; the connection waits, suspended, for its answer. */
static enum MHD_Result start_infer(struct rest_req *q)
{
    struct rest *rs = q->rest;
    struct api *a = rs->c.api;
    const struct model *m;
    uint64_t esize;
    const char *enc =
        MHD_lookup_connection_value(q->conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_ENCODING);
    struct tp_err err = {0};
    struct repo_model *rm = NULL;

    if (atomic_load(&rs->quiesced)) {
        tp_err_set(&err, TP_EUNAVAIL, "tpd is shutting down");
        goto refuse;
    }
    /* held while the request goes to its scheduler: an unload waits for that */
    rm = repo_get(a->repo, q->model, q->version, &err);
    if (!rm)
        goto refuse;
    q->rm = rm;
    q->gen = rm->gen;
    m = &rm->model;
    esize = tp_dtype_size(m->io_dtype);
    if (enc) {
        enum coding c = coding_of(enc, strlen(enc));

        if (c == CODING_GZIP || c == CODING_DEFLATE) {
            int rc = inflate_body(q, &err);

            if (rc == -2) {
                metrics_request_done(q->model, GRPC_STATUS_INVALID_ARGUMENT,
                                     metrics_since(q->t0_ns), 0, q->len, 0);
                repo_put(rm);
                return send_error(q->conn, 413, err.msg);
            }
            if (rc < 0)
                goto refuse;
            enc = NULL;
        } else if (c == CODING_NONE) {
            enc = NULL;
        }
    }
    if (restjson_infer(m, q->model, q->version, q->body, q->len,
                       MHD_lookup_connection_value(q->conn, MHD_HEADER_KIND, RESTJSON_HEADER), enc,
                       &q->inf, &err) < 0 ||
        (q->inf.in.in_region && shmreg_acquire(a->shm, q->inf.in.in_region, q->inf.in.in_offset,
                                               (uint64_t)q->inf.in.rows * (uint64_t)m->in * esize,
                                               &q->in_reg, &err) < 0) ||
        (q->inf.in.out_region && shmreg_acquire(a->shm, q->inf.in.out_region, q->inf.in.out_offset,
                                                (uint64_t)q->inf.in.rows * (uint64_t)m->out * esize,
                                                &q->out_reg, &err) < 0)) {
        tp_log(TP_LOG_DEBUG, "rejected request '%s': %s", q->inf.id ? q->inf.id : "", err.msg);
        goto refuse;
    }
    /* Triton's timeout: microseconds the request may wait for its job */
    q->req.deadline_ns = q->inf.timeout_us ? q->t0_ns + q->inf.timeout_us * 1000 : INT64_MAX;
    q->req.rows = q->inf.in.rows;
    q->req.bytes = q->len + (q->inf.xs ? (uint64_t)q->inf.in.rows * (uint64_t)m->in * 4 : 0);
    q->req.fill = rest_fill;
    q->req.complete = rest_complete;
    tp_log(TP_LOG_DEBUG, "accepted request '%s': %u rows", q->inf.id ? q->inf.id : "",
           q->req.rows);
    pthread_mutex_lock(&q->lock);
    atomic_fetch_add(&rs->outstanding, 1);
    if (sched_submit(rm->sched, &q->req, &err) < 0) {
        atomic_fetch_sub(&rs->outstanding, 1);
        pthread_mutex_unlock(&q->lock);
        goto refuse;
    }
    repo_put(rm);
    q->submitted = 1;
    atomic_fetch_add(&rs->unsent, 1);
    MHD_suspend_connection(q->conn); /* under the lock: the completion resumes it after this */
    pthread_mutex_lock(&rs->wlock);  /* watched, until the completion takes it off */
    q->wnext = rs->waiting;
    if (rs->waiting)
        rs->waiting->wprev = q;
    rs->waiting = q;
    q->listed = 1;
    pthread_cond_signal(&rs->wcond);
    pthread_mutex_unlock(&rs->wlock);
    pthread_mutex_unlock(&q->lock);
    return MHD_YES;
refuse:
    repo_put(rm);
    metrics_request_done(q->model, tp_code_grpc(err.code), metrics_since(q->t0_ns), 0, q->len, 0);
    return send_err(q->conn, &err);
}

/* ---- the other endpoints ---- */

static enum MHD_Result server_metadata(struct rest_req *q)
{
    cJSON *j = cJSON_CreateObject(), *ext = cJSON_CreateArray();
    static const char *const exts[] = {"binary_tensor_data", "model_configuration",
                                       "system_shared_memory", "statistics"};

    for (size_t i = 0; ext && i < sizeof(exts) / sizeof(exts[0]); i++)
        cJSON_AddItemToArray(ext, cJSON_CreateString(exts[i]));
    if (j) {
        cJSON_AddStringToObject(j, "name", "tpd");
        cJSON_AddStringToObject(j, "version", TP_VERSION);
        cJSON_AddItemToObject(j, "extensions", ext);
    } else {
        cJSON_Delete(ext);
    }
    return send_json(q->conn, 200, j);
}

static enum MHD_Result health(struct rest_req *q, const char *key, int ok)
{
    cJSON *j = cJSON_CreateObject();

    if (j && q->model)
        cJSON_AddStringToObject(j, "name", q->model);
    if (j)
        cJSON_AddBoolToObject(j, key, ok);
    return send_json(q->conn, ok ? 200 : 503, j);
}

static enum MHD_Result repository_index(struct rest_req *q)
{
    struct api *a = q->rest->c.api;
    struct tp_err err = {0};
    cJSON *body = NULL, *arr;
    struct repo_entry *ents = NULL;
    size_t n = 0;
    int only_ready = 0;

    if (q->len) {
        const cJSON *r;

        body = restjson_parse(q->body, q->len, "repository index request", &err);
        if (!body)
            return send_err(q->conn, &err);
        r = cJSON_GetObjectItemCaseSensitive(body, "ready");
        if (r && !cJSON_IsBool(r)) {
            cJSON_Delete(body);
            return send_error(q->conn, 400, "'ready' must be a boolean");
        }
        only_ready = r && cJSON_IsTrue(r);
        cJSON_Delete(body);
    }
    arr = cJSON_CreateArray();
    if (!arr || repo_index(a->repo, &ents, &n) < 0) {
        free(ents);
        cJSON_Delete(arr);
        return send_error(q->conn, 500, "out of memory");
    }
    for (size_t i = 0; i < n; i++) {
        int ready = ents[i].state == REPO_READY && repo_ready(a->repo, ents[i].name, "") == 1;
        cJSON *e;

        if ((only_ready && !ready) || !(e = cJSON_CreateObject()))
            continue;
        cJSON_AddStringToObject(e, "name", ents[i].name);
        cJSON_AddStringToObject(e, "version", MODEL_VERSION);
        cJSON_AddStringToObject(
            e, "state",
            ents[i].state == REPO_READY && !ready ? "UNAVAILABLE" : repo_state_name(ents[i].state));
        if (ents[i].state == REPO_READY && !ready)
            cJSON_AddStringToObject(e, "reason", "the workers are restarting");
        else if (ents[i].reason[0])
            cJSON_AddStringToObject(e, "reason", ents[i].reason);
        cJSON_AddItemToArray(arr, e);
    }
    free(ents);
    return send_json(q->conn, 200, arr);
}

/* A load or unload on its own thread: the connection waits, suspended, as an inference does,
 * and its answer is sent when the server's thread resumes it (answer_control). */
static void *control_main(void *arg)
{
    struct rest_req *q = arg;
    struct rest *rs = q->rest;
    struct tp_err err = {0};
    int gone;

    api_model_control(rs->c.api, q->model, q->route == R_REPO_LOAD, &err);
    pthread_mutex_lock(&q->lock);
    q->err = err;
    q->done = 1;
    gone = q->gone;
    pthread_mutex_unlock(&q->lock);
    if (!gone)
        MHD_resume_connection(q->conn);
    else
        release_req(q);
    atomic_fetch_sub(&rs->outstanding, 1);
    return NULL;
}

static enum MHD_Result answer_control(struct rest_req *q)
{
    q->answered = 1;
    if (q->err.code != TP_OK)
        return send_err(q->conn, &q->err);
    return send_buf(q->conn, 200, "application/json", strdup("{}"), 2);
}

/* POST /v2/repository/models/NAME/load or unload: a body of {} or {"parameters": {}} (tpd takes
 * no parameters: the repository's NAME.json describes the model). */
static enum MHD_Result model_control(struct rest_req *q, int load)
{
    struct tp_err err = {0};

    if (q->len) {
        cJSON *body = restjson_parse(q->body, q->len, "model control request", &err);
        const cJSON *p;
        int bad;

        if (!body)
            return send_err(q->conn, &err);
        p = cJSON_GetObjectItemCaseSensitive(body, "parameters");
        bad = !cJSON_IsObject(body) || (p && !cJSON_IsObject(p));
        /* unload_dependents, which tritonclient always sends, is moot: no model depends on
         * another */
        for (const cJSON *it = p ? p->child : NULL; it && !bad; it = it->next)
            bad = load || strcmp(it->string, "unload_dependents") != 0;
        cJSON_Delete(body);
        if (bad)
            return send_error(q->conn, 400,
                              "parameters are not supported: the repository's NAME.json "
                              "describes the model");
    }
    if (!repo_explicit(q->rest->c.api->repo) || atomic_load(&q->rest->quiesced)) {
        api_model_control(q->rest->c.api, q->model, load, &err); /* refused at once */
        return send_err(q->conn, &err);
    }
    /* a load waits for the workers: not on the server's thread, which serves other requests */
    pthread_mutex_lock(&q->lock);
    atomic_fetch_add(&q->rest->outstanding, 1);
    q->submitted = 1;
    MHD_suspend_connection(q->conn); /* under the lock: the thread resumes it after this */
    if (api_control_run(q->rest->c.api, control_main, q) < 0) {
        pthread_mutex_unlock(&q->lock);
        control_main(q); /* no thread: here, and the resume answers it */
        return MHD_YES;
    }
    pthread_mutex_unlock(&q->lock);
    return MHD_YES;
}

static enum MHD_Result shm_status(struct rest_req *q)
{
    struct shmreg_info *info = calloc(SHMREG_MAX_REGIONS, sizeof(*info));
    cJSON *arr = cJSON_CreateArray();
    size_t n;

    if (!info || !arr) {
        free(info);
        cJSON_Delete(arr);
        return send_error(q->conn, 500, "out of memory");
    }
    n = shmreg_status(q->rest->c.api->shm, q->name ? q->name : "", info, SHMREG_MAX_REGIONS);
    for (size_t i = 0; i < n; i++) {
        cJSON *e = cJSON_CreateObject();

        if (!e)
            break;
        cJSON_AddStringToObject(e, "name", info[i].name);
        cJSON_AddStringToObject(e, "key", info[i].key);
        cJSON_AddNumberToObject(e, "offset", (double)info[i].offset);
        cJSON_AddNumberToObject(e, "byte_size", (double)info[i].byte_size);
        cJSON_AddItemToArray(arr, e);
    }
    free(info);
    if (q->name && n == 0) {
        char msg[200];

        cJSON_Delete(arr);
        snprintf(msg, sizeof(msg), "no shared-memory region '%.100s'", q->name);
        return send_error(q->conn, 404, msg);
    }
    return send_json(q->conn, 200, arr);
}

static enum MHD_Result shm_register(struct rest_req *q)
{
    struct tp_err err = {0};
    cJSON *j = restjson_parse(q->body ? q->body : "", q->len, "register request", &err);
    const cJSON *key, *off, *size;
    int64_t offset = 0, bytes;

    if (!j)
        return send_err(q->conn, &err);
    key = cJSON_GetObjectItemCaseSensitive(j, "key");
    off = cJSON_GetObjectItemCaseSensitive(j, "offset");
    size = cJSON_GetObjectItemCaseSensitive(j, "byte_size");
    if (!cJSON_IsString(key) || (off && restjson_int(off, 0, 9.2e18, &offset) < 0) ||
        restjson_int(size, 0, 9.2e18, &bytes) < 0) {
        cJSON_Delete(j);
        return send_error(q->conn, 400,
                          "a register request is {\"key\": string, \"offset\": integer >= 0, "
                          "\"byte_size\": integer >= 0}");
    }
    if (shmreg_register(q->rest->c.api->shm, q->name, key->valuestring, (uint64_t)offset,
                        (uint64_t)bytes, &err) < 0) {
        cJSON_Delete(j);
        return send_err(q->conn, &err);
    }
    tp_log(TP_LOG_INFO,
           "registered shared-memory region '%s': %" PRId64 " bytes at %" PRId64 " of '%s'",
           q->name, bytes, offset, key->valuestring);
    cJSON_Delete(j);
    return send_buf(q->conn, 200, "application/json", strdup("{}"), 2);
}

static enum MHD_Result shm_unregister(struct rest_req *q)
{
    struct tp_err err = {0};

    if (shmreg_unregister(q->rest->c.api->shm, q->name ? q->name : "", &err) < 0)
        return send_err(q->conn, &err);
    tp_log(TP_LOG_INFO, "unregistered shared-memory region%s '%s'", q->name ? "" : "s",
           q->name ? q->name : "(all)");
    return send_buf(q->conn, 200, "application/json", strdup("{}"), 2);
}

/* Answers q, whose body is complete. */
static enum MHD_Result dispatch(struct rest_req *q)
{
    struct api *a = q->rest->c.api;
    struct tp_err err = {0};

    if (q->route == R_NONE)
        return send_error(q->conn, 404, "not found: tpd serves the KServe v2 API under /v2");
    if (q->post != route_posts(q->route))
        return send_error(q->conn, 405, "Method Not Allowed");
    switch (q->route) {
    case R_SERVER_META: return server_metadata(q);
    case R_LIVE: return health(q, "live", 1);
    case R_READY: return health(q, "ready", api_ready(a));
    case R_MODEL_READY: {
        int ready = repo_ready(a->repo, q->model, q->version);

        if (ready < 0) {
            tp_err_set(&err, TP_ENOTFOUND, "unknown model '%.64s' or version '%.32s'", q->model,
                       q->version);
            return send_err(q->conn, &err);
        }
        return health(q, "ready", ready && api_ready(a));
    }
    case R_MODEL_META:
    case R_MODEL_CONFIG: {
        struct repo_model *m = repo_get(a->repo, q->model, q->version, &err);
        enum MHD_Result r;

        if (!m)
            return send_err(q->conn, &err);
        if (q->route == R_MODEL_META) {
            struct api_metadata b;

            api_metadata(m, &b);
            r = send_pb(q->conn, &b.r.base);
        } else {
            struct api_config b;

            api_config(m, &b);
            r = send_pb(q->conn, &b.r.config->base); /* Triton answers the config itself */
        }
        repo_put(m);
        return r;
    }
    case R_MODEL_STATS:
    case R_ALL_STATS: {
        struct api_statistics b;
        enum MHD_Result r;

        if (api_statistics(a, q->route == R_MODEL_STATS ? q->model : "",
                           q->route == R_MODEL_STATS ? q->version : "", &b, &err) < 0)
            return send_err(q->conn, &err);
        r = send_pb(q->conn, &b.r.base);
        api_statistics_free(&b);
        return r;
    }
    case R_REPO_LOAD: return model_control(q, 1);
    case R_REPO_UNLOAD: return model_control(q, 0);
    case R_INFER: return start_infer(q);
    case R_INDEX: return repository_index(q);
    case R_SHM_STATUS: return shm_status(q);
    case R_SHM_REGISTER: return shm_register(q);
    case R_SHM_UNREGISTER: return shm_unregister(q);
    case R_CUDA_STATUS:
        if (q->name)
            return send_error(q->conn, 404, "no CUDA shared-memory region: tpd registers none");
        return send_buf(q->conn, 200, "application/json", strdup("[]"), 2);
    case R_CUDA_REGISTER:
        return send_error(q->conn, 501,
                          "tpd does not take CUDA shared memory; use system "
                          "shared memory");
    case R_CUDA_UNREGISTER: /* there is never one: as with system regions, that is no error */
        return send_buf(q->conn, 200, "application/json", strdup("{}"), 2);
    case R_NONE: break;
    }
    return send_error(q->conn, 404, "not found");
}

/* ---- libmicrohttpd's callbacks ---- */

/* Makes room for more bytes of body, charged to the bodies the server holds as they arrive
 * (the buffer is sized from the announced length, but only what was sent touches memory); an
 * answer is queued (and q->refused set) when that is more than q may have or than the server
 * may hold. announced > 0 only checks and sizes, before any byte came. */
static int body_room(struct rest_req *q, uint64_t more, uint64_t announced)
{
    struct rest *rs = q->rest;
    uint64_t need = q->len + (announced ? announced : more), cap;
    unsigned status = 503;
    char msg[200];
    char *p;

    if (need > body_limit(q)) {
        snprintf(msg, sizeof(msg),
                 "the request body has %" PRIu64 " bytes, at most %" PRIu64 " are taken here", need,
                 body_limit(q));
        status = 413;
        goto refuse;
    }
    if (!announced && atomic_fetch_add(&rs->buffered, more) + more > rs->c.max_buffered) {
        atomic_fetch_sub(&rs->buffered, more);
        snprintf(msg, sizeof(msg), "tpd holds %" PRIu64 " MiB of request bodies already: try again",
                 rs->c.max_buffered >> 20);
        goto refuse;
    }
    q->charged += announced ? 0 : more;
    if (need <= q->cap)
        return 0;
    cap = announced ? announced : need + need / 2;
    if (cap > body_limit(q))
        cap = body_limit(q);
    p = realloc(q->body, cap);
    if (!p) {
        snprintf(msg, sizeof(msg), "no memory for a request body of %" PRIu64 " bytes", cap);
        goto refuse;
    }
    q->body = p;
    q->cap = cap;
    return 0;
refuse:
    send_error(q->conn, status, msg);
    q->refused = 1;
    return -1;
}

/* With --tls-client-ca: the client presented a certificate that the CA signed (gnutls checks
 * the chain against the trust MHD was given, and the dates). */
static int client_verified(struct MHD_Connection *conn)
{
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(conn, MHD_CONNECTION_INFO_GNUTLS_SESSION);
    unsigned status = 1;

    return ci && ci->tls_session &&
           gnutls_certificate_type_get(ci->tls_session) == GNUTLS_CRT_X509 &&
           gnutls_certificate_verify_peers2(ci->tls_session, &status) == GNUTLS_E_SUCCESS &&
           status == 0;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version, const char *upload_data,
                                  size_t *upload_data_size, void **con_cls)
{
    struct rest *rs = cls;
    struct rest_req *q = *con_cls;

    (void)version;
    if (!q) {
        const char *cl =
            MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
        uint64_t announced = cl ? strtoull(cl, NULL, 10) : 0;

        q = calloc(1, sizeof(*q));
        if (!q)
            return MHD_NO;
        q->rest = rs;
        q->conn = conn;
        q->t0_ns = metrics_now_ns();
        pthread_mutex_init(&q->lock, NULL);
        *con_cls = q;
        MHD_set_connection_option(conn, MHD_CONNECTION_OPTION_TIMEOUT, REST_IDLE_S);
        if (rs->ca && !client_verified(conn)) {
            tp_log(TP_LOG_INFO, "rest: refused a client without a certificate signed by the "
                                "--tls-client-ca");
            q->refused = 1;
            return send_error(conn, 403,
                              "a client certificate signed by the server's client CA "
                              "is required");
        }
        q->post = strcmp(method, MHD_HTTP_METHOD_POST) == 0;
        if (!q->post && strcmp(method, MHD_HTTP_METHOD_GET) != 0 &&
            strcmp(method, MHD_HTTP_METHOD_HEAD) != 0) {
            q->refused = 1;
            return send_error(conn, 405, "Method Not Allowed");
        }
        q->route = route(q, url);
        /* a body that will not fit is refused (413, queued here) before a byte of it is read */
        if (announced)
            body_room(q, announced, announced);
        return MHD_YES;
    }
    if (q->refused) {
        *upload_data_size = 0;
        return MHD_YES;
    }
    if (*upload_data_size) {
        if (body_room(q, *upload_data_size, 0) == 0) {
            memcpy(q->body + q->len, upload_data, *upload_data_size);
            q->len += *upload_data_size;
        }
        *upload_data_size = 0;
        return MHD_YES;
    }
    if (q->done)
        return q->route == R_INFER ? answer_infer(q) : answer_control(q);
    return dispatch(q);
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
    struct rest_req *q = *con_cls;
    int pending;

    (void)conn;
    (void)toe;
    if (!q)
        return;
    *con_cls = NULL;
    pthread_mutex_lock(&q->lock);
    pending = q->submitted && !q->done;
    q->gone = 1;
    if (q->submitted)
        atomic_fetch_sub(&((struct rest *)cls)->unsent, 1);
    pthread_mutex_unlock(&q->lock);
    if (pending)
        return;                          /* its completion frees it */
    if (q->done && q->y && !q->answered) /* resumed, but its client went before the answer */
        sched_unhold(q->req.hold);
    release_req(q);
}

/* The URL's percent escapes, decoded in place, except %00: a NUL would cut the path short unseen
 * ("/v2/models/m%00x" read as model "m"), so it stays as it is and names nothing. */
static size_t unescape(void *cls, struct MHD_Connection *conn, char *s)
{
    char *w = s;

    (void)cls;
    (void)conn;
    for (const char *r = s; *r; r++) {
        int h = r[0] == '%' ? tcp_hex_digit(r[1]) : -1, l = h >= 0 ? tcp_hex_digit(r[2]) : -1;

        if (l >= 0 && (h | l)) {
            *w++ = (char)(h << 4 | l);
            r += 2;
        } else {
            *w++ = *r;
        }
    }
    *w = '\0';
    return (size_t)(w - s);
}

static void on_log(void *cls, const char *fmt, va_list ap)
{
    char msg[512];
    size_t n;

    (void)cls;
    vsnprintf(msg, sizeof(msg), fmt, ap);
    n = strlen(msg);
    while (n && (msg[n - 1] == '\n' || msg[n - 1] == '\r'))
        msg[--n] = '\0';
    tp_log(TP_LOG_INFO, "rest: %s", msg);
}

static void free_rest(struct rest *rs)
{
    if (rs->watching) {
        pthread_mutex_lock(&rs->wlock);
        rs->wstop = 1;
        pthread_cond_signal(&rs->wcond);
        pthread_mutex_unlock(&rs->wlock);
        pthread_join(rs->watcher, NULL);
    }
    pthread_mutex_destroy(&rs->wlock);
    pthread_cond_destroy(&rs->wcond);
    if (rs->key) /* the private key leaves no copy in the heap */
        explicit_bzero(rs->key, strlen(rs->key));
    free(rs->cert);
    free(rs->key);
    free(rs->ca);
    free(rs);
}

int rest_start(struct rest **out, const struct rest_config *c, struct tp_err *err)
{
    struct rest *rs = calloc(1, sizeof(*rs));
    struct MHD_OptionItem tls[4];
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_EPOLL | MHD_ALLOW_SUSPEND_RESUME |
                     MHD_USE_ERROR_LOG;
    char shown[300];
    int fd, nt = 0;

    *out = NULL;
    if (!rs)
        return tp_err_set(err, TP_ENOMEM, "no memory for the REST server");
    rs->c = *c;
    pthread_mutex_init(&rs->wlock, NULL);
    pthread_cond_init(&rs->wcond, NULL);
    if (c->tls_cert) { /* the same files as gRPC's TCP addresses */
        if (pem_read(c->tls_cert, &rs->cert, err) < 0 || pem_read(c->tls_key, &rs->key, err) < 0 ||
            (c->tls_client_ca && pem_read(c->tls_client_ca, &rs->ca, err) < 0)) {
            free_rest(rs);
            return -1;
        }
        flags |= MHD_USE_TLS;
        tls[nt++] = (struct MHD_OptionItem){MHD_OPTION_HTTPS_MEM_CERT, 0, rs->cert};
        tls[nt++] = (struct MHD_OptionItem){MHD_OPTION_HTTPS_MEM_KEY, 0, rs->key};
        if (rs->ca) /* asks every client for a certificate; client_verified checks it */
            tls[nt++] = (struct MHD_OptionItem){MHD_OPTION_HTTPS_MEM_TRUST, 0, rs->ca};
    }
    tls[nt] = (struct MHD_OptionItem){MHD_OPTION_END, 0, NULL};
    fd = tcp_listen(c->listen, "--http-listen", "the REST API", shown, sizeof(shown), err);
    if (fd < 0) {
        free_rest(rs);
        return -1;
    }
    rs->d = MHD_start_daemon(
        flags, 0, NULL, NULL, on_request, rs, MHD_OPTION_LISTEN_SOCKET, fd,
        MHD_OPTION_THREAD_POOL_SIZE, (unsigned)(c->threads > 0 ? c->threads : 1),
        MHD_OPTION_CONNECTION_LIMIT, (unsigned)REST_MAX_CONNS, MHD_OPTION_CONNECTION_TIMEOUT,
        (unsigned)REST_IDLE_S, MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)REST_CONN_MEMORY,
        MHD_OPTION_NOTIFY_COMPLETED, on_completed, rs, MHD_OPTION_EXTERNAL_LOGGER, on_log, rs,
        MHD_OPTION_UNESCAPE_CALLBACK, unescape, rs, MHD_OPTION_ARRAY, tls, MHD_OPTION_END);
    if (!rs->d) {
        close(fd);
        if (c->tls_cert)
            tp_err_set(err, TP_EINVAL,
                       "cannot start the REST server on %s with TLS: is %s a certificate, %s its "
                       "private key%s%s%s",
                       c->listen, c->tls_cert, c->tls_key, c->tls_client_ca ? " and " : "",
                       c->tls_client_ca ? c->tls_client_ca : "",
                       c->tls_client_ca ? " a CA certificate" : "");
        else
            tp_err_set(err, TP_ESYS, "cannot start the REST server on %s (--http-listen)",
                       c->listen);
        free_rest(rs);
        return -1;
    }
    if (pthread_create(&rs->watcher, NULL, watch_thread, rs) != 0) {
        MHD_stop_daemon(rs->d);
        free_rest(rs);
        return tp_err_set(err, TP_ESYS, "cannot start the REST server's watcher thread");
    }
    rs->watching = 1;
    tp_log(TP_LOG_NOTICE, "REST API on %s://%s/v2%s", c->tls_cert ? "https" : "http", shown,
           !c->tls_cert ? ""
           : rs->ca     ? " (TLS, client certificate required)"
                        : " (TLS)");
    *out = rs;
    return 0;
}

void rest_quiesce(struct rest *rs)
{
    MHD_socket fd;

    if (!rs || atomic_exchange(&rs->quiesced, 1))
        return;
    fd = MHD_quiesce_daemon(rs->d); /* no new connections: they are refused */
    if (fd != MHD_INVALID_SOCKET)
        close(fd);
}

void rest_stop(struct rest *rs, int grace_ms)
{
    int64_t until;

    if (!rs)
        return;
    rest_quiesce(rs);
    until = metrics_now_ns() + (int64_t)grace_ms * 1000000;
    while (atomic_load(&rs->outstanding) > 0 && metrics_now_ns() < until)
        usleep(2000);
    if (atomic_load(&rs->outstanding) > 0) {
        /* their connections are suspended, and stopping the server would close them under the
         * scheduler's feet: left as they are, for the process's exit */
        tp_log(TP_LOG_WARN, "rest: %d inferences still running at the stop; left to the exit",
               atomic_load(&rs->outstanding));
        return;
    }
    /* every answer is given; stopping the server now would cut off those still being sent. A
     * client that does not read its answer is cut off by the reply timeout meanwhile. */
    while (atomic_load(&rs->unsent) > 0 && metrics_now_ns() < until)
        usleep(2000);
    if (atomic_load(&rs->unsent) > 0)
        tp_log(TP_LOG_WARN, "rest: %d answers not sent whole at the stop: their connections are "
               "closed", atomic_load(&rs->unsent));
    MHD_stop_daemon(rs->d);
    free_rest(rs);
}
