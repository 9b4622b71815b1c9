"""The launcher's ACPI tables and AML, checked byte-wise and by a real parser:
ACPICA's disassembler (`iasl -d`, Debian's acpica-tools, which make setup
installs) must read back exactly the devices, interrupts and registers the
launcher meant."""
from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from hostel._vmm import lib
from hostel.guest import acpi, aml, boot
from hostel.guest.memory import GuestMemory

DEVICES = [acpi.MmioDeviceInfo(0xD0000000 + i * 0x1000, 0x1000, irq)
           for i, irq in enumerate((5, 6, 7, 9))]


def disassemble(table: bytes, tmp_path: Path, name: str) -> str:
    iasl = shutil.which("iasl")
    assert iasl, "iasl is missing: install acpica-tools ('make setup' does)"
    raw = tmp_path / f"{name}.dat"
    raw.write_bytes(table)
    done = subprocess.run([iasl, "-d", str(raw)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    return (tmp_path / f"{name}.dsl").read_text()


def field(dsl: str, label: str) -> str:
    found = re.search(rf"{re.escape(label)} : (.*)", dsl)
    assert found, f"no {label!r} in:\n{dsl}"
    return found.group(1).strip()


@pytest.mark.parametrize("make", [lambda: acpi.dsdt(DEVICES), lambda: acpi.fadt(0xE0040),
                                  lambda: acpi.madt(3), lambda: acpi.xsdt([0xE0040, 0xE0100])])
def test_every_table_sums_to_zero(make) -> None:
    table = make()
    assert sum(table) % 256 == 0
    assert struct.unpack_from("<I", table, 4)[0] == len(table)


def test_rsdp_checksums_and_points_at_the_xsdt() -> None:
    blob = acpi.build(2, DEVICES)
    rsdp = blob[:36]
    assert rsdp[:8] == b"RSD PTR " and rsdp[15] == 2
    assert sum(rsdp[:20]) % 256 == 0 and sum(rsdp) % 256 == 0
    xsdt_gpa = struct.unpack_from("<Q", rsdp, 24)[0]
    xsdt = blob[xsdt_gpa - acpi.RSDP_GPA:]
    assert xsdt[:4] == b"XSDT"
    entries = struct.unpack_from("<2Q", xsdt, 36)
    assert [blob[e - acpi.RSDP_GPA:e - acpi.RSDP_GPA + 4] for e in entries] == [b"FACP", b"APIC"]
    fadt = blob[entries[0] - acpi.RSDP_GPA:]
    dsdt_gpa = struct.unpack_from("<Q", fadt, 140)[0]
    assert blob[dsdt_gpa - acpi.RSDP_GPA:][:4] == b"DSDT"


def test_dsdt_parses_to_one_virtio_device_per_window_and_s5(tmp_path: Path) -> None:
    dsl = disassemble(acpi.dsdt(DEVICES), tmp_path, "dsdt")
    assert dsl.count('Name (_HID, "LNRO0005")') == len(DEVICES)
    for dev in DEVICES:
        assert re.search(rf"Memory32Fixed \(ReadWrite,\s+0x{dev.base:08X},\s+// Address Base\s+"
                         rf"0x{dev.size:08X},", dsl), dsl
        assert re.search(rf"Interrupt \(ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, \)\s+"
                         rf"\{{\s+0x{dev.irq:08X},", dsl), dsl
    assert 'Name (_HID, "QEMU0001")' in dsl and "IO (Decode16,\n" in dsl.replace("\r", "")
    assert re.search(r"Name \(\\_S5, Package \(0x04\)[^{]*\{\s+0x05,", dsl), dsl


def test_fadt_is_hardware_reduced_with_the_launchers_power_registers(tmp_path: Path) -> None:
    dsl = disassemble(acpi.fadt(0xE0040), tmp_path, "facp")
    assert field(dsl, "Hardware Reduced (V5)") == "1"
    assert field(dsl, "Reset Register Supported (V2)") == "1"
    assert field(dsl, "Value to cause reset") == f"{lib.HOSTEL_ACPI_RESET_VALUE:02X}"
    addresses = re.findall(r"\] +Address : ([0-9A-F]{16})", dsl)
    spaces = re.findall(r"\] +Space ID : (.*)", dsl)
    registers = {int(a, 16) for a, s in zip(addresses, spaces) if "SystemIO" in s}
    assert registers == {lib.HOSTEL_ACPI_RESET_PORT, lib.HOSTEL_ACPI_SLEEP_CONTROL_PORT,
                         lib.HOSTEL_ACPI_SLEEP_STATUS_PORT}
    assert field(dsl, "DSDT Address").endswith("000E0040")
    assert "Incorrect checksum" not in dsl


def test_madt_has_a_local_apic_per_vcpu_and_the_ioapic(tmp_path: Path) -> None:
    dsl = disassemble(acpi.madt(4), tmp_path, "apic")
    assert re.findall(r"Local Apic ID : ([0-9A-F]+)", dsl) == ["00", "01", "02", "03"]
    assert re.findall(r"Processor Enabled : (\d)", dsl) == ["1"] * 4
    assert field(dsl, "Subtable Type").startswith("00")
    assert "[I/O APIC]" in dsl and re.search(r"Address : FEC00000", dsl)
    assert field(dsl, "Local Apic Address") == "FEE00000"
    with pytest.raises(ValueError, match="1..254"):
        acpi.madt(0)


def test_the_c_loop_answers_the_ports_the_tables_name() -> None:
    assert (acpi.SLEEP_CONTROL_PORT, acpi.SLEEP_STATUS_PORT, acpi.RESET_PORT, acpi.RESET_VALUE,
            acpi.S5_SLEEP_TYPE, acpi.PVPANIC_PORT) == (
        lib.HOSTEL_ACPI_SLEEP_CONTROL_PORT, lib.HOSTEL_ACPI_SLEEP_STATUS_PORT,
        lib.HOSTEL_ACPI_RESET_PORT, lib.HOSTEL_ACPI_RESET_VALUE, lib.HOSTEL_ACPI_S5_TYPE,
        lib.HOSTEL_PVPANIC_PORT)


def test_the_reset_vector_stub_writes_the_acpi_reset_register() -> None:
    stub = boot.RESET_STUB
    assert stub[:2] == bytes([0xB0, acpi.RESET_VALUE])                 # mov al, value
    assert stub[2] == 0xBA and int.from_bytes(stub[3:5], "little") == acpi.RESET_PORT
    assert stub[5] == 0xEE                                             # out dx, al
    assert boot.RESET_VECTOR_GPA + len(stub) <= 0x100000
    with GuestMemory(64 << 20) as mem:
        boot.write_reset_vector(mem)
        assert mem.read(0xFFFF0, len(stub)) == stub


def test_tables_land_in_the_reserved_bios_area() -> None:
    with GuestMemory(64 << 20) as mem:
        assert acpi.write_tables(mem, 1, DEVICES) == acpi.RSDP_GPA
        assert mem.read(acpi.RSDP_GPA, 8) == b"RSD PTR "
    with pytest.raises(ValueError, match="do not fit"):
        acpi.build(1, [DEVICES[0]] * 4000)


@pytest.mark.parametrize("length, encoded", [
    (0, b"\x01"), (62, b"\x3f"), (63, b"\x41\x04"), (4093, b"\x4f\xff"), (4094, b"\x81\x00\x01"),
])
def test_pkg_length_counts_itself(length: int, encoded: bytes) -> None:
    assert aml.pkg_length(length) == encoded


def test_aml_refuses_what_it_cannot_encode() -> None:
    for bad in ("", "TOOLONG", "1ABC", "ab"):
        with pytest.raises(aml.AmlError):
            aml.name_seg(bad)
    with pytest.raises(aml.AmlError):
        aml.integer(-1)
    with pytest.raises(aml.AmlError):
        aml.memory32_fixed(0xFFFFF000, 0x2000)
    with pytest.raises(aml.AmlError):
        aml.string("caf\u00e9")
    assert aml.integer(0x1234) == b"\x0b\x34\x12" and aml.integer(1 << 40)[0] == aml.QWORD_PREFIX
    assert aml.name_string("\\_SB.V000") == b"\\\x2e_SB_V000"
