/* proc.c -- fork+exec of workers, and a thread's priority (see proc.h). Between fork and exec
 * the child only calls async-signal-safe functions (dup2, sigaction, sigprocmask, execve): the
 * parent is multi-threaded (gRPC's threads), so anything that could take a lock (malloc,
 * stdio) might deadlock. The environment is therefore built in the parent. */
#include "proc.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "log.h"

extern char **environ;

#define MAX_FDS 8
#define MAX_ENV 1024

static void child(char *const argv[], char *const envp[], const int *fds, int nfds, int errfd,
                  pid_t parent)
{
    int tmp[MAX_FDS];
    int e;

    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) /* parent already gone */
        _exit(127);
    /* move the fds out of the way first, so that placing one at 3+i cannot clobber another */
    for (int i = 0; i < nfds; i++) {
        tmp[i] = fcntl(fds[i], F_DUPFD_CLOEXEC, 3 + MAX_FDS);
        if (tmp[i] < 0)
            goto fail;
    }
    for (int i = 0; i < nfds; i++)
        if (dup2(tmp[i], 3 + i) < 0) /* dup2 clears CLOEXEC on the new fd */
            goto fail;
    /* The program starts as a fresh one would: every signal at its default, none blocked. exec
     * resets caught signals itself but keeps ignored ones (tpd ignores SIGPIPE, so a worker
     * writing to a closed pipe would get EPIPE where it expects to die) and the mask (tpd blocks
     * its stop signals in every thread). Dispositions first, so that nothing the parent catches
     * can run here once the mask is gone. Reserved signals refuse sigaction: nothing to undo. */
    {
        struct sigaction dfl = {.sa_handler = SIG_DFL};
        sigset_t none;

        sigemptyset(&dfl.sa_mask);
        for (int sig = 1; sig < NSIG; sig++)
            if (sig != SIGKILL && sig != SIGSTOP)
                sigaction(sig, &dfl, NULL);
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
    }
    execve(argv[0], argv, envp);
fail:
    e = errno;
    if (write(errfd, &e, sizeof(e)) < 0)
        _exit(127);
    _exit(127);
}

int proc_spawn(char *const argv[], char *const env_add[], const int *fds, int nfds, pid_t *pid,
               struct tp_err *err)
{
    char *envp[MAX_ENV];
    int n = 0, pipefd[2] = {-1, -1}, child_errno = 0;
    pid_t parent = getpid(), p;
    ssize_t r;

    if (nfds > MAX_FDS)
        return tp_err_set(err, TP_EINTERNAL, "%d fds to pass, at most %d", nfds, MAX_FDS);
    for (char **e = environ; *e && n < MAX_ENV - 64; e++)
        envp[n++] = *e;
    for (int i = 0; env_add && env_add[i] && n < MAX_ENV - 1; i++)
        envp[n++] = env_add[i];
    envp[n] = NULL;
    if (pipe2(pipefd, O_CLOEXEC) < 0)
        return tp_err_sys(err, "creating exec pipe");
    p = fork();
    if (p < 0) {
        tp_err_sys(err, "fork");
        goto fail;
    }
    if (p == 0) {
        close(pipefd[0]);
        child(argv, envp, fds, nfds, pipefd[1], parent);
    }
    close(pipefd[1]);
    pipefd[1] = -1;
    do
        r = read(pipefd[0], &child_errno, sizeof(child_errno));
    while (r < 0 && errno == EINTR);
    close(pipefd[0]);
    if (r > 0) {
        errno = child_errno;
        tp_err_sys(err, "starting %s", argv[0]);
        while (waitpid(p, NULL, 0) < 0 && errno == EINTR)
            ;
        return -1;
    }
    *pid = p;
    return 0;
fail:
    if (pipefd[0] >= 0)
        close(pipefd[0]);
    if (pipefd[1] >= 0)
        close(pipefd[1]);
    return -1;
}

void proc_self_dir(char *buf, size_t len)
{
    char path[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", path, sizeof(path) - 1);
    char *slash;

    buf[0] = '\0';
    if (n <= 0)
        return;
    path[n] = '\0';
    slash = strrchr(path, '/');
    if (!slash)
        return;
    slash[1] = '\0';
    snprintf(buf, len, "%s", path);
}

void proc_thread_background(const char *what)
{
    /* on Linux a nice value belongs to a thread: PRIO_PROCESS with a thread id sets it alone */
    if (setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), 19) < 0)
        tp_log(TP_LOG_WARN, "%s: cannot lower its priority: %s", what, strerror(errno));
}

struct background {
    const char *what;
    void (*fn)(void *arg);
    void *arg;
};

static void *background_main(void *arg)
{
    struct background *b = arg;

    proc_thread_background(b->what);
    b->fn(b->arg);
    return NULL;
}

void proc_run_background(const char *what, void (*fn)(void *arg), void *arg)
{
    struct background b = {.what = what, .fn = fn, .arg = arg};
    pthread_t t;

    if (pthread_create(&t, NULL, background_main, &b) != 0) {
        fn(arg);
        return;
    }
    pthread_join(t, NULL);
}
