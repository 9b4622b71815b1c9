"""virtio-mmio register emulation, driven directly (as a guest's MMIO exits
would be) against a real KVM VM, so queue wiring uses real ioeventfds/irqfds."""
from __future__ import annotations

import fcntl
import os
import struct
import termios
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from hostel.guest import devices, mmio
from hostel.guest.kvm import KvmBackend
from hostel.guest.memory import GuestMemory
from hostel.guest.ringdriver import Desc, RingDriver
from hostel.guest.virtqueue import RingLayout

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="no /dev/kvm on this host")

BASE = 0xD0000000


@pytest.fixture
def vm() -> Iterator[tuple[GuestMemory, KvmBackend]]:
    mem = GuestMemory(4 << 20)
    backend = KvmBackend(-1)
    try:
        backend.setup(mem)
        yield mem, backend
    finally:
        backend.close()
        mem.close()


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk"
    path.write_bytes(bytes(4096))
    return path


def make(vm, device: devices.Device, irq: int = 5) -> mmio.MmioDevice:
    mem, backend = vm
    return mmio.MmioDevice(device, BASE, irq, mem, backend)


def r32(dev: mmio.MmioDevice, offset: int) -> int:
    return struct.unpack("<I", dev.read(offset, 4))[0]


def w32(dev: mmio.MmioDevice, offset: int, value: int) -> None:
    dev.write(offset, struct.pack("<I", value))


ACK_DRIVER = mmio.S_ACKNOWLEDGE | mmio.S_DRIVER
NEGOTIATED = ACK_DRIVER | mmio.S_FEATURES_OK
LIVE = NEGOTIATED | mmio.S_DRIVER_OK


def negotiate(dev: mmio.MmioDevice, features: int = devices.F_VERSION_1) -> None:
    """A driver's first steps: acknowledge, driver, features, FEATURES_OK."""
    w32(dev, mmio.STATUS, mmio.S_ACKNOWLEDGE)
    w32(dev, mmio.STATUS, ACK_DRIVER)
    for sel in (0, 1):
        w32(dev, mmio.DRIVER_FEATURES_SEL, sel)
        w32(dev, mmio.DRIVER_FEATURES, (features >> (32 * sel)) & 0xFFFFFFFF)
    w32(dev, mmio.STATUS, NEGOTIATED)


def configure_queue(dev: mmio.MmioDevice, num: int, desc: int) -> None:
    """What a driver writes to set up queue 0 (driver and device rings at fixed places)."""
    if not dev.status:
        negotiate(dev)
    w32(dev, mmio.QUEUE_SEL, 0)
    w32(dev, mmio.QUEUE_NUM, num)
    w32(dev, mmio.QUEUE_DESC_LOW, desc)
    w32(dev, mmio.QUEUE_DRIVER_LOW, 0x2000)
    w32(dev, mmio.QUEUE_DEVICE_LOW, 0x3000)
    w32(dev, mmio.QUEUE_READY, 1)


def features(dev: mmio.MmioDevice) -> int:
    w32(dev, mmio.DEVICE_FEATURES_SEL, 0)
    low = r32(dev, mmio.DEVICE_FEATURES)
    w32(dev, mmio.DEVICE_FEATURES_SEL, 1)
    return low | r32(dev, mmio.DEVICE_FEATURES) << 32


def test_identity_registers(vm) -> None:
    dev = make(vm, devices.rng_device())
    try:
        assert [r32(dev, off) for off in (0, 4, 8)] == [0x74726976, 2, devices.VIRTIO_ID_RNG]
        assert dev.cmdline == "virtio_mmio.device=4K@0xd0000000:5"
    finally:
        dev.close()


def test_block_features_and_config(vm, disk: Path) -> None:
    dev = make(vm, devices.block_device(disk, True, 0))
    try:
        offered = features(dev)
        assert offered & devices.F_VERSION_1 and offered & devices.BLK_F_RO
        assert offered & devices.BLK_F_FLUSH and offered & devices.F_RING_EVENT_IDX
        assert struct.unpack("<Q", dev.read(mmio.CONFIG, 8))[0] == 8  # 4096 bytes = 8 sectors
        assert dev.read(mmio.CONFIG + 6, 4) == b"\0\0\0\0", "reads past config are zeros"
    finally:
        dev.close()


def test_features_ok_is_refused_for_features_never_offered(vm) -> None:
    dev = make(vm, devices.rng_device())
    try:
        w32(dev, mmio.STATUS, ACK_DRIVER)
        w32(dev, mmio.DRIVER_FEATURES_SEL, 0)
        w32(dev, mmio.DRIVER_FEATURES, 1 << 5)   # not offered by rng
        w32(dev, mmio.STATUS, 1 | 2 | mmio.S_FEATURES_OK)
        assert not r32(dev, mmio.STATUS) & mmio.S_FEATURES_OK
        w32(dev, mmio.STATUS, 0)
        w32(dev, mmio.STATUS, ACK_DRIVER)
        w32(dev, mmio.DRIVER_FEATURES_SEL, 1)
        w32(dev, mmio.DRIVER_FEATURES, 1)        # VERSION_1 only
        w32(dev, mmio.STATUS, 1 | 2 | mmio.S_FEATURES_OK)
        assert r32(dev, mmio.STATUS) & mmio.S_FEATURES_OK
    finally:
        dev.close()


def test_queue_registers(vm) -> None:
    dev = make(vm, devices.console_device(-1))
    try:
        w32(dev, mmio.QUEUE_SEL, 1)
        assert r32(dev, mmio.QUEUE_NUM_MAX) == devices.QUEUE_MAX
        w32(dev, mmio.QUEUE_SEL, 2)          # a console with one port has two queues
        assert r32(dev, mmio.QUEUE_NUM_MAX) == 0
    finally:
        dev.close()


@pytest.mark.parametrize("num, desc", [(6, 0x1000), (1 << 31, 0x1000), (8, 0x3FFFF8)])
def test_a_bad_queue_makes_the_device_need_a_reset(vm, num: int, desc: int) -> None:
    dev = make(vm, devices.rng_device())
    try:
        configure_queue(dev, num, desc)
        assert r32(dev, mmio.STATUS) & mmio.S_DEVICE_NEEDS_RESET
        assert r32(dev, mmio.INTERRUPT_STATUS) & mmio.ISR_CONFIG
        w32(dev, mmio.INTERRUPT_ACK, mmio.ISR_CONFIG)
        assert r32(dev, mmio.INTERRUPT_STATUS) == 0
        w32(dev, mmio.STATUS, 0)
        assert r32(dev, mmio.STATUS) == 0 and r32(dev, mmio.QUEUE_READY) == 0
    finally:
        dev.close()


def test_a_good_queue_starts_a_worker_at_driver_ok_and_reset_stops_it(vm) -> None:
    dev = make(vm, devices.rng_device())
    try:
        configure_queue(dev, 8, 0x1000)
        assert r32(dev, mmio.QUEUE_READY) == 1
        assert dev.queues[0].worker is None, "no worker before the driver says DRIVER_OK"
        w32(dev, mmio.STATUS, LIVE)
        worker = dev.queues[0].worker
        assert worker is not None and worker._thread.is_alive()
        w32(dev, mmio.STATUS, 0)
        assert dev.queues[0].worker is None and not worker._thread
    finally:
        dev.close()


def test_the_bus_floats_high_where_no_device_is(vm) -> None:
    bus = mmio.MmioBus()
    bus.add(make(vm, devices.rng_device()))
    try:
        assert bus.handle(BASE + 0x2000, 4, None) == b"\xff" * 4
        assert bus.handle(BASE, 4, None) == struct.pack("<I", mmio.MAGIC)
    finally:
        bus.close()


@pytest.mark.parametrize("steps", [
    [mmio.S_DRIVER],                                       # DRIVER before ACKNOWLEDGE
    [mmio.S_ACKNOWLEDGE, mmio.S_ACKNOWLEDGE | mmio.S_FEATURES_OK],   # FEATURES_OK before DRIVER
    [mmio.S_ACKNOWLEDGE, ACK_DRIVER, ACK_DRIVER | mmio.S_DRIVER_OK],  # DRIVER_OK before FEATURES_OK
    [mmio.S_ACKNOWLEDGE, ACK_DRIVER, mmio.S_ACKNOWLEDGE],  # clearing a bit without a reset
], ids=["driver-first", "features-ok-before-driver", "driver-ok-before-features-ok", "clear-bit"])
def test_status_transitions_out_of_order_are_rejected(vm, steps: list[int]) -> None:
    dev = make(vm, devices.rng_device())
    try:
        for value in steps[:-1]:
            w32(dev, mmio.STATUS, value)
        before = r32(dev, mmio.STATUS)
        w32(dev, mmio.STATUS, steps[-1])
        assert r32(dev, mmio.STATUS) == before and dev.rejected_writes == 1
    finally:
        dev.close()


def test_failed_can_be_set_at_any_step_and_only_a_reset_clears_it(vm) -> None:
    dev = make(vm, devices.rng_device())
    try:
        w32(dev, mmio.STATUS, ACK_DRIVER)
        w32(dev, mmio.STATUS, mmio.S_FAILED)
        assert r32(dev, mmio.STATUS) == ACK_DRIVER | mmio.S_FAILED
        w32(dev, mmio.STATUS, NEGOTIATED | mmio.S_FAILED)
        w32(dev, mmio.STATUS, NEGOTIATED)
        assert r32(dev, mmio.STATUS) == ACK_DRIVER | mmio.S_FAILED
        w32(dev, mmio.STATUS, 0)
        assert r32(dev, mmio.STATUS) == 0
    finally:
        dev.close()


def test_features_are_writable_only_between_driver_and_features_ok(vm) -> None:
    dev = make(vm, devices.rng_device())
    try:
        w32(dev, mmio.DRIVER_FEATURES_SEL, 1)
        w32(dev, mmio.DRIVER_FEATURES, 1)        # before DRIVER: ignored
        assert dev.driver_features == 0
        negotiate(dev)
        w32(dev, mmio.DRIVER_FEATURES_SEL, 0)
        w32(dev, mmio.DRIVER_FEATURES, 1 << 29)  # after FEATURES_OK: ignored
        assert dev.driver_features == devices.F_VERSION_1 and dev.rejected_writes == 2
    finally:
        dev.close()


def test_queue_registers_are_writable_only_between_features_ok_and_driver_ok(vm) -> None:
    dev = make(vm, devices.rng_device())
    try:
        w32(dev, mmio.QUEUE_SEL, 0)
        w32(dev, mmio.QUEUE_NUM, 8)              # before FEATURES_OK: ignored
        w32(dev, mmio.QUEUE_READY, 1)
        assert r32(dev, mmio.QUEUE_READY) == 0 and dev.queues[0].num == devices.QUEUE_MAX
        negotiate(dev)
        w32(dev, mmio.STATUS, LIVE)
        w32(dev, mmio.QUEUE_NUM, 8)              # after DRIVER_OK: ignored
        w32(dev, mmio.QUEUE_READY, 1)
        assert r32(dev, mmio.QUEUE_READY) == 0 and dev.queues[0].worker is None
        assert dev.rejected_writes == 4
    finally:
        dev.close()


def test_a_live_queue_can_always_be_deactivated(vm) -> None:
    """Linux's virtio-mmio writes QUEUE_READY=0 when it deletes a queue, and warns
    unless it then reads 0, whatever the device status."""
    dev = make(vm, devices.rng_device())
    try:
        configure_queue(dev, 8, 0x1000)
        w32(dev, mmio.STATUS, LIVE)
        assert dev.queues[0].worker is not None
        w32(dev, mmio.QUEUE_READY, 0)
        assert r32(dev, mmio.QUEUE_READY) == 0 and dev.queues[0].worker is None
        assert dev.rejected_writes == 0
    finally:
        dev.close()


def buffered(fd: int) -> int:
    """Bytes waiting in a pipe (FIONREAD)."""
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]


def test_a_reset_returns_while_the_console_reader_is_stalled(vm) -> None:
    """The guest's reset runs on its vCPU thread and joins the workers: a transmit
    worker stuck on a full console pipe (a suspended terminal) must not hang it."""
    mem, _backend = vm
    read_end, write_end = os.pipe()       # blocking, as a terminal or `| less` is
    dev = make(vm, devices.console_device(write_end))
    try:
        negotiate(dev)
        layout = RingLayout(8, 0x1000, 0x2000, 0x3000)
        driver = RingDriver(mem, layout)
        w32(dev, mmio.QUEUE_SEL, 1)       # the transmitq
        w32(dev, mmio.QUEUE_NUM, 8)
        w32(dev, mmio.QUEUE_DESC_LOW, layout.desc)
        w32(dev, mmio.QUEUE_DRIVER_LOW, layout.avail)
        w32(dev, mmio.QUEUE_DEVICE_LOW, layout.used)
        w32(dev, mmio.QUEUE_READY, 1)
        driver.offer(driver.chain(0, [Desc(0x10000, 1 << 18)]))   # 256 KiB: more than a pipe holds
        w32(dev, mmio.STATUS, LIVE)       # the worker starts and serves it
        deadline = time.monotonic() + 5
        while buffered(read_end) == 0 and time.monotonic() < deadline:
            time.sleep(0.01)              # until the worker has filled the pipe
        assert buffered(read_end) > 0, "the transmit worker never started"
        reset = threading.Thread(target=w32, args=(dev, mmio.STATUS, 0), daemon=True)
        reset.start()
        reset.join(5)
        assert not reset.is_alive(), "the reset hung on the console worker"
    finally:
        os.close(read_end)                # unblocks a stuck writer (EPIPE), so close() returns
        dev.close()
        os.close(write_end)
