"""The driver side of a split virtqueue, in Python: what a guest's virtio
driver does, for tests, the fuzz target and the benchmark to exercise the
device side without a guest. It trusts nothing it is given either: it writes
exactly the descriptors it is told to, malicious ones included."""
from __future__ import annotations

import struct
from dataclasses import dataclass

from hostel.guest.memory import GuestMemory
from hostel.guest.virtqueue import RingLayout

F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
_DESC = struct.Struct("<QIHH")


@dataclass(frozen=True)
class Desc:
    addr: int
    length: int
    flags: int = 0
    next: int = 0


class RingDriver:
    def __init__(self, mem: GuestMemory, layout: RingLayout) -> None:
        self.mem = mem
        self.layout = layout
        self.avail_idx = 0
        self.used_seen = 0
        mem.zero(layout.desc, 16 * layout.num)
        mem.zero(layout.avail, 6 + 2 * layout.num)
        mem.zero(layout.used, 6 + 8 * layout.num)

    def set_desc(self, index: int, desc: Desc) -> None:
        self.mem.write(self.layout.desc + 16 * index,
                       _DESC.pack(desc.addr, desc.length, desc.flags, desc.next))

    def chain(self, first: int, descs: list[Desc]) -> int:
        """Write descs at first, first+1, ... linked with NEXT; returns the head."""
        for i, desc in enumerate(descs):
            last = i == len(descs) - 1
            flags = desc.flags | (0 if last else F_NEXT)
            self.set_desc(first + i, Desc(desc.addr, desc.length, flags,
                                          desc.next if last else first + i + 1))
        return first

    def offer(self, head: int) -> None:
        slot = self.layout.avail + 4 + 2 * (self.avail_idx % self.layout.num)
        self.mem.write(slot, struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.set_avail_idx(self.avail_idx)

    def set_avail_idx(self, idx: int) -> None:
        self.mem.write(self.layout.avail + 2, struct.pack("<H", idx & 0xFFFF))

    def used(self) -> list[tuple[int, int]]:
        """New (head, written length) entries since the last call."""
        idx = struct.unpack("<H", self.mem.read(self.layout.used + 2, 2))[0]
        out = []
        while self.used_seen != idx:
            slot = self.layout.used + 4 + 8 * (self.used_seen % self.layout.num)
            out.append(struct.unpack("<II", self.mem.read(slot, 8)))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return out

    def set_used_event(self, value: int) -> None:
        self.mem.write(self.layout.avail + 4 + 2 * self.layout.num, struct.pack("<H", value))

    def avail_event(self) -> int:
        return struct.unpack("<H", self.mem.read(self.layout.used + 4 + 8 * self.layout.num, 2))[0]
