/* cmd_metadata.c -- `tpclient metadata`: the model's name, tensors and parallel layout, one
 * "key: value" line each. */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "cmd.h"
#include "grpc_service.pb-c.h"
#include "kserve.h"

static void print_tensor(const char *kind,
                         const Inference__ModelMetadataResponse__TensorMetadata *t)
{
    printf("%s: %s [", kind, t->name);
    for (size_t i = 0; i < t->n_shape; i++)
        printf("%s%" PRId64, i ? ", " : "", t->shape[i]);
    printf("] %s\n", t->datatype);
}

int cmd_metadata(struct conn *c, int argc, char **argv)
{
    Inference__ModelMetadataRequest q = INFERENCE__MODEL_METADATA_REQUEST__INIT;
    Inference__ServerMetadataRequest sq = INFERENCE__SERVER_METADATA_REQUEST__INIT;
    Inference__ServerMetadataResponse *s;
    Inference__ModelMetadataResponse *r;
    struct tp_err err = {0};
    const char *model_opt = NULL;
    char model[256];

    if (cmd_model_option(argc, argv, &model_opt) < 0)
        return EXIT_USAGE;
    if (conn_call(c, "/inference.GRPCInferenceService/ServerMetadata", &sq.base,
                  &inference__server_metadata_response__descriptor, (ProtobufCMessage **)&s,
                  &err) < 0)
        goto fail;
    printf("server: %s %s\n", s->name, s->version);
    protobuf_c_message_free_unpacked(&s->base, NULL);
    if (kserve_model(c, model_opt, model, sizeof(model), &err) < 0)
        goto fail;
    q.name = model;
    if (conn_call(c, "/inference.GRPCInferenceService/ModelMetadata", &q.base,
                  &inference__model_metadata_response__descriptor, (ProtobufCMessage **)&r,
                  &err) < 0)
        goto fail;
    printf("model: %s\n", r->name);
    printf("platform: %s\n", r->platform);
    for (size_t i = 0; i < r->n_inputs; i++)
        print_tensor("input", r->inputs[i]);
    for (size_t i = 0; i < r->n_outputs; i++)
        print_tensor("output", r->outputs[i]);
    for (size_t i = 0; i < r->n_parameters; i++) {
        const Inference__InferParameter *v = r->parameters[i]->value;

        if (!v)
            continue;
        printf("%s: ", r->parameters[i]->key);
        switch (v->parameter_choice_case) {
        case INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_BOOL_PARAM:
            printf("%s\n", v->bool_param ? "true" : "false");
            break;
        case INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_INT64_PARAM:
            printf("%" PRId64 "\n", v->int64_param);
            break;
        case INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_STRING_PARAM:
            printf("%s\n", v->string_param);
            break;
        default: printf("?\n");
        }
    }
    protobuf_c_message_free_unpacked(&r->base, NULL);
    return 0;
fail:
    cmd_error("%s", err.msg);
    return EXIT_ERROR;
}
