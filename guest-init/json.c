/* See json.h: recursive descent with explicit limits on everything. */
#include "json.h"

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct parser {
    const unsigned char *p, *end, *start;
    struct json_doc *doc;
    char *out;            /* next free byte of doc->strings */
    char *error;
    size_t error_size;
};

static int fail(struct parser *ps, const char *fmt, ...)
{
    va_list ap;
    int n;
    va_start(ap, fmt);
    n = vsnprintf(ps->error, ps->error_size, fmt, ap);
    va_end(ap);
    if (n >= 0 && (size_t)n < ps->error_size)
        snprintf(ps->error + n, ps->error_size - n, " at byte %zu",
                 (size_t)(ps->p - ps->start));
    return -1;
}

static void skip_space(struct parser *ps)
{
    while (ps->p < ps->end && (*ps->p == ' ' || *ps->p == '\t' || *ps->p == '\n' || *ps->p == '\r'))
        ps->p++;
}

static int new_node(struct parser *ps, enum json_type type)
{
    struct json_node *node;
    if (ps->doc->count >= JSON_MAX_NODES)
        return fail(ps, "more than %d JSON values", JSON_MAX_NODES);
    node = &ps->doc->nodes[ps->doc->count];
    memset(node, 0, sizeof(*node));
    node->type = type;
    node->first = node->next = -1;
    return ps->doc->count++;
}

static void put_utf8(struct parser *ps, uint32_t cp)
{
    if (cp < 0x80) {
        *ps->out++ = (char)cp;
    } else if (cp < 0x800) {
        *ps->out++ = (char)(0xC0 | (cp >> 6));
        *ps->out++ = (char)(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
        *ps->out++ = (char)(0xE0 | (cp >> 12));
        *ps->out++ = (char)(0x80 | ((cp >> 6) & 0x3F));
        *ps->out++ = (char)(0x80 | (cp & 0x3F));
    } else {
        *ps->out++ = (char)(0xF0 | (cp >> 18));
        *ps->out++ = (char)(0x80 | ((cp >> 12) & 0x3F));
        *ps->out++ = (char)(0x80 | ((cp >> 6) & 0x3F));
        *ps->out++ = (char)(0x80 | (cp & 0x3F));
    }
}

static int hex4(struct parser *ps, uint32_t *value)
{
    *value = 0;
    if (ps->end - ps->p < 4)
        return fail(ps, "truncated \\u escape");
    for (int i = 0; i < 4; i++) {
        unsigned char c = *ps->p++;
        int digit = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10
                  : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (digit < 0)
            return fail(ps, "bad hex digit in \\u escape");
        *value = *value << 4 | (uint32_t)digit;
    }
    return 0;
}

static int unicode_escape(struct parser *ps)
{
    uint32_t cp, low;
    if (hex4(ps, &cp) < 0)
        return -1;
    if (cp >= 0xDC00 && cp <= 0xDFFF)
        return fail(ps, "lone low surrogate in \\u escape");
    if (cp >= 0xD800 && cp <= 0xDBFF) {
        if (ps->end - ps->p < 2 || ps->p[0] != '\\' || ps->p[1] != 'u')
            return fail(ps, "lone high surrogate in \\u escape");
        ps->p += 2;
        if (hex4(ps, &low) < 0)
            return -1;
        if (low < 0xDC00 || low > 0xDFFF)
            return fail(ps, "bad surrogate pair in \\u escape");
        cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
    }
    put_utf8(ps, cp);
    return 0;
}

static int simple_escape(struct parser *ps)
{
    static const char from[] = "\"\\/bfnrt", to[] = "\"\\/\b\f\n\r\t";
    const char *hit;
    if (ps->p >= ps->end)
        return fail(ps, "truncated escape");
    if (*ps->p == 'u') {
        ps->p++;
        return unicode_escape(ps);
    }
    hit = strchr(from, *ps->p);
    if (*ps->p == 0 || hit == NULL)
        return fail(ps, "bad escape \\%c", *ps->p);
    *ps->out++ = to[hit - from];
    ps->p++;
    return 0;
}

/* One raw UTF-8 sequence copied as it is, after checking it is well-formed
   (no overlongs, no surrogates, nothing past U+10FFFF). */
static int raw_utf8(struct parser *ps)
{
    unsigned char c = *ps->p;
    int extra = c >= 0xF0 && c <= 0xF4 ? 3 : c >= 0xE0 ? 2 : c >= 0xC2 && c < 0xE0 ? 1 : -1;
    uint32_t cp;
    if (c >= 0xF5 || extra < 0)
        return fail(ps, "invalid UTF-8");
    if (ps->end - ps->p < extra + 1)
        return fail(ps, "truncated UTF-8");
    cp = c & (0x3F >> extra);
    for (int i = 1; i <= extra; i++) {
        if ((ps->p[i] & 0xC0) != 0x80)
            return fail(ps, "invalid UTF-8");
        cp = cp << 6 | (ps->p[i] & 0x3F);
    }
    if ((extra == 2 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) ||
        (extra == 3 && (cp < 0x10000 || cp > 0x10FFFF)))
        return fail(ps, "invalid UTF-8");
    memcpy(ps->out, ps->p, (size_t)extra + 1);
    ps->out += extra + 1;
    ps->p += extra + 1;
    return 0;
}

/* A string at ps->p (on its opening quote), decoded into doc->strings. */
static int parse_string(struct parser *ps, const char **str, size_t *len)
{
    char *begin = ps->out;
    ps->p++;
    for (;;) {
        unsigned char c;
        if (ps->p >= ps->end)
            return fail(ps, "unterminated string");
        c = *ps->p;
        if (c == '"')
            break;
        if (c < 0x20)
            return fail(ps, "control character in string");
        if (c == '\\') {
            ps->p++;
            if (simple_escape(ps) < 0)
                return -1;
        } else if (c >= 0x80) {
            if (raw_utf8(ps) < 0)
                return -1;
        } else {
            *ps->out++ = (char)c;
            ps->p++;
        }
    }
    ps->p++;
    *ps->out++ = '\0';
    *str = begin;
    *len = (size_t)(ps->out - begin - 1);
    return 0;
}

static int is_digit(const struct parser *ps)
{
    return ps->p < ps->end && *ps->p >= '0' && *ps->p <= '9';
}

static int parse_number(struct parser *ps)
{
    if (ps->p < ps->end && *ps->p == '-')
        ps->p++;
    if (!is_digit(ps))
        return fail(ps, "bad number");
    if (*ps->p == '0')
        ps->p++;
    else
        while (is_digit(ps))
            ps->p++;
    if (ps->p < ps->end && *ps->p == '.') {
        ps->p++;
        if (!is_digit(ps))
            return fail(ps, "bad number");
        while (is_digit(ps))
            ps->p++;
    }
    if (ps->p < ps->end && (*ps->p == 'e' || *ps->p == 'E')) {
        ps->p++;
        if (ps->p < ps->end && (*ps->p == '+' || *ps->p == '-'))
            ps->p++;
        if (!is_digit(ps))
            return fail(ps, "bad number");
        while (is_digit(ps))
            ps->p++;
    }
    return new_node(ps, JSON_NUMBER);
}

static int parse_literal(struct parser *ps, const char *word, enum json_type type)
{
    size_t n = strlen(word);
    if ((size_t)(ps->end - ps->p) < n || memcmp(ps->p, word, n) != 0)
        return fail(ps, "unexpected character");
    ps->p += n;
    return new_node(ps, type);
}

static int parse_value(struct parser *ps, int depth);

/* Append `child` to container `parent`, keeping a tail pointer in `*last`. */
static void link_child(struct parser *ps, int parent, int child, int *last)
{
    struct json_node *nodes = ps->doc->nodes;
    if (*last < 0)
        nodes[parent].first = child;
    else
        nodes[*last].next = child;
    *last = child;
    nodes[parent].count++;
}

static int parse_member(struct parser *ps, int depth, int object, int *last)
{
    const char *key;
    size_t key_len;
    int child;
    skip_space(ps);
    if (ps->p >= ps->end || *ps->p != '"')
        return fail(ps, "expected a string as object key");
    if (parse_string(ps, &key, &key_len) < 0)
        return -1;
    skip_space(ps);
    if (ps->p >= ps->end || *ps->p != ':')
        return fail(ps, "expected ':' after object key");
    ps->p++;
    child = parse_value(ps, depth + 1);
    if (child < 0)
        return -1;
    ps->doc->nodes[child].key = key;
    ps->doc->nodes[child].key_len = key_len;
    link_child(ps, object, child, last);
    return 0;
}

static int parse_container(struct parser *ps, int depth, enum json_type type)
{
    char close = type == JSON_OBJECT ? '}' : ']';
    int self = new_node(ps, type), last = -1;
    if (self < 0)
        return -1;
    ps->p++;
    skip_space(ps);
    if (ps->p < ps->end && *ps->p == close) {
        ps->p++;
        return self;
    }
    for (;;) {
        if (type == JSON_OBJECT) {
            if (parse_member(ps, depth, self, &last) < 0)
                return -1;
        } else {
            int child = parse_value(ps, depth + 1);
            if (child < 0)
                return -1;
            link_child(ps, self, child, &last);
        }
        skip_space(ps);
        if (ps->p >= ps->end)
            return fail(ps, "unterminated %s", type == JSON_OBJECT ? "object" : "array");
        if (*ps->p == close) {
            ps->p++;
            return self;
        }
        if (*ps->p != ',')
            return fail(ps, "expected ',' or '%c'", close);
        ps->p++;
    }
}

static int parse_value(struct parser *ps, int depth)
{
    int self;
    if (depth > JSON_MAX_DEPTH)
        return fail(ps, "nested deeper than %d levels", JSON_MAX_DEPTH);
    skip_space(ps);
    if (ps->p >= ps->end)
        return fail(ps, "unexpected end of input");
    switch (*ps->p) {
    case '{':
        return parse_container(ps, depth, JSON_OBJECT);
    case '[':
        return parse_container(ps, depth, JSON_ARRAY);
    case '"':
        self = new_node(ps, JSON_STRING);
        if (self < 0)
            return -1;
        return parse_string(ps, &ps->doc->nodes[self].str, &ps->doc->nodes[self].len) < 0
               ? -1 : self;
    case 't':
        return parse_literal(ps, "true", JSON_TRUE);
    case 'f':
        return parse_literal(ps, "false", JSON_FALSE);
    case 'n':
        return parse_literal(ps, "null", JSON_NULL);
    default:
        return parse_number(ps);
    }
}

int json_parse(const char *text, size_t len, struct json_doc *doc, char *error, size_t error_size)
{
    struct parser ps = { (const unsigned char *)text, (const unsigned char *)text + len,
                         (const unsigned char *)text, doc, NULL, error, error_size };
    memset(doc, 0, sizeof(*doc));
    if (len > JSON_MAX_INPUT) {
        snprintf(error, error_size, "%zu bytes, more than the %u allowed", len, JSON_MAX_INPUT);
        return -1;
    }
    /* Decoded strings never outgrow their source; one NUL per string at most
       doubles that. */
    doc->nodes = calloc(JSON_MAX_NODES, sizeof(*doc->nodes));
    doc->strings = malloc(2 * len + 1);
    if (doc->nodes == NULL || doc->strings == NULL) {
        json_free(doc);
        snprintf(error, error_size, "out of memory");
        return -1;
    }
    ps.out = doc->strings;
    if (parse_value(&ps, 1) < 0) {
        json_free(doc);
        return -1;
    }
    skip_space(&ps);
    if (ps.p != ps.end) {
        fail(&ps, "trailing data after the JSON value");
        json_free(doc);
        return -1;
    }
    return 0;
}

void json_free(struct json_doc *doc)
{
    free(doc->nodes);
    free(doc->strings);
    memset(doc, 0, sizeof(*doc));
}

int json_member(const struct json_doc *doc, int object, const char *name)
{
    size_t n = strlen(name);
    int found = -1;
    if (object < 0 || doc->nodes[object].type != JSON_OBJECT)
        return -1;
    for (int i = doc->nodes[object].first; i >= 0; i = doc->nodes[i].next)
        if (doc->nodes[i].key_len == n && memcmp(doc->nodes[i].key, name, n) == 0)
            found = i;
    return found;
}

const char *json_type_name(enum json_type type)
{
    static const char *const names[] = { "null", "false", "true", "a number", "a string",
                                         "a list", "an object" };
    return names[type];
}
