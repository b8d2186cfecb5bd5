/* rpc.c -- tpd's gRPC server on the C core (see rpc.h). Each completion queue has its own thread,
 * and a call is bound to the queue it was requested on, so all events of a call are seen by one
 * thread. A call context lives until both of its batches have completed: the close batch
 * (RECV_CLOSE_ON_SERVER, started when the call arrives) and the send batch (the reply, started
 * by rpc_reply from whichever thread answers). A reply may point into memory lent by its caller
 * (a scheduler slot), so a send batch that a client does not let finish is not left to hold it:
 * each queue's thread cancels the calls whose replies are older than the reply timeout. */
#include "rpc.h"

#include <errno.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/time.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "pem.h"

#define LAST_WAIT_MS 3000 /* the longest the stop waits for connections after the drain */
#define POSTED_PER_METHOD 8 /* requests waiting for calls, per method and queue */
#define POSTED_UNKNOWN 2

enum tag_kind { T_NEW, T_SEND, T_CLOSE, T_STREAM, T_RECV };

#define STREAM_QUEUE 8 /* messages of a streaming reply waiting to be sent, by default */

static struct rpc_server *abandoned; /* a server whose stop gave up on a connection */

struct rpc_tag {
    enum tag_kind kind;
    struct rpc_call *call;
};

struct rpc_call {
    struct rpc_server *srv;
    int method; /* index into methods, -1 for any other method */
    int cq;     /* queue index */
    grpc_call *call;
    gpr_timespec deadline;
    grpc_metadata_array md;
    grpc_call_details details; /* for unregistered calls */
    grpc_byte_buffer *payload;
    grpc_byte_buffer *reply;
    int cancelled;      /* set by the close batch */
    atomic_int pending; /* batches still to complete */
    void *data;         /* rpc_call_data, freed with the call */
    void (*on_cancel)(void *arg);
    void *on_cancel_arg;
    struct rpc_tag t_new, t_send, t_close;
    /* while the reply is being sent: on its queue's list of sends, oldest first */
    int64_t reply_ns; /* when rpc_reply started the send batch, CLOCK_MONOTONIC ns */
    int sending;      /* on the list */
    int given_up;     /* cancelled by cancel_late_replies: counted in given_up */
    struct rpc_call *sprev, *snext;
    /* a streaming reply (rpc_stream_send): one message batch in flight at a time, the rest
     * queued in order, and the status (rpc_reply) only once they have gone */
    pthread_mutex_t slock;
    struct rpc_tag t_stream, t_recv;
    grpc_byte_buffer **squeue; /* [scap], made at the first message */
    int scap, shead, slen;
    grpc_byte_buffer *rbuf;    /* a client stream's message being received */
    grpc_byte_buffer *sflight; /* the message being sent */
    int md_sent;               /* initial metadata went with the first message */
    int sbroken;               /* a message could not be sent: the rest are dropped */
    int fin_wanted;            /* rpc_reply came while messages were still to send */
    int replied;               /* rpc_reply was called: a second call is a bug, and ignored */
    int fin_status;
    char *fin_msg;
};

struct poller {
    struct rpc_server *srv;
    grpc_completion_queue *cq;
    pthread_t thread;
    int running;                    /* thread started */
    pthread_mutex_t lock;           /* the list of sends: rpc_reply adds from any thread */
    struct rpc_call *shead, *stail; /* calls whose send batch has not completed, oldest first */
    int64_t next_check_ns;          /* when the thread looks at the list again */
};

struct unix_path {
    char path[108];
    dev_t dev; /* of the socket file we bound: only that file is removed at stop */
    ino_t ino;
};

struct rpc_server {
    grpc_server *server;
    int npollers;
    struct poller *pollers; /* one completion queue and thread each */
    const struct rpc_method *methods;
    int nmethods;
    void **handles; /* registered method handles */
    void *ctx;
    atomic_int shutting_down;
    int started;                  /* grpc_server_start was called */
    grpc_server_credentials *tls; /* for TCP addresses; NULL: plaintext */
    struct unix_path unix_paths[8];
    int nunix;
    int64_t reply_timeout_ns;    /* 0: replies may take forever */
    int64_t check_every_ns;      /* how often each thread looks for late replies */
    atomic_long late;            /* calls cancelled because their reply was not taken */
    atomic_llong late_logged_ns; /* when a late reply was last logged, ns */
    /* call contexts alive (posted or running): the stop waits for them, not for connections */
    atomic_int contexts;
    /* of those, calls cancelled because their client did not take the reply: their context
     * lives on until gRPC's write to that client ends, which may be never; the stop does not
     * wait for them */
    atomic_int given_up;
    pthread_mutex_t lock;
    pthread_cond_t idle; /* contexts dropped to 0 while shutting down */
};

static int64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Takes c off its queue's list of sends, if it is there. */
static void unlist_send(struct rpc_call *c)
{
    struct poller *p = &c->srv->pollers[c->cq];

    pthread_mutex_lock(&p->lock);
    if (c->sending) {
        if (c->sprev)
            c->sprev->snext = c->snext;
        else
            p->shead = c->snext;
        if (c->snext)
            c->snext->sprev = c->sprev;
        else
            p->stail = c->sprev;
        c->sprev = c->snext = NULL;
        c->sending = 0;
    }
    pthread_mutex_unlock(&p->lock);
}

static void call_free(struct rpc_call *c)
{
    struct rpc_server *s = c->srv;

    if (c->call)
        grpc_call_unref(c->call);
    if (c->payload)
        grpc_byte_buffer_destroy(c->payload);
    if (c->reply)
        grpc_byte_buffer_destroy(c->reply);
    grpc_metadata_array_destroy(&c->md);
    grpc_call_details_destroy(&c->details);
    for (int i = 0; i < c->slen; i++)
        grpc_byte_buffer_destroy(c->squeue[(c->shead + i) % c->scap]);
    free(c->squeue);
    if (c->rbuf)
        grpc_byte_buffer_destroy(c->rbuf);
    if (c->sflight)
        grpc_byte_buffer_destroy(c->sflight);
    free(c->fin_msg);
    pthread_mutex_destroy(&c->slock);
    if (c->given_up)
        atomic_fetch_sub(&s->given_up, 1);
    free(c->data);
    free(c);
    if (atomic_fetch_sub(&s->contexts, 1) == 1 && atomic_load(&s->shutting_down)) {
        pthread_mutex_lock(&s->lock);
        pthread_cond_broadcast(&s->idle);
        pthread_mutex_unlock(&s->lock);
    }
}

static void call_release(struct rpc_call *c)
{
    if (atomic_fetch_sub(&c->pending, 1) == 1)
        call_free(c);
}

/* Posts one request for a new call of method m (-1: any unregistered method) on queue q. */
static void post(struct rpc_server *s, int m, int q)
{
    struct rpc_call *c = calloc(1, sizeof(*c));
    grpc_call_error e;

    if (!c) {
        tp_log(TP_LOG_ERR, "rpc: out of memory posting a request");
        return;
    }
    atomic_fetch_add(&s->contexts, 1);
    c->srv = s;
    c->method = m;
    c->cq = q;
    c->t_new = (struct rpc_tag){T_NEW, c};
    c->t_send = (struct rpc_tag){T_SEND, c};
    c->t_close = (struct rpc_tag){T_CLOSE, c};
    c->t_stream = (struct rpc_tag){T_STREAM, c};
    c->t_recv = (struct rpc_tag){T_RECV, c};
    pthread_mutex_init(&c->slock, NULL);
    grpc_metadata_array_init(&c->md);
    grpc_call_details_init(&c->details);
    if (m >= 0)
        /* a client stream's messages are received one by one (start_recv), none with the call */
        e = grpc_server_request_registered_call(
            s->server, s->handles[m], &c->call, &c->deadline, &c->md,
            s->methods[m].client_stream ? NULL : &c->payload, s->pollers[q].cq, s->pollers[q].cq,
            &c->t_new);
    else
        e = grpc_server_request_call(s->server, &c->call, &c->details, &c->md, s->pollers[q].cq,
                                     s->pollers[q].cq, &c->t_new);
    if (e != GRPC_CALL_OK) {
        tp_log(TP_LOG_ERR, "rpc: cannot post a request: error %d", (int)e);
        call_free(c);
    }
}

/* The last batch of a call: initial metadata unless a streamed message took it, the reply (if
 * any) and the status. */
static void send_final(struct rpc_call *c, int status, const char *msg, grpc_byte_buffer *reply,
                       int with_md)
{
    grpc_op ops[3];
    grpc_slice details = grpc_slice_from_copied_string(msg ? msg : "");
    grpc_call_error e;
    int n = 0;

    memset(ops, 0, sizeof(ops));
    if (with_md) {
        ops[n].op = GRPC_OP_SEND_INITIAL_METADATA;
        ops[n++].data.send_initial_metadata.count = 0;
    }
    if (reply) {
        c->reply = reply;
        ops[n].op = GRPC_OP_SEND_MESSAGE;
        ops[n++].data.send_message.send_message = reply;
    }
    ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
    ops[n].data.send_status_from_server.trailing_metadata_count = 0;
    ops[n].data.send_status_from_server.status = (grpc_status_code)status;
    ops[n++].data.send_status_from_server.status_details = msg ? &details : NULL;
    /* listed before the batch starts: its completion, on the call's thread, unlists it */
    if (c->srv->reply_timeout_ns) {
        struct poller *p = &c->srv->pollers[c->cq];

        pthread_mutex_lock(&p->lock);
        c->reply_ns = now_ns();
        c->sending = 1;
        c->sprev = p->stail;
        c->snext = NULL;
        if (p->stail)
            p->stail->snext = c;
        else
            p->shead = c;
        p->stail = c;
        pthread_mutex_unlock(&p->lock);
    }
    e = grpc_call_start_batch(c->call, ops, (size_t)n, &c->t_send, NULL);
    grpc_slice_unref(details);
    if (e != GRPC_CALL_OK) {
        tp_log(TP_LOG_ERR, "rpc: cannot send a reply: error %d", (int)e);
        unlist_send(c);
        call_release(c); /* no event will come for t_send */
    }
}

/* Starts the next queued message of a streaming reply. slock held; the call is alive (its close
 * batch has not completed while messages are queued, or it holds a reference of its own). */
static void stream_next_locked(struct rpc_call *c)
{
    grpc_op ops[2];
    int n = 0;

    memset(ops, 0, sizeof(ops));
    c->sflight = c->squeue[c->shead];
    c->shead = (c->shead + 1) % c->scap;
    c->slen--;
    if (!c->md_sent) {
        ops[n].op = GRPC_OP_SEND_INITIAL_METADATA;
        ops[n++].data.send_initial_metadata.count = 0;
    }
    ops[n].op = GRPC_OP_SEND_MESSAGE;
    ops[n++].data.send_message.send_message = c->sflight;
    c->md_sent = 1;
    atomic_fetch_add(&c->pending, 1);
    if (grpc_call_start_batch(c->call, ops, (size_t)n, &c->t_stream, NULL) != GRPC_CALL_OK) {
        tp_log(TP_LOG_ERR, "rpc: cannot send a streamed message");
        grpc_byte_buffer_destroy(c->sflight);
        c->sflight = NULL;
        c->sbroken = 1;
        atomic_fetch_sub(&c->pending, 1); /* the close batch still holds the call */
    }
}

int rpc_stream_send(struct rpc_call *c, grpc_byte_buffer *msg, struct tp_err *err)
{
    int full;

    pthread_mutex_lock(&c->slock);
    if (c->fin_wanted || c->sbroken) {
        pthread_mutex_unlock(&c->slock);
        grpc_byte_buffer_destroy(msg);
        return tp_err_set(err, TP_EUNAVAIL, "the stream has ended");
    }
    if (!c->squeue) {
        int cap = c->method >= 0 ? c->srv->methods[c->method].stream_queue : 0;

        c->scap = cap > 0 ? cap : STREAM_QUEUE;
        c->squeue = calloc((size_t)c->scap, sizeof(*c->squeue));
        if (!c->squeue) {
            c->scap = 0;
            pthread_mutex_unlock(&c->slock);
            grpc_byte_buffer_destroy(msg);
            return tp_err_set(err, TP_ENOMEM, "no memory for the stream");
        }
    }
    full = c->slen == c->scap;
    if (!full) {
        c->squeue[(c->shead + c->slen) % c->scap] = msg;
        c->slen++;
        if (!c->sflight)
            stream_next_locked(c);
    } else {
        c->sbroken = 1;
    }
    pthread_mutex_unlock(&c->slock);
    if (!full)
        return 0;
    /* the client reads nothing of what it is sent: end it, rather than hold ever more */
    grpc_byte_buffer_destroy(msg);
    grpc_call_cancel_with_status(c->call, GRPC_STATUS_RESOURCE_EXHAUSTED,
                                 "the client does not read the stream's messages", NULL);
    return tp_err_set(err, TP_EBUSY, "the client does not read the stream's messages");
}

/* A streamed message's batch completed. On the call's thread. */
static void on_stream_sent(struct rpc_call *c, int success)
{
    int fin = 0, status = 0;
    char *msg = NULL;

    pthread_mutex_lock(&c->slock);
    grpc_byte_buffer_destroy(c->sflight);
    c->sflight = NULL;
    if (!success)
        c->sbroken = 1;
    if (c->slen && !c->sbroken)
        stream_next_locked(c);
    if (!c->sflight && c->fin_wanted) { /* the status waited for the messages */
        fin = 1;
        c->fin_wanted = 0;
        status = c->fin_status;
        msg = c->fin_msg;
        c->fin_msg = NULL;
    }
    pthread_mutex_unlock(&c->slock);
    if (fin) {
        send_final(c, status, msg, NULL, !c->md_sent);
        free(msg);
    }
    call_release(c);
}

void rpc_reply(struct rpc_call *c, int status, const char *msg, grpc_byte_buffer *reply)
{
    int with_md;

    pthread_mutex_lock(&c->slock);
    if (c->replied) { /* its status, and the reference it releases, are spoken for */
        pthread_mutex_unlock(&c->slock);
        tp_log(TP_LOG_ERR, "rpc: a call was answered twice; the second answer is dropped");
        if (reply)
            grpc_byte_buffer_destroy(reply);
        return;
    }
    c->replied = 1;
    if (c->sflight) { /* a streamed message is still on its way: the status follows it */
        c->fin_wanted = 1;
        c->fin_status = status;
        free(c->fin_msg);
        c->fin_msg = msg ? strdup(msg) : NULL;
        pthread_mutex_unlock(&c->slock);
        if (reply)
            grpc_byte_buffer_destroy(reply); /* a streaming call ends with its status alone */
        return;
    }
    with_md = !c->md_sent;
    c->md_sent = 1;
    c->fin_wanted = 1; /* nothing may be streamed after the status */
    pthread_mutex_unlock(&c->slock);
    send_final(c, status, msg, reply, with_md);
}

void rpc_reply_err(struct rpc_call *c, const struct tp_err *err)
{
    rpc_reply(c, tp_code_grpc(err->code), err->msg, NULL);
}

void *rpc_call_data(struct rpc_call *c, size_t size)
{
    if (!c->data)
        c->data = calloc(1, size);
    return c->data;
}

grpc_byte_buffer *rpc_call_take_payload(struct rpc_call *c)
{
    grpc_byte_buffer *bb = c->payload;

    c->payload = NULL;
    return bb;
}

int64_t rpc_call_deadline_ns(struct rpc_call *c)
{
    gpr_timespec now, left;
    struct timespec ts;
    int64_t ns;

    if (gpr_time_cmp(c->deadline, gpr_inf_future(c->deadline.clock_type)) == 0)
        return INT64_MAX;
    /* gRPC's clocks need not share an origin with ours: carry over the time left */
    now = gpr_now(c->deadline.clock_type);
    left = gpr_time_sub(c->deadline, now);
    clock_gettime(CLOCK_MONOTONIC, &ts);
    if (left.tv_sec > 1000000000)
        return INT64_MAX;
    ns = (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
    return ns + (int64_t)left.tv_sec * 1000000000 + left.tv_nsec;
}

void rpc_call_on_cancel(struct rpc_call *c, void (*fn)(void *arg), void *arg)
{
    c->on_cancel = fn;
    c->on_cancel_arg = arg;
}

/* Posts the receive of a client stream's next message; the call holds a reference for it. */
static void start_recv(struct rpc_call *c)
{
    grpc_op op;

    memset(&op, 0, sizeof(op));
    op.op = GRPC_OP_RECV_MESSAGE;
    op.data.recv_message.recv_message = &c->rbuf;
    atomic_fetch_add(&c->pending, 1);
    if (grpc_call_start_batch(c->call, &op, 1, &c->t_recv, NULL) != GRPC_CALL_OK) {
        tp_log(TP_LOG_ERR, "rpc: cannot receive a streamed message");
        atomic_fetch_sub(&c->pending, 1);
        c->srv->methods[c->method].handler(c->srv->ctx, c, NULL);
    }
}

/* A client stream's message arrived (or its end). On the call's thread. */
static void on_recv(struct rpc_call *c, int success)
{
    struct rpc_server *s = c->srv;
    grpc_byte_buffer *bb = c->rbuf;

    c->rbuf = NULL;
    if (!success || !bb) { /* half-closed, gone or cancelled: the handler hears the end */
        if (bb)
            grpc_byte_buffer_destroy(bb);
        s->methods[c->method].handler(s->ctx, c, NULL);
        call_release(c);
        return;
    }
    c->payload = bb;
    s->methods[c->method].handler(s->ctx, c, bb);
    if (c->payload) { /* not taken */
        grpc_byte_buffer_destroy(c->payload);
        c->payload = NULL;
    }
    start_recv(c);
    call_release(c); /* start_recv took its own */
}

static void on_new(struct rpc_server *s, struct rpc_call *c)
{
    grpc_op op;
    grpc_call_error e;

    if (!atomic_load(&s->shutting_down))
        post(s, c->method, c->cq);
    atomic_store(&c->pending, 2);
    memset(&op, 0, sizeof(op));
    op.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    op.data.recv_close_on_server.cancelled = &c->cancelled;
    e = grpc_call_start_batch(c->call, &op, 1, &c->t_close, NULL);
    if (e != GRPC_CALL_OK) {
        tp_log(TP_LOG_ERR, "rpc: cannot start the close batch: error %d", (int)e);
        atomic_store(&c->pending, 1);
    }
    if (c->method < 0) {
        char method[128];

        snprintf(method, sizeof(method), "%.*s", (int)GRPC_SLICE_LENGTH(c->details.method),
                 (const char *)GRPC_SLICE_START_PTR(c->details.method));
        tp_log(TP_LOG_DEBUG, "unimplemented method %s", method);
        {
            char msg[200];

            snprintf(msg, sizeof(msg), "method %s is not implemented by tpd", method);
            rpc_reply(c, GRPC_STATUS_UNIMPLEMENTED, msg, NULL);
        }
        return;
    }
    if (s->methods[c->method].client_stream) {
        start_recv(c);
        return;
    }
    s->methods[c->method].handler(s->ctx, c, c->payload);
    /* the handler has parsed what it needs: free the request bytes now, not at call end */
    if (c->payload) {
        grpc_byte_buffer_destroy(c->payload);
        c->payload = NULL;
    }
}

/* Cancels the calls of p whose reply has not been sent within the reply timeout. A client that
 * does not read (a zero flow-control window) would otherwise keep what the reply points at, a
 * scheduler slot, for as long as its connection lives. Cancelling ends the stream: gRPC drops the
 * reply's slices that wait for the window (releasing the slot) and sends the status in trailers,
 * which flow control does not hold back. Slices already in a socket write that never ends (a
 * peer that stopped reading its socket) stay held until the connection closes: the scheduler
 * never lends its last slot out (sched.h), so such a peer cannot stall the others. The calls are
 * taken off the list, and referenced, under the lock, and cancelled outside it. */
static void cancel_late_replies(struct poller *p, int64_t now)
{
    struct rpc_server *s = p->srv;
    grpc_call *late[64];
    struct rpc_call *c;
    char msg[160];
    long n = 0, total;

    pthread_mutex_lock(&p->lock);
    while ((c = p->shead) && now - c->reply_ns >= s->reply_timeout_ns &&
           n < (long)(sizeof(late) / sizeof(late[0]))) {
        p->shead = c->snext;
        if (p->shead)
            p->shead->sprev = NULL;
        else
            p->stail = NULL;
        c->sending = 0;
        c->snext = NULL;
        c->given_up = 1;
        atomic_fetch_add(&s->given_up, 1);
        grpc_call_ref(c->call);
        late[n++] = c->call;
    }
    if (p->shead && now - p->shead->reply_ns >= s->reply_timeout_ns)
        p->next_check_ns = now; /* more than fit: again at the next wake-up */
    pthread_mutex_unlock(&p->lock);
    if (n == 0)
        return;
    snprintf(msg, sizeof(msg),
             "reply not taken by the client within %lld ms (--reply-timeout-ms): call cancelled "
             "to free what it held",
             (long long)(s->reply_timeout_ns / 1000000));
    for (long i = 0; i < n; i++) {
        grpc_call_cancel_with_status(late[i], GRPC_STATUS_RESOURCE_EXHAUSTED, msg, NULL);
        grpc_call_unref(late[i]);
    }
    total = atomic_fetch_add(&s->late, n) + n;
    /* a client that never reads may do so on every call: a line every 10 s at most */
    if (atomic_load(&s->late_logged_ns) == 0 ||
        now - atomic_load(&s->late_logged_ns) >= 10000000000LL) {
        atomic_store(&s->late_logged_ns, now);
        tp_log(TP_LOG_WARN,
               "cancelled calls whose client did not take the reply within %lld ms "
               "(--reply-timeout-ms): %ld since start",
               (long long)(s->reply_timeout_ns / 1000000), total);
    }
}

static void *poll_thread(void *arg)
{
    struct poller *p = arg;
    struct rpc_server *s = p->srv;
    grpc_completion_queue *cq = p->cq;

    for (;;) {
        /* with a reply timeout, wake up at least every check_every_ns to look for late replies */
        gpr_timespec until =
            s->reply_timeout_ns ? gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                                               gpr_time_from_nanos(s->check_every_ns, GPR_TIMESPAN))
                                : gpr_inf_future(GPR_CLOCK_MONOTONIC);
        grpc_event ev = grpc_completion_queue_next(cq, until, NULL);
        struct rpc_tag *t;

        if (ev.type == GRPC_QUEUE_SHUTDOWN)
            break;
        if (s->reply_timeout_ns) {
            int64_t now = now_ns();

            if (now >= p->next_check_ns) {
                p->next_check_ns = now + s->check_every_ns;
                cancel_late_replies(p, now);
            }
        }
        if (ev.type != GRPC_OP_COMPLETE)
            continue;
        t = ev.tag;
        switch (t->kind) {
        case T_NEW:
            if (!ev.success) { /* server shutting down: nothing to answer, do not re-post */
                call_free(t->call);
                break;
            }
            on_new(s, t->call);
            break;
        case T_CLOSE:
            /* the call's storage lives until this release, so the callback may use it */
            if (t->call->cancelled && t->call->on_cancel)
                t->call->on_cancel(t->call->on_cancel_arg);
            call_release(t->call);
            break;
        case T_SEND:
            unlist_send(t->call);
            call_release(t->call);
            break;
        case T_STREAM:
            on_stream_sent(t->call, ev.success);
            break;
        case T_RECV:
            on_recv(t->call, ev.success);
            break;
        }
    }
    return NULL;
}

/* Sets s->tls from the PEM files of c (left NULL without tls_cert). The private key is wiped
 * from our memory once gRPC has its own copy. */
static int make_tls(struct rpc_server *s, const struct rpc_config *c, struct tp_err *err)
{
    grpc_ssl_pem_key_cert_pair pair;
    char *cert = NULL, *key = NULL, *ca = NULL;
    int rc = -1;

    if (!c->tls_cert)
        return 0;
    if (pem_read(c->tls_cert, &cert, err) < 0 || pem_read(c->tls_key, &key, err) < 0 ||
        (c->tls_client_ca && pem_read(c->tls_client_ca, &ca, err) < 0))
        goto out;
    pair = (grpc_ssl_pem_key_cert_pair){.private_key = key, .cert_chain = cert};
    s->tls = grpc_ssl_server_credentials_create_ex(
        ca, &pair, 1,
        ca ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
           : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE,
        NULL);
    if (!s->tls) {
        tp_err_set(err, TP_EINVAL, "cannot use TLS certificate %s with key %s", c->tls_cert,
                   c->tls_key);
        goto out;
    }
    rc = 0;
out:
    if (key)
        explicit_bzero(key, strlen(key));
    free(cert);
    free(key);
    free(ca);
    return rc;
}

/* Makes sure that listening on the unix socket path will not take it from a live server. gRPC
 * removes any socket file before it binds, so a second tpd on the same path would otherwise take
 * the clients of the first, and remove the path when it stops, leaving the first unreachable.
 * A socket file that a server answers on is refused; one that refuses the connection
 * (ECONNREFUSED: left by a process that died) is removed; anything that is not a socket is never
 * removed. The check and the bind are not atomic: two servers started at the same instant may
 * still both pass it. */
static int claim_unix_path(const char *addr, const char *path, struct tp_err *err)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    struct stat st;
    int fd, rc;

    if (lstat(path, &st) < 0) {
        if (errno == ENOENT)
            return 0;
        return tp_err_sys(err, "cannot listen on %s: cannot check the path", addr);
    }
    if (!S_ISSOCK(st.st_mode))
        return tp_err_set(err, TP_EINVAL,
                          "cannot listen on %s: the path exists and is not a socket (tpd removes "
                          "only sockets that no server answers on)",
                          addr);
    if (strlen(path) >= sizeof(sa.sun_path))
        return tp_err_set(err, TP_EINVAL, "cannot listen on %s: the path is longer than %zu bytes",
                          addr, sizeof(sa.sun_path) - 1);
    memcpy(sa.sun_path, path, strlen(path) + 1);
    /* non-blocking: a server whose backlog is full answers EAGAIN instead of keeping us waiting */
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0)
        return tp_err_sys(err, "cannot listen on %s: socket", addr);
    rc = connect(fd, (struct sockaddr *)&sa, sizeof(sa));
    if (rc < 0 && errno == ECONNREFUSED) {
        close(fd);
        if (unlink(path) < 0 && errno != ENOENT)
            return tp_err_sys(err, "cannot listen on %s: removing the stale socket", addr);
        tp_log(TP_LOG_NOTICE, "removed stale socket %s: no server answered on it", addr);
        return 0;
    }
    if (rc == 0 || errno == EAGAIN || errno == EINPROGRESS) {
        close(fd);
        return tp_err_set(err, TP_EBUSY,
                          "cannot listen on %s: another server is listening on it (stop it "
                          "first, or choose another path)",
                          addr);
    }
    rc = errno;
    close(fd);
    errno = rc;
    return tp_err_sys(err, "cannot listen on %s: cannot tell whether a server answers on it", addr);
}

static int add_port(struct rpc_server *s, const char *addr, const struct rpc_config *c,
                    struct tp_err *err)
{
    int is_unix = strncmp(addr, "unix:", 5) == 0;
    grpc_server_credentials *creds =
        is_unix || !s->tls ? grpc_insecure_server_credentials_create() : s->tls;
    mode_t old_mask = 0;
    struct stat st;
    int port;

    if (is_unix && claim_unix_path(addr, addr + 5, err) < 0) {
        if (creds != s->tls)
            grpc_server_credentials_release(creds);
        return -1;
    }
    /* The socket file is created by bind() inside gRPC with mode 0777 & ~umask: set the umask
     * so that it never exists with wider permissions, then chmod to be exact. */
    if (is_unix)
        old_mask = umask(~(mode_t)c->socket_mode & 0777);
    port = grpc_server_add_http2_port(s->server, addr, creds);
    if (is_unix)
        umask(old_mask);
    if (creds != s->tls)
        grpc_server_credentials_release(creds);
    if (port == 0 && creds == s->tls) /* gRPC checks the certificate and key only here */
        return tp_err_set(err, TP_EINVAL,
                          "cannot listen on %s with TLS: is %s a certificate, %s its private key"
                          "%s%s%s?",
                          addr, c->tls_cert, c->tls_key, c->tls_client_ca ? " and " : "",
                          c->tls_client_ca ? c->tls_client_ca : "",
                          c->tls_client_ca ? " a CA certificate" : "");
    if (port == 0)
        return tp_err_set(err, TP_ESYS, "cannot listen on %s", addr);
    if (is_unix && s->nunix < 8 && lstat(addr + 5, &st) == 0) {
        struct unix_path *u = &s->unix_paths[s->nunix++];

        snprintf(u->path, sizeof(u->path), "%s", addr + 5);
        u->dev = st.st_dev;
        u->ino = st.st_ino;
    }
    if (is_unix && chmod(addr + 5, (mode_t)c->socket_mode) < 0)
        return tp_err_sys(err, "setting mode %04o on %s", c->socket_mode, addr + 5);
    if (is_unix)
        tp_log(TP_LOG_NOTICE, "listening on %s (plaintext, mode %04o)", addr, c->socket_mode);
    else /* the port tells which one the system chose for HOST:0 */
        tp_log(TP_LOG_NOTICE, "listening on %s (port %d, %s)", addr, port,
               !s->tls            ? "plaintext"
               : c->tls_client_ca ? "TLS, client certificate required"
                                  : "TLS");
    return 0;
}

int rpc_server_create(struct rpc_server **out, const struct rpc_config *c,
                      const struct rpc_method *methods, int nmethods, void *ctx, struct tp_err *err)
{
    struct rpc_server *s = calloc(1, sizeof(*s));
    grpc_resource_quota *quota = NULL;
    grpc_arg args[3] = {
        {GRPC_ARG_INTEGER, GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH, {.integer = (int)c->max_recv}},
        {GRPC_ARG_INTEGER, GRPC_ARG_MAX_SEND_MESSAGE_LENGTH, {.integer = (int)c->max_send}},
        {GRPC_ARG_POINTER, GRPC_ARG_RESOURCE_QUOTA, {.pointer = {NULL, NULL}}}};
    grpc_channel_args chargs = {2, args};

    *out = NULL;
    if (!s)
        return tp_err_set(err, TP_ENOMEM, "no memory for the server");
    s->methods = methods;
    s->nmethods = nmethods;
    s->ctx = ctx;
    pthread_mutex_init(&s->lock, NULL);
    {
        pthread_condattr_t ca;

        pthread_condattr_init(&ca);
        pthread_condattr_setclock(&ca, CLOCK_MONOTONIC); /* the drain is timed on it */
        pthread_cond_init(&s->idle, &ca);
        pthread_condattr_destroy(&ca);
    }
    /* late replies are found within an eighth of the timeout, 10 to 250 ms */
    s->reply_timeout_ns = (int64_t)c->reply_timeout_ms * 1000000;
    s->check_every_ns = s->reply_timeout_ns / 8;
    if (s->check_every_ns < 10000000)
        s->check_every_ns = 10000000;
    if (s->check_every_ns > 250000000)
        s->check_every_ns = 250000000;
    s->npollers = c->threads;
    s->pollers = calloc((size_t)s->npollers, sizeof(*s->pollers));
    s->handles = calloc((size_t)nmethods, sizeof(*s->handles));
    if (!s->pollers || !s->handles) {
        tp_err_set(err, TP_ENOMEM, "no memory for the server");
        goto fail;
    }
    /* gRPC accounts the memory of its connections and received messages (those that wait in the
     * scheduler's queue too) against the quota: as it fills, flow control shrinks the windows and
     * senders slow down; past it, gRPC resets streams with RESOURCE_EXHAUSTED. */
    if (c->memory_bytes > 0) {
        size_t bytes = (size_t)c->memory_bytes;

        if (c->max_recv > 0 && c->max_send > 0)
            bytes += 2 * (size_t)(c->max_recv + c->max_send);
        quota = grpc_resource_quota_create("tpd");
        grpc_resource_quota_resize(quota, bytes);
        args[2].value.pointer.p = quota;
        args[2].value.pointer.vtable = grpc_resource_quota_arg_vtable();
        chargs.num_args = 3;
        tp_log(TP_LOG_INFO, "gRPC memory quota: %zu MiB", bytes >> 20);
    }
    s->server = grpc_server_create(&chargs, NULL);
    if (quota)
        grpc_resource_quota_unref(quota);
    for (int m = 0; m < nmethods; m++)
        s->handles[m] = grpc_server_register_method(
            s->server, methods[m].path, NULL,
            methods[m].client_stream ? GRPC_SRM_PAYLOAD_NONE
                                     : GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER,
            0);
    for (int q = 0; q < s->npollers; q++) {
        s->pollers[q].srv = s;
        pthread_mutex_init(&s->pollers[q].lock, NULL);
        s->pollers[q].cq = grpc_completion_queue_create_for_next(NULL);
        grpc_server_register_completion_queue(s->server, s->pollers[q].cq, NULL);
    }
    if (make_tls(s, c, err) < 0)
        goto fail;
    for (int i = 0; i < c->nlisten; i++)
        if (add_port(s, c->listen[i], c, err) < 0)
            goto fail;
    *out = s;
    return 0;
fail:
    rpc_server_stop(s, 0);
    return -1;
}

int rpc_server_start(struct rpc_server *s, struct tp_err *err)
{
    grpc_server_start(s->server);
    s->started = 1;
    for (int q = 0; q < s->npollers; q++) {
        for (int m = 0; m < s->nmethods; m++)
            for (int k = 0; k < POSTED_PER_METHOD; k++)
                post(s, m, q);
        for (int k = 0; k < POSTED_UNKNOWN; k++)
            post(s, -1, q);
    }
    for (int q = 0; q < s->npollers; q++) {
        int rc = pthread_create(&s->pollers[q].thread, NULL, poll_thread, &s->pollers[q]);

        if (rc != 0)
            return tp_err_set(err, TP_ESYS, "cannot start gRPC thread %d: %s", q, strerror(rc));
        s->pollers[q].running = 1;
    }
    return 0;
}

/* Only the socket files we made: a path replaced since is someone else's. */
static void remove_socket_files(struct rpc_server *s)
{
    for (int i = 0; i < s->nunix; i++) {
        struct unix_path *u = &s->unix_paths[i];
        struct stat st;

        if (lstat(u->path, &st) == 0 && S_ISSOCK(st.st_mode) && st.st_dev == u->dev &&
            st.st_ino == u->ino)
            unlink(u->path);
    }
    s->nunix = 0;
}

void rpc_server_stop(struct rpc_server *s, int grace_ms)
{
    if (!s)
        return;
    atomic_store(&s->shutting_down, 1);
    /* also when never started: gRPC aborts in grpc_server_destroy if a server with bound
     * listeners was not shut down (a start that fails after binding comes here) */
    if (s->server) {
        grpc_completion_queue *scq = grpc_completion_queue_create_for_pluck(NULL);
        int tag;

        grpc_server_shutdown_and_notify(s->server, scq, &tag);
        /* The shutdown completes only once every connection is gone, and gRPC lets each peer
         * answer its GOAWAY ping first (up to 20 s for one that does not answer, such as an idle
         * socket that never spoke HTTP/2). So wait for our own calls instead: the requests that
         * were posted fail at once, the running calls finish, for up to grace_ms. Then cancelling
         * all calls also closes every connection, idle ones included, and the shutdown
         * completes. */
        if (s->started) {
            int64_t t = now_ns() + (int64_t)grace_ms * 1000000;

            /* calls given up on (their client takes no reply) are not waited for; they drop
             * out of the count without a signal, so the wait looks again every 50 ms */
            pthread_mutex_lock(&s->lock);
            while (atomic_load(&s->contexts) > atomic_load(&s->given_up) && now_ns() < t) {
                int64_t w = t - now_ns() < 50000000 ? t : now_ns() + 50000000;
                struct timespec step = {(time_t)(w / 1000000000), (long)(w % 1000000000)};

                pthread_cond_timedwait(&s->idle, &s->lock, &step);
            }
            pthread_mutex_unlock(&s->lock);
            if (atomic_load(&s->contexts) > atomic_load(&s->given_up))
                tp_log(TP_LOG_WARN, "calls still running after %d ms, cancelling them", grace_ms);
        }
        grpc_server_cancel_all_calls(s->server);
        /* A connection whose peer stopped reading its socket closes only once gRPC's pending
         * write to it finishes, which may be never: the shutdown is waited for a bounded time,
         * then the server is left as it is (kept reachable, so a leak check does not report
         * it) and the process goes on to exit. */
        if (grpc_completion_queue_pluck(scq, &tag,
                                        gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                                                     gpr_time_from_millis(LAST_WAIT_MS,
                                                                          GPR_TIMESPAN)),
                                        NULL)
                .type == GRPC_QUEUE_TIMEOUT) {
            tp_log(TP_LOG_WARN,
                   "a client connection did not close within %d ms of the drain (its peer does "
                   "not read): leaving it to the exit",
                   LAST_WAIT_MS);
            remove_socket_files(s);
            abandoned = s;
            return;
        }
        grpc_completion_queue_shutdown(scq);
        /* a pluck queue is drained with pluck: _next is not defined on it */
        while (grpc_completion_queue_pluck(scq, &tag, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL)
                   .type != GRPC_QUEUE_SHUTDOWN)
            ;
        grpc_completion_queue_destroy(scq);
    }
    for (int q = 0; s->pollers && q < s->npollers; q++)
        if (s->pollers[q].cq)
            grpc_completion_queue_shutdown(s->pollers[q].cq);
    for (int q = 0; s->pollers && q < s->npollers; q++) {
        struct poller *p = &s->pollers[q];

        if (p->running) {
            pthread_join(p->thread, NULL);
            continue;
        }
        /* a queue without its thread (start failed half way) is drained here */
        while (p->cq) {
            grpc_event ev =
                grpc_completion_queue_next(p->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);

            if (ev.type == GRPC_QUEUE_SHUTDOWN)
                break;
            if (ev.type == GRPC_OP_COMPLETE && ((struct rpc_tag *)ev.tag)->kind == T_NEW)
                call_free(((struct rpc_tag *)ev.tag)->call);
        }
    }
    if (s->server)
        grpc_server_destroy(s->server);
    for (int q = 0; s->pollers && q < s->npollers; q++)
        if (s->pollers[q].cq)
            grpc_completion_queue_destroy(s->pollers[q].cq);
    remove_socket_files(s);
    if (s->tls)
        grpc_server_credentials_release(s->tls);
    for (int q = 0; s->pollers && q < s->npollers; q++)
        if (s->pollers[q].srv)
            pthread_mutex_destroy(&s->pollers[q].lock);
    pthread_mutex_destroy(&s->lock);
    pthread_cond_destroy(&s->idle);
    free(s->pollers);
    free(s->handles);
    free(s);
}
