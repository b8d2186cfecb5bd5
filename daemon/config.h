/* config.h -- tpd's settings: defaults, then the configuration file, then the command line.
 * Parsing only records and checks the values; the one file it opens is the configuration file. */
#ifndef TPD_CONFIG_H
#define TPD_CONFIG_H

#include <stdint.h>

#define CONFIG_MAX_LISTEN 8
#define CONFIG_MAX_GPUS 64
#define CONFIG_MAX_LOAD 64

struct config {
    const char *weights;       /* checkpoint: file, directory or index */
    const char *weight;        /* tensor or module name of W */
    const char *bias;          /* tensor name of b; NULL: W's sibling when it exists */
    int no_bias;               /* --no-bias */
    int layout;                /* enum plan_layout; PLAN_LAYOUT_AUTO by default */
    int row;                   /* --parallel row: one layer, its inputs split */
    const char *block;         /* --block: an MLP block's module path; NULL: one layer */
    int act;                   /* --act: enum plan_act; PLAN_ACT_AUTO: from config.json */
    char model[128];           /* model name */
    int cpu;                   /* CPU ranks; 0 with --gpus */
    int gpus[CONFIG_MAX_GPUS]; /* --gpus: the device of each rank, in rank order */
    int ngpus;                 /* GPU ranks; 0 for the cpu backend */
    int gather_nccl;           /* GPUs: all-gather with NCCL (1) or through the host (0) */
    int dtype;                 /* enum tp_dtype the GEMM multiplies in: TP_F32, TP_F16, TP_BF16 */
    int tf32;                  /* FP32 GEMMs may use TF32 tensor cores */
    int io_dtype;              /* enum tp_dtype of input and output on the wire, any backend */
    const char *cpu_gemm;      /* cpu: "invariant" (batch-invariant, the default) or "openblas" */
    const char *listen[CONFIG_MAX_LISTEN];
    int nlisten;
    uint32_t max_batch;    /* rows per request */
    uint32_t slots;        /* requests computed at once */
    uint32_t max_queue;    /* requests waiting for a slot */
    uint32_t max_queue_mb; /* MiB of requests waiting for a slot */
    int reply_timeout_ms;  /* a reply its client has not taken by then cancels the call; 0: never */
    const char *worker;    /* worker executable; NULL: next to tpd */
    int grpc_threads;
    int restart_backoff_ms; /* first restart delay */
    int job_timeout_ms;     /* least time a rank may take over a job before it is taken for hung
                             * (longer jobs get more: daemon/sup.c); 0: never */
    int log_level;
    const char *metrics_listen; /* HOST:PORT of the HTTP server; NULL: none ("off") */
    const char *http_listen;    /* HOST:PORT of the REST API; NULL: none ("off") */
    const char *config;         /* configuration file that was read; NULL: none */
    int listen_cmdline;         /* a --listen came from the command line */
    uint32_t batch_delay_us;    /* most a batch waits for more requests; 0: batching off */
    unsigned socket_mode;      /* file mode of unix: sockets */
    const char *tls_cert;      /* PEM certificate chain; NULL: no TLS */
    const char *tls_key;       /* PEM private key of tls_cert */
    const char *tls_client_ca; /* PEM CA bundle: clients must present a cert it signed */
    const char *repository;    /* --model-repository: a folder of NAME.json; NULL: --weights */
    int control_explicit;      /* --model-control-mode explicit */
    const char *load[CONFIG_MAX_LOAD]; /* --load-model: explicit mode's models at start */
    int nload;
};

enum config_result { CONFIG_OK, CONFIG_EXIT_OK, CONFIG_USAGE, CONFIG_BAD_FILE };

/* Fills c from the configuration file (--config PATH, else /etc/tpd/tpd.conf when it exists;
 * "none" for no file), then from argv, whose flags override the file. CONFIG_EXIT_OK after
 * --help or --version (already printed; no file is read then), CONFIG_USAGE after a message on
 * stderr for a bad command line, CONFIG_BAD_FILE after a message naming the file, line and key
 * for a bad file (tpd exits EX_CONFIG). Strings point into argv or into the file's text, which
 * is kept for the life of the process. Not thread-safe (getopt). */
enum config_result config_parse(struct config *c, int argc, char **argv);

#endif
