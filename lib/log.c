/* log.c -- the writer behind tp_log (log.h). Each line is formatted into one buffer and written
 * with a single write(2), so lines from the threads of one process, and from workers sharing the
 * coordinator's stderr, never interleave mid-line. */
#include "log.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

enum tp_log_level tp_log_level = TP_LOG_NOTICE;

static char log_prog[32] = "tpd";
static char log_prefix[32];
static int log_journal;

static const char *const level_names[] = {
    [TP_LOG_ERR] = "error", [TP_LOG_WARN] = "warning", [TP_LOG_NOTICE] = "notice",
    [TP_LOG_INFO] = "info", [TP_LOG_DEBUG] = "debug",
};

/* True when stderr is the journal's stream: JOURNAL_STREAM holds "DEVICE:INODE" of the stream
 * systemd connected, and it must be our stderr still (a child whose stderr was redirected
 * inherits the variable too), as systemd.exec(5) says to check. */
static int stderr_is_journal(void)
{
    const char *v = getenv("JOURNAL_STREAM");
    unsigned long long dev, ino;
    struct stat st;

    if (!v || sscanf(v, "%llu:%llu", &dev, &ino) != 2 || fstat(STDERR_FILENO, &st) < 0)
        return 0;
    return (unsigned long long)st.st_dev == dev && (unsigned long long)st.st_ino == ino;
}

void tp_log_init(const char *prog, const char *prefix)
{
    snprintf(log_prog, sizeof(log_prog), "%s", prog ? prog : "tpd");
    snprintf(log_prefix, sizeof(log_prefix), "%s", prefix ? prefix : "");
    log_journal = stderr_is_journal();
}

int tp_log_parse_level(const char *name)
{
    static const char *const names[] = {"err", "warn", "notice", "info", "debug"};

    for (int i = 0; i < 5; i++)
        if (strcmp(name, names[i]) == 0)
            return TP_LOG_ERR + i;
    return -1;
}

void tp_log_write(enum tp_log_level level, const char *fmt, ...)
{
    char line[1024];
    size_t n = 0;
    va_list ap;
    int r;

    if (log_journal) {
        r = snprintf(line, sizeof(line), "<%d>", (int)level);
    } else {
        struct timeval tv;
        struct tm tm;

        gettimeofday(&tv, NULL);
        localtime_r(&tv.tv_sec, &tm);
        r = snprintf(line, sizeof(line), "%04d-%02d-%02d %02d:%02d:%02d.%03d ", tm.tm_year + 1900,
                     tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                     (int)(tv.tv_usec / 1000));
    }
    n = (size_t)(r > 0 ? r : 0);
    r = snprintf(line + n, sizeof(line) - n, "%s%s%s: %s: ", log_prog, log_prefix[0] ? " " : "",
                 log_prefix, level_names[level]);
    n += (size_t)(r > 0 ? r : 0);
    if (n < sizeof(line)) {
        va_start(ap, fmt);
        r = vsnprintf(line + n, sizeof(line) - n, fmt, ap);
        va_end(ap);
        n += (size_t)(r > 0 ? r : 0);
    }
    if (n > sizeof(line) - 2)
        n = sizeof(line) - 2;
    line[n++] = '\n';
    if (write(STDERR_FILENO, line, n) < 0)
        return;
}
