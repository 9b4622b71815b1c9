"""SipHash-2-4 (Aumasson and Bernstein), in pure Python.

Container MAC addresses must be the same ones systemd-nspawn derives, and it
derives them with SipHash-2-4; Python's own hash() is SipHash-1-3 and keyed
per process, and hashlib has no SipHash, so it lives here. Inputs are a few
dozen bytes, so speed does not matter."""
from __future__ import annotations

import struct

_MASK = 0xFFFFFFFFFFFFFFFF
_WORDS = struct.Struct("<QQ")
_WORD = struct.Struct("<Q")


def _rotl(x: int, b: int) -> int:
    return ((x << b) | (x >> (64 - b))) & _MASK


def _rounds(v0: int, v1: int, v2: int, v3: int, n: int) -> tuple[int, int, int, int]:
    for _ in range(n):
        v0 = (v0 + v1) & _MASK
        v1 = _rotl(v1, 13) ^ v0
        v0 = _rotl(v0, 32)
        v2 = (v2 + v3) & _MASK
        v3 = _rotl(v3, 16) ^ v2
        v0 = (v0 + v3) & _MASK
        v3 = _rotl(v3, 21) ^ v0
        v2 = (v2 + v1) & _MASK
        v1 = _rotl(v1, 17) ^ v2
        v2 = _rotl(v2, 32)
    return v0, v1, v2, v3


def siphash24(key: bytes, data: bytes) -> bytes:
    """The 8-byte SipHash-2-4 tag of `data` under the 16-byte `key`, little-endian
    as the reference implementation writes it."""
    if len(key) != 16:
        raise ValueError(f"SipHash key must be 16 bytes, not {len(key)}")
    k0, k1 = _WORDS.unpack(key)
    v0 = k0 ^ 0x736F6D6570736575
    v1 = k1 ^ 0x646F72616E646F6D
    v2 = k0 ^ 0x6C7967656E657261
    v3 = k1 ^ 0x7465646279746573

    whole = len(data) - len(data) % 8
    for (m,) in _WORD.iter_unpack(data[:whole]):
        v3 ^= m
        v0, v1, v2, v3 = _rounds(v0, v1, v2, v3, 2)
        v0 ^= m
    # The last word carries the remaining bytes and the length modulo 256.
    last = int.from_bytes(data[whole:], "little") | ((len(data) & 0xFF) << 56)
    v3 ^= last
    v0, v1, v2, v3 = _rounds(v0, v1, v2, v3, 2)
    v0 ^= last

    v2 ^= 0xFF
    v0, v1, v2, v3 = _rounds(v0, v1, v2, v3, 4)
    return _WORD.pack(v0 ^ v1 ^ v2 ^ v3)
