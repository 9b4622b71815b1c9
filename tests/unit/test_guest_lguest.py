"""The lguest backend's request encoding, run-loop meanings, and its refusal
on kernels without /dev/lguest (every kernel since 4.14)."""
from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import pytest

from guests.build import build
from hostel.guest import lguest
from hostel.guest.errors import BackendUnavailable, GuestError
from hostel.guest.launcher import Launcher
from hostel.guest.settings import GuestSettings


def words(data: bytes) -> tuple[int, ...]:
    return struct.unpack(f"<{len(data) // 4}I", data)


def test_initialize_carries_base_page_limit_and_entry() -> None:
    data = lguest.initialize(0x40000000, 64 << 20, 0x100000)
    assert words(data) == (0, 0x40000000, (64 << 20) // 4096, 0x100000)


@pytest.mark.parametrize("data, expected", [
    (lguest.irq(9), (2, 9)),
    (lguest.eventfd(0xD0000050, 7), (4, 0xD0000050, 7)),
    (lguest.getreg(0x30), (5, 0x30)),
    (lguest.setreg(0x30, 0xDEADBEEF), (6, 0x30, 0xDEADBEEF)),
    (lguest.trap(13), (7, 13)),
])
def test_requests_are_unsigned_longs_of_a_32_bit_host(data: bytes, expected: tuple[int, ...]) -> None:
    assert words(data) == expected and len(data) == 4 * len(expected)


def test_values_a_32_bit_host_cannot_hold_are_refused() -> None:
    with pytest.raises(GuestError, match="does not fit in 4 bytes"):
        lguest.initialize(0x7F0000000000, 64 << 20, 0x100000)
    assert struct.unpack("<2Q", lguest.encode(lguest.LHREQ_IRQ, 1 << 40, word=8)) == (2, 1 << 40)


def test_run_results_mean_what_the_seed_says() -> None:
    assert lguest.interpret_run(struct.pack("<I", 0xD0000050)) == lguest.RunResult("notify", 0xD0000050)
    assert lguest.interpret_run(None, errno.ENOENT).kind == "dead"
    assert lguest.interpret_run(None, lguest.ERESTART).kind == "restart"
    with pytest.raises(GuestError, match="Invalid argument"):
        lguest.interpret_run(None, errno.EINVAL)
    with pytest.raises(GuestError, match="a 2-byte read"):
        lguest.interpret_run(b"ab")


@pytest.mark.skipif(os.path.exists(lguest.DEVICE), reason="this kernel has /dev/lguest")
def test_a_missing_device_is_explained(tmp_path: Path) -> None:
    kernel = build("hello", tmp_path)  # a kernel the loader takes: the backend is next
    with pytest.raises(BackendUnavailable) as info:
        Launcher(GuestSettings(memory_mb=8, kernel=kernel, backend="lguest"), 1)
    message = str(info.value)
    assert "/dev/lguest does not exist" in message and "4.14" in message
    assert "32-bit" in message and "--backend=kvm" in message
