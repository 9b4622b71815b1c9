"""virtio-mmio (version 2) register emulation: the control path of each device.

The guest reaches these registers through MMIO exits; only queue
notifications bypass them (an ioeventfd per queue), so nothing here is on
the data path.

The device status follows the spec's initialization order, as Firecracker's
MmioTransport enforces it: ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK, each
write keeping the bits already set (several may arrive in one write, in
order); FAILED may be set at any time and 0 resets. Any other write is
rejected (the status stays as it was, and the rejection is counted). Driver
features are writable only between DRIVER and FEATURES_OK, queue registers
only between FEATURES_OK and DRIVER_OK. When the driver marks a queue ready
the transport checks its layout and wires its kick eventfd into KVM; the
workers start at DRIVER_OK, when the driver may use the device. A reset
stops them all."""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

from hostel._vmm import ffi, lib

from hostel.guest.backend import Backend
from hostel.guest.devices import CONTROL_RX, CONTROL_TX, QUEUE_MAX, Device
from hostel.guest.memory import GuestMemory
from hostel.guest.virtqueue import RingLayout, Virtqueue, Worker

MAGIC = 0x74726976          # "virt"
VERSION = 2
VENDOR = 0x4C545348         # "HSTL"
WINDOW = 0x1000

MAGIC_VALUE, VERSION_REG, DEVICE_ID, VENDOR_ID = 0x000, 0x004, 0x008, 0x00C
DEVICE_FEATURES, DEVICE_FEATURES_SEL = 0x010, 0x014
DRIVER_FEATURES, DRIVER_FEATURES_SEL = 0x020, 0x024
QUEUE_SEL, QUEUE_NUM_MAX, QUEUE_NUM, QUEUE_READY = 0x030, 0x034, 0x038, 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS, INTERRUPT_ACK = 0x060, 0x064
STATUS = 0x070
QUEUE_DESC_LOW, QUEUE_DESC_HIGH = 0x080, 0x084
QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH = 0x090, 0x094
QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH = 0x0A0, 0x0A4
CONFIG_GENERATION = 0x0FC
QUEUE_REGISTERS = frozenset({QUEUE_NUM, QUEUE_READY, QUEUE_DESC_LOW, QUEUE_DESC_HIGH,
                             QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH, QUEUE_DEVICE_LOW,
                             QUEUE_DEVICE_HIGH})
CONFIG = 0x100

S_ACKNOWLEDGE = 1
S_DRIVER = 2
S_DRIVER_OK = 4
S_FEATURES_OK = 8
S_DEVICE_NEEDS_RESET = 0x40
S_FAILED = 0x80
# The statuses a driver passes through, in order.
STATUS_STEPS = (S_ACKNOWLEDGE, S_ACKNOWLEDGE | S_DRIVER, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK,
                S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK)
F_RING_EVENT_IDX = 1 << 29
ISR_CONFIG = 2


@dataclass
class QueueState:
    num: int = QUEUE_MAX
    ready: bool = False
    desc: int = 0
    driver: int = 0
    device: int = 0
    vq: Virtqueue | None = None           # built when the driver marks the queue ready
    worker: Worker | None = None          # started at DRIVER_OK
    kick_fd: int = -1


@dataclass
class MmioDevice:
    """One device behind one virtio-mmio window at `base`, raising `irq`."""

    device: Device
    base: int
    irq: int
    mem: GuestMemory
    backend: Backend
    status: int = 0
    device_features_sel: int = 0
    driver_features_sel: int = 0
    driver_features: int = 0
    queue_sel: int = 0
    queues: list[QueueState] = field(default_factory=list)
    call_fd: int = -1
    rejected_writes: int = 0   # status transitions and register writes out of order

    def __post_init__(self) -> None:
        self.queues = [QueueState() for _ in self.device.queues]
        self.isr = ffi.new("uint32_t *")
        self.call_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.backend.add_interrupt(self.irq, self.call_fd)

    @property
    def cmdline(self) -> str:
        """How Linux learns about this device without a device tree or ACPI."""
        return f"virtio_mmio.device=4K@{self.base:#x}:{self.irq}"

    @property
    def broken(self) -> bool:
        return any(q.vq is not None and q.vq.broken for q in self.queues)

    # register access ------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        if offset >= CONFIG:
            config = self.device.config
            start = offset - CONFIG
            return config[start:start + size].ljust(size, b"\0")
        return struct.pack("<I", self._read_reg(offset))[:size]

    def _read_reg(self, offset: int) -> int:
        queue = self._queue()
        if offset == MAGIC_VALUE:
            return MAGIC
        if offset == VERSION_REG:
            return VERSION
        if offset == DEVICE_ID:
            return self.device.device_id
        if offset == VENDOR_ID:
            return VENDOR
        if offset == DEVICE_FEATURES:
            return (self.device.features >> (32 * self.device_features_sel)) & 0xFFFFFFFF \
                if self.device_features_sel < 2 else 0
        if offset == QUEUE_NUM_MAX:
            return QUEUE_MAX if queue is not None else 0
        if offset == QUEUE_READY:
            return int(queue is not None and queue.ready)
        if offset == INTERRUPT_STATUS:
            return self.isr[0]
        if offset == STATUS:
            return self.status | (S_DEVICE_NEEDS_RESET if self.broken else 0)
        return 0  # write-only and reserved registers, CONFIG_GENERATION (config never changes)

    def write(self, offset: int, data: bytes) -> None:
        if offset >= CONFIG or len(data) != 4:
            return  # config space is read-only for these devices; registers are 32-bit
        value = struct.unpack("<I", data)[0]
        queue = self._queue()
        if offset == DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == DRIVER_FEATURES:
            self._write_features(value)
        elif offset == QUEUE_SEL:
            self.queue_sel = value
        elif offset == INTERRUPT_ACK:
            lib.hostel_isr_ack(self.isr, value)
        elif offset == STATUS:
            self._set_status(value)
        elif queue is not None and offset == QUEUE_READY and value == 0:
            self._stop_queue(queue)     # always: Linux deactivates queues it deletes
        elif offset in QUEUE_REGISTERS and not self._in_step(S_FEATURES_OK, S_DRIVER_OK):
            self.rejected_writes += 1   # queues are set up after FEATURES_OK, before DRIVER_OK
        elif queue is not None and not queue.ready:
            self._write_queue(queue, offset, value)

    def _in_step(self, done: int, not_yet: int) -> bool:
        """Whether the driver has set `done` but neither `not_yet` nor FAILED."""
        return bool(self.status & done) and not self.status & (not_yet | S_FAILED)

    def _write_features(self, value: int) -> None:
        if not self._in_step(S_DRIVER, S_FEATURES_OK) or self.driver_features_sel >= 2:
            self.rejected_writes += 1   # features are negotiated after DRIVER, before FEATURES_OK
            return
        shift = 32 * self.driver_features_sel
        self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | value << shift

    def _write_queue(self, queue: QueueState, offset: int, value: int) -> None:
        low = {QUEUE_DESC_LOW: "desc", QUEUE_DRIVER_LOW: "driver", QUEUE_DEVICE_LOW: "device"}
        high = {QUEUE_DESC_HIGH: "desc", QUEUE_DRIVER_HIGH: "driver", QUEUE_DEVICE_HIGH: "device"}
        if offset == QUEUE_NUM:
            queue.num = value
        elif offset in low:
            name = low[offset]
            setattr(queue, name, (getattr(queue, name) & ~0xFFFFFFFF) | value)
        elif offset in high:
            name = high[offset]
            setattr(queue, name, (getattr(queue, name) & 0xFFFFFFFF) | value << 32)
        elif offset == QUEUE_READY and value == 1:
            self._ready_queue(queue)

    def _queue(self) -> QueueState | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def _set_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        if value & S_FAILED:
            self.status |= S_FAILED   # the driver gave up on the device; a reset follows
            return
        if value not in STATUS_STEPS or value & self.status != self.status \
                or self.status & S_FAILED:
            self.rejected_writes += 1  # out of order, or clearing bits without a reset
            return
        added = value & ~self.status
        if added & S_FEATURES_OK and self.driver_features & ~self.device.features:
            # the driver asked for what we never offered: FEATURES_OK stays clear
            value &= ~(S_FEATURES_OK | S_DRIVER_OK)
            added &= ~(S_FEATURES_OK | S_DRIVER_OK)
        self.status = value
        if added & S_DRIVER_OK:
            for queue in self.queues:
                if queue.ready:
                    self._activate_queue(queue)

    # queues -----------------------------------------------------------------------

    def _ready_queue(self, queue: QueueState) -> None:
        """The driver set the queue up: check its layout and wire its kick (the
        kicks accumulate in the eventfd until the worker starts)."""
        index = self.queues.index(queue)
        num = queue.num if 0 < queue.num <= QUEUE_MAX else 0  # 0: refused as a bad layout
        layout = RingLayout(num, queue.desc, queue.driver, queue.device)
        queue.vq = Virtqueue(self.mem, layout, bool(self.driver_features & F_RING_EVENT_IDX))
        queue.kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.backend.add_notify(self.base + QUEUE_NOTIFY, index, queue.kick_fd)
        queue.ready = True
        if queue.vq.broken:
            self._signal_broken()

    def _activate_queue(self, queue: QueueState) -> None:
        """DRIVER_OK: start serving a ready queue (a broken one stays idle)."""
        vq = queue.vq
        if vq is None or vq.broken:
            return
        index = self.queues.index(queue)
        kind, io_fd = self.device.queues[index]
        control = self.device.control
        if control is not None and kind in (CONTROL_RX, CONTROL_TX):
            # a console control queue, served in Python
            control.start_queue(kind == CONTROL_RX, vq, queue.kick_fd, self.call_fd, self.isr)
            return
        queue.worker = Worker(vq, kind, queue.kick_fd, self.call_fd, io_fd,
                              readonly=self.device.readonly, capacity=self.device.capacity,
                              serial=self.device.serial, isr=self.isr)
        queue.worker.start(f"vq-{self.device.name}-{index}")
        os.eventfd_write(queue.kick_fd, 1)  # serve whatever the driver queued before DRIVER_OK

    def _stop_queue(self, queue: QueueState) -> None:
        if queue.worker is not None:
            queue.worker.stop()
            queue.worker = None
        queue.vq = None
        if queue.kick_fd >= 0:
            self.backend.remove_notify(self.base + QUEUE_NOTIFY, self.queues.index(queue),
                                       queue.kick_fd)
            os.close(queue.kick_fd)
            queue.kick_fd = -1
        queue.ready = False

    def _signal_broken(self) -> None:
        lib.hostel_isr_set(self.isr, ISR_CONFIG)
        os.eventfd_write(self.call_fd, 1)

    def reset(self) -> None:
        if self.device.control is not None:
            self.device.control.stop()
        for queue in self.queues:
            self._stop_queue(queue)
        self.queues = [QueueState() for _ in self.device.queues]
        self.status = self.driver_features = self.queue_sel = 0
        self.device_features_sel = self.driver_features_sel = 0
        lib.hostel_isr_ack(self.isr, 0xFFFFFFFF)

    def close(self) -> None:
        self.reset()
        os.close(self.call_fd)
        self.device.close()


class MmioBus:
    """Routes MMIO exits to the device whose window they hit."""

    def __init__(self) -> None:
        self.devices: list[MmioDevice] = []

    def add(self, device: MmioDevice) -> None:
        self.devices.append(device)

    def handle(self, addr: int, size: int, data: bytes | None) -> bytes:
        for dev in self.devices:
            if dev.base <= addr < dev.base + WINDOW:
                if data is None:
                    return dev.read(addr - dev.base, size)
                dev.write(addr - dev.base, data)
                return b""
        return b"\xff" * size  # nothing there: the bus floats high

    def close(self) -> None:
        for dev in self.devices:
            dev.close()
        self.devices.clear()
