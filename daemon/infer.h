/* infer.h -- checking a ModelInfer request against the model and building its response. Pure
 * functions of their arguments, so every rule is unit-tested without a server. The request's
 * raw_input_contents usually stay in the received byte buffer (gbuf_unpack_except): validation
 * then gets their count and size from the scan, and the rows are copied once, into the slot. */
#ifndef TPD_INFER_H
#define TPD_INFER_H

#include <grpc/byte_buffer.h>

#include "err.h"
#include "gbuf.h"
#include "grpc_service.pb-c.h"
#include "model.h"

#define INFER_MAX_DIMS 4 /* dims of an input: [in], [B, in], [B, S, in] or [A, B, S, in] */

struct infer_input {
    uint32_t rows;                    /* the product of the leading dims; 1 for [in] */
    uint32_t nlead;                   /* leading dims, 0 to INFER_MAX_DIMS - 1 */
    int64_t lead[INFER_MAX_DIMS - 1]; /* the input's shape without its last dim, in: the
                                         output's shape is these dims, then out */
    const void *x;          /* [rows, in] of the model's io dtype in the unpacked message or a
                               shared-memory region; NULL when the data is elsewhere */
    size_t raw_offset;      /* x NULL: offset of raw_input_contents[0] in the received message */
    const char *in_region;  /* input in this shared-memory region (in the message), or NULL */
    uint64_t in_offset;     /* bytes into the region */
    const char *out_region; /* output to this shared-memory region, or NULL */
    uint64_t out_offset;
};

/* Checks every string field of the received message bb, of type desc, in nested messages and map
 * entries too, the way proto3 defines strings and tpd compares them: UTF-8 (RFC 3629: no overlong
 * forms, surrogates or code points past U+10FFFF) and no NUL, which protobuf-c's C strings would
 * cut at unseen. Bytes fields (raw_input_contents) are skipped, not read. Any message type, any
 * slicing of bb; bb stays the caller's. TP_EINVAL names the field by its path in the message
 * ("inputs[0].datatype", "parameters[0].key") and the offset of the bad byte in the string, or
 * says the message is malformed. */
int infer_check_strings(grpc_byte_buffer *bb, const ProtobufCMessageDescriptor *desc,
                        struct tp_err *err);

/* UTF-8 as RFC 3629 has it (no overlong forms, no surrogates, nothing past U+10FFFF) and no
 * NUL, decoded a byte at a time from u = {0}: -1 at the byte that makes the text bad; once the
 * text ends, it is whole when u.need is 0. */
struct infer_utf8 {
    uint32_t cp, min;
    int need; /* continuation bytes still to come */
};

int infer_utf8_step(struct infer_utf8 *u, uint8_t b);

/* Accepts the model's name with version "" or MODEL_VERSION; TP_ENOTFOUND otherwise. */
int infer_check_model(const struct model *m, const char *name, const char *version,
                      struct tp_err *err);

/* Accepts exactly one input named MODEL_INPUT, datatype the model's io dtype (FP32, FP16 or
 * BF16; E bytes an element), shape [..., in] of 1 to INFER_MAX_DIMS dims, every dim at least 1:
 * the leading dims are flattened into B rows (their product; 1 for [in]), 1 <= B <= max_batch.
 * Data in raw_input_contents[0] (exactly B*in*E bytes) or, for FP32 only, in
 * contents.fp32_contents (exactly B*in values; as in Triton, FP16 and BF16 travel only as raw
 * bytes), for model m (version "" or MODEL_VERSION); requested outputs, if any, must be
 * MODEL_OUTPUT. The input, or the output, may instead lie in a system shared-memory region:
 * parameters shared_memory_region (string), shared_memory_byte_size (exactly B*in*E, or
 * B*out*E bytes) and shared_memory_offset (>= 0, default 0); the region's bounds are checked
 * where it is looked up. raw: where the scan found raw_input_contents when they were left in
 * the byte buffer (then r has none), or NULL when r carries them itself. Fills in, the leading
 * dims included, for infer_response_dims. Errors: TP_ENOTFOUND for the model or version,
 * TP_EINVAL for the rest, each saying what was expected and what came. */
int infer_validate(const struct model *m, const Inference__ModelInferRequest *r,
                   const struct gbuf_field *raw, struct infer_input *in, struct tp_err *err);

/* The response for the rows of y ([rows, out] in the model's io dtype, already converted, where
 * rows is the product of the nlead (< INFER_MAX_DIMS) leading dims lead; 1 when nlead is 0):
 * echoes the request's id, names the output, datatype the io dtype, shape lead + [out] (so a
 * request answers in its own input's shape, its last dim replaced), data in
 * raw_output_contents. The data is not copied when release is given: the outgoing slice points
 * at y, which must stay valid until gRPC calls release(user) (on some gRPC thread, possibly
 * after the call ended). Without release, y is copied. y NULL (the output went to shared
 * memory): one empty raw_output_contents, as Triton sends for every output in a region. NULL
 * when memory runs out; release is then never called. */
grpc_byte_buffer *infer_response_dims(const struct model *m, const char *id, const void *y,
                                      const int64_t *lead, uint32_t nlead,
                                      void (*release)(void *user), void *user);

/* infer_response_dims for an output of shape [rows, out]. */
grpc_byte_buffer *infer_response(const struct model *m, const char *id, const void *y,
                                 uint32_t rows, void (*release)(void *user), void *user);

#endif
