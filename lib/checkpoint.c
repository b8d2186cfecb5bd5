/* checkpoint.c -- opening a checkpoint and finding its tensors (see checkpoint.h). The coordinator
 * uses it to build the plan, tpclient to read a whole layer for --verify. The index is kept as
 * parsed JSON: a lookup walks its weight_map, which costs nothing next to reading a header. */
#include "checkpoint.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fileio.h"

#define INDEX_NAME "model.safetensors.index.json"
#define SINGLE_NAME "model.safetensors"
#define SHOW 64 /* bytes of a name from a file in a message */

static int ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), m = strlen(suffix);

    return n >= m && strcmp(s + n - m, suffix) == 0;
}

static int is_file(const char *path)
{
    struct stat st;

    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

/* dir/name into dst of CKPT_MAX_PATH bytes; -1 when it does not fit. */
static int join(char *dst, const char *dir, const char *name)
{
    size_t a = strlen(dir), b = strlen(name);

    if (a + 1 + b >= CKPT_MAX_PATH)
        return -1;
    memcpy(dst, dir, a);
    dst[a] = '/';
    memcpy(dst + a + 1, name, b + 1);
    return 0;
}

/* Reads and parses a JSON file of at most CKPT_MAX_JSON bytes. */
static int read_json(const char *path, cJSON **out, struct tp_err *err)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK); /* a FIFO is refused, not waited on */
    char *text = NULL;
    const char *end = NULL;
    struct stat st;

    *out = NULL;
    if (fd < 0 || fstat(fd, &st) < 0) {
        tp_err_sys(err, "%s", path);
        goto fail;
    }
    if (!S_ISREG(st.st_mode) || st.st_size > (off_t)CKPT_MAX_JSON) {
        tp_err_set(err, TP_EINVAL, "%s is not a regular file of at most %u bytes", path,
                   CKPT_MAX_JSON);
        goto fail;
    }
    text = malloc((size_t)st.st_size + 1);
    if (!text) {
        tp_err_set(err, TP_ENOMEM, "no memory to read %s", path);
        goto fail;
    }
    if (fileio_pread_full(fd, text, (size_t)st.st_size, 0, err) < 0) {
        tp_err_prefix(err, "%s: ", path);
        goto fail;
    }
    *out = cJSON_ParseWithLengthOpts(text, (size_t)st.st_size, &end, 0);
    if (!*out) {
        tp_err_set(err, TP_EINVAL, "%s is not valid JSON (error at byte %td)", path,
                   end ? end - text : (ptrdiff_t)0);
        goto fail;
    }
    free(text);
    close(fd);
    return 0;
fail:
    free(text);
    if (fd >= 0)
        close(fd);
    return -1;
}

/* A shard's name from the index: a plain file name, so that an index cannot point outside its
 * directory. */
static int plain_name(const char *s)
{
    return s[0] && strchr(s, '/') == NULL && strcmp(s, ".") != 0 && strcmp(s, "..") != 0 &&
           strlen(s) < 256;
}

static int add_shard(struct ckpt *c, const char *path, int *idx, struct tp_err *err)
{
    struct ckpt_shard *grown;

    for (int i = 0; i < c->nshards; i++)
        if (strcmp(c->shards[i].path, path) == 0)
            return *idx = i, 0;
    grown = realloc(c->shards, (size_t)(c->nshards + 1) * sizeof(*grown));
    if (!grown)
        return tp_err_set(err, TP_ENOMEM, "no memory for %d shards", c->nshards + 1);
    c->shards = grown;
    c->shards[c->nshards] = (struct ckpt_shard){.st = {.fd = -1}};
    if (snprintf(c->shards[c->nshards].path, CKPT_MAX_PATH, "%s", path) >= CKPT_MAX_PATH)
        return tp_err_set(err, TP_EINVAL, "path of shard %s is too long", path);
    *idx = c->nshards++;
    return 0;
}

/* Checks the index's weight_map: an object of tensor name -> plain shard file name. */
static int open_index(struct ckpt *c, struct tp_err *err)
{
    const cJSON *e;

    if (read_json(c->source, &c->index, err) < 0)
        return -1;
    c->map = cJSON_GetObjectItemCaseSensitive(c->index, "weight_map");
    if (!cJSON_IsObject(c->map))
        return tp_err_set(err, TP_EINVAL, "%s has no \"weight_map\" object", c->source);
    /* Every shard is listed here, once, so that the table never moves after open: callers keep
     * pointers into it. */
    cJSON_ArrayForEach(e, c->map)
    {
        char path[CKPT_MAX_PATH];
        int idx;

        if (!cJSON_IsString(e) || !plain_name(e->valuestring))
            return tp_err_set(err, TP_EINVAL,
                              "%s: weight_map entry '%.*s' is not the name of a file beside "
                              "the index",
                              c->source, SHOW, e->string);
        if (join(path, c->dir, e->valuestring) < 0)
            return tp_err_set(err, TP_EINVAL, "path of shard %s is too long", e->valuestring);
        if (add_shard(c, path, &idx, err) < 0)
            return -1;
    }
    return 0;
}

int ckpt_open(struct ckpt *c, const char *path, struct tp_err *err)
{
    char file[CKPT_MAX_PATH];
    struct stat st;
    int idx;

    *c = (struct ckpt){0};
    if (stat(path, &st) < 0) {
        tp_err_sys(err, "%s", path);
        goto fail;
    }
    if (S_ISDIR(st.st_mode)) {
        char single[CKPT_MAX_PATH], index[CKPT_MAX_PATH];
        int has_single, has_index;

        if (join(single, path, SINGLE_NAME) < 0 || join(index, path, INDEX_NAME) < 0) {
            tp_err_set(err, TP_EINVAL, "path %s is too long", path);
            goto fail;
        }
        snprintf(c->dir, sizeof(c->dir), "%s", path);
        has_single = is_file(single);
        has_index = is_file(index);
        if (has_single && has_index) {
            tp_err_set(err, TP_EINVAL,
                       "%s holds both " SINGLE_NAME " and " INDEX_NAME
                       ": name the one to serve with --weights",
                       path);
            goto fail;
        }
        if (!has_single && !has_index) {
            (void)join(single, path, "pytorch_model.bin");
            tp_err_set(err, TP_ENOTFOUND, "%s holds no " SINGLE_NAME " or " INDEX_NAME "%s", path,
                       is_file(single) ? " (pytorch_model.bin is not read: tpd reads safetensors "
                                         "checkpoints only)"
                                       : "");
            goto fail;
        }
        memcpy(c->source, has_index ? index : single, sizeof(c->source));
    } else {
        const char *slash = strrchr(path, '/');

        snprintf(c->source, sizeof(c->source), "%s", path);
        if (slash)
            snprintf(c->dir, sizeof(c->dir), "%.*s", (int)(slash - path), path);
        else
            snprintf(c->dir, sizeof(c->dir), ".");
        if (!c->dir[0])
            snprintf(c->dir, sizeof(c->dir), "/");
    }
    if (strlen(c->source) >= CKPT_MAX_PATH - 300) {
        tp_err_set(err, TP_EINVAL, "path %s is too long", path);
        goto fail;
    }
    if (ends_with(c->source, ".json")) {
        if (open_index(c, err) < 0)
            goto fail;
    } else {
        if (add_shard(c, c->source, &idx, err) < 0 || st_open(&c->shards[0].st, c->source, err) < 0)
            goto fail;
    }
    if (join(file, c->dir, "config.json") < 0) {
        tp_err_set(err, TP_EINVAL, "path %s is too long", c->dir);
        goto fail;
    }
    if (access(file, F_OK) == 0 && read_json(file, &c->config, err) < 0)
        goto fail;
    if (c->config && !cJSON_IsObject(c->config)) {
        tp_err_set(err, TP_EINVAL, "%s is not a JSON object", file);
        goto fail;
    }
    return 0;
fail:
    ckpt_close(c);
    return -1;
}

int ckpt_find(struct ckpt *c, const char *name, const struct ckpt_shard **shard,
              const struct st_tensor **t, struct tp_err *err)
{
    const cJSON *e;
    char path[CKPT_MAX_PATH];
    int idx = 0;

    if (c->map) {
        e = cJSON_GetObjectItemCaseSensitive(c->map, name);
        if (!e)
            return 0;
        (void)join(path, c->dir, e->valuestring); /* fits: open_index checked it */
        while (idx < c->nshards && strcmp(c->shards[idx].path, path) != 0)
            idx++;
        if (idx == c->nshards) /* open_index listed every shard */
            return tp_err_set(err, TP_EINTERNAL, "shard %s is not listed", path);
        if (!c->shards[idx].st.tensors && st_open(&c->shards[idx].st, path, err) < 0) {
            tp_err_prefix(err, "shard of '%.*s' (%s): ", SHOW, name, c->source);
            return -1;
        }
    }
    *t = st_find(&c->shards[idx].st, name);
    if (!*t && c->map)
        return tp_err_set(err, TP_EINVAL, "%s puts '%.*s' in %s, which has no such tensor",
                          c->source, SHOW, name, c->shards[idx].path);
    *shard = &c->shards[idx];
    return *t != NULL;
}

const char *ckpt_config_string(const struct ckpt *c, const char *key)
{
    const cJSON *v = c->config ? cJSON_GetObjectItemCaseSensitive(c->config, key) : NULL;

    return cJSON_IsString(v) ? v->valuestring : NULL;
}

int ckpt_config_bool(const struct ckpt *c, const char *key)
{
    const cJSON *v = c->config ? cJSON_GetObjectItemCaseSensitive(c->config, key) : NULL;

    return cJSON_IsBool(v) ? cJSON_IsTrue(v) : -1;
}

void ckpt_close(struct ckpt *c)
{
    if (!c)
        return;
    for (int i = 0; i < c->nshards; i++)
        st_close(&c->shards[i].st);
    free(c->shards);
    cJSON_Delete(c->index);
    cJSON_Delete(c->config);
    *c = (struct ckpt){0};
}
