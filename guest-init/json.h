/* A strict, bounded JSON reader for the guest init's two configuration files.

   The input is untrusted (a host could be compromised, a disk corrupted), so
   the parser refuses anything outside RFC 8259, caps size, depth and node
   count, validates UTF-8, and never recurses past JSON_MAX_DEPTH. Values are
   kept in a flat node table; strings are decoded into a separate buffer and
   NUL-terminated, with their true length kept so embedded NULs are visible. */
#ifndef HOSTEL_GUEST_JSON_H
#define HOSTEL_GUEST_JSON_H

#include <stddef.h>

#define JSON_MAX_INPUT (1u << 20)
#define JSON_MAX_DEPTH 32
#define JSON_MAX_NODES 65536

enum json_type { JSON_NULL, JSON_FALSE, JSON_TRUE, JSON_NUMBER, JSON_STRING, JSON_ARRAY,
                 JSON_OBJECT };

struct json_node {
    enum json_type type;
    const char *str;      /* JSON_STRING: decoded, NUL-terminated */
    size_t len;
    const char *key;      /* member of an object: its decoded name */
    size_t key_len;
    int first;            /* JSON_ARRAY/OBJECT: first child, or -1 */
    int next;             /* next sibling, or -1 */
    int count;            /* JSON_ARRAY/OBJECT: number of children */
};

struct json_doc {
    struct json_node *nodes;
    int count;
    char *strings;
};

/* Parse `len` bytes; 0 on success, else -1 with a message in `error`. */
int json_parse(const char *text, size_t len, struct json_doc *doc, char *error, size_t error_size);
void json_free(struct json_doc *doc);

/* The last member named `name` of object node `object` (Python's json keeps the
   last duplicate too), or -1. */
int json_member(const struct json_doc *doc, int object, const char *name);

const char *json_type_name(enum json_type type);

#endif
