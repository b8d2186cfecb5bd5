/* echo_server.c -- the transport baseline tpd is measured against: a gRPC C-core server that
 * speaks just enough KServe v2 for `tpclient bench` (RepositoryIndex, ModelMetadata, ModelInfer)
 * and answers every ModelInfer with one canned response of the same size as tpd's, FP32
 * [rows, out], without parsing the request and without computing anything. So the same client,
 * with the same request bytes, over the same kind of socket, measures the floor that gRPC and
 * protobuf framing set: tpd's latency beyond it and the GEMM is tpd's own overhead.
 *
 *   echo_server --listen ADDR --in N --out M --rows B [--threads T] [--model NAME]
 *
 * Prints "ready" on stdout once it serves; SIGTERM or SIGINT stops it. Every response is packed
 * once at start and sent by reference: the server copies nothing per call. One completion queue
 * and polling thread per --threads, like tpd's --grpc-threads (default 1 for both). */
#include <errno.h>
#include <grpc/byte_buffer.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>
#include <malloc.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "grpc_service.pb-c.h"

#define SERVICE "/inference.GRPCInferenceService/"
#define POSTED 8 /* requests waiting for calls, per method and queue */
#define MAX_THREADS 64

enum method { M_INFER, M_METADATA, M_INDEX, M_COUNT, M_OTHER = M_COUNT };

static const char *const method_names[M_COUNT] = {SERVICE "ModelInfer", SERVICE "ModelMetadata",
                                                  SERVICE "RepositoryIndex"};

enum tag_kind { T_NEW, T_DONE };

struct call;

struct tag {
    enum tag_kind kind;
    struct call *call;
};

/* One call: both of its batches (close and reply) must complete before it is freed. Calls are
 * bound to the queue they were requested on, so one thread sees all their events. */
struct call {
    enum method m;
    int q;
    grpc_call *call;
    gpr_timespec deadline;
    grpc_call_details details; /* unregistered calls */
    grpc_metadata_array md;
    grpc_byte_buffer *payload;
    grpc_byte_buffer *reply;
    int cancelled;
    int pending;
    struct tag t_new, t_done;
};

static struct {
    grpc_server *server;
    grpc_completion_queue *cq[MAX_THREADS];
    pthread_t thread[MAX_THREADS];
    void *handle[M_COUNT];
    grpc_slice response[M_COUNT]; /* packed once */
    size_t min_request;           /* bytes of input a ModelInfer must at least carry */
    int nthreads;
    volatile int stopping; /* set before shutdown, read by the pollers */
} srv;

static void call_free(struct call *c)
{
    if (c->call)
        grpc_call_unref(c->call);
    if (c->payload)
        grpc_byte_buffer_destroy(c->payload);
    if (c->reply)
        grpc_byte_buffer_destroy(c->reply);
    grpc_metadata_array_destroy(&c->md);
    grpc_call_details_destroy(&c->details);
    free(c);
}

static void post(enum method m, int q)
{
    struct call *c = calloc(1, sizeof(*c));
    grpc_call_error e;

    if (!c) {
        fprintf(stderr, "echo_server: out of memory posting a request\n");
        return;
    }
    c->m = m;
    c->q = q;
    c->t_new = (struct tag){T_NEW, c};
    c->t_done = (struct tag){T_DONE, c};
    grpc_metadata_array_init(&c->md);
    grpc_call_details_init(&c->details);
    if (m == M_OTHER)
        e = grpc_server_request_call(srv.server, &c->call, &c->details, &c->md, srv.cq[q],
                                     srv.cq[q], &c->t_new);
    else
        e = grpc_server_request_registered_call(srv.server, srv.handle[m], &c->call, &c->deadline,
                                                &c->md, &c->payload, srv.cq[q], srv.cq[q],
                                                &c->t_new);
    if (e != GRPC_CALL_OK) {
        fprintf(stderr, "echo_server: cannot post a request: error %d\n", (int)e);
        call_free(c);
    }
}

static void on_new(struct call *c)
{
    grpc_op ops[4];
    grpc_status_code status = GRPC_STATUS_OK;
    grpc_slice details = grpc_empty_slice();
    int n = 0;

    if (!srv.stopping)
        post(c->m, c->q);
    memset(ops, 0, sizeof(ops));
    ops[n].op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    ops[n++].data.recv_close_on_server.cancelled = &c->cancelled;
    ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
    if (c->m == M_OTHER) {
        status = GRPC_STATUS_UNIMPLEMENTED;
        details = grpc_slice_from_static_string("not implemented by echo_server");
    } else if (c->m == M_INFER &&
               (!c->payload || grpc_byte_buffer_length(c->payload) < srv.min_request)) {
        status = GRPC_STATUS_INVALID_ARGUMENT;
        details = grpc_slice_from_static_string("request smaller than rows x in floats");
    } else {
        c->reply = grpc_raw_byte_buffer_create(&srv.response[c->m], 1);
        ops[n].op = GRPC_OP_SEND_MESSAGE;
        ops[n++].data.send_message.send_message = c->reply;
    }
    ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
    ops[n].data.send_status_from_server.status = status;
    ops[n++].data.send_status_from_server.status_details =
        status == GRPC_STATUS_OK ? NULL : &details;
    /* close and reply in one batch: one event, and the call is done */
    if (grpc_call_start_batch(c->call, ops, (size_t)n, &c->t_done, NULL) != GRPC_CALL_OK) {
        fprintf(stderr, "echo_server: cannot answer a call\n");
        call_free(c);
    }
}

static void *poll_thread(void *arg)
{
    grpc_completion_queue *cq = arg;

    for (;;) {
        grpc_event ev = grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
        struct tag *t;

        if (ev.type == GRPC_QUEUE_SHUTDOWN)
            break;
        if (ev.type != GRPC_OP_COMPLETE)
            continue;
        t = ev.tag;
        if (t->kind == T_NEW && ev.success)
            on_new(t->call);
        else
            call_free(t->call); /* done, or a request cancelled by shutdown */
    }
    return NULL;
}

static grpc_slice pack(const ProtobufCMessage *m)
{
    size_t len = protobuf_c_message_get_packed_size(m);
    uint8_t *buf = gpr_malloc(len ? len : 1);

    protobuf_c_message_pack(m, buf);
    return grpc_slice_new(buf, len, gpr_free);
}

static void build_responses(const char *model, long in, long out, long rows)
{
    Inference__ModelInferResponse r = INFERENCE__MODEL_INFER_RESPONSE__INIT;
    Inference__ModelInferResponse__InferOutputTensor
        o = INFERENCE__MODEL_INFER_RESPONSE__INFER_OUTPUT_TENSOR__INIT,
        *os[1] = {&o};
    Inference__ModelMetadataResponse md = INFERENCE__MODEL_METADATA_RESPONSE__INIT;
    Inference__ModelMetadataResponse__TensorMetadata
        ti = INFERENCE__MODEL_METADATA_RESPONSE__TENSOR_METADATA__INIT,
        to = INFERENCE__MODEL_METADATA_RESPONSE__TENSOR_METADATA__INIT, *tis[1] = {&ti},
        *tos[1] = {&to};
    Inference__ModelMetadataResponse__ParametersEntry
        pe = INFERENCE__MODEL_METADATA_RESPONSE__PARAMETERS_ENTRY__INIT,
        *pes[1] = {&pe};
    Inference__InferParameter maxb = INFERENCE__INFER_PARAMETER__INIT;
    Inference__RepositoryIndexResponse ix = INFERENCE__REPOSITORY_INDEX_RESPONSE__INIT;
    Inference__RepositoryIndexResponse__ModelIndex
        mi = INFERENCE__REPOSITORY_INDEX_RESPONSE__MODEL_INDEX__INIT,
        *mis[1] = {&mi};
    int64_t shape[2] = {rows, out}, in_shape[2] = {-1, in}, out_shape[2] = {-1, out};
    size_t nfloat = (size_t)rows * (size_t)out;
    float *y = malloc(nfloat * sizeof(float));
    ProtobufCBinaryData raw = {.len = nfloat * sizeof(float), .data = (uint8_t *)y};
    char *version = "1";

    if (!y) {
        fprintf(stderr, "echo_server: no memory for a response of %zu floats\n", nfloat);
        exit(1);
    }
    for (size_t i = 0; i < nfloat; i++)
        y[i] = 0.5f;
    r.model_name = (char *)model;
    r.model_version = version;
    o.name = "output";
    o.datatype = "FP32";
    o.n_shape = 2;
    o.shape = shape;
    r.n_outputs = 1;
    r.outputs = os;
    r.n_raw_output_contents = 1;
    r.raw_output_contents = &raw;
    srv.response[M_INFER] = pack(&r.base);
    free(y);

    md.name = (char *)model;
    md.n_versions = 1;
    md.versions = &version;
    md.platform = "echo";
    ti.name = "input";
    ti.datatype = "FP32";
    ti.n_shape = 2;
    ti.shape = in_shape;
    to.name = "output";
    to.datatype = "FP32";
    to.n_shape = 2;
    to.shape = out_shape;
    md.n_inputs = md.n_outputs = 1;
    md.inputs = tis;
    md.outputs = tos;
    maxb.parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_INT64_PARAM;
    maxb.int64_param = rows;
    pe.key = "max_batch";
    pe.value = &maxb;
    md.n_parameters = 1;
    md.parameters = pes;
    srv.response[M_METADATA] = pack(&md.base);

    mi.name = (char *)model;
    mi.version = version;
    mi.state = "READY";
    ix.n_models = 1;
    ix.models = mis;
    srv.response[M_INDEX] = pack(&ix.base);
    srv.min_request = (size_t)rows * (size_t)in * sizeof(float);
}

static long arg_long(const char *flag, const char *s, long lo, long hi)
{
    char *end;
    long v;

    errno = 0;
    v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) {
        fprintf(stderr, "echo_server: %s takes a whole number from %ld to %ld, got '%s'\n", flag,
                lo, hi, s);
        exit(64);
    }
    return v;
}

int main(int argc, char **argv)
{
    const char *listen = NULL, *model = "echo";
    long in = 0, out = 0, rows = 0, max_msg;
    grpc_server_credentials *creds;
    grpc_completion_queue *scq;
    sigset_t sigs;
    int sig;

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;

        if (strcmp(a, "--help") == 0) {
            printf("usage: echo_server --listen ADDR --in N --out M --rows B [--threads T] "
                   "[--model NAME]\n"
                   "Answers every ModelInfer with a canned FP32 [B, M] response (the size of\n"
                   "tpd's), without reading the request: the transport baseline of bench/.\n");
            return 0;
        }
        if (!v) {
            fprintf(stderr, "echo_server: %s needs a value (see --help)\n", a);
            return 64;
        }
        i++;
        if (strcmp(a, "--listen") == 0)
            listen = v;
        else if (strcmp(a, "--model") == 0)
            model = v;
        else if (strcmp(a, "--in") == 0)
            in = arg_long(a, v, 1, 1 << 20);
        else if (strcmp(a, "--out") == 0)
            out = arg_long(a, v, 1, 1 << 20);
        else if (strcmp(a, "--rows") == 0)
            rows = arg_long(a, v, 1, 1 << 20);
        else if (strcmp(a, "--threads") == 0)
            srv.nthreads = (int)arg_long(a, v, 1, MAX_THREADS);
        else {
            fprintf(stderr, "echo_server: unknown option '%s' (see --help)\n", a);
            return 64;
        }
    }
    if (!listen || !in || !out || !rows) {
        fprintf(stderr, "echo_server: --listen, --in, --out and --rows are required\n");
        return 64;
    }
    max_msg = rows * (in > out ? in : out) * 4 + (1 << 20);
    if (max_msg > (1L << 30)) {
        fprintf(stderr, "echo_server: %ld rows of %ld floats do not fit in a 1 GiB message\n", rows,
                in > out ? in : out);
        return 64;
    }
    if (!srv.nthreads)
        srv.nthreads = 1;
    /* the same malloc tuning as tpd and tpclient: no fresh page faults per call */
    mallopt(M_MMAP_THRESHOLD, 32 << 20);
    mallopt(M_TRIM_THRESHOLD, 1 << 30);
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    grpc_init();
    build_responses(model, in, out, rows);
    {
        grpc_arg args[2] = {
            {GRPC_ARG_INTEGER, GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH, {.integer = (int)max_msg}},
            {GRPC_ARG_INTEGER, GRPC_ARG_MAX_SEND_MESSAGE_LENGTH, {.integer = (int)max_msg}}};
        grpc_channel_args chargs = {2, args};

        srv.server = grpc_server_create(&chargs, NULL);
    }
    for (int m = 0; m < M_COUNT; m++)
        srv.handle[m] = grpc_server_register_method(srv.server, method_names[m], NULL,
                                                    GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER, 0);
    for (int q = 0; q < srv.nthreads; q++) {
        srv.cq[q] = grpc_completion_queue_create_for_next(NULL);
        grpc_server_register_completion_queue(srv.server, srv.cq[q], NULL);
    }
    creds = grpc_insecure_server_credentials_create();
    if (grpc_server_add_http2_port(srv.server, listen, creds) == 0) {
        fprintf(stderr, "echo_server: cannot listen on %s\n", listen);
        return 1;
    }
    grpc_server_credentials_release(creds);
    grpc_server_start(srv.server);
    for (int q = 0; q < srv.nthreads; q++) {
        for (int m = 0; m <= M_COUNT; m++)
            for (int k = 0; k < (m == M_OTHER ? 2 : POSTED); k++)
                post((enum method)m, q);
        pthread_create(&srv.thread[q], NULL, poll_thread, srv.cq[q]);
    }
    printf("ready\n");
    fflush(stdout);
    while (sigwait(&sigs, &sig) != 0)
        ;
    srv.stopping = 1;
    scq = grpc_completion_queue_create_for_pluck(NULL);
    grpc_server_shutdown_and_notify(srv.server, scq, &srv);
    if (grpc_completion_queue_pluck(
            scq, &srv,
            gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_seconds(1, GPR_TIMESPAN)),
            NULL)
            .type != GRPC_OP_COMPLETE) {
        grpc_server_cancel_all_calls(srv.server);
        grpc_completion_queue_pluck(scq, &srv, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
    }
    for (int q = 0; q < srv.nthreads; q++)
        grpc_completion_queue_shutdown(srv.cq[q]);
    for (int q = 0; q < srv.nthreads; q++) {
        pthread_join(srv.thread[q], NULL);
        grpc_completion_queue_destroy(srv.cq[q]);
    }
    grpc_server_destroy(srv.server);
    grpc_completion_queue_destroy(scq);
    for (int m = 0; m < M_COUNT; m++)
        grpc_slice_unref(srv.response[m]);
    return 0;
}
