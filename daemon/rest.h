/* rest.h -- the KServe v2 REST API (HTTP/1.1, JSON and Triton's binary tensor extension) on a
 * listener of its own (--http-listen), served by libmicrohttpd from a small pool of threads.
 * Every endpoint answers what its gRPC twin does, from the same code: requests are checked by
 * infer_validate, batched by the same scheduler, counted by the same metrics; errors are
 * {"error": "..."} with the HTTP status of their gRPC code (Triton's mapping). An inference
 * waits for its job on a suspended connection, holding no thread; a binary output is sent from
 * the slot it was computed in, without a copy. Bodies are bounded before they are read: one by
 * max_body, all of them together by max_buffered. */
#ifndef TPD_REST_H
#define TPD_REST_H

#include <stdint.h>

#include "api.h"
#include "err.h"

struct rest;

struct rest_config {
    const char *listen;    /* HOST:PORT; port 0 picks a free one */
    struct api *api;       /* borrowed until rest_stop */
    uint64_t max_body;     /* bytes of one infer request's body, JSON included */
    uint64_t max_buffered; /* bytes of request bodies held at once, every connection's */
    int reply_timeout_ms;  /* a reply its client does not read for this long is dropped */
    int threads;           /* threads serving connections */
    /* PEM files: with tls_cert, HTTPS; with tls_client_ca too, clients must present a
     * certificate it signed (else 403) */
    const char *tls_cert, *tls_key, *tls_client_ca;
};

/* Binds and serves from threads of its own; logs "REST API on http[s]://HOST:PORT/v2" at
 * notice. A bad or busy address, or TLS files that do not work, fail with a message naming
 * them. */
int rest_start(struct rest **r, const struct rest_config *c, struct tp_err *err);

/* The drain begins: new connections are refused and new inferences answered 503, while those
 * already accepted finish. Takes NULL. */
void rest_quiesce(struct rest *r);

/* Waits up to grace_ms for accepted inferences to be answered, then closes everything. Call
 * before the scheduler is destroyed. Takes NULL. */
void rest_stop(struct rest *r, int grace_ms);

#endif
