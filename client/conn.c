/* conn.c -- tpclient's gRPC calls (see conn.h). Calls are fail-fast: a server that is down fails
 * at once with UNAVAILABLE instead of waiting for the deadline, which is what a user at a
 * terminal wants to hear. */
#include "conn.h"

#include <grpc/byte_buffer.h>
#include <grpc/grpc_security.h>
#include <grpc/support/alloc.h>
#include <grpc/support/log.h>
#include <grpc/support/time.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gbuf.h"
#include "pem.h"

#define MAX_MSG (1 << 30)

static const char *status_name(grpc_status_code s)
{
    static const char *const names[] = {"OK",
                                        "CANCELLED",
                                        "UNKNOWN",
                                        "INVALID_ARGUMENT",
                                        "DEADLINE_EXCEEDED",
                                        "NOT_FOUND",
                                        "ALREADY_EXISTS",
                                        "PERMISSION_DENIED",
                                        "RESOURCE_EXHAUSTED",
                                        "FAILED_PRECONDITION",
                                        "ABORTED",
                                        "OUT_OF_RANGE",
                                        "UNIMPLEMENTED",
                                        "INTERNAL",
                                        "UNAVAILABLE",
                                        "DATA_LOSS",
                                        "UNAUTHENTICATED"};

    return (unsigned)s < sizeof(names) / sizeof(names[0]) ? names[s] : "UNKNOWN";
}

static enum tp_code code_of(grpc_status_code s)
{
    switch (s) {
    case GRPC_STATUS_INVALID_ARGUMENT: return TP_EINVAL;
    case GRPC_STATUS_NOT_FOUND: return TP_ENOTFOUND;
    case GRPC_STATUS_UNAVAILABLE: return TP_EUNAVAIL;
    case GRPC_STATUS_RESOURCE_EXHAUSTED: return TP_EBUSY;
    case GRPC_STATUS_DEADLINE_EXCEEDED: return TP_ETIMEDOUT;
    default: return TP_EINTERNAL;
    }
}

/* gRPC's own log lines would break tpclient's one-line errors (a failed TLS handshake is logged
 * by gRPC, then reported again by the call's status, which says it better): drop them. */
static void quiet_log(gpr_log_func_args *args)
{
    (void)args;
}

/* Channel credentials for tls: plaintext, or TLS with the given roots and client pair. */
static grpc_channel_credentials *make_creds(const struct conn_tls *tls, struct tp_err *err)
{
    grpc_channel_credentials *creds = NULL;
    grpc_ssl_pem_key_cert_pair pair;
    char *ca = NULL, *cert = NULL, *key = NULL;

    if (!tls || !(tls->on || tls->ca || tls->cert || tls->key))
        return grpc_insecure_credentials_create();
    if (!tls->cert != !tls->key) {
        tp_err_set(err, TP_EINVAL, "--tls-cert and --tls-key go together, got only %s",
                   tls->cert ? "--tls-cert" : "--tls-key");
        return NULL;
    }
    if ((tls->ca && pem_read(tls->ca, &ca, err) < 0) ||
        (tls->cert && (pem_read(tls->cert, &cert, err) < 0 || pem_read(tls->key, &key, err) < 0)))
        goto out;
    pair = (grpc_ssl_pem_key_cert_pair){.private_key = key, .cert_chain = cert};
    creds = grpc_ssl_credentials_create_ex(ca, cert ? &pair : NULL, NULL, NULL);
    if (!creds)
        tp_err_set(err, TP_EINVAL, "cannot set up TLS with these certificates");
out:
    if (key)
        explicit_bzero(key, strlen(key));
    free(ca);
    free(cert);
    free(key);
    return creds;
}

int conn_open(struct conn *c, const char *target, int timeout_ms, const struct conn_tls *tls,
              struct tp_err *err)
{
    grpc_arg args[2] = {
        {GRPC_ARG_INTEGER, GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH, {.integer = MAX_MSG}},
        {GRPC_ARG_INTEGER, GRPC_ARG_MAX_SEND_MESSAGE_LENGTH, {.integer = MAX_MSG}}};
    grpc_channel_args chargs = {2, args};
    grpc_channel_credentials *creds;

    gpr_set_log_function(quiet_log);
    grpc_init();
    creds = make_creds(tls, err);
    if (!creds)
        return -1;
    c->ch = grpc_channel_create(target, creds, &chargs);
    grpc_channel_credentials_release(creds);
    c->cq = grpc_completion_queue_create_for_next(NULL);
    c->timeout_ms = timeout_ms;
    if (!c->ch || !c->cq)
        return tp_err_set(err, TP_EINTERNAL, "cannot create a channel to %s", target);
    return 0;
}

int conn_call_raw(struct conn *c, const char *method, void *handle, grpc_byte_buffer *send,
                  grpc_byte_buffer **recv, struct tp_err *err)
{
    gpr_timespec deadline = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                                         gpr_time_from_millis(c->timeout_ms, GPR_TIMESPAN));
    grpc_metadata_array md_initial, md_trailing;
    grpc_status_code status = GRPC_STATUS_UNKNOWN;
    grpc_slice details = grpc_empty_slice();
    grpc_call *call;
    grpc_op ops[6];
    grpc_event ev;
    int rc = -1;

    *recv = NULL;
    grpc_metadata_array_init(&md_initial);
    grpc_metadata_array_init(&md_trailing);
    if (handle)
        call = grpc_channel_create_registered_call(c->ch, NULL, GRPC_PROPAGATE_DEFAULTS, c->cq,
                                                   handle, deadline, NULL);
    else
        call =
            grpc_channel_create_call(c->ch, NULL, GRPC_PROPAGATE_DEFAULTS, c->cq,
                                     grpc_slice_from_static_string(method), NULL, deadline, NULL);
    memset(ops, 0, sizeof(ops));
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = send;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &md_initial;
    ops[4].op = GRPC_OP_RECV_MESSAGE;
    ops[4].data.recv_message.recv_message = recv;
    ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[5].data.recv_status_on_client.trailing_metadata = &md_trailing;
    ops[5].data.recv_status_on_client.status = &status;
    ops[5].data.recv_status_on_client.status_details = &details;
    if (grpc_call_start_batch(call, ops, 6, call, NULL) != GRPC_CALL_OK) {
        tp_err_set(err, TP_EINTERNAL, "cannot start the call to %s", method);
        goto out;
    }
    do
        ev = grpc_completion_queue_next(c->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
    while (ev.type != GRPC_OP_COMPLETE || ev.tag != call);
    if (status != GRPC_STATUS_OK) {
        char *d = grpc_slice_to_c_string(details);

        tp_err_set(err, code_of(status), "%s: %s", status_name(status), d);
        gpr_free(d);
        goto out;
    }
    if (!*recv) {
        tp_err_set(err, TP_EINTERNAL, "%s returned no message", method);
        goto out;
    }
    rc = 0;
out:
    if (rc < 0 && *recv) {
        grpc_byte_buffer_destroy(*recv);
        *recv = NULL;
    }
    grpc_slice_unref(details);
    grpc_metadata_array_destroy(&md_initial);
    grpc_metadata_array_destroy(&md_trailing);
    grpc_call_unref(call);
    return rc;
}

int conn_call(struct conn *c, const char *method, const ProtobufCMessage *req,
              const ProtobufCMessageDescriptor *desc, ProtobufCMessage **resp, struct tp_err *err)
{
    grpc_byte_buffer *send = gbuf_pack(req), *recv = NULL;
    int rc = -1;

    *resp = NULL;
    if (!send)
        return tp_err_set(err, TP_ENOMEM, "no memory for the request");
    if (conn_call_raw(c, method, NULL, send, &recv, err) < 0)
        goto out;
    if (gbuf_unpack(recv, desc, resp, err) < 0) {
        tp_err_prefix(err, "response of %s: ", method);
        goto out;
    }
    rc = 0;
out:
    grpc_byte_buffer_destroy(send);
    if (recv)
        grpc_byte_buffer_destroy(recv);
    return rc;
}

void conn_close(struct conn *c)
{
    if (c->ch)
        grpc_channel_destroy(c->ch);
    if (c->cq) {
        grpc_completion_queue_shutdown(c->cq);
        while (grpc_completion_queue_next(c->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL).type !=
               GRPC_QUEUE_SHUTDOWN)
            ;
        grpc_completion_queue_destroy(c->cq);
    }
    c->ch = NULL;
    c->cq = NULL;
    grpc_shutdown();
}
