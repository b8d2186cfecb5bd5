/* gbuf.h -- moving protobuf-c messages in and out of gRPC byte buffers, for the daemon and the
 * client alike. A received buffer is a chain of slices sized by TCP reads; protobuf-c needs one
 * contiguous buffer, so a multi-slice message is flattened once (a single slice is used in place).
 * Packing writes the message once, into memory the outgoing slice then owns.
 * For a message with one big bytes field (a tensor), gbuf_unpack_except leaves that field where it
 * arrived: a minimal scan of the protobuf wire format finds it across the slices and unpacks only
 * the rest, and gbuf_copy later copies the field's bytes straight to their destination. */
#ifndef TP_GBUF_H
#define TP_GBUF_H

#include <grpc/byte_buffer.h>
#include <protobuf-c/protobuf-c.h>

#include "err.h"

/* Unpacks bb as a message of type desc. On success *msg is owned by the caller
 * (protobuf_c_message_free_unpacked). Malformed bytes are TP_EINVAL. bb stays the caller's. */
int gbuf_unpack(grpc_byte_buffer *bb, const ProtobufCMessageDescriptor *desc,
                ProtobufCMessage **msg, struct tp_err *err);

/* Where a top-level length-delimited field lies in a received message. */
struct gbuf_field {
    size_t count;  /* occurrences of the field */
    size_t offset; /* byte offset of the first occurrence's data in the message */
    size_t len;    /* bytes of the first occurrence's data */
};

/* Like gbuf_unpack, but the top-level field number `field` (which must be length-delimited) is
 * not unpacked: *f says how often it came and where its first occurrence lies in bb. The rest
 * of the message (everything else, usually small) is copied once and unpacked. Malformed wire
 * data (truncated, bad wire type, group) is TP_EINVAL. bb stays the caller's. */
int gbuf_unpack_except(grpc_byte_buffer *bb, const ProtobufCMessageDescriptor *desc, uint32_t field,
                       ProtobufCMessage **msg, struct gbuf_field *f, struct tp_err *err);

/* Copies len bytes from offset of bb's message to dst. The range must lie in the message (as
 * gbuf_unpack_except reported it). */
void gbuf_copy(grpc_byte_buffer *bb, size_t offset, size_t len, void *dst);

/* Packs msg into a new byte buffer owned by the caller; NULL when memory runs out. */
grpc_byte_buffer *gbuf_pack(const ProtobufCMessage *msg);

#endif
