"""The C virtqueue (bindings/vring.c) against malicious and random rings.

Every ring here is written by a Python driver into real guest memory (a
memfd) and popped by the C device side through cffi. The hypothesis test
compares the C with a small reference model of the spec's rules, so a
wrong acceptance is caught as surely as a crash."""
from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from hostel._vmm import ffi, lib
from hostel.guest.memory import GuestMemory
from hostel.guest.ringdriver import F_INDIRECT, F_NEXT, F_WRITE, Desc, RingDriver
from hostel.guest.virtqueue import RingLayout, Virtqueue, Worker, legacy_layout

MEM = 1 << 20
NUM = 8
LAYOUT = RingLayout(NUM, 0x1000, 0x2000, 0x3000)
DATA = 0x10000


@pytest.fixture
def mem():
    with GuestMemory(MEM) as m:
        yield m


def ring(mem: GuestMemory, event_idx: bool = False) -> tuple[RingDriver, Virtqueue]:
    driver = RingDriver(mem, LAYOUT)
    return driver, Virtqueue(mem, LAYOUT, event_idx)


def test_a_chain_is_split_into_readable_then_writable_buffers(mem: GuestMemory) -> None:
    driver, vq = ring(mem)
    mem.write(DATA, b"request!")
    driver.offer(driver.chain(2, [Desc(DATA, 8), Desc(DATA + 8, 4, F_WRITE),
                                  Desc(DATA + 12, 1, F_WRITE)]))
    head, out, ins = vq.pop()
    assert head == 2 and out == [b"request!"] and ins == [(DATA + 8, 4), (DATA + 12, 1)]
    assert vq.pop() is None and not vq.broken
    assert vq.push(head, 5)
    assert driver.used() == [(2, 5)]


def test_the_ring_wraps_around_the_16_bit_index(mem: GuestMemory) -> None:
    driver, vq = ring(mem)
    for round_ in range(3 * NUM):
        driver.offer(driver.chain(round_ % NUM, [Desc(DATA, 4)]))
        head, _out, _ins = vq.pop()
        vq.push(head, 0)
    assert [h for h, _ in driver.used()] == [r % NUM for r in range(3 * NUM)]
    assert not vq.broken


MALICIOUS = [
    pytest.param([Desc(DATA, 4, F_NEXT, 0)], 0, "CHAIN_TOO_LONG", id="self-loop"),
    pytest.param([Desc(DATA, 4, F_NEXT, 1), Desc(DATA, 4, F_NEXT, 0)], 0, "CHAIN_TOO_LONG",
                 id="two-descriptor-loop"),
    pytest.param([Desc(DATA, 4, F_NEXT, NUM)], 0, "BAD_NEXT", id="next-beyond-queue"),
    pytest.param([Desc(MEM - 2, 4)], 0, "BAD_ADDRESS", id="buffer-crosses-end-of-memory"),
    pytest.param([Desc(MEM + 4096, 1)], 0, "BAD_ADDRESS", id="buffer-beyond-memory"),
    pytest.param([Desc((1 << 64) - 8, 16)], 0, "BAD_ADDRESS", id="address-wraps-64-bits"),
    pytest.param([Desc(DATA, 0xFFFFFFFF)], 0, "BAD_ADDRESS", id="huge-length"),
    pytest.param([Desc(DATA, 16, F_INDIRECT)], 0, "INDIRECT", id="indirect-not-negotiated"),
    pytest.param([Desc(DATA, 4, F_WRITE | F_NEXT, 1), Desc(DATA, 4)], 0, "READ_AFTER_WRITE",
                 id="readable-after-writable"),
]


@pytest.mark.parametrize("descs, head, error", MALICIOUS)
def test_malicious_chains_break_the_queue_and_nothing_else(mem: GuestMemory, descs, head, error) -> None:
    driver, vq = ring(mem)
    for i, desc in enumerate(descs):
        driver.set_desc(i, desc)
    driver.offer(head)
    assert vq.pop() is None
    assert vq.broken and vq.error_code == getattr(lib, f"HOSTEL_VQ_{error}")
    assert driver.used() == []
    driver.offer(driver.chain(3, [Desc(DATA, 4)]))
    assert vq.pop() is None, "a broken queue serves nothing more until reset"


def test_a_head_beyond_the_queue_breaks_it(mem: GuestMemory) -> None:
    driver, vq = ring(mem)
    driver.offer(NUM + 3)
    assert vq.pop() is None and vq.error_code == lib.HOSTEL_VQ_BAD_HEAD


def test_an_avail_index_more_than_a_queue_ahead_breaks_it(mem: GuestMemory) -> None:
    driver, vq = ring(mem)
    driver.set_avail_idx(NUM + 1)
    assert vq.pop() is None and vq.error_code == lib.HOSTEL_VQ_BAD_AVAIL_IDX


@pytest.mark.parametrize("layout", [
    RingLayout(NUM, MEM - 64, 0x2000, 0x3000),   # descriptor table past the end
    RingLayout(NUM, 0x1000, 0x2000, MEM - 8),    # used ring past the end
    RingLayout(6, 0x1000, 0x2000, 0x3000),       # not a power of two
    RingLayout(0, 0x1000, 0x2000, 0x3000),
    RingLayout(NUM, 0x1008, 0x2000, 0x3000),     # descriptor table misaligned
    RingLayout(1 << 16, 0x1000, 0x2000, 0x3000),
])
def test_a_bad_ring_layout_is_refused(mem: GuestMemory, layout: RingLayout) -> None:
    vq = Virtqueue(mem, layout)
    assert vq.broken and vq.error_code == lib.HOSTEL_VQ_BAD_LAYOUT
    assert vq.pop() is None


def test_legacy_layout_aligns_the_used_ring() -> None:
    layout = legacy_layout(256, 0x100000, 4096)
    assert (layout.desc, layout.avail) == (0x100000, 0x100000 + 16 * 256)
    assert layout.used == 0x100000 + 0x2000  # 4096 + 518 bytes, rounded up to a page


def test_event_idx_asks_for_interrupts_only_when_the_driver_waits(mem: GuestMemory) -> None:
    driver, vq = ring(mem, event_idx=True)
    for i in range(3):
        driver.offer(driver.chain(i, [Desc(DATA, 4)]))
    driver.set_used_event(1)  # interrupt me once the used index passes 1
    head, *_ = vq.pop()
    vq.push(head, 0)
    assert vq.should_notify()   # the first interrupt always goes out
    head, *_ = vq.pop()
    vq.push(head, 0)            # used idx 2 > used_event 1: crossed since last time
    assert vq.should_notify()
    head, *_ = vq.pop()
    vq.push(head, 0)            # used idx 3: the event was already passed
    assert not vq.should_notify()
    lib.hostel_vring_enable_kicks(vq.c)
    assert driver.avail_event() == 3


def test_no_interrupt_flag_is_honoured_without_event_idx(mem: GuestMemory) -> None:
    driver, vq = ring(mem)
    mem.write(LAYOUT.avail, struct.pack("<H", 1))  # VRING_AVAIL_F_NO_INTERRUPT
    driver.offer(driver.chain(0, [Desc(DATA, 4)]))
    head, *_ = vq.pop()
    vq.push(head, 0)
    assert not vq.should_notify()


BIG = 1 << 30   # sparse memfd: nothing is touched but the rings


@pytest.fixture
def big_mem():
    with GuestMemory(BIG) as m:
        yield m


def test_a_chain_of_more_than_2_to_the_32_bytes_breaks_the_queue(big_mem: GuestMemory) -> None:
    """Five aliased descriptors over the whole 1 GiB: 5 GiB in one chain."""
    driver, vq = ring(big_mem)
    driver.offer(driver.chain(0, [Desc(0, BIG, F_WRITE)] * 5))
    assert vq.pop() is None and vq.error_code == lib.HOSTEL_VQ_CHAIN_TOO_BIG
    assert "2^32" in vq.error


def test_a_chain_of_exactly_2_to_the_32_bytes_is_served(big_mem: GuestMemory) -> None:
    driver, vq = ring(big_mem)
    driver.offer(driver.chain(0, [Desc(0, BIG, F_WRITE)] * 4))
    head, _out, ins = vq.pop()
    assert sum(length for _gpa, length in ins) == 1 << 32 and not vq.broken


def test_an_rng_request_gets_at_most_its_cap_of_random_bytes(mem: GuestMemory) -> None:
    """Aliased descriptors ask for NUM times the buffer; the device stops at the cap."""
    driver, vq = ring(mem)
    size = 1 << 16
    driver.offer(driver.chain(0, [Desc(DATA, size, F_WRITE)] * NUM))
    worker = Worker(vq, lib.HOSTEL_WORK_RNG, -1, -1)
    try:
        assert worker.process() == 1
    finally:
        worker.stop()
    ((head, written),) = driver.used()
    assert head == 0 and written == lib.HOSTEL_RNG_MAX_REQUEST < NUM * size


def test_push_refuses_a_head_beyond_the_queue(mem: GuestMemory) -> None:
    driver, vq = ring(mem)
    assert not vq.push(NUM, 4)
    assert driver.used() == [] and vq.error_code == lib.HOSTEL_VQ_BAD_HEAD


# The reference model --------------------------------------------------------------

def in_ram(regions: list[tuple[int, int]], addr: int, length: int) -> bool:
    """Whether one region of RAM, (gpa, size), holds every byte of the range."""
    return any(gpa <= addr and addr + length <= gpa + size for gpa, size in regions)


def model_pop(descs: list[Desc], head: int, num: int,
              regions: list[tuple[int, int]]) -> str | list[tuple[int, int, bool]]:
    """The spec's rules, plainly: an error name, or the chain as (addr, len, writable)."""
    if head >= num:
        return "BAD_HEAD"
    chain, i, seen_write, total = [], head, False, 0
    while True:
        if len(chain) >= num:
            return "CHAIN_TOO_LONG"
        d = descs[i]
        if d.flags & F_INDIRECT:
            return "INDIRECT"
        if not in_ram(regions, d.addr, d.length):
            return "BAD_ADDRESS"
        total += d.length
        if total > 1 << 32:
            return "CHAIN_TOO_BIG"
        writable = bool(d.flags & F_WRITE)
        if not writable and seen_write:
            return "READ_AFTER_WRITE"
        seen_write |= writable
        chain.append((d.addr, d.length, writable))
        if not d.flags & F_NEXT:
            return chain
        if d.next >= num:
            return "BAD_NEXT"
        i = d.next


def descs_strategy(num: int, mem_size: int) -> st.SearchStrategy[list[Desc]]:
    addr = st.one_of(st.integers(0, mem_size), st.integers(0, (1 << 64) - 1),
                     st.sampled_from([mem_size - 1, mem_size, (1 << 64) - 1]))
    length = st.one_of(st.integers(0, 64), st.integers(0, (1 << 32) - 1))
    flags = st.integers(0, 7)
    nxt = st.one_of(st.integers(0, num - 1), st.integers(0, 0xFFFF))
    return st.lists(st.builds(Desc, addr, length, flags, nxt), min_size=num, max_size=num)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(descs=descs_strategy(NUM, MEM), heads=st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=NUM),
       avail_idx=st.one_of(st.none(), st.integers(0, 0xFFFF)))
def test_random_rings_match_the_model_and_never_escape_memory(mem: GuestMemory, descs, heads,
                                                             avail_idx) -> None:
    driver, vq = ring(mem)
    for i, desc in enumerate(descs):
        driver.set_desc(i, desc)
    for head in heads:
        driver.offer(head)
    if avail_idx is not None:
        driver.set_avail_idx(avail_idx)
    offered = len(heads) if avail_idx is None else avail_idx
    if offered > NUM:
        assert vq.pop() is None and vq.error_code == lib.HOSTEL_VQ_BAD_AVAIL_IDX
        return
    for n in range(offered):
        expected = model_pop(descs, heads[n] if n < len(heads) else 0, NUM, [(0, MEM)])
        got = vq.pop()
        if isinstance(expected, str):
            assert got is None and vq.error_code == getattr(lib, f"HOSTEL_VQ_{expected}")
            return
        assert got is not None, vq.error
        _head, out, ins = got
        assert [len(b) for b in out] == [length for _a, length, w in expected if not w]
        assert ins == [(addr, length) for addr, length, w in expected if w]
    assert vq.pop() is None and not vq.broken


def big_descs_strategy(num: int, mem_size: int) -> st.SearchStrategy[list[Desc]]:
    """Buffers of up to all of a large memory, often aliased: chains near 2^32 bytes."""
    length = st.one_of(st.integers(0, 64), st.integers(mem_size // 2, mem_size),
                       st.just(mem_size))
    flags = st.sampled_from([0, F_NEXT, F_WRITE, F_WRITE | F_NEXT])
    nxt = st.integers(0, num - 1)
    return st.lists(st.builds(Desc, st.just(0), length, flags, nxt), min_size=num, max_size=num)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(descs=big_descs_strategy(NUM, BIG), head=st.integers(0, NUM - 1))
def test_random_large_chains_match_the_model(big_mem: GuestMemory, descs, head) -> None:
    driver, vq = ring(big_mem)
    for i, desc in enumerate(descs):
        driver.set_desc(i, desc)
    driver.offer(head)
    expected = model_pop(descs, head, NUM, [(0, BIG)])
    got = lib.hostel_vring_pop(vq.c, vq.chain)   # not vq.pop(): it would copy GiBs out
    if isinstance(expected, str):
        assert got == -1 and vq.error_code == getattr(lib, f"HOSTEL_VQ_{expected}")
        return
    assert got == 1, vq.error
    chain = vq.chain
    assert (chain.n_out, chain.n_in) == (sum(not w for *_, w in expected), sum(w for *_, w in expected))
    assert [vq.iov[i].iov_len for i in range(len(expected))] == [length for _a, length, _w in expected]


# Guest RAM with gaps ------------------------------------------------------------------

RINGS_END = 0x4000   # LAYOUT's rings lie below this: the first region always holds them


@st.composite
def gapped_regions(draw: st.DrawFn) -> list[tuple[int, int]]:
    """2..4 runs of RAM inside MEM with gaps between them, the first from 0 over the rings
    (the last may be empty, at MEM)."""
    cuts = sorted(draw(st.lists(st.integers(RINGS_END, MEM), min_size=2, max_size=6, unique=True)))
    cuts = [0] + cuts[:len(cuts) // 2 * 2] + [MEM]
    return [(cuts[i], cuts[i + 1] - cuts[i]) for i in range(0, len(cuts) - 1, 2)]


@st.composite
def gapped_layout_rings(draw: st.DrawFn) -> tuple[list[tuple[int, int]], list[Desc]]:
    """Regions, and descriptors whose buffers mostly start or end near a region's edge."""
    regions = draw(gapped_regions())
    edges = sorted({e for gpa, size in regions for e in (gpa, gpa + size)})
    near = st.builds(lambda e, d: max(0, e + d), st.sampled_from(edges), st.integers(-64, 64))
    addr = st.one_of(near, st.integers(0, MEM))
    length = st.one_of(st.integers(0, 128), st.integers(0, MEM))
    flags = st.sampled_from([0, F_NEXT, F_WRITE, F_WRITE | F_NEXT])
    descs = draw(st.lists(st.builds(Desc, addr, length, flags, st.integers(0, NUM - 1)),
                          min_size=NUM, max_size=NUM))
    return regions, descs


def gapped_ring(mem: GuestMemory, regions: list[tuple[int, int]]) -> tuple[RingDriver, Virtqueue]:
    """A queue told that guest RAM is only `regions` of this (fully mapped) memory."""
    driver, vq = ring(mem)
    c_regions = ffi.new("struct hostel_mem_region[]", regions)
    assert lib.hostel_vring_init(vq.c, mem.host, c_regions, len(regions), LAYOUT.num,
                                 LAYOUT.desc, LAYOUT.avail, LAYOUT.used, 0) == 0
    return driver, vq


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=gapped_layout_rings(), head=st.integers(0, NUM - 1))
def test_random_rings_over_gapped_ram_match_the_model(mem: GuestMemory, case, head) -> None:
    """The host mapping spans the gaps, so only the per-region check stands
    between a buffer in a gap and a host access to memory that is not RAM."""
    regions, descs = case
    driver, vq = gapped_ring(mem, regions)
    for i, desc in enumerate(descs):
        driver.set_desc(i, desc)
    driver.offer(head)
    expected = model_pop(descs, head, NUM, regions)
    got = lib.hostel_vring_pop(vq.c, vq.chain)
    if isinstance(expected, str):
        assert got == -1 and vq.error_code == getattr(lib, f"HOSTEL_VQ_{expected}")
        return
    assert got == 1, vq.error
    base = int(ffi.cast("uintptr_t", mem.host))
    assert [(int(ffi.cast("uintptr_t", vq.iov[i].iov_base)) - base, vq.iov[i].iov_len)
            for i in range(len(expected))] == [(a, n) for a, n, _w in expected]


@pytest.mark.parametrize("count", [0, lib.HOSTEL_VQ_MAX_REGIONS + 1])
def test_a_region_count_out_of_range_is_refused(mem: GuestMemory, count: int) -> None:
    vq = Virtqueue(mem, LAYOUT)
    regions = ffi.new("struct hostel_mem_region[]", [(0, MEM)] * max(count, 1))
    assert lib.hostel_vring_init(vq.c, mem.host, regions, count, NUM, LAYOUT.desc,
                                 LAYOUT.avail, LAYOUT.used, 0) == -1
    assert vq.error_code == lib.HOSTEL_VQ_BAD_LAYOUT


def test_a_region_wrapping_64_bits_is_refused(mem: GuestMemory) -> None:
    vq = Virtqueue(mem, LAYOUT)
    regions = ffi.new("struct hostel_mem_region[]", [(0, MEM), (1 << 40, (1 << 64) - (1 << 39))])
    assert lib.hostel_vring_init(vq.c, mem.host, regions, 2, NUM, LAYOUT.desc,
                                 LAYOUT.avail, LAYOUT.used, 0) == -1
    assert vq.error_code == lib.HOSTEL_VQ_BAD_LAYOUT
