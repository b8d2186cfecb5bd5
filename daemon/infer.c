/* infer.c -- ModelInfer validation and responses (see infer.h). A response is two slices: the
 * message without its raw_output_contents, packed by protobuf-c, ending with the tag and length
 * of raw_output_contents, then the data itself, which protobuf allows to come last. So the data
 * slice can point straight at the slot's output. */
#include "infer.h"

#include <assert.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "gbuf.h"

#define SHOW_DIMS 6 /* dims of a received shape shown in a message; more end in ", ..." */

static void shape_str(char *buf, size_t len, const int64_t *shape, size_t n)
{
    size_t off = 0;

    off += (size_t)snprintf(buf, len, "[");
    for (size_t i = 0; i < n && i < SHOW_DIMS && off < len; i++)
        off += (size_t)snprintf(buf + off, len - off, "%s%" PRId64, i ? ", " : "", shape[i]);
    if (n > SHOW_DIMS && off < len)
        off += (size_t)snprintf(buf + off, len - off, ", ...");
    if (off < len)
        snprintf(buf + off, len - off, "]");
}

/* The input's shape [..., in]: 1 to INFER_MAX_DIMS dims, the last the model's in, every dim at
 * least 1, and leading dims that make 1 to max_batch rows. Fills rows, nlead and lead. The
 * rows are counted in 64 bits, saturating, so that no shape can wrap around to a small count. */
static int check_shape(const struct model *m, const int64_t *dims, size_t n, const char *shape,
                       struct infer_input *in, struct tp_err *err)
{
    uint64_t rows = 1;
    char count[32];

    if (n < 1)
        return tp_err_set(err, TP_EINVAL,
                          "input '%s' has shape [], expected [..., %" PRId64 "]: it has no dims",
                          MODEL_INPUT, m->in);
    if (n > INFER_MAX_DIMS)
        return tp_err_set(err, TP_EINVAL,
                          "input '%s' has shape %s, expected [..., %" PRId64 "]: it has %zu dims, "
                          "at most %d dims are accepted",
                          MODEL_INPUT, shape, m->in, n, INFER_MAX_DIMS);
    if (dims[n - 1] != m->in)
        return tp_err_set(err, TP_EINVAL,
                          "input '%s' has shape %s, expected [..., %" PRId64 "]: last dim %" PRId64
                          " is not the model's %" PRId64 " inputs",
                          MODEL_INPUT, shape, m->in, dims[n - 1], m->in);
    for (size_t i = 0; i + 1 < n; i++) {
        uint64_t d = (uint64_t)dims[i];

        if (dims[i] < 1)
            return tp_err_set(err, TP_EINVAL,
                              "input '%s' has shape %s, expected [..., %" PRId64 "]: dim %zu is "
                              "%" PRId64 ", every dim must be at least 1",
                              MODEL_INPUT, shape, m->in, i, dims[i]);
        rows = rows > UINT64_MAX / d ? UINT64_MAX : rows * d;
    }
    if (rows > m->max_batch) {
        if (rows == UINT64_MAX)
            snprintf(count, sizeof(count), "over 2^63");
        else
            snprintf(count, sizeof(count), "%" PRIu64, rows);
        return tp_err_set(err, TP_EINVAL,
                          "input '%s' has shape %s, expected [..., %" PRId64 "] with 1 to %u rows "
                          "(--max-batch): its leading dims make %s rows",
                          MODEL_INPUT, shape, m->in, m->max_batch, count);
    }
    in->rows = (uint32_t)rows;
    in->nlead = (uint32_t)(n - 1);
    for (size_t i = 0; i + 1 < n; i++)
        in->lead[i] = dims[i];
    return 0;
}

int infer_check_model(const struct model *m, const char *name, const char *version,
                      struct tp_err *err)
{
    if (strcmp(name, m->name) != 0)
        return tp_err_set(err, TP_ENOTFOUND, "unknown model '%.64s', this server serves '%s'", name,
                          m->name);
    if (version[0] && strcmp(version, MODEL_VERSION) != 0)
        return tp_err_set(err, TP_ENOTFOUND, "model '%s' has no version '%.32s' (only '%s')",
                          m->name, version, MODEL_VERSION);
    return 0;
}

/* An integer parameter, >= 0: int64_param (what tritonclient sends) or uint64_param. */
static int param_u64(const char *tensor, const char *key, const Inference__InferParameter *v,
                     uint64_t *out, struct tp_err *err)
{
    if (v && v->parameter_choice_case == INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_INT64_PARAM &&
        v->int64_param >= 0) {
        *out = (uint64_t)v->int64_param;
        return 0;
    }
    if (v &&
        v->parameter_choice_case == INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_UINT64_PARAM) {
        *out = v->uint64_param;
        return 0;
    }
    return tp_err_set(err, TP_EINVAL, "'%s' parameter %s must be an integer >= 0", tensor, key);
}

/* The shared-memory parameters of a tensor (keys[i] = vals[i]); *region stays NULL without
 * shared_memory_region. Other parameters are ignored. want: the bytes the tensor has. */
static int shm_params(const char *tensor, size_t n, char *const *keys,
                      Inference__InferParameter *const *vals, uint64_t want, const char *dtype,
                      const char **region, uint64_t *offset, struct tp_err *err)
{
    uint64_t size = 0;
    int has_size = 0;

    *region = NULL;
    *offset = 0;
    for (size_t i = 0; i < n; i++) {
        if (strcmp(keys[i], "shared_memory_region") == 0) {
            if (!vals[i] || vals[i]->parameter_choice_case !=
                                INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_STRING_PARAM)
                return tp_err_set(err, TP_EINVAL,
                                  "'%s' parameter shared_memory_region must be a string", tensor);
            *region = vals[i]->string_param;
        } else if (strcmp(keys[i], "shared_memory_byte_size") == 0) {
            if (param_u64(tensor, keys[i], vals[i], &size, err) < 0)
                return -1;
            has_size = 1;
        } else if (strcmp(keys[i], "shared_memory_offset") == 0) {
            if (param_u64(tensor, keys[i], vals[i], offset, err) < 0)
                return -1;
        }
    }
    if (!*region) {
        if (has_size || *offset)
            return tp_err_set(err, TP_EINVAL,
                              "'%s' has shared-memory parameters but no shared_memory_region",
                              tensor);
        return 0;
    }
    if (!has_size)
        return tp_err_set(err, TP_EINVAL,
                          "'%s' in shared-memory region '%.64s' needs shared_memory_byte_size",
                          tensor, *region);
    if (size != want)
        return tp_err_set(err, TP_EINVAL,
                          "'%s' %s needs %" PRIu64 " bytes, shared_memory_byte_size is %" PRIu64,
                          tensor, dtype, want, size);
    return 0;
}

#define MAX_PARAMS 16

int infer_validate(const struct model *m, const Inference__ModelInferRequest *r,
                   const struct gbuf_field *raw, struct infer_input *in, struct tp_err *err)
{
    char *keys[MAX_PARAMS];
    Inference__InferParameter *vals[MAX_PARAMS];
    const Inference__ModelInferRequest__InferInputTensor *t;
    char shape[128];
    uint64_t want;
    size_t nraw = raw ? raw->count : r->n_raw_input_contents;
    const char *dt = tp_dtype_wire_name(m->io_dtype);
    uint64_t esize = tp_dtype_size(m->io_dtype);

    if (infer_check_model(m, r->model_name, r->model_version, err) < 0)
        return -1;
    if (r->n_inputs != 1)
        return tp_err_set(err, TP_EINVAL, "expected 1 input, got %zu", r->n_inputs);
    t = r->inputs[0];
    if (strcmp(t->name, MODEL_INPUT) != 0)
        return tp_err_set(err, TP_EINVAL, "unexpected input '%.64s', the model's input is '%s'",
                          t->name, MODEL_INPUT);
    if (strcmp(t->datatype, dt) != 0)
        return tp_err_set(err, TP_EINVAL,
                          "input '%s' has datatype '%.32s', expected %s (the model's io dtype)",
                          MODEL_INPUT, t->datatype, dt);
    shape_str(shape, sizeof(shape), t->shape, t->n_shape);
    *in = (struct infer_input){0};
    if (check_shape(m, t->shape, t->n_shape, shape, in, err) < 0)
        return -1;
    for (size_t i = 0; i < r->n_outputs; i++)
        if (strcmp(r->outputs[i]->name, MODEL_OUTPUT) != 0)
            return tp_err_set(err, TP_EINVAL,
                              "unknown requested output '%.64s', the model's output is '%s'",
                              r->outputs[i]->name, MODEL_OUTPUT);
    want = (uint64_t)in->rows * (uint64_t)m->in;
    if (t->n_parameters > MAX_PARAMS)
        return tp_err_set(err, TP_EINVAL, "input '%s' has %zu parameters, at most %d", MODEL_INPUT,
                          t->n_parameters, MAX_PARAMS);
    for (size_t i = 0; i < t->n_parameters; i++)
        keys[i] = t->parameters[i]->key, vals[i] = t->parameters[i]->value;
    if (shm_params("input", t->n_parameters, keys, vals, want * esize, dt, &in->in_region,
                   &in->in_offset, err) < 0)
        return -1;
    for (size_t o = 0; o < r->n_outputs; o++) {
        const Inference__ModelInferRequest__InferRequestedOutputTensor *ot = r->outputs[o];

        if (ot->n_parameters > MAX_PARAMS)
            return tp_err_set(err, TP_EINVAL, "output '%s' has %zu parameters, at most %d",
                              MODEL_OUTPUT, ot->n_parameters, MAX_PARAMS);
        for (size_t i = 0; i < ot->n_parameters; i++)
            keys[i] = ot->parameters[i]->key, vals[i] = ot->parameters[i]->value;
        if (shm_params("output", ot->n_parameters, keys, vals,
                       (uint64_t)in->rows * (uint64_t)m->out * esize, dt, &in->out_region,
                       &in->out_offset, err) < 0)
            return -1;
    }
    if (in->in_region) {
        if (nraw > 0 || t->contents)
            return tp_err_set(err, TP_EINVAL,
                              "input '%s' is in shared-memory region '%.64s' and also has data "
                              "in the request",
                              MODEL_INPUT, in->in_region);
    } else if (nraw > 0) {
        size_t len = raw ? raw->len : r->raw_input_contents[0].len;

        if (nraw != 1)
            return tp_err_set(err, TP_EINVAL, "expected 1 raw_input_contents, got %zu", nraw);
        if (t->contents)
            return tp_err_set(err, TP_EINVAL,
                              "input '%s' has both raw_input_contents and typed contents",
                              MODEL_INPUT);
        if (len != want * esize)
            return tp_err_set(err, TP_EINVAL,
                              "input '%s' %s %s needs %" PRIu64
                              " bytes, raw_input_contents has %zu",
                              MODEL_INPUT, shape, dt, want * esize, len);
        if (raw)
            in->raw_offset = raw->offset;
        else
            in->x = r->raw_input_contents[0].data;
    } else if (t->contents && m->io_dtype != TP_F32) {
        return tp_err_set(err, TP_EINVAL,
                          "input '%s' is %s: its data goes in raw_input_contents (typed contents "
                          "carry FP32 only)",
                          MODEL_INPUT, dt);
    } else if (t->contents) {
        if (t->contents->n_fp32_contents != want)
            return tp_err_set(err, TP_EINVAL,
                              "input '%s' %s needs %" PRIu64 " fp32_contents, got %zu", MODEL_INPUT,
                              shape, want, t->contents->n_fp32_contents);
        in->x = t->contents->fp32_contents;
    } else {
        return tp_err_set(err, TP_EINVAL, "input '%s' has no data: expected raw_input_contents%s",
                          MODEL_INPUT, m->io_dtype == TP_F32 ? " or fp32_contents" : "");
    }
    return 0;
}

grpc_byte_buffer *infer_response_dims(const struct model *m, const char *id, const void *y,
                                      const int64_t *lead, uint32_t nlead,
                                      void (*release)(void *user), void *user)
{
    Inference__ModelInferResponse resp = INFERENCE__MODEL_INFER_RESPONSE__INIT;
    Inference__ModelInferResponse__InferOutputTensor out =
        INFERENCE__MODEL_INFER_RESPONSE__INFER_OUTPUT_TENSOR__INIT;
    Inference__ModelInferResponse__InferOutputTensor *outs[1] = {&out};
    int64_t shape[INFER_MAX_DIMS];
    size_t rows = 1, len, hlen, n;
    grpc_slice s[2];
    grpc_byte_buffer *bb;
    uint8_t *h;

    assert(nlead < INFER_MAX_DIMS);
    for (uint32_t i = 0; i < nlead; i++) {
        shape[i] = lead[i];
        rows *= (size_t)lead[i];
    }
    shape[nlead] = m->out;
    len = rows * (size_t)m->out * tp_dtype_size(m->io_dtype);

    resp.model_name = (char *)m->name;
    resp.model_version = MODEL_VERSION;
    resp.id = (char *)id;
    out.name = MODEL_OUTPUT;
    out.datatype = (char *)tp_dtype_wire_name(m->io_dtype);
    out.n_shape = nlead + 1;
    out.shape = shape;
    resp.n_outputs = 1;
    resp.outputs = outs;
    hlen = protobuf_c_message_get_packed_size(&resp.base);
    /* room for raw_output_contents' tag (field 6, length-delimited) and length. An output that
     * went to shared memory still gets its entry, empty, as Triton sends it: clients (Triton's
     * C++ client among them) index raw_output_contents by output. */
    s[0] = grpc_slice_malloc(hlen + 11);
    h = GRPC_SLICE_START_PTR(s[0]);
    n = protobuf_c_message_pack(&resp.base, h);
    {
        uint64_t v = y ? len : 0;

        h[n++] = (6 << 3) | 2;
        do {
            h[n++] = (uint8_t)((v & 0x7f) | (v > 0x7f ? 0x80 : 0));
            v >>= 7;
        } while (v);
    }
    s[0] = grpc_slice_sub_no_ref(s[0], 0, n);
    if (!y) {
        bb = grpc_raw_byte_buffer_create(s, 1);
        grpc_slice_unref(s[0]);
        return bb;
    }
    if (release)
        s[1] = grpc_slice_new_with_user_data((void *)(uintptr_t)y, len, release, user);
    else
        s[1] = grpc_slice_from_copied_buffer((const char *)y, len);
    bb = grpc_raw_byte_buffer_create(s, 2);
    grpc_slice_unref(s[0]);
    grpc_slice_unref(s[1]);
    return bb;
}

grpc_byte_buffer *infer_response(const struct model *m, const char *id, const void *y,
                                 uint32_t rows, void (*release)(void *user), void *user)
{
    int64_t lead[1] = {rows};

    return infer_response_dims(m, id, y, lead, 1, release, user);
}

/* ---- strings on the wire ----
 * protobuf-c hands strings over as C strings without their length, so a NUL inside one cuts it
 * short unseen ("FP32\0junk" compares equal to "FP32"), and it does not check UTF-8, so a bad id
 * would be echoed into a response that the client cannot parse. The check therefore reads the
 * wire format itself, guided by the message's descriptor, across the received slices. */

#define STRING_PATH_MAX 160 /* bytes of a field's path in a message, "inputs[0].datatype" */
#define STRING_DEPTH_MAX 8  /* nested messages that are checked; KServe's nest 4 deep */
#define STRING_FIELDS_MAX 32 /* fields of one message whose occurrences are counted */

int infer_utf8_step(struct infer_utf8 *u, uint8_t b)
{
    if (u->need) {
        if ((b & 0xc0) != 0x80)
            return -1;
        u->cp = u->cp << 6 | (b & 0x3f);
        if (--u->need == 0 &&
            (u->cp < u->min || u->cp > 0x10ffff || (u->cp >= 0xd800 && u->cp <= 0xdfff)))
            return -1;
        return 0;
    }
    if (b == 0)
        return -1;
    if (b < 0x80)
        return 0;
    if ((b & 0xe0) == 0xc0)
        u->need = 1, u->cp = b & 0x1f, u->min = 0x80;
    else if ((b & 0xf0) == 0xe0)
        u->need = 2, u->cp = b & 0x0f, u->min = 0x800;
    else if ((b & 0xf8) == 0xf0)
        u->need = 3, u->cp = b & 0x07, u->min = 0x10000;
    else
        return -1;
    return 0;
}

/* Reads a string of len bytes. Returns 0 when it is UTF-8 without NUL; 1 when it is not, with
 * the offset of the first bad sequence (or NUL) in *at and its first byte in *bad (0 for NUL);
 * -1 when the message ends first. UTF-8 as RFC 3629 has it: no overlong forms, no surrogates,
 * nothing past U+10FFFF. */
static int wire_string(struct gbuf_cursor *w, uint64_t len, uint64_t *at, uint8_t *bad)
{
    struct infer_utf8 u = {0};
    uint64_t start = 0;
    uint8_t b, lead = 0;

    for (uint64_t i = 0; i < len; i++) {
        if (gbuf_cursor_take(w, 1, &b) < 0)
            return -1;
        if (!u.need)
            start = i, lead = b;
        if (infer_utf8_step(&u, b) < 0)
            goto bad_sequence;
    }
    if (!u.need)
        return 0;
bad_sequence:
    *at = start;
    *bad = lead;
    return 1;
}

/* Checks the fields of one message of type desc that ends at byte end of the message; path
 * (plen bytes used) names it, "" at the top. Returns 0, -1 for malformed wire data, or -2 with
 * err set for a string that is not one. */
static int check_message(struct gbuf_cursor *w, const ProtobufCMessageDescriptor *desc, uint64_t end,
                         char *path, size_t plen, int depth, struct tp_err *err)
{
    unsigned seen[STRING_FIELDS_MAX] = {0}; /* occurrences so far of each repeated field */

    while (w->pos < end) {
        const ProtobufCFieldDescriptor *f = NULL;
        uint64_t key, len, at;
        uint8_t bad;
        int r;

        if (gbuf_cursor_varint(w, &key, NULL, NULL) < 0 || w->pos > end)
            return -1;
        if (key >> 3 >= 1 && key >> 3 <= 0x1fffffff)
            f = protobuf_c_message_descriptor_get_field(desc, (unsigned)(key >> 3));
        switch (key & 7) {
        case 0:
            if (gbuf_cursor_varint(w, &len, NULL, NULL) < 0)
                return -1;
            continue;
        case 1:
        case 5:
            if (gbuf_cursor_take(w, (key & 7) == 1 ? 8 : 4, NULL) < 0)
                return -1;
            continue;
        case 2: break;
        default: return -1; /* groups and unknown wire types */
        }
        if (gbuf_cursor_varint(w, &len, NULL, NULL) < 0 || len > end - w->pos)
            return -1;
        if (!f || (f->type != PROTOBUF_C_TYPE_STRING && f->type != PROTOBUF_C_TYPE_MESSAGE) ||
            (f->type == PROTOBUF_C_TYPE_MESSAGE && depth >= STRING_DEPTH_MAX)) {
            if (gbuf_cursor_take(w, (size_t)len, NULL) < 0) /* bytes (the tensor data), packed numbers, unknown */
                return -1;
            continue;
        }
        {
            size_t idx = (size_t)(f - desc->fields), n = plen;

            n += (size_t)snprintf(path + n, STRING_PATH_MAX - n, "%s%s", plen ? "." : "",
                                  f->name);
            if (f->label == PROTOBUF_C_LABEL_REPEATED && n < STRING_PATH_MAX)
                n += (size_t)snprintf(path + n, STRING_PATH_MAX - n, "[%u]",
                                      idx < STRING_FIELDS_MAX ? seen[idx]++ : 0);
            if (n >= STRING_PATH_MAX)
                n = STRING_PATH_MAX - 1;
            if (f->type == PROTOBUF_C_TYPE_MESSAGE) {
                r = check_message(w, f->descriptor, w->pos + len, path, n, depth + 1, err);
                if (r < 0)
                    return r;
            } else {
                r = wire_string(w, len, &at, &bad);
                if (r < 0)
                    return -1;
                if (r > 0 && bad == 0)
                    tp_err_set(err, TP_EINVAL,
                               "field '%s' has a NUL byte at %" PRIu64
                               "; strings must be UTF-8 without NUL",
                               path, at);
                else if (r > 0)
                    tp_err_set(err, TP_EINVAL,
                               "field '%s' is not UTF-8: byte 0x%02x at %" PRIu64
                               "; strings must be UTF-8 without NUL",
                               path, bad, at);
                if (r > 0)
                    return -2;
            }
            path[plen] = '\0';
        }
    }
    return w->pos == end ? 0 : -1;
}

int infer_check_strings(grpc_byte_buffer *bb, const ProtobufCMessageDescriptor *desc,
                        struct tp_err *err)
{
    struct gbuf_cursor w;
    char path[STRING_PATH_MAX] = "";
    int r;

    if (gbuf_cursor_init(&w, bb) < 0)
        return tp_err_set(err, TP_EINVAL, "cannot read the %s message", desc->short_name);
    r = check_message(&w, desc, w.total, path, 0, 0, err);
    gbuf_cursor_destroy(&w);
    if (r == -1)
        return tp_err_set(err, TP_EINVAL, "malformed %s message of %zu bytes", desc->name,
                          w.total);
    return r < 0 ? -1 : 0;
}
