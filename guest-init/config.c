/* See config.h. The rules are launchconfig.py's, field by field; anything of
   the wrong type is refused with the field's name rather than guessed at. */
#include "config.h"

#include <arpa/inet.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define HOSTNAME_MAX 64
#define LINK_NAME_MAX 15

struct reader {
    const struct json_doc *doc;
    char *error;
    size_t error_size;
};

static int fail(struct reader *r, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->error, r->error_size, fmt, ap);
    va_end(ap);
    return -1;
}

static const struct json_node *node(const struct reader *r, int index)
{
    return &r->doc->nodes[index];
}

/* Python's `value or default`: null, false, 0, "", [] and {} all count as absent. */
static int falsy(const struct reader *r, int index)
{
    const struct json_node *n;
    if (index < 0)
        return 1;
    n = node(r, index);
    return n->type == JSON_NULL || n->type == JSON_FALSE ||
           (n->type == JSON_STRING && n->len == 0) ||
           ((n->type == JSON_ARRAY || n->type == JSON_OBJECT) && n->count == 0);
}

static int text(struct reader *r, int index, const char *what, const char **out)
{
    const struct json_node *n = node(r, index);
    if (n->type != JSON_STRING || strlen(n->str) != n->len)
        return fail(r, "%s must be a string without NUL bytes, got %s", what,
                    n->type == JSON_STRING ? "one with a NUL byte" : json_type_name(n->type));
    *out = n->str;
    return 0;
}

/* A list of strings, or null/absent for an empty one. */
static int text_list(struct reader *r, int index, const char *what, struct strings *out)
{
    const struct json_node *n;
    int i = 0;
    out->items = NULL;
    out->count = 0;
    if (index < 0 || node(r, index)->type == JSON_NULL)
        return 0;
    n = node(r, index);
    if (n->type != JSON_ARRAY)
        return fail(r, "%s must be a list of strings, got %s", what, json_type_name(n->type));
    out->items = calloc((size_t)n->count + 1, sizeof(*out->items));
    if (out->items == NULL)
        return fail(r, "%s: out of memory", what);
    for (int child = n->first; child >= 0; child = node(r, child)->next)
        if (text(r, child, what, &out->items[i++]) < 0)
            return -1;
    out->count = n->count;
    return 0;
}

int valid_env_name(const char *name)
{
    if (!((*name >= 'A' && *name <= 'Z') || (*name >= 'a' && *name <= 'z') || *name == '_'))
        return 0;
    for (const char *p = name + 1; *p; p++)
        if (!((*p >= 'A' && *p <= 'Z') || (*p >= 'a' && *p <= 'z') ||
              (*p >= '0' && *p <= '9') || *p == '_'))
            return 0;
    return 1;
}

static int check_env_list(struct reader *r, const struct strings *env)
{
    for (int i = 0; i < env->count; i++) {
        const char *eq = strchr(env->items[i], '=');
        char name[256];
        size_t n = eq == NULL ? 0 : (size_t)(eq - env->items[i]);
        if (eq == NULL)
            return fail(r, "image Env: '%.200s' is not of the form KEY=VALUE", env->items[i]);
        if (n >= sizeof(name))
            return fail(r, "image Env: a variable name of %zu bytes is too long", n);
        memcpy(name, env->items[i], n);
        name[n] = '\0';
        if (!valid_env_name(name))
            return fail(r, "image Env: '%s' is not a valid environment variable name "
                        "(letters, digits and '_', not starting with a digit)", name);
    }
    return 0;
}

static int user_part_ok(const char *s, size_t n)
{
    if (n == 0 || *s == '-')
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!((s[i] >= 'A' && s[i] <= 'Z') || (s[i] >= 'a' && s[i] <= 'z') ||
              (s[i] >= '0' && s[i] <= '9') || s[i] == '_' || s[i] == '.' || s[i] == '-'))
            return 0;
    return 1;
}

/* OCI's User: "", USER, UID, USER:GROUP, UID:GID. */
static int check_user(struct reader *r, const char *spec)
{
    const char *colon = strchr(spec, ':');
    if (*spec == '\0')
        return 0;
    if (colon == NULL ? user_part_ok(spec, strlen(spec))
                      : user_part_ok(spec, (size_t)(colon - spec)) &&
                        user_part_ok(colon + 1, strlen(colon + 1)))
        return 0;
    return fail(r, "invalid user '%.200s': expected USER, UID, USER:GROUP or UID:GID", spec);
}

static int optional_text(struct reader *r, int object, const char *name, const char *what,
                         const char **out)
{
    int index = json_member(r->doc, object, name);
    *out = "";
    return falsy(r, index) ? 0 : text(r, index, what, out);
}

int image_config_read(const struct json_doc *doc, struct image_config *out,
                      char *error, size_t error_size)
{
    struct reader r = { doc, error, error_size };
    int config;
    memset(out, 0, sizeof(*out));
    out->working_dir = out->user = "";
    if (node(&r, 0)->type != JSON_OBJECT)
        return fail(&r, "image configuration is not a JSON object; re-import the image");
    config = json_member(doc, 0, "config");
    if (falsy(&r, config))
        return 0;
    if (node(&r, config)->type != JSON_OBJECT)
        return fail(&r, "image configuration's 'config' is not a JSON object");
    if (text_list(&r, json_member(doc, config, "Env"), "image Env", &out->env) < 0 ||
        check_env_list(&r, &out->env) < 0 ||
        text_list(&r, json_member(doc, config, "Entrypoint"), "image Entrypoint",
                  &out->entrypoint) < 0 ||
        text_list(&r, json_member(doc, config, "Cmd"), "image Cmd", &out->cmd) < 0 ||
        optional_text(&r, config, "WorkingDir", "image WorkingDir", &out->working_dir) < 0 ||
        optional_text(&r, config, "User", "image User", &out->user) < 0)
        return -1;
    return check_user(&r, out->user);
}

static int check_hostname(struct reader *r, const char *name)
{
    size_t n = strlen(name);
    int label = 0;
    if (n == 0 || n > HOSTNAME_MAX)
        goto bad;
    for (size_t i = 0; i <= n; i++) {
        char c = name[i];
        if (c == '.' || c == '\0') {
            if (label == 0)
                goto bad;
            label = 0;
        } else if ((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
                   c == '-' || c == '_') {
            label++;
        } else {
            goto bad;
        }
    }
    return 0;
bad:
    return fail(r, "invalid hostname '%.100s': up to %d characters, dot-separated labels of "
                "letters, digits, '-' and '_'", name, HOSTNAME_MAX);
}

static int check_link(struct reader *r, const char *link)
{
    size_t n = strlen(link);
    if (n == 0 || n > LINK_NAME_MAX)
        goto bad;
    for (size_t i = 0; i < n; i++)
        if (!((link[i] >= 'A' && link[i] <= 'Z') || (link[i] >= 'a' && link[i] <= 'z') ||
              (link[i] >= '0' && link[i] <= '9') || strchr("_.:-", link[i]) != NULL))
            goto bad;
    return 0;
bad:
    return fail(r, "invalid network link name '%.100s'", link);
}

/* ADDRESS (with_prefix 0) or ADDRESS/PREFIX (1) of the given family. */
static int check_ip(struct reader *r, const char *value, int family, int with_prefix,
                    const char *what)
{
    char address[INET6_ADDRSTRLEN + 1];
    unsigned char binary[16];
    const char *slash = strchr(value, '/');
    size_t n = slash == NULL ? strlen(value) : (size_t)(slash - value);
    int max_prefix = family == AF_INET ? 32 : 128;
    if ((slash != NULL) != with_prefix || n >= sizeof(address))
        goto bad;
    memcpy(address, value, n);
    address[n] = '\0';
    if (inet_pton(family, address, binary) != 1)
        goto bad;
    if (with_prefix) {
        const char *p = slash + 1;
        int prefix = 0;
        if (*p == '\0' || strlen(p) > 3)
            goto bad;
        for (; *p; p++) {
            if (*p < '0' || *p > '9')
                goto bad;
            prefix = prefix * 10 + (*p - '0');
        }
        if (prefix > max_prefix)
            goto bad;
    }
    return 0;
bad:
    return fail(r, "invalid %s '%.100s'%s", what, value,
                with_prefix ? ": expected ADDRESS/PREFIX" : "");
}

/* `object`.`name`, which must be a string; `missing` names it when absent. */
static int required_text(struct reader *r, int object, const char *name, const char *missing,
                         const char **out)
{
    int index = json_member(r->doc, object, name);
    if (object < 0 || node(r, object)->type != JSON_OBJECT || index < 0)
        return fail(r, "launch configuration's network lacks '%s'", missing);
    return text(r, index, missing, out);
}

static int read_network(struct reader *r, int net, struct network_config *out)
{
    int ipv4 = json_member(r->doc, net, "ipv4"), ipv6 = json_member(r->doc, net, "ipv6");
    int resolver = json_member(r->doc, net, "resolver");
    if (required_text(r, net, "link", "link", &out->link) < 0 ||
        required_text(r, ipv4, "address", "ipv4 address", &out->ipv4_address) < 0 ||
        required_text(r, ipv4, "gateway", "ipv4 gateway", &out->ipv4_gateway) < 0)
        return -1;
    out->ipv6_address = out->ipv6_gateway = "";
    if (ipv6 >= 0) {
        if (node(r, ipv6)->type != JSON_OBJECT)
            return fail(r, "launch configuration's network 'ipv6' is not an object");
        if (json_member(r->doc, ipv6, "address") >= 0 &&
            text(r, json_member(r->doc, ipv6, "address"), "ipv6 address", &out->ipv6_address) < 0)
            return -1;
        if (json_member(r->doc, ipv6, "gateway") >= 0 &&
            text(r, json_member(r->doc, ipv6, "gateway"), "ipv6 gateway", &out->ipv6_gateway) < 0)
            return -1;
    }
    if (resolver >= 0 && node(r, resolver)->type != JSON_OBJECT)
        return fail(r, "launch configuration's network 'resolver' is not an object");
    if (text_list(r, json_member(r->doc, resolver, "nameservers"), "DNS resolver list",
                  &out->nameservers) < 0)
        return -1;
    if (check_link(r, out->link) < 0 ||
        check_ip(r, out->ipv4_address, AF_INET, 1, "IPv4 address") < 0 ||
        check_ip(r, out->ipv4_gateway, AF_INET, 0, "IPv4 gateway") < 0)
        return -1;
    if ((*out->ipv6_address || *out->ipv6_gateway) &&
        (check_ip(r, out->ipv6_address, AF_INET6, 1, "IPv6 address") < 0 ||
         check_ip(r, out->ipv6_gateway, AF_INET6, 0, "IPv6 gateway") < 0))
        return -1;
    for (int i = 0; i < out->nameservers.count; i++) {
        const char *server = out->nameservers.items[i];
        if (check_ip(r, server, strchr(server, ':') ? AF_INET6 : AF_INET, 0,
                     "DNS resolver address") < 0)
            return -1;
    }
    return 0;
}

static int read_env(struct reader *r, int env, struct launch_request *out)
{
    const struct json_node *n;
    int i = 0;
    if (falsy(r, env))
        return 0;
    n = node(r, env);
    if (n->type != JSON_OBJECT)
        return fail(r, "launch configuration's env is not a JSON object");
    out->env_keys.items = calloc((size_t)n->count + 1, sizeof(char *));
    out->env_values.items = calloc((size_t)n->count + 1, sizeof(char *));
    if (out->env_keys.items == NULL || out->env_values.items == NULL)
        return fail(r, "environment: out of memory");
    for (int child = n->first; child >= 0; child = node(r, child)->next, i++) {
        const struct json_node *c = node(r, child);
        if (strlen(c->key) != c->key_len || !valid_env_name(c->key))
            return fail(r, "environment: '%.100s' is not a valid environment variable name "
                        "(letters, digits and '_', not starting with a digit)", c->key);
        if (text(r, child, "environment variable value", &out->env_values.items[i]) < 0)
            return -1;
        out->env_keys.items[i] = c->key;
    }
    out->env_keys.count = out->env_values.count = i;
    return 0;
}

/* The client's TERM when it is on a terminal; null or absent: no terminal. */
static int read_terminal(struct reader *r, int index, struct launch_request *out)
{
    if (index < 0 || node(r, index)->type == JSON_NULL)
        return 0;
    if (text(r, index, "terminal", &out->terminal) < 0)
        return -1;
    if (out->terminal[0] == '\0' || strchr(out->terminal, '=') != NULL)
        return fail(r, "invalid terminal type '%.50s': a TERM value such as xterm-256color",
                    out->terminal);
    return 0;
}

static int read_isolation(struct reader *r, int index)
{
    const char *isolation;
    if (index < 0)
        return 0;
    if (text(r, index, "isolation", &isolation) < 0)
        return -1;
    if (strcmp(isolation, "container") != 0 && strcmp(isolation, "vm") != 0)
        return fail(r, "unknown isolation '%.50s': expected container or vm", isolation);
    return 0;
}

int launch_request_read(const struct json_doc *doc, struct launch_request *out,
                        char *error, size_t error_size)
{
    struct reader r = { doc, error, error_size };
    int run, net, hostname;
    memset(out, 0, sizeof(*out));
    if (node(&r, 0)->type != JSON_OBJECT)
        return fail(&r, "launch configuration is not a JSON object");
    run = json_member(doc, 0, "run");
    out->has_command = run >= 0 && node(&r, run)->type != JSON_NULL;
    if (out->has_command && text_list(&r, run, "command", &out->command) < 0)
        return -1;
    if (read_env(&r, json_member(doc, 0, "env"), out) < 0)
        return -1;
    hostname = json_member(doc, 0, "hostname");
    if (hostname >= 0 && node(&r, hostname)->type != JSON_NULL &&
        (text(&r, hostname, "hostname", &out->hostname) < 0 ||
         check_hostname(&r, out->hostname) < 0))
        return -1;
    net = json_member(doc, 0, "network");
    out->has_network = net >= 0 && node(&r, net)->type != JSON_NULL;
    if (out->has_network && read_network(&r, net, &out->network) < 0)
        return -1;
    if (read_terminal(&r, json_member(doc, 0, "terminal"), out) < 0)
        return -1;
    return read_isolation(&r, json_member(doc, 0, "isolation"));
}

void image_config_free(struct image_config *config)
{
    free(config->entrypoint.items);
    free(config->cmd.items);
    free(config->env.items);
    memset(config, 0, sizeof(*config));
}

void launch_request_free(struct launch_request *request)
{
    free(request->command.items);
    free(request->env_keys.items);
    free(request->env_values.items);
    free(request->network.nameservers.items);
    memset(request, 0, sizeof(*request));
}
