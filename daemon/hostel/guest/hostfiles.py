"""Opening a host path a user named (a disk, kernel, initrd, console log)
without ever blocking on it.

A plain open(2) of a FIFO waits for its other end, forever if nobody comes:
in the launcher that hangs `hostelctl guest launch`, in hosteld it would stop
the event loop. A terminal could become the opener's controlling terminal.
So every such path is opened with O_NONBLOCK | O_NOCTTY (a FIFO then opens at
once, or fails with ENXIO), its type is checked on the open descriptor (no
race with a rename), anything but the types the caller accepts is refused
with a message naming the path, what it is and what to pass instead, and
only then is O_NONBLOCK cleared again for the data path."""
from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

from hostel.guest.errors import GuestError

REGULAR = frozenset({stat.S_IFREG})
REGULAR_OR_BLOCK = frozenset({stat.S_IFREG, stat.S_IFBLK})

_KINDS = {stat.S_IFREG: "regular file", stat.S_IFBLK: "block device",
          stat.S_IFCHR: "character device", stat.S_IFIFO: "FIFO", stat.S_IFDIR: "directory",
          stat.S_IFSOCK: "socket", stat.S_IFLNK: "symbolic link"}


def file_kind(mode: int) -> str:
    """What a file is, in words, from its st_mode."""
    return _KINDS.get(stat.S_IFMT(mode), f"file of type {stat.S_IFMT(mode):#o}")


def _hint(err: int | None, instead: str) -> str:
    """What to pass, when the error says the path is of the wrong type."""
    if err == errno.ENXIO:  # a FIFO opened for writing with no reader (the console log)
        return f" (a FIFO with no reader?); pass {instead}"
    if err == errno.EISDIR:  # a directory opened for writing
        return f"; pass {instead}"
    return ""


def open_checked(path: Path, flags: int, accepted: frozenset[int], label: str,
                 instead: str, mode: int = 0o600, error: type[GuestError] = GuestError) -> int:
    """An fd for `path` opened with `flags` (plus O_NONBLOCK, O_NOCTTY, O_CLOEXEC),
    blocking again, if the file's type is one of `accepted` (S_IF* values).
    label names the path's role ("disk image"); instead says what to pass; a
    refusal raises `error` (a GuestError)."""
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, mode)
    except OSError as e:
        raise error(f"cannot open the {label} {path}: {e.strerror}{_hint(e.errno, instead)}"
                    ) from e
    try:
        file_mode = os.fstat(fd).st_mode
        if stat.S_IFMT(file_mode) not in accepted:
            raise error(f"the {label} {path} is a {file_kind(file_mode)}: pass {instead}")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd
