/* See relay.h. */
#include "relay.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/wait.h>
#include <unistd.h>

#include "json.h"

#define EXIT_LOST 126
#define EOF_TYPE "stdin-eof"
#define BYTES_KEY "\"bytes\":"

static void close_fd(int *fd)
{
    if (*fd >= 0)
        close(*fd);
    *fd = -1;
}

static int write_all(int fd, const char *data, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, data, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN) {
            struct pollfd p = { fd, POLLOUT, 0 };
            poll(&p, 1, -1);
            continue;
        }
        if (n <= 0)
            return -1;
        data += n;
        len -= (size_t)n;
    }
    return 0;
}

static int nonblocking(int fd)
{
    int flags = fcntl(fd, F_GETFL);
    return flags < 0 ? -1 : fcntl(fd, F_SETFL, flags | O_NONBLOCK);
}

int relay_open(struct relay *r, int console_in, int console_out, int error_out, int channel)
{
    int in[2], out[2], err[2];
    memset(r, 0, sizeof(*r));
    r->console_in = console_in;
    r->console_out = console_out;
    r->error_out = error_out;
    r->channel = channel;
    r->stdin_limit = -1;
    if (pipe2(in, O_CLOEXEC) < 0)
        return -1;
    if (pipe2(out, O_CLOEXEC) < 0) {
        close(in[0]);
        close(in[1]);
        return -1;
    }
    if (pipe2(err, O_CLOEXEC) < 0) {
        close(in[0]);
        close(in[1]);
        close(out[0]);
        close(out[1]);
        return -1;
    }
    r->task_stdio[0] = in[0];
    r->task_stdio[1] = out[1];
    r->task_stdio[2] = err[1];
    r->stdin_w = in[1];
    r->stdout_r = out[0];
    r->stderr_r = err[0];
    if (nonblocking(r->stdin_w) < 0 || nonblocking(r->stdout_r) < 0 ||
        nonblocking(r->stderr_r) < 0)
        return -1;
    return 0;
}

void relay_parent(struct relay *r)
{
    for (int i = 0; i < 3; i++)
        close_fd(&r->task_stdio[i]);
}

int relay_block(void)
{
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGCHLD);
    return sigprocmask(SIG_BLOCK, &set, NULL);
}

void relay_unblock(void)
{
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGCHLD);
    sigprocmask(SIG_UNBLOCK, &set, NULL);
}

/* The number after "bytes": in a frame the parser already found well-formed
   (its node table keeps no number text). */
static long long frame_bytes(const char *body)
{
    const char *at = strstr(body, BYTES_KEY);
    char *end;
    long long value;
    if (at == NULL)
        return -1;
    errno = 0;
    value = strtoll(at + strlen(BYTES_KEY), &end, 10);
    return errno != 0 || end == at + strlen(BYTES_KEY) || value < 0 ? -1 : value;
}

static void host_message(struct relay *r, char *body, size_t len)
{
    struct json_doc doc = { 0 };
    char why[128];
    int type;
    body[len] = '\0';
    if (json_parse(body, len, &doc, why, sizeof(why)) < 0)
        return;   /* not a frame we know: ignored, as the host ignores unknown ones */
    type = json_member(&doc, 0, "type");
    if (type >= 0 && doc.nodes[type].type == JSON_STRING && strcmp(doc.nodes[type].str, EOF_TYPE) == 0)
        r->stdin_limit = frame_bytes(body);
    json_free(&doc);
}

/* Frames from the host; one too large for the buffer ends the listening. */
static void read_channel(struct relay *r)
{
    ssize_t n = read(r->channel, r->frame + r->frame_len, sizeof(r->frame) - 1 - r->frame_len);
    if (n <= 0) {
        if (n == 0 || (errno != EAGAIN && errno != EINTR))
            r->channel = -1;
        return;
    }
    r->frame_len += (size_t)n;
    while (r->frame_len >= 4) {
        const unsigned char *h = (const unsigned char *)r->frame;
        size_t body = (size_t)h[0] << 24 | (size_t)h[1] << 16 | (size_t)h[2] << 8 | h[3];
        if (body > sizeof(r->frame) - 5) {
            r->channel = -1;
            return;
        }
        if (r->frame_len < 4 + body)
            return;
        {
            char message[sizeof(r->frame)];
            memcpy(message, r->frame + 4, body);
            host_message(r, message, body);
        }
        memmove(r->frame, r->frame + 4 + body, r->frame_len - 4 - body);
        r->frame_len -= 4 + body;
    }
}

static void read_console(struct relay *r)
{
    size_t room = sizeof(r->pending);
    ssize_t n;
    if (r->stdin_limit >= 0 && (long long)room > r->stdin_limit - r->stdin_seen)
        room = (size_t)(r->stdin_limit - r->stdin_seen);
    n = read(r->console_in, r->pending, room);
    if (n > 0) {
        r->pending_len = (size_t)n;
        r->pending_off = 0;
        r->stdin_seen += n;
    } else if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
        close_fd(&r->stdin_w);   /* the console hung up or broke: no more input */
    }
}

static void feed_stdin(struct relay *r)
{
    ssize_t n = write(r->stdin_w, r->pending + r->pending_off, r->pending_len - r->pending_off);
    if (n > 0) {
        r->pending_off += (size_t)n;
        if (r->pending_off == r->pending_len)
            r->pending_len = r->pending_off = 0;
    } else if (n < 0 && errno != EAGAIN && errno != EINTR) {
        close_fd(&r->stdin_w);   /* the task closed its stdin (EPIPE): drop the rest */
        r->pending_len = r->pending_off = 0;
    }
}

/* One read from an output pipe to where it goes; EOF closes the pipe. 1 when
   bytes were copied. */
static int copy_out(int *from, int to)
{
    char buffer[RELAY_BUFFER];
    ssize_t n = read(*from, buffer, sizeof(buffer));
    if (n > 0)
        return write_all(to, buffer, (size_t)n) == 0;
    if (n == 0 || (errno != EAGAIN && errno != EINTR))
        close_fd(from);
    return 0;
}

static int reap(pid_t task, int *code)
{
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0)
        if (pid == task)
            *code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    return pid < 0 && errno == ECHILD && *code < 0 ? -1 : 0;
}

static void check_stdin_end(struct relay *r)
{
    if (r->stdin_w >= 0 && r->pending_len == 0 && r->stdin_limit >= 0 &&
        r->stdin_seen >= r->stdin_limit)
        close_fd(&r->stdin_w);
}

int relay_supervise(struct relay *r, pid_t task)
{
    sigset_t set;
    int code = -1, sfd;
    sigemptyset(&set);
    sigaddset(&set, SIGCHLD);
    sfd = signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK);
    if (sfd < 0)
        return EXIT_LOST;
    while (code < 0) {
        struct pollfd p[6] = {
            { sfd, POLLIN, 0 },
            { r->stdin_w >= 0 && r->pending_len == 0 ? r->console_in : -1, POLLIN, 0 },
            { r->pending_len > 0 ? r->stdin_w : -1, POLLOUT, 0 },
            { r->stdout_r, POLLIN, 0 },
            { r->stderr_r, POLLIN, 0 },
            { r->stdin_w >= 0 ? r->channel : -1, POLLIN, 0 },
        };
        if (poll(p, 6, -1) < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (p[0].revents) {
            struct signalfd_siginfo info;
            while (read(sfd, &info, sizeof(info)) > 0)
                ;
            if (reap(task, &code) < 0)
                break;
        }
        if (p[5].revents)
            read_channel(r);
        if (p[1].revents)
            read_console(r);
        if (p[2].revents)
            feed_stdin(r);
        if (p[3].revents)
            copy_out(&r->stdout_r, r->console_out);
        if (p[4].revents)
            copy_out(&r->stderr_r, r->error_out);
        check_stdin_end(r);
    }
    close(sfd);
    close_fd(&r->stdin_w);
    return code < 0 ? EXIT_LOST : code;
}

void relay_drain(struct relay *r)
{
    while (r->stdout_r >= 0 && copy_out(&r->stdout_r, r->console_out))
        ;
    while (r->stderr_r >= 0 && copy_out(&r->stderr_r, r->error_out))
        ;
    close_fd(&r->stdout_r);
    close_fd(&r->stderr_r);
}
