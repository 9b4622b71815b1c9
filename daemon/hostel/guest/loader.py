"""Kernel loaders: ELF64 (vmlinux, or a freestanding guest program) and bzImage.

Both end in a LoadedKernel: the 64-bit entry point and the guest address of
the zero page, which the vCPU receives in %rsi as Linux's 64-bit boot
protocol says. Everything read from the file is checked before it is used,
so a malformed kernel is refused with a message, never loaded half-way."""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from hostel.guest import boot, hostfiles
from hostel.guest.errors import BadKernel
from hostel.guest.memory import PAGE, GuestMemory

ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
EM_X86_64 = 62
ET_EXEC = 2
PT_LOAD = 1
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")

BZ_MAGIC = b"HdrS"
BZ_MIN_VERSION = 0x020C      # 2.12: xloadflags, the 64-bit entry
XLF_KERNEL_64 = 1
BZ_ENTRY_64_OFFSET = 0x200   # startup_64 sits 512 bytes into the protected-mode kernel
LOADER_TYPE_UNDEFINED = 0xFF
LOADFLAG_LOADED_HIGH = 0x01
LOADFLAG_CAN_USE_HEAP = 0x80


@dataclass(frozen=True)
class Segment:
    gpa: int
    file_size: int
    mem_size: int


@dataclass(frozen=True)
class LoadedKernel:
    kind: str                       # "elf" or "bzimage"
    entry: int
    zero_page: int
    segments: tuple[Segment, ...]
    protocol: int = 0               # bzImage boot protocol version
    cmdline_limit: int = boot.CMDLINE_MAX
    initrd_max: int = 0xFFFFFFFF


def read_sized(path: Path, label: str, room: int, room_text: str) -> bytes:
    """The whole of a kernel or initrd file, once fstat said it fits in `room`
    bytes: a huge (sparse) file is refused before a byte of it is read, and a
    FIFO, directory or device (/dev/zero never ends) is refused unread."""
    fd = hostfiles.open_checked(path, os.O_RDONLY, hostfiles.REGULAR, label,
                                f"the {label} as a regular file", error=BadKernel)
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(fd).st_size
        if size > room:
            raise BadKernel(f"the {label} {path} is {_size_text(size)}; {room_text} "
                            f"({_size_text(room)}): give the guest more memory or pass a "
                            f"smaller {label}")
        try:
            return f.read(size)
        except OSError as e:
            raise BadKernel(f"cannot read the {label} {path}: {e.strerror}") from e


def _size_text(size: int) -> str:
    return f"{size} bytes ({size / (1 << 20):.1f} MiB)"


def looks_like_elf(data: bytes) -> bool:
    return data[:4] == ELF_MAGIC


def load_elf(mem: GuestMemory, data: bytes, name: str) -> LoadedKernel:
    """Load PT_LOAD segments at their physical addresses (as the lguest launcher did)."""
    if len(data) < _EHDR.size:
        raise BadKernel(f"{name}: truncated ELF header ({len(data)} bytes)")
    (ident, e_type, machine, _version, entry, phoff, _shoff, _flags, _ehsize,
     phentsize, phnum, *_rest) = _EHDR.unpack_from(data)
    if ident[4] != ELFCLASS64 or ident[5] != ELFDATA2LSB or machine != EM_X86_64:
        raise BadKernel(f"{name}: not a 64-bit little-endian x86-64 ELF file; "
                        "build the kernel for x86_64")
    if e_type != ET_EXEC:
        raise BadKernel(f"{name}: ELF type {e_type} is not an executable; link it statically "
                        "at a fixed address")
    if phentsize != _PHDR.size or phnum == 0 or phoff + phnum * phentsize > len(data):
        raise BadKernel(f"{name}: program headers are missing or truncated")
    loads: list[tuple[Segment, int]] = []
    for i in range(phnum):
        p_type, _pflags, offset, _vaddr, paddr, filesz, memsz, _align = _PHDR.unpack_from(
            data, phoff + i * phentsize)
        if p_type != PT_LOAD:
            continue
        if filesz > memsz or offset + filesz > len(data):
            raise BadKernel(f"{name}: segment {i} is truncated (file size {filesz:#x} at "
                            f"offset {offset:#x}, memory size {memsz:#x})")
        low_end = mem.regions[0].end
        if paddr < boot.KERNEL_GPA or paddr + memsz > low_end:
            raise BadKernel(f"{name}: segment {i} at {paddr:#x}+{memsz:#x} lies outside guest "
                            f"memory {boot.KERNEL_GPA:#x}..{low_end:#x}; give the guest more "
                            "memory or link the kernel at 1 MiB or above")
        loads.append((Segment(paddr, filesz, memsz), offset))
    segments = tuple(seg for seg, _offset in loads)
    if not segments:
        raise BadKernel(f"{name}: no loadable (PT_LOAD) segment")
    if not any(s.gpa <= entry < s.gpa + s.mem_size for s in segments):
        raise BadKernel(f"{name}: entry point {entry:#x} is in no loaded segment")
    for seg, offset in loads:
        mem.write(seg.gpa, data[offset:offset + seg.file_size])
        mem.zero(seg.gpa + seg.file_size, seg.mem_size - seg.file_size)
    return LoadedKernel("elf", entry, boot.ZERO_PAGE_GPA, segments)


@dataclass(frozen=True)
class SetupHeader:
    """The fields of a bzImage's setup header the loader needs."""

    setup_sects: int
    protocol: int
    loadflags: int
    xloadflags: int
    initrd_addr_max: int
    cmdline_size: int
    init_size: int
    header_end: int          # offset just past the header, as the image declares it

    @property
    def kernel_offset(self) -> int:
        return (self.setup_sects or 4) * 512 + 512


def parse_setup_header(data: bytes, name: str) -> SetupHeader:
    if len(data) < 0x264:
        raise BadKernel(f"{name}: too short for a bzImage setup header ({len(data)} bytes)")
    if data[0x202:0x206] != BZ_MAGIC or data[0x1FE:0x200] != b"\x55\xaa":
        raise BadKernel(f"{name}: no bzImage setup header (bad magic); is it a kernel?")
    protocol = struct.unpack_from("<H", data, 0x206)[0]
    if protocol < BZ_MIN_VERSION:
        raise BadKernel(f"{name}: boot protocol {protocol >> 8}.{protocol & 0xff} has no 64-bit "
                        "entry point (2.12 or later needed)")
    header = SetupHeader(
        setup_sects=data[0x1F1], protocol=protocol, loadflags=data[0x211],
        xloadflags=struct.unpack_from("<H", data, 0x236)[0],
        initrd_addr_max=struct.unpack_from("<I", data, 0x22C)[0],
        cmdline_size=struct.unpack_from("<I", data, 0x238)[0],
        init_size=struct.unpack_from("<I", data, 0x260)[0],
        header_end=0x202 + data[0x201])
    if not header.xloadflags & XLF_KERNEL_64:
        raise BadKernel(f"{name}: the kernel has no 64-bit entry point (XLF_KERNEL_64 unset); "
                        "use a 64-bit kernel")
    if header.kernel_offset >= len(data):
        raise BadKernel(f"{name}: truncated: the protected-mode kernel would start at "
                        f"{header.kernel_offset:#x} in a {len(data)}-byte file")
    return header


def load_bzimage(mem: GuestMemory, data: bytes, name: str) -> LoadedKernel:
    """Protected-mode kernel at 1 MiB; the setup header copied into the zero page."""
    header = parse_setup_header(data, name)
    kernel = data[header.kernel_offset:]
    needed = max(len(kernel), header.init_size)
    if boot.KERNEL_GPA + needed > mem.regions[0].end:
        raise BadKernel(f"{name}: the kernel needs {needed >> 20} MiB from 1 MiB on; "
                        f"guest memory is {mem.ram_size >> 20} MiB; give it more")
    mem.write(boot.KERNEL_GPA, kernel)
    zero_page = bytearray(PAGE)
    zero_page[boot.BP_SETUP_HEADER:header.header_end] = data[boot.BP_SETUP_HEADER:header.header_end]
    zero_page[0x210] = LOADER_TYPE_UNDEFINED
    zero_page[0x211] = header.loadflags | LOADFLAG_LOADED_HIGH | LOADFLAG_CAN_USE_HEAP
    boot.write_e820(zero_page, boot.e820_map(mem.regions))
    mem.write(boot.ZERO_PAGE_GPA, zero_page)
    return LoadedKernel("bzimage", boot.KERNEL_GPA + BZ_ENTRY_64_OFFSET, boot.ZERO_PAGE_GPA,
                        (Segment(boot.KERNEL_GPA, len(kernel), needed),), protocol=header.protocol,
                        cmdline_limit=min(header.cmdline_size + 1, boot.CMDLINE_MAX),
                        initrd_max=header.initrd_addr_max)


def load_kernel(mem: GuestMemory, path: Path) -> LoadedKernel:
    """ELF or bzImage, decided by the file's magic."""
    data = read_sized(path, "kernel", mem.ram_size,
                      f"guest memory is {mem.ram_size >> 20} MiB")
    if looks_like_elf(data):
        return load_elf(mem, data, str(path))
    return load_bzimage(mem, data, str(path))


def finish_boot_params(mem: GuestMemory, kernel: LoadedKernel, cmdline: str,
                       initrd: Path | None, rsdp: int = 0) -> None:
    """Command line, initrd, the ACPI RSDP's address and (for ELF kernels) the e820
    map into the zero page."""
    zero_page = bytearray(mem.read(kernel.zero_page, PAGE))
    if kernel.kind == "elf":
        boot.write_e820(zero_page, boot.e820_map(mem.regions))
    struct.pack_into("<Q", zero_page, boot.BP_ACPI_RSDP_ADDR, rsdp)
    struct.pack_into("<I", zero_page, 0x228, boot.write_command_line(mem, cmdline, kernel.cmdline_limit))
    if initrd is not None:
        gpa, size = load_initrd(mem, kernel, initrd)
        struct.pack_into("<II", zero_page, 0x218, gpa, size)
    mem.write(kernel.zero_page, zero_page)


def load_initrd(mem: GuestMemory, kernel: LoadedKernel, path: Path) -> tuple[int, int]:
    """The initrd at the top of the RAM below the MMIO gap (and below the kernel's
    initrd_addr_max), page-aligned, as the lguest launcher placed it."""
    top = min(mem.regions[0].end, kernel.initrd_max + 1)
    kernel_end = max(s.gpa + s.mem_size for s in kernel.segments)
    data = read_sized(path, "initrd", max(top - kernel_end, 0),
                      f"guest memory ({mem.ram_size >> 20} MiB) has room for that much "
                      f"between the kernel (ends at {kernel_end:#x}) and {top:#x}")
    size = len(data)
    gpa = (top - size) & ~(PAGE - 1)
    if size == 0 or gpa < kernel_end:
        raise BadKernel(f"initrd {path} ({size} bytes) does not fit between the kernel "
                        f"(ends at {kernel_end:#x}) and the top of memory {top:#x}; "
                        "give the guest more memory")
    mem.write(gpa, data)
    return gpa, size
