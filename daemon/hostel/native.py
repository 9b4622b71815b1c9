"""Python faces of the system calls in hostel._native.

Every wrapper raises OSError with the errno and the object it acted on, so a
failure reads "mount /x/proc: [Errno 1] Operation not permitted" and never as
a bare negative number."""
from __future__ import annotations

import os
from dataclasses import dataclass

from hostel._native import ffi, lib

CLONE_NEWNS = lib.CLONE_NEWNS
CLONE_NEWUTS = lib.CLONE_NEWUTS
CLONE_NEWIPC = lib.CLONE_NEWIPC
CLONE_NEWPID = lib.CLONE_NEWPID
CLONE_NEWNET = lib.CLONE_NEWNET
CLONE_NEWUSER = lib.CLONE_NEWUSER
CLONE_NEWCGROUP = lib.CLONE_NEWCGROUP

MS_RDONLY = lib.MS_RDONLY
MS_NOSUID = lib.MS_NOSUID
MS_NODEV = lib.MS_NODEV
MS_NOEXEC = lib.MS_NOEXEC
MS_REMOUNT = lib.MS_REMOUNT
MS_BIND = lib.MS_BIND
MS_MOVE = lib.MS_MOVE
MS_REC = lib.MS_REC
MS_PRIVATE = lib.MS_PRIVATE
MS_SLAVE = lib.MS_SLAVE
MS_SHARED = lib.MS_SHARED
MS_STRICTATIME = lib.MS_STRICTATIME
MNT_DETACH = lib.MNT_DETACH

PR_SET_NAME = lib.PR_SET_NAME
PR_SET_PDEATHSIG = lib.PR_SET_PDEATHSIG
PR_SET_NO_NEW_PRIVS = lib.PR_SET_NO_NEW_PRIVS
PR_GET_NO_NEW_PRIVS = lib.PR_GET_NO_NEW_PRIVS
PR_CAPBSET_READ = lib.PR_CAPBSET_READ
PR_GET_SECCOMP = lib.PR_GET_SECCOMP


def _check(result: int, what: str) -> int:
    """Turn the C convention (-errno) into an OSError naming `what`."""
    if result < 0:
        raise OSError(-result, os.strerror(-result), what)
    return result


def _check_libc(result: int, what: str) -> int:
    """Turn the libc convention (-1 and errno) into an OSError naming `what`."""
    if result < 0:
        err = ffi.errno
        raise OSError(err, os.strerror(err), what)
    return result


def _opt(value: str | None) -> bytes | object:
    return ffi.NULL if value is None else os.fsencode(value)


@dataclass(frozen=True)
class ExitInfo:
    """How a process ended, from waitid(): `code` is CLD_EXITED/KILLED/DUMPED."""

    pid: int
    code: int
    status: int

    @property
    def exited(self) -> bool:
        return self.code == lib.CLD_EXITED

    @property
    def returncode(self) -> int:
        """Shell convention: the exit status, or 128+signal for a killed process."""
        return self.status if self.exited else 128 + self.status

    def describe(self) -> str:
        if self.exited:
            return f"exited with status {self.status}"
        how = "dumped core on" if self.code == lib.CLD_DUMPED else "killed by"
        return f"{how} signal {self.status}"


def pidfd_open(pid: int) -> int:
    return _check(lib.hostel_pidfd_open(pid, 0), f"pidfd_open({pid})")


def pidfd_send_signal(pidfd: int, sig: int) -> None:
    _check(lib.hostel_pidfd_send_signal(pidfd, sig), f"pidfd_send_signal(fd {pidfd}, {sig})")


def pidfd_wait(pidfd: int, *, block: bool = False) -> ExitInfo | None:
    """Reap the process behind `pidfd`; None when it is still running and block is False."""
    out = ffi.new("struct hostel_exit *")
    options = lib.WEXITED | (0 if block else lib.WNOHANG)
    r = lib.hostel_pidfd_wait(pidfd, options, out)
    if r == -11:  # EAGAIN: still running
        return None
    _check(r, f"waitid(P_PIDFD, fd {pidfd})")
    return ExitInfo(out.pid, out.code, out.status)


def mount(source: str | None, target: str, fstype: str | None = None,
          flags: int = 0, data: str | None = None) -> None:
    r = lib.mount(_opt(source), os.fsencode(target), _opt(fstype), flags, _opt(data))
    _check_libc(r, f"mount {source or fstype or 'none'} on {target}")


def umount(target: str, flags: int = 0) -> None:
    _check_libc(lib.umount2(os.fsencode(target), flags), f"umount {target}")


def unshare(flags: int) -> None:
    _check_libc(lib.unshare(flags), f"unshare({flags:#x})")


def setns(fd: int, nstype: int = 0) -> None:
    _check_libc(lib.setns(fd, nstype), f"setns(fd {fd})")


def sethostname(name: str) -> None:
    raw = name.encode()
    _check_libc(lib.sethostname(raw, len(raw)), f"sethostname({name!r})")


def pivot_root(new_root: str, put_old: str) -> None:
    _check(lib.hostel_pivot_root(os.fsencode(new_root), os.fsencode(put_old)),
           f"pivot_root {new_root}")


OPEN_TREE_CLONE = 1


def open_tree(path: str, *, recursive: bool = True) -> int:
    """A detached copy of the mount tree at `path`, to attach in another mount namespace."""
    flags = OPEN_TREE_CLONE | lib.O_CLOEXEC | (lib.AT_RECURSIVE if recursive else 0)
    return _check(lib.hostel_open_tree(lib.AT_FDCWD, os.fsencode(path), flags),
                  f"open_tree {path}")


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return _check_libc(lib.prctl(option, arg2, arg3, arg4, arg5), f"prctl({option})")
