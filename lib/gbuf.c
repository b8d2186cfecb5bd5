/* gbuf.c -- protobuf-c <-> gRPC byte buffers (see gbuf.h). */
#include "gbuf.h"

#include <grpc/byte_buffer_reader.h>
#include <grpc/slice.h>
#include <stdlib.h>
#include <string.h>

int gbuf_unpack(grpc_byte_buffer *bb, const ProtobufCMessageDescriptor *desc,
                ProtobufCMessage **msg, struct tp_err *err)
{
    grpc_byte_buffer_reader reader;
    grpc_slice *first = NULL, *s;
    size_t len = grpc_byte_buffer_length(bb), off = 0;
    uint8_t *flat = NULL;
    int nslices = 0;

    *msg = NULL;
    if (!grpc_byte_buffer_reader_init(&reader, bb))
        return tp_err_set(err, TP_EINVAL, "cannot read the request message");
    while (grpc_byte_buffer_reader_peek(&reader, &s)) {
        if (nslices++ == 0)
            first = s;
        if (nslices == 2) {
            flat = malloc(len ? len : 1);
            if (!flat) {
                grpc_byte_buffer_reader_destroy(&reader);
                return tp_err_set(err, TP_ENOMEM, "no memory for a message of %zu bytes", len);
            }
            memcpy(flat, GRPC_SLICE_START_PTR(*first), GRPC_SLICE_LENGTH(*first));
            off = GRPC_SLICE_LENGTH(*first);
        }
        if (nslices >= 2) {
            memcpy(flat + off, GRPC_SLICE_START_PTR(*s), GRPC_SLICE_LENGTH(*s));
            off += GRPC_SLICE_LENGTH(*s);
        }
    }
    if (nslices == 1)
        *msg = protobuf_c_message_unpack(desc, NULL, GRPC_SLICE_LENGTH(*first),
                                         GRPC_SLICE_START_PTR(*first));
    else
        *msg = protobuf_c_message_unpack(desc, NULL, off, flat);
    grpc_byte_buffer_reader_destroy(&reader);
    free(flat);
    if (!*msg)
        return tp_err_set(err, TP_EINVAL, "malformed %s message of %zu bytes", desc->name, len);
    return 0;
}

grpc_byte_buffer *gbuf_pack(const ProtobufCMessage *msg)
{
    size_t len = protobuf_c_message_get_packed_size(msg);
    uint8_t *buf = malloc(len ? len : 1);
    grpc_byte_buffer *bb;
    grpc_slice s;

    if (!buf)
        return NULL;
    protobuf_c_message_pack(msg, buf);
    s = grpc_slice_new(buf, len, free);
    bb = grpc_raw_byte_buffer_create(&s, 1);
    grpc_slice_unref(s);
    return bb;
}
