/* gbuf.h -- moving protobuf-c messages in and out of gRPC byte buffers, for the daemon and the
 * client alike. A received buffer is a chain of slices sized by TCP reads; protobuf-c needs one
 * contiguous buffer, so a multi-slice message is flattened once (a single slice is used in place).
 * Packing writes the message once, into memory the outgoing slice then owns. */
#ifndef TP_GBUF_H
#define TP_GBUF_H

#include <grpc/byte_buffer.h>
#include <protobuf-c/protobuf-c.h>

#include "err.h"

/* Unpacks bb as a message of type desc. On success *msg is owned by the caller
 * (protobuf_c_message_free_unpacked). Malformed bytes are TP_EINVAL. bb stays the caller's. */
int gbuf_unpack(grpc_byte_buffer *bb, const ProtobufCMessageDescriptor *desc,
                ProtobufCMessage **msg, struct tp_err *err);

/* Packs msg into a new byte buffer owned by the caller; NULL when memory runs out. */
grpc_byte_buffer *gbuf_pack(const ProtobufCMessage *msg);

#endif
