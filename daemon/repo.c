/* repo.c -- the models tpd serves (see repo.h). One mutex guards the table: states, reasons and
 * holds; it is never held across a load, an unload or a wait for the workers, so a slow load of
 * one model never holds up the requests to the others. A model being loaded or unloaded is
 * marked LOADING or UNLOADING, which keeps a second load or unload of it away. */
#include "repo.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "log.h"
#include "metrics.h"
#include "proc.h"

#define MAX_FILE_BYTES (1 << 20) /* a model's NAME.json */
#define UNLOAD_POLL_US 2000

struct repo {
    struct repo_config c;
    char dir[PATH_MAX];
    struct sup *sup;
    pthread_mutex_t lock;
    uint8_t slot_used[REPO_MAX_SLOTS];
    struct repo_model m[REPO_MAX_MODELS];
};

const char *repo_state_name(enum repo_state s)
{
    switch (s) {
    case REPO_LOADING: return "LOADING";
    case REPO_READY: return "READY";
    case REPO_UNLOADING: return "UNLOADING";
    case REPO_UNAVAILABLE: break;
    }
    return "UNAVAILABLE";
}

int repo_create(struct repo **out, const struct repo_config *c, struct tp_err *err)
{
    struct repo *r = calloc(1, sizeof(*r));

    *out = NULL;
    if (!r)
        return tp_err_set(err, TP_ENOMEM, "no memory for the model repository");
    r->c = *c;
    if (c->dir)
        snprintf(r->dir, sizeof(r->dir), "%s", c->dir);
    r->c.dir = c->dir ? r->dir : NULL;
    pthread_mutex_init(&r->lock, NULL);
    for (int i = 0; i < REPO_MAX_MODELS; i++) {
        r->m[i] = (struct repo_model){.repo = r, .id = i, .arena = {.fd = -1}};
        pthread_mutex_init(&r->m[i].cancel_lock, NULL);
    }
    *out = r;
    return 0;
}

void repo_attach(struct repo *r, struct sup *sup)
{
    r->sup = sup;
}

int repo_explicit(const struct repo *r)
{
    return r->c.control_explicit;
}

/* The entry called name, or NULL. Lock held. */
static struct repo_model *find(struct repo *r, const char *name)
{
    for (int i = 0; i < REPO_MAX_MODELS; i++)
        if (r->m[i].known && strcmp(r->m[i].conf.name, name) == 0)
            return &r->m[i];
    return NULL;
}

/* -- a model's file ------------------------------------------------------------------------ */

/* A name tpd serves: what a URL path segment and a file name can carry unquoted. */
static int name_ok(const char *s, size_t n)
{
    if (n == 0 || n >= sizeof(((struct repo_conf *)0)->name) || s[0] == '.')
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!(s[i] >= 'a' && s[i] <= 'z') && !(s[i] >= 'A' && s[i] <= 'Z') &&
            !(s[i] >= '0' && s[i] <= '9') && !strchr("-_.", s[i]))
            return 0;
    return 1;
}

static int get_string(const cJSON *o, const char *key, char *dst, size_t len, struct tp_err *err)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);

    if (!v)
        return 0;
    if (!cJSON_IsString(v) || !v->valuestring[0])
        return tp_err_set(err, TP_EINVAL, "'%s' must be a non-empty string", key);
    if (strlen(v->valuestring) >= len)
        return tp_err_set(err, TP_EINVAL, "'%s' is longer than %zu bytes", key, len - 1);
    snprintf(dst, len, "%s", v->valuestring);
    return 0;
}

static int get_uint(const cJSON *o, const char *key, uint32_t lo, uint32_t hi, uint32_t *dst,
                    struct tp_err *err)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);

    if (!v)
        return 0;
    if (!cJSON_IsNumber(v) || v->valuedouble != (double)(long long)v->valuedouble ||
        v->valuedouble < lo || v->valuedouble > hi)
        return tp_err_set(err, TP_EINVAL, "'%s' must be a whole number from %u to %u", key, lo, hi);
    *dst = (uint32_t)v->valuedouble;
    return 0;
}

static int get_bool(const cJSON *o, const char *key, int *dst, struct tp_err *err)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);

    if (!v)
        return 0;
    if (!cJSON_IsBool(v))
        return tp_err_set(err, TP_EINVAL, "'%s' must be true or false", key);
    *dst = cJSON_IsTrue(v);
    return 0;
}

/* The whole file at path, NUL-terminated, at most limit bytes: *text is malloc'ed. */
static int read_file(const char *path, size_t limit, char **text, size_t *len, struct tp_err *err)
{
    FILE *f = fopen(path, "re");
    char *buf;
    size_t n;

    *text = NULL;
    if (!f)
        return tp_err_sys(err, "%s", path);
    buf = malloc(limit + 1);
    if (!buf) {
        fclose(f);
        return tp_err_set(err, TP_ENOMEM, "%s: no memory to read it", path);
    }
    n = fread(buf, 1, limit + 1, f);
    if (ferror(f) || n > limit) {
        int e = ferror(f);

        fclose(f);
        free(buf);
        return e ? tp_err_sys(err, "%s", path)
                 : tp_err_set(err, TP_EINVAL, "%s: larger than %zu bytes", path, limit);
    }
    fclose(f);
    buf[n] = '\0';
    *text = buf;
    *len = n;
    return 0;
}

/* Reads dir/NAME.json into c (over the defaults): the keys of docs/repository.md, every other
 * one refused, so that a misspelt key is not silently a default. */
static int read_conf(const struct repo *r, const char *name, struct repo_conf *c,
                     struct tp_err *err)
{
    static const char *const keys[] = {"weights",      "weight",         "bias",  "no_bias",
                                       "parallel",     "block",          "act",   "layout",
                                       "io_dtype",     "max_batch",      "slots", "max_queue",
                                       "max_queue_mb", "batch_delay_us", NULL};
    char path[PATH_MAX + 160], sval[64];
    char *text = NULL;
    size_t len = 0;
    cJSON *o = NULL;
    const cJSON *it;
    int rc = -1;

    *c = r->c.defaults;
    c->weights[0] = '\0';
    snprintf(c->name, sizeof(c->name), "%s", name);
    snprintf(path, sizeof(path), "%s/%s.json", r->dir, name);
    if (read_file(path, MAX_FILE_BYTES, &text, &len, err) < 0)
        return -1;
    o = cJSON_ParseWithLength(text, len);
    if (!o || !cJSON_IsObject(o)) {
        tp_err_set(err, TP_EINVAL, "%s: not a JSON object", path);
        goto out;
    }
    cJSON_ArrayForEach(it, o)
    {
        int known = 0;

        for (int i = 0; keys[i]; i++)
            known |= it->string && strcmp(it->string, keys[i]) == 0;
        if (!known) {
            tp_err_set(err, TP_EINVAL, "%s: unknown key '%.64s' (docs/repository.md lists them)",
                       path, it->string ? it->string : "");
            goto out;
        }
    }
    if (get_string(o, "weights", c->weights, sizeof(c->weights), err) < 0 ||
        get_string(o, "weight", c->weight, sizeof(c->weight), err) < 0 ||
        get_string(o, "bias", c->bias, sizeof(c->bias), err) < 0 ||
        get_string(o, "block", c->block, sizeof(c->block), err) < 0 ||
        get_bool(o, "no_bias", &c->no_bias, err) < 0 ||
        get_uint(o, "max_batch", 1, 1 << 20, &c->max_batch, err) < 0 ||
        get_uint(o, "slots", 1, 64, &c->slots, err) < 0 ||
        get_uint(o, "max_queue", 1, 1 << 20, &c->max_queue, err) < 0 ||
        get_uint(o, "max_queue_mb", 0, 1 << 20, &c->max_queue_mb, err) < 0 ||
        get_uint(o, "batch_delay_us", 0, 10000000, &c->batch_delay_us, err) < 0)
        goto fail;
    sval[0] = '\0';
    if (get_string(o, "parallel", sval, sizeof(sval), err) < 0)
        goto fail;
    if (sval[0] && strcmp(sval, "row") != 0 && strcmp(sval, "column") != 0) {
        tp_err_set(err, TP_EINVAL, "'parallel' is column or row, got '%s'", sval);
        goto fail;
    }
    c->row = strcmp(sval, "row") == 0;
    sval[0] = '\0';
    if (get_string(o, "layout", sval, sizeof(sval), err) < 0)
        goto fail;
    if (sval[0]) {
        enum plan_layout l;

        if (plan_layout_from_name(sval, &l) < 0) {
            tp_err_set(err, TP_EINVAL, "'layout' is auto, linear or conv1d, got '%s'", sval);
            goto fail;
        }
        c->layout = (int)l;
    }
    sval[0] = '\0';
    if (get_string(o, "act", sval, sizeof(sval), err) < 0)
        goto fail;
    if (sval[0] && (c->act = plan_act_from_name(sval)) == PLAN_ACT_AUTO) {
        tp_err_set(err, TP_EINVAL, "'act' is silu, gelu, gelu_tanh or relu, got '%s'", sval);
        goto fail;
    }
    sval[0] = '\0';
    if (get_string(o, "io_dtype", sval, sizeof(sval), err) < 0)
        goto fail;
    if (sval[0] && (c->io_dtype = tp_dtype_from_flag(sval)) == TP_DTYPE_INVALID) {
        tp_err_set(err, TP_EINVAL, "'io_dtype' is fp32, fp16 or bf16, got '%s'", sval);
        goto fail;
    }
    if (!c->weights[0]) {
        tp_err_set(err, TP_EINVAL, "'weights' (the checkpoint) is missing");
        goto fail;
    }
    if (c->block[0] && (cJSON_GetObjectItemCaseSensitive(o, "weight") || c->bias[0] || c->row)) {
        tp_err_set(err, TP_EINVAL,
                   "'block' serves a whole MLP block: it takes no weight, bias "
                   "or parallel");
        goto fail;
    }
    if (!c->block[0] && c->act != PLAN_ACT_AUTO) {
        tp_err_set(err, TP_EINVAL, "'act' is a block's activation: give 'block'");
        goto fail;
    }
    if (c->bias[0] && c->no_bias) {
        tp_err_set(err, TP_EINVAL, "'bias' and 'no_bias' are exclusive");
        goto fail;
    }
    /* a relative checkpoint path is the repository's */
    if (c->weights[0] != '/') {
        char full[PATH_MAX];

        if ((size_t)snprintf(full, sizeof(full), "%s/%s", r->dir, c->weights) >= sizeof(full)) {
            tp_err_set(err, TP_EINVAL, "'weights': path too long");
            goto fail;
        }
        snprintf(c->weights, sizeof(c->weights), "%s", full);
    }
    rc = 0;
    goto out;
fail:
    tp_err_prefix(err, "%s: ", path);
out:
    cJSON_Delete(o);
    free(text);
    return rc;
}

/* -- planning ------------------------------------------------------------------------------ */

/* Appends ",item" (or "item" first) to a list of a model's layers. */
static void join(char *buf, size_t len, int first, const char *item)
{
    size_t n = strlen(buf);

    snprintf(buf + n, len - n, "%s%s", first ? "" : ",", item);
}

/* Plans model m by its conf from the checkpoint's headers and describes it (m->model, m->plan),
 * logging what was decided when log is set. -1 with err when the checkpoint cannot be served, -2
 * when the settings cannot (a split that leaves a rank nothing, a batch too large). */
static int describe(struct repo *r, struct repo_model *m, int log, struct tp_err *err)
{
    const struct repo_conf *c = &m->conf;
    char notes[2048], *line, *save = NULL;
    struct plan *p = &m->plan;
    struct model *md = &m->model;
    int64_t split;
    uint64_t biggest;

    if (plan_build(p,
                   &(struct plan_request){.weights = c->weights,
                                          .weight = c->weight,
                                          .block = c->block[0] ? c->block : NULL,
                                          .bias = c->bias[0] ? c->bias : NULL,
                                          .no_bias = c->no_bias,
                                          .row = c->row,
                                          .layout = (enum plan_layout)c->layout,
                                          .act = (enum plan_act)c->act},
                   notes, sizeof(notes), err) < 0)
        return -1;
    for (line = strtok_r(notes, "\n", &save); log && line; line = strtok_r(NULL, "\n", &save))
        tp_log(TP_LOG_NOTICE, "model '%s': %s", c->name, line);
    *md = (struct model){.in = p->in,
                         .out = p->out,
                         .wdtype = (enum tp_dtype)p->lin[0].w.dtype,
                         .io_dtype = (enum tp_dtype)c->io_dtype,
                         .gemm_dtype = r->c.gemm_dtype,
                         .ranks = r->c.ranks,
                         .backend = r->c.backend,
                         .batch_invariant = r->c.batch_invariant,
                         .max_batch = c->max_batch,
                         .plan = p};
    snprintf(md->name, sizeof(md->name), "%s", c->name);
    split = plan_split_size(p, &md->split_what);
    if (plan_split(split, md->ranks, 0, &(int64_t){0}, &(int64_t){0}, err) < 0) {
        struct tp_err why = *err;

        tp_err_set(err, TP_EINVAL, "the model's %lld %s cannot be split: %s (%s %d)",
                   (long long)split, md->split_what, why.msg, r->c.split_flag, md->ranks);
        return -2;
    }
    plan_split_text(split, md->ranks, md->split, sizeof(md->split));
    if (log && p->block[0])
        tp_log(TP_LOG_NOTICE,
               "model '%s': block '%s': %s, hidden %lld, intermediate %lld, activation %s (%s); "
               "one all-reduce per forward",
               c->name, p->block,
               p->kind == PLAN_GATED ? "down(act(gate(x)) * up(x))" : "proj(act(fc(x)))",
               (long long)p->in, (long long)p->inter, plan_act_name((enum plan_act)p->act),
               p->act_why);
    m->shard_bytes = 0;
    for (uint32_t j = 0; j < p->nlin; j++) {
        const struct plan_linear *l = &p->lin[j];

        md->has_bias |= (int)l->has_bias;
        join(md->weights, sizeof(md->weights), j == 0, l->w.name);
        join(md->biases, sizeof(md->biases), j == 0, l->has_bias ? l->b.name : "");
        join(md->layouts, sizeof(md->layouts), j == 0,
             l->layout == PLAN_CONV1D ? "[in, out]" : "[out, in]");
        /* the workers hold W and b as FP32 (the cpu backend) or in the GEMM's dtype */
        m->shard_bytes += (uint64_t)(l->in * l->out + (l->has_bias ? l->out : 0)) *
                          (strcmp(r->c.backend, "cpu") == 0 ? 4 : tp_dtype_size(r->c.gemm_dtype));
        if (log)
            tp_log(TP_LOG_NOTICE,
                   "model '%s': layer: W '%s' %s [%lld, %lld] in %s, stored %s (%s)%s%s, %s; b %s",
                   c->name, l->w.name, tp_dtype_file_name((enum tp_dtype)l->w.dtype),
                   (long long)l->w.shape[0], (long long)l->w.shape[1], l->w.path,
                   l->layout == PLAN_CONV1D ? "[in, out]" : "[out, in]", l->layout_why,
                   l->tied_from[0] ? ", standing in for " : "", l->tied_from,
                   l->split == PLAN_SPLIT_IN ? "inputs split, partial sums all-reduced"
                                             : "outputs split",
                   l->has_bias ? l->b.name : "none");
    }
    biggest = (uint64_t)(md->in > md->out ? md->in : md->out);
    if ((uint64_t)c->max_batch * biggest * 4 > (1u << 30) - (1u << 20)) {
        tp_err_set(err, TP_EINVAL,
                   "max_batch %u rows of %llu floats exceed the 1 GiB message limit", c->max_batch,
                   (unsigned long long)biggest);
        return -2;
    }
    return 0;
}

int repo_add(struct repo *r, const struct repo_conf *conf, struct tp_err *err)
{
    DIR *d;
    struct dirent *e;

    if (conf) {
        struct repo_model *m;
        int rc;

        pthread_mutex_lock(&r->lock);
        m = find(r, conf->name);
        for (int i = 0; !m && i < REPO_MAX_MODELS; i++)
            if (!r->m[i].known)
                m = &r->m[i];
        if (!m) {
            pthread_mutex_unlock(&r->lock);
            return tp_err_set(err, TP_EINVAL, "more than %d models", REPO_MAX_MODELS);
        }
        m->known = 1;
        m->conf = *conf;
        snprintf(m->reason, sizeof(m->reason), "not loaded");
        pthread_mutex_unlock(&r->lock);
        rc = describe(r, m, 0, err);
        if (rc < 0) {
            pthread_mutex_lock(&r->lock);
            snprintf(m->reason, sizeof(m->reason), "%s", err->msg);
            pthread_mutex_unlock(&r->lock);
        }
        return rc;
    }
    d = opendir(r->dir);
    if (!d)
        return tp_err_sys(err, "model repository %s", r->dir);
    while ((e = readdir(d))) {
        size_t n = strlen(e->d_name);
        struct repo_conf c;
        struct tp_err why = {0};
        struct repo_model *m;

        if (n <= 5 || strcmp(e->d_name + n - 5, ".json") != 0)
            continue;
        if (!name_ok(e->d_name, n - 5)) {
            tp_log(TP_LOG_WARN,
                   "model repository: ignoring %s: a model's name is 1 to 127 "
                   "letters, digits, '-', '_' and '.', not first",
                   e->d_name);
            continue;
        }
        e->d_name[n - 5] = '\0';
        if (read_conf(r, e->d_name, &c, &why) == 0) {
            if (repo_add(r, &c, &why) < 0)
                tp_log(TP_LOG_WARN, "model '%s': %s", e->d_name, why.msg);
            continue;
        }
        /* a bad file is that model's: known, unavailable, and why */
        pthread_mutex_lock(&r->lock);
        m = find(r, e->d_name);
        for (int i = 0; !m && i < REPO_MAX_MODELS; i++)
            if (!r->m[i].known)
                m = &r->m[i];
        if (m) {
            m->known = 1;
            snprintf(m->conf.name, sizeof(m->conf.name), "%s", e->d_name);
            snprintf(m->reason, sizeof(m->reason), "%s", why.msg);
        }
        pthread_mutex_unlock(&r->lock);
        tp_log(TP_LOG_WARN, "model '%s': %s", e->d_name, why.msg);
    }
    closedir(d);
    return 0;
}

/* -- loading ------------------------------------------------------------------------------- */

/* The first n free slots in a row, taken; -1 when there are none. Lock held. */
static int take_slots(struct repo *r, uint32_t n)
{
    for (uint32_t s = 0; s + n <= REPO_MAX_SLOTS; s++) {
        uint32_t k = 0;

        while (k < n && !r->slot_used[s + k])
            k++;
        if (k == n) {
            memset(&r->slot_used[s], 1, n);
            return (int)s;
        }
        s += k;
    }
    return -1;
}

/* Bytes of memory the system can still give, from /proc/meminfo; 0 when not known. */
static uint64_t mem_available(void)
{
    FILE *f = fopen("/proc/meminfo", "re");
    char line[256];
    unsigned long long kb = 0;

    if (!f)
        return 0;
    while (fgets(line, sizeof(line), f))
        if (sscanf(line, "MemAvailable: %llu kB", &kb) == 1)
            break;
    fclose(f);
    return (uint64_t)kb << 10;
}

/* The supervisor's callbacks (sup.h), with the model as their context. */
static void model_done(void *ctx, uint32_t slot, uint64_t id, const struct tp_err *err)
{
    sched_on_done(((struct repo_model *)ctx)->sched, slot, id, err);
}

static void model_state(void *ctx, int ready)
{
    sched_on_state(((struct repo_model *)ctx)->sched, ready);
}

/* The workers could not load a model again after a restart: it stays unavailable, with the
 * reason, until it is loaded again (which frees what it still holds first). */
static void model_lost(void *ctx, const struct tp_err *why)
{
    struct repo_model *m = ctx;

    tp_log(TP_LOG_ERR,
           "model '%s' could not be loaded again after the workers restarted, and "
           "is unavailable: %s",
           m->conf.name, why->msg);
    pthread_mutex_lock(&m->repo->lock);
    m->state = REPO_UNAVAILABLE;
    snprintf(m->reason, sizeof(m->reason), "lost at a restart of the workers: %s", why->msg);
    pthread_mutex_unlock(&m->repo->lock);
}

/* shm_arena_create, as proc_run_background runs it */
struct arena_call {
    struct shm_arena *arena;
    const struct shm_layout *lay;
    struct tp_err *err;
    int rc;
};

static void arena_call(void *arg)
{
    struct arena_call *ac = arg;

    ac->rc = shm_arena_create(ac->arena, ac->lay, ac->err);
}

/* shm_arena_destroy, as proc_run_background runs it */
static void arena_free(void *arena)
{
    shm_arena_destroy(arena);
}

/* What a load does once m is marked LOADING: everything but the state. */
static int load_model(struct repo *r, struct repo_model *m, struct tp_err *err)
{
    const struct repo_conf *c = &m->conf;
    struct arena_call ac;
    struct shm_layout lay;
    size_t arena_bytes;
    uint64_t avail, need;
    int slot0;

    if (describe(r, m, 1, err) < 0)
        return -1;
    lay = (struct shm_layout){.nslots = c->slots,
                              .max_batch = c->max_batch,
                              .in = (uint32_t)m->model.in,
                              .out = (uint32_t)m->model.out,
                              .partials = plan_reduces(&m->plan) ? (uint32_t)m->model.ranks : 0};
    arena_bytes = shm_arena_bytes(&lay, SIZE_MAX);
    if (!arena_bytes)
        return tp_err_set(err, TP_EINVAL, "its %u slots of %u rows are too large", c->slots,
                          c->max_batch);
    /* the check before anything is allocated: the workers' shards (in host memory on CPU ranks;
     * GPU ranks read theirs through host memory too, a piece at a time) and the arena */
    need = (strcmp(r->c.backend, "cpu") == 0 ? m->shard_bytes : 0) + arena_bytes;
    avail = mem_available();
    if (avail && need > avail)
        return tp_err_set(
            err, TP_ENOMEM,
            "it needs %llu MiB (shards %llu MiB, slots %llu MiB) and %llu MiB are "
            "available",
            (unsigned long long)(need >> 20), (unsigned long long)(m->shard_bytes >> 20),
            (unsigned long long)(arena_bytes >> 20), (unsigned long long)(avail >> 20));
    pthread_mutex_lock(&r->lock);
    slot0 = take_slots(r, c->slots);
    pthread_mutex_unlock(&r->lock);
    if (slot0 < 0)
        return tp_err_set(err, TP_EBUSY, "no %u free slots of the %d that all models share",
                          c->slots, REPO_MAX_SLOTS);
    m->slot0 = (uint32_t)slot0;
    /* the slots' pages are faulted in at the lowest priority: the models already served come
     * first, and this thread keeps its own for the scheduler thread it starts next */
    ac = (struct arena_call){.arena = &m->arena, .lay = &lay, .err = err, .rc = -1};
    proc_run_background("a model's slots", arena_call, &ac);
    if (ac.rc < 0)
        goto fail;
    if (sched_create(&m->sched, &m->arena,
                     &(struct sched_config){.max_queue = c->max_queue,
                                            .max_queue_bytes = (uint64_t)c->max_queue_mb << 20,
                                            .batch_delay_us = c->batch_delay_us},
                     err) < 0)
        goto fail;
    sched_attach(m->sched, r->sup, m->slot0);
    if (r->c.state_changed)
        sched_set_state_listener(m->sched, r->c.state_changed, r->c.state_ctx);
    if (metrics_model_add(m->id, c->name, m->slot0, c->slots) < 0) {
        tp_err_set(err, TP_ENOMEM, "no memory for its metrics");
        goto fail;
    }
    tp_log(TP_LOG_NOTICE,
           "model '%s': in %lld, out %lld, %s weights%s, %s on the wire; %d %s ranks of %s %s; "
           "%u slots of %u rows, batch delay %u us",
           c->name, (long long)m->model.in, (long long)m->model.out,
           tp_dtype_file_name(m->model.wdtype), m->model.has_bias ? " with bias" : ", no bias",
           tp_dtype_wire_name(m->model.io_dtype), m->model.ranks, r->c.backend, m->model.split,
           m->model.split_what, c->slots, c->max_batch, c->batch_delay_us);
    if (sup_load(r->sup, (uint32_t)m->id,
                 &(struct sup_model){.plan = &m->plan,
                                     .arena = &m->arena,
                                     .slot0 = m->slot0,
                                     .done = model_done,
                                     .state = model_state,
                                     .lost = model_lost,
                                     .ctx = m},
                 err) < 0) {
        metrics_model_remove(m->id);
        goto fail;
    }
    return 0;
fail:
    sched_destroy(m->sched);
    m->sched = NULL;
    shm_arena_destroy(&m->arena);
    pthread_mutex_lock(&r->lock);
    memset(&r->slot_used[m->slot0], 0, c->slots);
    pthread_mutex_unlock(&r->lock);
    return -1;
}

/* Waits until no handler holds m and its scheduler has answered every request it took, and every
 * reply has let go of its slot. The caller has made m refuse new requests (its state). */
static void drain(struct repo *r, struct repo_model *m)
{
    for (;;) {
        int refs;

        pthread_mutex_lock(&r->lock);
        refs = m->refs;
        pthread_mutex_unlock(&r->lock);
        if (refs == 0 && sched_idle(m->sched))
            return;
        usleep(UNLOAD_POLL_US);
    }
}

/* Frees what load_model made, once nothing uses it (drain). */
static void free_model(struct repo *r, struct repo_model *m)
{
    pthread_mutex_lock(&m->cancel_lock);
    m->gen++;
    pthread_mutex_unlock(&m->cancel_lock);
    sup_unload(r->sup, (uint32_t)m->id);
    sched_destroy(m->sched);
    m->sched = NULL;
    metrics_model_remove(m->id);
    proc_run_background("a model's slots", arena_free, &m->arena); /* as they were made */
    pthread_mutex_lock(&r->lock);
    memset(&r->slot_used[m->slot0], 0, m->conf.slots);
    pthread_mutex_unlock(&r->lock);
}

int repo_load(struct repo *r, const char *name, struct tp_err *err)
{
    struct repo_model *m;
    struct repo_conf conf;
    int rc;

    pthread_mutex_lock(&r->lock);
    m = find(r, name);
    if (!m && r->c.dir) {
        /* a model added to the folder since: it is read below */
        pthread_mutex_unlock(&r->lock);
        if (!name_ok(name, strlen(name)))
            return tp_err_set(err, TP_ENOTFOUND, "no model '%.64s' in the repository", name);
        pthread_mutex_lock(&r->lock);
        for (int i = 0; !m && i < REPO_MAX_MODELS; i++)
            if (!r->m[i].known)
                m = &r->m[i];
        if (m) {
            char path[PATH_MAX + 160];

            snprintf(path, sizeof(path), "%s/%s.json", r->dir, name);
            if (access(path, F_OK) != 0) {
                pthread_mutex_unlock(&r->lock);
                return tp_err_set(err, TP_ENOTFOUND, "no model '%.64s' in the repository", name);
            }
            m->known = 1;
            snprintf(m->conf.name, sizeof(m->conf.name), "%s", name);
        }
    }
    if (!m) {
        pthread_mutex_unlock(&r->lock);
        return tp_err_set(err, TP_ENOTFOUND, "no model '%.64s'", name);
    }
    if (m->state == REPO_READY) {
        pthread_mutex_unlock(&r->lock);
        return 0;
    }
    if (m->state != REPO_UNAVAILABLE) {
        pthread_mutex_unlock(&r->lock);
        return tp_err_set(err, TP_EBUSY, "model '%s' is %s already", name,
                          m->state == REPO_LOADING ? "loading" : "unloading");
    }
    m->state = REPO_LOADING;
    m->reason[0] = '\0';
    pthread_mutex_unlock(&r->lock);
    rc = 0;
    if (r->c.dir) {
        rc = read_conf(r, name, &conf, err);
        if (rc == 0)
            m->conf = conf;
    }
    if (rc == 0 && m->sched) { /* lost at a restart: what it held goes first */
        drain(r, m);
        free_model(r, m);
    }
    if (rc == 0)
        rc = load_model(r, m, err);
    pthread_mutex_lock(&r->lock);
    if (rc == 0) {
        m->state = REPO_READY;
        m->wanted = 1;
    } else {
        m->state = REPO_UNAVAILABLE;
        snprintf(m->reason, sizeof(m->reason), "%s", err->msg);
    }
    pthread_mutex_unlock(&r->lock);
    if (rc == 0)
        tp_log(TP_LOG_NOTICE, "model '%s' is ready", name);
    else
        tp_log(TP_LOG_ERR, "model '%s' failed to load: %s", name, err->msg);
    return rc;
}

int repo_unload(struct repo *r, const char *name, struct tp_err *err)
{
    struct repo_model *m;

    pthread_mutex_lock(&r->lock);
    m = find(r, name);
    if (!m) {
        pthread_mutex_unlock(&r->lock);
        return tp_err_set(err, TP_ENOTFOUND, "no model '%.64s'", name);
    }
    if (m->state != REPO_READY) {
        enum repo_state st = m->state;

        pthread_mutex_unlock(&r->lock);
        return tp_err_set(err, st == REPO_UNAVAILABLE ? TP_EINVAL : TP_EBUSY, "model '%s' is %s",
                          name,
                          st == REPO_UNAVAILABLE ? "not loaded"
                          : st == REPO_LOADING   ? "loading"
                                                 : "unloading already");
    }
    m->state = REPO_UNLOADING; /* repo_get refuses it from now on */
    m->wanted = 0;
    pthread_mutex_unlock(&r->lock);
    tp_log(TP_LOG_NOTICE, "model '%s': unloading, after its requests in flight", name);
    drain(r, m);
    free_model(r, m);
    pthread_mutex_lock(&r->lock);
    m->state = REPO_UNAVAILABLE;
    snprintf(m->reason, sizeof(m->reason), "unloaded");
    pthread_mutex_unlock(&r->lock);
    tp_log(TP_LOG_NOTICE, "model '%s' is unloaded", name);
    return 0;
}

/* -- use ----------------------------------------------------------------------------------- */

struct repo_model *repo_get(struct repo *r, const char *name, const char *version,
                            struct tp_err *err)
{
    struct repo_model *m;

    pthread_mutex_lock(&r->lock);
    m = find(r, name);
    if (!m) {
        pthread_mutex_unlock(&r->lock);
        tp_err_set(err, TP_ENOTFOUND, "unknown model '%.64s'", name);
        return NULL;
    }
    if (version[0] && strcmp(version, MODEL_VERSION) != 0) {
        pthread_mutex_unlock(&r->lock);
        tp_err_set(err, TP_ENOTFOUND, "model '%s' has no version '%.32s' (only '%s')", name,
                   version, MODEL_VERSION);
        return NULL;
    }
    if (m->state != REPO_READY) {
        tp_err_set(err, TP_EUNAVAIL, "model '%s' is not ready: %s%s%.400s", name,
                   m->state == REPO_LOADING     ? "loading"
                   : m->state == REPO_UNLOADING ? "unloading"
                                                : "unavailable",
                   m->reason[0] ? ": " : "", m->reason);
        pthread_mutex_unlock(&r->lock);
        return NULL;
    }
    m->refs++;
    pthread_mutex_unlock(&r->lock);
    return m;
}

void repo_put(struct repo_model *m)
{
    if (!m)
        return;
    pthread_mutex_lock(&m->repo->lock);
    m->refs--;
    pthread_mutex_unlock(&m->repo->lock);
}

int repo_ready(struct repo *r, const char *name, const char *version)
{
    struct repo_model *m;
    int ready;

    pthread_mutex_lock(&r->lock);
    m = find(r, name);
    if (!m || (version && version[0] && strcmp(version, MODEL_VERSION) != 0)) {
        pthread_mutex_unlock(&r->lock);
        return -1;
    }
    ready = m->state == REPO_READY && m->sched && sched_ready(m->sched);
    pthread_mutex_unlock(&r->lock);
    return ready;
}

int repo_all_ready(struct repo *r)
{
    int ready = 1;

    pthread_mutex_lock(&r->lock);
    for (int i = 0; i < REPO_MAX_MODELS; i++)
        if (r->m[i].known && r->m[i].wanted &&
            (r->m[i].state != REPO_READY || !sched_ready(r->m[i].sched)))
            ready = 0;
    pthread_mutex_unlock(&r->lock);
    return ready;
}

void repo_cancel(struct repo_model *m, uint64_t gen, struct sched_req *req)
{
    pthread_mutex_lock(&m->cancel_lock);
    if (m->gen == gen && m->sched)
        sched_cancel(m->sched, req);
    pthread_mutex_unlock(&m->cancel_lock);
}

static int by_name(const void *a, const void *b)
{
    return strcmp(((const struct repo_entry *)a)->name, ((const struct repo_entry *)b)->name);
}

int repo_index(struct repo *r, struct repo_entry **out, size_t *n)
{
    struct repo_entry *e = calloc(REPO_MAX_MODELS, sizeof(*e));

    *out = e;
    *n = 0;
    if (!e)
        return -1;
    pthread_mutex_lock(&r->lock);
    for (int i = 0; i < REPO_MAX_MODELS; i++) {
        const struct repo_model *m = &r->m[i];

        if (!m->known)
            continue;
        snprintf(e[*n].name, sizeof(e[*n].name), "%s", m->conf.name);
        e[*n].state = m->state;
        if (m->state == REPO_UNAVAILABLE)
            snprintf(e[*n].reason, sizeof(e[*n].reason), "%s", m->reason);
        (*n)++;
    }
    pthread_mutex_unlock(&r->lock);
    qsort(e, *n, sizeof(*e), by_name);
    return 0;
}

uint32_t repo_busy(struct repo *r)
{
    uint32_t n = 0;

    pthread_mutex_lock(&r->lock);
    for (int i = 0; i < REPO_MAX_MODELS; i++)
        if (r->m[i].state == REPO_READY || r->m[i].state == REPO_UNLOADING)
            n += sched_busy(r->m[i].sched);
    pthread_mutex_unlock(&r->lock);
    return n;
}

uint32_t repo_pending(void *ctx, int id)
{
    struct repo *r = ctx;
    uint32_t n = 0;

    if (id < 0 || id >= REPO_MAX_MODELS)
        return 0;
    pthread_mutex_lock(&r->lock);
    if (r->m[id].state == REPO_READY || r->m[id].state == REPO_UNLOADING)
        n = sched_pending(r->m[id].sched);
    pthread_mutex_unlock(&r->lock);
    return n;
}

void repo_limits(struct repo *r, uint64_t *max_in, uint64_t *max_out)
{
    *max_in = *max_out = 0;
    pthread_mutex_lock(&r->lock);
    for (int i = 0; i < REPO_MAX_MODELS; i++) {
        const struct repo_model *m = &r->m[i];
        uint64_t in, out;

        if (!m->known || !m->model.in)
            continue;
        in = (uint64_t)m->conf.max_batch * (uint64_t)m->model.in * 4;
        out = (uint64_t)m->conf.max_batch * (uint64_t)m->model.out * 4;
        *max_in = in > *max_in ? in : *max_in;
        *max_out = out > *max_out ? out : *max_out;
    }
    pthread_mutex_unlock(&r->lock);
}

void repo_destroy(struct repo *r)
{
    if (!r)
        return;
    for (int i = 0; i < REPO_MAX_MODELS; i++) {
        struct repo_model *m = &r->m[i];

        if (m->sched) {
            if (r->sup)
                sup_unload(r->sup, (uint32_t)m->id);
            sched_destroy(m->sched);
            metrics_model_remove(m->id);
        }
        shm_arena_destroy(&m->arena);
        pthread_mutex_destroy(&m->cancel_lock);
    }
    pthread_mutex_destroy(&r->lock);
    free(r);
}
