/* kserve.c -- ModelMetadata and ModelInfer as tpclient uses them (see kserve.h). */
#include "kserve.h"

#include <stdio.h>
#include <string.h>

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
        r->outputs[0]->n_shape != 2 || strcmp(r->inputs[0]->datatype, "FP32") != 0 ||
        r->inputs[0]->shape[1] < 1 || r->outputs[0]->shape[1] < 1) {
        tp_err_set(err, TP_EINVAL, "model '%s' is not one FP32 [-1, in] -> [-1, out] layer", model);
        goto out;
    }
    l->in = r->inputs[0]->shape[1];
    l->out = r->outputs[0]->shape[1];
    l->max_batch = 0;
    for (size_t i = 0; i < r->n_parameters; i++)
        if (strcmp(r->parameters[i]->key, "max_batch") == 0 && r->parameters[i]->value)
            l->max_batch = r->parameters[i]->value->int64_param;
    rc = 0;
out:
    protobuf_c_message_free_unpacked(&r->base, NULL);
    return rc;
}

int kserve_infer(struct conn *c, const char *model, const struct kserve_layout *l, const float *x,
                 int64_t rows, float *y, struct tp_err *err)
{
    Inference__ModelInferRequest req = INFERENCE__MODEL_INFER_REQUEST__INIT;
    Inference__ModelInferRequest__InferInputTensor t =
        INFERENCE__MODEL_INFER_REQUEST__INFER_INPUT_TENSOR__INIT;
    Inference__ModelInferRequest__InferInputTensor *ts[1] = {&t};
    Inference__ModelInferResponse *r;
    int64_t shape[2] = {rows, l->in};
    ProtobufCBinaryData raw = {.len = (size_t)(rows * l->in) * 4, .data = (uint8_t *)x};
    size_t want = (size_t)(rows * l->out) * 4;
    int rc = -1;

    req.model_name = (char *)model;
    t.name = "input";
    t.datatype = "FP32";
    t.n_shape = 2;
    t.shape = shape;
    req.n_inputs = 1;
    req.inputs = ts;
    req.n_raw_input_contents = 1;
    req.raw_input_contents = &raw;
    if (conn_call(c, "/inference.GRPCInferenceService/ModelInfer", &req.base,
                  &inference__model_infer_response__descriptor, (ProtobufCMessage **)&r, err) < 0)
        return -1;
    if (r->n_outputs != 1 || strcmp(r->outputs[0]->datatype, "FP32") != 0 ||
        r->outputs[0]->n_shape != 2 || r->outputs[0]->shape[0] != rows ||
        r->outputs[0]->shape[1] != l->out || r->n_raw_output_contents != 1 ||
        r->raw_output_contents[0].len != want) {
        tp_err_set(err, TP_EINTERNAL, "server answered something else than FP32 [%lld, %lld]",
                   (long long)rows, (long long)l->out);
        goto out;
    }
    memcpy(y, r->raw_output_contents[0].data, want);
    rc = 0;
out:
    protobuf_c_message_free_unpacked(&r->base, NULL);
    return rc;
}
