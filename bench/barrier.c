/* barrier.c -- how the ranks of a reducing model should meet at the all-reduce, and what the
 * reduce itself costs: the pieces of worker/block.c timed alone, without GEMMs or gRPC.
 *
 *   barrier [--ranks N] [--rounds R] [--warmup W] [--spin NS,...] [--rows B,...] [--cols C]
 *           [--reduce-iters K] [--timeout S]
 *
 * It forks N rank processes that share one memfd mapping, as tpd's workers share the arena, and
 * times, in every rank, each round of a loop that does nothing but meet:
 *
 *   counter      block_arrive on an arrival counter in the mapping, as a worker does after its
 *                partial sum (ctl_fd -1: nothing to watch), once per --spin value (0: straight
 *                to futex waits; worker/backend_cpu.c spins 50 us). tpd's coordinator zeroes a
 *                slot's counter before each job; here each round has a counter of its own, on
 *                its own cache line, all zeroed before the ranks start, so nothing resets one
 *                while a rank may still read it;
 *   coordinator  what meeting through the coordinator would cost: each rank sends one datagram
 *                of a ctl message's size over its own SOCK_SEQPACKET socketpair to the parent,
 *                which waits for all N and then answers each.
 *
 * A round's time is the time between a rank's returns from two meetings in a row; the median
 * and p99 are over all ranks' rounds after the warm-up. Then, in this process, block_reduce of
 * one rank's stripe (block_stripe of --cols over N ranks, rank 0) of N partials of
 * [rows, cols] float32 for each --rows, against memcpy of the bytes that reduce reads (N
 * stripes), contiguous. Both run on buffers that stay in this core's cache between calls; in tpd
 * the other ranks' partials were just written by other cores.
 *
 * Each rank also counts its context switches and notes the CPUs it ran on: where the ranks
 * outnumber the free cores, a spinning rank holds the core its peer needs to arrive, and a
 * round then costs the whole spin.
 *
 * It prints every measurement and a `barrier-result:` line of key=value for each. It asserts
 * nothing about speed. Children die with the parent (PR_SET_PDEATHSIG) and are killed and
 * reaped on every error and after --timeout seconds. */
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "block.h"
#include "ctl.h"
#include "timing.h"

#define MAX_RANKS 64
#define MAX_LIST 16
#define MAX_ROUNDS 1000000L
#define LINE 64 /* bytes between two rounds' counters */
#define MSG_BYTES sizeof(struct ctl_msg)

struct opts {
    long ranks, rounds, warmup, cols, reduce_iters, timeout;
    long spin[MAX_LIST], nspin;
    long rows[MAX_LIST], nrows;
};

/* What a rank says about its run: context switches show when ranks had to share a core. */
struct rank_stats {
    long vol, invol; /* voluntary and involuntary context switches, warm-up and rounds */
    int cpu0, cpu1;  /* the CPU it ran on first and last (sched_getcpu) */
};

/* What the ranks share: the counters of every round, then each rank's round times. */
struct shared {
    int fd;         /* memfd, -1 when empty */
    char *base;     /* mapping, MAP_FAILED when empty */
    size_t size;    /* bytes */
    char *counters; /* (warmup + rounds) lines of LINE bytes, a uint32_t counter first in each */
    double *times;  /* [ranks][rounds] seconds */
    struct rank_stats *stats; /* [ranks] */
};

struct group {
    long n;
    pid_t pid[MAX_RANKS]; /* -1 once reaped */
    int fd[MAX_RANKS];    /* coordinator: the parent's end of rank r's socketpair, else -1 */
};

static volatile sig_atomic_t timed_out;

static void on_alarm(int sig)
{
    (void)sig;
    timed_out = 1;
}

static int usage(FILE *f)
{
    fprintf(f, "usage: barrier [--ranks N] [--rounds R] [--warmup W] [--spin NS,...] "
               "[--rows B,...] [--cols C] [--reduce-iters K] [--timeout S]\n"
               "  --ranks N         rank processes (default 2)\n"
               "  --rounds R        measured meetings per method (default 20000)\n"
               "  --warmup W        meetings before those (default 1000)\n"
               "  --spin NS,...     block_arrive spin times to measure, ns (default 0,50000)\n"
               "  --rows B,...      rows of the reduce (default 1,16,64)\n"
               "  --cols C          columns of a partial: the model's outputs (default 4096)\n"
               "  --reduce-iters K  timed calls of block_reduce and of memcpy (default 2000)\n"
               "  --timeout S       seconds before the ranks are taken for hung (default 300)\n");
    return f == stdout ? 0 : 64;
}

/* A comma-separated list of non-negative integers into v (at most MAX_LIST): its length, or -1. */
static long parse_list(const char *s, long *v)
{
    long n = 0;

    while (*s) {
        char *end;

        errno = 0;
        if (n == MAX_LIST || *s < '0' || *s > '9')
            return -1;
        v[n++] = strtol(s, &end, 10);
        if (errno || end == s || (*end && *end != ','))
            return -1;
        s = *end ? end + 1 : end;
    }
    return n;
}

static int parse(int argc, char **argv, struct opts *o)
{
    *o = (struct opts){.ranks = 2,
                       .rounds = 20000,
                       .warmup = 1000,
                       .cols = 4096,
                       .reduce_iters = 2000,
                       .timeout = 300,
                       .spin = {0, 50000},
                       .nspin = 2,
                       .rows = {1, 16, 64},
                       .nrows = 3};
    for (int i = 1; i < argc; i++) {
        const char *name = argv[i], *val = i + 1 < argc ? argv[i + 1] : NULL;
        long *num = NULL, lo = 0, hi = 0;
        char *end;

        if (strcmp(name, "--help") == 0)
            return usage(stdout) == 0 ? 1 : -1;
        if (!val) {
            fprintf(stderr, "barrier: %s needs a value\n", name);
            return -1;
        }
        i++;
        if (strcmp(name, "--spin") == 0 || strcmp(name, "--rows") == 0) {
            int spin = name[2] == 's';
            long n = parse_list(val, spin ? o->spin : o->rows);

            if (n < 1) {
                fprintf(stderr, "barrier: %s takes up to %d integers, comma separated, got '%s'\n",
                        name, MAX_LIST, val);
                return -1;
            }
            *(spin ? &o->nspin : &o->nrows) = n;
            continue;
        }
        if (strcmp(name, "--ranks") == 0)
            num = &o->ranks, lo = 1, hi = MAX_RANKS;
        else if (strcmp(name, "--rounds") == 0)
            num = &o->rounds, lo = 1, hi = MAX_ROUNDS;
        else if (strcmp(name, "--warmup") == 0)
            num = &o->warmup, lo = 0, hi = MAX_ROUNDS;
        else if (strcmp(name, "--cols") == 0)
            num = &o->cols, lo = 1, hi = 1L << 20;
        else if (strcmp(name, "--reduce-iters") == 0)
            num = &o->reduce_iters, lo = 1, hi = MAX_ROUNDS;
        else if (strcmp(name, "--timeout") == 0)
            num = &o->timeout, lo = 1, hi = 86400;
        else {
            fprintf(stderr, "barrier: unknown option '%s'\n", name);
            usage(stderr);
            return -1;
        }
        errno = 0;
        *num = strtol(val, &end, 10);
        if (errno || end == val || *end || *num < lo || *num > hi) {
            fprintf(stderr, "barrier: %s takes an integer from %ld to %ld, got '%s'\n", name, lo,
                    hi, val);
            return -1;
        }
    }
    for (long i = 0; i < o->nrows; i++) {
        if (o->rows[i] < 1 || o->rows[i] > 65536) {
            fprintf(stderr, "barrier: --rows takes values from 1 to 65536, got %ld\n", o->rows[i]);
            return -1;
        }
    }
    return 0;
}

static void shared_close(struct shared *s)
{
    if (s->base != MAP_FAILED)
        munmap(s->base, s->size);
    if (s->fd >= 0)
        close(s->fd);
    s->base = MAP_FAILED;
    s->fd = -1;
}

static int shared_open(struct shared *s, const struct opts *o, struct tp_err *err)
{
    size_t lines = (size_t)(o->warmup + o->rounds) * LINE;
    size_t times = (size_t)o->ranks * (size_t)o->rounds * sizeof(double);

    *s = (struct shared){.fd = memfd_create("tpd-barrier", MFD_CLOEXEC), .base = MAP_FAILED};
    s->size = lines + times + MAX_RANKS * sizeof(struct rank_stats);
    if (s->fd < 0 || ftruncate(s->fd, (off_t)s->size) < 0)
        goto fail;
    s->base = mmap(NULL, s->size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, s->fd, 0);
    if (s->base == MAP_FAILED)
        goto fail;
    s->counters = s->base;
    s->times = (double *)(s->base + lines);
    s->stats = (struct rank_stats *)(s->base + lines + times);
    return 0;
fail:
    tp_err_sys(err, "making a shared mapping of %zu bytes", s->size);
    shared_close(s);
    return -1;
}

/* Kills the ranks still running and reaps them all. */
static void group_kill(struct group *g)
{
    for (long r = 0; r < g->n; r++)
        if (g->pid[r] > 0)
            kill(g->pid[r], SIGKILL);
    for (long r = 0; r < g->n; r++) {
        if (g->pid[r] > 0)
            while (waitpid(g->pid[r], NULL, 0) < 0 && errno == EINTR)
                ;
        g->pid[r] = -1;
        if (g->fd[r] >= 0)
            close(g->fd[r]);
        g->fd[r] = -1;
    }
    g->n = 0;
}

/* Waits for every rank to exit 0; on the first that does not, or on the timeout, kills the rest. */
static int group_wait(struct group *g, struct tp_err *err)
{
    for (long left = g->n; left > 0;) {
        int st;
        pid_t p = waitpid(-1, &st, 0);

        if (p < 0 && errno == EINTR && timed_out) {
            tp_err_set(err, TP_ETIMEDOUT, "the ranks did not finish within --timeout");
            goto fail;
        }
        if (p < 0 && errno == EINTR)
            continue;
        if (p < 0) {
            tp_err_sys(err, "waiting for the ranks");
            goto fail;
        }
        for (long r = 0; r < g->n; r++) {
            if (g->pid[r] != p)
                continue;
            g->pid[r] = -1;
            left--;
            if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
                if (WIFSIGNALED(st))
                    tp_err_set(err, TP_EINTERNAL, "rank %ld was killed by signal %d (%s)", r,
                               WTERMSIG(st), strsignal(WTERMSIG(st)));
                else
                    tp_err_set(err, TP_EINTERNAL, "rank %ld exited %d", r, WEXITSTATUS(st));
                goto fail;
            }
        }
    }
    group_kill(g);
    return 0;
fail:
    group_kill(g);
    return -1;
}

/* One rank's loop: warmup + rounds meetings, each round's time into times. spin < 0: through the
 * coordinator on fd, else block_arrive with that spin. */
static int rank_run(const struct opts *o, struct shared *s, long rank, long spin, int fd)
{
    double *t = s->times + (size_t)rank * (size_t)o->rounds, last = timing_now_s();
    char msg[MSG_BYTES];
    struct tp_err err = {0};
    struct rusage u0, u1;

    memset(msg, 0, sizeof(msg));
    s->stats[rank].cpu0 = sched_getcpu();
    if (getrusage(RUSAGE_SELF, &u0) < 0) {
        perror("barrier: getrusage");
        return -1;
    }
    for (long k = 0; k < o->warmup + o->rounds; k++) {
        double now;

        if (spin >= 0) {
            uint32_t *c = (uint32_t *)(s->counters + (size_t)k * LINE);

            if (block_arrive(c, (uint32_t)o->ranks, -1, spin, &err) < 0) {
                fprintf(stderr, "barrier: rank %ld, round %ld: %s\n", rank, k, err.msg);
                return -1;
            }
        } else {
            ssize_t n = send(fd, msg, sizeof(msg), MSG_NOSIGNAL);

            if (n == (ssize_t)sizeof(msg))
                n = recv(fd, msg, sizeof(msg), 0);
            if (n != (ssize_t)sizeof(msg)) {
                fprintf(stderr, "barrier: rank %ld, round %ld: %s\n", rank, k,
                        n < 0 ? strerror(errno) : "the coordinator is gone");
                return -1;
            }
        }
        now = timing_now_s();
        if (k >= o->warmup)
            t[k - o->warmup] = now - last;
        last = now;
    }
    if (getrusage(RUSAGE_SELF, &u1) < 0) {
        perror("barrier: getrusage");
        return -1;
    }
    s->stats[rank] = (struct rank_stats){.vol = u1.ru_nvcsw - u0.ru_nvcsw,
                                         .invol = u1.ru_nivcsw - u0.ru_nivcsw,
                                         .cpu0 = s->stats[rank].cpu0,
                                         .cpu1 = sched_getcpu()};
    return 0;
}

/* The coordinator's side: per round, one datagram from every rank, then one to each. */
static int coordinate(const struct opts *o, struct group *g, struct tp_err *err)
{
    char msg[MSG_BYTES];

    memset(msg, 0, sizeof(msg));
    for (long k = 0; k < o->warmup + o->rounds; k++) {
        for (long r = 0; r < g->n; r++) {
            ssize_t n = recv(g->fd[r], msg, sizeof(msg), 0);

            if (n < 0 && errno == EINTR && !timed_out) {
                r--;
                continue;
            }
            if (n < 0 && timed_out)
                return tp_err_set(err, TP_ETIMEDOUT, "round %ld: rank %ld sent nothing in time", k,
                                  r);
            if (n != (ssize_t)sizeof(msg))
                return n < 0 ? tp_err_sys(err, "round %ld: receiving from rank %ld", k, r)
                             : tp_err_set(err, TP_EUNAVAIL, "round %ld: rank %ld is gone", k, r);
        }
        for (long r = 0; r < g->n; r++)
            if (send(g->fd[r], msg, sizeof(msg), MSG_NOSIGNAL) != (ssize_t)sizeof(msg))
                return tp_err_sys(err, "round %ld: sending to rank %ld", k, r);
    }
    return 0;
}

/* Forks the ranks, lets them meet warmup + rounds times, and reaps them. spin < 0: through the
 * coordinator (this process). The round times are in s->times afterwards. */
static int measure(const struct opts *o, struct shared *s, long spin, struct tp_err *err)
{
    struct group g = {0};
    int sv[MAX_RANKS][2];
    pid_t parent = getpid();

    for (long r = 0; r < MAX_RANKS; r++)
        g.pid[r] = -1, g.fd[r] = -1, sv[r][0] = sv[r][1] = -1;
    memset(s->counters, 0, (size_t)(o->warmup + o->rounds) * LINE);
    memset(s->stats, 0, MAX_RANKS * sizeof(struct rank_stats));
    for (long r = 0; r < o->ranks; r++) {
        if (spin < 0 && socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv[r]) < 0) {
            tp_err_sys(err, "making the socketpair of rank %ld", r);
            goto fail;
        }
        g.fd[r] = sv[r][0]; /* group_kill closes it from here on */
        g.n = r + 1;
        g.pid[r] = fork();
        if (g.pid[r] < 0) {
            tp_err_sys(err, "forking rank %ld", r);
            goto fail;
        }
        if (g.pid[r] == 0) {
            /* the parent may die without killing us: then so do we */
            if (prctl(PR_SET_PDEATHSIG, SIGKILL) < 0 || getppid() != parent)
                _exit(1);
            for (long q = 0; q <= r; q++)
                if (g.fd[q] >= 0)
                    close(g.fd[q]);
            _exit(rank_run(o, s, r, spin, sv[r][1]) < 0 ? 1 : 0);
        }
        if (sv[r][1] >= 0)
            close(sv[r][1]);
        sv[r][1] = -1;
    }
    if (spin < 0 && coordinate(o, &g, err) < 0)
        goto fail;
    return group_wait(&g, err);
fail:
    group_kill(&g);
    for (long r = 0; r < o->ranks; r++)
        if (sv[r][1] >= 0)
            close(sv[r][1]);
    return -1;
}

static void report_meet(const struct opts *o, struct shared *s, long spin)
{
    size_t n = (size_t)o->ranks * (size_t)o->rounds;
    double sum = 0, *t = s->times;
    long vol = 0, invol = 0;

    for (size_t i = 0; i < n; i++)
        sum += t[i];
    for (long r = 0; r < o->ranks; r++)
        vol += s->stats[r].vol, invol += s->stats[r].invol;
    timing_sort(t, n);
    if (spin >= 0)
        printf("counter (block_arrive, spin %ld ns): ", spin);
    else
        printf("coordinator (%zu-byte datagrams over socketpairs): ", MSG_BYTES);
    printf("%ld ranks, %ld rounds each: median %.2f us, p99 %.2f us, mean %.2f us, max %.2f us\n",
           o->ranks, o->rounds, timing_percentile(t, n, 0.5) * 1e6,
           timing_percentile(t, n, 0.99) * 1e6, sum / (double)n * 1e6, t[n - 1] * 1e6);
    /* a rank that was preempted (involuntary) waited for a core: then the ranks shared one */
    printf("  context switches, all ranks: %ld voluntary, %ld involuntary; cpus (first-last):", vol,
           invol);
    for (long r = 0; r < o->ranks; r++)
        printf(" %d-%d", s->stats[r].cpu0, s->stats[r].cpu1);
    printf("\n");
    printf("barrier-result: method=%s spin_ns=%ld ranks=%ld rounds=%ld msg_bytes=%zu "
           "p50_us=%.3f p99_us=%.3f mean_us=%.3f max_us=%.3f csw_vol=%ld csw_invol=%ld\n",
           spin >= 0 ? "counter" : "coordinator", spin >= 0 ? spin : -1, o->ranks, o->rounds,
           spin >= 0 ? (size_t)0 : MSG_BYTES, timing_percentile(t, n, 0.5) * 1e6,
           timing_percentile(t, n, 0.99) * 1e6, sum / (double)n * 1e6, t[n - 1] * 1e6, vol, invol);
    fflush(stdout);
}

/* block_reduce of rank 0's stripe of ranks partials [rows, cols] against memcpy of the bytes it
 * reads; checks the sums. */
static int reduce_one(const struct opts *o, long rows, double *t, struct tp_err *err)
{
    size_t ld = (size_t)o->cols, n = (size_t)rows * ld, bytes;
    float *partial[MAX_RANKS] = {0}, *y = NULL, *src = NULL, *dst = NULL;
    int64_t c0, nc;
    double red, cpy;
    int rc = -1;

    block_stripe(o->cols, (int)o->ranks, 0, &c0, &nc);
    bytes = (size_t)o->ranks * (size_t)rows * (size_t)nc * sizeof(float);
    y = aligned_alloc(64, (n * sizeof(float) + 63) / 64 * 64);
    src = aligned_alloc(64, (bytes + 63) / 64 * 64 + 64);
    dst = aligned_alloc(64, (bytes + 63) / 64 * 64 + 64);
    if (!y || !src || !dst)
        goto nomem;
    for (long r = 0; r < o->ranks; r++) {
        partial[r] = aligned_alloc(64, (n * sizeof(float) + 63) / 64 * 64);
        if (!partial[r])
            goto nomem;
        /* small integers: every sum is exact, whatever its order */
        for (size_t i = 0; i < n; i++)
            partial[r][i] = (float)((i + (size_t)r * 7) % 13) - 6.0f;
    }
    memset(y, 0, n * sizeof(float));
    memset(src, 1, bytes);
    memset(dst, 0, bytes);
    for (long k = -o->reduce_iters / 10; k < o->reduce_iters; k++) {
        double t0 = timing_now_s();

        block_reduce(y, partial, (uint32_t)o->ranks, ld, (uint32_t)rows, c0, nc, NULL);
        if (k >= 0)
            t[k] = timing_now_s() - t0;
    }
    timing_sort(t, (size_t)o->reduce_iters);
    red = timing_percentile(t, (size_t)o->reduce_iters, 0.5);
    for (long k = -o->reduce_iters / 10; k < o->reduce_iters; k++) {
        double t0 = timing_now_s();

        memcpy(dst, src, bytes);
        if (k >= 0)
            t[k] = timing_now_s() - t0;
    }
    timing_sort(t, (size_t)o->reduce_iters);
    cpy = timing_percentile(t, (size_t)o->reduce_iters, 0.5);
    if (dst[bytes / sizeof(float) - 1] != src[bytes / sizeof(float) - 1]) {
        tp_err_set(err, TP_EINTERNAL, "memcpy of %zu bytes did not copy", bytes);
        goto out;
    }
    for (long i = 0; i < rows; i++) {
        for (int64_t c = c0; c < c0 + nc; c++) {
            float want = 0;

            for (long r = 0; r < o->ranks; r++)
                want += partial[r][(size_t)i * ld + (size_t)c];
            if (y[(size_t)i * ld + (size_t)c] != want) {
                tp_err_set(err, TP_EINTERNAL, "block_reduce gave y[%ld, %lld] = %g, expected %g", i,
                           (long long)c, (double)y[(size_t)i * ld + (size_t)c], (double)want);
                goto out;
            }
        }
    }
    printf("reduce: %ld ranks, rows %ld, columns [%lld, %lld) of %ld (rank 0's stripe): "
           "block_reduce median %.3f us (reads %zu bytes, writes %zu), memcpy of the bytes it "
           "reads %.3f us; reduce / memcpy %.2f; %.2f GB/s read\n",
           o->ranks, rows, (long long)c0, (long long)(c0 + nc), o->cols, red * 1e6, bytes,
           bytes / (size_t)o->ranks, cpy * 1e6, red / cpy, (double)bytes / red * 1e-9);
    printf("barrier-result: method=reduce ranks=%ld rows=%ld cols=%ld c0=%lld nc=%lld iters=%ld "
           "bytes_read=%zu bytes_written=%zu reduce_p50_us=%.3f memcpy_p50_us=%.3f "
           "reduce_over_memcpy=%.3f\n",
           o->ranks, rows, o->cols, (long long)c0, (long long)nc, o->reduce_iters, bytes,
           bytes / (size_t)o->ranks, red * 1e6, cpy * 1e6, red / cpy);
    fflush(stdout);
    rc = 0;
    goto out;
nomem:
    tp_err_set(err, TP_ENOMEM, "no memory for %ld partials of [%ld, %ld]", o->ranks, rows, o->cols);
out:
    for (long r = 0; r < o->ranks; r++)
        free(partial[r]);
    free(y);
    free(src);
    free(dst);
    return rc;
}

static void report_machine(const struct opts *o)
{
    char line[512], cpu[256] = "unknown";
    double load[3] = {0, 0, 0};
    FILE *f = fopen("/proc/cpuinfo", "r");

    while (f && fgets(line, sizeof(line), f)) {
        char *colon = strchr(line, ':');

        if (strncmp(line, "model name", 10) == 0 && colon) {
            snprintf(cpu, sizeof(cpu), "%s", colon + 2);
            cpu[strcspn(cpu, "\n")] = 0;
            break;
        }
    }
    if (f)
        fclose(f);
    if (getloadavg(load, 3) < 0)
        load[0] = load[1] = load[2] = -1;
    printf("# barrier: %ld ranks, %ld rounds after %ld of warm-up\n", o->ranks, o->rounds,
           o->warmup);
    printf("machine: %ld cores online (%s), load %.2f %.2f %.2f\n", sysconf(_SC_NPROCESSORS_ONLN),
           cpu, load[0], load[1], load[2]);
    fflush(stdout);
}

int main(int argc, char **argv)
{
    struct opts o;
    struct shared s = {.fd = -1, .base = MAP_FAILED};
    struct sigaction sa;
    struct tp_err err = {0};
    double *t = NULL;
    int rc = parse(argc, argv, &o);

    if (rc != 0)
        return rc > 0 ? 0 : 64;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_alarm; /* no SA_RESTART: a wait for the ranks returns EINTR */
    if (sigaction(SIGALRM, &sa, NULL) < 0) {
        perror("barrier: sigaction");
        return 1;
    }
    report_machine(&o);
    if (shared_open(&s, &o, &err) < 0)
        goto fail;
    alarm((unsigned)o.timeout);
    for (long i = 0; i <= o.nspin; i++) {
        long spin = i < o.nspin ? o.spin[i] : -1; /* the coordinator last */

        if (measure(&o, &s, spin, &err) < 0) {
            if (spin >= 0)
                tp_err_prefix(&err, "counter, spin %ld ns: ", spin);
            else
                tp_err_prefix(&err, "coordinator: ");
            goto fail;
        }
        report_meet(&o, &s, spin);
    }
    alarm(0);
    t = malloc((size_t)o.reduce_iters * sizeof(double));
    if (!t) {
        tp_err_set(&err, TP_ENOMEM, "no memory for %ld timings", o.reduce_iters);
        goto fail;
    }
    for (long i = 0; i < o.nrows; i++) {
        if (reduce_one(&o, o.rows[i], t, &err) < 0) {
            tp_err_prefix(&err, "reduce of %ld rows: ", o.rows[i]);
            goto fail;
        }
    }
    free(t);
    shared_close(&s);
    return 0;
fail:
    fprintf(stderr, "barrier: error: %s\n", err.msg);
    free(t);
    shared_close(&s);
    return 1;
}
