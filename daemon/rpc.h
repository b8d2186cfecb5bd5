/* rpc.h -- the gRPC glue of tpd, on gRPC's C core: listening, one completion queue and thread per
 * --grpc-threads, the unary call state machine, replies from any thread, and the drain on
 * shutdown. It knows method paths, not what they mean: each registered method has a handler that
 * must answer with rpc_reply exactly once, at once or later from any thread. Calls to any other
 * method are answered UNIMPLEMENTED. */
#ifndef TPD_RPC_H
#define TPD_RPC_H

#include <grpc/byte_buffer.h>
#include <stddef.h>
#include <stdint.h>

#include "err.h"

struct rpc_server;
struct rpc_call;

/* payload: the request message (NULL if none came); borrowed until the handler returns. */
typedef void (*rpc_handler_fn)(void *ctx, struct rpc_call *call, grpc_byte_buffer *payload);

struct rpc_method {
    const char *path; /* "/inference.GRPCInferenceService/ModelInfer" */
    rpc_handler_fn handler;
    /* A client stream (ModelStreamInfer): the handler is called once per message the client
     * sends, in order, on the call's thread, and once more with payload NULL when the client has
     * no more to send (it half-closed, went away or the call was cancelled); the reply is
     * streamed (rpc_stream_send), and the call ends at rpc_reply. 0: one request message. */
    int client_stream;
    int stream_queue; /* streamed messages that may wait to be sent; 0: STREAM_QUEUE (8) */
};

struct rpc_config {
    const char *const *listen; /* "HOST:PORT" or "unix:PATH" */
    int nlisten;
    int threads;
    long max_recv; /* bytes of one request message */
    long max_send; /* bytes of one response message */
    /* A reply not sent within this many ms of rpc_reply (its client does not read it: a zero
     * flow-control window, a stalled connection) cancels its call with RESOURCE_EXHAUSTED, which
     * drops the reply and what it points at. 0: replies may take forever. */
    int reply_timeout_ms;
    /* Bytes that gRPC may hold in received and unsent messages (its connections' buffers, and
     * requests that wait in the scheduler's queue) beyond room for two of the largest request
     * and response: gRPC's resource quota. As it fills, flow control slows the senders down; past
     * it, gRPC resets streams with RESOURCE_EXHAUSTED. 0: no bound. */
    long memory_bytes;
    /* Security of the listeners. TCP addresses use TLS when tls_cert is set (PEM files, read at
     * create), and then also require a client certificate signed by tls_client_ca when that is
     * set. unix: sockets stay plain: they are local, and socket_mode (file mode bits) says who
     * may connect. */
    const char *tls_cert;      /* PEM certificate chain path, NULL: plaintext */
    const char *tls_key;       /* PEM private key path */
    const char *tls_client_ca; /* PEM CA bundle path, NULL: no client certificate asked */
    unsigned socket_mode;      /* e.g. 0660 */
};

/* Creates the server and binds every address, without serving yet, so that a bad address fails
 * before anything else starts. A unix: path where a server answers is refused (TP_EBUSY), a
 * stale socket file there (no server answers) is replaced, and a path that is not a socket is
 * refused and left alone. methods (nmethods, static storage) and ctx are borrowed. On failure
 * nothing is left bound. */
int rpc_server_create(struct rpc_server **s, const struct rpc_config *c,
                      const struct rpc_method *methods, int nmethods, void *ctx,
                      struct tp_err *err);

/* Starts serving: calls are accepted and handlers run from here on. On failure the caller
 * stops the server. */
int rpc_server_start(struct rpc_server *s, struct tp_err *err);

/* Answers a call: status is a gRPC status code (0 OK), msg its details (may be NULL), reply the
 * response message (taken; NULL for none). The reply's slices may point into memory that their
 * destroy callbacks release: gRPC drops them once sent, or at the latest reply_timeout_ms later,
 * when the call is cancelled. */
void rpc_reply(struct rpc_call *call, int status, const char *msg, grpc_byte_buffer *reply);

/* Streams one message of the call's reply (grpc.health.v1.Health/Watch, ModelStreamInfer): sent
 * in order, one at a time, before the status that rpc_reply then sends (the reply of a streaming
 * call must be NULL). Takes msg. Any thread, until rpc_reply: after it, after a cancel, or once a
 * send failed, it fails with TP_EUNAVAIL. A client that lets the method's stream_queue messages
 * pile up unread has its call cancelled with RESOURCE_EXHAUSTED, and this fails with TP_EBUSY. */
int rpc_stream_send(struct rpc_call *call, grpc_byte_buffer *msg, struct tp_err *err);

/* Answers with an error: the gRPC status that err->code maps to, and err->msg. */
void rpc_reply_err(struct rpc_call *call, const struct tp_err *err);

/* Per-call storage of size bytes, zeroed, allocated on the first use (later uses return the same
 * block; size must not change). It lives until gRPC is done with the call: after the reply has
 * been sent AND the call is closed, so it outlives any cancel callback. A thread other than the
 * call's own must not touch it once it has called rpc_reply: the reply may complete, and the
 * storage go, at once. NULL when memory runs out. From the handler (first use). */
void *rpc_call_data(struct rpc_call *call, size_t size);

/* Takes the request message from the call: the caller owns it from now on (destroys it with
 * grpc_byte_buffer_destroy) instead of rpc, which otherwise destroys it when the handler returns.
 * From the handler only. */
grpc_byte_buffer *rpc_call_take_payload(struct rpc_call *call);

/* The call's deadline on CLOCK_MONOTONIC in nanoseconds; INT64_MAX when the client set none. */
int64_t rpc_call_deadline_ns(struct rpc_call *call);

/* Asks for fn(arg) when the call ends cancelled (client cancelled or gone, deadline passed, server
 * shutdown), on the call's gRPC thread, while the call's storage is still alive. It may come
 * before or after the reply was started; fn must cope with both. From the handler only. */
void rpc_call_on_cancel(struct rpc_call *call, void (*fn)(void *arg), void *arg);

/* Stops accepting, lets calls in progress finish for up to grace_ms, cancels the rest and closes
 * every connection (idle ones at once, once the calls are done), stops the threads, removes the
 * unix socket files it made (if they are still the ones it made) and frees everything. A
 * connection that still does not close 3 s later (a peer that stopped reading its socket) is
 * left to the process's exit, with the server: after a warning, the call returns without
 * freeing. Takes NULL. */
void rpc_server_stop(struct rpc_server *s, int grace_ms);

#endif
