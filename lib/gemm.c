/* gemm.c -- the batch-invariant GEMM (see gemm.h). The loop nest is the usual one (k in blocks of
 * GEMM_KC so a panel's block stays in L1, rows in blocks of GEMM_MC packed side by side, panels,
 * then tiles of up to GEMM_MR rows), and the k blocks are the summation order gemm.h promises: a tile's accumulators start from zero, take
 * exactly one fused multiply-add per k of the block, in k order, and are then added to the bias
 * (first block) or to y (later blocks). Storing and reloading a float between blocks is exact.
 * Vector lanes run along the output columns only, and every row of a tile, whatever its height,
 * is the same instruction sequence on its own registers: that is what makes a row's bits
 * independent of its neighbours. Columns past n are zero in the packed panels and computed into
 * a scratch tile, never stored.
 *
 * Two kernels, chosen once at run time: AVX2+FMA (8 lanes, two vectors a panel) and a generic
 * one with fmaf. fmaf is exactly the FMA instruction's rounding, so both give the same bits. */
#include "gemm.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "bigalloc.h"
#include "log.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HAVE_AVX2_PATH 1
#endif

#define GEMM_MR 6    /* rows per tile: 12 accumulators of 8 lanes, with 2 for W and 1 for x */
#define GEMM_MC 72   /* rows packed at a time: 72 KiB of a k block, L2-resident */
#define GEMM_POOL_MIN_FMAS (1u << 19) /* below, a pool computes on the calling thread alone */
#define PACK_KB 64   /* inputs per block when packing whole panels */

_Static_assert(GEMM_KC % PACK_KB == 0, "a packing block lies within one k block");

_Static_assert(GEMM_NR == 16, "the kernels hold a panel row in two 8-lane vectors");

/* Panel p's block of inputs [k0, k0 + kc) (k0 a multiple of GEMM_KC): [kc][GEMM_NR]. The blocks
 * of one k0 lie side by side for every panel, in panel order, so that the loop of gemm_run, which
 * takes every panel for one k block before the next block, reads the weights front to back: a
 * GEMV, all the weights for one row, then streams as memcpy does, instead of jumping a whole
 * panel's k (256 KiB at 4096 inputs) after every 16 KiB. */
static float *panel_block(const struct gemm_weights *g, uint32_t p, uint32_t k0)
{
    uint32_t kc = g->k - k0 < GEMM_KC ? g->k - k0 : GEMM_KC;

    return g->panels + (size_t)g->np * k0 * GEMM_NR + (size_t)p * kc * GEMM_NR;
}

int gemm_pack_init(struct gemm_weights *g, uint32_t n, uint32_t k, struct tp_err *err)
{
    uint32_t np;
    size_t count;
    float *p;

    *g = (struct gemm_weights){0};
    if (n == 0 || k == 0)
        return tp_err_set(err, TP_EINVAL, "cannot pack a [%u, %u] weight", n, k);
    np = (uint32_t)(((uint64_t)n + GEMM_NR - 1) / GEMM_NR);
    if (__builtin_mul_overflow((size_t)np * GEMM_NR, (size_t)k, &count) ||
        count > (SIZE_MAX - 63) / 4)
        return tp_err_set(err, TP_EINVAL, "a [%u, %u] weight is too large to pack", n, k);
    p = bigalloc(count * 4); /* as large as W: huge pages where the kernel gives them */
    if (!p)
        return tp_err_set(err, TP_ENOMEM, "no memory for %zu bytes of packed weights", count * 4);
    *g = (struct gemm_weights){.n = n, .k = k, .np = np, .panels = p};
    if (n % GEMM_NR) /* the last panel's columns past n stay zero, in every k block */
        for (uint32_t k0 = 0; k0 < k; k0 += GEMM_KC)
            memset(panel_block(g, np - 1, k0), 0,
                   (size_t)(k - k0 < GEMM_KC ? k - k0 : GEMM_KC) * GEMM_NR * 4);
    return 0;
}

void gemm_pack_rows(struct gemm_weights *g, const float *w, uint32_t j0, uint32_t rows,
                    size_t ldw)
{
    uint32_t j = 0;

    if (j0 + rows > g->n)
        rows = j0 < g->n ? g->n - j0 : 0;
    /* whole panels, a block of PACK_KB inputs at a time: the block's 16 source rows are read in
     * order and its PACK_KB panel rows (4 KiB) stay in L1 while they fill; 3 to 5 times faster
     * than a row at a time, which packing multi-GiB layers at load notices */
    for (; j0 % GEMM_NR == 0 && j + GEMM_NR <= rows; j += GEMM_NR) {
        uint32_t p = (j0 + j) / GEMM_NR;
        const float *src = w + (size_t)j * ldw;

        for (uint32_t kb = 0; kb < g->k; kb += PACK_KB) { /* PACK_KB divides GEMM_KC */
            uint32_t ke = g->k - kb < PACK_KB ? g->k : kb + PACK_KB, k0 = kb / GEMM_KC * GEMM_KC;
            float *dst = panel_block(g, p, k0) - (size_t)k0 * GEMM_NR;

            for (uint32_t c = 0; c < GEMM_NR; c++)
                for (uint32_t kk = kb; kk < ke; kk++)
                    dst[(size_t)kk * GEMM_NR + c] = src[(size_t)c * ldw + kk];
        }
    }
    /* the rest a row at a time (a chunk that does not start or end at a panel's edge) */
    for (; j < rows; j++) {
        uint32_t p = (j0 + j) / GEMM_NR, c = (j0 + j) % GEMM_NR;
        const float *src = w + (size_t)j * ldw;

        for (uint32_t k0 = 0; k0 < g->k; k0 += GEMM_KC) {
            uint32_t ke = g->k - k0 < GEMM_KC ? g->k : k0 + GEMM_KC;
            float *dst = panel_block(g, p, k0) - (size_t)k0 * GEMM_NR + c;

            for (uint32_t kk = k0; kk < ke; kk++)
                dst[(size_t)kk * GEMM_NR] = src[kk];
        }
    }
}

int gemm_pack(struct gemm_weights *g, const float *w, uint32_t n, uint32_t k, size_t ldw,
              struct tp_err *err)
{
    if (ldw < k)
        return tp_err_set(err, TP_EINVAL, "cannot pack a [%u, %u] weight with %zu floats a row",
                          n, k, ldw);
    if (gemm_pack_init(g, n, k, err) < 0)
        return -1;
    gemm_pack_rows(g, w, 0, n, ldw);
    return 0;
}

void gemm_free(struct gemm_weights *g)
{
    free(g->panels);
    *g = (struct gemm_weights){0};
}

/* One tile: rows [0, mr) of x (ldx), k in [0, kc) of the panel block pw, into c (ldc, all
 * GEMM_NR columns valid): the block's chain from zero, added to init (the bias row, on the first
 * k block) or else to c. */
static void tile_generic(int mr, const float *xp, const float *pw, uint32_t kc,
                         const float *init, float *c, size_t ldc)
{
    float acc[GEMM_MR][GEMM_NR] = {{0}};

    for (uint32_t kk = 0; kk < kc; kk++) {
        const float *b = pw + (size_t)kk * GEMM_NR;

        for (int i = 0; i < mr; i++) {
            float a = xp[(size_t)kk * GEMM_MR + i];

            for (int j = 0; j < GEMM_NR; j++)
                acc[i][j] = fmaf(a, b[j], acc[i][j]);
        }
    }
    for (int i = 0; i < mr; i++) {
        const float *base = init ? init : c + (size_t)i * ldc;

        for (int j = 0; j < GEMM_NR; j++)
            c[(size_t)i * ldc + j] = base[j] + acc[i][j];
    }
}

#ifdef HAVE_AVX2_PATH
/* The same tile with AVX2: inlined into one function per height, so mr is a constant and the
 * accumulators live in registers. */
__attribute__((target("avx2,fma"), always_inline)) static inline void
tile_avx2(const int mr, const float *xp, const float *pw, uint32_t kc, const float *init,
          float *c, size_t ldc)
{
    __m256 lo[GEMM_MR], hi[GEMM_MR];

    _Pragma("GCC unroll 6") for (int i = 0; i < mr; i++) {
        lo[i] = _mm256_setzero_ps();
        hi[i] = _mm256_setzero_ps();
    }
    _Pragma("GCC unroll 4") for (uint32_t kk = 0; kk < kc; kk++) {
        __m256 b0 = _mm256_load_ps(pw + (size_t)kk * GEMM_NR);
        __m256 b1 = _mm256_load_ps(pw + (size_t)kk * GEMM_NR + 8);

        _Pragma("GCC unroll 6") for (int i = 0; i < mr; i++) {
            __m256 a = _mm256_broadcast_ss(xp + (size_t)kk * GEMM_MR + i);

            lo[i] = _mm256_fmadd_ps(a, b0, lo[i]);
            hi[i] = _mm256_fmadd_ps(a, b1, hi[i]);
        }
    }
    _Pragma("GCC unroll 6") for (int i = 0; i < mr; i++) {
        const float *base = init ? init : c + (size_t)i * ldc;

        _mm256_storeu_ps(c + (size_t)i * ldc, _mm256_add_ps(_mm256_loadu_ps(base), lo[i]));
        _mm256_storeu_ps(c + (size_t)i * ldc + 8,
                         _mm256_add_ps(_mm256_loadu_ps(base + 8), hi[i]));
    }
}

#define TILE_AVX2(MR)                                                                            \
    __attribute__((target("avx2,fma"))) static void tile_avx2_##MR(                              \
        const float *xp, const float *pw, uint32_t kc, const float *init, float *c, size_t ldc)  \
    {                                                                                            \
        tile_avx2(MR, xp, pw, kc, init, c, ldc);                                                 \
    }
TILE_AVX2(1)
TILE_AVX2(2)
TILE_AVX2(3)
TILE_AVX2(4)
TILE_AVX2(5)
TILE_AVX2(6)

typedef void (*tile_fn)(const float *xp, const float *pw, uint32_t kc, const float *init,
                        float *c, size_t ldc);
static const tile_fn tiles_avx2[GEMM_MR + 1] = {NULL,         tile_avx2_1, tile_avx2_2, tile_avx2_3,
                                                tile_avx2_4, tile_avx2_5, tile_avx2_6};

static int have_avx2_fma(void)
{
    /* gcc and clang check that the OS saves the YMM registers for these */
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#else
static int have_avx2_fma(void)
{
    return 0;
}
#endif

/* 1 for the AVX2 kernel, 0 for the generic one, -1 until chosen; the choice is the same for
 * every thread, so a race to make it is harmless, and atomics keep it defined */
static int kernel = -1;

static int use_avx2_kernel(void)
{
    int k = __atomic_load_n(&kernel, __ATOMIC_RELAXED);

    if (k < 0) {
        k = have_avx2_fma();
        __atomic_store_n(&kernel, k, __ATOMIC_RELAXED);
    }
    return k;
}

static void tile(int use_avx2, int mr, const float *xp, const float *pw, uint32_t kc,
                 const float *init, float *c, size_t ldc)
{
#ifdef HAVE_AVX2_PATH
    if (use_avx2) {
        tiles_avx2[mr](xp, pw, kc, init, c, ldc);
        return;
    }
#endif
    (void)use_avx2;
    tile_generic(mr, xp, pw, kc, init, c, ldc);
}

/* Copies rows [0, mr) of x (ldx), inputs [0, kc), into xp as [kc][GEMM_MR]: the tile's rows
 * side by side, so its loads are contiguous (rows of x a power of two apart would otherwise
 * compete for the same cache sets). */
static void pack_rows(float *xp, const float *x, size_t ldx, int mr, uint32_t kc)
{
    for (int i = 0; i < mr; i++)
        for (uint32_t kk = 0; kk < kc; kk++)
            xp[(size_t)kk * GEMM_MR + i] = x[(size_t)i * ldx + kk];
}

const char *gemm_kernel_name(void)
{
    return use_avx2_kernel() ? "avx2" : "generic";
}

int gemm_set_kernel(const char *name)
{
    int k;

    if (strcmp(name, "generic") == 0)
        k = 0;
    else if (strcmp(name, "avx2") == 0 && have_avx2_fma())
        k = 1;
    else
        return -1;
    __atomic_store_n(&kernel, k, __ATOMIC_RELAXED);
    return 0;
}

/* One panel p for k block [k0, k0 + kc) of the mc packed rows xp, into y (ldy). */
static void panel(int use_avx2, const struct gemm_weights *g, uint32_t p, uint32_t k0,
                  uint32_t kc, const float *xp, uint32_t mc, const float *bias, float *y,
                  size_t ldy, float *init, float *part)
{
    const float *pw = panel_block(g, p, k0);
    uint32_t j0 = p * GEMM_NR, cols = g->n - j0 < GEMM_NR ? g->n - j0 : GEMM_NR;
    const float *start = NULL;

    if (k0 == 0) {
        memset(init, 0, GEMM_NR * sizeof(float));
        if (bias)
            memcpy(init, bias + j0, (size_t)cols * 4);
        start = init;
    }
    for (uint32_t i = 0; i < mc; i += GEMM_MR) {
        int mr = mc - i < GEMM_MR ? (int)(mc - i) : GEMM_MR;
        const float *xa = xp + (size_t)i * kc;
        float *c = y + (size_t)i * ldy + j0;

        if (cols == GEMM_NR) {
            tile(use_avx2, mr, xa, pw, kc, start, c, ldy);
            continue;
        }
        /* the last, partial panel: through a full-width scratch tile */
        for (int r = 0; r < mr && !start; r++)
            memcpy(part + r * GEMM_NR, c + (size_t)r * ldy, (size_t)cols * 4);
        tile(use_avx2, mr, xa, pw, kc, start, part, GEMM_NR);
        for (int r = 0; r < mr; r++)
            memcpy(c + (size_t)r * ldy, part + r * GEMM_NR, (size_t)cols * 4);
    }
}

void gemm_run(const struct gemm_weights *g, const float *x, size_t ldx, uint32_t rows,
              const float *bias, float *y, size_t ldy, uint32_t p0, uint32_t p1)
{
    int use_avx2 = use_avx2_kernel();
    float init[GEMM_NR], part[GEMM_MR * GEMM_NR] = {0}; /* a panel's bias; a partial panel's tile */
    static _Thread_local float xp[GEMM_MC * GEMM_KC]; /* a block of packed rows */

    if (p1 > g->np)
        p1 = g->np;
    for (uint32_t k0 = 0; k0 < g->k; k0 += GEMM_KC) {
        uint32_t kc = g->k - k0 < GEMM_KC ? g->k - k0 : GEMM_KC;

        for (uint32_t i0 = 0; i0 < rows; i0 += GEMM_MC) {
            uint32_t mc = rows - i0 < GEMM_MC ? rows - i0 : GEMM_MC;

            for (uint32_t i = 0; i < mc; i += GEMM_MR)
                pack_rows(xp + (size_t)i * kc, x + (size_t)(i0 + i) * ldx + k0, ldx,
                          mc - i < GEMM_MR ? (int)(mc - i) : GEMM_MR, kc);
            for (uint32_t p = p0; p < p1; p++)
                panel(use_avx2, g, p, k0, kc, xp, mc, bias, y + (size_t)i0 * ldy, ldy, init, part);
        }
    }
}

/* -- the pool ------------------------------------------------------------------------------ */

struct gemm_pool {
    int threads;          /* the caller and threads - 1 helpers */
    int launched;         /* the helpers were started (at the first run that needs them) */
    int started;          /* helpers running: 1 to started; the caller computes the others' */
    pthread_t *tids;      /* [threads - 1] */
    pthread_mutex_t lock; /* guards everything below */
    pthread_cond_t wake, idle;
    uint64_t generation;  /* bumped once per call, and once to stop */
    int pending;          /* helpers still computing this generation */
    int stop;
    struct {              /* the call being computed */
        const struct gemm_weights *g;
        const float *x, *bias;
        float *y;
        size_t ldx, ldy;
        uint32_t rows;
    } call;
};

struct helper_arg {
    struct gemm_pool *p;
    int index;
};

/* Thread t's share: an even split of whole panels. */
static void run_share(struct gemm_pool *p, int t)
{
    const struct gemm_weights *g = p->call.g;
    uint32_t p0 = (uint32_t)((uint64_t)g->np * (uint64_t)t / (uint64_t)p->threads);
    uint32_t p1 = (uint32_t)((uint64_t)g->np * (uint64_t)(t + 1) / (uint64_t)p->threads);

    if (p0 < p1)
        gemm_run(g, p->call.x, p->call.ldx, p->call.rows, p->call.bias, p->call.y, p->call.ldy,
                 p0, p1);
}

static void *helper_main(void *arg)
{
    struct helper_arg a = *(struct helper_arg *)arg;
    struct gemm_pool *p = a.p;
    uint64_t seen = 0;

    free(arg);
    pthread_setname_np(pthread_self(), "tpd-gemm");
    pthread_mutex_lock(&p->lock);
    for (;;) {
        while (p->generation == seen)
            pthread_cond_wait(&p->wake, &p->lock);
        seen = p->generation;
        if (p->stop)
            break;
        pthread_mutex_unlock(&p->lock);
        run_share(p, a.index);
        pthread_mutex_lock(&p->lock);
        if (--p->pending == 0)
            pthread_cond_signal(&p->idle);
    }
    pthread_mutex_unlock(&p->lock);
    return NULL;
}

int gemm_pool_create(struct gemm_pool **out, int threads, struct tp_err *err)
{
    struct gemm_pool *p = calloc(1, sizeof(*p));

    *out = NULL;
    if (!p)
        return tp_err_set(err, TP_ENOMEM, "no memory for a gemm pool");
    p->threads = threads < 1 ? 1 : threads;
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->wake, NULL);
    pthread_cond_init(&p->idle, NULL);
    p->tids = calloc((size_t)p->threads, sizeof(*p->tids));
    if (!p->tids) {
        gemm_pool_destroy(p);
        return tp_err_set(err, TP_ENOMEM, "no memory for %d gemm threads", threads);
    }
    *out = p;
    return 0;
}

/* Starts the helpers, from the thread of the first run that needs them: they inherit its
 * scheduling (a pool made by a loader thread of low priority still computes at the priority of
 * the thread that serves the jobs). A helper that cannot start leaves its share to the caller. */
static void launch(struct gemm_pool *p)
{
    int e = ENOMEM;

    p->launched = 1;
    for (int i = 1; i < p->threads; i++) {
        struct helper_arg *a = malloc(sizeof(*a));

        if (!a)
            break;
        *a = (struct helper_arg){.p = p, .index = i};
        e = pthread_create(&p->tids[i - 1], NULL, helper_main, a);
        if (e != 0) {
            free(a);
            break;
        }
        p->started++;
    }
    if (p->started < p->threads - 1)
        tp_log(TP_LOG_WARN, "gemm: %d of %d threads started (%s); the others' share runs on the "
               "calling thread", p->started + 1, p->threads, strerror(e));
}

void gemm_pool_run(struct gemm_pool *p, const struct gemm_weights *g, const float *x, size_t ldx,
                   uint32_t rows, const float *bias, float *y, size_t ldy)
{
    /* waking the helpers costs tens of microseconds: a small call is faster on one thread */
    if (p->threads == 1 || (uint64_t)rows * g->n * g->k < GEMM_POOL_MIN_FMAS) {
        gemm_run(g, x, ldx, rows, bias, y, ldy, 0, g->np);
        return;
    }
    if (!p->launched)
        launch(p);
    pthread_mutex_lock(&p->lock);
    p->call.g = g;
    p->call.x = x;
    p->call.ldx = ldx;
    p->call.rows = rows;
    p->call.bias = bias;
    p->call.y = y;
    p->call.ldy = ldy;
    p->pending = p->started;
    p->generation++;
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->lock);
    run_share(p, 0);
    for (int t = p->started + 1; t < p->threads; t++) /* the helpers that did not start */
        run_share(p, t);
    pthread_mutex_lock(&p->lock);
    while (p->pending > 0)
        pthread_cond_wait(&p->idle, &p->lock);
    pthread_mutex_unlock(&p->lock);
}

void gemm_pool_destroy(struct gemm_pool *p)
{
    if (!p)
        return;
    pthread_mutex_lock(&p->lock);
    p->stop = 1;
    p->generation++;
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->lock);
    for (int i = 0; i < p->started; i++)
        pthread_join(p->tids[i], NULL);
    free(p->tids);
    pthread_cond_destroy(&p->idle);
    pthread_cond_destroy(&p->wake);
    pthread_mutex_destroy(&p->lock);
    free(p);
}
