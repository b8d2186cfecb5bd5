/* cmd_bench.c -- `tpclient bench`: a closed-loop load generator for ModelInfer. C threads each
 * keep one call in flight, for a fixed time (--duration) or until N calls are done in all
 * (--iters), after a warm-up; then it prints latency percentiles and throughput, for people and
 * as one machine-readable `bench-result:` line (docs/performance.md lists its keys).
 *
 * Each thread has its own channel with a local subchannel pool, so its own connection, and its
 * own completion queue: C threads are C independent clients, as C users of a server are, and no
 * client-side connection or queue is shared among them (--shared-channel multiplexes all of them
 * over one connection instead). The request is packed once and sent by reference on every call;
 * the response is joined and unpacked into buffers each thread reuses (fresh buffers of tens of
 * MiB cost more in page faults than the transfer) and checked (datatype, shape, size), and
 * copied no further. So the client costs what a correct client must and no more, and the numbers
 * describe the server and the transport. With --shm the tensors travel through POSIX shared memory
 * that each thread registers once (KServe v2's system shared memory extension, as Triton defines
 * it): only the small request and response messages cross the socket. The input rows have the
 * model's datatype (FP32, FP16 or BF16, from ModelMetadata), converted once before the start. */
#include <errno.h>
#include <fcntl.h>
#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "cmd.h"
#include "conn.h"
#include "grpc_service.pb-c.h"
#include "kserve.h"
#include "timing.h"

#define SERVICE "/inference.GRPCInferenceService/"
#define MAX_MSG (1 << 30)
#define MAX_CONCURRENCY 1024
#define MAX_CALLS_PER_THREAD (16L << 20) /* latencies kept per thread: 128 MiB of doubles */

struct bench_opts {
    const char *model;
    long rows;
    long concurrency;
    long iters;      /* calls in all threads together; 0 when --duration counts instead */
    double duration; /* seconds; 0 when --iters counts */
    long warmup;     /* calls per thread before measuring */
    int shared_channel;
    int shm;
};

/* A POSIX shared-memory region registered with the server under name; key is its shm_open name. */
struct region {
    char name[64];
    char key[80];
    int fd; /* -1 when not created */
    void *base;
    size_t size; /* bytes */
    int registered;
};

struct bench;

/* One client thread. */
struct client {
    struct bench *b;
    int idx;
    grpc_channel *ch; /* own, or the shared one */
    void *infer;      /* ModelInfer registered on ch */
    grpc_completion_queue *cq;
    grpc_slice req; /* the packed ModelInferRequest, sent on every call */
    int has_req;
    struct region in, out; /* --shm only */
    uint8_t *flat;         /* a response's slices, joined; reused by every call */
    size_t flat_cap;
    uint8_t *arena; /* what protobuf-c unpacks a response into; reset after every call */
    size_t arena_size, arena_used;
    double *lat; /* seconds, one per measured call */
    size_t nlat, cap;
    double t_last; /* when its last call ended */
    pthread_t thread;
};

struct bench {
    struct bench_opts o;
    char model[256];
    struct kserve_layout l;
    char *target; /* gpr_free */
    int timeout_ms;
    struct client *cl;
    pthread_cond_t cond; /* signalled when warmed or go change; with lock */
    long warmed;         /* clients done with their warm-up */
    int go;              /* t0 and t_end are set: measure */
    double t0, t_end;
    atomic_long next; /* calls started, in --iters mode */
    atomic_int stop;  /* a thread failed: everyone stops */
    pthread_mutex_t lock;
    struct tp_err err; /* first failure of any thread */
    int failed;
};

/* One unary call of method (registered as handle when not NULL) with the bytes of req, which stay
 * the caller's, on this client's own channel and queue. On OK, *resp is the caller's to destroy. */
static int unary(struct client *c, const char *method, void *handle, grpc_slice req,
                 grpc_byte_buffer **resp, struct tp_err *err)
{
    struct conn cc = {.ch = c->ch, .cq = c->cq, .timeout_ms = c->b->timeout_ms};
    grpc_byte_buffer *send = grpc_raw_byte_buffer_create(&req, 1);
    int rc = conn_call_raw(&cc, method, handle, send, resp, err);

    grpc_byte_buffer_destroy(send);
    if (rc < 0)
        tp_err_prefix(err, "%s: ", method + strlen(SERVICE));
    return rc;
}

/* Calls one of the shared-memory extension's methods, whose responses are empty messages. */
static int shm_call(struct client *c, const char *method, const ProtobufCMessage *req,
                    const ProtobufCMessageDescriptor *resp_desc, struct tp_err *err)
{
    struct conn cc = {.ch = c->ch, .cq = c->cq, .timeout_ms = c->b->timeout_ms};
    ProtobufCMessage *resp = NULL;

    if (conn_call(&cc, method, req, resp_desc, &resp, err) < 0)
        return -1;
    protobuf_c_message_free_unpacked(resp, NULL);
    return 0;
}

static int region_register(struct client *c, struct region *r, struct tp_err *err)
{
    Inference__SystemSharedMemoryRegisterRequest q =
        INFERENCE__SYSTEM_SHARED_MEMORY_REGISTER_REQUEST__INIT;

    q.name = r->name;
    q.key = r->key;
    q.byte_size = r->size;
    if (shm_call(c, SERVICE "SystemSharedMemoryRegister", &q.base,
                 &inference__system_shared_memory_register_response__descriptor, err) < 0)
        return tp_err_prefix(err, "registering shared memory '%s': ", r->name), -1;
    r->registered = 1;
    return 0;
}

static void region_unregister(struct client *c, struct region *r)
{
    Inference__SystemSharedMemoryUnregisterRequest q =
        INFERENCE__SYSTEM_SHARED_MEMORY_UNREGISTER_REQUEST__INIT;
    struct tp_err err = {0};

    if (!r->registered)
        return;
    r->registered = 0;
    q.name = r->name;
    if (shm_call(c, SERVICE "SystemSharedMemoryUnregister", &q.base,
                 &inference__system_shared_memory_unregister_response__descriptor, &err) < 0)
        fprintf(stderr, "tpclient: warning: unregistering shared memory '%s': %s\n", r->name,
                err.msg);
}

/* Creates, maps and touches a fresh region of size bytes; nothing is left on failure. */
static int region_create(struct region *r, int idx, const char *what, size_t size,
                         struct tp_err *err)
{
    *r = (struct region){.fd = -1, .base = MAP_FAILED, .size = size};
    snprintf(r->name, sizeof(r->name), "tpbench.%d.%d.%s", (int)getpid(), idx, what);
    snprintf(r->key, sizeof(r->key), "/%s", r->name);
    r->fd = shm_open(r->key, O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600);
    if (r->fd < 0)
        return tp_err_sys(err, "creating shared memory %s", r->key);
    if (ftruncate(r->fd, (off_t)size) < 0) {
        tp_err_sys(err, "sizing shared memory %s to %zu bytes", r->key, size);
        goto fail;
    }
    r->base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, r->fd, 0);
    if (r->base == MAP_FAILED) {
        tp_err_sys(err, "mapping shared memory %s", r->key);
        goto fail;
    }
    memset(r->base, 0, size);
    return 0;
fail:
    close(r->fd);
    shm_unlink(r->key);
    r->fd = -1;
    return -1;
}

static void region_destroy(struct region *r)
{
    if (r->fd < 0)
        return;
    if (r->base != MAP_FAILED)
        munmap(r->base, r->size);
    close(r->fd);
    shm_unlink(r->key);
    r->fd = -1;
}

/* Packs the ModelInferRequest this client sends on every call; x holds the rows in the model's
 * datatype. */
static int pack_request(struct client *c, const void *x, struct tp_err *err)
{
    struct bench *b = c->b;
    struct kserve_shm_ref in = {.region = c->in.name, .bytes = c->in.size},
                          out = {.region = c->out.name, .bytes = c->out.size};
    struct kserve_request q;
    size_t len;
    uint8_t *buf;

    if (b->o.shm)
        kserve_request_init(&q, b->model, &b->l, b->o.rows, NULL, &in, &out);
    else
        kserve_request_init(&q, b->model, &b->l, b->o.rows, x, NULL, NULL);
    len = inference__model_infer_request__get_packed_size(&q.req);
    buf = gpr_malloc(len);
    inference__model_infer_request__pack(&q.req, buf);
    c->req = grpc_slice_new(buf, len, gpr_free);
    c->has_req = 1;
    (void)err;
    return 0;
}

/* protobuf-c's allocator for responses: a bump allocator over the client's arena, so that the
 * response's output bytes land in memory that earlier calls already faulted in (a fresh
 * allocation of tens of MiB costs more in page faults than the transfer). What does not fit comes
 * from malloc. */
static void *arena_alloc(void *data, size_t n)
{
    struct client *c = data;
    size_t at = (c->arena_used + 15) & ~(size_t)15;

    if (c->arena && at + n <= c->arena_size) {
        c->arena_used = at + n;
        return c->arena + at;
    }
    return malloc(n ? n : 1);
}

static void arena_free(void *data, void *p)
{
    struct client *c = data;

    if (!c->arena || (uint8_t *)p < c->arena || (uint8_t *)p >= c->arena + c->arena_size)
        free(p);
}

/* Unpacks a response, joining its slices in the client's reusable buffer first. */
static Inference__ModelInferResponse *unpack_response(struct client *c, grpc_byte_buffer *bb,
                                                      ProtobufCAllocator *alloc, struct tp_err *err)
{
    grpc_byte_buffer_reader reader;
    grpc_slice *s;
    size_t len = grpc_byte_buffer_length(bb), off = 0;
    Inference__ModelInferResponse *r;

    if (!grpc_byte_buffer_reader_init(&reader, bb)) {
        tp_err_set(err, TP_EINVAL, "cannot read the response of ModelInfer");
        return NULL;
    }
    if (len > c->flat_cap) {
        uint8_t *p = realloc(c->flat, len);

        if (!p) {
            grpc_byte_buffer_reader_destroy(&reader);
            tp_err_set(err, TP_ENOMEM, "no memory for a response of %zu bytes", len);
            return NULL;
        }
        c->flat = p;
        c->flat_cap = len;
    }
    while (grpc_byte_buffer_reader_peek(&reader, &s) && off + GRPC_SLICE_LENGTH(*s) <= len) {
        memcpy(c->flat + off, GRPC_SLICE_START_PTR(*s), GRPC_SLICE_LENGTH(*s));
        off += GRPC_SLICE_LENGTH(*s);
    }
    grpc_byte_buffer_reader_destroy(&reader);
    c->arena_used = 0;
    r = inference__model_infer_response__unpack(alloc, off, c->flat);
    if (!r)
        tp_err_set(err, TP_EINVAL, "malformed ModelInferResponse of %zu bytes", off);
    return r;
}

/* Checks a ModelInfer response; with check, also that every output value is finite (the server
 * wrote all of it: the shared output region was filled with NaN before the call). */
static int check_response(struct client *c, grpc_byte_buffer *bb, int check, struct tp_err *err)
{
    struct bench *b = c->b;
    Inference__ModelInferResponse *r;
    size_t esize = tp_dtype_size(b->l.dtype);
    size_t want = (size_t)(b->o.rows * b->l.out) * esize, n = want / esize;
    const char *dt = tp_dtype_wire_name(b->l.dtype);
    const unsigned char *y = NULL;
    int rc = -1;

    ProtobufCAllocator alloc = {.alloc = arena_alloc, .free = arena_free, .allocator_data = c};

    r = unpack_response(c, bb, &alloc, err);
    if (!r)
        return -1;
    if (r->n_outputs != 1 || strcmp(r->outputs[0]->datatype, dt) != 0 ||
        r->outputs[0]->n_shape != 2 || r->outputs[0]->shape[0] != b->o.rows ||
        r->outputs[0]->shape[1] != b->l.out) {
        tp_err_set(err, TP_EINTERNAL, "server answered something else than one %s [%ld, %lld]", dt,
                   b->o.rows, (long long)b->l.out);
        goto out;
    }
    if (b->o.shm) {
        if (!kserve_no_inline_output(r)) {
            tp_err_set(err, TP_EINTERNAL,
                       "server sent the output inline instead of writing shared memory '%s'",
                       c->out.name);
            goto out;
        }
        y = c->out.base;
    } else {
        if (r->n_raw_output_contents != 1 || r->raw_output_contents[0].len != want) {
            tp_err_set(err, TP_EINTERNAL, "server sent %zu output bytes, expected %zu",
                       r->n_raw_output_contents ? r->raw_output_contents[0].len : 0, want);
            goto out;
        }
        y = r->raw_output_contents[0].data;
    }
    for (size_t i = 0; check && i < n; i++) {
        float v;

        if (esize == 4)
            memcpy(&v, y + 4 * i, sizeof(v));
        else
            tp_convert_to_f32(&v, y + 2 * i, 1, b->l.dtype);
        if (!isfinite(v)) {
            tp_err_set(err, TP_EINTERNAL, "output element %zu is %g, not a finite number", i,
                       (double)v);
            goto out;
        }
    }
    rc = 0;
out:
    protobuf_c_message_free_unpacked(&r->base, &alloc);
    return rc;
}

static int one_call(struct client *c, int check, struct tp_err *err)
{
    grpc_byte_buffer *resp;
    int rc;

    if (check && c->b->o.shm)
        memset(c->out.base, 0xff, c->out.size); /* NaN everywhere */
    if (unary(c, SERVICE "ModelInfer", c->infer, c->req, &resp, err) < 0)
        return -1;
    rc = check_response(c, resp, check, err);
    grpc_byte_buffer_destroy(resp);
    return rc;
}

static void fail(struct bench *b, const struct tp_err *err)
{
    pthread_mutex_lock(&b->lock);
    if (!b->failed)
        b->err = *err;
    b->failed = 1;
    pthread_mutex_unlock(&b->lock);
    atomic_store(&b->stop, 1);
}

static int record(struct client *c, double s)
{
    if (c->nlat == c->cap) {
        size_t cap = c->cap ? 2 * c->cap : 1024;
        double *p;

        if (cap > (size_t)MAX_CALLS_PER_THREAD)
            return -1;
        p = realloc(c->lat, cap * sizeof(double));
        if (!p)
            return -1;
        c->lat = p;
        c->cap = cap;
    }
    c->lat[c->nlat++] = s;
    return 0;
}

static void *client_main(void *arg)
{
    struct client *c = arg;
    struct bench *b = c->b;
    struct tp_err err = {0};
    int ok = one_call(c, 1, &err) == 0;

    for (long i = 0; ok && i < b->o.warmup; i++)
        ok = one_call(c, 0, &err) == 0;
    if (!ok)
        fail(b, &err);
    pthread_mutex_lock(&b->lock);
    b->warmed++;
    pthread_cond_broadcast(&b->cond);
    while (!b->go)
        pthread_cond_wait(&b->cond, &b->lock);
    pthread_mutex_unlock(&b->lock);
    while (!atomic_load(&b->stop)) {
        double t;

        if (b->o.duration > 0 ? timing_now_s() >= b->t_end
                              : atomic_fetch_add(&b->next, 1) >= b->o.iters)
            break;
        t = timing_now_s();
        if (one_call(c, 0, &err) < 0) {
            fail(b, &err);
            break;
        }
        if (record(c, timing_now_s() - t) < 0) {
            tp_err_set(&err, TP_ENOMEM, "client %d: no room for more than %zu latencies", c->idx,
                       c->nlat);
            fail(b, &err);
            break;
        }
    }
    c->t_last = timing_now_s();
    return NULL;
}

/* Channel, queue, shared memory and request of client i; the caller cleans up on failure. */
static int client_setup(struct bench *b, struct conn *conn, int i, const void *x,
                        struct tp_err *err)
{
    struct client *c = &b->cl[i];
    size_t in_bytes = (size_t)(b->o.rows * b->l.in) * tp_dtype_size(b->l.dtype),
           out_bytes = (size_t)(b->o.rows * b->l.out) * tp_dtype_size(b->l.dtype);

    c->b = b;
    c->idx = i;
    c->in.fd = c->out.fd = -1;
    if (b->o.shared_channel) {
        c->ch = conn->ch;
    } else {
        grpc_arg args[3] = {
            {GRPC_ARG_INTEGER, GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH, {.integer = MAX_MSG}},
            {GRPC_ARG_INTEGER, GRPC_ARG_MAX_SEND_MESSAGE_LENGTH, {.integer = MAX_MSG}},
            {GRPC_ARG_INTEGER, GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, {.integer = 1}}};
        grpc_channel_args chargs = {3, args};
        grpc_channel_credentials *creds = grpc_insecure_credentials_create();

        c->ch = grpc_channel_create(b->target, creds, &chargs);
        grpc_channel_credentials_release(creds);
        if (!c->ch)
            return tp_err_set(err, TP_EINTERNAL, "cannot create a channel to %s", b->target);
    }
    /* the output bytes, plus room for the rest of the message */
    c->arena_size = (b->o.shm ? 0 : out_bytes) + (64 << 10);
    c->arena = malloc(c->arena_size);
    if (!c->arena)
        return tp_err_set(err, TP_ENOMEM, "no memory for responses of %zu bytes", out_bytes);
    memset(c->arena, 0, c->arena_size);
    c->cq = grpc_completion_queue_create_for_next(NULL);
    c->infer = grpc_channel_register_call(c->ch, SERVICE "ModelInfer", NULL, NULL);
    if (b->o.shm) {
        if (region_create(&c->in, i, "in", in_bytes, err) < 0 ||
            region_create(&c->out, i, "out", out_bytes, err) < 0)
            return -1;
        memcpy(c->in.base, x, in_bytes);
        if (region_register(c, &c->in, err) < 0 || region_register(c, &c->out, err) < 0)
            return -1;
    }
    return pack_request(c, x, err);
}

static void client_cleanup(struct client *c, struct conn *conn)
{
    if (!c->b)
        return;
    if (c->cq) {
        region_unregister(c, &c->in);
        region_unregister(c, &c->out);
    }
    region_destroy(&c->in);
    region_destroy(&c->out);
    if (c->has_req)
        grpc_slice_unref(c->req);
    if (c->ch && c->ch != conn->ch)
        grpc_channel_destroy(c->ch);
    if (c->cq) {
        grpc_completion_queue_shutdown(c->cq);
        while (grpc_completion_queue_next(c->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL).type !=
               GRPC_QUEUE_SHUTDOWN)
            ;
        grpc_completion_queue_destroy(c->cq);
    }
    free(c->lat);
    free(c->flat);
    free(c->arena);
}

static int parse_long(const char *flag, const char *s, long lo, long hi, long *v)
{
    char *end;

    errno = 0;
    *v = strtol(s, &end, 10);
    if (errno || end == s || *end || *v < lo || *v > hi) {
        cmd_error("bench: %s takes a whole number from %ld to %ld, got '%s'", flag, lo, hi, s);
        return -1;
    }
    return 0;
}

static int parse_opts(struct bench_opts *o, int argc, char **argv)
{
    *o = (struct bench_opts){.rows = 1, .concurrency = 1, .warmup = 3};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;

        if (strcmp(a, "--shared-channel") == 0) {
            o->shared_channel = 1;
            continue;
        }
        if (strcmp(a, "--shm") == 0) {
            o->shm = 1;
            continue;
        }
        if (!v || (strcmp(a, "--rows") && strcmp(a, "--iters") && strcmp(a, "--warmup") &&
                   strcmp(a, "--model") && strcmp(a, "--concurrency") && strcmp(a, "--duration"))) {
            cmd_error("bench: unexpected argument '%s' (see tpclient --help)", a);
            return -1;
        }
        i++;
        if (strcmp(a, "--model") == 0) {
            o->model = v;
        } else if (strcmp(a, "--duration") == 0) {
            char *end;

            errno = 0;
            o->duration = strtod(v, &end);
            if (errno || end == v || *end || !(o->duration > 0) || o->duration > 86400) {
                cmd_error("bench: --duration takes seconds above 0 and up to 86400, got '%s'", v);
                return -1;
            }
        } else if (parse_long(a, v, strcmp(a, "--warmup") == 0 ? 0 : 1,
                              strcmp(a, "--concurrency") == 0 ? MAX_CONCURRENCY : 1L << 40,
                              strcmp(a, "--rows") == 0     ? &o->rows
                              : strcmp(a, "--iters") == 0  ? &o->iters
                              : strcmp(a, "--warmup") == 0 ? &o->warmup
                                                           : &o->concurrency) < 0) {
            return -1;
        }
    }
    if (o->iters && o->duration > 0) {
        cmd_error("bench: give --iters or --duration, not both");
        return -1;
    }
    if (!o->iters && !(o->duration > 0))
        o->iters = 100;
    return 0;
}

static void print_results(struct bench *b, double window)
{
    long n = b->o.concurrency;
    size_t total = 0, k = 0;
    double *all, sum = 0, flop = 2.0 * (double)b->o.rows * (double)b->l.in * (double)b->l.out;
    double p50, p90, p99, rps;

    for (long i = 0; i < n; i++)
        total += b->cl[i].nlat;
    all = malloc((total ? total : 1) * sizeof(double));
    if (!all) {
        cmd_error("bench: no memory for %zu latencies", total);
        return;
    }
    for (long i = 0; i < n; i++)
        for (size_t j = 0; j < b->cl[i].nlat; j++)
            sum += all[k++] = b->cl[i].lat[j];
    timing_sort(all, total);
    p50 = timing_percentile(all, total, 0.5) * 1e3;
    p90 = timing_percentile(all, total, 0.9) * 1e3;
    p99 = timing_percentile(all, total, 0.99) * 1e3;
    rps = window > 0 ? (double)total / window : 0;
    printf("bench: model %s, %ld x %lld -> %lld%s, concurrency %ld (%s), %zu calls in %.3f s "
           "after %ld warm-up calls per client\n",
           b->model, b->o.rows, (long long)b->l.in, (long long)b->l.out,
           b->o.shm ? " through shared memory" : "", n,
           b->o.shared_channel ? "one shared channel" : "one channel per client", total, window,
           b->o.warmup);
    printf("latency ms: p50 %.3f  p90 %.3f  p99 %.3f  mean %.3f  max %.3f\n", p50, p90, p99,
           total ? sum / (double)total * 1e3 : 0, total ? all[total - 1] * 1e3 : 0);
    printf("throughput: %.1f requests/s, %.0f rows/s, %.2f GFLOP/s\n", rps, rps * (double)b->o.rows,
           rps * flop * 1e-9);
    printf("bench-result: model=%s rows=%ld in=%lld out=%lld concurrency=%ld channels=%s shm=%d "
           "calls=%zu per_client=",
           b->model, b->o.rows, (long long)b->l.in, (long long)b->l.out, n,
           b->o.shared_channel ? "shared" : "per-client", b->o.shm, total);
    for (long i = 0; i < n; i++)
        printf("%s%zu", i ? "," : "", b->cl[i].nlat);
    printf(" seconds=%.9f rps=%.4f rows_per_s=%.2f gflops=%.6f p50_ms=%.4f p90_ms=%.4f "
           "p99_ms=%.4f mean_ms=%.4f max_ms=%.4f dtype=%s\n",
           window, rps, rps * (double)b->o.rows, rps * flop * 1e-9, p50, p90, p99,
           total ? sum / (double)total * 1e3 : 0, total ? all[total - 1] * 1e3 : 0,
           tp_dtype_wire_name(b->l.dtype));
    free(all);
}

int cmd_bench(struct conn *conn, int argc, char **argv)
{
    struct bench *b = calloc(1, sizeof(*b));
    struct tp_err err = {0};
    float *x = NULL;
    long started = 0, n;
    int status = EXIT_ERROR;
    double window = 0;

    if (!b)
        return EXIT_ERROR;
    if (parse_opts(&b->o, argc, argv) < 0) {
        free(b);
        return EXIT_USAGE;
    }
    n = b->o.concurrency;
    pthread_mutex_init(&b->lock, NULL);
    pthread_cond_init(&b->cond, NULL);
    b->timeout_ms = conn->timeout_ms;
    b->target = grpc_channel_get_target(conn->ch);
    if (kserve_model(conn, b->o.model, b->model, sizeof(b->model), &err) < 0 ||
        kserve_layout(conn, b->model, &b->l, &err) < 0)
        goto fail;
    if (b->l.max_batch > 0 && b->o.rows > b->l.max_batch) {
        tp_err_set(&err, TP_EINVAL, "--rows %ld is above the server's max_batch %lld", b->o.rows,
                   (long long)b->l.max_batch);
        goto fail;
    }
    b->cl = calloc((size_t)n, sizeof(*b->cl));
    x = malloc((size_t)(b->o.rows * b->l.in) * sizeof(float));
    if (!b->cl || !x) {
        tp_err_set(&err, TP_ENOMEM, "no memory for %ld clients of %ld rows", n, b->o.rows);
        goto fail;
    }
    srand(1);
    for (long i = 0; i < b->o.rows * b->l.in; i++)
        x[i] = (float)rand() / (float)RAND_MAX - 0.5f;
    tp_convert_from_f32(x, x, (size_t)(b->o.rows * b->l.in), b->l.dtype); /* in place */
    for (long i = 0; i < n; i++)
        if (client_setup(b, conn, (int)i, x, &err) < 0) {
            tp_err_prefix(&err, "client %ld: ", i);
            goto fail;
        }
    free(x);
    x = NULL;
    for (; started < n; started++) {
        if (pthread_create(&b->cl[started].thread, NULL, client_main, &b->cl[started]) != 0) {
            tp_err_set(&err, TP_ESYS, "cannot start client thread %ld", started);
            fail(b, &err);
            break;
        }
    }
    /* Every client warms up, then all start measuring at once. */
    pthread_mutex_lock(&b->lock);
    while (started == n && b->warmed < n)
        pthread_cond_wait(&b->cond, &b->lock);
    b->t0 = timing_now_s();
    b->t_end = b->t0 + b->o.duration;
    b->go = 1;
    pthread_cond_broadcast(&b->cond);
    pthread_mutex_unlock(&b->lock);
    for (long i = 0; i < started; i++) {
        pthread_join(b->cl[i].thread, NULL);
        if (b->cl[i].t_last - b->t0 > window)
            window = b->cl[i].t_last - b->t0;
    }
    if (b->failed) {
        err = b->err;
        goto fail;
    }
    print_results(b, window);
    status = 0;
    goto out;
fail:
    cmd_error("bench: %s", err.msg);
out:
    for (long i = 0; b->cl && i < n; i++)
        client_cleanup(&b->cl[i], conn);
    free(b->cl);
    free(x);
    if (b->target)
        gpr_free(b->target);
    pthread_mutex_destroy(&b->lock);
    pthread_cond_destroy(&b->cond);
    free(b);
    return status;
}
