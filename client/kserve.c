/* kserve.c -- ModelMetadata and ModelInfer as tpclient uses them (see kserve.h). */
#include "kserve.h"

#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "grpc_service.pb-c.h"

static int default_model(struct conn *c, char *buf, size_t len, struct tp_err *err)
{
    Inference__RepositoryIndexRequest req = INFERENCE__REPOSITORY_INDEX_REQUEST__INIT;
    Inference__RepositoryIndexResponse *resp;

    if (conn_call(c, "/inference.GRPCInferenceService/RepositoryIndex", &req.base,
                  &inference__repository_index_response__descriptor, (ProtobufCMessage **)&resp,
                  err) < 0)
        return -1;
    if (resp->n_models != 1) {
        tp_err_set(err, TP_EINVAL, "server has %zu models; choose one with --model",
                   resp->n_models);
        protobuf_c_message_free_unpacked(&resp->base, NULL);
        return -1;
    }
    snprintf(buf, len, "%s", resp->models[0]->name);
    protobuf_c_message_free_unpacked(&resp->base, NULL);
    return 0;
}

int kserve_model(struct conn *c, const char *opt, char *buf, size_t len, struct tp_err *err)
{
    if (!opt)
        return default_model(c, buf, len, err);
    snprintf(buf, len, "%s", opt);
    return 0;
}

int kserve_check_layout(const char *model, const struct kserve_layout *l, struct tp_err *err)
{
    int64_t wide = l->in > l->out ? l->in : l->out;

    if (l->in < 1 || l->in > KSERVE_MAX_FEATURES || l->out < 1 || l->out > KSERVE_MAX_FEATURES)
        return tp_err_set(err, TP_EINVAL,
                          "model '%s': the server claims in %" PRId64 " and out %" PRId64
                          ", tpclient takes 1 to %d of each",
                          model, l->in, l->out, KSERVE_MAX_FEATURES);
    if (l->max_batch < 0 || l->max_batch > KSERVE_MAX_ROWS)
        return tp_err_set(err, TP_EINVAL,
                          "model '%s': the server claims max_batch %" PRId64
                          ", tpclient takes 0 (none said) to %d",
                          model, l->max_batch, KSERVE_MAX_ROWS);
    /* each factor is below 2^26: the product cannot overflow */
    if (l->max_batch * wide * 4 > KSERVE_MAX_REQUEST_BYTES)
        return tp_err_set(err, TP_EINVAL,
                          "model '%s': the server claims max_batch %" PRId64 " rows of %" PRId64
                          " values, over the %lld bytes tpclient sends or takes in one request",
                          model, l->max_batch, wide, KSERVE_MAX_REQUEST_BYTES);
    return 0;
}

int kserve_check_rows(const struct kserve_layout *l, int64_t rows, struct tp_err *err)
{
    int64_t wide = l->in > l->out ? l->in : l->out;

    if (rows < 1 || wide < 1 || rows > KSERVE_MAX_REQUEST_BYTES / 4 / wide)
        return tp_err_set(err, TP_EINVAL,
                          "%" PRId64 " rows of %" PRId64
                          " values are not 1 to the %lld bytes tpclient sends or takes in one "
                          "request",
                          rows, wide, KSERVE_MAX_REQUEST_BYTES);
    return 0;
}

int kserve_layout(struct conn *c, const char *model, struct kserve_layout *l, struct tp_err *err)
{
    Inference__ModelMetadataRequest req = INFERENCE__MODEL_METADATA_REQUEST__INIT;
    Inference__ModelMetadataResponse *r;
    int rc = -1;

    req.name = (char *)model;
    if (conn_call(c, "/inference.GRPCInferenceService/ModelMetadata", &req.base,
                  &inference__model_metadata_response__descriptor, (ProtobufCMessage **)&r,
                  err) < 0)
        return -1;
    if (r->n_inputs != 1 || r->n_outputs != 1 || r->inputs[0]->n_shape != 2 ||
        r->outputs[0]->n_shape != 2 || r->inputs[0]->shape[1] < 1 || r->outputs[0]->shape[1] < 1) {
        tp_err_set(err, TP_EINVAL, "model '%s' is not one [-1, in] -> [-1, out] layer", model);
        goto out;
    }
    l->dtype = tp_dtype_from_wire_name(r->inputs[0]->datatype);
    if ((l->dtype != TP_F32 && l->dtype != TP_F16 && l->dtype != TP_BF16) ||
        strcmp(r->inputs[0]->datatype, r->outputs[0]->datatype) != 0) {
        tp_err_set(err, TP_EINVAL,
                   "model '%s' takes %.16s and returns %.16s; tpclient speaks FP32, FP16 or BF16, "
                   "the same both ways",
                   model, r->inputs[0]->datatype, r->outputs[0]->datatype);
        goto out;
    }
    l->in = r->inputs[0]->shape[1];
    l->out = r->outputs[0]->shape[1];
    l->max_batch = 0;
    for (size_t i = 0; i < r->n_parameters; i++) {
        const Inference__InferParameter *v = r->parameters[i]->value;

        if (strcmp(r->parameters[i]->key, "max_batch") != 0 || !v)
            continue;
        if (v->parameter_choice_case == INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_INT64_PARAM)
            l->max_batch = v->int64_param;
        else if (v->parameter_choice_case ==
                     INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_UINT64_PARAM &&
                 v->uint64_param <= INT64_MAX)
            l->max_batch = (int64_t)v->uint64_param;
        else {
            tp_err_set(err, TP_EINVAL,
                       "model '%s': the server claims a max_batch that is not an integer of "
                       "0 to 2^63 - 1",
                       model);
            goto out;
        }
    }
    if (kserve_check_layout(model, l, err) < 0)
        goto out;
    rc = 0;
out:
    protobuf_c_message_free_unpacked(&r->base, NULL);
    return rc;
}

static const char *const shm_keys[3] = {"shared_memory_region", "shared_memory_byte_size",
                                        "shared_memory_offset"};

/* Fills v with the parameters naming r, in the order of shm_keys: region, byte size and, unless
 * it is 0, offset. Returns how many. */
static size_t shm_params(const struct kserve_shm_ref *r, Inference__InferParameter *v)
{
    for (int i = 0; i < 3; i++)
        inference__infer_parameter__init(&v[i]);
    v[0].parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_STRING_PARAM;
    v[0].string_param = (char *)r->region;
    v[1].parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_INT64_PARAM;
    v[1].int64_param = (int64_t)r->bytes;
    v[2].parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_INT64_PARAM;
    v[2].int64_param = (int64_t)r->offset;
    return r->offset ? 3 : 2;
}

void kserve_request_init(struct kserve_request *q, const char *model, const struct kserve_layout *l,
                         int64_t rows, const void *raw, const struct kserve_shm_ref *in,
                         const struct kserve_shm_ref *out)
{
    inference__model_infer_request__init(&q->req);
    inference__model_infer_request__infer_input_tensor__init(&q->t);
    inference__model_infer_request__infer_requested_output_tensor__init(&q->o);
    q->ts[0] = &q->t;
    q->os[0] = &q->o;
    q->shape[0] = rows;
    q->shape[1] = l->in;
    q->req.model_name = (char *)model;
    q->t.name = "input";
    q->t.datatype = (char *)tp_dtype_wire_name(l->dtype);
    q->t.n_shape = 2;
    q->t.shape = q->shape;
    q->req.n_inputs = 1;
    q->req.inputs = q->ts;
    if (raw) {
        q->raw.len = (size_t)(rows * l->in) * tp_dtype_size(l->dtype);
        q->raw.data = (uint8_t *)raw;
        q->req.n_raw_input_contents = 1;
        q->req.raw_input_contents = &q->raw;
    } else if (in) {
        q->t.n_parameters = shm_params(in, q->pv);
        for (size_t i = 0; i < q->t.n_parameters; i++) {
            inference__model_infer_request__infer_input_tensor__parameters_entry__init(&q->ie[i]);
            q->ie[i].key = (char *)shm_keys[i];
            q->ie[i].value = &q->pv[i];
            q->iep[i] = &q->ie[i];
        }
        q->t.parameters = q->iep;
    }
    if (out) {
        q->o.n_parameters = shm_params(out, q->pv + 3);
        for (size_t i = 0; i < q->o.n_parameters; i++) {
            inference__model_infer_request__infer_requested_output_tensor__parameters_entry__init(
                &q->oe[i]);
            q->oe[i].key = (char *)shm_keys[i];
            q->oe[i].value = &q->pv[3 + i];
            q->oep[i] = &q->oe[i];
        }
        q->o.parameters = q->oep;
        q->o.name = "output";
        q->req.n_outputs = 1;
        q->req.outputs = q->os;
    }
}

int kserve_no_inline_output(const Inference__ModelInferResponse *r)
{
    for (size_t i = 0; i < r->n_raw_output_contents; i++)
        if (r->raw_output_contents[i].len != 0)
            return 0;
    return 1;
}

int kserve_infer(struct conn *c, const char *model, const struct kserve_layout *l, const float *x,
                 int64_t rows, float *y, struct tp_err *err)
{
    struct kserve_request q;
    Inference__ModelInferResponse *r;
    size_t esize = tp_dtype_size(l->dtype), nx, want;
    void *narrow = NULL;
    int rc = -1;

    if (kserve_check_rows(l, rows, err) < 0)
        return -1;
    nx = (size_t)(rows * l->in);
    want = (size_t)(rows * l->out) * esize;
    if (l->dtype != TP_F32) {
        narrow = malloc(nx * esize);
        if (!narrow)
            return tp_err_set(err, TP_ENOMEM, "no memory for %lld rows", (long long)rows);
        tp_convert_from_f32(narrow, x, nx, l->dtype);
    }
    kserve_request_init(&q, model, l, rows, narrow ? narrow : (const void *)x, NULL, NULL);
    rc = conn_call(c, "/inference.GRPCInferenceService/ModelInfer", &q.req.base,
                   &inference__model_infer_response__descriptor, (ProtobufCMessage **)&r, err);
    free(narrow);
    if (rc < 0)
        return -1;
    rc = -1;
    if (r->n_outputs != 1 || strcmp(r->outputs[0]->datatype, q.t.datatype) != 0 ||
        r->outputs[0]->n_shape != 2 || r->outputs[0]->shape[0] != rows ||
        r->outputs[0]->shape[1] != l->out || r->n_raw_output_contents != 1 ||
        r->raw_output_contents[0].len != want) {
        tp_err_set(err, TP_EINTERNAL, "server answered something else than %s [%lld, %lld]",
                   q.t.datatype, (long long)rows, (long long)l->out);
        goto out;
    }
    tp_convert_to_f32(y, r->raw_output_contents[0].data, (size_t)(rows * l->out), l->dtype);
    rc = 0;
out:
    protobuf_c_message_free_unpacked(&r->base, NULL);
    return rc;
}

int kserve_shm_open(struct conn *c, size_t in_bytes, size_t out_bytes, struct kserve_shm *s,
                    struct tp_err *err)
{
    static unsigned seq;
    Inference__SystemSharedMemoryRegisterRequest req =
        INFERENCE__SYSTEM_SHARED_MEMORY_REGISTER_REQUEST__INIT;
    ProtobufCMessage *resp;
    char key[80];
    int fd;

    *s = (struct kserve_shm){.out_off = (in_bytes + 63) / 64 * 64};
    s->size = s->out_off + out_bytes;
    snprintf(s->name, sizeof(s->name), "tpclient-%d-%u", (int)getpid(), seq++);
    snprintf(key, sizeof(key), "/%s", s->name);
    fd = shm_open(key, O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600);
    if (fd < 0)
        return tp_err_sys(err, "creating shared memory %s", key);
    s->created = 1;
    if (ftruncate(fd, (off_t)s->size) < 0) {
        tp_err_sys(err, "sizing shared memory %s to %zu bytes", key, s->size);
        close(fd);
        goto fail;
    }
    s->p = mmap(NULL, s->size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (s->p == MAP_FAILED) {
        s->p = NULL;
        tp_err_sys(err, "mapping shared memory %s", key);
        goto fail;
    }
    req.name = s->name;
    req.key = key;
    req.offset = 0;
    req.byte_size = s->size;
    if (conn_call(c, "/inference.GRPCInferenceService/SystemSharedMemoryRegister", &req.base,
                  &inference__system_shared_memory_register_response__descriptor, &resp, err) < 0) {
        tp_err_prefix(err, "registering shared memory: ");
        goto fail;
    }
    protobuf_c_message_free_unpacked(resp, NULL);
    s->registered = 1;
    return 0;
fail:
    kserve_shm_close(c, s);
    return -1;
}

int kserve_infer_shm(struct conn *c, const char *model, const struct kserve_layout *l,
                     struct kserve_shm *s, const float *x, int64_t rows, float *y,
                     struct tp_err *err)
{
    size_t esize = tp_dtype_size(l->dtype);
    struct kserve_shm_ref in = {.region = s->name}, out = {.region = s->name, .offset = s->out_off};
    struct kserve_request q;
    Inference__ModelInferResponse *r;
    int rc = -1;

    if (kserve_check_rows(l, rows, err) < 0)
        return -1;
    in.bytes = (uint64_t)(rows * l->in) * esize;
    out.bytes = (uint64_t)(rows * l->out) * esize;
    tp_convert_from_f32(s->p, x, (size_t)(rows * l->in), l->dtype);
    kserve_request_init(&q, model, l, rows, NULL, &in, &out);
    if (conn_call(c, "/inference.GRPCInferenceService/ModelInfer", &q.req.base,
                  &inference__model_infer_response__descriptor, (ProtobufCMessage **)&r, err) < 0)
        return -1;
    if (r->n_outputs != 1 || strcmp(r->outputs[0]->datatype, q.t.datatype) != 0 ||
        r->outputs[0]->n_shape != 2 || r->outputs[0]->shape[0] != rows ||
        r->outputs[0]->shape[1] != l->out || !kserve_no_inline_output(r)) {
        tp_err_set(err, TP_EINTERNAL,
                   "server answered something else than %s [%lld, %lld] in shared memory",
                   q.t.datatype, (long long)rows, (long long)l->out);
        goto out;
    }
    tp_convert_to_f32(y, (char *)s->p + s->out_off, (size_t)(rows * l->out), l->dtype);
    rc = 0;
out:
    protobuf_c_message_free_unpacked(&r->base, NULL);
    return rc;
}

void kserve_shm_close(struct conn *c, struct kserve_shm *s)
{
    char key[80];

    if (s->registered) {
        Inference__SystemSharedMemoryUnregisterRequest req =
            INFERENCE__SYSTEM_SHARED_MEMORY_UNREGISTER_REQUEST__INIT;
        ProtobufCMessage *resp;
        struct tp_err err = {0};

        req.name = s->name;
        if (conn_call(c, "/inference.GRPCInferenceService/SystemSharedMemoryUnregister", &req.base,
                      &inference__system_shared_memory_unregister_response__descriptor, &resp,
                      &err) == 0)
            protobuf_c_message_free_unpacked(resp, NULL);
        s->registered = 0;
    }
    if (s->p)
        munmap(s->p, s->size);
    s->p = NULL;
    if (s->created) {
        snprintf(key, sizeof(key), "/%s", s->name);
        shm_unlink(key);
        s->created = 0;
    }
}
