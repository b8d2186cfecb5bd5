/* proc.h -- starting child processes. Only this file decides what a child inherits: the fds
 * listed in the spawn call, placed at 3, 4, ... in order, plus stdin/stdout/stderr; everything
 * else is CLOEXEC. Signals start at their defaults with none blocked, whatever the parent
 * ignores or blocks. An exec failure comes back through a CLOEXEC pipe, so proc_spawn either
 * returns a running program or an error that says why exec failed. The child gets
 * PR_SET_PDEATHSIG(SIGKILL): a worker never outlives its coordinator. */
#ifndef TP_PROC_H
#define TP_PROC_H

#include <sys/types.h>

#include "err.h"

/* Starts argv[0] (a path) with argv and the current environment plus the NULL-terminated
 * "NAME=value" list env_add (may be NULL). The nfds fds in fds become 3, 3+1, ... in the child.
 * On success *pid is the child's pid. */
int proc_spawn(char *const argv[], char *const env_add[], const int *fds, int nfds, pid_t *pid,
               struct tp_err *err);

/* Directory of the running executable, with a trailing '/'; "" when unknown. */
void proc_self_dir(char *buf, size_t len);

/* Puts the calling thread (only it, and the threads it starts later) at the lowest CPU priority
 * (nice 19), for work that may wait, such as loading a model beside the jobs of those already
 * served: on a busy machine it then takes longer instead of slowing the jobs down. Logs a
 * warning and goes on when the system refuses. */
void proc_thread_background(const char *what);

/* Runs fn(arg) on a thread of its own at that priority and waits for it (on the calling thread
 * when no thread can start): for a piece of heavy work, such as faulting in a new model's
 * memory, done by a thread that must itself keep its priority (the threads it starts inherit
 * it). */
void proc_run_background(const char *what, void (*fn)(void *arg), void *arg);

#endif
