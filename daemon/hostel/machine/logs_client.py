"""hostelctl logs: a pool machine's console log, its last lines, and following it.

The log is read through a descriptor hosteld hands out (OpenConsoleLog), so
the client needs neither root's file permissions nor the daemon's state
directory. Following polls the descriptor (a log is a regular file: no
inotify needed for one reader) until the machine is gone, and asks for the
log again now and then: a new start may have rotated it (machine_log.py).
Imports stay light: this runs inside hostelctl."""
from __future__ import annotations

import os
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import BinaryIO

    from hostel.client import Client

MACHINE_PATH = "/org/hostel1/machine"
SERVICES = "org.hostel1.MachineServices"
POLL_SECONDS = 0.2
REOPEN_EVERY = 5  # idle polls between checks for a rotated log
FOLLOW_DEFAULT_LINES = 10  # as journalctl -f


def open_log(client: Client, name: str) -> int:
    (fd,) = client.call(MACHINE_PATH, SERVICES, "OpenConsoleLog", "s", name)
    return fd


def last_lines(data: bytes, count: int | None) -> bytes:
    """The last `count` lines of `data` (all of it for None)."""
    if count is None:
        return data
    if count <= 0:
        return b""
    lines = data.splitlines(keepends=True)
    return b"".join(lines[-count:])


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _machine_exists(client: Client, name: str) -> bool:
    from hostel.client import CallFailed

    try:
        client.call(MACHINE_PATH, "org.hostel1.MachineManager", "GetMachine", "s", name)
    except CallFailed:
        return False
    return True


def _same_file(a: int, b: int) -> bool:
    first, second = os.fstat(a), os.fstat(b)
    return (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)


def _write(out: BinaryIO, data: bytes) -> None:
    if data:
        out.write(data)
        out.flush()


def show(client: Client, name: str, lines: int | None, follow: bool, out: BinaryIO) -> int:
    """Print the log (or its last `lines`); with `follow`, keep printing until the machine
    is gone or the user interrupts (both a normal end: exit 0)."""
    fd = open_log(client, name)
    try:
        count = FOLLOW_DEFAULT_LINES if follow and lines is None else lines
        _write(out, last_lines(_read_all(fd), count))
    except KeyboardInterrupt:
        follow = False
    if follow:
        fd = _follow(client, name, fd, out)
    os.close(fd)
    return 0


def _follow(client: Client, name: str, fd: int, out: BinaryIO) -> int:
    """Print what is appended until the machine is gone or Ctrl-C; returns the descriptor
    in use then (a rotated log's is swapped for the new one's)."""
    idle = 0
    try:
        while True:
            data = _read_all(fd)
            if data:
                _write(out, data)
                idle = 0
                continue
            if not _machine_exists(client, name):
                _write(out, _read_all(fd))  # what it wrote before it ended
                return fd
            idle += 1
            if idle % REOPEN_EVERY == 0:
                fresh = open_log(client, name)
                if _same_file(fd, fresh):
                    os.close(fresh)
                else:  # rotated by a new start: finish the old one, then the new one
                    _write(out, _read_all(fd))
                    os.close(fd)
                    fd = fresh
            time.sleep(POLL_SECONDS)
    except KeyboardInterrupt:
        return fd
