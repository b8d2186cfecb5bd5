/* cmd_health.c -- `tpclient health`: ServerLive, ServerReady and ModelReady in one report (of
 * --model, or of the server's one model; a server of several models without --model gets its
 * repository's index instead, one line per model). Exit 0 when all are true, 3 when the server
 * answers but is not ready, 1 when it cannot be asked. */
#include <stdio.h>
#include <string.h>

#include "cmd.h"
#include "grpc_service.pb-c.h"
#include "kserve.h"

int cmd_health(struct conn *c, int argc, char **argv)
{
    Inference__ServerLiveRequest lq = INFERENCE__SERVER_LIVE_REQUEST__INIT;
    Inference__ServerReadyRequest rq = INFERENCE__SERVER_READY_REQUEST__INIT;
    Inference__ModelReadyRequest mq = INFERENCE__MODEL_READY_REQUEST__INIT;
    Inference__ServerLiveResponse *live;
    Inference__ServerReadyResponse *ready;
    Inference__ModelReadyResponse *mready;
    struct tp_err err = {0};
    const char *model_opt = NULL;
    char model[256];
    int ok;

    if (cmd_model_option(argc, argv, &model_opt) < 0)
        return EXIT_USAGE;
    if (conn_call(c, "/inference.GRPCInferenceService/ServerLive", &lq.base,
                  &inference__server_live_response__descriptor, (ProtobufCMessage **)&live,
                  &err) < 0)
        goto fail;
    printf("server live: %s\n", live->live ? "true" : "false");
    ok = live->live;
    protobuf_c_message_free_unpacked(&live->base, NULL);
    if (conn_call(c, "/inference.GRPCInferenceService/ServerReady", &rq.base,
                  &inference__server_ready_response__descriptor, (ProtobufCMessage **)&ready,
                  &err) < 0)
        goto fail;
    printf("server ready: %s\n", ready->ready ? "true" : "false");
    ok = ok && ready->ready;
    protobuf_c_message_free_unpacked(&ready->base, NULL);
    if (!model_opt) {
        Inference__RepositoryIndexRequest iq = INFERENCE__REPOSITORY_INDEX_REQUEST__INIT;
        Inference__RepositoryIndexResponse *idx;

        if (conn_call(c, "/inference.GRPCInferenceService/RepositoryIndex", &iq.base,
                      &inference__repository_index_response__descriptor, (ProtobufCMessage **)&idx,
                      &err) < 0)
            goto fail;
        if (idx->n_models != 1) {
            for (size_t i = 0; i < idx->n_models; i++)
                printf("model %s: %s%s%s\n", idx->models[i]->name, idx->models[i]->state,
                       idx->models[i]->reason[0] ? ": " : "", idx->models[i]->reason);
            protobuf_c_message_free_unpacked(&idx->base, NULL);
            return ok ? 0 : EXIT_NOT_READY;
        }
        snprintf(model, sizeof(model), "%s", idx->models[0]->name);
        protobuf_c_message_free_unpacked(&idx->base, NULL);
    } else if (kserve_model(c, model_opt, model, sizeof(model), &err) < 0) {
        goto fail;
    }
    mq.name = model;
    if (conn_call(c, "/inference.GRPCInferenceService/ModelReady", &mq.base,
                  &inference__model_ready_response__descriptor, (ProtobufCMessage **)&mready,
                  &err) < 0)
        goto fail;
    printf("model %s ready: %s\n", model, mready->ready ? "true" : "false");
    ok = ok && mready->ready;
    protobuf_c_message_free_unpacked(&mready->base, NULL);
    return ok ? 0 : EXIT_NOT_READY;
fail:
    cmd_error("%s", err.msg);
    return EXIT_ERROR;
}
