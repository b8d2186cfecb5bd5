/* timing.h -- the monotonic clock and the order statistics that timings and benchmarks use. */
#ifndef TP_TIMING_H
#define TP_TIMING_H

#include <stddef.h>

/* Seconds on CLOCK_MONOTONIC. */
double timing_now_s(void);

/* Sorts n durations in place, ascending; then v[n / 2] is the median. */
void timing_sort(double *v, size_t n);

/* The nearest-rank p-quantile (0 < p <= 1) of n sorted values: the smallest value with at least
 * p * n values at or below it. */
double timing_percentile(const double *sorted, size_t n, double p);

#endif
