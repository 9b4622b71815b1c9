/* See frame.h. */
#include "frame.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

/* Room for the longest log message a frame may carry, escaped (6 bytes a
   byte at worst) and a little framing. */
#define MESSAGE_MAX 8192

struct buffer {
    char data[4 + 6 * MESSAGE_MAX + 128];
    size_t len;
};

static void put(struct buffer *b, const char *s, size_t n)
{
    if (n > sizeof(b->data) - b->len)
        n = sizeof(b->data) - b->len;
    memcpy(b->data + b->len, s, n);
    b->len += n;
}

static void put_str(struct buffer *b, const char *s)
{
    put(b, s, strlen(s));
}

static void put_u16_escape(struct buffer *b, unsigned value)
{
    char tmp[8];
    snprintf(tmp, sizeof(tmp), "\\u%04x", value & 0xFFFF);
    put(b, tmp, 6);
}

/* One UTF-8 sequence at s (n bytes left) as Python's ensure_ascii writes it;
   a malformed byte becomes U+FFFD, as errors="replace" would make it. */
static size_t put_non_ascii(struct buffer *b, const unsigned char *s, size_t n)
{
    unsigned c = s[0];
    size_t extra = c >= 0xF0 && c <= 0xF4 ? 3 : c >= 0xE0 && c < 0xF0 ? 2
                 : c >= 0xC2 && c < 0xE0 ? 1 : 0;
    uint32_t cp = c & (0x3F >> extra);
    if (extra == 0 || extra >= n) {
        put_u16_escape(b, 0xFFFD);
        return 1;
    }
    for (size_t i = 1; i <= extra; i++) {
        if ((s[i] & 0xC0) != 0x80) {
            put_u16_escape(b, 0xFFFD);
            return 1;
        }
        cp = cp << 6 | (s[i] & 0x3F);
    }
    if (cp >= 0x10000) {
        cp -= 0x10000;
        put_u16_escape(b, 0xD800 + (cp >> 10));
        put_u16_escape(b, 0xDC00 + (cp & 0x3FF));
    } else {
        put_u16_escape(b, cp);
    }
    return extra + 1;
}

static void put_json_string(struct buffer *b, const char *text)
{
    const unsigned char *s = (const unsigned char *)text;
    size_t n = strnlen(text, MESSAGE_MAX);
    put(b, "\"", 1);
    for (size_t i = 0; i < n;) {
        unsigned c = s[i];
        const char *esc = c == '"' ? "\\\"" : c == '\\' ? "\\\\" : c == '\n' ? "\\n"
                        : c == '\r' ? "\\r" : c == '\t' ? "\\t" : c == '\b' ? "\\b"
                        : c == '\f' ? "\\f" : NULL;
        if (esc != NULL) {
            put_str(b, esc);
            i++;
        } else if (c < 0x20) {
            put_u16_escape(b, c);
            i++;
        } else if (c >= 0x80) {
            i += put_non_ascii(b, s + i, n - i);
        } else {
            put(b, (const char *)s + i, 1);
            i++;
        }
    }
    put(b, "\"", 1);
}

static int send_frame(int fd, struct buffer *b)
{
    size_t body = b->len - 4;
    const char *p = b->data;
    size_t left = b->len;
    b->data[0] = (char)(body >> 24);
    b->data[1] = (char)(body >> 16);
    b->data[2] = (char)(body >> 8);
    b->data[3] = (char)body;
    while (left > 0) {
        ssize_t n = write(fd, p, left);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        p += n;
        left -= (size_t)n;
    }
    return 0;
}

static void start(struct buffer *b, const char *type)
{
    b->len = 4;
    put_str(b, "{\"type\":");
    put_json_string(b, type);
}

static int send_number(int fd, const char *type, const char *name, long value)
{
    struct buffer b;
    char tmp[48];
    if (fd < 0)
        return 0;
    start(&b, type);
    snprintf(tmp, sizeof(tmp), ",\"%s\":%ld}", name, value);
    put_str(&b, tmp);
    return send_frame(fd, &b);
}

int frame_started(int fd, long pid)
{
    return send_number(fd, "started", "pid", pid);
}

int frame_exit(int fd, int code)
{
    return send_number(fd, "exit", "code", code);
}

int frame_log(int fd, const char *level, const char *message)
{
    struct buffer b;
    if (fd < 0)
        return 0;
    start(&b, "log");
    put_str(&b, ",\"level\":");
    put_json_string(&b, level);
    put_str(&b, ",\"message\":");
    put_json_string(&b, message);
    put(&b, "}", 1);
    return send_frame(fd, &b);
}
