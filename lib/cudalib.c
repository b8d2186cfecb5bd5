/* cudalib.c -- run-time loading of CUDA libraries (see cudalib.h). */
#include "cudalib.h"

#include <dlfcn.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef TP_CUDA_LIBDIRS
#define TP_CUDA_LIBDIRS "" /* set by the build when it found the CUDA toolkit */
#endif

/* Keeps the first reason why a library file that exists did not load; "not found" is none. */
static void note_failure(char *why, size_t len, const char *msg)
{
    if (!why[0] && msg && !strstr(msg, "No such file or directory"))
        snprintf(why, len, "%s", msg);
}

void *cudalib_open(const char *soname, const char *what, const char *hint, struct tp_err *err)
{
    const char *env = getenv("TPD_CUDA_LIBS");
    const char *lists[3] = {env, NULL, TP_CUDA_LIBDIRS};
    char path[PATH_MAX], why[160] = "";
    void *h;

    for (int l = 0; l < 3; l++) {
        const char *d = lists[l];

        if (l == 1) {
            h = dlopen(soname, RTLD_NOW | RTLD_LOCAL);
            if (h)
                return h;
            note_failure(why, sizeof(why), dlerror());
            continue;
        }
        while (d && *d) {
            size_t n = strcspn(d, ":");

            if (n > 0 && n + strlen(soname) + 2 <= sizeof(path)) {
                memcpy(path, d, n);
                path[n] = '/';
                strcpy(path + n + 1, soname);
                h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
                if (h)
                    return h;
                note_failure(why, sizeof(why), dlerror());
            }
            d += n + (d[n] == ':');
        }
    }
    if (why[0])
        tp_err_set(err, TP_ENOTFOUND, "cannot load %s (%s): %s", soname, what, why);
    else
        tp_err_set(err, TP_ENOTFOUND,
                   "%s (%s) is not in TPD_CUDA_LIBS (%.60s), the library path or '%.60s': set "
                   "TPD_CUDA_LIBS to the directory that holds it%s",
                   soname, what, env ? env : "unset", TP_CUDA_LIBDIRS, hint);
    return NULL;
}
