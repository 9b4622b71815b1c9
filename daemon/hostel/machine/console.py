"""The container's console: the caller's descriptors, a relayed pty, or a logged pty.

The modes are systemd-nspawn 252's --console=:
interactive: a pty whose master hosteld relays to and from the caller's
  descriptors (what nspawn does on a terminal).
read-only: the same pty, output relayed only; what the caller types is not
  read (nspawn's default off a terminal, so a booted init has a /dev/console).
passive: the same as read-only, as nspawn 252 behaves (its pty's output
  still reaches the caller).
pipe (--pipe): the caller's descriptors are the payload's stdio; no pty, no
  /dev/console.
With no descriptors at all, the pty's output goes to a bounded console log.
Off a terminal hostel defaults to read-only for --boot only: a plain command
gets the caller's pipes, so `echo x | hostelctl run ... cat` reads its input
(nspawn 252 would give it a read-only pty; later systemd's autopipe mode does
what hostel does).

Relaying blocks on the caller's terminal, so it runs in a thread per
container, never on the event loop: hostel.consolehub's, which also lets
clients attach to the console (`hostelctl guest console NAME`)."""
from __future__ import annotations

import collections
import os
from dataclasses import dataclass, field

from hostel.consolehub import ConsoleEnds, ConsoleHub
from hostel.machine.settings import Stdio

CONSOLE_LOG_BYTES = 64 * 1024


@dataclass
class Console:
    mode: str                      # interactive | read-only | passive | pipe | log
    stdin: int                     # what the payload gets as fd 0, 1, 2
    stdout: int
    stderr: int
    tty_path: str | None = None    # pty slave on the host, for /dev/console
    master: int | None = None
    caller: Stdio = field(default_factory=Stdio)
    log: collections.deque = field(default_factory=lambda: collections.deque())
    log_size: int = 0
    hub: ConsoleHub | None = None  # the pty's relay while a payload runs

    def payload_fds(self) -> set[int]:
        return {self.stdin, self.stdout, self.stderr}

    def start_relay(self, name: str) -> None:
        """Relay the pty (to the caller, else to the log); the hub ends when every
        slave has closed, and a reboot starts the next one on the same pty."""
        if self.master is None:
            return
        if self.hub is not None:
            self.hub.stop()
        typed = self.caller.stdin if self.mode == "interactive" else None
        self.hub = ConsoleHub(name, ConsoleEnds(self.master, self.master, self.caller.stdout,
                                                typed, owned=False),
                              log_output=self._append_log)
        self.hub.start()

    def _append_log(self, data: bytes) -> None:
        self.log.append(data)
        self.log_size += len(data)
        while self.log_size > CONSOLE_LOG_BYTES and self.log:
            self.log_size -= len(self.log.popleft())

    def text(self) -> str:
        return b"".join(self.log).decode(errors="replace")

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
        if self.hub is not None:
            self.hub.stop()  # what the payload wrote last is delivered first
            self.hub = None
        if self.master is not None:
            os.close(self.master)
        self.master = None
        self._close_payload()  # still open in pipe mode, or if the start failed early
        self.caller.close()


def _null() -> int:
    return os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)


RELAYED_MODES = ("interactive", "read-only", "passive")


def default_mode(caller: Stdio, boot: bool) -> str:
    """The console when none is asked for (see the module's docstring)."""
    if caller.stdin is not None and os.isatty(caller.stdin):
        return "interactive"
    if caller.stdin is None and caller.stdout is None:
        return "log"
    return "read-only" if boot else "pipe"


def open_console(mode: str | None, caller: Stdio, boot: bool = False) -> Console:
    """Choose and prepare the console; the descriptors in `caller` are owned by it from now on."""
    if mode is None:
        mode = default_mode(caller, boot)
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
    console = Console(mode if mode in RELAYED_MODES else "log", slave, os.dup(slave),
                      os.dup(slave), tty_path, master, caller)
    return console


def _copy_window_size(source: int, target: int) -> None:
    import fcntl
    import termios

    size = fcntl.ioctl(source, termios.TIOCGWINSZ, b"\0" * 8)
    fcntl.ioctl(target, termios.TIOCSWINSZ, size)
