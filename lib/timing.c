/* timing.c -- see timing.h. */
#include "timing.h"

#include <math.h>
#include <stdlib.h>
#include <time.h>

double timing_now_s(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;

    return (x > y) - (x < y);
}

void timing_sort(double *v, size_t n)
{
    qsort(v, n, sizeof(*v), cmp_double);
}

double timing_percentile(const double *sorted, size_t n, double p)
{
    size_t rank = (size_t)ceil(p * (double)n);

    if (n == 0)
        return 0;
    return sorted[rank < 1 ? 0 : rank > n ? n - 1 : rank - 1];
}
