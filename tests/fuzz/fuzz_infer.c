/* fuzz_infer.c -- ModelInfer request checking, from the bytes a client sends: the message is put
 * in a gRPC byte buffer (whole, and split in three slices, as TCP reads deliver it), scanned and
 * unpacked by gbuf_unpack_except (raw_input_contents stay in the buffer, as in tpd) and checked by
 * infer_validate against a small model-> A request that passes must describe exactly rows * in
 * floats that can be read (from the message, or from the received buffer at the offset the scan
 * found), and its response must pack. These are the steps tpd's ModelInfer handler runs before a
 * request reaches the scheduler; before them infer_check_strings, after which the strings the
 * response echoes must be UTF-8 without NUL. */
#include <grpc/byte_buffer.h>
#include <grpc/slice.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz.h"
#include "gbuf.h"
#include "infer.h"
#include "models.h"
#include "tensor.h"

/* Strict UTF-8 (RFC 3629), written apart from infer.c's. */
static int utf8_ok(const char *s)
{
    const unsigned char *p = (const unsigned char *)s;

    while (*p) {
        unsigned c = *p, n, cp;

        if (c < 0x80) {
            p++;
            continue;
        }
        n = c >= 0xf0 ? 3 : c >= 0xe0 ? 2 : c >= 0xc2 ? 1 : 0;
        if (n == 0 || c > 0xf4)
            return 0;
        cp = c & (0x3fu >> n);
        for (unsigned i = 1; i <= n; i++) {
            if ((p[i] & 0xc0) != 0x80)
                return 0;
            cp = cp << 6 | (p[i] & 0x3f);
        }
        if ((n == 2 && cp < 0x800) || (n == 3 && cp < 0x10000) || cp > 0x10ffff ||
            (cp >= 0xd800 && cp <= 0xdfff))
            return 0;
        p += n + 1;
    }
    return 1;
}

static void check(const struct model *model, grpc_slice *slices, size_t n)
{
    static const float y[4 * 2];
    static unsigned char x[4 * 3 * 4];
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(slices, n);
    ProtobufCMessage *m = NULL;
    Inference__ModelInferRequest *q;
    struct gbuf_field raw;
    struct infer_input in;
    struct tp_err err = {0};

    if (infer_check_strings(bb, &inference__model_infer_request__descriptor, &err) < 0) {
        if (!memchr(err.msg, '\0', sizeof(err.msg)) || err.code != TP_EINVAL)
            abort();
        grpc_byte_buffer_destroy(bb);
        return;
    }
    if (gbuf_unpack_except(bb, &inference__model_infer_request__descriptor, 7, &m, &raw, &err) <
        0) {
        if (!memchr(err.msg, '\0', sizeof(err.msg)) || err.code != TP_EINVAL)
            abort();
        grpc_byte_buffer_destroy(bb);
        return;
    }
    q = (Inference__ModelInferRequest *)m;
    if (!utf8_ok(q->id) || !utf8_ok(q->model_name)) /* echoed or compared */
        abort();
    infer_check_model(model, q->model_name, q->model_version, &err);
    if (infer_validate(model, q, &raw, &in, &err) == 0) {
        grpc_byte_buffer *resp;
        size_t bytes = (size_t)in.rows * (size_t)model->in * tp_dtype_size(model->io_dtype);

        if (in.rows < 1 || in.rows > model->max_batch)
            abort();
        /* every byte the scheduler would copy into the slot must be readable */
        if (in.x) {
            for (size_t i = 0; i < bytes; i++)
                fuzz_sink += ((const unsigned char *)in.x)[i];
        } else if (!in.in_region) {
            if (in.raw_offset + bytes > grpc_byte_buffer_length(bb))
                abort();
            gbuf_copy(bb, in.raw_offset, bytes, x);
            for (size_t i = 0; i < bytes; i++)
                fuzz_sink += x[i];
        }
        resp = infer_response(model, q->id, in.out_region ? NULL : y, in.rows, NULL, NULL);
        if (!resp)
            abort();
        grpc_byte_buffer_destroy(resp);
    } else if (err.code != TP_EINVAL && err.code != TP_ENOTFOUND) {
        abort();
    }
    grpc_byte_buffer_destroy(bb);
    protobuf_c_message_free_unpacked(m, NULL);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    grpc_slice s[3];

    s[0] = grpc_slice_from_copied_buffer((const char *)data, size);
    for (int k = 0; k < 2; k++)
        check(&models[k], s, 1);
    grpc_slice_unref(s[0]);

    s[0] = grpc_slice_from_copied_buffer((const char *)data, size / 3);
    s[1] = grpc_slice_from_copied_buffer((const char *)data + size / 3, size / 3);
    s[2] =
        grpc_slice_from_copied_buffer((const char *)data + 2 * (size / 3), size - 2 * (size / 3));
    for (int k = 0; k < 2; k++)
        check(&models[k], s, 3);
    for (int i = 0; i < 3; i++)
        grpc_slice_unref(s[i]);
    return 0;
}
