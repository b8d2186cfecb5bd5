/* shm.h -- the shared-memory arena that carries activations between the coordinator and the
 * workers. The coordinator creates one memfd of nslots slots; each slot holds an input block
 * [max_batch, in] and an output block [max_batch, out] of float32, and, for a model whose ranks
 * all-reduce partial sums (plan_reduces), one partial block [max_batch, out] per rank and a sync
 * page whose first word counts the ranks that have written theirs (worker/block.c). Workers map
 * the same fd, inherited at spawn, and derive the same layout from the same five numbers. Pages are touched
 * once at creation (MAP_POPULATE) and reused for every request: nothing is allocated per request.
 * Ownership of a slot is not stored here: the coordinator hands a slot to the workers with a ctl
 * job message and takes it back when every rank has answered. */
#ifndef TP_SHM_H
#define TP_SHM_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"

struct shm_layout {
    uint32_t nslots;
    uint32_t max_batch; /* rows */
    uint32_t in;        /* input features */
    uint32_t out;       /* output features, all ranks together */
    uint32_t partials;  /* partial blocks per slot: the rank count when ranks reduce, else 0 */
};

struct shm_arena {
    int fd;           /* memfd, -1 when empty */
    void *base;       /* mapping, NULL when empty */
    size_t size;      /* bytes */
    size_t slot_size; /* bytes per slot, a multiple of the page size */
    struct shm_layout layout;
};

/* Bytes the arena needs for this layout, or 0 when it would overflow or exceed limit. */
size_t shm_arena_bytes(const struct shm_layout *l, size_t limit);

/* Creates the memfd (CLOEXEC: proc_spawn passes it to a worker on purpose), sizes and maps it,
 * prefaulted. On failure *a is empty (fd -1). */
int shm_arena_create(struct shm_arena *a, const struct shm_layout *l, struct tp_err *err);

/* Maps an inherited fd with the layout the coordinator used; checks the fd's size. Takes
 * ownership of fd (closes it at shm_arena_destroy or on failure). */
int shm_arena_attach(struct shm_arena *a, int fd, const struct shm_layout *l, struct tp_err *err);

/* Input block of a slot: max_batch * in floats, row-major. */
float *shm_slot_input(const struct shm_arena *a, uint32_t slot);

/* Output block of a slot: max_batch * out floats, row-major. */
float *shm_slot_output(const struct shm_arena *a, uint32_t slot);

/* Partial block of rank in a slot: max_batch * out floats, row-major; layout.partials > rank. */
float *shm_slot_partial(const struct shm_arena *a, uint32_t slot, uint32_t rank);

/* The slot's arrival counter (with partials): the coordinator zeroes it before it hands the slot
 * to the ranks; each rank adds one, atomically, once its partial block is written. */
uint32_t *shm_slot_sync(const struct shm_arena *a, uint32_t slot);

/* Unmaps and closes; takes an empty or half-built arena. */
void shm_arena_destroy(struct shm_arena *a);

#endif
