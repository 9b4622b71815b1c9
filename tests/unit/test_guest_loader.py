"""Kernel loaders and the boot area: ELF64 and bzImage into real guest memory.

The bzImage cases use Debian's cloud kernel from the cache `make setup` fills
(tests/guests/kernel.py)."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest

from guests.build import build
from guests.kernel import HOW_TO_GET_ONE, debian_kernel
from hostel.guest import boot, loader
from hostel.guest.errors import BadKernel
from hostel.guest.memory import GuestMemory

MiB = 1 << 20


@pytest.fixture
def mem():
    with GuestMemory(64 * MiB) as m:
        yield m


@pytest.fixture(scope="module")
def hello(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return build("hello", tmp_path_factory.mktemp("guests")).read_bytes()


@pytest.fixture(scope="module")
def bzimage() -> Path:
    kernel = debian_kernel()
    assert kernel is not None, HOW_TO_GET_ONE
    return kernel


def test_elf_segments_land_at_their_physical_addresses(mem: GuestMemory, hello: bytes) -> None:
    kernel = loader.load_elf(mem, hello, "hello")
    assert kernel.kind == "elf" and kernel.entry == 0x100000
    (seg,) = kernel.segments
    offset = struct.unpack_from("<Q", hello, 64 + 8)[0]  # first program header's p_offset
    assert mem.read(seg.gpa, seg.file_size) == hello[offset:offset + seg.file_size]


def _patch(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def _phdr(data: bytes, field: int) -> int:
    phoff = struct.unpack_from("<Q", data, 32)[0]
    return phoff + field


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d[:40], "truncated ELF header"),
    (lambda d: _patch(d, 4, "<B", 1), "not a 64-bit little-endian x86-64"),
    (lambda d: _patch(d, 18, "<H", 183), "not a 64-bit little-endian x86-64"),  # aarch64
    (lambda d: _patch(d, 16, "<H", 3), "is not an executable"),
    (lambda d: _patch(d, 32, "<Q", 1 << 40), "program headers are missing or truncated"),
    (lambda d: _patch(d, _phdr(d, 24), "<Q", 0x1000), "outside guest memory"),     # p_paddr low
    (lambda d: _patch(d, _phdr(d, 24), "<Q", 64 * MiB - 16), "outside guest memory"),  # past the end
    (lambda d: _patch(d, _phdr(d, 32), "<Q", 1 << 30), "is truncated"),            # p_filesz
    (lambda d: _patch(d, 24, "<Q", 0x900000), "entry point 0x900000 is in no loaded segment"),
])
def test_malformed_elf_kernels_are_refused(mem: GuestMemory, hello: bytes, mutate, message) -> None:
    with pytest.raises(BadKernel, match=message):
        loader.load_elf(mem, mutate(hello), "k")


def test_bzimage_setup_header_and_boot_params(mem: GuestMemory, bzimage: Path, tmp_path: Path) -> None:
    data = bzimage.read_bytes()
    header = loader.parse_setup_header(data, str(bzimage))
    assert header.protocol >= 0x20C and header.xloadflags & loader.XLF_KERNEL_64
    kernel = loader.load_bzimage(mem, data, str(bzimage))
    assert kernel.entry == 0x100000 + 0x200
    assert mem.read(0x100000, 4096) == data[header.kernel_offset:header.kernel_offset + 4096]
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"initrd!" * 1000)
    loader.finish_boot_params(mem, kernel, "console=ttyS0 quiet", initrd)
    zp = mem.read(boot.ZERO_PAGE_GPA, 4096)
    assert zp[0x202:0x206] == b"HdrS" and zp[0x210] == 0xFF
    assert zp[0x211] & loader.LOADFLAG_LOADED_HIGH
    cmd_ptr, = struct.unpack_from("<I", zp, 0x228)
    assert mem.read(cmd_ptr, 20) == b"console=ttyS0 quiet\0"
    rd_addr, rd_size = struct.unpack_from("<II", zp, 0x218)
    assert rd_size == 7000 and rd_addr % 4096 == 0 and rd_addr + rd_size <= 64 * MiB
    assert rd_addr + rd_size > 64 * MiB - 8192, "the initrd sits at the top of memory"
    assert mem.read(rd_addr, 7) == b"initrd!"
    assert zp[boot.BP_E820_ENTRIES] == 3
    e820 = [struct.unpack_from("<QQI", zp, boot.BP_E820_TABLE + 20 * i) for i in range(3)]
    assert e820[2] == (0x100000, 63 * MiB, boot.E820_RAM)


def test_bzimage_that_does_not_fit_is_refused(bzimage: Path) -> None:
    with GuestMemory(4 * MiB) as small, pytest.raises(BadKernel, match="give it more"):
        loader.load_bzimage(small, bzimage.read_bytes(), "vmlinuz")


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d[:0x200], "too short"),
    (lambda d: _patch(d, 0x202, "<I", 0), "bad magic"),
    (lambda d: _patch(d, 0x206, "<H", 0x0206), "boot protocol 2.6 has no 64-bit entry"),
    (lambda d: _patch(d, 0x236, "<H", 0), "XLF_KERNEL_64"),
    (lambda d: d[:0x1000], "truncated"),
])
def test_malformed_bzimages_are_refused(mem: GuestMemory, bzimage: Path, mutate, message) -> None:
    with pytest.raises(BadKernel, match=message):
        loader.load_bzimage(mem, mutate(bzimage.read_bytes()), "vmlinuz")


def test_long_mode_tables_identity_map_low_memory(mem: GuestMemory) -> None:
    entry = boot.write_long_mode_tables(mem)
    pml4 = struct.unpack_from("<Q", mem.read(entry.cr3, 8))[0]
    pdpt = struct.unpack_from("<4Q", mem.read(pml4 & ~0xFFF, 32))
    for gib, pdpte in enumerate(pdpt):
        first, last = struct.unpack_from("<Q", mem.read(pdpte & ~0xFFF, 8))[0], \
            struct.unpack_from("<Q", mem.read((pdpte & ~0xFFF) + 511 * 8, 8))[0]
        assert first & ~0xFFF == gib << 30 and last & ~0xFFF == (gib << 30) + (511 << 21)
        assert first & 0x83 == 0x83
    code = struct.unpack_from("<Q", mem.read(entry.gdt_base + 0x10, 8))[0]
    assert code >> 53 & 1, "the code descriptor at 0x10 is 64-bit (L bit)"


def test_command_line_limits(mem: GuestMemory) -> None:
    with pytest.raises(BadKernel, match="NUL"):
        boot.write_command_line(mem, "a\0b")
    with pytest.raises(BadKernel, match="at most 255"):
        boot.write_command_line(mem, "x" * 300, limit=256)


def test_guest_memory_bounds(mem: GuestMemory) -> None:
    mem.write(64 * MiB - 4, b"end!")
    assert mem.read(64 * MiB - 4, 4) == b"end!"
    for gpa, length in [(64 * MiB - 3, 4), (-1, 1), (64 * MiB + 1, 0), (0, 1 << 64)]:
        with pytest.raises(Exception, match="outside guest memory"):
            mem.check(gpa, length)
    assert mem.to_guest(mem.to_host(0x1234, 1)) == 0x1234


GiB = 1 << 30


def test_memory_above_the_gap_continues_at_4_gib() -> None:
    """6 GiB of RAM: 3.25 GiB below the MMIO gap, the rest from 4 GiB; the host
    mapping mirrors guest addresses."""
    with GuestMemory(6 * GiB) as big:
        assert [(r.gpa, r.size) for r in big.regions] == [(0, 0xD0000000),
                                                          (4 * GiB, 6 * GiB - 0xD0000000)]
        big.write(4 * GiB, b"high")
        big.write(0xD0000000 - 3, b"low")
        assert big.read(4 * GiB, 4) == b"high" and big.read(0xD0000000 - 3, 3) == b"low"
        assert big.to_guest(big.to_host(4 * GiB + 5, 1)) == 4 * GiB + 5
        for gpa, length in [(0xD0000000, 1), (0xFEC00000, 4), (4 * GiB - 1, 2),
                            (0xD0000000 - 3, 4), (10 * GiB, 1)]:
            with pytest.raises(Exception, match="outside guest memory"):
                big.check(gpa, length)


def test_e820_map_leaves_the_gap_out() -> None:
    with GuestMemory(6 * GiB) as big:
        assert boot.e820_map(big.regions) == [
            (0, boot.LOW_RAM_END, boot.E820_RAM),
            (boot.LOW_RAM_END, 0x100000 - boot.LOW_RAM_END, boot.E820_RESERVED),
            (0x100000, 0xD0000000 - 0x100000, boot.E820_RAM),
            (4 * GiB, 6 * GiB - 0xD0000000, boot.E820_RAM)]


def test_memory_beyond_the_host_is_refused() -> None:
    with pytest.raises(Exception, match="exceeds this host's"):
        GuestMemory(1 << 40)


def test_big_guest_initrd_stays_below_the_gap_and_rsdp_is_in_the_zero_page(
        bzimage: Path, tmp_path: Path) -> None:
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"initrd!" * 1000)
    with GuestMemory(6 * GiB) as big:
        kernel = loader.load_bzimage(big, bzimage.read_bytes(), "vmlinuz")
        loader.finish_boot_params(big, kernel, "console=ttyS0", initrd, rsdp=0xE0000)
        zp = big.read(kernel.zero_page, 4096)
        rd_addr, rd_size = struct.unpack_from("<II", zp, 0x218)
        assert rd_addr + rd_size <= min(0xD0000000, kernel.initrd_max + 1)
        assert big.read(rd_addr, 7) == b"initrd!"
        assert struct.unpack_from("<Q", zp, boot.BP_ACPI_RSDP_ADDR)[0] == 0xE0000
        assert zp[boot.BP_E820_ENTRIES] == 4
