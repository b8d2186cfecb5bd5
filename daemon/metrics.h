/* metrics.h -- tpd's Prometheus metrics and its HTTP endpoints. The counters live in this file
 * only: the gRPC handlers, the supervisor and the scheduler report events through one-line
 * calls (metrics_request_done, metrics_job_start, ...) from any thread, and a small HTTP server
 * of tpd's own (one thread) serves them in the text exposition format 0.0.4 at /metrics,
 * beside the KServe v2 HTTP health endpoints /v2/health/live, /v2/health/ready and
 * /v2/models/NAME[/versions/V]/ready (200 when true, 503 when not, 404 for a model tpd does not
 * know). Every model's series carry its name in a model label; a model's counters start when it
 * is loaded (metrics_model_add) and its series go when it is unloaded.
 * The HTTP server starts before the workers, so a load balancer sees "not ready" while shards
 * load, and no client can starve it: a request head must arrive within 5 s, and a new
 * connection, when all 64 are taken, closes the oldest one that has not sent its head. Every
 * call before metrics_init, or after a failed one, does nothing. */
#ifndef TPD_METRICS_H
#define TPD_METRICS_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"

#define METRICS_MAX_MODELS 64 /* model ids 0 to 63, as the workers number them */

/* Sets up the counters for nranks workers and nslots slots (of all models together). Call once,
 * before any other thread reports. */
int metrics_init(int nranks, uint32_t nslots, struct tp_err *err);

/* Model id, called name, owns slots [slot0, slot0 + nslots): its counters start from zero. -1
 * when the id is taken or out of range, or without memory. */
int metrics_model_add(int id, const char *name, uint32_t slot0, uint32_t nslots);

/* Model id is unloaded: its series go, its slots are nobody's. */
void metrics_model_remove(int id);

/* CLOCK_MONOTONIC now, in nanoseconds, and the seconds elapsed since t0_ns. */
int64_t metrics_now_ns(void);
double metrics_since(int64_t t0_ns);

/* A ModelInfer call was answered: model as the client named it (NULL when the message could not
 * be read; a name that no loaded model has is counted under model=""), its gRPC status code, the
 * seconds from arrival to reply, the rows it carried (0 if not known) and the bytes of the request
 * and response messages. */
void metrics_request_done(const char *model, int code, double seconds, uint32_t rows,
                          size_t bytes_in, size_t bytes_out);

/* The job about to go to slot (in the one numbering of all models' slots, as every slot below):
 * its requests' inputs took ns to copy into the slot (Triton's compute_input). */
void metrics_job_fill(uint32_t slot, int64_t ns);

/* The job on slot went to the workers with rows rows / came back from all of them (ok) or failed,
 * the ranks having run collectives collectives (all-reduces, all-gathers) for it. */
void metrics_job_start(uint32_t slot, uint32_t rows);
void metrics_job_done(uint32_t slot, uint32_t collectives, int ok);

/* A request that arrived at t0_ns (metrics_now_ns) ran as the job on slot, which it still
 * holds, and succeeded; it took ns from the job's end to its reply being handed to gRPC
 * (Triton's compute_output). Observes the time it waited for the job's dispatch (queue) and
 * counts its compute_input and compute_infer, its job's whole times, as Triton charges them. */
void metrics_request_served(uint32_t slot, int64_t t0_ns, int64_t ns);

/* Triton's statistics of a model (ModelStatistics, the nv_inference_* families), cumulative since
 * it was loaded, in ns. success and fail count requests and their time from arrival to
 * reply; queue, compute_input, compute_infer and compute_output count successful requests, each
 * charged its job's compute_infer; inference_count counts their rows, execution_count their jobs.
 * batch_stats count jobs, by rows. */
struct metrics_duration {
    uint64_t count, ns;
};

struct metrics_batch_stats {
    uint64_t batch_size;
    struct metrics_duration compute_input, compute_infer, compute_output;
};

struct metrics_stats {
    uint64_t last_inference_ms; /* CLOCK_REALTIME of the last request, ms since the epoch */
    uint64_t inference_count, execution_count;
    struct metrics_duration success, fail, queue, compute_input, compute_infer, compute_output;
    struct metrics_batch_stats *batch; /* sorted by batch size, malloc'ed: the caller frees it */
    size_t nbatch;
};

/* A copy of model id's statistics; -1 (nothing to free) for a model not loaded, before
 * metrics_init or without memory. */
int metrics_get_stats(int id, struct metrics_stats *st);

/* Model id's requests accepted and waiting for a job (nv_inference_pending_request_count), asked
 * at every scrape for every id; set once, before the HTTP server starts. */
typedef uint32_t (*metrics_pending_fn)(void *ctx, int id);
void metrics_set_pending(metrics_pending_fn fn, void *ctx);

/* Rank's worker is up (it reported READY) or down (gone, killed or not started yet). */
void metrics_worker_up(int rank, int up);

/* Rank's worker was started again after its group went down. */
void metrics_worker_restart(int rank);

/* Writes the whole exposition into a new malloc'ed string (*len bytes, NUL-terminated); the
 * caller frees it. NULL when out of memory. */
char *metrics_render(size_t *len);

struct metrics_server;

/* Returns 1 when tpd serves (every worker ready, gRPC started, not draining). Any thread. */
typedef int (*metrics_ready_fn)(void *ctx);

/* Returns 1 when the model called name is ready, 0 when it is not, -1 when tpd does not know it. */
typedef int (*metrics_model_ready_fn)(void *ctx, const char *name);

/* Binds addr ("HOST:PORT", "[V6]:PORT"; port 0 picks a free one) and serves at once from a
 * thread of its own; logs the bound address at notice as "metrics and health on http://...".
 * A bad or busy address fails with a message naming it, and nothing is left bound. ready and
 * ctx are borrowed until metrics_server_stop; ready is called from the server's thread. */
int metrics_server_start(struct metrics_server **s, const char *addr, metrics_ready_fn ready,
                         metrics_model_ready_fn model_ready, void *ctx, struct tp_err *err);

/* Stops the thread, closes every connection and the socket. Takes NULL. */
void metrics_server_stop(struct metrics_server *s);

#endif
