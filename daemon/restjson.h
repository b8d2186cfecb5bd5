/* restjson.h -- the JSON of the REST API, apart from HTTP: reading an inference request (its
 * JSON header and binary tensor data) into what gRPC's ModelInfer would have carried, checked by
 * infer_validate; writing an inference's answer; writing any of the protobuf messages tpd
 * answers with as Triton writes them in JSON. Pure functions of their arguments, so that every
 * rule is unit-tested and fuzzed without a server. */
#ifndef TPD_RESTJSON_H
#define TPD_RESTJSON_H

#include <cjson/cJSON.h>
#include <protobuf-c/protobuf-c.h>
#include <stdint.h>
#include <stdio.h>

#include "err.h"
#include "infer.h"
#include "model.h"
#include "shmreg.h"

#define RESTJSON_HEADER "Inference-Header-Content-Length"

/* A request as read from its body. in.x points into the body (binary data) or at xs (JSON
 * data), or is NULL when the input is in a region; in.in_region and in.out_region point at the
 * names below (or are NULL). */
struct restjson_infer {
    char *id;  /* malloc'd, "" when the request has none */
    float *xs; /* the JSON data as FP32, malloc'd */
    struct infer_input in;
    char in_region[SHMREG_NAME_MAX], out_region[SHMREG_NAME_MAX];
    int binary_out;     /* the output goes back as binary data */
    int64_t timeout_us; /* Triton's timeout parameter; 0: none */
};

/* Reads the inference request of body (len bytes) to model name / version of the URL:
 * header_len is the Inference-Header-Content-Length header's value (NULL when there is none:
 * the whole body is JSON), encoding the Content-Encoding header's (NULL for none: a gzip'd or
 * deflate'd body comes here inflated, and any other encoding is refused). Accepts
 * exactly what infer_validate accepts of the same request over gRPC, and refuses besides: JSON
 * data for FP16/BF16 (in or out), binary data with a byte count that leaves the body or leaves
 * bytes over, classification, a compressed body, JSON that is not UTF-8 or holds \u0000. r is
 * filled (restjson_infer_free frees it, whatever the result); -1 with err set when refused. */
int restjson_infer(const struct model *m, const char *model, const char *version, const char *body,
                   size_t len, const char *header_len, const char *encoding,
                   struct restjson_infer *r, struct tp_err *err);

void restjson_infer_free(struct restjson_infer *r);

/* Writes the answer's JSON to f: model, id and the output's name, datatype and shape (in's
 * leading dims, then out); with data (FP32, in.rows x out values) the output's data, with
 * binary_size != (size_t)-1 its binary_data_size. -1 when a value of data is not finite, which
 * JSON cannot carry. */
int restjson_answer(FILE *f, const struct model *m, const char *id, const struct infer_input *in,
                    const float *data, size_t binary_size);

/* f (finite) as a JSON number that reads back to the same float: 9 significant digits, trailing
 * zeros dropped, plain between 1e-5 and 1e9, else with an exponent; "-0.0" keeps zero's sign.
 * Writes at most RESTJSON_F32_MAX bytes, no NUL; returns how many. */
#define RESTJSON_F32_MAX 16
size_t restjson_f32(char *out, float f);

/* n bytes of JSON text, parsed: UTF-8 without NUL, as JSON text must be, no \u0000 escape
 * (which would cut a C string short unseen) and nothing after the value. NULL with err naming
 * what (the request's kind) and where parsing stopped. */
cJSON *restjson_parse(const char *text, size_t n, const char *what, struct tp_err *err);

/* Replaces, in place, every byte of s that is not part of good UTF-8 with '?': for messages
 * that quote what a client sent (a URL's model name, cut at 64 bytes, maybe inside a
 * character), which JSON text must not carry raw. */
void restjson_clean_utf8(char *s);

/* An integer JSON number in [lo, hi], exactly; -1 for anything else. */
int restjson_int(const cJSON *v, double lo, double hi, int64_t *out);

/* The HTTP status of a gRPC status code, as Triton maps its errors (400, 404, 500, 501, 503),
 * with 429 and 504 for the two codes Triton's errors lack. */
unsigned restjson_status(int grpc_code);

/* m as Triton writes a message in JSON: proto field names, every field (defaults too), 64-bit
 * integers as numbers, enums by name, maps as objects, an InferParameter as its bare value.
 * NULL without memory. */
cJSON *restjson_pb(const ProtobufCMessage *m);

#endif
