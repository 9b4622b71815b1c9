"""Guest RAM split around the MMIO gap below 4 GiB, as the virtqueues see it.

The host mapping of a guest larger than the gap's start spans the gap (host
address = base + guest address everywhere), so the host could read the gap's
anonymous pages: only the device side's per-region check keeps a buffer
that starts in the gap, or runs from low RAM into it, from being served. The
memory here is a real guest layout (4 GiB: 3.25 GiB low, 768 MiB from 4 GiB),
a sparse memfd of which nothing but the rings and a few pages is touched."""
from __future__ import annotations

import pytest

from hostel._vmm import lib
from hostel.guest.memory import GAP_START, HIGH_START, GuestMemory, Region, layout
from hostel.guest.ringdriver import F_WRITE, Desc, RingDriver
from hostel.guest.virtqueue import RingLayout, Virtqueue, Worker

GiB = 1 << 30
RAM = 4 * GiB
HIGH_END = HIGH_START + RAM - GAP_START
NUM = 8
LAYOUT = RingLayout(NUM, 0x1000, 0x2000, 0x3000)


@pytest.fixture(scope="module")
def mem():
    with GuestMemory(RAM) as m:
        yield m


def ring(mem: GuestMemory, layout: RingLayout = LAYOUT) -> tuple[RingDriver, Virtqueue]:
    return RingDriver(mem, layout), Virtqueue(mem, layout)


def test_a_4_gib_guest_has_low_ram_to_the_gap_and_the_rest_from_4_gib(mem: GuestMemory) -> None:
    assert mem.regions == layout(RAM) == (Region(0, GAP_START), Region(HIGH_START, RAM - GAP_START))
    assert mem.size == HIGH_END


REFUSED = [
    pytest.param(GAP_START + 0x1000, 16, id="starts-in-the-gap"),
    pytest.param(GAP_START, 1, id="first-byte-of-the-gap"),
    pytest.param(GAP_START - 8, 16, id="spans-end-of-low-ram-into-the-gap"),
    pytest.param(GAP_START - 0x1000, 0x40000000, id="runs-from-low-ram-through-the-gap-to-high-ram"),
    pytest.param(HIGH_START - 16, 32, id="spans-from-the-gap-into-high-ram"),
    pytest.param(HIGH_START - 16, 16, id="ends-exactly-at-4-gib"),
    pytest.param(HIGH_END - 8, 16, id="crosses-the-end-of-high-ram"),
    pytest.param(HIGH_END, 1, id="beyond-high-ram"),
]


@pytest.mark.parametrize("addr, length", REFUSED)
def test_a_buffer_in_or_across_the_gap_breaks_the_queue(mem: GuestMemory, addr: int, length: int) -> None:
    driver, vq = ring(mem)
    driver.offer(driver.chain(0, [Desc(addr, length, F_WRITE)]))
    assert vq.pop() is None
    assert vq.error_code == lib.HOSTEL_VQ_BAD_ADDRESS and "MMIO gap" in vq.error
    assert driver.used() == []


ACCEPTED = [
    pytest.param(GAP_START - 16, 16, id="ends-exactly-at-the-end-of-low-ram"),
    pytest.param(HIGH_START, 4096, id="starts-at-4-gib-in-high-ram"),
    pytest.param(HIGH_END - 16, 16, id="ends-exactly-at-the-end-of-high-ram"),
]


@pytest.mark.parametrize("addr, length", ACCEPTED)
def test_a_buffer_wholly_in_one_region_is_served_where_the_guest_put_it(
        mem: GuestMemory, addr: int, length: int) -> None:
    """The rng worker fills the buffer; the bytes show at that guest address."""
    driver, vq = ring(mem)
    mem.zero(addr, length)
    driver.offer(driver.chain(0, [Desc(addr, length, F_WRITE)]))
    worker = Worker(vq, lib.HOSTEL_WORK_RNG, -1, -1)
    try:
        assert worker.process() == 1, vq.error
    finally:
        worker.stop()
    assert driver.used() == [(0, length)] and not vq.broken
    assert mem.read(addr, length) != bytes(length)


def test_a_ring_placed_in_the_gap_is_refused(mem: GuestMemory) -> None:
    vq = Virtqueue(mem, RingLayout(NUM, GAP_START + 0x1000, 0x2000, 0x3000))
    assert vq.error_code == lib.HOSTEL_VQ_BAD_LAYOUT


def test_a_ring_straddling_the_end_of_low_ram_is_refused(mem: GuestMemory) -> None:
    vq = Virtqueue(mem, RingLayout(NUM, 0x1000, 0x2000, GAP_START - 16))
    assert vq.error_code == lib.HOSTEL_VQ_BAD_LAYOUT


def test_a_ring_in_high_ram_works(mem: GuestMemory) -> None:
    high = RingLayout(NUM, HIGH_START, HIGH_START + 0x1000, HIGH_START + 0x2000)
    driver, vq = ring(mem, high)
    driver.offer(driver.chain(0, [Desc(HIGH_START + 0x3000, 8)]))
    head, out, ins = vq.pop()
    assert (head, len(out[0]), ins) == (0, 8, []) and not vq.broken


def test_python_accesses_refuse_the_gap_too(mem: GuestMemory) -> None:
    with pytest.raises(Exception, match="outside guest memory"):
        mem.read(GAP_START - 8, 16)
    with pytest.raises(Exception, match="outside guest memory"):
        mem.write(GAP_START + 4096, b"x")
