/* config.c -- tpd's command line and configuration file (see config.h and docs/cli.md). Both go
 * through one option table and one function, apply(): the file's keys are the table's long
 * names, so a flag added to the table is a key of the file too. The file is applied first, the
 * command line after it, so flags override the file. */
#include "config.h"

#include <errno.h>
#include <limits.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "conffile.h"
#include "log.h"
#include "plan.h"
#include "tensor.h"

#define DEFAULT_CONFIG "/etc/tpd/tpd.conf"

static void usage(FILE *f)
{
    fprintf(
        f,
        "usage: tpd --weights PATH [options]\n"
        "       tpd --model-repository DIR [options]\n"
        "Serves linear layers y = x*W^T + b, or a transformer's MLP blocks, tensor-parallel over\n"
        "worker processes, over gRPC and REST (KServe v2).\n"
        "\n"
        "  --model-repository DIR  serve the models of DIR, one NAME.json each (see\n"
        "                          docs/repository.md), instead of the one model below; the\n"
        "                          flags below set what a NAME.json leaves out\n"
        "  --model-control-mode none|explicit\n"
        "                          none: load every model at start, and refuse loads and\n"
        "                          unloads; explicit: load the --load-model models at start,\n"
        "                          and load and unload on request (RepositoryModelLoad/Unload,\n"
        "                          POST /v2/repository/models/NAME/load|unload) (default: none)\n"
        "  --load-model NAME       explicit mode: a model to load at start, repeatable; '*'\n"
        "                          loads every model\n"
        "  --weights PATH          the checkpoint: a .safetensors file, a directory holding\n"
        "                          model.safetensors or model.safetensors.index.json, or an\n"
        "                          index file (required; see docs/checkpoints.md)\n"
        "  --weight NAME           W: a tensor name, or a module name whose NAME.weight is\n"
        "                          stored (default: weight)\n"
        "  --bias NAME             b [out] (default: the weight's sibling MODULE.bias, when the\n"
        "                          checkpoint has it)\n"
        "  --no-bias               serve without biases, even when the checkpoint has them\n"
        "  --parallel column|row   one layer: split W's outputs (column) or its inputs (row,\n"
        "                          the ranks all-reduce their partial sums) (default: column)\n"
        "  --block MODULE          serve the MLP block at MODULE instead of one layer, e.g.\n"
        "                          model.layers.0.mlp: down(act(gate(x)) * up(x)) or\n"
        "                          proj(act(fc(x))), one all-reduce (see docs/blocks.md)\n"
        "  --act silu|gelu|gelu_tanh|relu\n"
        "                          the block's activation (default: config.json's hidden_act or\n"
        "                          activation_function)\n"
        "  --layout auto|linear|conv1d\n"
        "                          how W is stored: linear [out, in] (torch.nn.Linear), conv1d\n"
        "                          [in, out] (transformers' Conv1D, the GPT-2 family); auto reads\n"
        "                          config.json and refuses what it cannot tell (default: auto)\n"
        "  --model NAME            model name (default: the file name without .safetensors, or\n"
        "                          the checkpoint directory's name)\n"
        "  --cpu N                 N CPU worker processes, one per rank (default: 1)\n"
        "  --gpus LIST             one GPU worker per listed device, in rank order, e.g. 0,1\n"
        "                          (a device may be listed twice only with --gather host)\n"
        "  --gather nccl|host      GPUs: all-gather the shards with NCCL, or let each rank\n"
        "                          copy its columns to the host (default: nccl)\n"
        "  --io-dtype fp32|fp16|bf16\n"
        "                          datatype of the model's input and output on the wire (FP32,\n"
        "                          FP16 or BF16 in requests, responses and shared memory); tpd\n"
        "                          converts to and from FP32 itself, so any backend takes any\n"
        "                          (default: fp32)\n"
        "  --dtype fp32|fp16|bf16  GPUs: what the GEMM multiplies in, accumulating in FP32;\n"
        "                          independent of --io-dtype (default: fp32)\n"
        "  --tf32                  GPUs: let FP32 GEMMs use TF32 tensor cores (default: off)\n"
        "  --cpu-gemm invariant|openblas\n"
        "                          CPU ranks: 'invariant' sums every output in one order fixed\n"
        "                          by the layer, so a row's answer is the same bits whatever\n"
        "                          it is batched with; 'openblas' calls\n"
        "                          cblas_sgemm, whose kernels (and bits) change with the batch's\n"
        "                          shape (default: invariant)\n"
        "  --listen ADDR           HOST:PORT or unix:PATH, repeatable (default: 127.0.0.1:8001)\n"
        "  --max-batch ROWS        most rows in one request (default: 256)\n"
        "  --slots N               requests computed at once (default: 4)\n"
        "  --max-queue N           requests waiting for a slot before RESOURCE_EXHAUSTED\n"
        "                          (default: 1024)\n"
        "  --max-queue-mb MB       MiB of requests waiting for a slot before RESOURCE_EXHAUSTED;\n"
        "                          a request that finds the queue empty is always taken\n"
        "                          (default: 256)\n"
        "  --reply-timeout-ms MS   a reply that its client has not taken MS after it was\n"
        "                          computed cancels the call (RESOURCE_EXHAUSTED), freeing its\n"
        "                          slot; 0 waits forever (default: 2000)\n"
        "  --batch-delay-us US     dynamic batching: requests that come while the workers\n"
        "                          compute run as one job when they are free, which waits for\n"
        "                          more until its oldest request is US old; 0 turns batching off\n"
        "                          (default: 200)\n"
        "  --worker PATH           worker executable (default: tpd-worker beside tpd)\n"
        "  --grpc-threads N        threads serving gRPC (default: 1)\n"
        "  --restart-backoff-ms MS first delay before restarting dead workers (default: 500)\n"
        "  --job-timeout-ms MS     a rank that takes longer over a job (longer jobs get more,\n"
        "                          in proportion to their rows), or over its load on a restart,\n"
        "                          is taken for hung and its group restarted; 0 turns this off,\n"
        "                          else 100 to 3600000 (default: 10000)\n"
        "  --log-level LEVEL       err, warn, notice, info or debug (default: notice)\n"
        "  --metrics-listen ADDR   HOST:PORT of the HTTP server for /metrics and the health\n"
        "                          endpoints; port 0 picks a free one; 'off' disables it\n"
        "                          (default: 127.0.0.1:8002)\n"
        "  --http-listen ADDR      HOST:PORT of the KServe v2 REST API (JSON and the binary\n"
        "                          tensor extension); port 0 picks a free one; 'off'\n"
        "                          disables it (default: 127.0.0.1:8000)\n"
        "  --socket-mode MODE      octal file mode of unix: sockets (default: 0660)\n"
        "  --tls-cert PATH         serve TCP addresses over TLS with this PEM certificate chain\n"
        "  --tls-key PATH          PEM private key of --tls-cert (required with it)\n"
        "  --tls-client-ca PATH    require client certificates signed by this PEM CA (mTLS)\n"
        "  --config PATH           configuration file: one 'key = value' per line, a key per\n"
        "                          flag; flags override it; 'none' reads no file (default:\n"
        "                          " DEFAULT_CONFIG " when it exists)\n"
        "  --help, --version\n");
}

/* Set while a line of the configuration file is applied: "FILE:LINE: key 'cpu'". Messages about
 * a value name it instead of the flag, so that a bad file says where. */
static char origin[600];
static int origin_used;            /* a message named origin */
static const char *model;          /* --model, NULL for the default */
static const char *gather, *dtype; /* --gather, --dtype, checked once all flags are known */
static const char *cpu_gemm;       /* --cpu-gemm, likewise */
static int cpu_given;              /* --cpu was given */
static int weight_given;           /* --weight was given */

/* What a message about flag's value calls it: the flag, or the file's line and key. */
static const char *subject(const char *flag)
{
    if (!origin[0])
        return flag;
    origin_used = 1;
    return origin;
}

static int parse_num(const char *flag, const char *s, long lo, long hi, long *v)
{
    char *end;

    errno = 0;
    *v = strtol(s, &end, 10);
    if (errno || end == s || *end || *v < lo || *v > hi) {
        fprintf(stderr, "tpd: %s takes a whole number from %ld to %ld, got '%s'\n", subject(flag),
                lo, hi, s);
        return -1;
    }
    return 0;
}

/* --gpus 0,1,3: device indices, in rank order. */
static int parse_gpus(struct config *c, const char *list)
{
    const char *p = list;

    c->ngpus = 0;
    for (;;) {
        char *end;
        long v;

        errno = 0;
        v = strtol(p, &end, 10);
        if (errno || end == p || v < 0 || v > 1023 || (*end && *end != ',') || *p == '-' ||
            *p == '+' || *p == ' ') {
            fprintf(stderr,
                    "tpd: %s takes device indices 0 to 1023 separated by commas, got '%s'\n",
                    subject("--gpus"), list);
            return -1;
        }
        if (c->ngpus == CONFIG_MAX_GPUS) {
            fprintf(stderr, "tpd: %s lists more than %d devices\n", subject("--gpus"),
                    CONFIG_MAX_GPUS);
            return -1;
        }
        c->gpus[c->ngpus++] = (int)v;
        if (!*end)
            return 0;
        p = end + 1;
    }
}

/* The flags that choose and tune the backend, checked together once all are known. */
static int check_backend(struct config *c)
{
    if (c->ngpus && cpu_given) {
        fprintf(stderr, "tpd: --gpus and --cpu are exclusive: choose GPU or CPU workers\n");
        return -1;
    }
    if (gather) {
        if (strcmp(gather, "nccl") != 0 && strcmp(gather, "host") != 0) {
            fprintf(stderr, "tpd: --gather takes nccl or host, got '%s'\n", gather);
            return -1;
        }
        c->gather_nccl = strcmp(gather, "nccl") == 0;
    }
    if (dtype) {
        c->dtype = tp_dtype_from_flag(dtype);
        if (c->dtype == TP_DTYPE_INVALID) {
            fprintf(stderr, "tpd: --dtype takes fp32, fp16 or bf16, got '%s'\n", dtype);
            return -1;
        }
    }
    if (cpu_gemm) {
        if (strcmp(cpu_gemm, "invariant") != 0 && strcmp(cpu_gemm, "openblas") != 0) {
            fprintf(stderr, "tpd: --cpu-gemm takes invariant or openblas, got '%s'\n", cpu_gemm);
            return -1;
        }
        if (c->ngpus) {
            fprintf(stderr, "tpd: --cpu-gemm applies to cpu ranks, not to --gpus\n");
            return -1;
        }
        c->cpu_gemm = cpu_gemm;
    }
    if (!c->ngpus) {
        if (gather && c->gather_nccl) {
            fprintf(stderr, "tpd: --gather nccl needs --gpus (cpu ranks write their columns to "
                            "the host)\n");
            return -1;
        }
        if (c->dtype != TP_F32 || c->tf32) {
            fprintf(stderr, "tpd: --%s needs --gpus: the cpu backend computes in fp32\n",
                    c->tf32 ? "tf32" : "dtype");
            return -1;
        }
        c->gather_nccl = 0;
        return 0;
    }
    if (c->tf32 && c->dtype != TP_F32) {
        fprintf(stderr, "tpd: --tf32 applies to --dtype fp32 only\n");
        return -1;
    }
    c->cpu = 0;
    if (!c->gather_nccl)
        return 0;
    for (int i = 0; i < c->ngpus; i++)
        for (int j = 0; j < i; j++)
            if (c->gpus[i] == c->gpus[j]) {
                fprintf(stderr,
                        "tpd: --gpus lists device %d twice: NCCL refuses two ranks on one GPU; "
                        "use --gather host\n",
                        c->gpus[i]);
                return -1;
            }
    return 0;
}

/* An octal file mode, 0 to 0777 ("660", "0660"). */
static int parse_mode(const char *s, unsigned *mode)
{
    char *end;
    unsigned long v;

    errno = 0;
    v = strtoul(s, &end, 8);
    if (errno || end == s || *end || s[0] == '-' || s[0] == '+' || v > 0777) {
        fprintf(stderr, "tpd: %s takes an octal file mode from 0 to 0777, got '%s'\n",
                subject("--socket-mode"), s);
        return -1;
    }
    *mode = (unsigned)v;
    return 0;
}

/* The file's name without .safetensors; for a checkpoint directory, or its model.safetensors or
 * index, the directory's name. */
static void model_from_path(char *name, size_t len, const char *path)
{
    char buf[PATH_MAX];
    const char *base;
    struct stat st;
    size_t n;

    if (!realpath(path, buf))
        snprintf(buf, sizeof(buf), "%s", path);
    base = strrchr(buf, '/');
    base = base ? base + 1 : buf;
    if ((strcmp(base, "model.safetensors") == 0 ||
         strcmp(base, "model.safetensors.index.json") == 0) &&
        base > buf + 1) {
        buf[base - buf - 1] = '\0';
        base = strrchr(buf, '/') ? strrchr(buf, '/') + 1 : buf;
    } else if (stat(buf, &st) == 0 && S_ISDIR(st.st_mode) && !base[0]) {
        base = "model"; /* the root directory */
    }
    n = strlen(base);
    if (n > 12 && strcmp(base + n - 12, ".safetensors") == 0)
        n -= 12;
    snprintf(name, len, "%.*s", (int)n, base);
}

enum {
    O_WEIGHTS = 256,
    O_WEIGHT,
    O_BIAS,
    O_NO_BIAS,
    O_LAYOUT,
    O_MODEL,
    O_CPU,
    O_LISTEN,
    O_MAX_BATCH,
    O_SLOTS,
    O_MAX_QUEUE,
    O_MAX_QUEUE_MB,
    O_REPLY_TIMEOUT,
    O_WORKER,
    O_GRPC_THREADS,
    O_BACKOFF,
    O_JOB_TIMEOUT,
    O_LOG_LEVEL,
    O_GPUS,
    O_GATHER,
    O_DTYPE,
    O_TF32,
    O_IO_DTYPE,
    O_CPU_GEMM,
    O_BATCH_DELAY,
    O_METRICS_LISTEN,
    O_HTTP_LISTEN,
    O_SOCK_MODE,
    O_TLS_CERT,
    O_TLS_KEY,
    O_TLS_CA,
    O_CONFIG,
    O_PARALLEL,
    O_BLOCK,
    O_ACT,
    O_REPOSITORY,
    O_CONTROL_MODE,
    O_LOAD_MODEL,
    O_HELP,
    O_VERSION,
};

static const struct option opts[] = {
    {"weights", required_argument, NULL, O_WEIGHTS},
    {"model-repository", required_argument, NULL, O_REPOSITORY},
    {"model-control-mode", required_argument, NULL, O_CONTROL_MODE},
    {"load-model", required_argument, NULL, O_LOAD_MODEL},
    {"weight", required_argument, NULL, O_WEIGHT},
    {"bias", required_argument, NULL, O_BIAS},
    {"no-bias", no_argument, NULL, O_NO_BIAS},
    {"layout", required_argument, NULL, O_LAYOUT},
    {"model", required_argument, NULL, O_MODEL},
    {"cpu", required_argument, NULL, O_CPU},
    {"listen", required_argument, NULL, O_LISTEN},
    {"max-batch", required_argument, NULL, O_MAX_BATCH},
    {"slots", required_argument, NULL, O_SLOTS},
    {"max-queue", required_argument, NULL, O_MAX_QUEUE},
    {"max-queue-mb", required_argument, NULL, O_MAX_QUEUE_MB},
    {"reply-timeout-ms", required_argument, NULL, O_REPLY_TIMEOUT},
    {"worker", required_argument, NULL, O_WORKER},
    {"grpc-threads", required_argument, NULL, O_GRPC_THREADS},
    {"restart-backoff-ms", required_argument, NULL, O_BACKOFF},
    {"job-timeout-ms", required_argument, NULL, O_JOB_TIMEOUT},
    {"log-level", required_argument, NULL, O_LOG_LEVEL},
    {"gpus", required_argument, NULL, O_GPUS},
    {"gather", required_argument, NULL, O_GATHER},
    {"dtype", required_argument, NULL, O_DTYPE},
    {"tf32", no_argument, NULL, O_TF32},
    {"io-dtype", required_argument, NULL, O_IO_DTYPE},
    {"cpu-gemm", required_argument, NULL, O_CPU_GEMM},
    {"batch-delay-us", required_argument, NULL, O_BATCH_DELAY},
    {"metrics-listen", required_argument, NULL, O_METRICS_LISTEN},
    {"http-listen", required_argument, NULL, O_HTTP_LISTEN},
    {"socket-mode", required_argument, NULL, O_SOCK_MODE},
    {"tls-cert", required_argument, NULL, O_TLS_CERT},
    {"tls-key", required_argument, NULL, O_TLS_KEY},
    {"tls-client-ca", required_argument, NULL, O_TLS_CA},
    {"config", required_argument, NULL, O_CONFIG},
    {"parallel", required_argument, NULL, O_PARALLEL},
    {"block", required_argument, NULL, O_BLOCK},
    {"act", required_argument, NULL, O_ACT},
    {"help", no_argument, NULL, O_HELP},
    {"version", no_argument, NULL, O_VERSION},
    {NULL, 0, NULL, 0}};

/* Applies option o with its argument in optarg (getopt's, or set from the file). */
static enum config_result apply(struct config *c, int o)
{
    long v;

    switch (o) {
    case O_WEIGHTS: c->weights = optarg; break;
    case O_WEIGHT:
        c->weight = optarg;
        weight_given = 1;
        break;
    case O_PARALLEL:
        if (strcmp(optarg, "column") != 0 && strcmp(optarg, "row") != 0) {
            fprintf(stderr, "tpd: %s takes column or row, got '%s'\n", subject("--parallel"),
                    optarg);
            return CONFIG_USAGE;
        }
        c->row = strcmp(optarg, "row") == 0;
        break;
    case O_BLOCK: c->block = optarg; break;
    case O_ACT:
        c->act = plan_act_from_name(optarg);
        if (c->act == PLAN_ACT_AUTO) {
            fprintf(stderr,
                    "tpd: %s takes silu, gelu, gelu_tanh or relu (or config.json's names: swish, "
                    "gelu_new, gelu_pytorch_tanh), got '%s'\n",
                    subject("--act"), optarg);
            return CONFIG_USAGE;
        }
        break;
    case O_BIAS: c->bias = optarg; break;
    case O_NO_BIAS: c->no_bias = 1; break;
    case O_LAYOUT: {
        enum plan_layout l;

        if (plan_layout_from_name(optarg, &l) < 0) {
            fprintf(stderr, "tpd: %s takes auto, linear or conv1d, got '%s'\n",
                    subject("--layout"), optarg);
            return CONFIG_USAGE;
        }
        c->layout = (int)l;
        break;
    }
    case O_MODEL: model = optarg; break;
    case O_CPU:
        if (parse_num("--cpu", optarg, 1, 256, &v))
            return CONFIG_USAGE;
        c->cpu = (int)v;
        cpu_given = 1;
        break;
    case O_GPUS:
        if (parse_gpus(c, optarg) < 0)
            return CONFIG_USAGE;
        break;
    case O_GATHER: gather = optarg; break;
    case O_DTYPE: dtype = optarg; break;
    case O_TF32: c->tf32 = 1; break;
    case O_CPU_GEMM: cpu_gemm = optarg; break;
    case O_IO_DTYPE:
        c->io_dtype = tp_dtype_from_flag(optarg);
        if (c->io_dtype == TP_DTYPE_INVALID) {
            fprintf(stderr, "tpd: %s takes fp32, fp16 or bf16, got '%s'\n", subject("--io-dtype"),
                    optarg);
            return CONFIG_USAGE;
        }
        break;
    case O_REPOSITORY: c->repository = optarg; break;
    case O_CONTROL_MODE:
        if (strcmp(optarg, "none") != 0 && strcmp(optarg, "explicit") != 0) {
            fprintf(stderr, "tpd: %s takes none or explicit, got '%s'\n",
                    subject("--model-control-mode"), optarg);
            return CONFIG_USAGE;
        }
        c->control_explicit = strcmp(optarg, "explicit") == 0;
        break;
    case O_LOAD_MODEL:
        if (c->nload == CONFIG_MAX_LOAD) {
            fprintf(stderr, "tpd: %s: at most %d models\n", subject("--load-model"),
                    CONFIG_MAX_LOAD);
            return CONFIG_USAGE;
        }
        c->load[c->nload++] = optarg;
        break;
    case O_LISTEN:
        /* the first --listen of the command line replaces the file's addresses too */
        if (!origin[0] && !c->listen_cmdline) {
            c->listen_cmdline = 1;
            c->nlisten = 0;
        }
        if (c->nlisten == CONFIG_MAX_LISTEN) {
            fprintf(stderr, "tpd: %s: at most %d listen addresses\n", subject("--listen"),
                    CONFIG_MAX_LISTEN);
            return CONFIG_USAGE;
        }
        c->listen[c->nlisten++] = optarg;
        break;
    case O_MAX_BATCH:
        if (parse_num("--max-batch", optarg, 1, 1 << 20, &v))
            return CONFIG_USAGE;
        c->max_batch = (uint32_t)v;
        break;
    case O_SLOTS:
        if (parse_num("--slots", optarg, 1, 1024, &v))
            return CONFIG_USAGE;
        c->slots = (uint32_t)v;
        break;
    case O_MAX_QUEUE:
        if (parse_num("--max-queue", optarg, 0, 1 << 20, &v))
            return CONFIG_USAGE;
        c->max_queue = (uint32_t)v;
        break;
    case O_MAX_QUEUE_MB:
        if (parse_num("--max-queue-mb", optarg, 1, 1 << 20, &v))
            return CONFIG_USAGE;
        c->max_queue_mb = (uint32_t)v;
        break;
    case O_REPLY_TIMEOUT:
        if (parse_num("--reply-timeout-ms", optarg, 0, 3600000, &v))
            return CONFIG_USAGE;
        c->reply_timeout_ms = (int)v;
        break;
    case O_WORKER: c->worker = optarg; break;
    case O_GRPC_THREADS:
        if (parse_num("--grpc-threads", optarg, 1, 64, &v))
            return CONFIG_USAGE;
        c->grpc_threads = (int)v;
        break;
    case O_BACKOFF:
        if (parse_num("--restart-backoff-ms", optarg, 1, 600000, &v))
            return CONFIG_USAGE;
        c->restart_backoff_ms = (int)v;
        break;
    case O_JOB_TIMEOUT:
        if (parse_num("--job-timeout-ms", optarg, 0, 3600000, &v))
            return CONFIG_USAGE;
        /* below 100 ms, a busy host's scheduling alone would take groups down */
        if (v > 0 && v < 100) {
            fprintf(stderr, "tpd: %s takes 0 (off) or 100 to 3600000 ms, got '%s'\n",
                    subject("--job-timeout-ms"), optarg);
            return CONFIG_USAGE;
        }
        c->job_timeout_ms = (int)v;
        break;
    case O_LOG_LEVEL:
        c->log_level = tp_log_parse_level(optarg);
        if (c->log_level < 0) {
            fprintf(stderr, "tpd: %s takes err, warn, notice, info or debug, got '%s'\n",
                    subject("--log-level"), optarg);
            return CONFIG_USAGE;
        }
        break;
    case O_BATCH_DELAY:
        if (parse_num("--batch-delay-us", optarg, 0, 1000000, &v))
            return CONFIG_USAGE;
        c->batch_delay_us = (uint32_t)v;
        break;
    case O_METRICS_LISTEN:
        c->metrics_listen = (!optarg[0] || strcmp(optarg, "off") == 0) ? NULL : optarg;
        break;
    case O_HTTP_LISTEN:
        c->http_listen = (!optarg[0] || strcmp(optarg, "off") == 0) ? NULL : optarg;
        break;
    case O_SOCK_MODE:
        if (parse_mode(optarg, &c->socket_mode))
            return CONFIG_USAGE;
        break;
    case O_TLS_CERT: c->tls_cert = optarg; break;
    case O_TLS_KEY: c->tls_key = optarg; break;
    case O_TLS_CA: c->tls_client_ca = optarg; break;
    case O_CONFIG: break; /* read before everything else, in config_parse */
    case O_HELP: usage(stdout); return CONFIG_EXIT_OK;
    case O_VERSION: printf("tpd %s\n", TP_VERSION); return CONFIG_EXIT_OK;
    default: return CONFIG_USAGE;
    }
    return CONFIG_OK;
}

/* Finds "--config PATH" or "--config=PATH" in argv; also says whether --help or --version is
 * there (then no file is read: they must work whatever the file holds). */
static const char *find_config(int argc, char **argv, int *info)
{
    const char *path = DEFAULT_CONFIG;
    int given = 0;

    *info = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--") == 0)
            break;
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "--version") == 0)
            *info = 1;
        else if (strcmp(argv[i], "--config") == 0 && i + 1 < argc)
            path = argv[++i], given = 1;
        else if (strncmp(argv[i], "--config=", 9) == 0)
            path = argv[i] + 9, given = 1;
    }
    if (!path[0] || strcmp(path, "none") == 0)
        return NULL;
    if (!given && access(path, F_OK) != 0)
        return NULL; /* the default file is optional */
    return path;
}

static int is_true(const char *v, int *b)
{
    static const char *const t[] = {"1", "true", "yes", "on"}, *const f[] = {"0", "false", "no",
                                                                             "off"};

    for (int i = 0; i < 4; i++) {
        if (strcmp(v, t[i]) == 0)
            return *b = 1, 1;
        if (strcmp(v, f[i]) == 0)
            return *b = 0, 1;
    }
    return 0;
}

/* Applies every line of the file at path. CONFIG_BAD_FILE after a message naming the file, the
 * line and the key. The file's text is kept for the life of the process: values point into it. */
static enum config_result apply_file(struct config *c, const char *path)
{
    static struct conffile f;
    char err[512];

    if (conffile_read(&f, path, err, sizeof(err)) < 0) {
        fprintf(stderr, "tpd: config file %s\n", err);
        return CONFIG_BAD_FILE;
    }
    for (size_t i = 0; i < f.n; i++) {
        const struct conffile_entry *e = &f.e[i];
        const struct option *opt = NULL;
        char key[64];
        int on = 1;
        enum config_result r;

        snprintf(key, sizeof(key), "%s", e->key);
        for (char *k = key; *k; k++)
            if (*k == '_')
                *k = '-'; /* max_batch and max-batch are the same key */
        for (const struct option *p = opts; p->name; p++)
            if (strcmp(p->name, key) == 0)
                opt = p;
        snprintf(origin, sizeof(origin), "%s:%d: key '%s'", path, e->line, e->key);
        if (!opt || opt->val == O_CONFIG || opt->val == O_HELP || opt->val == O_VERSION) {
            fprintf(stderr,
                    "tpd: %s: unknown key (keys are tpd's flags without '--', see tpd --help)\n",
                    origin);
            goto bad;
        }
        if (opt->has_arg == required_argument && !e->value) {
            fprintf(stderr, "tpd: %s needs a value: '%s = VALUE'\n", origin, e->key);
            goto bad;
        }
        if (opt->has_arg == no_argument && e->value && !is_true(e->value, &on)) {
            fprintf(stderr, "tpd: %s takes true or false, got '%s'\n", origin, e->value);
            goto bad;
        }
        if (!on)
            continue;
        optarg = (char *)(e->value ? e->value : "");
        origin_used = 0;
        r = apply(c, opt->val);
        if (r != CONFIG_OK) {
            if (!origin_used)
                fprintf(stderr, "tpd: %s: invalid value '%s'\n", origin, optarg);
            goto bad;
        }
    }
    origin[0] = '\0';
    c->config = path;
    return CONFIG_OK;
bad:
    origin[0] = '\0';
    return CONFIG_BAD_FILE;
}

enum config_result config_parse(struct config *c, int argc, char **argv)
{
    const char *file;
    int o, info;
    enum config_result r;

    *c = (struct config){.weight = "weight",
                         .cpu = 1,
                         .max_batch = 256,
                         .slots = 4,
                         .max_queue = 1024,
                         .max_queue_mb = 256,
                         .reply_timeout_ms = 2000,
                         .batch_delay_us = 200,
                         .grpc_threads = 1,
                         .restart_backoff_ms = 500,
                         .job_timeout_ms = 10000,
                         .log_level = TP_LOG_NOTICE,
                         .gather_nccl = 1,
                         .dtype = TP_F32,
                         .io_dtype = TP_F32,
                         .cpu_gemm = "invariant",
                         .metrics_listen = "127.0.0.1:8002",
                         .http_listen = "127.0.0.1:8000",
                         .socket_mode = 0660};
    model = gather = dtype = cpu_gemm = NULL;
    cpu_given = weight_given = 0;
    file = find_config(argc, argv, &info);
    if (file && !info && (r = apply_file(c, file)) != CONFIG_OK)
        return r;
    opterr = 0;
    optind = 1;
    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (o == '?' || o == ':') {
            fprintf(stderr, "tpd: unknown or incomplete option '%s'\n", argv[optind - 1]);
            usage(stderr);
            return CONFIG_USAGE;
        }
        r = apply(c, o);
        if (r != CONFIG_OK)
            return r;
    }
    if (optind < argc) {
        fprintf(stderr, "tpd: unexpected argument '%s'\n", argv[optind]);
        return CONFIG_USAGE;
    }
    if (c->repository &&
        (c->weights || weight_given || c->bias || c->no_bias || c->row || c->block ||
         c->act != PLAN_ACT_AUTO || c->layout != PLAN_LAYOUT_AUTO || model)) {
        fprintf(stderr, "tpd: --model-repository describes each model in its NAME.json: it takes "
                        "no --weights, --weight, --bias, --no-bias, --parallel, --block, --act, "
                        "--layout or --model\n");
        return CONFIG_USAGE;
    }
    if (!c->weights && !c->repository) {
        fprintf(stderr, "tpd: --weights PATH or --model-repository DIR is required (or "
                        "'weights = PATH' in the config file)\n");
        usage(stderr);
        return CONFIG_USAGE;
    }
    if (c->nload && !c->control_explicit) {
        fprintf(stderr, "tpd: --load-model names the models to load at start with "
                        "--model-control-mode explicit (without, every model is loaded)\n");
        return CONFIG_USAGE;
    }
    if (check_backend(c) < 0)
        return CONFIG_USAGE;
    if (c->bias && c->no_bias) {
        fprintf(stderr, "tpd: --bias and --no-bias are exclusive\n");
        return CONFIG_USAGE;
    }
    if (c->block && (weight_given || c->bias || c->row)) {
        fprintf(stderr, "tpd: --block serves a whole MLP block: it takes no %s\n",
                weight_given ? "--weight" : c->bias ? "--bias" : "--parallel row");
        return CONFIG_USAGE;
    }
    if (!c->block && c->act != PLAN_ACT_AUTO) {
        fprintf(stderr, "tpd: --act is a block's activation: give --block MODULE\n");
        return CONFIG_USAGE;
    }
    if (!c->tls_cert != !c->tls_key) {
        fprintf(stderr, "tpd: --tls-cert and --tls-key go together, got only %s\n",
                c->tls_cert ? "--tls-cert" : "--tls-key");
        return CONFIG_USAGE;
    }
    if (c->tls_client_ca && !c->tls_cert) {
        fprintf(stderr, "tpd: --tls-client-ca needs --tls-cert and --tls-key\n");
        return CONFIG_USAGE;
    }
    if (c->nlisten == 0)
        c->listen[c->nlisten++] = "127.0.0.1:8001";
    if (model)
        snprintf(c->model, sizeof(c->model), "%s", model);
    else if (c->weights)
        model_from_path(c->model, sizeof(c->model), c->weights);
    return CONFIG_OK;
}
