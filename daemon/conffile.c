/* conffile.c -- reading and splitting tpd's configuration file (see conffile.h). The file is
 * read whole (it is small: capped at 1 MiB) and cut in place, so every key and value points into
 * one buffer. */
#include "conffile.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define MAX_CONF (1 << 20)

static char *trim(char *s)
{
    char *end;

    while (*s && isspace((unsigned char)*s))
        s++;
    end = s + strlen(s);
    while (end > s && isspace((unsigned char)end[-1]))
        *--end = '\0';
    return s;
}

int conffile_read(struct conffile *f, const char *path, char *errbuf, size_t errlen)
{
    /* O_NONBLOCK: a FIFO opens at once and is refused, instead of hanging tpd at start */
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    FILE *fp = NULL;
    size_t len = 0, cap = 0;
    char *line, *next;
    struct stat st;
    int lineno = 0;

    *f = (struct conffile){0};
    if (fd < 0 || fstat(fd, &st) < 0) {
        snprintf(errbuf, errlen, "%s: %s", path, strerror(errno));
        if (fd >= 0)
            close(fd);
        return -1;
    }
    if (!S_ISREG(st.st_mode)) {
        snprintf(errbuf, errlen, "%s: not a regular file", path);
        close(fd);
        return -1;
    }
    fp = fdopen(fd, "r");
    if (!fp) {
        snprintf(errbuf, errlen, "%s: %s", path, strerror(errno));
        close(fd);
        return -1;
    }
    f->path = strdup(path);
    f->text = malloc(MAX_CONF + 1);
    if (!f->path || !f->text) {
        snprintf(errbuf, errlen, "%s: out of memory", path);
        goto fail;
    }
    len = fread(f->text, 1, MAX_CONF + 1, fp);
    if (ferror(fp)) {
        snprintf(errbuf, errlen, "%s: %s", path, strerror(errno));
        goto fail;
    }
    if (len > MAX_CONF) {
        snprintf(errbuf, errlen, "%s: larger than %d bytes", path, MAX_CONF);
        goto fail;
    }
    if (memchr(f->text, '\0', len)) {
        snprintf(errbuf, errlen, "%s: holds a NUL byte (not a text file)", path);
        goto fail;
    }
    f->text[len] = '\0';
    for (line = f->text; line; line = next) {
        struct conffile_entry e;
        char *eq, *s;

        lineno++;
        next = strchr(line, '\n');
        if (next)
            *next++ = '\0';
        s = trim(line);
        if (!*s || *s == '#')
            continue;
        eq = strchr(s, '=');
        e = (struct conffile_entry){.key = s, .line = lineno};
        if (eq) {
            char *v;
            size_t vl;

            *eq = '\0';
            e.key = trim(s);
            v = trim(eq + 1);
            vl = strlen(v);
            if (vl >= 2 && v[0] == '"' && v[vl - 1] == '"') {
                v[vl - 1] = '\0';
                v++;
            }
            e.value = v;
        }
        if (!e.key[0]) {
            snprintf(errbuf, errlen, "%s:%d: a line without a key (expected 'key = value')", path,
                     lineno);
            goto fail;
        }
        if (f->n == cap) {
            struct conffile_entry *ne;

            cap = cap ? cap * 2 : 16;
            ne = realloc(f->e, cap * sizeof(*ne));
            if (!ne) {
                snprintf(errbuf, errlen, "%s: out of memory", path);
                goto fail;
            }
            f->e = ne;
        }
        f->e[f->n++] = e;
    }
    fclose(fp);
    return 0;
fail:
    fclose(fp);
    conffile_free(f);
    return -1;
}

void conffile_free(struct conffile *f)
{
    free(f->path);
    free(f->text);
    free(f->e);
    *f = (struct conffile){0};
}
