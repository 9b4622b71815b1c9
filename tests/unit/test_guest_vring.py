"""The C virtqueue (bindings/vring.c) against malicious and random rings.

Every ring here is written by a Python driver into real guest memory (a
memfd) and popped by the C device side through cffi. The hypothesis test
compares the C with a small reference model of the spec's rules, so a
wrong acceptance is caught as surely as a crash."""
from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from hostel._vmm import lib
from hostel.guest.memory import GuestMemory
from hostel.guest.ringdriver import F_INDIRECT, F_NEXT, F_WRITE, Desc, RingDriver
from hostel.guest.virtqueue import RingLayout, Virtqueue, legacy_layout

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
    assert vq.broken and vq.c.error == getattr(lib, f"HOSTEL_VQ_{error}")
    assert driver.used() == []
    driver.offer(driver.chain(3, [Desc(DATA, 4)]))
    assert vq.pop() is None, "a broken queue serves nothing more until reset"


def test_a_head_beyond_the_queue_breaks_it(mem: GuestMemory) -> None:
    driver, vq = ring(mem)
    driver.offer(NUM + 3)
    assert vq.pop() is None and vq.c.error == lib.HOSTEL_VQ_BAD_HEAD


def test_an_avail_index_more_than_a_queue_ahead_breaks_it(mem: GuestMemory) -> None:
    driver, vq = ring(mem)
    driver.set_avail_idx(NUM + 1)
    assert vq.pop() is None and vq.c.error == lib.HOSTEL_VQ_BAD_AVAIL_IDX


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
    assert vq.broken and vq.c.error == lib.HOSTEL_VQ_BAD_LAYOUT
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


# The reference model --------------------------------------------------------------

def model_pop(descs: list[Desc], head: int, num: int, mem_size: int) -> str | list[tuple[int, int, bool]]:
    """The spec's rules, plainly: an error name, or the chain as (addr, len, writable)."""
    if head >= num:
        return "BAD_HEAD"
    chain, i, seen_write = [], head, False
    while True:
        if len(chain) >= num:
            return "CHAIN_TOO_LONG"
        d = descs[i]
        if d.flags & F_INDIRECT:
            return "INDIRECT"
        if d.addr + d.length > mem_size:
            return "BAD_ADDRESS"
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
        assert vq.pop() is None and vq.c.error == lib.HOSTEL_VQ_BAD_AVAIL_IDX
        return
    for n in range(offered):
        expected = model_pop(descs, heads[n] if n < len(heads) else 0, NUM, MEM)
        got = vq.pop()
        if isinstance(expected, str):
            assert got is None and vq.c.error == getattr(lib, f"HOSTEL_VQ_{expected}")
            return
        assert got is not None, vq.error
        _head, out, ins = got
        assert [len(b) for b in out] == [length for _a, length, w in expected if not w]
        assert ins == [(addr, length) for addr, length, w in expected if w]
    assert vq.pop() is None and not vq.broken
