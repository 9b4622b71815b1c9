"""A small ACPI Machine Language encoder: just the terms the launcher's DSDT uses.

Each function returns the encoded bytes of one term, so a DSDT body is built
by nesting calls, e.g. scope("\\_SB_", device("V000", name("_HID", string(
"LNRO0005")), ...)). Encodings follow the ACPI specification, chapter 20
(AML grammar) and section 6.4 (resource descriptors); names are the ASL
operators they stand for."""
from __future__ import annotations

import struct

ZERO_OP, ONE_OP, ONES_OP = 0x00, 0x01, 0xFF
BYTE_PREFIX, WORD_PREFIX, DWORD_PREFIX, STRING_PREFIX, QWORD_PREFIX = 0x0A, 0x0B, 0x0C, 0x0D, 0x0E
NAME_OP, SCOPE_OP, BUFFER_OP, PACKAGE_OP = 0x08, 0x10, 0x11, 0x12
EXT_OP_PREFIX, DEVICE_OP = 0x5B, 0x82
ROOT_CHAR, PARENT_CHAR = 0x5C, 0x5E
DUAL_NAME_PREFIX, MULTI_NAME_PREFIX = 0x2E, 0x2F

# resource descriptors (ACPI 6.4.2, 6.4.3)
IO_PORT = 0x47
IO_DECODE_16 = 1
END_TAG = 0x79
MEMORY32_FIXED = 0x86
EXTENDED_INTERRUPT = 0x89
_NAME_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
_PKG_LENGTH_MAX = 1 << 28


class AmlError(ValueError):
    """A term the encoder cannot express (bad name, value out of range)."""


def pkg_length(body_length: int) -> bytes:
    """PkgLength for a body of that many bytes; the encoded length counts itself.

    One byte holds up to 63; longer ones put the byte count in bits 7-6 of the
    lead byte, the low nibble in its bits 3-0 and the rest in following bytes."""
    if body_length + 1 < 64:
        return bytes([body_length + 1])
    for extra in (1, 2, 3):
        total = body_length + 1 + extra
        if total < 1 << (4 + 8 * extra):
            rest = (total >> 4).to_bytes(extra, "little")
            return bytes([extra << 6 | (total & 0xF)]) + rest
    raise AmlError(f"an AML package of {body_length} bytes exceeds {_PKG_LENGTH_MAX} bytes")


def name_seg(seg: str) -> bytes:
    """A four-character NameSeg, padded with '_' as ASL does."""
    if not 1 <= len(seg) <= 4 or not set(seg) <= _NAME_CHARS or seg[0].isdigit():
        raise AmlError(f"{seg!r} is not an ACPI name segment (1-4 of A-Z, 0-9, _; no leading digit)")
    return seg.ljust(4, "_").encode()


def name_string(path: str) -> bytes:
    r"""A NameString: optional root prefix '\', '^' parent prefixes, dot-separated segments."""
    prefix = b""
    while path[:1] in ("\\", "^"):
        prefix += bytes([ROOT_CHAR if path[0] == "\\" else PARENT_CHAR])
        path = path[1:]
    segs = [name_seg(seg) for seg in path.split(".")] if path else []
    if not segs:
        return prefix + b"\0"  # NullName
    if len(segs) == 1:
        return prefix + segs[0]
    if len(segs) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + b"".join(segs)
    if len(segs) > 255:
        raise AmlError(f"the name path {path!r} has more than 255 segments")
    return prefix + bytes([MULTI_NAME_PREFIX, len(segs)]) + b"".join(segs)


def integer(value: int) -> bytes:
    """The shortest encoding of an integer constant."""
    if value < 0 or value >= 1 << 64:
        raise AmlError(f"{value} does not fit an AML integer (0..2^64-1)")
    if value in (0, 1):
        return bytes([ZERO_OP if value == 0 else ONE_OP])
    for prefix, fmt, limit in ((BYTE_PREFIX, "<B", 1 << 8), (WORD_PREFIX, "<H", 1 << 16),
                               (DWORD_PREFIX, "<I", 1 << 32)):
        if value < limit:
            return bytes([prefix]) + struct.pack(fmt, value)
    return bytes([QWORD_PREFIX]) + struct.pack("<Q", value)


def string(text: str) -> bytes:
    if not text.isascii() or "\0" in text:
        raise AmlError(f"{text!r}: AML strings are 7-bit ASCII without NUL")
    raw = text.encode("ascii")
    return bytes([STRING_PREFIX]) + raw + b"\0"


def eisa_id(pnp_id: str) -> bytes:
    """EISAID("PNPxxxx"): three letters compressed to 5 bits each and a 16-bit product
    number, stored big-endian in a DWord constant."""
    vendor, product = pnp_id[:3], pnp_id[3:]
    if len(pnp_id) != 7 or not vendor.isalpha() or not vendor.isupper() \
            or any(c not in "0123456789ABCDEF" for c in product):
        raise AmlError(f"{pnp_id!r} is not an EISA id (three capital letters, four hex digits)")
    packed = sum((ord(c) - 0x40) << shift for c, shift in zip(vendor, (26, 21, 16))) | int(product, 16)
    return bytes([DWORD_PREFIX]) + packed.to_bytes(4, "big")


def name(path: str, value: bytes) -> bytes:
    """Name(path, value): value is an already-encoded data object."""
    return bytes([NAME_OP]) + name_string(path) + value


def package(*elements: bytes) -> bytes:
    if len(elements) > 255:
        raise AmlError("a Package holds at most 255 elements")
    body = bytes([len(elements)]) + b"".join(elements)
    return bytes([PACKAGE_OP]) + pkg_length(len(body)) + body


def buffer(data: bytes) -> bytes:
    body = integer(len(data)) + data
    return bytes([BUFFER_OP]) + pkg_length(len(body)) + body


def scope(path: str, *terms: bytes) -> bytes:
    body = name_string(path) + b"".join(terms)
    return bytes([SCOPE_OP]) + pkg_length(len(body)) + body


def device(path: str, *terms: bytes) -> bytes:
    body = name_string(path) + b"".join(terms)
    return bytes([EXT_OP_PREFIX, DEVICE_OP]) + pkg_length(len(body)) + body


# resource templates -----------------------------------------------------------

def memory32_fixed(base: int, length: int, writable: bool = True) -> bytes:
    """Memory32Fixed(ReadWrite|ReadOnly, base, length): a large descriptor of 9 data bytes."""
    if not (0 <= base < 1 << 32 and 0 <= length < 1 << 32 and base + length <= 1 << 32):
        raise AmlError(f"Memory32Fixed {base:#x}+{length:#x} does not fit below 4 GiB")
    return struct.pack("<BHBII", MEMORY32_FIXED, 9, int(writable), base, length)


def io_port(port: int, length: int = 1) -> bytes:
    """IO(Decode16, port, port, 1, length): a fixed range of I/O ports, a small descriptor."""
    if not (0 <= port and port + length <= 1 << 16 and 1 <= length <= 255):
        raise AmlError(f"I/O ports {port:#x}+{length} do not fit the 16-bit port space")
    return struct.pack("<BBHHBB", IO_PORT, IO_DECODE_16, port, port, 1, length)


def interrupt(*irqs: int, edge: bool = True, active_low: bool = False,
              shared: bool = False, consumer: bool = True) -> bytes:
    """Interrupt(ResourceConsumer, Edge|Level, ActiveHigh|ActiveLow, Exclusive|Shared){irqs}."""
    if not 1 <= len(irqs) <= 255 or any(not 0 <= irq < 1 << 32 for irq in irqs):
        raise AmlError(f"Interrupt needs 1-255 interrupt numbers below 2^32, not {irqs}")
    flags = int(consumer) | int(edge) << 1 | int(active_low) << 2 | int(shared) << 3
    data = struct.pack("<BB", flags, len(irqs)) + struct.pack(f"<{len(irqs)}I", *irqs)
    return struct.pack("<BH", EXTENDED_INTERRUPT, len(data)) + data


def resource_template(*descriptors: bytes) -> bytes:
    """ResourceTemplate(){...}: a Buffer of descriptors closed by an End Tag whose
    checksum byte 0 tells the OS not to check it."""
    return buffer(b"".join(descriptors) + bytes([END_TAG, 0]))
