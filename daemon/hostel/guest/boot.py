"""The x86 boot area: where the launcher puts the GDT, the identity page
tables, the zero page (boot_params) and the command line, and how it fills them.

Guests enter directly in 64-bit mode (Linux's 64-bit boot protocol), so the
launcher must provide what a 32-bit boot loader stub would have built: flat
code/data descriptors at the selectors Linux expects (0x10, 0x18) and page
tables identity-mapping the low 4 GiB with 2 MiB pages."""
from __future__ import annotations

import struct
from dataclasses import dataclass

from hostel.guest.errors import BadKernel
from hostel.guest.memory import GuestMemory, Region

GDT_GPA = 0x500
ZERO_PAGE_GPA = 0x7000
PML4_GPA = 0x9000
PDPT_GPA = 0xA000
PD_GPA = 0xB000            # four page directories: 0xb000-0xefff
CMDLINE_GPA = 0x20000
CMDLINE_MAX = 4096
STACK_TOP_GPA = 0x80000    # for freestanding guests; Linux sets its own stack
KERNEL_GPA = 0x100000      # bzImage's protected-mode kernel; ELF segments go at or above it
LOW_RAM_END = 0x9FC00      # conventional memory ends where the EBDA would start
IDENTITY_MAP = 4 << 30

RESET_VECTOR_GPA = 0xFFFF0  # F000:FFF0, where a PC's BIOS starts after a reset
# The firmware at the reset vector: `mov al, 1; mov dx, 0x602; out dx, al; hlt; jmp $-1`,
# real-mode code writing the ACPI reset register (acpi.RESET_PORT, RESET_VALUE).
RESET_STUB = bytes([0xB0, 0x01, 0xBA, 0x02, 0x06, 0xEE, 0xF4, 0xEB, 0xFD])

E820_RAM = 1
E820_RESERVED = 2

# boot_params offsets (Documentation/arch/x86/zero-page.rst)
BP_ACPI_RSDP_ADDR = 0x070
BP_E820_ENTRIES = 0x1E8
BP_SETUP_HEADER = 0x1F1
BP_E820_TABLE = 0x2D0
E820_MAX_ENTRIES = 128

_PTE_PRESENT_RW = 0x3
_PDE_HUGE = 0x80
_GDT = [0, 0,
        0x00AF9B000000FFFF,   # 0x10: 64-bit code, present, ring 0
        0x00CF93000000FFFF]   # 0x18: flat data


@dataclass(frozen=True)
class LongModeEntry:
    """What the vCPU needs to start in 64-bit mode."""

    cr3: int
    gdt_base: int
    gdt_limit: int


def write_long_mode_tables(mem: GuestMemory) -> LongModeEntry:
    """GDT and identity page tables for the low 4 GiB (or all of memory, if smaller)."""
    mem.write(GDT_GPA, struct.pack(f"<{len(_GDT)}Q", *_GDT))
    mem.write(PML4_GPA, struct.pack("<Q", PDPT_GPA | _PTE_PRESENT_RW) + bytes(4088))
    pdpt = [PD_GPA + i * 0x1000 | _PTE_PRESENT_RW for i in range(4)]
    mem.write(PDPT_GPA, struct.pack("<4Q", *pdpt) + bytes(4096 - 32))
    pds = struct.pack("<2048Q", *(i << 21 | _PTE_PRESENT_RW | _PDE_HUGE for i in range(2048)))
    mem.write(PD_GPA, pds)
    return LongModeEntry(PML4_GPA, GDT_GPA, len(_GDT) * 8 - 1)


def write_reset_vector(mem: GuestMemory) -> None:
    """Firmware for a guest that jumps to the BIOS to reboot: Linux does (BOOT_BIOS,
    real mode at F000:FFF0) on a hardware-reduced machine without EFI, since it
    then skips the ACPI reset register. The stub asks for the reset instead."""
    mem.write(RESET_VECTOR_GPA, RESET_STUB)


def e820_map(regions: tuple[Region, ...]) -> list[tuple[int, int, int]]:
    """RAM below the EBDA, the legacy hole reserved (the ACPI tables live there), RAM
    from 1 MiB to the MMIO gap, and the RAM above 4 GiB if there is any."""
    low = regions[0]
    return [(0, LOW_RAM_END, E820_RAM),
            (LOW_RAM_END, KERNEL_GPA - LOW_RAM_END, E820_RESERVED),
            (KERNEL_GPA, low.end - KERNEL_GPA, E820_RAM)] + \
        [(r.gpa, r.size, E820_RAM) for r in regions[1:]]


def write_e820(zero_page: bytearray, entries: list[tuple[int, int, int]]) -> None:
    if len(entries) > E820_MAX_ENTRIES:
        raise ValueError(f"{len(entries)} e820 entries; the zero page holds {E820_MAX_ENTRIES}")
    zero_page[BP_E820_ENTRIES] = len(entries)
    for i, (addr, size, kind) in enumerate(entries):
        struct.pack_into("<QQI", zero_page, BP_E820_TABLE + 20 * i, addr, size, kind)


def write_command_line(mem: GuestMemory, cmdline: str, limit: int = CMDLINE_MAX) -> int:
    """Place the NUL-terminated command line; returns its guest address."""
    raw = cmdline.encode()
    if b"\0" in raw:
        raise BadKernel("the kernel command line contains a NUL byte; remove it")
    if len(raw) + 1 > limit:
        raise BadKernel(f"the kernel command line is {len(raw)} bytes; this kernel takes at "
                        f"most {limit - 1}")
    mem.write(CMDLINE_GPA, raw + b"\0")
    return CMDLINE_GPA
