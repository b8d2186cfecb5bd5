/* bigalloc.c -- huge-page friendly allocation of weight buffers (see bigalloc.h). */
#include "bigalloc.h"

#include <stdlib.h>
#include <sys/mman.h>

#define HUGE_PAGE ((size_t)2 << 20)

void *bigalloc(size_t n)
{
    void *p = NULL;

    if (n < HUGE_PAGE) /* aligned_alloc wants a multiple of the alignment */
        return aligned_alloc(64, n ? (n + 63) & ~(size_t)63 : 64);
    n = (n + HUGE_PAGE - 1) / HUGE_PAGE * HUGE_PAGE;
    if (posix_memalign(&p, HUGE_PAGE, n) != 0)
        return NULL;
    (void)madvise(p, n, MADV_HUGEPAGE);
    return p;
}
