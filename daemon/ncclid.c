/* ncclid.c -- the NCCL unique id (see ncclid.h). Compiled with or without NCCL's header. NCCL is
 * loaded with dlopen at the first id, never before: tpd starts, and serves the cpu backend and
 * --gather host, on machines without it. It is looked for by cudalib_open (lib/cudalib.h), as
 * the worker looks for it, so that both load the same file. */
#include "ncclid.h"

#include <string.h>

#ifdef TP_HAVE_NCCL
#include <dlfcn.h>
#include <nccl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

#include "cudalib.h"
#include "log.h"

_Static_assert(NCCL_UNIQUE_ID_BYTES == CTL_NCCL_ID_BYTES, "the ctl INIT message carries the id");

#define STR_(x) #x
#define STR(x) STR_(x)
#define NCCL_SONAME "libnccl.so." STR(NCCL_MAJOR) /* the header's major version */

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct {
    void *handle;
    __typeof__(ncclGetUniqueId) *ncclGetUniqueId;
    __typeof__(ncclGetErrorString) *ncclGetErrorString;
    __typeof__(ncclGetLastError) *ncclGetLastError;
    __typeof__(ncclGetVersion) *ncclGetVersion;
} nccl;

/* Loads NCCL once; later calls return at once. */
static int load_nccl(struct tp_err *err)
{
    Dl_info info;
    void *h;
    int v = 0;

    if (nccl.handle)
        return 0;
    h = cudalib_open(NCCL_SONAME, "NCCL, for --gather nccl", ", or use --gather host", err);
    if (!h)
        return -1;
    nccl.ncclGetUniqueId = (__typeof__(nccl.ncclGetUniqueId))dlsym(h, "ncclGetUniqueId");
    nccl.ncclGetErrorString = (__typeof__(nccl.ncclGetErrorString))dlsym(h, "ncclGetErrorString");
    nccl.ncclGetLastError = (__typeof__(nccl.ncclGetLastError))dlsym(h, "ncclGetLastError");
    nccl.ncclGetVersion = (__typeof__(nccl.ncclGetVersion))dlsym(h, "ncclGetVersion");
    if (!nccl.ncclGetUniqueId || !nccl.ncclGetErrorString || !nccl.ncclGetLastError ||
        !nccl.ncclGetVersion) {
        memset(&nccl, 0, sizeof(nccl));
        dlclose(h);
        return tp_err_set(err, TP_ENOTFOUND,
                          "%s lacks ncclGetUniqueId, ncclGetErrorString, ncclGetLastError or "
                          "ncclGetVersion: NCCL 2.14 or newer is needed",
                          NCCL_SONAME);
    }
    nccl.handle = h;
    nccl.ncclGetVersion(&v);
    tp_log(TP_LOG_NOTICE, "NCCL %d.%d.%d from %s, for the unique ids of --gather nccl", v / 10000,
           v / 100 % 100, v % 100,
           dladdr((void *)nccl.ncclGetUniqueId, &info) && info.dli_fname ? info.dli_fname : "?");
    return 0;
}

int ncclid_available(void)
{
    return 1;
}

int ncclid_make(uint8_t id[CTL_NCCL_ID_BYTES], struct tp_err *err)
{
    ncclUniqueId u;
    ncclResult_t r;
    int rc;

    pthread_mutex_lock(&lock);
    rc = load_nccl(err);
    pthread_mutex_unlock(&lock);
    if (rc < 0)
        return -1;
    r = nccl.ncclGetUniqueId(&u);
    if (r != ncclSuccess)
        return tp_err_set(err, TP_EDEVICE, "ncclGetUniqueId: %s: %.120s",
                          nccl.ncclGetErrorString(r), nccl.ncclGetLastError(NULL));
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
