/* main.c -- tpclient, the command-line client of tpd: global options, then one subcommand
 * (cmd_<name>.c). Any KServe v2 gRPC server with one [-1, in] -> [-1, out] model of FP32, FP16
 * or BF16 works. */
#include <errno.h>
#include <malloc.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cmd.h"

static void usage(FILE *f)
{
    fprintf(f, "usage: tpclient [--server ADDR] [--timeout MS] COMMAND [args]\n"
               "\n"
               "commands:\n"
               "  forward IN [-o OUT] [--model NAME] [--input-dtype fp32|fp16|bf16] [--shm]\n"
               "          [--verify CKPT [--weight NAME | --block MODULE [--act ACT]]\n"
               "          [--bias NAME | --no-bias] [--layout auto|linear|conv1d]\n"
               "          [--tolerance REL]]\n"
               "                  y = layer(x) for IN of shape [in], [B, in], [B, S, in] or\n"
               "                  [A, B, S, in]: a .npy of float32, float16, float64 or bfloat16\n"
               "                  ('<V2'/'|V2', as ml_dtypes saves it), C or Fortran order, or a\n"
               "                  raw .bin of rows in --input-dtype (default: the model's\n"
               "                  datatype); sent in the model's datatype, max_batch rows a\n"
               "                  request. OUT.npy has IN's leading dims and [out] (FP16 model:\n"
               "                  float16, else float32); OUT.bin is raw float32 rows. Other\n"
               "                  formats (.npz, .pt, .safetensors, ...) are refused (exit 64).\n"
               "                  --verify checks every element against a float64 reference\n"
               "                  of the layer or block, found in CKPT (file, directory or index) by\n"
               "                  the same rules and flags as tpd's --weights;\n"
               "                  --tolerance defaults to 1e-2 for FP16/BF16, else 1e-5;\n"
               "                  --shm: tensors through system shared memory (same host)\n"
               "  health [--model NAME]    server liveness and readiness (exit 3: not ready)\n"
               "  metadata [--model NAME]  the model's inputs, outputs and parallel layout\n"
               "  bench [--rows B] [--concurrency C] [--duration S | --iters N] [--warmup N]\n"
               "        [--shared-channel] [--shm] [--model NAME]\n"
               "                  load generator: C clients (threads, one channel each unless\n"
               "                  --shared-channel) call ModelInfer back to back for S seconds or\n"
               "                  N calls in all (default: 1 client, 100 calls) after N warm-up\n"
               "                  calls each (default 3); prints requests/s, rows/s, GFLOP/s,\n"
               "                  latency p50/p90/p99 and a 'bench-result:' line of key=value;\n"
               "                  --shm moves the tensors through registered POSIX shared memory\n"
               "\n"
               "  --server ADDR   HOST:PORT or unix:PATH (default: $TPD_SERVER or 127.0.0.1:8001)\n"
               "  --timeout MS    deadline of each call (default: 30000)\n"
               "  --tls           connect with TLS, verifying the server against the system's CAs\n"
               "  --tls-ca PATH   connect with TLS, verifying the server against this PEM CA\n"
               "  --tls-cert PATH --tls-key PATH\n"
               "                  client certificate and key (PEM) for servers that require one\n");
}

void cmd_error(const char *fmt, ...)
{
    char msg[512];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    fprintf(stderr, "tpclient: error: %s\n", msg);
}

int cmd_model_option(int argc, char **argv, const char **model)
{
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--model") == 0 && i + 1 < argc) {
            *model = argv[++i];
        } else {
            cmd_error("%s: unexpected argument '%s' (only --model NAME)", argv[0], argv[i]);
            return -1;
        }
    }
    return 0;
}

int main(int argc, char **argv)
{
    static const struct {
        const char *name;
        int (*fn)(struct conn *, int, char **);
    } cmds[] = {{"forward", cmd_forward},
                {"health", cmd_health},
                {"metadata", cmd_metadata},
                {"bench", cmd_bench}};
    const char *server = getenv("TPD_SERVER");
    struct conn c = {0};
    struct conn_tls tls = {0};
    struct tp_err err = {0};
    char **rest = calloc((size_t)argc + 1, sizeof(char *));
    int nrest = 0, timeout_ms = 30000, status;

    mallopt(M_MMAP_THRESHOLD, 32 << 20);
    mallopt(M_TRIM_THRESHOLD, 1 << 30);
    if (!rest)
        return EXIT_ERROR;
    /* global options may stand before or after the command */
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            usage(stdout);
            free(rest);
            return 0;
        } else if (strcmp(argv[i], "--version") == 0) {
            printf("tpclient %s\n", TP_VERSION);
            free(rest);
            return 0;
        } else if (strcmp(argv[i], "--tls") == 0) {
            tls.on = 1;
        } else if (strcmp(argv[i], "--tls-ca") == 0 || strcmp(argv[i], "--tls-cert") == 0 ||
                   strcmp(argv[i], "--tls-key") == 0) {
            if (i + 1 >= argc) {
                cmd_error("%s needs a value", argv[i]);
                free(rest);
                return EXIT_USAGE;
            }
            if (strcmp(argv[i], "--tls-ca") == 0)
                tls.ca = argv[i + 1];
            else if (strcmp(argv[i], "--tls-cert") == 0)
                tls.cert = argv[i + 1];
            else
                tls.key = argv[i + 1];
            i++;
        } else if (strcmp(argv[i], "--server") == 0 || strcmp(argv[i], "--timeout") == 0) {
            if (i + 1 >= argc) {
                cmd_error("%s needs a value", argv[i]);
                free(rest);
                return EXIT_USAGE;
            }
            if (argv[i][2] == 's') {
                server = argv[++i];
            } else {
                char *end;

                errno = 0;
                timeout_ms = (int)strtol(argv[++i], &end, 10);
                if (errno || *end || timeout_ms <= 0) {
                    cmd_error("--timeout takes milliseconds, got '%s'", argv[i]);
                    free(rest);
                    return EXIT_USAGE;
                }
            }
        } else {
            rest[nrest++] = argv[i];
        }
    }
    if (!server || !server[0])
        server = "127.0.0.1:8001";
    if (nrest == 0) {
        usage(stderr);
        free(rest);
        return EXIT_USAGE;
    }
    for (size_t i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++) {
        if (strcmp(rest[0], cmds[i].name) != 0)
            continue;
        if (conn_open(&c, server, timeout_ms, &tls, &err) < 0) {
            cmd_error("%s", err.msg);
            conn_close(&c);
            free(rest);
            return EXIT_ERROR;
        }
        status = cmds[i].fn(&c, nrest, rest);
        conn_close(&c);
        free(rest);
        return status;
    }
    cmd_error("unknown command '%s' (forward, health, metadata or bench)", rest[0]);
    usage(stderr);
    free(rest);
    return EXIT_USAGE;
}
