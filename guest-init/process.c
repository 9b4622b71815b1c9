/* See process.h. */
#include "process.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define DEFAULT_SHELL "/bin/sh"
#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

/* An ordered map: a later value replaces an earlier one in its first place. */
struct env_map {
    char **keys;
    const char **values;
    int count, capacity;
};

static int env_set(struct env_map *env, const char *key, size_t key_len, const char *value)
{
    for (int i = 0; i < env->count; i++)
        if (strlen(env->keys[i]) == key_len && memcmp(env->keys[i], key, key_len) == 0) {
            env->values[i] = value;
            return 0;
        }
    if (env->count == env->capacity) {
        int capacity = env->capacity ? env->capacity * 2 : 16;
        char **keys = realloc(env->keys, (size_t)capacity * sizeof(*keys));
        const char **values;
        if (keys == NULL)
            return -1;
        env->keys = keys;
        values = realloc(env->values, (size_t)capacity * sizeof(*values));
        if (values == NULL)
            return -1;
        env->values = values;
        env->capacity = capacity;
    }
    env->keys[env->count] = strndup(key, key_len);
    if (env->keys[env->count] == NULL)
        return -1;
    env->values[env->count++] = value;
    return 0;
}

static const char *env_get(const struct env_map *env, const char *key)
{
    for (int i = 0; i < env->count; i++)
        if (strcmp(env->keys[i], key) == 0)
            return env->values[i];
    return NULL;
}

static int fill_env(struct env_map *env, const struct image_config *image,
                    const struct launch_request *request, const char *home)
{
    if (env_set(env, "PATH", 4, DEFAULT_PATH) < 0 ||
        (request->hostname != NULL && request->hostname[0] != '\0' &&
         env_set(env, "HOSTNAME", 8, request->hostname) < 0) ||
        env_set(env, "HOME", 4, home) < 0 ||
        (request->terminal != NULL && env_set(env, "TERM", 4, request->terminal) < 0))
        return -1;
    for (int i = 0; i < image->env.count; i++) {
        const char *item = image->env.items[i], *eq = strchr(item, '=');
        if (env_set(env, item, (size_t)(eq - item), eq + 1) < 0)
            return -1;
    }
    for (int i = 0; i < request->env_keys.count; i++)
        if (env_set(env, request->env_keys.items[i], strlen(request->env_keys.items[i]),
                    request->env_values.items[i]) < 0)
            return -1;
    return 0;
}

static char **env_strings(const struct env_map *env)
{
    char **out = calloc((size_t)env->count + 1, sizeof(*out));
    if (out == NULL)
        return NULL;
    for (int i = 0; i < env->count; i++)
        if (asprintf(&out[i], "%s=%s", env->keys[i], env->values[i]) < 0)
            return NULL;
    return out;
}

char *normalize_path(const char *path)
{
    size_t n = strlen(path);
    char *out = malloc(n + 2);
    size_t len = 0;
    const char *p = path;
    if (out == NULL)
        return NULL;
    while (*p) {
        const char *end = strchrnul(p, '/');
        size_t part = (size_t)(end - p);
        if (part == 2 && p[0] == '.' && p[1] == '.') {
            while (len > 0 && out[len - 1] != '/')
                len--;
            if (len > 0)
                len--;
        } else if (part > 0 && !(part == 1 && p[0] == '.')) {
            out[len++] = '/';
            memcpy(out + len, p, part);
            len += part;
        }
        p = *end ? end + 1 : end;
    }
    if (len == 0)
        out[len++] = '/';
    out[len] = '\0';
    return out;
}

static int is_file(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

/* launchconfig.resolve_executable, asking the guest's root. */
static char *resolve_executable(const struct env_map *env, const char *name)
{
    const char *search = env_get(env, "PATH");
    char *candidate;
    if (name[0] == '/')
        return strdup(name);
    if (asprintf(&candidate, "/%s", name) < 0)
        return NULL;
    {
        char *normal = normalize_path(candidate);
        free(candidate);
        if (normal == NULL || is_file(normal))
            return normal;
        free(normal);
    }
    for (const char *dir = search ? search : ""; search != NULL;) {
        const char *end = strchrnul(dir, ':');
        size_t n = (size_t)(end - dir);
        if (n > 0) {
            const char *sep = dir[n - 1] == '/' ? "" : "/";
            if (asprintf(&candidate, "%.*s%s%s", (int)n, dir, sep, name) < 0)
                return NULL;
            if (is_file(candidate))
                return candidate;
            free(candidate);
        }
        if (*end == '\0')
            break;
        dir = end + 1;
    }
    return strdup(name);
}

static char **build_argv(const struct strings *front, const struct strings *back,
                         const char *path)
{
    int count = front->count + back->count;
    char **argv = calloc((size_t)(count > 0 ? count : 1) + 1, sizeof(*argv));
    const char *base = strrchr(path, '/');
    base = base == NULL ? path : base + 1;
    if (argv == NULL)
        return NULL;
    argv[0] = strdup(*base ? base : path);
    for (int i = 1; i < count; i++)
        argv[i] = (char *)(i < front->count ? front->items[i] : back->items[i - front->count]);
    return argv;
}

static char *working_directory(const char *dir)
{
    char *prefixed, *normal;
    if (*dir == '\0')
        return strdup("/");
    if (dir[0] == '/')
        return strdup(dir);
    if (asprintf(&prefixed, "/%s", dir) < 0)
        return NULL;
    normal = normalize_path(prefixed);
    free(prefixed);
    return normal;
}

int process_build(const struct image_config *image, const struct launch_request *request,
                  const char *home, struct process *out)
{
    const struct strings *back = request->has_command ? &request->command : &image->cmd;
    static const char *shell_items[] = { DEFAULT_SHELL };
    const struct strings shell = { shell_items, 1 }, none = { NULL, 0 };
    const struct strings *front = &image->entrypoint;
    struct env_map env = { 0 };
    const char *first;
    if (front->count + back->count == 0) {
        front = &shell;
        back = &none;
    }
    first = front->count > 0 ? front->items[0] : back->items[0];
    memset(out, 0, sizeof(*out));
    if (fill_env(&env, image, request, home) < 0)
        return -1;
    out->path = resolve_executable(&env, first);
    out->envp = env_strings(&env);
    out->cwd = working_directory(image->working_dir);
    out->user = image->user;
    if (out->path == NULL || out->envp == NULL || out->cwd == NULL)
        return -1;
    out->argv = build_argv(front, back, out->path);
    return out->argv == NULL || out->argv[0] == NULL ? -1 : 0;
}
