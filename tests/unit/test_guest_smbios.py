"""The launcher's SMBIOS tables, read back the way Linux's DMI scan reads them
(drivers/firmware/dmi_scan.c): the "_SM3_" anchor found on a 16-byte boundary
of 0xF0000-0xFFFFF with a checksum of zero, structures walked from the address
it gives up to the end-of-table structure, strings by number. The lab test
(test_guest_linux.py) shows a real kernel reading them: it trusts PCI conf1."""
from __future__ import annotations

import struct

from hostel.guest import acpi, boot, smbios
from hostel.guest.acpi import MAX_CPUS
from hostel.guest.launcher import MMIO_BASE, MMIO_IRQS
from hostel.guest.memory import GuestMemory
from hostel.guest.mmio import WINDOW

SCAN_START, SCAN_END = 0xF0000, 0x100000


def find_entry_point(low_mib: bytes) -> int:
    for addr in range(SCAN_START, SCAN_END - 16, 16):
        if low_mib[addr:addr + 5] == b"_SM3_":
            length = low_mib[addr + 6]
            if length < 32 and sum(low_mib[addr:addr + length]) % 256 == 0:
                return addr
    raise AssertionError("no SMBIOS 3 entry point with a valid checksum in 0xF0000-0xFFFFF")


def walk(table: bytes) -> list[tuple[int, bytes, list[str]]]:
    """(type, formatted area without the header, strings) up to and with type 127."""
    found, at = [], 0
    while at + 4 <= len(table):
        kind, length = table[at], table[at + 1]
        end = table.index(b"\0\0", at + length)
        strings = [s.decode() for s in table[at + length:end].split(b"\0") if s]
        found.append((kind, table[at + 4:at + length], strings))
        at = end + 2
        if kind == smbios.TYPE_END:
            assert at == len(table), "the table's length is exactly its structures"
            return found
    raise AssertionError(f"no end-of-table structure in {found}")


def tables_in_memory() -> bytes:
    mem = GuestMemory(64 << 20)
    try:
        assert smbios.write_tables(mem) == smbios.ENTRY_POINT_GPA
        return mem.read(0, boot.KERNEL_GPA)
    finally:
        mem.close()


def structures_in_memory() -> list[tuple[int, bytes, list[str]]]:
    low = tables_in_memory()
    size, address = struct.unpack_from("<IQ", low, find_entry_point(low) + 12)
    return walk(low[address:address + size])


def test_linux_finds_the_entry_point_and_walks_to_the_end() -> None:
    low = tables_in_memory()
    ep = find_entry_point(low)
    assert tuple(low[ep + 7:ep + 10]) == (3, 0, 0), "SMBIOS 3.0.0"
    assert [kind for kind, _, _ in structures_in_memory()] == [0, 1, 127]


def test_the_bios_is_dated_after_2001_so_linux_trusts_pci_conf1() -> None:
    """pci_sanity_check trusts conf1 on an empty bus 0 when dmi_get_bios_year() >= 2001:
    the year after the last '/' of type 0's release date string."""
    kind, formatted, strings = structures_in_memory()[0]
    assert kind == 0 and len(formatted) + 4 == 0x18
    vendor, version, date = formatted[0], formatted[1], formatted[4]
    assert strings[vendor - 1] == "hostel" and strings[version - 1] == "1"
    assert int(strings[date - 1].rsplit("/", 1)[1]) >= 2001
    assert formatted[15] & smbios.BIOS_EXT2_VIRTUAL_MACHINE


def test_the_system_is_named_with_no_uuid() -> None:
    kind, formatted, strings = structures_in_memory()[1]
    assert kind == 1 and len(formatted) + 4 == 0x1B
    assert [strings[formatted[0] - 1], strings[formatted[1] - 1]] == ["hostel", "hostel guest"]
    assert formatted[4:20] == bytes(16), "an all-zero UUID is Linux's 'not present'"


def test_the_tables_leave_acpi_and_the_reset_vector_alone() -> None:
    """The largest ACPI tables (every vCPU, every device) end below the SMBIOS entry
    point, and the structures below the reset vector's stub."""
    devices = [acpi.MmioDeviceInfo(MMIO_BASE + i * WINDOW, WINDOW, irq)
               for i, irq in enumerate(MMIO_IRQS)]
    assert acpi.RSDP_GPA + len(acpi.build(MAX_CPUS, devices)) <= smbios.ENTRY_POINT_GPA
    assert smbios.STRUCTURES_GPA + len(smbios.structures()) <= smbios.STRUCTURES_END
    assert smbios.STRUCTURES_END <= boot.RESET_VECTOR_GPA
