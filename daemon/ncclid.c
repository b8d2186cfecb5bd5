/* ncclid.c -- the NCCL unique id (see ncclid.h). Compiled with or without NCCL. */
#include "ncclid.h"

#include <string.h>

#ifdef TP_HAVE_NCCL
#include <nccl.h>

_Static_assert(NCCL_UNIQUE_ID_BYTES == CTL_NCCL_ID_BYTES, "the ctl INIT message carries the id");

int ncclid_available(void)
{
    return 1;
}

int ncclid_make(uint8_t id[CTL_NCCL_ID_BYTES], struct tp_err *err)
{
    ncclUniqueId u;
    ncclResult_t r = ncclGetUniqueId(&u);

    if (r != ncclSuccess)
        return tp_err_set(err, TP_EDEVICE, "ncclGetUniqueId: %s: %.120s", ncclGetErrorString(r),
                          ncclGetLastError(NULL));
    memcpy(id, u.internal, CTL_NCCL_ID_BYTES);
    return 0;
}
#else
int ncclid_available(void)
{
    return 0;
}

int ncclid_make(uint8_t id[CTL_NCCL_ID_BYTES], struct tp_err *err)
{
    memset(id, 0, CTL_NCCL_ID_BYTES);
    return tp_err_set(err, TP_EINVAL, "this tpd was built without NCCL: use --gather host");
}
#endif
