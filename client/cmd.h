/* cmd.h -- tpclient's subcommands, one file each. Each gets the open connection and its own
 * arguments (argv[0] is the subcommand's name) and returns the process exit status. */
#ifndef TPC_CMD_H
#define TPC_CMD_H

#include "conn.h"

#define EXIT_ERROR 1
#define EXIT_VERIFY 2
#define EXIT_NOT_READY 3
#define EXIT_USAGE 64

int cmd_forward(struct conn *c, int argc, char **argv);
int cmd_health(struct conn *c, int argc, char **argv);
int cmd_metadata(struct conn *c, int argc, char **argv);
int cmd_bench(struct conn *c, int argc, char **argv);

/* Parses the only option of a command that takes just [--model NAME]; -1 after a message. */
int cmd_model_option(int argc, char **argv, const char **model);

/* Prints "tpclient: error: MSG" on stderr. */
void cmd_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#endif
