"""The virtio devices: what each offers (id, features, config space, queues)
and which C worker serves each queue with which host descriptor.

The data paths themselves are in bindings/vring.c; a device here is the
description the transport needs, plus the host resources it owns."""
from __future__ import annotations

import fcntl
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

from hostel._vmm import lib

from hostel.guest import hostfiles
from hostel.guest.console import ConsoleControl, Port
from hostel.guest.errors import GuestError

VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_CONSOLE = 3
VIRTIO_ID_RNG = 4

F_VERSION_1 = 1 << 32
F_RING_EVENT_IDX = 1 << 29
BLK_F_SEG_MAX = 1 << 2
BLK_F_RO = 1 << 5
BLK_F_FLUSH = 1 << 9
NET_F_MAC = 1 << 5
CONSOLE_F_MULTIPORT = 1 << 1
# queue kinds served in Python rather than by a C worker
CONTROL_RX = -1
CONTROL_TX = -2
SECTOR = 512
QUEUE_MAX = 256
# Data segments per block request: a whole queue but the header and status
# descriptors (no indirect descriptors). Without VIRTIO_BLK_F_SEG_MAX Linux
# sends one segment per request: readahead split into 4 KiB requests.
BLK_SEG_MAX = QUEUE_MAX - 2


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


def nonblocking_copy(fd: int, write: bool) -> int:
    """A nonblocking descriptor for a console worker's fd, so that a reader who
    stops reading (a suspended terminal, a full pipe) blocks the worker only in
    poll, where its stop eventfd still reaches it.

    A terminal or pipe is reopened through /proc: a file description of our
    own, so the O_NONBLOCK never reaches the client's terminal. A socket cannot
    be reopened: its (shared) description is made nonblocking. A regular file
    never blocks for long, and a second description would write at its own
    offset over the serial port's output: it is used as it is (a dup)."""
    mode = os.fstat(fd).st_mode
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return os.dup(fd)
    if not stat.S_ISSOCK(mode):
        try:
            return os.open(f"/proc/self/fd/{fd}", (os.O_WRONLY if write else os.O_RDONLY)
                           | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError:
            pass  # e.g. no /proc: fall back to the shared description
    copy = os.dup(fd)
    fcntl.fcntl(copy, fcntl.F_SETFL, fcntl.fcntl(copy, fcntl.F_GETFL) | os.O_NONBLOCK)
    return copy


def console_device(output_fd: int, input_fd: int = -1, ports: list[Port] | None = None) -> Device:
    """virtio-console: port 0 is the console (receiveq from input_fd, transmitq to
    output_fd); with more ports it is multiport, with its two control queues.
    The workers get nonblocking copies of the fds (nonblocking_copy), owned here."""
    ports = ports or []
    owned: list[int] = []

    def private(fd: int, write: bool) -> int:
        if fd < 0:
            return fd
        owned.append(nonblocking_copy(fd, write))
        return owned[-1]

    queues = [(lib.HOSTEL_WORK_CONSOLE_RX, private(input_fd, False)),
              (lib.HOSTEL_WORK_CONSOLE_TX, private(output_fd, True))]
    features = F_VERSION_1 | F_RING_EVENT_IDX
    control = None
    if ports:
        control = ConsoleControl(ports)
        features |= CONSOLE_F_MULTIPORT
        queues += [(CONTROL_RX, -1), (CONTROL_TX, -1)]
        for port in ports:
            queues += [(lib.HOSTEL_WORK_CONSOLE_RX, private(port.input_fd, False)),
                       (lib.HOSTEL_WORK_CONSOLE_TX, private(port.output_fd, True))]
    config = struct.pack("<HHI", 80, 25, 1 + len(ports))  # cols, rows, max_nr_ports
    return Device("console", VIRTIO_ID_CONSOLE, queues, features, config, control=control,
                  owned_fds=owned)


def block_device(path: Path, read_only: bool, index: int) -> Device:
    """virtio-blk backed by a file; the data path is preadv/pwritev in the worker.
    Config space: capacity, size_max (not offered: 0), seg_max.
    Only a regular file or a block device has sectors to serve: a FIFO would
    block the open (hostfiles.py), a directory or character device has no size."""
    fd = hostfiles.open_checked(path, os.O_RDONLY if read_only else os.O_RDWR,
                                hostfiles.REGULAR_OR_BLOCK, "disk image",
                                "a regular file (a disk image) or a block device")
    try:
        size = _disk_size(fd)
    except OSError as e:
        os.close(fd)
        raise GuestError(f"cannot find the size of the disk image {path}: {e.strerror}") from e
    capacity = size // SECTOR
    features = (F_VERSION_1 | F_RING_EVENT_IDX | BLK_F_FLUSH | BLK_F_SEG_MAX
                | (BLK_F_RO if read_only else 0))
    serial = f"hostel-blk{index}".encode()[:20]
    return Device(f"block:{path}", VIRTIO_ID_BLOCK, [(lib.HOSTEL_WORK_BLK, fd)], features,
                  struct.pack("<QII", capacity, 0, BLK_SEG_MAX), read_only, capacity, serial, [fd])


def _disk_size(fd: int) -> int:
    """A block device's st_size is 0: its size is where its end is."""
    if stat.S_ISBLK(os.fstat(fd).st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    return os.fstat(fd).st_size


def rng_device() -> Device:
    """virtio-rng: getrandom() straight into the guest's buffers."""
    return Device("rng", VIRTIO_ID_RNG, [(lib.HOSTEL_WORK_RNG, -1)])


def net_device(tap_fd: int, mac: bytes) -> Device:
    """virtio-net on a tap opened with IFF_VNET_HDR: frames pass through with their header."""
    return Device("net", VIRTIO_ID_NET,
                  [(lib.HOSTEL_WORK_NET_RX, tap_fd), (lib.HOSTEL_WORK_NET_TX, tap_fd)],
                  F_VERSION_1 | F_RING_EVENT_IDX | NET_F_MAC, mac + struct.pack("<H", 1),
                  owned_fds=[tap_fd])
