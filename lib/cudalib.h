/* cudalib.h -- finding and loading a CUDA library (cuBLAS, NCCL) at run time, the same way in
 * tpd and in its workers, so that both load the same file: nothing links them, so tpd, the cpu
 * backend and --gather host run on machines without them. */
#ifndef TP_CUDALIB_H
#define TP_CUDALIB_H

#include "err.h"

/* dlopens soname (RTLD_NOW | RTLD_LOCAL) from the first place that has it: each directory of
 * TPD_CUDA_LIBS (':'-separated), then the loader's own search (LD_LIBRARY_PATH, the program's
 * RPATH, ld.so.cache), then the directories where the build found the CUDA libraries. On failure
 * NULL, with err (TP_ENOTFOUND) saying what was tried and why a file that exists did not load;
 * what names the library for people ("cuBLAS"), hint ends the message ("" or ", or use ..."). */
void *cudalib_open(const char *soname, const char *what, const char *hint, struct tp_err *err);

#endif
