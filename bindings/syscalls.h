/* Thin wrappers for system calls glibc 2.36 does not wrap (or wraps
 * awkwardly). Each returns the result, or -errno on failure. */
#ifndef HOSTEL_SYSCALLS_H
#define HOSTEL_SYSCALLS_H

#include <stdint.h>

struct hostel_exit {
        int32_t pid;
        int32_t code;   /* CLD_EXITED, CLD_KILLED, CLD_DUMPED, ... */
        int32_t status; /* exit status, or the signal number */
};

int hostel_pidfd_open(int pid, unsigned int flags);
int hostel_pidfd_send_signal(int pidfd, int sig);
/* waitid(P_PIDFD); returns 0 with *out filled, or -errno (-EAGAIN: still running with WNOHANG) */
int hostel_pidfd_wait(int pidfd, int options, struct hostel_exit *out);
/* A detached copy of the mount at path (OPEN_TREE_CLONE), attachable in another
 * mount namespace with move_mount(2). Returns the fd or -errno. */
int hostel_open_tree(int dfd, const char *path, unsigned int flags);
int hostel_pivot_root(const char *new_root, const char *put_old);

#endif
