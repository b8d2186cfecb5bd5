/* config.c -- tpd's command line (see config.h and docs/cli.md). */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"

static void usage(FILE *f)
{
    fprintf(
        f,
        "usage: tpd --weights PATH [options]\n"
        "Serves y = x*W^T + b, column-parallel over worker processes, over gRPC (KServe v2).\n"
        "\n"
        "  --weights PATH          safetensors file with the layer (required)\n"
        "  --weight NAME           tensor name of W [out, in] (default: weight)\n"
        "  --bias NAME             tensor name of b [out] (default: bias, if present)\n"
        "  --model NAME            model name (default: the file name without .safetensors)\n"
        "  --cpu N                 N CPU worker processes, one per rank (default: 1)\n"
        "  --listen ADDR           HOST:PORT or unix:PATH, repeatable (default: 127.0.0.1:8001)\n"
        "  --max-batch ROWS        most rows in one request (default: 256)\n"
        "  --slots N               requests computed at once (default: 4)\n"
        "  --max-queue N           requests waiting for a slot before RESOURCE_EXHAUSTED\n"
        "                          (default: 1024)\n"
        "  --worker PATH           worker executable (default: tpd-worker beside tpd)\n"
        "  --grpc-threads N        threads serving gRPC (default: 1)\n"
        "  --restart-backoff-ms MS first delay before restarting dead workers (default: 500)\n"
        "  --log-level LEVEL       err, warn, notice, info or debug (default: notice)\n"
        "  --socket-mode MODE      octal file mode of unix: sockets (default: 0660)\n"
        "  --tls-cert PATH         serve TCP addresses over TLS with this PEM certificate chain\n"
        "  --tls-key PATH          PEM private key of --tls-cert (required with it)\n"
        "  --tls-client-ca PATH    require client certificates signed by this PEM CA (mTLS)\n"
        "  --help, --version\n");
}

static int parse_num(const char *flag, const char *s, long lo, long hi, long *v)
{
    char *end;

    errno = 0;
    *v = strtol(s, &end, 10);
    if (errno || end == s || *end || *v < lo || *v > hi) {
        fprintf(stderr, "tpd: %s takes a whole number from %ld to %ld, got '%s'\n", flag, lo, hi,
                s);
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
        fprintf(stderr, "tpd: --socket-mode takes an octal file mode from 0 to 0777, got '%s'\n",
                s);
        return -1;
    }
    *mode = (unsigned)v;
    return 0;
}

static void model_from_path(char *model, size_t len, const char *path)
{
    const char *base = strrchr(path, '/');
    size_t n;

    base = base ? base + 1 : path;
    n = strlen(base);
    if (n > 12 && strcmp(base + n - 12, ".safetensors") == 0)
        n -= 12;
    snprintf(model, len, "%.*s", (int)n, base);
}

enum config_result config_parse(struct config *c, int argc, char **argv)
{
    enum {
        O_WEIGHTS = 256,
        O_WEIGHT,
        O_BIAS,
        O_MODEL,
        O_CPU,
        O_LISTEN,
        O_MAX_BATCH,
        O_SLOTS,
        O_MAX_QUEUE,
        O_WORKER,
        O_GRPC_THREADS,
        O_BACKOFF,
        O_LOG_LEVEL,
        O_SOCK_MODE,
        O_TLS_CERT,
        O_TLS_KEY,
        O_TLS_CA,
        O_HELP,
        O_VERSION,
    };
    static const struct option opts[] = {{"weights", required_argument, NULL, O_WEIGHTS},
                                         {"weight", required_argument, NULL, O_WEIGHT},
                                         {"bias", required_argument, NULL, O_BIAS},
                                         {"model", required_argument, NULL, O_MODEL},
                                         {"cpu", required_argument, NULL, O_CPU},
                                         {"listen", required_argument, NULL, O_LISTEN},
                                         {"max-batch", required_argument, NULL, O_MAX_BATCH},
                                         {"slots", required_argument, NULL, O_SLOTS},
                                         {"max-queue", required_argument, NULL, O_MAX_QUEUE},
                                         {"worker", required_argument, NULL, O_WORKER},
                                         {"grpc-threads", required_argument, NULL, O_GRPC_THREADS},
                                         {"restart-backoff-ms", required_argument, NULL, O_BACKOFF},
                                         {"log-level", required_argument, NULL, O_LOG_LEVEL},
                                         {"socket-mode", required_argument, NULL, O_SOCK_MODE},
                                         {"tls-cert", required_argument, NULL, O_TLS_CERT},
                                         {"tls-key", required_argument, NULL, O_TLS_KEY},
                                         {"tls-client-ca", required_argument, NULL, O_TLS_CA},
                                         {"help", no_argument, NULL, O_HELP},
                                         {"version", no_argument, NULL, O_VERSION},
                                         {NULL, 0, NULL, 0}};
    const char *model = NULL;
    long v;
    int o;

    *c = (struct config){.weight = "weight",
                         .bias = "bias",
                         .cpu = 1,
                         .max_batch = 256,
                         .slots = 4,
                         .max_queue = 1024,
                         .grpc_threads = 1,
                         .restart_backoff_ms = 500,
                         .log_level = TP_LOG_NOTICE,
                         .socket_mode = 0660};
    opterr = 0;
    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (o) {
        case O_WEIGHTS: c->weights = optarg; break;
        case O_WEIGHT: c->weight = optarg; break;
        case O_BIAS:
            c->bias = optarg;
            c->bias_explicit = 1;
            break;
        case O_MODEL: model = optarg; break;
        case O_CPU:
            if (parse_num("--cpu", optarg, 1, 256, &v))
                return CONFIG_USAGE;
            c->cpu = (int)v;
            break;
        case O_LISTEN:
            if (c->nlisten == CONFIG_MAX_LISTEN) {
                fprintf(stderr, "tpd: at most %d --listen addresses\n", CONFIG_MAX_LISTEN);
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
        case O_LOG_LEVEL:
            c->log_level = tp_log_parse_level(optarg);
            if (c->log_level < 0) {
                fprintf(stderr,
                        "tpd: --log-level takes err, warn, notice, info or debug, got '%s'\n",
                        optarg);
                return CONFIG_USAGE;
            }
            break;
        case O_SOCK_MODE:
            if (parse_mode(optarg, &c->socket_mode))
                return CONFIG_USAGE;
            break;
        case O_TLS_CERT: c->tls_cert = optarg; break;
        case O_TLS_KEY: c->tls_key = optarg; break;
        case O_TLS_CA: c->tls_client_ca = optarg; break;
        case O_HELP: usage(stdout); return CONFIG_EXIT_OK;
        case O_VERSION: printf("tpd %s\n", TP_VERSION); return CONFIG_EXIT_OK;
        default:
            fprintf(stderr, "tpd: unknown or incomplete option '%s'\n", argv[optind - 1]);
            usage(stderr);
            return CONFIG_USAGE;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "tpd: unexpected argument '%s'\n", argv[optind]);
        return CONFIG_USAGE;
    }
    if (!c->weights) {
        fprintf(stderr, "tpd: --weights PATH is required\n");
        usage(stderr);
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
    else
        model_from_path(c->model, sizeof(c->model), c->weights);
    return CONFIG_OK;
}
