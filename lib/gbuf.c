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

int gbuf_cursor_init(struct gbuf_cursor *c, grpc_byte_buffer *bb)
{
    *c = (struct gbuf_cursor){.total = grpc_byte_buffer_length(bb)};
    return grpc_byte_buffer_reader_init(&c->rd, bb) ? 0 : -1;
}

int gbuf_cursor_take(struct gbuf_cursor *c, size_t len, uint8_t *dst)
{
    if (len > c->total - c->pos)
        return -1;
    while (len > 0) {
        size_t k;

        while (c->n == 0) {
            grpc_slice *s;

            if (!grpc_byte_buffer_reader_peek(&c->rd, &s))
                return -1;
            c->p = GRPC_SLICE_START_PTR(*s);
            c->n = GRPC_SLICE_LENGTH(*s);
        }
        k = len < c->n ? len : c->n;
        if (dst) {
            memcpy(dst, c->p, k);
            dst += k;
        }
        c->p += k;
        c->n -= k;
        c->pos += k;
        len -= k;
    }
    return 0;
}

int gbuf_cursor_varint(struct gbuf_cursor *c, uint64_t *v, uint8_t raw[10], size_t *nraw)
{
    uint8_t own[10];

    raw = raw ? raw : own;
    *v = 0;
    for (size_t i = 0; i < 10; i++) {
        if (gbuf_cursor_take(c, 1, &raw[i]) < 0)
            return -1;
        *v |= (uint64_t)(raw[i] & 0x7f) << (7 * i);
        if (!(raw[i] & 0x80)) {
            if (nraw)
                *nraw = i + 1;
            return 0;
        }
    }
    return -1;
}

void gbuf_cursor_destroy(struct gbuf_cursor *c)
{
    grpc_byte_buffer_reader_destroy(&c->rd);
}

/* Appends to out (when out->buf is NULL only counts). */
struct sink {
    uint8_t *buf;
    size_t len;
};

static void sink_put(struct sink *o, const uint8_t *p, size_t n)
{
    if (o->buf)
        memcpy(o->buf + o->len, p, n);
    o->len += n;
}

/* One pass over the message: field `field` located into f, everything else to out. */
static int scan(grpc_byte_buffer *bb, uint32_t field, struct sink *out, struct gbuf_field *f)
{
    struct gbuf_cursor c;
    int rc = -1;

    *f = (struct gbuf_field){0};
    if (gbuf_cursor_init(&c, bb) < 0)
        return -1;
    while (c.pos < c.total) {
        uint8_t tag[10], len[10];
        size_t ntag, nlen;
        uint64_t key, n;

        if (gbuf_cursor_varint(&c, &key, tag, &ntag) < 0 || key >> 3 == 0 || key >> 3 > 0x1fffffff)
            goto out;
        if (key >> 3 == field) {
            if ((key & 7) != 2 || gbuf_cursor_varint(&c, &n, len, &nlen) < 0 || n > c.total - c.pos)
                goto out;
            if (f->count++ == 0) {
                f->offset = c.pos;
                f->len = (size_t)n;
            }
            if (gbuf_cursor_take(&c, (size_t)n, NULL) < 0)
                goto out;
            continue;
        }
        sink_put(out, tag, ntag);
        switch (key & 7) {
        case 0:
            if (gbuf_cursor_varint(&c, &n, len, &nlen) < 0)
                goto out;
            sink_put(out, len, nlen);
            break;
        case 1:
        case 5: {
            size_t k = (key & 7) == 1 ? 8 : 4;

            if (gbuf_cursor_take(&c, k, out->buf ? out->buf + out->len : NULL) < 0)
                goto out;
            out->len += k;
            break;
        }
        case 2:
            if (gbuf_cursor_varint(&c, &n, len, &nlen) < 0 || n > c.total - c.pos)
                goto out;
            sink_put(out, len, nlen);
            if (gbuf_cursor_take(&c, (size_t)n, out->buf ? out->buf + out->len : NULL) < 0)
                goto out;
            out->len += (size_t)n;
            break;
        default: goto out; /* groups (3, 4) and unknown wire types */
        }
    }
    rc = 0;
out:
    gbuf_cursor_destroy(&c);
    return rc;
}

int gbuf_unpack_except(grpc_byte_buffer *bb, const ProtobufCMessageDescriptor *desc, uint32_t field,
                       ProtobufCMessage **msg, struct gbuf_field *f, struct tp_err *err)
{
    uint8_t small[4096];
    struct sink out = {0};
    size_t len = grpc_byte_buffer_length(bb);

    *msg = NULL;
    if (scan(bb, field, &out, f) < 0)
        return tp_err_set(err, TP_EINVAL, "malformed %s message of %zu bytes", desc->name, len);
    /* the rest is small unless a tensor came as typed contents */
    out.buf = out.len <= sizeof(small) ? small : malloc(out.len);
    if (!out.buf)
        return tp_err_set(err, TP_ENOMEM, "no memory for a message of %zu bytes", len);
    out.len = 0;
    if (scan(bb, field, &out, f) == 0)
        *msg = protobuf_c_message_unpack(desc, NULL, out.len, out.buf);
    if (out.buf != small)
        free(out.buf);
    if (!*msg)
        return tp_err_set(err, TP_EINVAL, "malformed %s message of %zu bytes", desc->name, len);
    return 0;
}

void gbuf_copy(grpc_byte_buffer *bb, size_t offset, size_t len, void *dst)
{
    struct gbuf_cursor c;

    if (gbuf_cursor_init(&c, bb) < 0)
        return;
    if (gbuf_cursor_take(&c, offset, NULL) == 0)
        gbuf_cursor_take(&c, len, dst);
    gbuf_cursor_destroy(&c);
}
