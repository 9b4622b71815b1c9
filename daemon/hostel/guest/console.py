"""virtio-console's multiport control path: ports announced, named and opened.

Port data runs in the C workers like any queue; only the two control queues
are served here, in Python, because they carry a handful of small messages
per boot (the guest init of the next issue finds its host channel by the
port's name)."""
from __future__ import annotations

import os
import select
import struct
import threading
from dataclasses import dataclass

from hostel._vmm import lib

from hostel.guest.virtqueue import Virtqueue

# struct virtio_console_control events
DEVICE_READY = 0
DEVICE_ADD = 1
DEVICE_REMOVE = 2
PORT_READY = 3
CONSOLE_PORT = 4
RESIZE = 5
PORT_OPEN = 6
PORT_NAME = 7
_MESSAGE = struct.Struct("<IHH")
ISR_USED = 1


@dataclass(frozen=True)
class Port:
    """A port beyond the console: its name (seen in the guest's sysfs) and host fds."""

    name: str
    output_fd: int
    input_fd: int = -1


class ConsoleControl:
    """Both control queues of one multiport console, with their message exchange."""

    def __init__(self, ports: list[Port]) -> None:
        self.ports = ports
        self._lock = threading.Lock()
        self._pending: list[bytes] = []
        self._rx: tuple[Virtqueue, int, object] | None = None
        self.guest_ready: set[int] = set()
        self.guest_open: set[int] = set()
        self._threads: list[tuple[threading.Thread, int]] = []

    @property
    def nr_ports(self) -> int:
        return 1 + len(self.ports)

    def start_queue(self, receive: bool, vq: Virtqueue, kick_fd: int, call_fd: int, isr: object) -> None:
        """Serve the control receiveq (host->guest) or transmitq on a thread of its own."""
        stop_fd = os.eventfd(0, os.EFD_CLOEXEC)
        if receive:
            with self._lock:
                self._rx = (vq, call_fd, isr)
        target = self._serve_rx if receive else self._serve_tx
        thread = threading.Thread(target=target, args=(vq, kick_fd, call_fd, isr, stop_fd),
                                  name=f"vq-console-control-{'rx' if receive else 'tx'}", daemon=True)
        self._threads.append((thread, stop_fd))
        thread.start()

    def stop(self) -> None:
        for thread, stop_fd in self._threads:
            os.eventfd_write(stop_fd, 1)
            thread.join()
            os.close(stop_fd)
        self._threads.clear()
        with self._lock:
            self._rx = None
            self._pending.clear()

    @staticmethod
    def _wait(kick_fd: int, stop_fd: int) -> bool:
        """Block until kicked (True) or told to stop (False)."""
        ready, _, _ = select.select([kick_fd, stop_fd], [], [])
        if stop_fd in ready:
            return False
        try:
            os.eventfd_read(kick_fd)
        except BlockingIOError:
            pass  # another reader took the count
        return True

    def _serve_rx(self, vq: Virtqueue, kick_fd: int, call_fd: int, isr: object, stop_fd: int) -> None:
        while self._wait(kick_fd, stop_fd):
            self._flush()

    def _serve_tx(self, vq: Virtqueue, kick_fd: int, call_fd: int, isr: object, stop_fd: int) -> None:
        while self._wait(kick_fd, stop_fd):
            while (chain := vq.pop()) is not None:
                head, out, _ins = chain
                self._on_message(b"".join(out))
                vq.push(head, 0)
            _interrupt(vq, call_fd, isr)
            self._flush()

    def _on_message(self, raw: bytes) -> None:
        if len(raw) < _MESSAGE.size:
            return  # too short to mean anything: ignored, as Linux's device does
        port, event, value = _MESSAGE.unpack_from(raw)
        if event == DEVICE_READY and value == 1:
            self._send(*(_MESSAGE.pack(i, DEVICE_ADD, 0) for i in range(self.nr_ports)))
        elif event == PORT_READY and value == 1 and port < self.nr_ports:
            self.guest_ready.add(port)
            if port == 0:
                self._send(_MESSAGE.pack(0, CONSOLE_PORT, 1), _MESSAGE.pack(0, PORT_OPEN, 1))
            else:
                name = self.ports[port - 1].name.encode()
                self._send(_MESSAGE.pack(port, PORT_NAME, 1) + name, _MESSAGE.pack(port, PORT_OPEN, 1))
        elif event == PORT_OPEN and port < self.nr_ports:
            (self.guest_open.add if value else self.guest_open.discard)(port)

    def _send(self, *messages: bytes) -> None:
        with self._lock:
            self._pending.extend(messages)
        self._flush()

    def _flush(self) -> None:
        """Deliver pending messages into the guest's control receive buffers."""
        with self._lock:
            if self._rx is None:
                return
            vq, call_fd, isr = self._rx
            delivered = False
            while self._pending and (chain := vq.pop()) is not None:
                head, _out, ins = chain
                message = self._pending.pop(0)
                written = 0
                for gpa, length in ins:
                    part = message[written:written + length]
                    vq.mem.write(gpa, part)
                    written += len(part)
                vq.push(head, written)
                delivered = True
            if delivered:
                _interrupt(vq, call_fd, isr)


def _interrupt(vq: Virtqueue, call_fd: int, isr: object) -> None:
    if vq.should_notify():
        lib.hostel_isr_set(isr, ISR_USED)
        os.eventfd_write(call_fd, 1)
