"""How a process that is not hosteld's child ended: pidfs's exit information.

An adopted machine's leader was the child of an earlier hosteld; now another
process (the host's init, or a subreaper) reaps it, and waitid() cannot tell
this hosteld its status. Since Linux 6.15 a pidfd answers PIDFD_GET_INFO with
PIDFD_INFO_EXIT once its process has been reaped, whoever reaped it: the wait
status, as waitid()'s parent would have seen it. That is what lets an adopted
machine's reboot (PID 1 exiting 133, or killed by SIGHUP from reboot(2)) be
told from its poweroff. Older kernels do not know the request: the status then
stays unknown, as before."""
from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import struct

from hostel import native

# _IOWR(PIDFS_IOCTL_MAGIC 0xFF, 11, struct pidfd_info) with the struct's first
# version, 64 bytes (PIDFD_INFO_SIZE_VER0); the kernel accepts that size for good.
PIDFD_GET_INFO = (3 << 30) | (64 << 16) | (0xFF << 8) | 11
PIDFD_INFO_EXIT = 1 << 3
INFO_SIZE = 64
MASK_OFFSET, EXIT_CODE_OFFSET = 0, 60   # __u64 mask ... __s32 exit_code
REAP_POLL_SECONDS = 0.02


class NotSupported(Exception):
    """This kernel's pidfds carry no exit information."""


def reaped_status(pidfd: int) -> int | None:
    """The wait status of pidfd's process once it has been reaped, else None."""
    info = bytearray(INFO_SIZE)
    struct.pack_into("=Q", info, MASK_OFFSET, PIDFD_INFO_EXIT)
    try:
        fcntl.ioctl(pidfd, PIDFD_GET_INFO, info, True)
    except OSError as e:
        if e.errno in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
            raise NotSupported(f"this kernel has no PIDFD_GET_INFO exit status: {e}") from None
        raise
    (mask,) = struct.unpack_from("=Q", info, MASK_OFFSET)
    if not mask & PIDFD_INFO_EXIT:
        return None  # running, or a zombie its reaper has not reaped yet
    (status,) = struct.unpack_from("=i", info, EXIT_CODE_OFFSET)
    return status


def exit_info(pid: int, status: int) -> native.ExitInfo:
    """A wait status as waitid() reports it (CLD_* and the code or the signal)."""
    if os.WIFEXITED(status):
        return native.ExitInfo(pid, os.CLD_EXITED, os.WEXITSTATUS(status))
    code = os.CLD_DUMPED if os.WCOREDUMP(status) else os.CLD_KILLED
    return native.ExitInfo(pid, code, os.WTERMSIG(status))


async def wait_reaped(pidfd: int, pid: int, timeout: float) -> native.ExitInfo | None:
    """How pidfd's process (already ended: its pidfd polled readable) ended, once its
    reaper has reaped it; None when the kernel cannot say or nobody reaps it in time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            status = reaped_status(pidfd)
        except NotSupported:
            return None
        if status is not None:
            return exit_info(pid, status)
        if loop.time() >= deadline:
            return None
        await asyncio.sleep(REAP_POLL_SECONDS)
