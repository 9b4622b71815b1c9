/* The task's stdio as pipes (no terminal), relayed by the init: what the host
   sends on the console goes to the task's stdin, its stdout to the console,
   its stderr to the stderr stream. A console port has no end of input, so
   the host says where stdin ends with a frame on the channel,
   {"type":"stdin-eof","bytes":N}: once N bytes came through, the task's
   stdin is closed and it reads EOF, as from a container's pipe. */
#ifndef HOSTEL_GUEST_RELAY_H
#define HOSTEL_GUEST_RELAY_H

#include <sys/types.h>

#define RELAY_BUFFER 4096

struct relay {
    int console_in, console_out;           /* the init's ends (not owned) */
    int error_out, channel;
    int stdin_w, stdout_r, stderr_r;       /* the task's pipes, -1 once closed */
    int task_stdio[3];                     /* the task's ends, closed after the fork */
    long long stdin_seen, stdin_limit;     /* bytes relayed; -1: no EOF frame yet */
    char pending[RELAY_BUFFER];            /* console bytes the stdin pipe has yet to take */
    size_t pending_len, pending_off;
    char frame[256];                       /* a host frame being received */
    size_t frame_len;
};

/* The three pipes; 0, or -1 with errno. */
int relay_open(struct relay *r, int console_in, int console_out, int error_out, int channel);
/* In the parent after the fork: the task's ends are closed. */
void relay_parent(struct relay *r);
/* Relay until `task` exits (every other child is reaped on the way); its
   status as a shell reports it. SIGCHLD must be blocked (relay_block). */
int relay_supervise(struct relay *r, pid_t task);
/* After the rest was killed: what is left in the output pipes. */
void relay_drain(struct relay *r);
/* SIGCHLD blocked for relay_supervise's signalfd; the task unblocks it. */
int relay_block(void);
void relay_unblock(void);

#endif
