"""A guest's console as hosteld relays it, with clients that attach and detach.

`hostelctl guest console NAME` must reach the console of a guest another client
started, so hosteld sits between the guest's console and everyone who uses it:
one thread per console (relaying blocks on the owner's terminal, so never on
the event loop) copies what the guest prints to its owner (the client that
started it, or a log) and to every attached client, and what the owner and
the attached clients send to the guest's input.

Several clients may attach at once, as several terminals on one serial line:
each sees the output from its attach on, and what any of them types reaches
the guest in the order it arrives. One at a time would make a forgotten
session lock everyone else out of a guest whose only other way in is its
console. An attached client is the hub's end of a unix stream socket: closing
its end detaches it. Attached clients are written without blocking and lose
output they do not read in time, so a stalled one never stalls the guest or
its owner; the owner is written as before the hub existed, blocking."""
from __future__ import annotations

import errno
import logging
import os
import select
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

from hostel.errors import HostelError

log = logging.getLogger(__name__)

CHUNK = 65536
MAX_ATTACHED = 16  # bounds the descriptors and the copying one console can cost hosteld
STOP_TIMEOUT = 5.0  # seconds to wait for the relay to drain at stop()


class ConsoleUnavailable(HostelError):
    """The console cannot take an attach (ended, or too many attached)."""


@dataclass
class ConsoleEnds:
    """The descriptors the hub relays between (owned: the hub closes them as they end).

    output: read, what the guest prints (a pipe's read end, or a pty master);
    input: written, what the guest reads (the same pty master, a pipe's write end,
      or None when the guest has no input);
    owner_output: where the output goes besides the attached clients (the starting
      client's stdout or a log file; None: only to `log_output`);
    owner_input: the starting client's input (None: none);
    input_ends_with_owner: the guest's input is closed once the owner's ends (a
      payload's stdin must end, as `echo x | guest run ... cat` needs); otherwise
      it stays open for attached clients;
    owned: False when their holder closes them (a container's console outlives one
      relay: a reboot starts the next on the same pty)."""

    output: int
    input: int | None
    owner_output: int | None
    owner_input: int | None
    input_ends_with_owner: bool = False
    owned: bool = True


class ConsoleHub:
    """One console's relay thread and its attached clients."""

    def __init__(self, name: str, ends: ConsoleEnds,
                 log_output: Callable[[bytes], None] | None = None) -> None:
        self.name = name
        self._ends = ends
        self._log_output = log_output
        self._lock = threading.Lock()
        self._attached: list[socket.socket] = []
        self._ended = False
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._pending = b""  # input read but not yet taken by the guest
        self._close_input_when_flushed = False
        if ends.input is not None:
            os.set_blocking(ends.input, False)
            if ends.owner_input is None and ends.input_ends_with_owner:
                self._close_end("input")  # no owner input: the guest's ends at once
        self._thread = threading.Thread(target=self._run, name=f"console-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def ended(self) -> bool:
        return self._ended

    def attach(self, fd: int) -> None:
        """Add a client: `fd`, one end of a unix stream socket, is the hub's from now on."""
        sock = socket.socket(fileno=fd)
        with self._lock:
            if self._ended or self._stopping:
                sock.close()
                raise ConsoleUnavailable(f"the console of {self.name!r} has closed: it ended")
            if len(self._attached) >= MAX_ATTACHED:
                sock.close()
                raise ConsoleUnavailable(
                    f"{MAX_ATTACHED} clients are attached to the console of {self.name!r} "
                    "already; detach one (^]^]^] in its terminal) first")
            sock.setblocking(False)
            self._attached.append(sock)
        self._wake()

    def attached(self) -> int:
        with self._lock:
            return len(self._attached)

    def wait_ended(self, timeout: float) -> bool:
        """Wait for the guest's output to end (its last writer closed); True if it did."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop(self) -> None:
        """End the relay after what the guest already printed has been delivered."""
        with self._lock:
            self._stopping = True
        self._wake()
        if self._thread.is_alive():
            self._thread.join(STOP_TIMEOUT)

    def _wake(self) -> None:
        with self._lock:  # under the lock: _finish closes the pipe (its number may be reused)
            if self._wake_w < 0:
                return
            try:
                os.write(self._wake_w, b"x")
            except BlockingIOError:
                pass  # a wake-up is pending already

    # In the relay thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._step():
                pass
            self._drain_output()
        except OSError as e:  # a descriptor broke in a way no step expects: say so, end
            log.error("console of %s: relay ended: %s", self.name, e)
        finally:
            self._finish()

    def _step(self) -> bool:
        """One select round; False once the guest's output has ended or stop() was asked."""
        ends = self._ends
        with self._lock:
            attached = list(self._attached)
            if self._stopping:
                return False
        readers: list[int | socket.socket] = [self._wake_r, ends.output]
        if not self._pending:  # input is read only as fast as the guest takes it
            readers += [ends.owner_input] if ends.owner_input is not None else []
            readers += attached
        writers = [ends.input] if self._pending and ends.input is not None else []
        readable, writable, _ = select.select(readers, writers, [])
        if self._wake_r in readable:
            self._drain_wake()
        if ends.output in readable and not self._relay_output():
            return False
        if ends.owner_input is not None and ends.owner_input in readable:
            self._read_owner_input()
        for sock in attached:
            if sock in readable:
                self._read_attached(sock)
        if writable:
            self._write_input()
        return True

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 64):
                pass
        except BlockingIOError:
            pass

    def _relay_output(self) -> bool:
        try:
            data = os.read(self._ends.output, CHUNK)
        except OSError as e:
            if e.errno != errno.EIO:  # EIO: a pty whose every slave closed, as EOF
                log.warning("console of %s: reading its output failed: %s", self.name, e)
            return False
        if not data:
            return False
        self._deliver(data)
        return True

    def _drain_output(self) -> None:
        """At stop: what is readable now still reaches everyone, without waiting for more."""
        while select.select([self._ends.output], [], [], 0)[0]:
            try:
                data = os.read(self._ends.output, CHUNK)
            except OSError:
                return
            if not data:
                return
            self._deliver(data)

    def _deliver(self, data: bytes) -> None:
        ends = self._ends
        if ends.owner_output is not None:
            try:
                _write_all(ends.owner_output, data)
            except OSError as e:  # the owner went away: the others still see the output
                log.debug("console of %s: its owner's output failed: %s", self.name, e)
                self._close_end("owner_output")
        if ends.owner_output is None and self._log_output is not None:
            self._log_output(data)
        with self._lock:
            attached = list(self._attached)
        for sock in attached:
            try:
                sock.send(data)
            except BlockingIOError:
                pass  # it reads too slowly: this part of the output is lost to it alone
            except OSError:
                self._detach(sock)

    def _read_owner_input(self) -> None:
        ends = self._ends
        assert ends.owner_input is not None
        try:
            data = os.read(ends.owner_input, CHUNK)
        except OSError:
            data = b""  # a broken input ends like a finished one
        if data:
            self._queue_input(data)
            return
        self._close_end("owner_input")
        if ends.input_ends_with_owner:
            self._close_input_when_flushed = True
            self._close_input_if_flushed()

    def _read_attached(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self._queue_input(data)
        else:
            self._detach(sock)

    def _queue_input(self, data: bytes) -> None:
        if self._ends.input is not None:  # else the guest reads no more: dropped
            self._pending += data

    def _write_input(self) -> None:
        ends = self._ends
        assert ends.input is not None
        try:
            self._pending = self._pending[os.write(ends.input, self._pending):]
        except BlockingIOError:
            return
        except OSError:  # the guest reads no more (it ended): nobody takes input now
            self._pending = b""
            self._close_end("input")
            return
        self._close_input_if_flushed()

    def _close_input_if_flushed(self) -> None:
        ends = self._ends
        if self._close_input_when_flushed and not self._pending and ends.input is not None:
            self._close_end("input")

    def _close_end(self, role: str) -> None:
        """An end is done with: closed if the hub owns it (the output may be the input,
        one pty master), forgotten either way."""
        ends = self._ends
        fd = getattr(ends, role)
        setattr(ends, role, None)
        others = (ends.output, ends.input, ends.owner_output, ends.owner_input)
        if ends.owned and fd is not None and fd not in others:
            os.close(fd)

    def _detach(self, sock: socket.socket) -> None:
        with self._lock:
            if sock in self._attached:
                self._attached.remove(sock)
        sock.close()

    def _finish(self) -> None:
        with self._lock:
            self._ended = True
            attached, self._attached = self._attached, []
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1
        for sock in attached:  # their clients see the end of the output and exit
            sock.close()
        ends = self._ends
        if ends.owned:
            for fd in {ends.output, ends.input, ends.owner_output, ends.owner_input}:
                if fd is not None:
                    os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def piped_console(name: str, owner_output: int, owner_input: int | None,
                  input_ends_with_owner: bool) -> tuple[ConsoleHub, int, int]:
    """A started hub for a launcher's console: (hub, the launcher's output fd, its input
    fd). The launcher writes its console to one pipe and reads its input from another;
    the hub owns `owner_output` and `owner_input` from now on, and ends when the
    launcher's copies of the pipes are all closed (it ended, or never started)."""
    output_r, output_w = os.pipe2(os.O_CLOEXEC)
    input_r, input_w = os.pipe2(os.O_CLOEXEC)
    hub = ConsoleHub(name, ConsoleEnds(output_r, input_w, owner_output, owner_input,
                                       input_ends_with_owner))
    hub.start()
    return hub, output_w, input_r
