/* The spawn trampoline (see spawn.h). Everything below the clone runs in a
 * copy of a multi-threaded process, or on its very memory while the calling
 * thread sleeps (share_memory): only system calls, no malloc, no stdio, no
 * locks, no writes outside the child's own stack, no fork() but in the stub
 * init, which never runs on shared memory. */
#define _GNU_SOURCE
#include "spawn.h"
#include "beneath.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/sched.h>
#include <linux/seccomp.h>
#include <sched.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/personality.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef MOVE_MOUNT_F_EMPTY_PATH
#define MOVE_MOUNT_F_EMPTY_PATH 0x00000004
#endif
#ifndef MOVE_MOUNT_T_EMPTY_PATH
#define MOVE_MOUNT_T_EMPTY_PATH 0x00000040
#endif
#ifndef CLONE_INTO_CGROUP
#define CLONE_INTO_CGROUP 0x200000000ULL
#endif
#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif

static int sys_result(long r)
{
        return r < 0 ? -errno : 0;
}

static int write_all(int fd, const void *buf, size_t len)
{
        const char *p = buf;

        while (len > 0) {
                ssize_t n = write(fd, p, len);
                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        return -errno;
                }
                p += n;
                len -= (size_t)n;
        }
        return 0;
}

static int op_mkdir(const struct hostel_op *op)
{
        if (mkdir(op->path, (mode_t)op->num) < 0 && errno != EEXIST)
                return -errno;
        return 0;
}

static int op_write_file(const struct hostel_op *op)
{
        int fd = open(op->path, O_WRONLY | O_CLOEXEC | O_NOFOLLOW | (int)op->num2,
                      (mode_t)op->num);
        if (fd < 0)
                return -errno;
        int r = write_all(fd, op->data, op->len);
        if (close(fd) < 0 && r == 0)
                r = -errno;
        return r;
}

/* pivot_root(".", ".") stacks the old root on top of the new one, so a
 * single lazy unmount removes it without needing a put_old directory. */
static int op_pivot_root(const struct hostel_op *op)
{
        if (chdir(op->path) < 0)
                return -errno;
        if (syscall(SYS_pivot_root, ".", ".") < 0)
                return -errno;
        if (umount2(".", MNT_DETACH) < 0)
                return -errno;
        return sys_result(chdir("/"));
}

static int op_capbset_drop(const struct hostel_op *op)
{
        for (int cap = 0; cap < 64; cap++) {
                if (!(op->num & (1ULL << cap)))
                        continue;
                if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 && errno != EINVAL)
                        return -errno;
        }
        return 0;
}

static int op_capset(const struct hostel_op *op)
{
        struct __user_cap_header_struct header = {
                .version = _LINUX_CAPABILITY_VERSION_3,
                .pid = 0,
        };
        struct __user_cap_data_struct data[2];

        for (int i = 0; i < 2; i++) {
                data[i].effective = (uint32_t)(op->num >> (32 * i));
                data[i].permitted = (uint32_t)(op->num2 >> (32 * i));
                data[i].inheritable = (uint32_t)(op->num3 >> (32 * i));
        }
        return sys_result(syscall(SYS_capset, &header, data));
}

static int op_seccomp(const struct hostel_op *op)
{
        struct sock_fprog prog = {
                .len = (unsigned short)op->len,
                .filter = (struct sock_filter *)op->data,
        };
        return sys_result(prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog, 0, 0));
}

static int op_wait_fd(const struct hostel_op *op)
{
        char byte;

        for (;;) {
                ssize_t n = read((int)op->num, &byte, 1);
                if (n == 1)
                        return 0;
                if (n == 0)
                        return -ECANCELED; /* the parent gave up on us */
                if (errno != EINTR)
                        return -errno;
        }
}

static int op_notify_fd(const struct hostel_op *op)
{
        return write_all((int)op->num, "x", 1);
}

/* Show up as what we are, not as a copy of the daemon: op->arg is the name
 * (comm), and the command line, [num, num2) in our copy of the daemon's
 * memory, is overwritten with it in place and padded with NULs, as
 * systemd-nspawn's stub init does (/proc/1/cmdline reads that memory). */
static void name_stub_init(const struct hostel_op *op)
{
        char *cmdline = (char *)(uintptr_t)op->num;
        size_t room = op->num2 > op->num ? (size_t)(op->num2 - op->num) : 0;

        prctl(PR_SET_NAME, op->arg, 0, 0, 0);
        if (room == 0)
                return;
        size_t n = strlen(op->arg);
        if (n >= room)
                n = room - 1;
        memset(cmdline, 0, room);
        memcpy(cmdline, op->arg, n);
}

/* Stay behind as a minimal PID 1: reap every child, forward signals to the
 * payload, and exit with the payload's status once it is gone (255 if a
 * signal ended it, as nspawn's stub). The payload (the child) returns 0
 * here and carries on with the rest of the plan. */
static int op_stub_init(const struct hostel_op *op)
{
        sigset_t all;

        sigfillset(&all);
        sigprocmask(SIG_BLOCK, &all, NULL);
        long pid = syscall(SYS_clone, SIGCHLD, NULL, NULL, NULL, 0);
        if (pid < 0)
                return -errno;
        if (pid == 0) {
                sigprocmask(SIG_UNBLOCK, &all, NULL);
                return 0;
        }
        name_stub_init(op);
        /* Hold nothing of the plan's: the parent reads "started" from the report
         * pipe closing, which the payload's execve does only if we let go too. */
        syscall(SYS_close_range, 3, ~0U, 0);
        for (;;) {
                siginfo_t si;
                int sig = sigwaitinfo(&all, &si);
                if (sig < 0)
                        continue;
                if (sig != SIGCHLD) {
                        /* Like PID 1 itself, ignore what the kernel raises on its own:
                         * the console's hangup (SIGHUP, SIGCONT) when hosteld, which
                         * holds its pty master, goes away. Processes' signals go on. */
                        if (si.si_code != SI_KERNEL)
                                kill((pid_t)pid, sig);
                        continue;
                }
                for (;;) {
                        int status;
                        pid_t done = waitpid(-1, &status, WNOHANG);
                        if (done <= 0)
                                break;
                        if (done == pid)
                                _exit(WIFSIGNALED(status) ? 255 : WEXITSTATUS(status));
                }
        }
}

/* A resource limit, or as close to it as we may (systemd's setrlimit_closest):
 * a hard limit above ours needs CAP_SYS_RESOURCE in the host's user namespace,
 * which a --private-users child lacks; it then keeps our hard limit. */
static int op_setrlimit(const struct hostel_op *op)
{
        struct rlimit want = { .rlim_cur = op->num2, .rlim_max = op->num3 };
        struct rlimit now;

        if (setrlimit((int)op->num, &want) == 0)
                return 0;
        if (errno != EPERM)
                return -errno;
        if (getrlimit((int)op->num, &now) < 0)
                return -errno;
        if (want.rlim_max > now.rlim_max)
                want.rlim_max = now.rlim_max;
        if (want.rlim_cur > want.rlim_max)
                want.rlim_cur = want.rlim_max;
        return sys_result(setrlimit((int)op->num, &want));
}

/* Steps inside a container's tree (op->root set, see spawn.h) ------------
 *
 * The tree is resolved afresh for every step (whatever is mounted on the
 * root by then is the tree), the step's path inside it with
 * RESOLVE_IN_ROOT, and the step then acts on the descriptor: through the
 * *at() calls on the parent directory for the last component, or through
 * /proc/self/fd/N for mount(2), which resolves that to exactly the object
 * the descriptor holds. The host's /proc is still ours at this point: these
 * steps come before the child enters the tree. */

/* "/proc/self/fd/N" into out (at least 32 bytes), without stdio. */
static const char *fd_path(char *out, int fd)
{
        static const char prefix[] = "/proc/self/fd/";
        char digits[12];
        int n = 0;

        do {
                digits[n++] = (char)('0' + fd % 10);
                fd /= 10;
        } while (fd > 0);
        memcpy(out, prefix, sizeof prefix - 1);
        char *p = out + sizeof prefix - 1;
        while (n > 0)
                *p++ = digits[--n];
        *p = '\0';
        return out;
}

static int resolve_beneath(const struct hostel_op *op, const char *path, int flags, int mode)
{
        return hostel_open_beneath(op->root, path, flags, mode);
}

/* The directory holding op->path's last component, which goes to *base
 * (in buf, a copy of the path); the tree's root itself has no parent. */
static int open_parent_beneath(const struct hostel_op *op, char *buf, size_t size,
                               const char **base)
{
        size_t n = strlen(op->path);

        if (n >= size)
                return -ENAMETOOLONG;
        memcpy(buf, op->path, n + 1);
        while (n > 0 && buf[n - 1] == '/')
                buf[--n] = '\0';
        char *slash = strrchr(buf, '/');
        const char *parent = ".";
        if (slash != NULL) {
                *slash = '\0';
                parent = buf;
                *base = slash + 1;
        } else {
                *base = buf;
        }
        if (**base == '\0')
                return -EINVAL;
        return resolve_beneath(op, parent, O_PATH | O_DIRECTORY, 0);
}

static int at_mkdir(int dir, const char *base, const struct hostel_op *op)
{
        return mkdirat(dir, base, (mode_t)op->num) < 0 && errno != EEXIST ? -errno : 0;
}

static int at_mknod(int dir, const char *base, const struct hostel_op *op)
{
        return sys_result(mknodat(dir, base, (mode_t)op->num, (dev_t)op->num2));
}

static int at_symlink(int dir, const char *base, const struct hostel_op *op)
{
        return sys_result(symlinkat(op->arg, dir, base));
}

static int at_unlink(int dir, const char *base, const struct hostel_op *op)
{
        (void)op;
        return sys_result(unlinkat(dir, base, 0));
}

static int at_chown(int dir, const char *base, const struct hostel_op *op)
{
        return sys_result(fchownat(dir, base, (uid_t)op->num, (gid_t)op->num2,
                                   AT_SYMLINK_NOFOLLOW));
}

static int on_parent_beneath(const struct hostel_op *op,
                             int (*act)(int dir, const char *base, const struct hostel_op *op))
{
        char buf[PATH_MAX];
        const char *base;
        int dir = open_parent_beneath(op, buf, sizeof buf, &base);

        if (dir < 0)
                return dir;
        int r = act(dir, base, op);
        close(dir);
        return r;
}

/* An existing file is written only if it is a regular one: a FIFO would
 * block the start, a device node would be a way to the host's devices. */
static int reopen_regular_for_writing(int pathfd, int open_flags)
{
        struct stat st;
        char proc[32];

        if (fstat(pathfd, &st) < 0)
                return -errno;
        if (S_ISDIR(st.st_mode))
                return -EISDIR;
        if (S_ISLNK(st.st_mode))
                return -ELOOP;
        if (!S_ISREG(st.st_mode))
                return -EINVAL;
        int fd = open(fd_path(proc, pathfd),
                      O_WRONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK | (open_flags & O_TRUNC));
        return fd < 0 ? -errno : fd;
}

static int open_for_writing_beneath(const struct hostel_op *op)
{
        int pathfd = resolve_beneath(op, op->path, O_PATH | O_NOFOLLOW, 0);

        if (pathfd == -ENOENT && (op->num2 & O_CREAT))
                return resolve_beneath(op, op->path,
                                       O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_NOCTTY,
                                       (int)op->num);
        if (pathfd < 0)
                return pathfd;
        int fd = reopen_regular_for_writing(pathfd, (int)op->num2);
        close(pathfd);
        return fd;
}

static int write_file_beneath(const struct hostel_op *op)
{
        int fd = open_for_writing_beneath(op);

        if (fd < 0)
                return fd;
        int r = write_all(fd, op->data, op->len);
        if (close(fd) < 0 && r == 0)
                r = -errno;
        return r;
}

static int mount_beneath(const struct hostel_op *op)
{
        char target_path[32], source_path[32];
        const char *source = op->arg;
        int source_fd = -1;
        const char *target_name = op->path;
        int target = -1;

        if (op->flags & HOSTEL_OPF_PATH_BENEATH) {
                target = resolve_beneath(op, op->path, O_PATH, 0);
                if (target < 0)
                        return target;
                target_name = fd_path(target_path, target);
        }
        if (op->flags & HOSTEL_OPF_SOURCE_BENEATH) {
                source_fd = resolve_beneath(op, op->arg, O_PATH, 0);
                if (source_fd < 0) {
                        if (target >= 0)
                                close(target);
                        return source_fd;
                }
                source = fd_path(source_path, source_fd);
        }
        int r = sys_result(mount(source, target_name, op->arg2, op->num, op->arg3));
        if (source_fd >= 0)
                close(source_fd);
        if (target >= 0)
                close(target);
        return r;
}

static int on_target_beneath(const struct hostel_op *op)
{
        char proc[32];
        int flags = op->kind == HOSTEL_OP_CHDIR ? O_PATH | O_DIRECTORY : O_PATH;
        int target = resolve_beneath(op, op->path, flags, 0);
        int r;

        if (target < 0)
                return target;
        switch (op->kind) {
        case HOSTEL_OP_UMOUNT:
                r = sys_result(umount2(fd_path(proc, target), (int)op->num));
                break;
        case HOSTEL_OP_MOVE_MOUNT:
                r = sys_result(syscall(SYS_move_mount, (int)op->num, "", target, "",
                                       MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH));
                break;
        default: /* HOSTEL_OP_CHDIR */
                r = sys_result(fchdir(target));
                break;
        }
        close(target);
        return r;
}

static int run_op_beneath(const struct hostel_op *op)
{
        if (op->kind == HOSTEL_OP_MOUNT)
                return mount_beneath(op);
        if (!(op->flags & HOSTEL_OPF_PATH_BENEATH))
                return -EINVAL;
        switch (op->kind) {
        case HOSTEL_OP_UMOUNT:
        case HOSTEL_OP_MOVE_MOUNT:
        case HOSTEL_OP_CHDIR:
                return on_target_beneath(op);
        case HOSTEL_OP_MKDIR:
                return on_parent_beneath(op, at_mkdir);
        case HOSTEL_OP_MKNOD:
                return on_parent_beneath(op, at_mknod);
        case HOSTEL_OP_SYMLINK:
                return on_parent_beneath(op, at_symlink);
        case HOSTEL_OP_UNLINK:
                return on_parent_beneath(op, at_unlink);
        case HOSTEL_OP_CHOWN:
                return on_parent_beneath(op, at_chown);
        case HOSTEL_OP_WRITE_FILE:
                return write_file_beneath(op);
        default:
                return -EINVAL; /* no other step takes a path in the tree */
        }
}

static int run_op(const struct hostel_op *op)
{
        if (op->root != NULL)
                return run_op_beneath(op);
        switch (op->kind) {
        case HOSTEL_OP_MOUNT:
                return sys_result(mount(op->arg, op->path, op->arg2, op->num, op->arg3));
        case HOSTEL_OP_UMOUNT:
                return sys_result(umount2(op->path, (int)op->num));
        case HOSTEL_OP_MKDIR:
                return op_mkdir(op);
        case HOSTEL_OP_MKNOD:
                return sys_result(mknod(op->path, (mode_t)op->num, (dev_t)op->num2));
        case HOSTEL_OP_SYMLINK:
                return sys_result(symlink(op->arg, op->path));
        case HOSTEL_OP_WRITE_FILE:
                return op_write_file(op);
        case HOSTEL_OP_CHOWN:
                return sys_result(lchown(op->path, (uid_t)op->num, (gid_t)op->num2));
        case HOSTEL_OP_PIVOT_ROOT:
                return op_pivot_root(op);
        case HOSTEL_OP_CHROOT:
                return sys_result(chroot(op->path));
        case HOSTEL_OP_CHDIR:
                return sys_result(chdir(op->path));
        case HOSTEL_OP_SETHOSTNAME:
                return sys_result(sethostname(op->arg, strlen(op->arg)));
        case HOSTEL_OP_SETGROUPS:
                return sys_result(syscall(SYS_setgroups, op->len, op->data));
        case HOSTEL_OP_SETRESGID:
                return sys_result(syscall(SYS_setresgid, op->num, op->num, op->num));
        case HOSTEL_OP_SETRESUID:
                return sys_result(syscall(SYS_setresuid, op->num, op->num, op->num));
        case HOSTEL_OP_CAPBSET_DROP:
                return op_capbset_drop(op);
        case HOSTEL_OP_CAPSET:
                return op_capset(op);
        case HOSTEL_OP_KEEPCAPS:
                return sys_result(prctl(PR_SET_KEEPCAPS, op->num, 0, 0, 0));
        case HOSTEL_OP_NO_NEW_PRIVS:
                return sys_result(prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0));
        case HOSTEL_OP_SECCOMP:
                return op_seccomp(op);
        case HOSTEL_OP_PERSONALITY:
                return personality((unsigned long)op->num) < 0 ? -errno : 0;
        case HOSTEL_OP_WAIT_FD:
                return op_wait_fd(op);
        case HOSTEL_OP_NOTIFY_FD:
                return op_notify_fd(op);
        case HOSTEL_OP_DUP2:
                if (op->num == op->num2) /* keep it, but let it survive execve */
                        return sys_result(fcntl((int)op->num, F_SETFD, 0));
                return sys_result(dup2((int)op->num, (int)op->num2));
        case HOSTEL_OP_SETSID:
                return sys_result(setsid());
        case HOSTEL_OP_SETCTTY:
                return sys_result(ioctl((int)op->num, TIOCSCTTY, 0));
        case HOSTEL_OP_SETNS:
                return sys_result(setns((int)op->num, (int)op->num2));
        case HOSTEL_OP_UNSHARE:
                return sys_result(unshare((int)op->num));
        case HOSTEL_OP_UMASK:
                umask((mode_t)op->num);
                return 0;
        case HOSTEL_OP_EXECVE:
                execve(op->path, op->argv, op->envp);
                return -errno;
        case HOSTEL_OP_STUB_INIT:
                return op_stub_init(op);
        case HOSTEL_OP_UNLINK:
                return sys_result(unlink(op->path));
        case HOSTEL_OP_FAIL:
                return -(int)op->num;
        case HOSTEL_OP_FCHDIR:
                return sys_result(fchdir((int)op->num));
        case HOSTEL_OP_WRITE_FD:
                return write_all((int)op->num, op->data, op->len);
        case HOSTEL_OP_SETRLIMIT:
                return op_setrlimit(op);
        case HOSTEL_OP_MOVE_MOUNT:
                return sys_result(syscall(SYS_move_mount, (int)op->num, "", AT_FDCWD, op->path,
                                          MOVE_MOUNT_F_EMPTY_PATH));
        default:
                return -EINVAL;
        }
}

static int is_kept(int fd, const struct hostel_spawn_args *args)
{
        for (int i = 0; i < args->n_keep_fds; i++)
                if (args->keep_fds[i] == fd)
                        return 1;
        return fd == args->report_fd;
}

/* Close every inherited fd the plan does not use, so descriptors belonging
 * to other, concurrently spawned children are not held open by this one. */
static int close_foreign_fds(const struct hostel_spawn_args *args)
{
        int max_fd = 3;

        for (int i = 0; i < args->n_keep_fds; i++)
                if (args->keep_fds[i] > max_fd)
                        max_fd = args->keep_fds[i];
        if (args->report_fd > max_fd)
                max_fd = args->report_fd;
        for (int fd = 3; fd <= max_fd; fd++)
                if (!is_kept(fd, args))
                        close(fd);
        return sys_result(syscall(SYS_close_range, max_fd + 1, ~0U, 0));
}

static void reset_signals(void)
{
        sigset_t none;
        struct sigaction dfl = { .sa_handler = SIG_DFL };

        for (int sig = 1; sig < _NSIG; sig++)
                if (sig != SIGKILL && sig != SIGSTOP)
                        sigaction(sig, &dfl, NULL);
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
}

static void report_and_exit(int report_fd, int index, int error)
{
        struct hostel_step_failure failure = { .index = index, .error = error };

        write_all(report_fd, &failure, sizeof failure);
        _exit(127);
}

static void run_child(const struct hostel_spawn_args *args)
{
        reset_signals();
        int r = close_foreign_fds(args);
        if (r < 0)
                report_and_exit(args->report_fd, -1, -r);
        for (int i = 0; i < args->n_ops; i++) {
                const struct hostel_op *op = &args->ops[i];
                r = run_op(op);
                if (r == 0)
                        continue;
                if (op->flags & HOSTEL_OPF_IGNORE_ERRORS)
                        continue;
                if (r == -ENOENT && (op->flags & HOSTEL_OPF_IGNORE_ENOENT))
                        continue;
                report_and_exit(args->report_fd, i, -r);
        }
        /* A plan that does not end in execve simply exits successfully. */
        _exit(0);
}

/* The child's stack when it shares our memory; it only runs the plan's
 * steps, none of which recurses or keeps big buffers. */
#define SHARED_CHILD_STACK (256 * 1024)
#define GUARD_SIZE 4096

static void run_child_entry(const void *args)
{
        run_child(args);
}

/* clone3 with the child on its own stack, calling entry(arg) there. glibc
 * has no public clone3 wrapper, and returning from syscall() onto a stack
 * that is not the one it was called on is not possible. Other
 * architectures fall back to copying the address space. */
#if defined(__x86_64__)
#define HAVE_CLONE3_ON_STACK 1
static long clone3_on_stack(struct clone_args *ca, void (*entry)(const void *), const void *arg)
{
        register long nr __asm__("rax") = SYS_clone3;
        register struct clone_args *a0 __asm__("rdi") = ca;
        register size_t a1 __asm__("rsi") = sizeof *ca;
        register void (*fn)(const void *) __asm__("r12") = entry;
        register const void *fn_arg __asm__("r13") = arg;

        __asm__ volatile("syscall\n\t"
                         "test %%rax, %%rax\n\t"
                         "jnz 1f\n\t"
                         "xor %%ebp, %%ebp\n\t"   /* the child: a fresh, aligned stack */
                         "mov %%r13, %%rdi\n\t"
                         "call *%%r12\n\t"
                         "ud2\n"                   /* entry never returns */
                         "1:"
                         : "+r"(nr)
                         : "r"(a0), "r"(a1), "r"(fn), "r"(fn_arg)
                         : "rcx", "r11", "memory", "cc");
        return nr;
}
#else
#define HAVE_CLONE3_ON_STACK 0
#endif

int hostel_spawn_shares_memory(void)
{
        return HAVE_CLONE3_ON_STACK;
}

static void fill_clone_args(struct clone_args *ca, const struct hostel_spawn_args *args,
                            int *pidfd)
{
        memset(ca, 0, sizeof *ca);
        ca->flags = args->clone_flags | CLONE_PIDFD;
        ca->pidfd = (uint64_t)(uintptr_t)pidfd;
        ca->exit_signal = SIGCHLD;
        if (args->cgroup_fd >= 0) {
                ca->flags |= CLONE_INTO_CGROUP;
                ca->cgroup = (uint64_t)args->cgroup_fd;
        }
}

/* posix_spawn's way: the child borrows our address space instead of a copy
 * (whose page tables cost milliseconds for a daemon of hosteld's size), and
 * this thread sleeps until the child has exec'd or died (CLONE_VFORK), so
 * nothing but the child runs on this thread's state, errno included. Other
 * threads carry on; signals stay blocked here until the child has reset its
 * handlers, so none of ours runs in it. The only other state of this thread
 * the child touches: glibc's cancellable wrappers (open, write) set and then
 * restore its cancellation flags, which nothing else changes while it
 * sleeps (CPython never cancels threads). */
static long clone_sharing_memory(struct clone_args *ca, const struct hostel_spawn_args *args)
{
#if HAVE_CLONE3_ON_STACK
        sigset_t all, saved;
        char *stack = mmap(NULL, SHARED_CHILD_STACK, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);

        if (stack == MAP_FAILED)
                return -errno;
        if (mprotect(stack, GUARD_SIZE, PROT_NONE) < 0) {
                int err = errno;
                munmap(stack, SHARED_CHILD_STACK);
                return -err;
        }
        ca->flags |= CLONE_VM | CLONE_VFORK;
        ca->stack = (uint64_t)(uintptr_t)stack;
        ca->stack_size = SHARED_CHILD_STACK;
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &saved);
        long pid = clone3_on_stack(ca, run_child_entry, args);
        pthread_sigmask(SIG_SETMASK, &saved, NULL);
        munmap(stack, SHARED_CHILD_STACK);
        return pid;
#else
        (void)ca;
        (void)args;
        return -ENOSYS;
#endif
}

static long clone_copying_memory(struct clone_args *ca, const struct hostel_spawn_args *args)
{
        long pid = syscall(SYS_clone3, ca, sizeof *ca);

        if (pid < 0)
                return -errno;
        if (pid == 0)
                run_child(args); /* never returns */
        return pid;
}

int hostel_spawn(const struct hostel_spawn_args *args, int *pidfd_out)
{
        int pidfd = -1;
        struct clone_args ca;

        fill_clone_args(&ca, args, &pidfd);
        long pid = args->share_memory ? clone_sharing_memory(&ca, args)
                                      : clone_copying_memory(&ca, args);
        if (pid < 0)
                return (int)pid;
        *pidfd_out = pidfd;
        return (int)pid;
}
