"""Per-machine console logs of pool machines: STATE_DIR/logs/NAME.log.

nspawn@.service sends a container's console to the journal. hostel has no
journal to rely on, so a machine started from the pool (machine/services.py)
gets a file as its standard output and error instead, written by the payload
itself (console mode "pipe"): the log keeps filling while hosteld restarts,
and hosteld never copies a byte of it. `hostelctl logs` reads it through
OpenConsoleLog, which hands out a read-only descriptor (console output is
root's to see: it may print anything).

Each start appends a marker line. A log past ROTATE_BYTES is renamed to
NAME.log.1 (replacing an older one) when the machine next starts, so at most
about two of them are kept; a machine printing without end fills its current
log until its next start (the price of writing without hosteld in between).

All of it is blocking file I/O: callers run it in a thread."""
from __future__ import annotations

import os
import time
from pathlib import Path

ROTATE_BYTES = 8 * 1024 * 1024
LOG_SUFFIX = ".log"


class NoConsoleLog(LookupError):
    """No log for that name: it was never started from the pool here."""


class ConsoleLogs:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, name: str) -> Path:
        return self.directory / f"{name}{LOG_SUFFIX}"

    def open_for_payload(self, name: str, root: str) -> int:
        """The descriptor the payload writes its console to (O_APPEND, owned by the caller),
        after the start marker; rotates a log that has grown past ROTATE_BYTES first."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.path(name)
        try:
            if path.stat().st_size > ROTATE_BYTES:
                os.replace(path, path.with_name(path.name + ".1"))
        except FileNotFoundError:
            pass
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o600)
        try:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
            os.write(fd, f"-- {stamp}: hostel starts machine {name} from {root} --\n".encode())
        except OSError:
            os.close(fd)
            raise
        return fd

    def note(self, name: str, text: str) -> None:
        """A line of hostel's own in the log (a start that failed), as the journal shows
        a unit's failure among its output."""
        fd = os.open(self.path(name), os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            os.write(fd, f"-- {time.strftime('%Y-%m-%d %H:%M:%S %Z')}: {text} --\n".encode())
        finally:
            os.close(fd)

    def open_for_reading(self, name: str) -> int:
        try:
            return os.open(self.path(name), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise NoConsoleLog(f"no console log for machine {name!r} in {self.directory}: "
                               "only machines started from the pool (hostelctl start, "
                               "machinectl start, enabled ones) have one") from None
