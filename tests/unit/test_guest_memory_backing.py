"""Guest RAM's host backing (bindings/guestram.c): private anonymous memory at a
2 MiB-aligned base, advised for transparent huge pages. KVM maps a host huge
page as one 2 MiB guest page only when host and guest addresses agree modulo
2 MiB; with 4 KiB pages each first touch by the guest is a page fault KVM
serves (in the lab, nested: the guest's first read through its page cache ran
at a third of the second's)."""
from __future__ import annotations

from pathlib import Path

from hostel._vmm import ffi, lib
from hostel.guest.memory import GAP_START, HIGH_START, GuestMemory

MiB = 1 << 20
HUGE = 2 * MiB
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def base_of(mem: GuestMemory) -> int:
    return int(ffi.cast("uintptr_t", mem.host))


def smaps_entry(address: int) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping holding `address`."""
    fields: dict[str, str] = {}
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def test_guest_ram_starts_on_a_2_mib_boundary() -> None:
    for size in (2 * MiB + 4096, 64 * MiB, 4 << 30):
        with GuestMemory(size) as mem:
            assert base_of(mem) % HUGE == 0, f"{size}: base {base_of(mem):#x}"
            assert lib.HOSTEL_GUEST_RAM_ALIGN == HUGE


def test_guest_ram_is_private_anonymous_memory_advised_for_huge_pages() -> None:
    with GuestMemory(64 * MiB) as mem:
        mem.write(0, b"\1" * (8 * MiB))
        fields = smaps_entry(base_of(mem))
        assert "hg" in fields["VmFlags"].split(), fields["VmFlags"]   # MADV_HUGEPAGE
        if "[never]" not in THP_ENABLED.read_text():
            assert int(fields["AnonHugePages"].split()[0]) >= 2048, fields


def test_both_sides_of_the_gap_hold_what_is_written() -> None:
    with GuestMemory(4 << 30) as mem:
        mem.write(GAP_START - 4, b"low!")
        mem.write(HIGH_START, b"high")
        assert mem.read(GAP_START - 4, 4) == b"low!" and mem.read(HIGH_START, 4) == b"high"
