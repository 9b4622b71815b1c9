/* The spawn trampoline: clone a child into new namespaces and run a plan.
 *
 * Python prepares the plan (a flat array of operations) before the clone; the
 * child executes it with raw system calls only (no allocation, no Python), so
 * it is safe even though the daemon is multi-threaded. The first failing step
 * writes its index and errno to the report pipe and the child exits; a
 * successful execve closes the pipe (it is O_CLOEXEC), which the parent reads
 * as "the payload is running". */
#ifndef HOSTEL_SPAWN_H
#define HOSTEL_SPAWN_H

#include <stddef.h>
#include <stdint.h>

enum hostel_op_kind {
        HOSTEL_OP_MOUNT = 1,       /* arg=source path=target arg2=fstype arg3=data num=flags */
        HOSTEL_OP_UMOUNT,          /* path, num=flags */
        HOSTEL_OP_MKDIR,           /* path, num=mode; EEXIST is fine */
        HOSTEL_OP_MKNOD,           /* path, num=mode, num2=dev */
        HOSTEL_OP_SYMLINK,         /* arg=link target, path=link */
        HOSTEL_OP_WRITE_FILE,      /* path, data/len, num=mode, num2=open flags added */
        HOSTEL_OP_CHOWN,           /* path, num=uid, num2=gid (lchown) */
        HOSTEL_OP_PIVOT_ROOT,      /* path=new root; old root detached */
        HOSTEL_OP_CHROOT,          /* path */
        HOSTEL_OP_CHDIR,           /* path */
        HOSTEL_OP_SETHOSTNAME,     /* arg */
        HOSTEL_OP_SETGROUPS,       /* data=gid_t array, len=count */
        HOSTEL_OP_SETRESGID,       /* num=gid */
        HOSTEL_OP_SETRESUID,       /* num=uid */
        HOSTEL_OP_CAPBSET_DROP,    /* num=mask of capabilities to drop (bit n = cap n) */
        HOSTEL_OP_CAPSET,          /* num=effective num2=permitted num3=inheritable */
        HOSTEL_OP_KEEPCAPS,        /* num=0|1 */
        HOSTEL_OP_NO_NEW_PRIVS,
        HOSTEL_OP_SECCOMP,         /* data=struct sock_filter[], len=count */
        HOSTEL_OP_PERSONALITY,     /* num */
        HOSTEL_OP_WAIT_FD,         /* num=fd: block until the parent writes a byte */
        HOSTEL_OP_NOTIFY_FD,       /* num=fd: tell the parent we reached this step */
        HOSTEL_OP_DUP2,            /* num=old fd, num2=new fd */
        HOSTEL_OP_SETSID,
        HOSTEL_OP_SETCTTY,         /* num=fd */
        HOSTEL_OP_SETNS,           /* num=fd, num2=nstype */
        HOSTEL_OP_UNSHARE,         /* num=flags */
        HOSTEL_OP_UMASK,           /* num */
        HOSTEL_OP_EXECVE,          /* path, argv, envp */
        HOSTEL_OP_STUB_INIT,       /* fork; parent stays as PID 1 reaping and forwarding signals */
        HOSTEL_OP_UNLINK,          /* path */
        HOSTEL_OP_FAIL,            /* num=errno: end the plan with this error (e.g. not found in PATH) */
        HOSTEL_OP_MOVE_MOUNT,      /* num=detached mount fd (open_tree), path=where to attach it */
        HOSTEL_OP_FCHDIR,          /* num=directory fd: enter a tree we cannot name by path */
        HOSTEL_OP_WRITE_FD,        /* num=fd, data/len: e.g. "0" to a v1 cgroup's tasks file */
        HOSTEL_OP_SETRLIMIT,       /* num=resource, num2=soft, num3=hard (clamped to ours on EPERM) */
};

/* Modifiers in hostel_op.flags. */
#define HOSTEL_OPF_IGNORE_ENOENT 0x1  /* a missing path is not a failure */
#define HOSTEL_OPF_IGNORE_ERRORS 0x2  /* best effort: any error is skipped */
#define HOSTEL_OPF_PATH_BENEATH 0x4   /* path is relative to root, resolved in that tree */
#define HOSTEL_OPF_SOURCE_BENEATH 0x8 /* arg (a bind's source) is relative to root, likewise */

struct hostel_op {
        int kind;
        int flags;
        const char *path;
        const char *arg;
        const char *arg2;
        const char *arg3;
        uint64_t num;
        uint64_t num2;
        uint64_t num3;
        const void *data;
        size_t len;
        char *const *argv;
        char *const *envp;
        /* A tree the path (HOSTEL_OPF_PATH_BENEATH) or a mount's source
         * (HOSTEL_OPF_SOURCE_BENEATH) is relative to and resolved inside
         * (openat2 RESOLVE_IN_ROOT), so the tree's symlinks and ".." cannot
         * make the step touch the host. For mount, umount, mkdir, mknod,
         * symlink, write-file, chown, unlink, move-mount and chdir. */
        const char *root;
};

/* What the child writes to the report pipe when step `index` fails. */
struct hostel_step_failure {
        int32_t index;
        int32_t error;
};

struct hostel_spawn_args {
        uint64_t clone_flags;      /* CLONE_NEW* flags; CLONE_PIDFD is always added */
        const struct hostel_op *ops;
        int n_ops;
        int report_fd;             /* write end, O_CLOEXEC */
        const int *keep_fds;       /* fds >= 3 the plan uses; all others are closed */
        int n_keep_fds;
        int cgroup_fd;             /* a v2 cgroup directory to be born in
                                      (CLONE_INTO_CGROUP), or -1 */
        int share_memory;          /* CLONE_VM|CLONE_VFORK: only for plans that
                                      neither wait for us nor stay behind as a
                                      stub init (both would keep us blocked) */
};

/* Returns the child's pid (>0) and stores its pidfd, or -errno. With
 * share_memory it returns only once the child has exec'd or exited. */
int hostel_spawn(const struct hostel_spawn_args *args, int *pidfd_out);

/* Whether this build can run a child on our address space (share_memory). */
int hostel_spawn_shares_memory(void);

#endif
