/* shmreg.h -- the system shared-memory regions that local clients register with tpd (KServe v2 /
 * Triton's system-shared-memory extension). A region is a byte range [offset, offset + byte_size)
 * of a POSIX shared-memory object the client created (shm_open key), and requests then name the
 * region for their input or output instead of sending the bytes over gRPC. tpd keeps the
 * object's descriptor and copies with pread and pwrite, never through a mapping: the object's
 * owner may shrink it at any moment, and a copy then fails that request with an error, where a
 * mapping would kill tpd with SIGBUS. Regions are reference counted: unregistering one that a
 * request is still using removes its name at once and closes it when the last request is done.
 * Trust: a client that can reach tpd can make it read and write any shared-memory object tpd's
 * user may open; serve this extension only to local clients you trust (the default listen
 * address is loopback). */
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

/* Closes every region. The caller guarantees no request holds one. Takes NULL. */
void shmreg_destroy(struct shmreg *r);

/* Registers [offset, offset + byte_size) of the shared-memory object key (shm_open, read/write)
 * under name. Keys are "/NAME" or "NAME", NAME without '/' and not "." or "..". TP_EINVAL: empty
 * or too long name or key, a key that cannot name an object, or names a directory, a symlink, a
 * FIFO or anything but a regular object, an object tpd may not open read-write, byte_size 0, a
 * name already registered, or an object smaller than offset + byte_size (fstat); TP_ENOTFOUND:
 * no such object; TP_EBUSY: too many regions; TP_ESYS otherwise (out of descriptors). */
int shmreg_register(struct shmreg *r, const char *name, const char *key, uint64_t offset,
                    uint64_t byte_size, struct tp_err *err);

/* Removes name, or every region when name is "". A name not registered is no error (as
 * upstream: unregistering is idempotent). */
int shmreg_unregister(struct shmreg *r, const char *name, struct tp_err *err);

/* Fills up to max infos, of the region name or of every region when name is ""; returns how many
 * (0 for a name not registered). */
size_t shmreg_status(struct shmreg *r, const char *name, struct shmreg_info *out, size_t max);

/* Takes a reference on region name for [offset, offset + size) of it, after checking that the
 * range lies inside the region (overflow-safe) and that the object still covers the region
 * (fstat). TP_ENOTFOUND for an unknown region, TP_EINVAL for a range outside it or a shrunk
 * object. Release with shmreg_release. */
int shmreg_acquire(struct shmreg *r, const char *name, uint64_t offset, uint64_t size,
                   struct shmreg_region **reg, struct tp_err *err);

/* Copies n bytes at offset of an acquired region into dst (pread). TP_EINVAL when the object has
 * shrunk below the region (then dst holds whatever was read). Any thread. */
int shmreg_read(const struct shmreg_region *reg, uint64_t offset, void *dst, size_t n,
                struct tp_err *err);

/* Copies n bytes of src to offset of an acquired region (pwrite). TP_EINVAL when the object has
 * shrunk below the region, checked before and after the copy (a shrink racing the copy itself may
 * see the object grown back to the region's end by it; the call fails all the same). */
int shmreg_write(const struct shmreg_region *reg, uint64_t offset, const void *src, size_t n,
                 struct tp_err *err);

/* Drops a reference from shmreg_acquire; closes a region already unregistered. Takes NULL. */
void shmreg_release(struct shmreg_region *reg);

#endif
