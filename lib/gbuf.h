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
#include <grpc/byte_buffer_reader.h>
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

/* A forward-only cursor over the slices of a received message, for readers of its wire format
 * (gbuf_unpack_except's scan, infer_check_strings). */
struct gbuf_cursor {
    grpc_byte_buffer_reader rd;
    const uint8_t *p; /* rest of the current slice */
    size_t n;
    size_t pos;   /* bytes consumed */
    size_t total; /* bytes in the message */
};

/* Starts at byte 0 of bb, which stays the caller's; -1 when it cannot be read. A cursor that
 * started is ended with gbuf_cursor_destroy. */
int gbuf_cursor_init(struct gbuf_cursor *c, grpc_byte_buffer *bb);
/* Copies (dst != NULL) or skips len bytes; -1 when the message ends first. */
int gbuf_cursor_take(struct gbuf_cursor *c, size_t len, uint8_t *dst);
/* Reads a varint; its bytes go to raw (up to 10, may be NULL) and their count to *nraw (may be
 * NULL). -1 when the message ends first or the varint is longer than 10 bytes. */
int gbuf_cursor_varint(struct gbuf_cursor *c, uint64_t *v, uint8_t raw[10], size_t *nraw);
void gbuf_cursor_destroy(struct gbuf_cursor *c);

/* Packs msg into a new byte buffer owned by the caller; NULL when memory runs out. */
grpc_byte_buffer *gbuf_pack(const ProtobufCMessage *msg);

#endif
