/* shmreg.h -- the system shared-memory regions that local clients register with tpd (KServe v2 /
 * Triton's system-shared-memory extension). A region is a byte range [offset, offset + byte_size)
 * of a POSIX shared-memory object the client created (shm_open key); tpd maps exactly that range,
 * read and write, and requests then name the region for their input or output instead of sending
 * the bytes over gRPC. Regions are reference counted: unregistering one that a request is still
 * using removes its name at once and unmaps it when the last request is done with it.
 * Trust: a client that can reach tpd can make it map any shared-memory object tpd's user may
 * open, and the owner of an object can shrink it under tpd's feet (each use re-checks the size,
 * but a shrink during the copy itself would still end tpd with SIGBUS); serve this extension only
 * to local clients you trust (the default listen address is loopback). */
#ifndef TPD_SHMREG_H
#define TPD_SHMREG_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"

#define SHMREG_MAX_REGIONS 256
#define SHMREG_NAME_MAX 128 /* bytes of a name or key, with the NUL */

struct shmreg;
struct shmreg_region;

struct shmreg_info {
    char name[SHMREG_NAME_MAX];
    char key[SHMREG_NAME_MAX];
    uint64_t offset;    /* in the shared-memory object, bytes */
    uint64_t byte_size; /* bytes */
};

int shmreg_create(struct shmreg **r, struct tp_err *err);

/* Unmaps every region. The caller guarantees no request holds one. Takes NULL. */
void shmreg_destroy(struct shmreg *r);

/* Maps [offset, offset + byte_size) of the shared-memory object key (shm_open, read/write) under
 * name. TP_EINVAL: empty or too long name or key, byte_size 0, a name already registered, or an
 * object smaller than offset + byte_size (fstat); TP_ENOTFOUND: no such object; TP_EBUSY: too
 * many regions; TP_ESYS otherwise. */
int shmreg_register(struct shmreg *r, const char *name, const char *key, uint64_t offset,
                    uint64_t byte_size, struct tp_err *err);

/* Removes name, or every region when name is "". A name not registered is no error (as
 * upstream: unregistering is idempotent). */
int shmreg_unregister(struct shmreg *r, const char *name, struct tp_err *err);

/* Fills up to max infos, of the region name or of every region when name is ""; returns how many
 * (0 for a name not registered). */
size_t shmreg_status(struct shmreg *r, const char *name, struct shmreg_info *out, size_t max);

/* Takes a reference on region name and returns in *p the address of [offset, offset + size) of
 * it, after checking that the range lies inside the region (overflow-safe) and that the object
 * still covers the region (fstat). TP_ENOTFOUND for an unknown region, TP_EINVAL for a range
 * outside it or a shrunk object. Release with shmreg_release. */
int shmreg_acquire(struct shmreg *r, const char *name, uint64_t offset, uint64_t size,
                   struct shmreg_region **reg, void **p, struct tp_err *err);

/* Drops a reference from shmreg_acquire; unmaps a region already unregistered. Takes NULL. */
void shmreg_release(struct shmreg_region *reg);

#endif
