"""The virtio devices: what each offers (id, features, config space, queues)
and which C worker serves each queue with which host descriptor.

The data paths themselves are in bindings/vring.c; a device here is the
description the transport needs, plus the host resources it owns."""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from hostel._vmm import lib

from hostel.guest.console import ConsoleControl, Port
from hostel.guest.errors import GuestError

VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_CONSOLE = 3
VIRTIO_ID_RNG = 4

F_VERSION_1 = 1 << 32
F_RING_EVENT_IDX = 1 << 29
BLK_F_RO = 1 << 5
BLK_F_FLUSH = 1 << 9
NET_F_MAC = 1 << 5
CONSOLE_F_MULTIPORT = 1 << 1
# queue kinds served in Python rather than by a C worker
CONTROL_RX = -1
CONTROL_TX = -2
SECTOR = 512
QUEUE_MAX = 256


@dataclass
class Device:
    """A virtio device: its kind of worker per queue and the descriptor each uses."""

    name: str
    device_id: int
    queues: list[tuple[int, int]]          # (worker kind, io fd) per queue
    features: int = F_VERSION_1 | F_RING_EVENT_IDX
    config: bytes = b""
    readonly: bool = False
    capacity: int = 0
    serial: bytes = b""
    owned_fds: list[int] = field(default_factory=list)
    control: ConsoleControl | None = None   # Python-served queues (console control)

    def close(self) -> None:
        if self.control is not None:
            self.control.stop()
        for fd in self.owned_fds:
            os.close(fd)
        self.owned_fds.clear()


def console_device(output_fd: int, input_fd: int = -1, ports: list[Port] | None = None) -> Device:
    """virtio-console: port 0 is the console (receiveq from input_fd, transmitq to
    output_fd); with more ports it is multiport, with its two control queues."""
    ports = ports or []
    queues = [(lib.HOSTEL_WORK_CONSOLE_RX, input_fd), (lib.HOSTEL_WORK_CONSOLE_TX, output_fd)]
    features = F_VERSION_1 | F_RING_EVENT_IDX
    control = None
    if ports:
        control = ConsoleControl(ports)
        features |= CONSOLE_F_MULTIPORT
        queues += [(CONTROL_RX, -1), (CONTROL_TX, -1)]
        for port in ports:
            queues += [(lib.HOSTEL_WORK_CONSOLE_RX, port.input_fd),
                       (lib.HOSTEL_WORK_CONSOLE_TX, port.output_fd)]
    config = struct.pack("<HHI", 80, 25, 1 + len(ports))  # cols, rows, max_nr_ports
    return Device("console", VIRTIO_ID_CONSOLE, queues, features, config, control=control)


def block_device(path: Path, read_only: bool, index: int) -> Device:
    """virtio-blk backed by a file; the data path is preadv/pwritev in the worker."""
    try:
        fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
    except OSError as e:
        raise GuestError(f"cannot open block device file {path}: {e.strerror}") from e
    size = os.fstat(fd).st_size
    capacity = size // SECTOR
    features = F_VERSION_1 | F_RING_EVENT_IDX | BLK_F_FLUSH | (BLK_F_RO if read_only else 0)
    serial = f"hostel-blk{index}".encode()[:20]
    return Device(f"block:{path}", VIRTIO_ID_BLOCK, [(lib.HOSTEL_WORK_BLK, fd)], features,
                  struct.pack("<Q", capacity), read_only, capacity, serial, [fd])


def rng_device() -> Device:
    """virtio-rng: getrandom() straight into the guest's buffers."""
    return Device("rng", VIRTIO_ID_RNG, [(lib.HOSTEL_WORK_RNG, -1)])


def net_device(tap_fd: int, mac: bytes) -> Device:
    """virtio-net on a tap opened with IFF_VNET_HDR: frames pass through with their header."""
    return Device("net", VIRTIO_ID_NET,
                  [(lib.HOSTEL_WORK_NET_RX, tap_fd), (lib.HOSTEL_WORK_NET_TX, tap_fd)],
                  F_VERSION_1 | F_RING_EVENT_IDX | NET_F_MAC, mac + struct.pack("<H", 1),
                  owned_fds=[tap_fd])
