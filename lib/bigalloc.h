/* bigalloc.h -- buffers of weights, the largest a process holds. Faulting in a multi-GiB buffer
 * 4 KiB at a time costs more than filling it (on a VM, often much more): above 2 MiB a buffer is
 * 2 MiB aligned and asks for transparent huge pages (madvise), so the kernel can back it with a
 * fault per 2 MiB. The advice is only advice: without huge pages the buffer is the same. */
#ifndef TP_BIGALLOC_H
#define TP_BIGALLOC_H

#include <stddef.h>

/* n bytes (at least 64-byte aligned), released with free(); NULL when there is no memory. */
void *bigalloc(size_t n);

#endif
