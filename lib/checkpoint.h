/* checkpoint.h -- finding tensors in a checkpoint as Hugging Face's save_pretrained writes it: one
 * .safetensors file, or shards named by the "weight_map" of a model.safetensors.index.json, with a
 * config.json beside them. A checkpoint is opened from a .safetensors file, an index file or the
 * directory that holds either. Shards are opened on first use, headers only (safetensors.h), so
 * finding a layer of a model of many shards reads the headers of the shards that hold it.
 *
 * Every value from these files is checked before use: a shard name from the index must be a
 * plain file name in the checkpoint's directory, and the shard must hold the tensor the index
 * says it holds. */
#ifndef TP_CHECKPOINT_H
#define TP_CHECKPOINT_H

#include <cJSON.h>

#include "err.h"
#include "safetensors.h"

#define CKPT_MAX_JSON (64u << 20) /* bytes of an index or config.json */
#define CKPT_MAX_PATH 4096

struct ckpt_shard {
    char path[CKPT_MAX_PATH]; /* the shard's file */
    struct st_file st;        /* its header, once opened; st.tensors NULL before */
};

struct ckpt {
    char dir[CKPT_MAX_PATH];    /* directory of the checkpoint (holds config.json) */
    char source[CKPT_MAX_PATH]; /* the file opened: a .safetensors or an index, for messages */
    cJSON *index;               /* the index file's JSON, owned; NULL for a single file */
    const cJSON *map;           /* its "weight_map" object */
    cJSON *config;              /* config.json, owned; NULL when there is none */
    int nshards;
    struct ckpt_shard *shards; /* one per distinct file, owned; a single file is shards[0] */
};

/* Opens the checkpoint at path: a .safetensors file, a .json index, or a directory holding
 * model.safetensors or model.safetensors.index.json (both at once is ambiguous: refused). Reads
 * config.json from the same directory when it exists. On failure c is closed (ckpt_close is
 * safe). */
int ckpt_open(struct ckpt *c, const char *path, struct tp_err *err);

/* Finds the tensor stored as name. Returns 1 with *shard and *t set (both owned by c), 0 when the
 * checkpoint has no such tensor, -1 when it should have it but cannot give it (a shard that cannot
 * be opened, or that does not hold what the index says). */
int ckpt_find(struct ckpt *c, const char *name, const struct ckpt_shard **shard,
              const struct st_tensor **t, struct tp_err *err);

/* config.json's string member key (e.g. "model_type"), or NULL when absent or not a string. */
const char *ckpt_config_string(const struct ckpt *c, const char *key);

/* config.json's boolean member key: 1 or 0, or -1 when there is no config.json or no such
 * boolean. */
int ckpt_config_bool(const struct ckpt *c, const char *key);

/* Closes every shard and frees everything; takes a closed or half-opened checkpoint. */
void ckpt_close(struct ckpt *c);

#endif
