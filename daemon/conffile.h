/* conffile.h -- tpd's configuration file: one "key = value" per line, where each key is a
 * command-line flag without its leading "--" (max-batch = 64). Blank lines and lines starting
 * with '#' are ignored; a value may be wrapped in double quotes to keep spaces at its ends.
 * This file knows nothing about the keys: config.c looks each one up in the same option table
 * getopt uses, so every flag is a key. Read by tpd's main thread at start, before anything else. */
#ifndef TPD_CONFFILE_H
#define TPD_CONFFILE_H

#include <stddef.h>

struct conffile_entry {
    const char *key;   /* as written, without "--" */
    const char *value; /* NULL when the line has no '=' */
    int line;          /* 1-based */
};

struct conffile {
    char *path; /* copy of the file name, for messages */
    char *text; /* the file's bytes; keys and values point into it */
    struct conffile_entry *e;
    size_t n;
};

/* Reads and splits path. Fails (-1, msg in errbuf: "PATH: why" or "PATH:LINE: why") when the
 * file cannot be read, is larger than 1 MiB, holds a NUL byte, or has a line that is not
 * "key = value" with a non-empty key. On success f is the caller's (conffile_free); the strings
 * stay valid until then. */
int conffile_read(struct conffile *f, const char *path, char *errbuf, size_t errlen);

/* Frees what conffile_read made. Takes a zeroed struct. */
void conffile_free(struct conffile *f);

#endif
