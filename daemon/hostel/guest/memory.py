"""Guest-physical memory: one private anonymous mapping, addressed by guest address.

Anonymous memory, 2 MiB-aligned, with MADV_HUGEPAGE (bindings/guestram.c):
the host then backs guest RAM with transparent huge pages and KVM maps them
as 2 MiB guest pages, so the guest's first touch of its memory costs one
page fault per 2 MiB rather than per 4 KiB (a shared memfd gets no huge
pages on a default host: shmem_enabled is "never").

The guest-physical map has an MMIO gap below 4 GiB, as a PC's does: RAM runs
from 0 to at most GAP_START (where the virtio-mmio windows, the IOAPIC and
the local APIC live) and continues from 4 GiB. The host mapping mirrors it,
so that host address = host base + guest address everywhere (the C side
translates by adding); the gap itself is host memory no memslot covers,
which the guest never reaches through the CPU. A device could still be
handed a buffer there: Python accesses refuse it here, and the virtqueues
are given the same regions (Virtqueue passes them to hostel_vring_init) and
refuse any range not wholly inside one of them."""
from __future__ import annotations

import os
from dataclasses import dataclass

from hostel._vmm import ffi, lib

from hostel.guest.errors import GuestError

PAGE = 4096
GAP_START = 0xD0000000      # 3.25 GiB: the virtio-mmio windows start here
HIGH_START = 1 << 32


@dataclass(frozen=True)
class Region:
    """A run of guest RAM: guest-physical start and length."""

    gpa: int
    size: int

    @property
    def end(self) -> int:
        return self.gpa + self.size


def layout(ram: int) -> tuple[Region, ...]:
    """RAM below the gap, and the rest (if any) from 4 GiB."""
    low = min(ram, GAP_START)
    if ram == low:
        return (Region(0, low),)
    return (Region(0, low), Region(HIGH_START, ram - low))


def host_memory_limit() -> int:
    """The host's RAM (MemTotal): a guest larger than that could never have its pages."""
    with open("/proc/meminfo") as info:
        for line in info:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise GuestError("/proc/meminfo has no MemTotal line")


class GuestMemory:
    """Guest RAM of `size` bytes laid out as layout() says; every access is bounds-checked."""

    def __init__(self, size: int) -> None:
        if size <= 0 or size % PAGE:
            raise GuestError(f"guest memory size {size} is not a positive multiple of {PAGE}")
        limit = host_memory_limit()
        if size > limit:
            raise GuestError(f"guest memory {size >> 20} MiB exceeds this host's "
                             f"{limit >> 20} MiB of RAM; give the guest less")
        self.ram_size = size
        self.regions = layout(size)
        self.size = self.regions[-1].end      # the span of guest-physical addresses
        base = ffi.new("void **")
        err = lib.hostel_guest_ram_map(self.size, base)
        if err < 0:
            raise GuestError(f"cannot map {size >> 20} MiB of guest memory: {os.strerror(-err)}")
        self._base = base[0]
        self.view = memoryview(ffi.buffer(self._base, self.size))
        # the address C (KVM, the virtqueue workers) uses for guest-physical 0
        self.host = ffi.cast("uint8_t *", self._base)

    def check(self, gpa: int, length: int) -> None:
        if gpa < 0 or length < 0 or not any(
                r.gpa <= gpa and gpa + length <= r.end for r in self.regions):
            raise GuestError(f"guest range {gpa:#x}+{length:#x} is outside guest memory "
                             f"(RAM at {self._describe()}); give the guest more memory")

    def _describe(self) -> str:
        return ", ".join(f"{r.gpa:#x}..{r.end:#x}" for r in self.regions)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.check(gpa, len(data))
        self.view[gpa:gpa + len(data)] = data

    def read(self, gpa: int, length: int) -> bytes:
        self.check(gpa, length)
        return bytes(self.view[gpa:gpa + length])

    def zero(self, gpa: int, length: int) -> None:
        self.check(gpa, length)
        self.view[gpa:gpa + length] = bytes(length)

    def to_host(self, gpa: int, length: int) -> object:
        """A C pointer to guest-physical gpa, checked for `length` bytes."""
        self.check(gpa, length)
        return self.host + gpa

    def to_guest(self, host: object) -> int:
        """The guest-physical address of a C pointer into this memory."""
        gpa = int(ffi.cast("uintptr_t", host)) - int(ffi.cast("uintptr_t", self.host))
        self.check(gpa, 0)
        return gpa

    def close(self) -> None:
        if self.host is None:
            return
        self.host = None
        self.view.release()
        lib.hostel_guest_ram_unmap(self._base, self.size)

    def __enter__(self) -> "GuestMemory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
