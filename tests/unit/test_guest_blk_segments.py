"""virtio-blk's segment promise: the device offers VIRTIO_BLK_F_SEG_MAX (else
Linux sends every request as one 4 KiB segment) and its worker then serves a
read of that many segments, header and status around them, in one chain."""
from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from hostel._vmm import lib
from hostel.guest import devices
from hostel.guest.memory import GuestMemory
from hostel.guest.ringdriver import F_WRITE, Desc, RingDriver
from hostel.guest.virtqueue import RingLayout, Virtqueue, Worker

SEGMENT = 4096
LAYOUT = RingLayout(devices.QUEUE_MAX, 0x1000, 0x3000, 0x4000)
HEADER = 0x10000
DATA = 0x20000


@pytest.fixture
def mem():
    with GuestMemory(4 << 20) as m:
        yield m


def test_block_devices_offer_seg_max_of_a_queue_less_header_and_status(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.write_bytes(bytes(8192))
    dev = devices.block_device(disk, False, 0)
    try:
        assert dev.features & devices.BLK_F_SEG_MAX
        capacity, _size_max, seg_max = struct.unpack_from("<QII", dev.config)
        assert (capacity, seg_max) == (16, devices.QUEUE_MAX - 2)
    finally:
        dev.close()


def test_a_read_of_seg_max_segments_is_served_in_one_chain(mem: GuestMemory, tmp_path: Path) -> None:
    segments = devices.BLK_SEG_MAX
    content = os.urandom(segments * SEGMENT)
    disk = tmp_path / "disk"
    disk.write_bytes(content)
    dev = devices.block_device(disk, True, 0)
    driver, vq = RingDriver(mem, LAYOUT), Virtqueue(mem, LAYOUT)
    mem.write(HEADER, struct.pack("<IIQ", 0, 0, 0))      # VIRTIO_BLK_T_IN, sector 0
    status = HEADER + 16
    mem.write(status, b"\xff")
    # every other page: no two segments adjacent, as page-cache pages are
    data = [Desc(DATA + 2 * i * SEGMENT, SEGMENT, F_WRITE) for i in range(segments)]
    driver.offer(driver.chain(0, [Desc(HEADER, 16)] + data + [Desc(status, 1, F_WRITE)]))
    worker = Worker(vq, lib.HOSTEL_WORK_BLK, -1, -1, dev.queues[0][1], readonly=True,
                    capacity=dev.capacity)
    try:
        assert worker.process() == 1, vq.error
    finally:
        worker.stop()
        dev.close()
    assert driver.used() == [(0, segments * SEGMENT + 1)]
    assert mem.read(status, 1) == b"\0"
    got = b"".join(mem.read(d.addr, SEGMENT) for d in data)
    assert got == content
