"""The launcher's jail: entered after setup, before the first vCPU runs.

A guest is hostile input for the launcher (its virtqueues, its MMIO
exits), so once the launcher holds every file it needs -- /dev/kvm and the
VM, guest memory, the kernel it loaded, disk files, the tap, the console --
it gives up everything else, as Firecracker's jailer does for Firecracker:

- its own pid namespace: hosteld starts the launcher as pid 1 of a new one
  (CLONE_NEWPID), so it sees and can signal no other process;
- its own mount namespace, with an empty read-only tmpfs (or --chroot's
  directory) as its root, the host's tree detached;
- its own IPC and network namespaces (the tap was opened and configured in
  the host's namespace, and its descriptor keeps working);
- an unprivileged uid and gid (--username's, else nobody), no supplementary
  groups, an empty capability bounding set and ambient set, hence no
  capabilities at all;
- no_new_privs, and a seccomp allow-list of the system calls the vCPU and
  device threads and the Python around them make: anything else kills the
  process.

Namespaces only apply to the calling thread, so the jail is entered while
the launcher is still single-threaded; the vCPU and worker threads it starts
afterwards inherit all of it (TSYNC is set on the filter too)."""
from __future__ import annotations

import os
import pwd
import threading
from dataclasses import dataclass
from pathlib import Path

from hostel import native
from hostel.guest.errors import GuestError

try:
    import seccomp as _libseccomp
except ImportError:  # the Debian binding is missing: the PyPI build has the same API
    import pyseccomp as _libseccomp

NOBODY = "nobody"
# Where the new root is mounted before the pivot: an existing directory, so the
# host's tree is not changed (the mount exists in the launcher's namespace only).
JAIL_ROOT = "/tmp"
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
CAP_LAST_CAP_FILE = "/proc/sys/kernel/cap_last_cap"

# What the launcher's threads do once jailed: the vCPU loop (ioctl on the VM and
# vCPU fds, its signal kick), the device workers (eventfds, poll, file and tap
# I/O, getrandom) and the Python interpreter around them (memory, threads,
# futexes, clocks, signals, stat and failed opens when it looks for a module).
ALLOWED_SYSCALLS: tuple[str, ...] = (
    # I/O on descriptors already open
    "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev",
    "preadv2", "pwritev2", "lseek", "close", "fcntl", "dup", "dup3", "ioctl",
    "fdatasync", "fsync", "fstat", "newfstatat", "statx", "poll", "ppoll", "select",
    "pselect6", "eventfd2", "getrandom",
    # lookups in the empty root: an import Python tries fails with ENOENT
    "openat", "stat", "lstat", "readlink", "getcwd", "getdents64", "access",
    # memory
    "mmap", "munmap", "mprotect", "madvise", "mremap", "brk",
    # threads, scheduling, time
    "clone", "clone3", "set_robust_list", "rseq", "futex", "gettid", "getpid", "getppid",
    "sched_yield", "sched_getaffinity", "nanosleep", "clock_nanosleep", "clock_gettime",
    "gettimeofday", "exit", "exit_group", "restart_syscall",
    # signals (the vCPU kick, Python's handlers)
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack", "tgkill",
    # identity reads
    "getuid", "geteuid", "getgid", "getegid", "uname", "prlimit64", "sysinfo",
)


class JailError(GuestError):
    """The launcher could not jail itself; the guest does not run unjailed."""


@dataclass(frozen=True)
class JailSettings:
    uid: int
    gid: int
    root: Path | None = None    # --chroot: this directory becomes the root, else an empty tmpfs


def settings_for(username: str | None, chroot: Path | None) -> JailSettings:
    """The jail for --username (default nobody) and --chroot."""
    name = username or NOBODY
    try:
        user = pwd.getpwnam(name)
    except KeyError:
        raise JailError(f"no user named {name!r} to run the guest launcher as "
                        f"({'--username' if username else 'create it, or pass --username'})") from None
    if user.pw_uid == 0:
        raise JailError(f"user {name!r} is root: the launcher needs an unprivileged user")
    return JailSettings(user.pw_uid, user.pw_gid, chroot)


def enter(settings: JailSettings) -> None:
    """Jail this process, irrevocably. Call with every needed file already open."""
    if threading.active_count() != 1 or len(os.listdir("/proc/self/task")) != 1:
        raise JailError("the launcher must enter its jail before it starts any thread")
    last_cap = int(Path(CAP_LAST_CAP_FILE).read_text())
    syscall_filter = _build_filter()   # libseccomp may read files: before the root goes
    try:
        native.unshare(native.CLONE_NEWNS | native.CLONE_NEWIPC | native.CLONE_NEWNET)
        _empty_root(settings.root)
        _drop_identity(settings, last_cap)
        native.prctl(native.PR_SET_NO_NEW_PRIVS, 1)
        syscall_filter.load()
    except (OSError, RuntimeError) as e:
        raise JailError(f"cannot jail the guest launcher: {e}") from e


def _empty_root(chroot: Path | None) -> None:
    """Pivot into a read-only tmpfs (or a bind of `chroot`) and detach the host's tree."""
    native.mount(None, "/", None, native.MS_REC | native.MS_PRIVATE)
    if chroot is None:
        native.mount("hostel-jail", JAIL_ROOT, "tmpfs",
                     native.MS_NOSUID | native.MS_NODEV | native.MS_NOEXEC, "size=16k,mode=0755")
    else:
        native.mount(str(chroot), JAIL_ROOT, None, native.MS_BIND | native.MS_REC)
    # pivot_root(".", "."): the old root ends up stacked on the new one, and is
    # detached right away; no directory for it is needed inside the new root.
    os.chdir(JAIL_ROOT)
    native.pivot_root(".", ".")
    native.umount(".", native.MNT_DETACH)
    os.chdir("/")
    if chroot is None:
        native.mount(None, "/", None, native.MS_REMOUNT | native.MS_BIND | native.MS_RDONLY
                     | native.MS_NOSUID | native.MS_NODEV | native.MS_NOEXEC)


def _drop_identity(settings: JailSettings, last_cap: int) -> None:
    """No capability can come back: the bounding and ambient sets are emptied while
    we still hold CAP_SETPCAP, then the switch to a non-zero uid clears the rest."""
    for cap in range(last_cap + 1):
        native.prctl(PR_CAPBSET_DROP, cap)
    native.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    os.setgroups([])
    os.setresgid(settings.gid, settings.gid, settings.gid)
    os.setresuid(settings.uid, settings.uid, settings.uid)


def _build_filter() -> "_libseccomp.SyscallFilter":
    flt = _libseccomp.SyscallFilter(defaction=_libseccomp.KILL_PROCESS)
    flt.set_attr(_libseccomp.Attr.CTL_TSYNC, 1)
    for name in ALLOWED_SYSCALLS:
        try:
            flt.add_rule(_libseccomp.ALLOW, name)
        except (RuntimeError, ValueError):
            continue  # not a system call on this architecture (e.g. select on arm64)
    return flt
