"""The ACPI tables the launcher gives a guest: how a stock kernel learns about
its CPUs, its interrupt controllers, hostel's virtio-mmio devices and how to
power off or reset.

Debian's kernels find virtio-mmio devices only through ACPI (DSDT devices
with _HID "LNRO0005"), not through `virtio_mmio.device=`, so these tables are
what makes a stock kernel see hostel's devices. The platform is "hardware
reduced" (FADT flag): no PM timer, no legacy PIC or SCI, no fixed-feature
registers; the sleep control/status registers and the reset register are
three I/O ports the vCPU loop answers (bindings/kvm.c). As Firecracker does,
the RSDP sits in the BIOS area (where Linux's scan would find it too) and
boot_params.acpi_rsdp_addr points at it.

Layout: RSDP -> XSDT -> {FADT -> DSDT, MADT}, all in the reserved
0xE0000-0xFFFFF window of the e820 map."""
from __future__ import annotations

import struct
from dataclasses import dataclass

from hostel.guest import aml
from hostel.guest.memory import GuestMemory

RSDP_GPA = 0xE0000
TABLES_END = 0x100000
OEM_ID = b"HOSTEL"
OEM_REVISION = 1
CREATOR_ID = b"HSTL"
CREATOR_REVISION = 1

LAPIC_GPA = 0xFEE00000
IOAPIC_GPA = 0xFEC00000
IOAPIC_ID = 0
IOAPIC_PINS = 24

# The power registers (bindings/kvm.h has the same numbers).
SLEEP_CONTROL_PORT = 0x600
SLEEP_STATUS_PORT = 0x601
RESET_PORT = 0x602
RESET_VALUE = 0x1
S5_SLEEP_TYPE = 5           # \_S5 says SLP_TYP 5: the guest writes 5 << 2 | SLP_EN
PVPANIC_PORT = 0x505        # pvpanic: how a panicking guest says so before it resets
PVPANIC_HID = "QEMU0001"
COM1_PORT, COM1_IRQ = 0x3F8, 4
COM1_HID = "PNP0501"         # a 16550A-compatible UART

_HEADER = struct.Struct("<4sIBB6s8sI4sI")
FADT_REVISION, FADT_MINOR = 6, 5
FADT_LENGTH = 276
FADT_F_PWR_BUTTON = 1 << 4       # no fixed power button
FADT_F_SLP_BUTTON = 1 << 5       # no fixed sleep button
FADT_F_RESET_REG_SUP = 1 << 10
FADT_F_HW_REDUCED_ACPI = 1 << 20
IAPC_VGA_NOT_PRESENT = 1 << 2
IAPC_MSI_NOT_SUPPORTED = 1 << 3
IAPC_CMOS_RTC_NOT_PRESENT = 1 << 5
GAS_SYSTEM_IO = 1
GAS_ACCESS_BYTE = 1
MADT_LAPIC, MADT_IOAPIC = 0, 1
MADT_LAPIC_ENABLED = 1
MAX_CPUS = 254                   # 8-bit APIC ids, IOAPIC and broadcast excluded
VIRTIO_MMIO_HID = "LNRO0005"


@dataclass(frozen=True)
class MmioDeviceInfo:
    """What the DSDT says about one virtio-mmio device."""

    base: int
    size: int
    irq: int


def checksum(data: bytes | bytearray) -> int:
    """The byte that makes `data` plus itself sum to zero modulo 256."""
    return -sum(data) & 0xFF


def sdt(signature: bytes, revision: int, table_id: bytes, body: bytes) -> bytes:
    """A System Description Table: the 36-byte header, the body, the checksum filled in."""
    length = _HEADER.size + len(body)
    header = _HEADER.pack(signature, length, revision, 0, OEM_ID, table_id.ljust(8, b" "),
                          OEM_REVISION, CREATOR_ID, CREATOR_REVISION)
    table = bytearray(header + body)
    table[9] = checksum(table)
    return bytes(table)


def rsdp(xsdt_gpa: int) -> bytes:
    """ACPI 2.0 RSDP: the first 20 bytes have their own checksum, all 36 the extended one."""
    table = bytearray(struct.pack("<8sB6sBIIQB3s", b"RSD PTR ", 0, OEM_ID, 2, 0, 36,
                                  xsdt_gpa, 0, bytes(3)))
    table[8] = checksum(table[:20])
    table[32] = checksum(table)
    return bytes(table)


def xsdt(entries: list[int]) -> bytes:
    return sdt(b"XSDT", 1, b"HSTLXSDT", struct.pack(f"<{len(entries)}Q", *entries))


def _gas_io(port: int) -> bytes:
    """A Generic Address Structure for one byte-wide I/O port."""
    return struct.pack("<BBBBQ", GAS_SYSTEM_IO, 8, 0, GAS_ACCESS_BYTE, port)


def fadt(dsdt_gpa: int) -> bytes:
    """Hardware-reduced FADT (ACPI 6.5): X_DSDT, the reset register, the sleep registers."""
    body = bytearray(FADT_LENGTH - _HEADER.size)

    def put(offset: int, fmt: str, *values: object) -> None:
        struct.pack_into(fmt, body, offset - _HEADER.size, *values)

    put(40, "<I", dsdt_gpa)                      # 32-bit DSDT as well: older parsers read it
    put(109, "<H", IAPC_VGA_NOT_PRESENT | IAPC_MSI_NOT_SUPPORTED | IAPC_CMOS_RTC_NOT_PRESENT)
    put(112, "<I", FADT_F_HW_REDUCED_ACPI | FADT_F_RESET_REG_SUP | FADT_F_PWR_BUTTON
        | FADT_F_SLP_BUTTON)
    body[116 - _HEADER.size:128 - _HEADER.size] = _gas_io(RESET_PORT)
    put(128, "<B", RESET_VALUE)
    put(131, "<B", FADT_MINOR)
    put(140, "<Q", dsdt_gpa)                     # X_DSDT
    body[244 - _HEADER.size:256 - _HEADER.size] = _gas_io(SLEEP_CONTROL_PORT)
    body[256 - _HEADER.size:268 - _HEADER.size] = _gas_io(SLEEP_STATUS_PORT)
    put(268, "<8s", b"HOSTEL  ")                 # hypervisor vendor identity
    return sdt(b"FACP", FADT_REVISION, b"HSTLFACP", bytes(body))


def madt(cpus: int) -> bytes:
    """One enabled local APIC per vCPU (APIC id = vCPU index, as KVM numbers them)
    and the in-kernel IOAPIC with GSIs 0-23."""
    if not 1 <= cpus <= MAX_CPUS:
        raise ValueError(f"{cpus} vCPUs: the MADT describes 1..{MAX_CPUS}")
    body = struct.pack("<II", LAPIC_GPA, 0)      # flags 0: no dual 8259 for the guest to use
    body += b"".join(struct.pack("<BBBBI", MADT_LAPIC, 8, cpu, cpu, MADT_LAPIC_ENABLED)
                     for cpu in range(cpus))
    body += struct.pack("<BBBBII", MADT_IOAPIC, 12, IOAPIC_ID, 0, IOAPIC_GPA, 0)
    return sdt(b"APIC", 5, b"HSTLMADT", body)


def dsdt_body(devices: list[MmioDeviceInfo]) -> bytes:
    """One LNRO0005 device per virtio-mmio window (edge-triggered, active-high: the
    interrupt arrives through a KVM irqfd, a pulse), COM1 with its interrupt (a
    hardware-reduced Linux maps ISA IRQ 4 only for a device ACPI names), the pvpanic port (a panic
    then ends the guest as a shutdown rather than a reboot) and \\_S5 for poweroff."""
    nodes = []
    for i, dev in enumerate(devices):
        if not 0 <= dev.irq < IOAPIC_PINS:
            raise ValueError(f"virtio-mmio IRQ {dev.irq} is not an IOAPIC pin (0..{IOAPIC_PINS - 1})")
        nodes.append(aml.device(
            f"V{i:03X}",
            aml.name("_HID", aml.string(VIRTIO_MMIO_HID)),
            aml.name("_UID", aml.integer(i)),
            aml.name("_CRS", aml.resource_template(aml.memory32_fixed(dev.base, dev.size),
                                                   aml.interrupt(dev.irq)))))
    nodes.append(aml.device("COM1", aml.name("_HID", aml.eisa_id(COM1_HID)),
                            aml.name("_UID", aml.integer(0)),
                            aml.name("_CRS", aml.resource_template(aml.io_port(COM1_PORT, 8),
                                                                   aml.interrupt(COM1_IRQ)))))
    nodes.append(aml.device("PEVT", aml.name("_HID", aml.string(PVPANIC_HID)),
                            aml.name("_UID", aml.integer(0)),
                            aml.name("_CRS", aml.resource_template(aml.io_port(PVPANIC_PORT)))))
    sleep_s5 = aml.name("\\_S5", aml.package(*(aml.integer(v) for v in (S5_SLEEP_TYPE, 0, 0, 0))))
    return aml.scope("\\_SB", *nodes) + sleep_s5


def dsdt(devices: list[MmioDeviceInfo]) -> bytes:
    return sdt(b"DSDT", 2, b"HSTLDSDT", dsdt_body(devices))


def build(cpus: int, devices: list[MmioDeviceInfo], base: int = RSDP_GPA) -> bytes:
    """All tables as one blob to be placed at `base`: RSDP first, then DSDT, FADT,
    MADT, XSDT, each at a 16-byte aligned address."""
    blob = bytearray(_align16(36))
    addresses: dict[str, int] = {}
    for key, make in (("dsdt", lambda: dsdt(devices)),
                      ("fadt", lambda: fadt(addresses["dsdt"])),
                      ("madt", lambda: madt(cpus)),
                      ("xsdt", lambda: xsdt([addresses["fadt"], addresses["madt"]]))):
        addresses[key] = base + len(blob)
        table = make()
        blob += table + bytes(_align16(len(table)) - len(table))
    if base + len(blob) > TABLES_END:
        raise ValueError(f"the ACPI tables ({len(blob)} bytes) do not fit below {TABLES_END:#x}")
    blob[0:36] = rsdp(addresses["xsdt"])
    return bytes(blob)


def write_tables(mem: GuestMemory, cpus: int, devices: list[MmioDeviceInfo]) -> int:
    """Write the tables into guest memory; returns the RSDP's guest address."""
    mem.write(RSDP_GPA, build(cpus, devices, RSDP_GPA))
    return RSDP_GPA


def _align16(n: int) -> int:
    return (n + 15) & ~15
