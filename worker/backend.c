/* backend.c -- the table of backends compiled into this worker (see backend.h). */
#include "backend.h"

#include <string.h>

static const struct backend_ops *const backends[] = {
    &backend_cpu,
#ifdef TP_HAVE_CUDA
    &backend_cuda,
#endif
};

const struct backend_ops *backend_find(const char *name)
{
    for (size_t i = 0; i < sizeof(backends) / sizeof(backends[0]); i++)
        if (strcmp(name, backends[i]->name) == 0)
            return backends[i];
    return NULL;
}
