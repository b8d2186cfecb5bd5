/* api.c -- the handlers of tpd's gRPC methods (see api.h). Readiness is one rule everywhere:
 * the worker group is up, every model that is to be served is loaded on it, and the server is not
 * draining. */
#include "api.h"

#include <assert.h>
#include <grpc/status.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "gbuf.h"
#include "grpc_service.pb-c.h"
#include "health.pb-c.h"
#include "infer.h"
#include "log.h"
#include "metrics.h"
#include "plan.h"
#include "reflect.h"

/* A ModelInfer call between the handler and the scheduler's completion. It lives in the call's
 * storage (rpc_call_data), so it stays valid until gRPC is done with the call, after the reply and
 * after any cancel callback. */
struct infer_call {
    struct sched_req req; /* first: complete() gets back to the call from it */
    struct api *api;
    struct repo_model *rm; /* the model it was handed to (NULL before); its gen then: */
    uint64_t gen;          /* valid while the request is in the scheduler, see repo_cancel */
    struct rpc_call *call;
    struct infer_stream *stream; /* ModelStreamInfer: the stream it came on (malloc'd), or NULL */
    struct infer_call *prev, *next; /* on the stream's list while it runs */
    int cancels; /* a stream's cancels of it still in sched_cancel: it must outlive them */
    int done;    /* answered: freed by the last of its cancels */
    Inference__ModelInferRequest *msg; /* the request without its raw_input_contents */
    grpc_byte_buffer *payload;         /* the received message, until its rows are in the slot */
    struct infer_input in;
    struct shmreg_region *in_reg, *out_reg; /* shared-memory regions in use, or NULL */
    struct tp_err fill_err;                 /* the input could not be read from in_reg */
    int64_t t0_ns;                          /* arrival, metrics_now_ns() */
    size_t bytes_in;                        /* request message */
};

int api_ready(struct api *a)
{
    return atomic_load(&a->serving) && !atomic_load(&a->draining) && sup_ready(a->sup) &&
           repo_all_ready(a->repo);
}

static int is_ready(struct api *a)
{
    return api_ready(a);
}

/* Unpacks the request or answers INVALID_ARGUMENT; returns NULL in that case. */
static ProtobufCMessage *unpack_or_reply(struct rpc_call *call, grpc_byte_buffer *payload,
                                         const ProtobufCMessageDescriptor *desc)
{
    struct tp_err err = {0};
    ProtobufCMessage *m;

    if (!payload) {
        rpc_reply(call, GRPC_STATUS_INVALID_ARGUMENT, "request message missing", NULL);
        return NULL;
    }
    if (gbuf_unpack(payload, desc, &m, &err) < 0) {
        rpc_reply_err(call, &err);
        return NULL;
    }
    if (infer_check_strings(payload, desc, &err) < 0) {
        protobuf_c_message_free_unpacked(m, NULL);
        rpc_reply_err(call, &err);
        return NULL;
    }
    return m;
}

static void reply_msg(struct rpc_call *call, const ProtobufCMessage *m)
{
    grpc_byte_buffer *bb = gbuf_pack(m);

    if (bb)
        rpc_reply(call, GRPC_STATUS_OK, NULL, bb);
    else
        rpc_reply(call, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory packing the response", NULL);
}

/* The READY model called name (version "" or ours), held (repo_put); else NULL, the call answered
 * (NOT_FOUND, or UNAVAILABLE for a model that is not ready). */
static struct repo_model *model_or_reply(struct api *a, struct rpc_call *call, const char *name,
                                         const char *version)
{
    struct tp_err err = {0};
    struct repo_model *m = repo_get(a->repo, name, version, &err);

    if (!m)
        rpc_reply_err(call, &err);
    return m;
}

/* Reads a request that names a model (fields name and version): its name and version, copied
 * into name and version; 1, or 0 with the call answered. */
static int model_request(struct rpc_call *call, grpc_byte_buffer *payload,
                         const ProtobufCMessageDescriptor *desc, char name[128], char version[64])
{
    ProtobufCMessage *q = unpack_or_reply(call, payload, desc);
    const ProtobufCFieldDescriptor *fn, *fv;
    const char *n, *v;

    if (!q)
        return 0;
    fn = protobuf_c_message_descriptor_get_field_by_name(desc, "name");
    fv = protobuf_c_message_descriptor_get_field_by_name(desc, "version");
    n = *(char **)((char *)q + fn->offset);
    v = *(char **)((char *)q + fv->offset);
    if (strlen(n) >= 128 || strlen(v) >= 64) {
        protobuf_c_message_free_unpacked(q, NULL);
        rpc_reply(call, GRPC_STATUS_NOT_FOUND, "no such model or version: the name is too long",
                  NULL);
        return 0;
    }
    snprintf(name, 128, "%s", n);
    snprintf(version, 64, "%s", v);
    protobuf_c_message_free_unpacked(q, NULL);
    return 1;
}

static void server_live(void *ctx, struct rpc_call *call, grpc_byte_buffer *payload)
{
    Inference__ServerLiveResponse r = INFERENCE__SERVER_LIVE_RESPONSE__INIT;
    ProtobufCMessage *m =
        unpack_or_reply(call, payload, &inference__server_live_request__descriptor);

    (void)ctx;
    if (!m)
        return;
    protobuf_c_message_free_unpacked(m, NULL);
    r.live = 1;
    reply_msg(call, &r.base);
}

static void server_ready(void *ctx, struct rpc_call *call, grpc_byte_buffer *payload)
{
    Inference__ServerReadyResponse r = INFERENCE__SERVER_READY_RESPONSE__INIT;
    ProtobufCMessage *m =
        unpack_or_reply(call, payload, &inference__server_ready_request__descriptor);

    if (!m)
        return;
    protobuf_c_message_free_unpacked(m, NULL);
    r.ready = is_ready(ctx);
    reply_msg(call, &r.base);
}

static void model_ready(void *ctx, struct rpc_call *call, grpc_byte_buffer *payload)
{
    Inference__ModelReadyResponse r = INFERENCE__MODEL_READY_RESPONSE__INIT;
    struct api *a = ctx;
    char name[128], version[64];
    int ready;

    if (!model_request(call, payload, &inference__model_ready_request__descriptor, name, version))
        return;
    ready = repo_ready(a->repo, name, version);
    if (ready < 0) {
        struct tp_err err;

        tp_err_set(&err, TP_ENOTFOUND, "unknown model '%.64s' or version '%.32s'", name, version);
        rpc_reply_err(call, &err);
        return;
    }
    r.ready = ready && is_ready(a);
    reply_msg(call, &r.base);
}

static void server_metadata(void *ctx, struct rpc_call *call, grpc_byte_buffer *payload)
{
    Inference__ServerMetadataResponse r = INFERENCE__SERVER_METADATA_RESPONSE__INIT;
    ProtobufCMessage *m =
        unpack_or_reply(call, payload, &inference__server_metadata_request__descriptor);

    if (!m)
        return;
    protobuf_c_message_free_unpacked(m, NULL);
    r.name = "tpd";
    r.version = TP_VERSION;
    /* only what is implemented: the ModelConfig RPC, system shared memory, ModelStatistics,
     * the repository's index and, in explicit mode, its loads and unloads */
    r.n_extensions = repo_explicit(((struct api *)ctx)->repo) ? 5 : 4;
    r.extensions = (char *[]){"model_configuration", "system_shared_memory", "statistics",
                              "model_repository", "model_repository(unload_dependents)"};
    reply_msg(call, &r.base);
}

/* One more entry of ModelMetadata's parameters, in e[*n] with its value in v[*n]. */
static Inference__InferParameter *param(Inference__ModelMetadataResponse__ParametersEntry *e,
                                        Inference__InferParameter *v, size_t *n, const char *key)
{
    Inference__InferParameter *p = &v[*n];

    assert(*n < API_METADATA_PARAMS);
    e[*n] = (Inference__ModelMetadataResponse__ParametersEntry)
        INFERENCE__MODEL_METADATA_RESPONSE__PARAMETERS_ENTRY__INIT;
    *p = (Inference__InferParameter)INFERENCE__INFER_PARAMETER__INIT;
    e[*n].key = (char *)key;
    e[(*n)++].value = p;
    return p;
}

static void param_str(Inference__ModelMetadataResponse__ParametersEntry *e,
                      Inference__InferParameter *v, size_t *n, const char *key, const char *val)
{
    Inference__InferParameter *p = param(e, v, n, key);

    p->parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_STRING_PARAM;
    p->string_param = (char *)val;
}

static void param_int(Inference__ModelMetadataResponse__ParametersEntry *e,
                      Inference__InferParameter *v, size_t *n, const char *key, int64_t val)
{
    Inference__InferParameter *p = param(e, v, n, key);

    p->parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_INT64_PARAM;
    p->int64_param = val;
}

static void param_bool(Inference__ModelMetadataResponse__ParametersEntry *e,
                       Inference__InferParameter *v, size_t *n, const char *key, int val)
{
    Inference__InferParameter *p = param(e, v, n, key);

    p->parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_BOOL_PARAM;
    p->bool_param = val;
}

void api_metadata(const struct repo_model *m, struct api_metadata *b)
{
    const struct model *md = &m->model;
    const struct plan *pl = md->plan;
    Inference__ModelMetadataResponse *r = &b->r;
    Inference__InferParameter *pv = b->pv;
    Inference__ModelMetadataResponse__ParametersEntry *e = b->e;
    size_t n = 0;

    *r = (Inference__ModelMetadataResponse)INFERENCE__MODEL_METADATA_RESPONSE__INIT;
    b->in = (Inference__ModelMetadataResponse__TensorMetadata)
        INFERENCE__MODEL_METADATA_RESPONSE__TENSOR_METADATA__INIT;
    b->out = b->in;
    b->ins[0] = &b->in;
    b->outs[0] = &b->out;
    b->in_shape[0] = b->out_shape[0] = -1;
    b->in_shape[1] = md->in;
    b->out_shape[1] = md->out;
    b->versions[0] = MODEL_VERSION;
    r->name = (char *)md->name;
    r->n_versions = 1;
    r->versions = b->versions;
    r->platform = MODEL_PLATFORM;
    b->in.name = MODEL_INPUT;
    b->in.datatype = (char *)tp_dtype_wire_name(md->io_dtype);
    b->in.n_shape = 2;
    b->in.shape = b->in_shape;
    b->out.name = MODEL_OUTPUT;
    b->out.datatype = (char *)tp_dtype_wire_name(md->io_dtype);
    b->out.n_shape = 2;
    b->out.shape = b->out_shape;
    r->n_inputs = r->n_outputs = 1;
    r->inputs = b->ins;
    r->outputs = b->outs;
    param_int(e, pv, &n, "ranks", md->ranks);
    param_str(e, pv, &n, "backend", md->backend);
    param_str(e, pv, &n, "weight_dtype", tp_dtype_file_name(md->wdtype));
    param_bool(e, pv, &n, "bias", md->has_bias);
    param_int(e, pv, &n, "max_batch", md->max_batch);
    param_str(e, pv, &n, "io_dtype", tp_dtype_wire_name(md->io_dtype));
    param_str(e, pv, &n, "gemm_dtype", tp_dtype_wire_name(md->gemm_dtype));
    param_bool(e, pv, &n, "batch_invariant", md->batch_invariant);
    param_str(e, pv, &n, "kind", plan_kind_name((enum plan_kind)pl->kind));
    param_str(e, pv, &n, "block", pl->block);
    param_str(e, pv, &n, "activation", plan_act_name((enum plan_act)pl->act));
    param_int(e, pv, &n, "intermediate", pl->inter);
    param_str(e, pv, &n, "weight_tensor", md->weights);
    param_str(e, pv, &n, "bias_tensor", md->biases);
    param_str(e, pv, &n, "weight_layout", md->layouts);
    param_str(e, pv, &n, "tied_to", pl->lin[0].tied_from);
    param_str(e, pv, &n, "split", md->split_what);
    param_str(e, pv, &n, "shard_rows", md->split);
    for (size_t i = 0; i < n; i++)
        b->ep[i] = &e[i];
    r->n_parameters = n;
    r->parameters = b->ep;
}

static void model_metadata(void *ctx, struct rpc_call *call, grpc_byte_buffer *payload)
{
    struct api_metadata b;
    char name[128], version[64];
    struct repo_model *m;

    if (!model_request(call, payload, &inference__model_metadata_request__descriptor, name,
                       version) ||
        !(m = model_or_reply(ctx, call, name, version)))
        return;
    api_metadata(m, &b);
    reply_msg(call, &b.r.base);
    repo_put(m);
}

static Inference__DataType config_type(enum tp_dtype t)
{
    return t == TP_F16    ? INFERENCE__DATA_TYPE__TYPE_FP16
           : t == TP_BF16 ? INFERENCE__DATA_TYPE__TYPE_BF16
                          : INFERENCE__DATA_TYPE__TYPE_FP32;
}

void api_config(const struct repo_model *m, struct api_config *b)
{
    const struct model *md = &m->model;
    Inference__ModelConfig *mc = &b->mc;

    b->r = (Inference__ModelConfigResponse)INFERENCE__MODEL_CONFIG_RESPONSE__INIT;
    *mc = (Inference__ModelConfig)INFERENCE__MODEL_CONFIG__INIT;
    b->in = (Inference__ModelInput)INFERENCE__MODEL_INPUT__INIT;
    b->out = (Inference__ModelOutput)INFERENCE__MODEL_OUTPUT__INIT;
    b->db = (Inference__ModelDynamicBatching)INFERENCE__MODEL_DYNAMIC_BATCHING__INIT;
    b->ins[0] = &b->in;
    b->outs[0] = &b->out;
    b->in_dims[0] = md->in;
    b->out_dims[0] = md->out;
    mc->name = (char *)md->name;
    mc->platform = MODEL_PLATFORM;
    mc->backend = (char *)md->backend;
    mc->max_batch_size = (int32_t)md->max_batch;
    b->in.name = MODEL_INPUT;
    b->in.data_type = config_type(md->io_dtype);
    b->in.n_dims = 1;
    b->in.dims = b->in_dims;
    b->out.name = MODEL_OUTPUT;
    b->out.data_type = config_type(md->io_dtype);
    b->out.n_dims = 1;
    b->out.dims = b->out_dims;
    mc->n_input = mc->n_output = 1;
    mc->input = b->ins;
    mc->output = b->outs;
    if (m->conf.batch_delay_us) {
        b->db.max_queue_delay_microseconds = m->conf.batch_delay_us;
        mc->scheduling_choice_case = INFERENCE__MODEL_CONFIG__SCHEDULING_CHOICE_DYNAMIC_BATCHING;
        mc->dynamic_batching = &b->db;
    }
    b->r.config = mc;
}

static void model_config(void *ctx, struct rpc_call *call, grpc_byte_buffer *payload)
{
    struct api_config b;
    char name[128], version[64];
    struct repo_model *m;

    if (!model_request(call, payload, &inference__model_config_request__descriptor, name,
                       version) ||
        !(m = model_or_reply(ctx, call, name, version)))
        return;
    api_config(m, &b);
    reply_msg(call, &b.r.base);
    repo_put(m);
}

static void repository_index(void *ctx, struct rpc_call *call, grpc_byte_buffer *payload)
{
    struct api *a = ctx;
    Inference__RepositoryIndexResponse r = INFERENCE__REPOSITORY_INDEX_RESPONSE__INIT;
    Inference__RepositoryIndexResponse__ModelIndex mi[REPO_MAX_MODELS], *mis[REPO_MAX_MODELS];
    Inference__RepositoryIndexRequest *q = (Inference__RepositoryIndexRequest *)unpack_or_reply(
        call, payload, &inference__repository_index_request__descriptor);
    struct repo_entry *e = NULL;
    size_t n = 0;

    if (!q)
        return;
    if (repo_index(a->repo, &e, &n) < 0) {
        rpc_reply(call, GRPC_STATUS_RESOURCE_EXHAUSTED, "no memory for the index", NULL);
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        /* a model that is READY while its workers restart is not ready */
        int ready = e[i].state == REPO_READY && repo_ready(a->repo, e[i].name, "") == 1;

        if (q->ready && !ready)
            continue;
        mi[r.n_models] = (Inference__RepositoryIndexResponse__ModelIndex)
            INFERENCE__REPOSITORY_INDEX_RESPONSE__MODEL_INDEX__INIT;
        mi[r.n_models].name = e[i].name;
        mi[r.n_models].version = MODEL_VERSION;
        mi[r.n_models].state =
            (char *)(e[i].state == REPO_READY && !ready ? "UNAVAILABLE"
                                                        : repo_state_name(e[i].state));
        mi[r.n_models].reason =
            e[i].state == REPO_READY && !ready ? "the workers are restarting" : e[i].reason;
        mis[r.n_models] = &mi[r.n_models];
        r.n_models++;
    }
    r.models = mis;
    reply_msg(call, &r.base);
out:
    free(e);
    protobuf_c_message_free_unpacked(&q->base, NULL);
}

/* Triton's StatisticDuration of d, in sd. */
static Inference__StatisticDuration *duration(Inference__StatisticDuration *sd,
                                              const struct metrics_duration *d)
{
    *sd = (Inference__StatisticDuration)INFERENCE__STATISTIC_DURATION__INIT;
    sd->count = d->count;
    sd->ns = d->ns;
    return sd;
}

/* One model's ModelStatistics, in ms and the memory it points into. */
static int model_stats(int id, const char *name, struct api_model_stats *ms)
{
    struct metrics_stats *st = &ms->st;
    Inference__InferStatistics *is = &ms->is;
    Inference__StatisticDuration *d = ms->d;

    if (metrics_get_stats(id, st) < 0)
        return -1;
    ms->bs = calloc(st->nbatch + 1, sizeof(*ms->bs));
    ms->bsp = calloc(st->nbatch + 1, sizeof(*ms->bsp));
    ms->bd = calloc(st->nbatch + 1, sizeof(*ms->bd));
    if (!ms->bs || !ms->bsp || !ms->bd)
        return -1;
    for (size_t i = 0; i < st->nbatch; i++) {
        Inference__InferBatchStatistics *bs = &ms->bs[i];

        *bs = (Inference__InferBatchStatistics)INFERENCE__INFER_BATCH_STATISTICS__INIT;
        bs->batch_size = st->batch[i].batch_size;
        bs->compute_input = duration(&ms->bd[i][0], &st->batch[i].compute_input);
        bs->compute_infer = duration(&ms->bd[i][1], &st->batch[i].compute_infer);
        bs->compute_output = duration(&ms->bd[i][2], &st->batch[i].compute_output);
        ms->bsp[i] = bs;
    }
    *is = (Inference__InferStatistics)INFERENCE__INFER_STATISTICS__INIT;
    is->success = duration(&d[0], &st->success);
    is->fail = duration(&d[1], &st->fail);
    is->queue = duration(&d[2], &st->queue);
    is->compute_input = duration(&d[3], &st->compute_input);
    is->compute_infer = duration(&d[4], &st->compute_infer);
    is->compute_output = duration(&d[5], &st->compute_output);
    ms->ms = (Inference__ModelStatistics)INFERENCE__MODEL_STATISTICS__INIT;
    snprintf(ms->name, sizeof(ms->name), "%s", name);
    ms->ms.name = ms->name;
    ms->ms.version = MODEL_VERSION;
    ms->ms.last_inference = st->last_inference_ms;
    ms->ms.inference_count = st->inference_count;
    ms->ms.execution_count = st->execution_count;
    ms->ms.inference_stats = is;
    ms->ms.n_batch_stats = st->nbatch;
    ms->ms.batch_stats = ms->bsp;
    return 0;
}

int api_statistics(struct api *a, const char *name, const char *version, struct api_statistics *b,
                   struct tp_err *err)
{
    struct repo_entry *e = NULL;
    size_t n = 0;

    *b = (struct api_statistics){0};
    if (name[0]) {
        struct repo_model *m = repo_get(a->repo, name, version, err);

        if (!m)
            return -1;
        e = calloc(1, sizeof(*e));
        if (e) {
            snprintf(e->name, sizeof(e->name), "%s", name);
            e->state = REPO_READY;
            n = 1;
        }
        repo_put(m);
        if (!e)
            return tp_err_set(err, TP_ENOMEM, "no memory for the statistics");
    } else if (repo_index(a->repo, &e, &n) < 0) {
        free(e);
        return tp_err_set(err, TP_ENOMEM, "no memory for the statistics");
    }
    b->m = calloc(n + 1, sizeof(*b->m));
    b->msp = calloc(n + 1, sizeof(*b->msp));
    if (!b->m || !b->msp) {
        free(e);
        api_statistics_free(b);
        return tp_err_set(err, TP_ENOMEM, "no memory for the statistics");
    }
    for (size_t i = 0; i < n; i++) {
        struct repo_model *m;

        if (e[i].state != REPO_READY || !(m = repo_get(a->repo, e[i].name, "", err)))
            continue; /* every loaded model; one that went meanwhile is left out */
        if (model_stats(m->id, e[i].name, &b->m[b->n]) == 0) {
            b->msp[b->n] = &b->m[b->n].ms;
            b->n++;
        }
        repo_put(m);
    }
    free(e);
    b->r = (Inference__ModelStatisticsResponse)INFERENCE__MODEL_STATISTICS_RESPONSE__INIT;
    b->r.n_model_stats = b->n;
    b->r.model_stats = b->msp;
    *err = (struct tp_err){0};
    return 0;
}

void api_statistics_free(struct api_statistics *b)
{
    for (size_t i = 0; b->m && i <= b->n; i++) {
        free(b->m[i].bs);
        free(b->m[i].bsp);
        free(b->m[i].bd);
        free(b->m[i].st.batch);
    }
    free(b->m);
    free(b->msp);
    *b = (struct api_statistics){0};
}

/* Triton's ModelStatistics, from the metrics (metrics_get_stats): every loaded model when the
 * request names none, else the named one. */
static void model_statistics(void *ctx, struct rpc_call *call, grpc_byte_buffer *payload)
{
    struct api *a = ctx;
    struct api_statistics b;
    struct tp_err err = {0};
    Inference__ModelStatisticsRequest *q = (Inference__ModelStatisticsRequest *)unpack_or_reply(
        call, payload, &inference__model_statistics_request__descriptor);
    int rc;

    if (!q)
        return;
    rc = api_statistics(a, q->name, q->version, &b, &err);
    protobuf_c_message_free_unpacked(&q->base, NULL);
    if (rc < 0) {
        rpc_reply_err(call, &err);
        return;
    }
    reply_msg(call, &b.r.base);
    api_statistics_free(&b);
}

/* A load or unload for a thread of its own. */
struct control_job {
    struct api *a;
    struct rpc_call *call;
    char name[128];
    int load;
};

static void *control_main(void *arg)
{
    struct control_job *j = arg;
    Inference__RepositoryModelLoadResponse lr = INFERENCE__REPOSITORY_MODEL_LOAD_RESPONSE__INIT;
    Inference__RepositoryModelUnloadResponse ur =
        INFERENCE__REPOSITORY_MODEL_UNLOAD_RESPONSE__INIT;
    struct tp_err err = {0};

    if (api_model_control(j->a, j->name, j->load, &err) < 0)
        rpc_reply_err(j->call, &err);
    else
        reply_msg(j->call, j->load ? &lr.base : &ur.base);
    free(j);
    return NULL;
}

/* Runs fn(arg) on a thread of its own, counted until it returns (api_control_wait); -1 when no
 * thread can be made (the caller runs it then). */
struct control_thread {
    struct api *a;
    void *(*fn)(void *);
    void *arg;
};

static void *control_thread_main(void *arg)
{
    struct control_thread t = *(struct control_thread *)arg;

    free(arg);
    t.fn(t.arg);
    atomic_fetch_sub(&t.a->controls, 1);
    return NULL;
}

int api_control_run(struct api *a, void *(*fn)(void *), void *arg)
{
    struct control_thread *t = malloc(sizeof(*t));
    pthread_attr_t attr;
    pthread_t tid;
    int e;

    if (!t)
        return -1;
    *t = (struct control_thread){.a = a, .fn = fn, .arg = arg};
    atomic_fetch_add(&a->controls, 1);
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    e = pthread_create(&tid, &attr, control_thread_main, t);
    pthread_attr_destroy(&attr);
    if (e != 0) {
        atomic_fetch_sub(&a->controls, 1);
        free(t);
        return -1;
    }
    return 0;
}

void api_control_wait(struct api *a)
{
    while (atomic_load(&a->controls) > 0)
        usleep(2000);
}

/* RepositoryModelLoad and RepositoryModelUnload (Triton's model control, "explicit" mode): the
 * call returns once the model is READY or unloaded, or with why not. */
static void model_control(struct api *a, struct rpc_call *call, grpc_byte_buffer *payload, int load)
{
    const ProtobufCMessageDescriptor *desc =
        load ? &inference__repository_model_load_request__descriptor
             : &inference__repository_model_unload_request__descriptor;
    ProtobufCMessage *q = unpack_or_reply(call, payload, desc);
    struct tp_err err = {0};
    const char *name;
    int rc;

    if (!q)
        return;
    name = load ? ((Inference__RepositoryModelLoadRequest *)q)->model_name
                : ((Inference__RepositoryModelUnloadRequest *)q)->model_name;
    rc = 0;
    if (load && ((Inference__RepositoryModelLoadRequest *)q)->n_parameters) {
        tp_err_set(&err, TP_EINVAL,
                   "load parameters (config, files) are not supported: the "
                   "repository's NAME.json describes the model");
        rc = -1;
    }
    /* unload_dependents, which tritonclient always sends, is moot: no model depends on another */
    for (size_t i = 0; !load && i < ((Inference__RepositoryModelUnloadRequest *)q)->n_parameters;
         i++) {
        if (strcmp(((Inference__RepositoryModelUnloadRequest *)q)->parameters[i]->key,
                   "unload_dependents") != 0) {
            tp_err_set(&err, TP_EINVAL, "unknown unload parameter '%.64s'",
                       ((Inference__RepositoryModelUnloadRequest *)q)->parameters[i]->key);
            rc = -1;
        }
    }
    if (rc == 0 && strlen(name) >= sizeof(((struct control_job *)0)->name)) {
        tp_err_set(&err, TP_ENOTFOUND, "no model '%.64s...'", name);
        rc = -1;
    }
    if (rc == 0) {
        struct control_job *j = calloc(1, sizeof(*j));

        if (j) {
            *j = (struct control_job){.a = a, .call = call, .load = load};
            snprintf(j->name, sizeof(j->name), "%s", name);
        }
        protobuf_c_message_free_unpacked(q, NULL);
        if (!j) {
            rpc_reply(call, GRPC_STATUS_RESOURCE_EXHAUSTED, "no memory for the request", NULL);
            return;
        }
        /* a load waits for the workers: not on gRPC's thread, which serves every other call */
        if (api_control_run(a, control_main, j) < 0)
            control_main(j);
        return;
    }
    protobuf_c_message_free_unpacked(q, NULL);
    rpc_reply_err(call, &err);
}

int api_model_control(struct api *a, const char *name, int load, struct tp_err *err)
{
    int rc;

    if (!repo_explicit(a->repo))
        return tp_err_set(err, TP_EUNAVAIL,
                          "explicit model load / unload is not allowed: tpd runs with "
                          "--model-control-mode none");
    if (atomic_load(&a->draining))
        return tp_err_set(err, TP_EUNAVAIL, "tpd is shutting down");
    tp_log(TP_LOG_NOTICE, "%s of model '%.64s' requested", load ? "load" : "unload", name);
    rc = load ? repo_load(a->repo, name, err) : repo_unload(a->repo, name, err);
    api_health_changed(a);
    return rc;
}

static void model_load(void *ctx, struct rpc_call *call, grpc_byte_buffer *payload)
{
    model_control(ctx, call, payload, 1);
}

static void model_unload(void *ctx, struct rpc_call *call, grpc_byte_buffer *payload)
{
    model_control(ctx, call, payload, 0);
}

static void health_check(void *ctx, struct rpc_call *call, grpc_byte_buffer *payload)
{
    Grpc__Health__V1__HealthCheckResponse r = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
    Grpc__Health__V1__HealthCheckRequest *q =
        (Grpc__Health__V1__HealthCheckRequest *)unpack_or_reply(
            call, payload, &grpc__health__v1__health_check_request__descriptor);

    if (!q)
        return;
    if (q->service[0] && strcmp(q->service, "inference.GRPCInferenceService") != 0) {
        rpc_reply(call, GRPC_STATUS_NOT_FOUND,
                  "unknown service; tpd serves '' and 'inference.GRPCInferenceService'", NULL);
    } else {
        r.status = is_ready(ctx)
                       ? GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING
                       : GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING;
        reply_msg(call, &r.base);
    }
    protobuf_c_message_free_unpacked(&q->base, NULL);
}

/* A Watch call: on the api's list until it ends; its storage is the call's (rpc_call_data). */
struct api_watch {
    struct api *api;
    struct rpc_call *call;
    int sent;  /* the status its client was last sent */
    int fixed; /* an unknown service: told once, never again */
    int ended; /* its status went out (rpc_reply): off the list, never touched again */
    struct api_watch *prev, *next;
};

#define UNKNOWN_SERVICE GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVICE_UNKNOWN

static int health_status(struct api *a)
{
    return is_ready(a) ? GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING
                       : GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING;
}

/* Sends w its client's new status. watch_lock held. */
static int watch_send(struct api_watch *w, int status)
{
    Grpc__Health__V1__HealthCheckResponse r = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
    grpc_byte_buffer *bb;
    struct tp_err err = {0};

    r.status = status;
    bb = gbuf_pack(&r.base);
    if (!bb)
        return -1;
    w->sent = status;
    return rpc_stream_send(w->call, bb, &err);
}

static void watch_unlist(struct api_watch *w)
{
    struct api *a = w->api;

    if (w->prev)
        w->prev->next = w->next;
    else if (a->watches == w)
        a->watches = w->next;
    if (w->next)
        w->next->prev = w->prev;
    w->prev = w->next = NULL;
}

/* Ends a watch: off the list, and its status sent, which also lets rpc free the call once gRPC
 * is done with it (a call's storage lives until its status has gone, even after a cancel).
 * watch_lock held, under which every send is made, so none comes after. */
static void watch_end(struct api_watch *w, int status, const char *msg)
{
    if (w->ended)
        return;
    w->ended = 1;
    watch_unlist(w);
    rpc_reply(w->call, status, msg, NULL);
}

/* The client went away (or the call was cancelled). On the call's thread, its storage alive. */
static void watch_cancelled(void *arg)
{
    struct api_watch *w = arg;
    struct api *a = w->api;

    pthread_mutex_lock(&a->watch_lock);
    watch_end(w, GRPC_STATUS_CANCELLED, "the watch was cancelled");
    pthread_mutex_unlock(&a->watch_lock);
}

/* grpc.health.v1.Health/Watch: the current status at once, then every change, until the client
 * goes or tpd drains. An unknown service is SERVICE_UNKNOWN, and stays open, as the health
 * protocol says: the service may appear later (it never does in tpd). */
static void health_watch(void *ctx, struct rpc_call *call, grpc_byte_buffer *payload)
{
    struct api *a = ctx;
    struct api_watch *w;
    Grpc__Health__V1__HealthCheckRequest *q =
        (Grpc__Health__V1__HealthCheckRequest *)unpack_or_reply(
            call, payload, &grpc__health__v1__health_check_request__descriptor);
    int known;

    if (!q)
        return;
    known = !q->service[0] || strcmp(q->service, "inference.GRPCInferenceService") == 0;
    protobuf_c_message_free_unpacked(&q->base, NULL);
    w = rpc_call_data(call, sizeof(*w));
    if (!w) {
        rpc_reply(call, GRPC_STATUS_RESOURCE_EXHAUSTED, "no memory for the watch", NULL);
        return;
    }
    *w = (struct api_watch){.api = a, .call = call};
    pthread_mutex_lock(&a->watch_lock);
    if (a->watches_ended) {
        pthread_mutex_unlock(&a->watch_lock);
        rpc_reply(call, GRPC_STATUS_UNAVAILABLE, "tpd is shutting down", NULL);
        return;
    }
    /* on the list even for an unknown service, which never changes: the drain ends it too */
    w->fixed = !known;
    w->next = a->watches;
    if (a->watches)
        a->watches->prev = w;
    a->watches = w;
    if (watch_send(w, known ? health_status(a) : UNKNOWN_SERVICE) < 0)
        watch_end(w, GRPC_STATUS_UNAVAILABLE, "the watch could not be sent");
    pthread_mutex_unlock(&a->watch_lock);
    rpc_call_on_cancel(call, watch_cancelled, w);
}

void api_health_changed(struct api *a)
{
    int status = health_status(a);

    pthread_mutex_lock(&a->watch_lock);
    for (struct api_watch *w = a->watches, *next; w; w = next) {
        next = w->next;
        if (!w->fixed && w->sent != status && watch_send(w, status) < 0)
            watch_end(w, GRPC_STATUS_RESOURCE_EXHAUSTED,
                      "the watch's client does not read it"); /* rpc cancelled it */
    }
    pthread_mutex_unlock(&a->watch_lock);
}

void api_end_watches(struct api *a)
{
    int status = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING;

    pthread_mutex_lock(&a->watch_lock);
    a->watches_ended = 1;
    while (a->watches) {
        struct api_watch *w = a->watches;

        if (!w->fixed && w->sent != status)
            watch_send(w, status);
        watch_end(w, GRPC_STATUS_UNAVAILABLE, "tpd is shutting down");
    }
    pthread_mutex_unlock(&a->watch_lock);
}

int api_fill_rows(const struct model *m, struct shmreg_region *reg, uint64_t offset,
                  const void *src, uint32_t rows, float *x, struct tp_err *err)
{
    enum tp_dtype dt = m->io_dtype;
    size_t n = (size_t)rows * (size_t)m->in;
    char *narrow = dt == TP_F32 ? (char *)x : (char *)x + 2 * n; /* where raw bytes land */

    if (reg) {
        if (shmreg_read(reg, offset, narrow, n * tp_dtype_size(dt), err) < 0)
            return -1;
        if (dt != TP_F32)
            tp_widen_in_place(x, n, dt);
    } else if (dt == TP_F32)
        memcpy(x, src, n * sizeof(float));
    else
        tp_convert_to_f32(x, src, n, dt);
    return 0;
}

int api_put_rows(const struct model *m, struct shmreg_region *reg, uint64_t offset,
                 const float *y, uint32_t rows, struct tp_err *err)
{
    enum tp_dtype dt = m->io_dtype;
    size_t n = (size_t)rows * (size_t)m->out;

    if (dt != TP_F32)
        tp_convert_from_f32((void *)(uintptr_t)y, y, n, dt);
    return reg ? shmreg_write(reg, offset, y, n * tp_dtype_size(dt), err) : 0;
}

/* Copies the request's rows into its place in the slot: the one copy of the input in tpd, which
 * widens FP16 or BF16 to the workers' FP32 on the way (exactly). Data still in the received
 * slices is first copied into the second half of the rows' room, then widened in place, so no
 * buffer is needed besides the slot. */
static void infer_fill(struct sched_req *req, float *x)
{
    struct infer_call *ic = (struct infer_call *)req;
    const struct model *m = &ic->rm->model;
    enum tp_dtype dt = m->io_dtype;
    size_t n = (size_t)req->rows * (size_t)m->in;

    /* a failed read (the client shrank its object) fails the request when it completes */
    if (ic->in_reg || ic->in.x)
        api_fill_rows(m, ic->in_reg, ic->in.in_offset, ic->in.x, req->rows, x, &ic->fill_err);
    else if (dt == TP_F32)
        gbuf_copy(ic->payload, ic->in.raw_offset, n * sizeof(float), x);
    else {
        gbuf_copy(ic->payload, ic->in.raw_offset, n * tp_dtype_size(dt), (char *)x + 2 * n);
        tp_widen_in_place(x, n, dt);
    }
    if (ic->payload) {
        grpc_byte_buffer_destroy(ic->payload);
        ic->payload = NULL;
    }
}

/* Frees what a ModelInfer call holds besides its storage (which rpc frees). */
static void release_call(struct infer_call *ic)
{
    if (ic->msg)
        protobuf_c_message_free_unpacked(&ic->msg->base, NULL);
    ic->msg = NULL;
    if (ic->payload)
        grpc_byte_buffer_destroy(ic->payload);
    ic->payload = NULL;
    shmreg_release(ic->in_reg);
    shmreg_release(ic->out_reg);
    ic->in_reg = ic->out_reg = NULL;
}

static void unhold(void *hold)
{
    sched_unhold(hold);
}

static void stream_request_done(struct infer_call *ic, grpc_byte_buffer *bb,
                                const struct tp_err *err);

/* Answers the call (or, for a stream's request, on the stream). Everything the call holds is
 * released before rpc_reply: from this thread (not the call's), the call's storage, ic
 * included, may be freed as soon as the reply is sent. */
static void infer_complete(struct sched_req *req, const float *y, const struct tp_err *err)
{
    struct infer_call *ic = (struct infer_call *)req;
    struct rpc_call *call = ic->call;
    grpc_byte_buffer *bb = NULL;
    struct tp_err failed = {0}; /* this request's own failure, found here */
    int64_t t0 = metrics_now_ns(); /* compute_output: from here to the reply's hand-over */

    if (!err && ic->fill_err.code != TP_OK) {
        failed = ic->fill_err;
    } else if (!err && ic->out_reg) {
        /* the output goes to the client's region, narrowed in place in the slot first: the
         * reply carries no data */
        api_put_rows(&ic->rm->model, ic->out_reg, ic->in.out_offset, y, req->rows, &failed);
    }
    if (!err && failed.code != TP_OK) {
        sched_unhold(req->hold); /* computed, but the answer cannot be given */
        err = &failed;
    }
    if (err) {
        struct tp_err e = *err;

        tp_log(TP_LOG_DEBUG, "request '%s' failed: %s", ic->msg->id, err->msg);
        metrics_request_done(ic->msg->model_name, tp_code_grpc(err->code), metrics_since(ic->t0_ns),
                             req->rows, ic->bytes_in, 0);
        if (ic->stream) {
            stream_request_done(ic, NULL, &e);
            return;
        }
        release_call(ic);
        rpc_reply_err(call, &e);
        return;
    }
    if (ic->out_reg) {
        metrics_request_served(sched_slot_index(req->hold), ic->t0_ns, metrics_now_ns() - t0);
        sched_unhold(req->hold);
        bb = infer_response_dims(&ic->rm->model, ic->msg->id, NULL, ic->in.lead, ic->in.nlead, NULL,
                                 NULL);
    } else {
        /* A stream's answer is copied: it may wait behind others for a slow reader, and must
         * not hold a slot meanwhile. So is an answer from the last slot not lent out: a socket
         * write that its client never takes would keep the slot until the connection closes
         * (cancelling the call does not take it back). */
        int copy = ic->stream || !req->keep;

        /* FP16/BF16: narrowed in place, in the slot's rows of this request, which the call holds
         * until gRPC has sent them; so the reply stays zero-copy and needs no buffer */
        api_put_rows(&ic->rm->model, NULL, 0, y, req->rows, NULL);
        /* the reply points at the slot's output; gRPC releases the slot when it is done */
        bb = infer_response_dims(&ic->rm->model, ic->msg->id, y, ic->in.lead, ic->in.nlead,
                                 copy ? NULL : unhold, copy ? NULL : req->hold);
        metrics_request_served(sched_slot_index(req->hold), ic->t0_ns, metrics_now_ns() - t0);
        if (copy || !bb) /* else the reply holds the slot until gRPC has sent it */
            sched_unhold(req->hold);
        if (ic->stream && bb) {
            metrics_request_done(ic->msg->model_name, GRPC_STATUS_OK, metrics_since(ic->t0_ns),
                                 req->rows, ic->bytes_in, grpc_byte_buffer_length(bb));
            stream_request_done(ic, bb, NULL);
            return;
        }
    }
    metrics_request_done(ic->msg->model_name, bb ? GRPC_STATUS_OK : GRPC_STATUS_RESOURCE_EXHAUSTED,
                         metrics_since(ic->t0_ns), req->rows, ic->bytes_in,
                         bb ? grpc_byte_buffer_length(bb) : 0);
    if (ic->stream) { /* an answer in a region, or no memory for one */
        struct tp_err e;

        tp_err_set(&e, TP_ENOMEM, "out of memory packing the response");
        stream_request_done(ic, bb, bb ? NULL : &e);
        return;
    }
    release_call(ic);
    if (bb)
        rpc_reply(call, GRPC_STATUS_OK, NULL, bb);
    else
        rpc_reply(call, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory packing the response", NULL);
}

static void infer_cancelled(void *arg)
{
    struct infer_call *ic = arg;

    if (ic->rm)
        repo_cancel(ic->rm, ic->gen, &ic->req);
}

static int infer_submit_to(struct api *a, struct repo_model *m, struct rpc_call *call,
                           Inference__ModelInferRequest *q, const struct gbuf_field *raw,
                           struct infer_call *ic, struct tp_err *err);

/* Reads one ModelInferRequest into ic (zeroed) and hands it to the scheduler. -1 with err set
 * when it is refused; ic->msg, when the message could be read, stays for the caller's answer
 * (release_call frees it). */
static int infer_submit(struct api *a, struct rpc_call *call, grpc_byte_buffer *payload,
                        struct infer_call *ic, struct tp_err *err)
{
    struct gbuf_field raw;
    Inference__ModelInferRequest *q = NULL;
    struct repo_model *m;
    int rc;

    /* raw_input_contents (field 7) stays in the received slices until it is copied to the slot */
    if (gbuf_unpack_except(payload, &inference__model_infer_request__descriptor, 7,
                           (ProtobufCMessage **)&q, &raw, err) < 0)
        return -1;
    ic->msg = q;
    if (infer_check_strings(payload, &inference__model_infer_request__descriptor, err) < 0)
        return -1;
    /* held while the request goes to its scheduler: an unload waits for that */
    m = repo_get(a->repo, q->model_name, q->model_version, err);
    if (!m) {
        tp_log(TP_LOG_DEBUG, "rejected request '%s': %s", q->id, err->msg);
        return -1;
    }
    ic->rm = m;
    ic->gen = m->gen;
    rc = infer_submit_to(a, m, call, q, &raw, ic, err);
    repo_put(m);
    return rc;
}

/* infer_submit's part once the model is held. */
static int infer_submit_to(struct api *a, struct repo_model *m, struct rpc_call *call,
                           Inference__ModelInferRequest *q, const struct gbuf_field *raw,
                           struct infer_call *ic, struct tp_err *err)
{
    uint64_t esize = tp_dtype_size(m->model.io_dtype);

    if (infer_validate(&m->model, q, raw, &ic->in, err) < 0) {
        tp_log(TP_LOG_DEBUG, "rejected request '%s': %s", q->id, err->msg);
        return -1;
    }
    if (ic->in.in_region &&
        shmreg_acquire(a->shm, ic->in.in_region, ic->in.in_offset,
                       (uint64_t)ic->in.rows * (uint64_t)m->model.in * esize, &ic->in_reg, err) < 0)
        return -1;
    if (ic->in.out_region && shmreg_acquire(a->shm, ic->in.out_region, ic->in.out_offset,
                                            (uint64_t)ic->in.rows * (uint64_t)m->model.out * esize,
                                            &ic->out_reg, err) < 0)
        return -1;
    ic->req = (struct sched_req){.rows = ic->in.rows,
                                 .bytes = ic->bytes_in,
                                 .deadline_ns = rpc_call_deadline_ns(call),
                                 .fill = infer_fill,
                                 .complete = infer_complete};
    if (!ic->in.x && !ic->in_reg)
        ic->payload = rpc_call_take_payload(call);
    tp_log(TP_LOG_DEBUG, "accepted request '%s': %u rows", q->id, ic->in.rows);
    if (sched_submit(m->sched, &ic->req, err) < 0) {
        tp_log(TP_LOG_DEBUG, "request '%s' failed: %s", q->id, err->msg);
        return -1;
    }
    return 0;
}

static void model_infer(void *ctx, struct rpc_call *call, grpc_byte_buffer *payload)
{
    struct api *a = ctx;
    struct infer_call *ic;
    struct tp_err err = {0};
    int64_t t0 = metrics_now_ns();
    size_t bytes_in = payload ? grpc_byte_buffer_length(payload) : 0;

    if (!payload) {
        metrics_request_done(NULL, GRPC_STATUS_INVALID_ARGUMENT, metrics_since(t0), 0, 0, 0);
        rpc_reply(call, GRPC_STATUS_INVALID_ARGUMENT, "request message missing", NULL);
        return;
    }
    ic = rpc_call_data(call, sizeof(*ic));
    if (!ic) {
        metrics_request_done(NULL, GRPC_STATUS_RESOURCE_EXHAUSTED, metrics_since(t0), 0, bytes_in,
                             0);
        rpc_reply(call, GRPC_STATUS_RESOURCE_EXHAUSTED, "no memory for the request", NULL);
        return;
    }
    *ic = (struct infer_call){.api = a, .call = call, .t0_ns = t0, .bytes_in = bytes_in};
    if (infer_submit(a, call, payload, ic, &err) < 0) {
        metrics_request_done(ic->msg ? ic->msg->model_name : NULL, tp_code_grpc(err.code),
                             metrics_since(t0), 0, bytes_in, 0);
        release_call(ic);
        rpc_reply_err(call, &err);
        return;
    }
    rpc_call_on_cancel(call, infer_cancelled, ic);
}

/* ModelStreamInfer: every request of the stream is one infer_call of its own, answered on the
 * stream in order of completion (each answer names its request's id), a refused or failed one
 * with its error_message, which does not end the stream. The stream ends once its client has no
 * more to send and every request is answered, or at a cancel, when every request still running
 * is cancelled. Answers are copied out of the slot, so a slow reader holds memory (at most
 * STREAM_INFLIGHT answers), never a slot. */
#define STREAM_INFLIGHT 16

struct infer_stream {
    struct api *api;
    struct rpc_call *call;
    pthread_mutex_t lock;
    struct infer_call *running; /* accepted, not answered */
    int inflight;
    int half_closed; /* the client has no more to send */
    int cancelled;
    int ended; /* rpc_reply sent: nothing more happens */
};

/* Ends the stream when nothing is left to answer. lock held. */
static void stream_end_if_done(struct infer_stream *st)
{
    if (st->ended || st->inflight || !(st->half_closed || st->cancelled))
        return;
    st->ended = 1;
    rpc_reply(st->call, st->cancelled ? GRPC_STATUS_CANCELLED : GRPC_STATUS_OK,
              st->cancelled ? "the stream was cancelled" : NULL, NULL);
}

/* One answer on the stream: ModelStreamInferResponse{infer_response = bb} (the response is
 * prefixed, not copied), or {error_message, infer_response{model_name, id}}. Takes bb. */
static void stream_answer(struct infer_stream *st, const char *model, const char *id,
                          grpc_byte_buffer *bb, const struct tp_err *err)
{
    Inference__ModelStreamInferResponse r = INFERENCE__MODEL_STREAM_INFER_RESPONSE__INIT;
    Inference__ModelInferResponse ir = INFERENCE__MODEL_INFER_RESPONSE__INIT;
    grpc_byte_buffer *out = NULL;
    struct tp_err e = {0};

    if (bb) {
        size_t len = grpc_byte_buffer_length(bb), n = bb->data.raw.slice_buffer.count;
        uint8_t head[16];
        size_t h = 0;
        grpc_slice *slices = malloc((n + 1) * sizeof(*slices));

        head[h++] = 0x12; /* field 2, length-delimited */
        for (size_t v = len; ; v >>= 7) {
            head[h++] = (uint8_t)(v & 0x7f) | (v >= 0x80 ? 0x80 : 0);
            if (v < 0x80)
                break;
        }
        if (slices) {
            slices[0] = grpc_slice_from_copied_buffer((const char *)head, h);
            memcpy(slices + 1, bb->data.raw.slice_buffer.slices, n * sizeof(*slices));
            out = grpc_raw_byte_buffer_create(slices, n + 1); /* takes its own references */
            grpc_slice_unref(slices[0]);
            free(slices);
        }
        grpc_byte_buffer_destroy(bb);
    } else {
        r.error_message = (char *)err->msg;
        ir.model_name = (char *)(model ? model : "");
        ir.model_version = MODEL_VERSION;
        ir.id = (char *)(id ? id : "");
        r.infer_response = &ir;
        out = gbuf_pack(&r.base);
    }
    if (out)
        rpc_stream_send(st->call, out, &e); /* fails only when the stream is gone */
}

/* A stream's request is done: answered, then off the list. From infer_complete. */
static void stream_request_done(struct infer_call *ic, grpc_byte_buffer *bb,
                                const struct tp_err *err)
{
    struct infer_stream *st = ic->stream;

    pthread_mutex_lock(&st->lock);
    if (!st->cancelled)
        stream_answer(st, ic->msg ? ic->msg->model_name : "", ic->msg ? ic->msg->id : "", bb, err);
    else if (bb)
        grpc_byte_buffer_destroy(bb);
    if (ic->prev)
        ic->prev->next = ic->next;
    else
        st->running = ic->next;
    if (ic->next)
        ic->next->prev = ic->prev;
    st->inflight--;
    release_call(ic);
    ic->done = 1;
    if (!ic->cancels) /* else the last cancel frees it: sched_cancel may still be using it */
        free(ic);
    stream_end_if_done(st);
    pthread_mutex_unlock(&st->lock);
}

/* The client went away or the call was cancelled: every request still running is cancelled
 * (each then completes, and the last one ends the stream). On the call's thread. */
static void stream_cancelled(void *arg)
{
    struct infer_stream *st = arg;
    struct infer_call *ics[STREAM_INFLIGHT];
    int n = 0;

    pthread_mutex_lock(&st->lock);
    st->cancelled = 1;
    for (struct infer_call *ic = st->running; ic && n < STREAM_INFLIGHT; ic = ic->next) {
        ic->cancels++;
        ics[n++] = ic;
    }
    stream_end_if_done(st);
    pthread_mutex_unlock(&st->lock);
    /* outside the lock: a cancel may complete its request at once, which takes the lock */
    for (int i = 0; i < n; i++) {
        int gone;

        if (ics[i]->rm)
            repo_cancel(ics[i]->rm, ics[i]->gen, &ics[i]->req);
        pthread_mutex_lock(&st->lock);
        gone = --ics[i]->cancels == 0 && ics[i]->done;
        pthread_mutex_unlock(&st->lock);
        if (gone)
            free(ics[i]);
    }
}

static void model_stream_infer(void *ctx, struct rpc_call *call, grpc_byte_buffer *payload)
{
    struct api *a = ctx;
    struct infer_stream *st = rpc_call_data(call, sizeof(*st));
    struct infer_call *ic;
    struct tp_err err = {0};
    int64_t t0 = metrics_now_ns();
    size_t bytes_in = payload ? grpc_byte_buffer_length(payload) : 0;
    int busy;

    if (!st) {
        if (!payload)
            rpc_reply(call, GRPC_STATUS_RESOURCE_EXHAUSTED, "no memory for the stream", NULL);
        return; /* no storage: the end of the stream answers */
    }
    if (!st->api) { /* its first message, or its end */
        st->api = a;
        st->call = call;
        pthread_mutex_init(&st->lock, NULL); /* never destroyed: rpc frees the storage */
        rpc_call_on_cancel(call, stream_cancelled, st);
    }
    pthread_mutex_lock(&st->lock);
    if (!payload) {
        st->half_closed = 1;
        stream_end_if_done(st);
        pthread_mutex_unlock(&st->lock);
        return;
    }
    busy = st->inflight >= STREAM_INFLIGHT || st->cancelled || st->ended;
    pthread_mutex_unlock(&st->lock);
    ic = busy ? NULL : calloc(1, sizeof(*ic));
    if (!ic) {
        tp_err_set(&err, busy ? TP_EBUSY : TP_ENOMEM,
                   busy ? "%d requests of this stream are running already: wait for their "
                          "answers"
                        : "no memory for the request",
                   STREAM_INFLIGHT);
        metrics_request_done(NULL, tp_code_grpc(err.code), metrics_since(t0), 0, bytes_in, 0);
        pthread_mutex_lock(&st->lock);
        if (!st->ended)
            stream_answer(st, NULL, NULL, NULL, &err);
        pthread_mutex_unlock(&st->lock);
        return;
    }
    *ic = (struct infer_call){
        .api = a, .call = call, .stream = st, .t0_ns = t0, .bytes_in = bytes_in};
    /* on the list before the scheduler may complete it */
    pthread_mutex_lock(&st->lock);
    ic->next = st->running;
    if (st->running)
        st->running->prev = ic;
    st->running = ic;
    st->inflight++;
    pthread_mutex_unlock(&st->lock);
    if (infer_submit(a, call, payload, ic, &err) < 0) {
        metrics_request_done(ic->msg ? ic->msg->model_name : NULL, tp_code_grpc(err.code),
                             metrics_since(t0), 0, bytes_in, 0);
        stream_request_done(ic, NULL, &err);
    }
}

static void shm_status(void *ctx, struct rpc_call *call, grpc_byte_buffer *payload)
{
    struct api *a = ctx;
    Inference__SystemSharedMemoryStatusResponse r =
        INFERENCE__SYSTEM_SHARED_MEMORY_STATUS_RESPONSE__INIT;
    Inference__SystemSharedMemoryStatusRequest *q =
        (Inference__SystemSharedMemoryStatusRequest *)unpack_or_reply(
            call, payload, &inference__system_shared_memory_status_request__descriptor);
    struct shmreg_info *info = NULL;
    Inference__SystemSharedMemoryStatusResponse__RegionStatus *st = NULL;
    Inference__SystemSharedMemoryStatusResponse__RegionsEntry *e = NULL, **ep = NULL;
    size_t n;

    if (!q)
        return;
    info = calloc(SHMREG_MAX_REGIONS, sizeof(*info));
    st = calloc(SHMREG_MAX_REGIONS, sizeof(*st));
    e = calloc(SHMREG_MAX_REGIONS, sizeof(*e));
    ep = calloc(SHMREG_MAX_REGIONS, sizeof(*ep));
    if (!info || !st || !e || !ep) {
        rpc_reply(call, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory", NULL);
        goto out;
    }
    n = shmreg_status(a->shm, q->name, info, SHMREG_MAX_REGIONS);
    if (q->name[0] && n == 0) {
        struct tp_err err;

        tp_err_set(&err, TP_ENOTFOUND, "no shared-memory region '%.100s'", q->name);
        rpc_reply_err(call, &err);
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        inference__system_shared_memory_status_response__region_status__init(&st[i]);
        inference__system_shared_memory_status_response__regions_entry__init(&e[i]);
        st[i].name = info[i].name;
        st[i].key = info[i].key;
        st[i].offset = info[i].offset;
        st[i].byte_size = info[i].byte_size;
        e[i].key = info[i].name;
        e[i].value = &st[i];
        ep[i] = &e[i];
    }
    r.n_regions = n;
    r.regions = ep;
    reply_msg(call, &r.base);
out:
    free(info);
    free(st);
    free(e);
    free(ep);
    protobuf_c_message_free_unpacked(&q->base, NULL);
}

static void shm_register(void *ctx, struct rpc_call *call, grpc_byte_buffer *payload)
{
    struct api *a = ctx;
    Inference__SystemSharedMemoryRegisterResponse r =
        INFERENCE__SYSTEM_SHARED_MEMORY_REGISTER_RESPONSE__INIT;
    Inference__SystemSharedMemoryRegisterRequest *q =
        (Inference__SystemSharedMemoryRegisterRequest *)unpack_or_reply(
            call, payload, &inference__system_shared_memory_register_request__descriptor);
    struct tp_err err = {0};

    if (!q)
        return;
    if (shmreg_register(a->shm, q->name, q->key, q->offset, q->byte_size, &err) < 0) {
        rpc_reply_err(call, &err);
    } else {
        tp_log(TP_LOG_INFO, "registered shared-memory region '%s': %llu bytes at %llu of '%s'",
               q->name, (unsigned long long)q->byte_size, (unsigned long long)q->offset, q->key);
        reply_msg(call, &r.base);
    }
    protobuf_c_message_free_unpacked(&q->base, NULL);
}

static void shm_unregister(void *ctx, struct rpc_call *call, grpc_byte_buffer *payload)
{
    struct api *a = ctx;
    Inference__SystemSharedMemoryUnregisterResponse r =
        INFERENCE__SYSTEM_SHARED_MEMORY_UNREGISTER_RESPONSE__INIT;
    Inference__SystemSharedMemoryUnregisterRequest *q =
        (Inference__SystemSharedMemoryUnregisterRequest *)unpack_or_reply(
            call, payload, &inference__system_shared_memory_unregister_request__descriptor);
    struct tp_err err = {0};

    if (!q)
        return;
    if (shmreg_unregister(a->shm, q->name, &err) < 0) {
        rpc_reply_err(call, &err);
    } else {
        tp_log(TP_LOG_INFO, "unregistered shared-memory region%s '%s'", q->name[0] ? "" : "s",
               q->name[0] ? q->name : "(all)");
        reply_msg(call, &r.base);
    }
    protobuf_c_message_free_unpacked(&q->base, NULL);
}

/* tpd registers no CUDA shared memory (CudaSharedMemoryRegister stays UNIMPLEMENTED), so there
 * is never one to unregister; as with system regions, unregistering an unknown name is not an
 * error (as upstream). Clients that clean up every kind of region at exit, as perf_analyzer does,
 * need this to succeed. */
static void cuda_shm_unregister(void *ctx, struct rpc_call *call, grpc_byte_buffer *payload)
{
    Inference__CudaSharedMemoryUnregisterResponse r =
        INFERENCE__CUDA_SHARED_MEMORY_UNREGISTER_RESPONSE__INIT;
    Inference__CudaSharedMemoryUnregisterRequest *q =
        (Inference__CudaSharedMemoryUnregisterRequest *)unpack_or_reply(
            call, payload, &inference__cuda_shared_memory_unregister_request__descriptor);

    (void)ctx;
    if (!q)
        return;
    reply_msg(call, &r.base);
    protobuf_c_message_free_unpacked(&q->base, NULL);
}

const struct rpc_method api_methods[] = {
    {.path = "/inference.GRPCInferenceService/ServerLive", .handler = server_live},
    {.path = "/inference.GRPCInferenceService/ServerReady", .handler = server_ready},
    {.path = "/inference.GRPCInferenceService/ModelReady", .handler = model_ready},
    {.path = "/inference.GRPCInferenceService/ServerMetadata", .handler = server_metadata},
    {.path = "/inference.GRPCInferenceService/ModelMetadata", .handler = model_metadata},
    {.path = "/inference.GRPCInferenceService/ModelInfer", .handler = model_infer},
    {.path = "/inference.GRPCInferenceService/ModelStreamInfer",
     .handler = model_stream_infer,
     .client_stream = 1,
     .stream_queue = STREAM_INFLIGHT + 1},
    {.path = "/inference.GRPCInferenceService/RepositoryIndex", .handler = repository_index},
    {.path = "/inference.GRPCInferenceService/RepositoryModelLoad", .handler = model_load},
    {.path = "/inference.GRPCInferenceService/RepositoryModelUnload", .handler = model_unload},
    {.path = "/inference.GRPCInferenceService/ModelConfig", .handler = model_config},
    {.path = "/inference.GRPCInferenceService/ModelStatistics", .handler = model_statistics},
    {.path = "/grpc.health.v1.Health/Check", .handler = health_check},
    {.path = "/grpc.health.v1.Health/Watch", .handler = health_watch},
    {.path = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
     .handler = reflect_info,
     .client_stream = 1},
    {.path = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
     .handler = reflect_info,
     .client_stream = 1},
    {.path = "/inference.GRPCInferenceService/SystemSharedMemoryStatus", .handler = shm_status},
    {.path = "/inference.GRPCInferenceService/SystemSharedMemoryRegister", .handler = shm_register},
    {.path = "/inference.GRPCInferenceService/SystemSharedMemoryUnregister",
     .handler = shm_unregister},
    {.path = "/inference.GRPCInferenceService/CudaSharedMemoryUnregister",
     .handler = cuda_shm_unregister},
};

const int api_nmethods = sizeof(api_methods) / sizeof(api_methods[0]);
