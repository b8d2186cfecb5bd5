/* reflect.c -- gRPC server reflection (see reflect.h). The descriptor set is protoc's, built into
 * the binary (proto/CMakeLists.txt); each file's FileDescriptorProto is served as those bytes,
 * unparsed. To answer file_containing_symbol the set is read once, at the first request, for the
 * names each file defines (messages, nested ones, enums, services and their methods) and the
 * files it imports; that walk reads only the protobuf wire format, since protobuf-c has no
 * descriptor.proto of its own. */
#include "reflect.h"

#include <grpc/status.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gbuf.h"
#include "log.h"
#include "reflection.pb-c.h"

extern const unsigned char tpd_descriptor_set[];
extern const size_t tpd_descriptor_set_len;

#define MAX_FILES 16
#define MAX_DEPS 8
#define MAX_SYMBOLS 512
#define NAME_LEN 160

struct dfile {
    const unsigned char *data; /* its FileDescriptorProto */
    size_t len;
    char name[NAME_LEN];
    char package[NAME_LEN];
    int ndeps;
    char deps[MAX_DEPS][NAME_LEN];
};

static struct {
    pthread_once_t once;
    int ok;
    int nfiles;
    struct dfile files[MAX_FILES];
    int nsymbols;
    struct {
        char name[NAME_LEN];
        int file;
        int service; /* a service's name, for list_services */
    } symbols[MAX_SYMBOLS];
} D = {.once = PTHREAD_ONCE_INIT};

/* The protobuf wire format, as far as descriptors need it. */
struct wire {
    const unsigned char *p, *end;
};

static int varint(struct wire *w, uint64_t *v)
{
    *v = 0;
    for (int shift = 0; shift < 64 && w->p < w->end; shift += 7) {
        unsigned char b = *w->p++;

        *v |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80))
            return 0;
    }
    return -1;
}

/* The next field: its number, and for a length-delimited one its bytes in sub. 1, 0 at the end,
 * -1 when malformed. Other wire types are skipped (sub empty). */
static int field(struct wire *w, uint32_t *num, struct wire *sub)
{
    uint64_t key, v;

    if (w->p >= w->end)
        return 0;
    if (varint(w, &key) < 0)
        return -1;
    *num = (uint32_t)(key >> 3);
    *sub = (struct wire){w->p, w->p};
    switch (key & 7) {
    case 0: return varint(w, &v) < 0 ? -1 : 1;
    case 1: w->p += 8; break;
    case 5: w->p += 4; break;
    case 2:
        if (varint(w, &v) < 0 || v > (uint64_t)(w->end - w->p))
            return -1;
        *sub = (struct wire){w->p, w->p + v};
        w->p += v;
        return 1;
    default: return -1;
    }
    return w->p <= w->end ? 1 : -1;
}

static void copy_str(char *dst, const struct wire *s)
{
    size_t n = (size_t)(s->end - s->p);

    if (n >= NAME_LEN)
        n = NAME_LEN - 1;
    memcpy(dst, s->p, n);
    dst[n] = '\0';
}

static void add_symbol(const char *prefix, const struct wire *name, int file, int service)
{
    char leaf[NAME_LEN];

    if (D.nsymbols == MAX_SYMBOLS)
        return;
    copy_str(leaf, name);
    /* a name longer than NAME_LEN is cut, and so never found: tpd's are far shorter */
    if (snprintf(D.symbols[D.nsymbols].name, NAME_LEN, "%s%s%s", prefix, prefix[0] ? "." : "",
                 leaf) >= NAME_LEN)
        return;
    D.symbols[D.nsymbols].file = file;
    D.symbols[D.nsymbols].service = service;
    D.nsymbols++;
}

/* A DescriptorProto (message: name 1, nested_type 3, enum_type 4) or EnumDescriptorProto (name 1)
 * or ServiceDescriptorProto (name 1, method 2 with name 1). */
static int walk(struct wire w, const char *prefix, int file, int kind)
{
    struct wire sub, name = {NULL, NULL};
    uint32_t num;
    int r;
    char full[NAME_LEN];
    struct wire again = w;

    while ((r = field(&w, &num, &sub)) == 1)
        if (num == 1)
            name = sub;
    if (r < 0 || !name.p)
        return -1;
    add_symbol(prefix, &name, file, kind == 6);
    snprintf(full, sizeof(full), "%s", D.symbols[D.nsymbols - 1].name);
    while ((r = field(&again, &num, &sub)) == 1) {
        if (kind == 4 && (num == 3 || num == 4) && walk(sub, full, file, num == 3 ? 4 : 5) < 0)
            return -1;
        if (kind == 6 && num == 2 && walk(sub, full, file, 7) < 0)
            return -1;
    }
    return r;
}

/* One FileDescriptorProto: name 1, package 2, dependency 3, message_type 4, enum_type 5,
 * service 6. */
static int load_file(struct wire f)
{
    struct dfile *df = &D.files[D.nfiles];
    struct wire w = f, sub;
    uint32_t num;
    int r;

    *df = (struct dfile){.data = f.p, .len = (size_t)(f.end - f.p)};
    while ((r = field(&w, &num, &sub)) == 1) {
        if (num == 1)
            copy_str(df->name, &sub);
        else if (num == 2)
            copy_str(df->package, &sub);
        else if (num == 3 && df->ndeps < MAX_DEPS)
            copy_str(df->deps[df->ndeps++], &sub);
    }
    if (r < 0)
        return -1;
    w = f;
    while ((r = field(&w, &num, &sub)) == 1)
        if ((num == 4 || num == 5 || num == 6) && walk(sub, df->package, D.nfiles, (int)num) < 0)
            return -1;
    if (r < 0)
        return -1;
    D.nfiles++;
    return 0;
}

static void load(void)
{
    struct wire set = {tpd_descriptor_set, tpd_descriptor_set + tpd_descriptor_set_len}, f;
    uint32_t num;
    int r;

    while ((r = field(&set, &num, &f)) == 1)
        if (num == 1 && D.nfiles < MAX_FILES && load_file(f) < 0) {
            r = -1;
            break;
        }
    D.ok = r == 0;
    if (!D.ok)
        tp_log(TP_LOG_ERR, "reflection: the built-in descriptor set does not parse");
}

static int file_index(const char *name)
{
    for (int i = 0; i < D.nfiles; i++)
        if (strcmp(D.files[i].name, name) == 0)
            return i;
    return -1;
}

/* File i and, before it, what it imports, each once (marked in seen). */
static void with_deps(int i, int *seen, ProtobufCBinaryData *out, size_t *n)
{
    if (i < 0 || seen[i])
        return;
    seen[i] = 1;
    out[(*n)++] = (ProtobufCBinaryData){.len = D.files[i].len, .data = (uint8_t *)D.files[i].data};
    for (int d = 0; d < D.files[i].ndeps; d++)
        with_deps(file_index(D.files[i].deps[d]), seen, out, n);
}

/* The file that defines symbol (a message, enum, service or method), or -1. */
static int symbol_file(const char *symbol)
{
    for (int i = 0; i < D.nsymbols; i++)
        if (strcmp(D.symbols[i].name, symbol) == 0)
            return D.symbols[i].file;
    return -1;
}

void reflect_info(void *ctx, struct rpc_call *call, grpc_byte_buffer *payload)
{
    Grpc__Reflection__V1alpha__ServerReflectionRequest *q = NULL;
    Grpc__Reflection__V1alpha__ServerReflectionResponse r =
        GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_RESPONSE__INIT;
    Grpc__Reflection__V1alpha__FileDescriptorResponse fd =
        GRPC__REFLECTION__V1ALPHA__FILE_DESCRIPTOR_RESPONSE__INIT;
    Grpc__Reflection__V1alpha__ListServiceResponse ls =
        GRPC__REFLECTION__V1ALPHA__LIST_SERVICE_RESPONSE__INIT;
    Grpc__Reflection__V1alpha__ServiceResponse svc[MAX_SYMBOLS + 1], *svcp[MAX_SYMBOLS + 1];
    Grpc__Reflection__V1alpha__ExtensionNumberResponse ext =
        GRPC__REFLECTION__V1ALPHA__EXTENSION_NUMBER_RESPONSE__INIT;
    Grpc__Reflection__V1alpha__ErrorResponse er = GRPC__REFLECTION__V1ALPHA__ERROR_RESPONSE__INIT;
    ProtobufCBinaryData files[MAX_FILES];
    int seen[MAX_FILES] = {0}, i;
    size_t n = 0;
    struct tp_err err = {0};
    grpc_byte_buffer *bb;

    (void)ctx;
    if (!payload) { /* the client has asked all it will */
        rpc_reply(call, GRPC_STATUS_OK, NULL, NULL);
        return;
    }
    pthread_once(&D.once, load);
    if (gbuf_unpack(payload, &grpc__reflection__v1alpha__server_reflection_request__descriptor,
                    (ProtobufCMessage **)&q, &err) < 0) {
        er.error_code = GRPC_STATUS_INVALID_ARGUMENT;
        er.error_message = err.msg;
        r.message_response_case =
            GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_ERROR_RESPONSE;
        r.error_response = &er;
        goto send;
    }
    r.valid_host = q->host;
    r.original_request = q;
    switch (D.ok ? q->message_request_case : 0) {
    case GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_LIST_SERVICES:
        for (int s = 0; s < D.nsymbols; s++)
            if (D.symbols[s].service) {
                grpc__reflection__v1alpha__service_response__init(&svc[n]);
                svc[n].name = D.symbols[s].name;
                svcp[n] = &svc[n];
                n++;
            }
        /* the same service under v1, at the path it answers too */
        grpc__reflection__v1alpha__service_response__init(&svc[n]);
        svc[n].name = "grpc.reflection.v1.ServerReflection";
        svcp[n] = &svc[n];
        ls.n_service = ++n;
        ls.service = svcp;
        r.message_response_case =
            GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_LIST_SERVICES_RESPONSE;
        r.list_services_response = &ls;
        break;
    case GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_FILE_BY_FILENAME:
    case GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_FILE_CONTAINING_SYMBOL:
        i = q->message_request_case ==
                    GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_FILE_BY_FILENAME
                ? file_index(q->file_by_filename)
                : symbol_file(q->file_containing_symbol);
        if (i < 0)
            goto not_found;
        with_deps(i, seen, files, &n);
        fd.n_file_descriptor_proto = n;
        fd.file_descriptor_proto = files;
        r.message_response_case =
            GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_FILE_DESCRIPTOR_RESPONSE;
        r.file_descriptor_response = &fd;
        break;
    case GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_ALL_EXTENSION_NUMBERS_OF_TYPE:
        if (symbol_file(q->all_extension_numbers_of_type) < 0)
            goto not_found;
        ext.base_type_name = q->all_extension_numbers_of_type; /* tpd's messages have none */
        r.message_response_case =
            GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_ALL_EXTENSION_NUMBERS_RESPONSE;
        r.all_extension_numbers_response = &ext;
        break;
    default:
    not_found:
        /* NOT_FOUND: no extensions, no such file or symbol */
        er.error_code = D.ok ? GRPC_STATUS_NOT_FOUND : GRPC_STATUS_INTERNAL;
        er.error_message = D.ok ? "not found" : "the descriptor set does not parse";
        r.message_response_case =
            GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_ERROR_RESPONSE;
        r.error_response = &er;
        break;
    }
send:
    bb = gbuf_pack(&r.base);
    if (bb)
        rpc_stream_send(call, bb, &err);
    if (q)
        protobuf_c_message_free_unpacked(&q->base, NULL);
}
