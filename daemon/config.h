/* config.h -- tpd's settings: defaults, then the command line. Parsing only records and checks
 * the values; nothing here opens a file or a socket. */
#ifndef TPD_CONFIG_H
#define TPD_CONFIG_H

#include <stdint.h>

#define CONFIG_MAX_LISTEN 8

struct config {
    const char *weights; /* safetensors path */
    const char *weight;  /* tensor name of W */
    const char *bias;    /* tensor name of b */
    int bias_explicit;   /* --bias given: the tensor must exist */
    char model[128];     /* model name */
    int cpu;             /* CPU ranks */
    const char *listen[CONFIG_MAX_LISTEN];
    int nlisten;
    uint32_t max_batch; /* rows per request */
    uint32_t slots;     /* requests computed at once */
    uint32_t max_queue; /* requests waiting for a slot */
    const char *worker; /* worker executable; NULL: next to tpd */
    int grpc_threads;
    int restart_backoff_ms; /* first restart delay */
    int log_level;
    unsigned socket_mode;      /* file mode of unix: sockets */
    const char *tls_cert;      /* PEM certificate chain; NULL: no TLS */
    const char *tls_key;       /* PEM private key of tls_cert */
    const char *tls_client_ca; /* PEM CA bundle: clients must present a cert it signed */
};

enum config_result { CONFIG_OK, CONFIG_EXIT_OK, CONFIG_USAGE };

/* Fills c from argv. CONFIG_EXIT_OK after --help or --version (already printed), CONFIG_USAGE
 * after a message on stderr for a bad command line. Strings point into argv. */
enum config_result config_parse(struct config *c, int argc, char **argv);

#endif
