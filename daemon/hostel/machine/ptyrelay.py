"""Relay a pty master to this process's terminal (hostelctl shell), as machinectl does.

On a terminal, ^]^]^] (Ctrl-] three times within a second) ends the session,
as in machinectl and systemd-nspawn. When stdin is not a terminal and ends,
the pty is sent its end-of-file character, so `echo x | hostelctl shell M cat`
ends as it would on a terminal after ^D; the pty does not echo piped input."""
from __future__ import annotations

import os
import select
import sys
import time

ESCAPE = 0x1D  # ^]
ESCAPE_COUNT = 3
ESCAPE_WINDOW = 1.0  # seconds, from the first ^] of the three


class EscapeDetector:
    """Counts consecutive ^] in the typed input; three within ESCAPE_WINDOW end the session."""

    def __init__(self) -> None:
        self.count = 0
        self.first = 0.0

    def feed(self, data: bytes, now: float) -> bool:
        for byte in data:
            if byte != ESCAPE:
                self.count = 0
                continue
            if self.count == 0 or now - self.first > ESCAPE_WINDOW:
                self.count, self.first = 1, now
            else:
                self.count += 1
            if self.count >= ESCAPE_COUNT:
                return True
        return False


def _send_eof(master: int, ended_line: bool) -> None:
    """The pty's VEOF character: at a line's start it is end-of-file for the reader; after
    a partial line the first one only delivers that line, so it is sent twice."""
    import termios

    veof = termios.tcgetattr(master)[6][termios.VEOF]
    veof = veof if isinstance(veof, bytes) else bytes([veof])
    os.write(master, veof if ended_line else veof * 2)


def _no_echo(master: int) -> None:
    """Piped input is not typed: echoing it back would double it in the output."""
    import termios

    attrs = termios.tcgetattr(master)
    attrs[3] &= ~termios.ECHO
    termios.tcsetattr(master, termios.TCSANOW, attrs)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def relay(master: int) -> int:
    """Copy between stdin/stdout and `master` until the far side hangs up (EIO/EOF) or
    ^]^]^] is typed. Returns the exit status for hostelctl: 0."""
    tty = sys.stdin.isatty()
    saved = None
    if tty:
        import termios
        import tty as ttymod

        saved = termios.tcgetattr(0)
        ttymod.setraw(0)
    else:
        _no_echo(master)
    escape = EscapeDetector() if tty else None
    sources = [master, 0]
    ended_line = True
    try:
        while True:
            readable, _, _ = select.select(sources, [], [])
            if master in readable:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every slave closed, the session is over
                    return 0
                if not data:
                    return 0
                try:
                    write_all(1, data)
                except BrokenPipeError:  # nobody reads our output any more
                    return 0
            if 0 in readable:
                data = os.read(0, 65536)
                if escape is not None and escape.feed(data, time.monotonic()):
                    return 0
                if data:
                    write_all(master, data)
                    ended_line = data.endswith(b"\n")
                else:
                    sources.remove(0)
                    _send_eof(master, ended_line)
    finally:
        os.close(master)
        if saved is not None:
            import termios

            termios.tcsetattr(0, termios.TCSADRAIN, saved)
