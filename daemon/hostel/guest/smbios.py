"""The SMBIOS (DMI) tables the launcher gives a guest: who made the "firmware"
and when, and what the machine is.

Why a guest needs them: Linux trusts PCI configuration mechanism 1 on a bus 0
with nothing on it only when DMI dates the BIOS 2001 or later
(arch/x86/pci/direct.c, pci_sanity_check); without a date it looks on bus 0
for a host bridge, finds none (the launcher has no PCI device) and is left
with no config space access ("PCI: Fatal: No config space access function
found"). DMI also names the machine ("DMI: hostel hostel guest, BIOS ...")
where Linux said "DMI not present or invalid".

Without EFI, Linux finds the tables by scanning 0xF0000-0xFFFFF for an
anchor on a 16-byte boundary; the SMBIOS 3.0 (64-bit) entry point "_SM3_"
comes first, then the structures it points at: BIOS information (type 0),
system information (type 1), end of table (type 127). All of it lies in the
reserved part of the e820 map, above the ACPI tables (acpi.py, from 0xE0000)
and below the reset vector (boot.py, 0xFFFF0)."""
from __future__ import annotations

import struct

from hostel.guest.memory import GuestMemory

ENTRY_POINT_GPA = 0xF0000
STRUCTURES_GPA = ENTRY_POINT_GPA + 0x20
STRUCTURES_END = 0xF1000
VENDOR = "hostel"
BIOS_VERSION = "1"
# When this firmware took its form; Linux compares only the year (>= 2001).
BIOS_RELEASE_DATE = "12/02/2026"
PRODUCT = "hostel guest"

TYPE_BIOS = 0
TYPE_SYSTEM = 1
TYPE_END = 127
BIOS_CHARACTERISTICS_UNSUPPORTED = 1 << 3
BIOS_EXT2_VIRTUAL_MACHINE = 1 << 4     # "SMBIOS table describes a virtual machine"
WAKE_UP_POWER_SWITCH = 6


def structure(kind: int, handle: int, formatted: bytes, strings: list[str]) -> bytes:
    """One structure: header, formatted area, then its strings (numbered from 1 in the
    formatted area), each NUL-terminated, the set ended by one more NUL."""
    header = struct.pack("<BBH", kind, 4 + len(formatted), handle)
    text = b"".join(s.encode() + b"\0" for s in strings) or b"\0"
    return header + formatted + text + b"\0"


def bios_information() -> bytes:
    """Type 0 (SMBIOS 2.4 layout): vendor 1, version 2, release date 3."""
    formatted = struct.pack("<BBHBBQBBBBBB", 1, 2, 0, 3, 0, BIOS_CHARACTERISTICS_UNSUPPORTED,
                            0, BIOS_EXT2_VIRTUAL_MACHINE, 1, 0, 0xFF, 0xFF)
    return structure(TYPE_BIOS, 0, formatted, [VENDOR, BIOS_VERSION, BIOS_RELEASE_DATE])


def system_information() -> bytes:
    """Type 1 (SMBIOS 2.4 layout): manufacturer 1, product 2; no version, serial,
    UUID (all zero: "not present"), SKU or family."""
    formatted = struct.pack("<BBBB16sBBB", 1, 2, 0, 0, bytes(16), WAKE_UP_POWER_SWITCH, 0, 0)
    return structure(TYPE_SYSTEM, 1, formatted, [VENDOR, PRODUCT])


def structures() -> bytes:
    return bios_information() + system_information() + structure(TYPE_END, 2, b"", [])


def entry_point(table_gpa: int, table_size: int) -> bytes:
    """The SMBIOS 3.0 entry point: anchor, checksum (all 24 bytes sum to 0),
    length, version 3.0.0, revision 1, the structures' maximum size and address."""
    body = bytearray(struct.pack("<5sBBBBBBBIQ", b"_SM3_", 0, 24, 3, 0, 0, 1, 0,
                                 table_size, table_gpa))
    body[5] = -sum(body) & 0xFF
    return bytes(body)


def write_tables(mem: GuestMemory) -> int:
    """Write the entry point and the structures; returns the entry point's address."""
    table = structures()
    if STRUCTURES_GPA + len(table) > STRUCTURES_END:
        raise ValueError(f"the SMBIOS structures ({len(table)} bytes) do not fit below "
                         f"{STRUCTURES_END:#x}")
    mem.write(STRUCTURES_GPA, table)
    mem.write(ENTRY_POINT_GPA, entry_point(STRUCTURES_GPA, len(table)))
    return ENTRY_POINT_GPA
