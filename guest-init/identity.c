/* See identity.h. */
#include "identity.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define DATABASE_MAX (4u << 20)
#define ID_MAX 0xFFFFFFFEu
#define MAX_FIELDS 8

struct lookup {
    char *passwd, *group;   /* whole files, NUL-terminated ("" when absent) */
    char *error;
    size_t error_size;
};

static int fail(struct lookup *l, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(l->error, l->error_size, fmt, ap);
    va_end(ap);
    return -1;
}

/* The file's bytes, "" when it does not exist, NULL on another error. */
static char *read_database(const char *path)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    char *data = malloc(DATABASE_MAX + 1);
    size_t len = 0;
    if (data == NULL || (fd < 0 && errno != ENOENT)) {
        free(data);
        if (fd >= 0)
            close(fd);
        return NULL;
    }
    while (fd >= 0 && len < DATABASE_MAX) {
        ssize_t n = read(fd, data + len, DATABASE_MAX - len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            free(data);
            close(fd);
            return NULL;
        }
        if (n == 0)
            break;
        len += (size_t)n;
    }
    if (fd >= 0)
        close(fd);
    data[len] = '\0';
    return data;
}

static int is_number(const char *s)
{
    if (*s == '\0')
        return 0;
    for (; *s; s++)
        if (*s < '0' || *s > '9')
            return 0;
    return 1;
}

static int parse_id(struct lookup *l, const char *text, const char *what, const char *path,
                    int lineno, unsigned *out)
{
    unsigned long long value = 0;
    if (!is_number(text) || strlen(text) > 10)
        return fail(l, "line %d of the guest's %s has an invalid %s '%.40s'", lineno, path,
                    what, text);
    value = strtoull(text, NULL, 10);
    if (value > ID_MAX)
        return fail(l, "line %d of the guest's %s has an invalid %s '%.40s'", lineno, path,
                    what, text);
    *out = (unsigned)value;
    return 0;
}

/* Split `line` on ':' in place; the number of fields (up to MAX_FIELDS + 1). */
static int split_fields(char *line, char **fields)
{
    int n = 0;
    fields[n++] = line;
    for (char *p = line; *p && n <= MAX_FIELDS; p++)
        if (*p == ':') {
            *p = '\0';
            fields[n++] = p + 1;
        }
    return n;
}

static int skip_line(const char *line)
{
    while (*line == ' ' || *line == '\t' || *line == '\r' || *line == '\v' || *line == '\f')
        line++;
    return *line == '\0' || *line == '#';
}

typedef int (*record_fn)(struct lookup *l, char **fields, int lineno, void *context);

/* Every record of a colon-separated database, strict about the field count. */
static int each_record(struct lookup *l, const char *data, const char *path, int want,
                       record_fn fn, void *context)
{
    char *copy = strdup(data), *line;
    int lineno = 0, result = 0;
    if (copy == NULL)
        return fail(l, "reading %s: out of memory", path);
    for (char *p = copy; p != NULL && result == 0; lineno++) {
        char *fields[MAX_FIELDS + 1];
        int count;
        line = p;
        p = strchr(p, '\n');
        if (p != NULL)
            *p++ = '\0';
        if (skip_line(line))
            continue;
        if (*line && line[strlen(line) - 1] == '\r')
            line[strlen(line) - 1] = '\0';
        count = split_fields(line, fields);
        if (count != want)
            result = fail(l, "line %d of the guest's %s has %d fields, not %d; fix that file "
                          "in the image", lineno + 1, path, count, want);
        else
            result = fn(l, fields, lineno + 1, context);
    }
    free(copy);
    return result;
}

struct user_search {
    const char *user;
    int by_uid;
    unsigned uid;
    int found;
    char name[256];
    struct identity *out;
};

static int passwd_record(struct lookup *l, char **f, int lineno, void *context)
{
    struct user_search *s = context;
    unsigned uid, gid;
    if (parse_id(l, f[2], "UID", "/etc/passwd", lineno, &uid) < 0 ||
        parse_id(l, f[3], "GID", "/etc/passwd", lineno, &gid) < 0)
        return -1;
    if (f[5][0] != '/')
        return fail(l, "user '%.100s' has home directory '%.100s' on line %d of the guest's "
                    "/etc/passwd, which is not an absolute path; fix that file",
                    f[0], f[5], lineno);
    if (!s->found && (s->by_uid ? uid == s->uid : strcmp(f[0], s->user) == 0)) {
        s->found = 1;
        s->out->uid = uid;
        s->out->gid = gid;
        snprintf(s->name, sizeof(s->name), "%s", f[0]);
        snprintf(s->out->home, sizeof(s->out->home), "%s", f[5]);
    }
    return 0;
}

static int membership_record(struct lookup *l, char **f, int lineno, void *context)
{
    struct user_search *s = context;
    struct identity *out = s->out;
    unsigned gid;
    char *save = NULL;
    if (parse_id(l, f[2], "GID", "/etc/group", lineno, &gid) < 0)
        return -1;
    for (char *member = strtok_r(f[3], ",", &save); member; member = strtok_r(NULL, ",", &save)) {
        int seen = 0;
        if (strcmp(member, s->name) != 0)
            continue;
        for (int i = 0; i < out->group_count; i++)
            seen |= out->groups[i] == gid;
        if (!seen && out->group_count == IDENTITY_MAX_GROUPS)
            return fail(l, "user '%s' is in more than %d groups", s->name, IDENTITY_MAX_GROUPS);
        if (!seen)
            out->groups[out->group_count++] = gid;
    }
    return 0;
}

static int lookup_user(struct lookup *l, const char *user, struct identity *out)
{
    struct user_search s = { .user = user, .out = out };
    if (strcmp(user, "root") == 0 || strcmp(user, "0") == 0)
        return 0;
    s.by_uid = is_number(user);
    if (s.by_uid) {
        char needle[32];
        snprintf(needle, sizeof(needle), ":%.12s:", user);
        if (strlen(user) > 10 || strtoull(user, NULL, 10) > ID_MAX)
            return fail(l, "user '%.40s' is not a valid UID", user);
        s.uid = (unsigned)strtoull(user, NULL, 10);
        if (strstr(l->passwd, needle) == NULL) {   /* OCI allows unlisted uids */
            out->uid = out->gid = s.uid;
            snprintf(out->home, sizeof(out->home), "/");
            return 0;
        }
    }
    if (each_record(l, l->passwd, "/etc/passwd", 7, passwd_record, &s) < 0)
        return -1;
    if (!s.found)
        return fail(l, "user '%.100s' not found in the guest's /etc/passwd", user);
    return each_record(l, l->group, "/etc/group", 4, membership_record, &s);
}

/* Lenient, as init._group_id is: a malformed line is just not a match. */
static int find_group_id(const char *data, const char *name, unsigned *gid)
{
    const char *line = data;
    size_t n = strlen(name);
    while (*line) {
        const char *end = strchrnul(line, '\n');
        const char *c1 = memchr(line, ':', (size_t)(end - line));
        const char *c2 = c1 ? memchr(c1 + 1, ':', (size_t)(end - c1 - 1)) : NULL;
        const char *c3 = c2 ? memchr(c2 + 1, ':', (size_t)(end - c2 - 1)) : NULL;
        if (c3 == NULL)
            c3 = end;
        if (c2 != NULL && (size_t)(c1 - line) == n && memcmp(line, name, n) == 0 &&
            c3 > c2 + 1 && c3 - c2 - 1 <= 10) {
            char text[12];
            memcpy(text, c2 + 1, (size_t)(c3 - c2 - 1));
            text[c3 - c2 - 1] = '\0';
            if (is_number(text) && strtoull(text, NULL, 10) <= 0xFFFFFFFFull) {
                *gid = (unsigned)strtoull(text, NULL, 10);
                return 0;
            }
        }
        line = *end ? end + 1 : end;
    }
    return -1;
}

static int resolve(struct lookup *l, const char *spec, struct identity *out)
{
    char user[256];
    const char *colon = strchr(spec, ':');
    size_t n = colon ? (size_t)(colon - spec) : strlen(spec);
    memset(out, 0, sizeof(*out));
    snprintf(out->home, sizeof(out->home), "/root");
    if (n >= sizeof(user))
        return fail(l, "user '%.100s' is too long", spec);
    memcpy(user, spec, n);
    user[n] = '\0';
    if (n > 0 && lookup_user(l, user, out) < 0)
        return -1;
    if (colon != NULL) {
        const char *group = colon + 1;
        unsigned gid;
        if (is_number(group) && strlen(group) <= 10 && strtoull(group, NULL, 10) <= 0xFFFFFFFFull)
            gid = (unsigned)strtoull(group, NULL, 10);
        else if (find_group_id(l->group, group, &gid) < 0)
            return fail(l, "group '%.100s' of the image's User is not in the guest's /etc/group",
                        group);
        out->gid = gid;
        out->group_count = 0;
    }
    return 0;
}

int identity_resolve(const char *spec, struct identity *out, char *error, size_t error_size)
{
    struct lookup l = { read_database("/etc/passwd"), read_database("/etc/group"), error,
                        error_size };
    int result;
    if (l.passwd == NULL || l.group == NULL)
        result = fail(&l, "cannot read the guest's /etc/passwd or /etc/group: %s",
                      strerror(errno));
    else
        result = resolve(&l, spec, out);
    free(l.passwd);
    free(l.group);
    return result;
}
