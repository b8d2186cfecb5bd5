/* log.h -- one line per event on stderr, syslog levels. tp_log tests the level before it formats,
 * so debug lines cost nothing at the default level (notice). Under journald (JOURNAL_STREAM names
 * stderr) lines start with "<N>" and carry no time, since the journal records both; on a terminal
 * or a file they start with the time. Workers set a prefix ("rank 2") that starts every line. */
#ifndef TP_LOG_H
#define TP_LOG_H

enum tp_log_level {
    TP_LOG_ERR = 3,
    TP_LOG_WARN = 4,
    TP_LOG_NOTICE = 5,
    TP_LOG_INFO = 6,
    TP_LOG_DEBUG = 7,
};

extern enum tp_log_level tp_log_level;

#define tp_log(level, ...)                                                                         \
    do {                                                                                           \
        if ((level) <= tp_log_level)                                                               \
            tp_log_write((level), __VA_ARGS__);                                                    \
    } while (0)

void tp_log_write(enum tp_log_level level, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* Sets the program name and an optional prefix (NULL for none) shown on every line; copies both.
 * Reads JOURNAL_STREAM once to choose the line format: the journal's when it names the device
 * and inode of stderr. */
void tp_log_init(const char *prog, const char *prefix);

/* Parses "err", "warn", "notice", "info" or "debug"; -1 for anything else. */
int tp_log_parse_level(const char *name);

#endif
