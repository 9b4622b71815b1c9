#define _GNU_SOURCE
#include "syscalls.h"

#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef P_PIDFD
#define P_PIDFD 3
#endif

static int result(long r)
{
        return r < 0 ? -errno : (int)r;
}

int hostel_pidfd_open(int pid, unsigned int flags)
{
        return result(syscall(SYS_pidfd_open, pid, flags));
}

int hostel_pidfd_send_signal(int pidfd, int sig)
{
        return result(syscall(SYS_pidfd_send_signal, pidfd, sig, NULL, 0));
}

int hostel_pidfd_wait(int pidfd, int options, struct hostel_exit *out)
{
        siginfo_t si;

        memset(&si, 0, sizeof si);
        if (waitid((idtype_t)P_PIDFD, (id_t)pidfd, &si, options) < 0)
                return -errno;
        if (si.si_pid == 0)
                return -EAGAIN;
        out->pid = si.si_pid;
        out->code = si.si_code;
        out->status = si.si_status;
        return 0;
}

int hostel_open_tree(int dfd, const char *path, unsigned int flags)
{
        return result(syscall(SYS_open_tree, dfd, path, flags));
}

int hostel_pivot_root(const char *new_root, const char *put_old)
{
        return result(syscall(SYS_pivot_root, new_root, put_old));
}
