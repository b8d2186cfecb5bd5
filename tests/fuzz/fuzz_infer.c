/* fuzz_infer.c -- ModelInfer request checking, from the bytes a client sends: the message is put
 * in a gRPC byte buffer (whole, and split in three slices, as TCP reads deliver it), unpacked by
 * gbuf_unpack (protobuf-c) and checked by infer_validate against a small model. A request that
 * passes must describe exactly rows * in floats that can be read, and its response must pack.
 * These are the steps tpd's ModelInfer handler runs before a request reaches the scheduler. */
#include <grpc/byte_buffer.h>
#include <grpc/slice.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz.h"
#include "gbuf.h"
#include "infer.h"

static const struct model model = {.name = "lin",
                                   .in = 3,
                                   .out = 2,
                                   .wdtype = TP_F32,
                                   .has_bias = 1,
                                   .ranks = 2,
                                   .backend = "cpu",
                                   .max_batch = 4};

static void check(grpc_slice *slices, size_t n)
{
    static const float y[4 * 2];
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(slices, n);
    ProtobufCMessage *m = NULL;
    Inference__ModelInferRequest *q;
    struct infer_input in;
    struct tp_err err = {0};

    if (gbuf_unpack(bb, &inference__model_infer_request__descriptor, &m, &err) < 0) {
        if (!memchr(err.msg, '\0', sizeof(err.msg)) || err.code != TP_EINVAL)
            abort();
        grpc_byte_buffer_destroy(bb);
        return;
    }
    grpc_byte_buffer_destroy(bb);
    q = (Inference__ModelInferRequest *)m;
    infer_check_model(&model, q->model_name, q->model_version, &err);
    if (infer_validate(&model, q, &in, &err) == 0) {
        grpc_byte_buffer *resp;

        if (in.rows < 1 || in.rows > model.max_batch)
            abort();
        /* every float the scheduler would copy into the slot must be readable */
        for (size_t i = 0; i < (size_t)in.rows * (size_t)model.in; i++)
            fuzz_sink += in.x[i];
        resp = infer_response(&model, q, y, in.rows);
        if (!resp)
            abort();
        grpc_byte_buffer_destroy(resp);
    } else if (err.code != TP_EINVAL && err.code != TP_ENOTFOUND) {
        abort();
    }
    protobuf_c_message_free_unpacked(m, NULL);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    grpc_slice s[3];

    s[0] = grpc_slice_from_copied_buffer((const char *)data, size);
    check(s, 1);
    grpc_slice_unref(s[0]);

    s[0] = grpc_slice_from_copied_buffer((const char *)data, size / 3);
    s[1] = grpc_slice_from_copied_buffer((const char *)data + size / 3, size / 3);
    s[2] =
        grpc_slice_from_copied_buffer((const char *)data + 2 * (size / 3), size - 2 * (size / 3));
    check(s, 3);
    for (int i = 0; i < 3; i++)
        grpc_slice_unref(s[i]);
    return 0;
}
