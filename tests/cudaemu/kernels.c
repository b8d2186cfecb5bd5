/* kernels.c -- libtpcudaemu's versions of the cuda backend's kernels (worker/backend_cuda_kern.h),
 * written from that header's contract and PyTorch's definitions, not from the .cu: they run on
 * the stream's thread, over the emulator's device memory, every range checked first. The .cu
 * kernels themselves run only on a GPU (bench/gpu-check.sh). */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "backend_cuda_kern.h"
#include "cudaemu.h"

/* Round to nearest even: float to IEEE binary16, and to bfloat16 (NaN stays a quiet NaN). */
static uint16_t to_f16(float v)
{
    _Float16 h = (_Float16)v;
    uint16_t bits;

    memcpy(&bits, &h, sizeof(bits));
    return bits;
}

static uint16_t to_bf16(float v)
{
    uint32_t u;

    memcpy(&u, &v, sizeof(u));
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((u >> 16) | 0x40u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

float cudaemu_half_value(uint16_t bits, int bf16)
{
    if (bf16) {
        uint32_t u = (uint32_t)bits << 16;
        float v;

        memcpy(&v, &u, sizeof(v));
        return v;
    }
    {
        _Float16 h;

        memcpy(&h, &bits, sizeof(h));
        return (float)h;
    }
}

struct half_job {
    uint16_t *dst;
    const float *src;
    size_t n;
    int bf16;
    unsigned long long *first_inf;
};

static void run_to_half(void *arg)
{
    const struct half_job *j = arg;

    for (size_t i = 0; i < j->n; i++) {
        float v = j->src[i];
        uint16_t h = j->bf16 ? to_bf16(v) : to_f16(v);
        float back = cudaemu_half_value(h, j->bf16);

        j->dst[i] = h;
        if (j->first_inf && isinf(back) && !isinf(v) && i < *j->first_inf)
            *j->first_inf = i;
    }
}

cudaError_t cuda_kern_to_half(void *dst, const float *src, size_t n, int bf16,
                              unsigned long long *first_inf, cudaStream_t st)
{
    const char *call = "cuda_kern_to_half";
    struct half_job j;

    if (n == 0)
        return cudaSuccess;
    j = (struct half_job){
        .dst = cudaemu_dev(dst, n * 2, call, "dst"),
        .src = cudaemu_dev(src, n * sizeof(float), call, "src"),
        .n = n,
        .bf16 = bf16,
        .first_inf =
            first_inf ? cudaemu_dev(first_inf, sizeof(*first_inf), call, "first_inf") : NULL};
    cudaemu_enqueue(st, call, run_to_half, &j, sizeof(j));
    return cudaSuccess;
}

struct bias_job {
    float *y;
    const float *b;
    uint32_t rows, cols;
};

static void run_fill_bias(void *arg)
{
    const struct bias_job *j = arg;

    for (size_t i = 0; i < j->rows; i++)
        memcpy(j->y + i * j->cols, j->b, j->cols * sizeof(float));
}

cudaError_t cuda_kern_fill_bias(float *y, const float *b, uint32_t rows, uint32_t cols,
                                cudaStream_t st)
{
    const char *call = "cuda_kern_fill_bias";
    struct bias_job j;

    if ((size_t)rows * cols == 0)
        return cudaSuccess;
    j = (struct bias_job){.y = cudaemu_dev(y, (size_t)rows * cols * sizeof(float), call, "y"),
                          .b = cudaemu_dev(b, cols * sizeof(float), call, "b"),
                          .rows = rows,
                          .cols = cols};
    cudaemu_enqueue(st, call, run_fill_bias, &j, sizeof(j));
    return cudaSuccess;
}

/* PyTorch's definitions, in float: silu t·σ(t), gelu ½t(1 + erf(t/√2)), gelu_tanh
 * ½t(1 + tanh(√(2/π)(t + 0.044715t³))), relu max(t, 0). */
static float act1(int act, float t)
{
    switch (act) {
    case 1: return t / (1.0f + expf(-t));
    case 2: return 0.5f * t * (1.0f + erff(t / sqrtf(2.0f)));
    case 3:
        return 0.5f * t * (1.0f + tanhf(sqrtf(2.0f / (float)M_PI) * (t + 0.044715f * t * t * t)));
    case 4: return t > 0.0f || isnan(t) ? t : 0.0f;
    default: cudaemu_fatal("cuda_kern_act: activation %d is none of 1 to 4", act);
    }
}

struct act_job {
    float *h;
    const float *t;
    size_t ldt;
    uint32_t rows, n;
    int act, gated;
};

static void run_act(void *arg)
{
    const struct act_job *j = arg;

    for (size_t r = 0; r < j->rows; r++)
        for (size_t c = 0; c < j->n; c++) {
            const float *tr = j->t + r * j->ldt;
            float v = act1(j->act, tr[c]);

            j->h[r * j->n + c] = j->gated ? v * tr[j->n + c] : v;
        }
}

cudaError_t cuda_kern_act(float *h, const float *t, size_t ldt, uint32_t rows, uint32_t n, int act,
                          int gated, cudaStream_t st)
{
    const char *call = "cuda_kern_act";
    size_t width = gated ? 2 * (size_t)n : n; /* floats of t each row uses */
    struct act_job j;

    if ((size_t)rows * n == 0)
        return cudaSuccess;
    if (ldt < width)
        cudaemu_fatal("%s: ldt %zu is less than the %zu floats a row uses", call, ldt, width);
    j = (struct act_job){
        .h = cudaemu_dev(h, (size_t)rows * n * sizeof(float), call, "h"),
        .t = cudaemu_dev(t, ((size_t)(rows - 1) * ldt + width) * sizeof(float), call, "t"),
        .ldt = ldt,
        .rows = rows,
        .n = n,
        .act = act,
        .gated = gated};
    cudaemu_enqueue(st, call, run_act, &j, sizeof(j));
    return cudaSuccess;
}
