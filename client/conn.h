/* conn.h -- tpclient's connection to a server: one gRPC channel and completion queue, and a
 * blocking unary call that packs a protobuf-c request and unpacks the response. A non-OK gRPC
 * status becomes a tp_err whose message is the server's, prefixed with the status name. */
#ifndef TPC_CONN_H
#define TPC_CONN_H

#include <grpc/grpc.h>
#include <protobuf-c/protobuf-c.h>

#include "err.h"

struct conn {
    grpc_channel *ch;
    grpc_completion_queue *cq;
    int timeout_ms; /* deadline of each call */
};

/* TLS settings of a connection: PEM file paths, each NULL when not given. */
struct conn_tls {
    int on;           /* use TLS (also implied by any path below) */
    const char *ca;   /* CA bundle that signed the server's certificate; NULL: system roots */
    const char *cert; /* client certificate chain, for servers that require one */
    const char *key;  /* private key of cert */
};

/* target: "HOST:PORT" or "unix:PATH"; tls NULL or not on: plaintext. Calls grpc_init. Reads the
 * PEM files; fails naming the file that cannot be read. */
int conn_open(struct conn *c, const char *target, int timeout_ms, const struct conn_tls *tls,
              struct tp_err *err);

/* Calls method with req; on success *resp (of type desc) is the caller's to free with
 * protobuf_c_message_free_unpacked. */
int conn_call(struct conn *c, const char *method, const ProtobufCMessage *req,
              const ProtobufCMessageDescriptor *desc, ProtobufCMessage **resp, struct tp_err *err);

/* The same call with a message already packed: send stays the caller's; on success *recv is the
 * caller's to destroy. handle: method registered on c->ch (grpc_channel_register_call), or NULL
 * to call method by name. Any thread that owns c->cq. */
int conn_call_raw(struct conn *c, const char *method, void *handle, grpc_byte_buffer *send,
                  grpc_byte_buffer **recv, struct tp_err *err);

/* Takes a closed or half-open connection. Calls grpc_shutdown. */
void conn_close(struct conn *c);

#endif
