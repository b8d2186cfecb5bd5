/* test.h -- the assertions of the unit tests. A failed check prints file, line, the expression
 * and both values, then the test exits non-zero; ctest reports it. Each test binary is a main()
 * that runs its cases in order with TEST_RUN. */
#ifndef TP_TEST_H
#define TP_TEST_H

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TEST_FAIL_(...)                                                                            \
    do {                                                                                           \
        fprintf(stderr, "%s:%d: ", __FILE__, __LINE__);                                            \
        fprintf(stderr, __VA_ARGS__);                                                              \
        fputc('\n', stderr);                                                                       \
        exit(1);                                                                                   \
    } while (0)

#define ASSERT_TRUE(c)                                                                             \
    do {                                                                                           \
        if (!(c))                                                                                  \
            TEST_FAIL_("assertion failed: %s", #c);                                                \
    } while (0)

#define ASSERT_INT_OP_(a, op, b)                                                                   \
    do {                                                                                           \
        long long a_ = (long long)(a), b_ = (long long)(b);                                        \
        if (!(a_ op b_))                                                                           \
            TEST_FAIL_("%s %s %s: %lld vs %lld", #a, #op, #b, a_, b_);                             \
    } while (0)

#define ASSERT_EQ(a, b) ASSERT_INT_OP_(a, ==, b)
#define ASSERT_NE(a, b) ASSERT_INT_OP_(a, !=, b)
#define ASSERT_LT(a, b) ASSERT_INT_OP_(a, <, b)
#define ASSERT_LE(a, b) ASSERT_INT_OP_(a, <=, b)
#define ASSERT_GT(a, b) ASSERT_INT_OP_(a, >, b)

#define ASSERT_STR_EQ(a, b)                                                                        \
    do {                                                                                           \
        const char *a_ = (a), *b_ = (b);                                                           \
        if (strcmp(a_, b_) != 0)                                                                   \
            TEST_FAIL_("%s == %s: \"%s\" vs \"%s\"", #a, #b, a_, b_);                              \
    } while (0)

/* haystack contains needle */
#define ASSERT_STR_HAS(hay, needle)                                                                \
    do {                                                                                           \
        const char *h_ = (hay), *n_ = (needle);                                                    \
        if (!strstr(h_, n_))                                                                       \
            TEST_FAIL_("%s contains %s: \"%s\" lacks \"%s\"", #hay, #needle, h_, n_);              \
    } while (0)

#define ASSERT_NEAR(a, b, tol)                                                                     \
    do {                                                                                           \
        double a_ = (a), b_ = (b), t_ = (tol);                                                     \
        if (!(fabs(a_ - b_) <= t_))                                                                \
            TEST_FAIL_("|%s - %s| <= %s: %.9g vs %.9g", #a, #b, #tol, a_, b_);                     \
    } while (0)

#define TEST_RUN(fn)                                                                               \
    do {                                                                                           \
        fprintf(stderr, "-- %s\n", #fn);                                                           \
        fn();                                                                                      \
    } while (0)

#endif
