"""The container's console: the caller's descriptors, a relayed pty, or a logged pty.

interactive: a pty whose master hosteld relays to and from the caller's
  descriptors (what systemd-nspawn does on a terminal).
passive: the same pty, output relayed only.
pipe: the caller's descriptors are the payload's stdio; no pty, no /dev/console.
With no descriptors at all, the pty's output goes to a bounded console log.

Relaying blocks on the caller's terminal, so it runs in a thread per
container, never on the event loop."""
from __future__ import annotations

import collections
import logging
import os
import select
import threading
from dataclasses import dataclass, field

from hostel.machine.settings import Stdio

log = logging.getLogger(__name__)
CONSOLE_LOG_BYTES = 64 * 1024


@dataclass
class Console:
    mode: str                      # interactive | passive | pipe | log
    stdin: int                     # what the payload gets as fd 0, 1, 2
    stdout: int
    stderr: int
    tty_path: str | None = None    # pty slave on the host, for /dev/console
    master: int | None = None
    caller: Stdio = field(default_factory=Stdio)
    log: collections.deque = field(default_factory=lambda: collections.deque())
    log_size: int = 0
    _thread: threading.Thread | None = None
    _stop_r: int = -1
    _stop_w: int = -1

    def payload_fds(self) -> set[int]:
        return {self.stdin, self.stdout, self.stderr}

    def start_relay(self) -> None:
        if self.master is None:
            return
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._relay, name="console-relay", daemon=True)
        self._thread.start()

    def _append_log(self, data: bytes) -> None:
        self.log.append(data)
        self.log_size += len(data)
        while self.log_size > CONSOLE_LOG_BYTES and self.log:
            self.log_size -= len(self.log.popleft())

    def text(self) -> str:
        return b"".join(self.log).decode(errors="replace")

    def _relay(self) -> None:
        sources = [self.master, self._stop_r]
        if self.mode == "interactive" and self.caller.stdin is not None:
            sources.append(self.caller.stdin)
        while True:
            readable, _, _ = select.select(sources, [], [])
            if self._stop_r in readable and self.master not in readable:
                return
            if self.master in readable:
                try:
                    data = os.read(self.master, 65536)
                except OSError:  # EIO: every slave closed, the container is gone
                    return
                if not data:
                    return
                self._deliver(data)
            if self.caller.stdin is not None and self.caller.stdin in readable:
                data = os.read(self.caller.stdin, 65536)
                if not data:
                    sources.remove(self.caller.stdin)
                else:
                    os.write(self.master, data)

    def _deliver(self, data: bytes) -> None:
        if self.caller.stdout is None:
            self._append_log(data)
            return
        try:
            os.write(self.caller.stdout, data)
        except OSError as e:  # the caller went away; keep the output in the log instead
            log.debug("console output to the caller failed: %s", e)
            self.caller.stdout = None
            self._append_log(data)

    def _close_payload(self) -> None:
        for fd in self.payload_fds() - {-1}:
            os.close(fd)
        self.stdin = self.stdout = self.stderr = -1

    def reopen_payload(self) -> None:
        """A rebooting container needs the pty's slave again (the parent let go of it)."""
        if self.tty_path is not None and self.stdin == -1:
            self.stdin = os.open(self.tty_path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
            self.stdout, self.stderr = os.dup(self.stdin), os.dup(self.stdin)

    def close_payload_side(self) -> None:
        """After the child has its copies: the parent keeps only what it relays."""
        if self.master is not None:
            self._close_payload()

    def close(self) -> None:
        if self._thread is not None:
            os.write(self._stop_w, b"x")
            self._thread.join(timeout=5)
            self._thread = None
        for fd in (self.master, self._stop_r, self._stop_w):
            if fd is not None and fd >= 0:
                os.close(fd)
        self.master = None
        self._stop_r = self._stop_w = -1
        self._close_payload()  # still open in pipe mode, or if the start failed early
        self.caller.close()


def _null() -> int:
    return os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)


def open_console(mode: str | None, caller: Stdio) -> Console:
    """Choose and prepare the console; the descriptors in `caller` are owned by it from now on."""
    if mode is None:
        mode = "interactive" if caller.stdin is not None and os.isatty(caller.stdin) else (
            "pipe" if caller.stdin is not None or caller.stdout is not None else "log")
    if mode == "pipe":
        stdin = caller.stdin if caller.stdin is not None else _null()
        stdout = caller.stdout if caller.stdout is not None else _null()
        stderr = caller.stderr if caller.stderr is not None else os.dup(stdout)
        return Console("pipe", stdin, stdout, stderr, caller=Stdio())
    master, slave = os.openpty()
    os.set_inheritable(master, False)
    tty_path = os.ttyname(slave)
    if caller.stdin is not None and os.isatty(caller.stdin):
        _copy_window_size(caller.stdin, master)
    console = Console(mode if mode in ("interactive", "passive") else "log", slave, os.dup(slave),
                      os.dup(slave), tty_path, master, caller)
    return console


def _copy_window_size(source: int, target: int) -> None:
    import fcntl
    import termios

    size = fcntl.ioctl(source, termios.TIOCGWINSZ, b"\0" * 8)
    fcntl.ioctl(target, termios.TIOCSWINSZ, size)
