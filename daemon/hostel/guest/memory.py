"""Guest-physical memory: one memfd, mapped once, addressed by guest address.

A memfd rather than anonymous memory so that another process (a device
backend, a debugger, the next issue's guest init helper) can map the same
pages by passing the descriptor."""
from __future__ import annotations

import mmap
import os

from hostel._vmm import ffi

from hostel.guest.errors import GuestError

PAGE = 4096


class GuestMemory:
    """Guest RAM from guest-physical 0 up to `size`; every access is bounds-checked."""

    def __init__(self, size: int, name: str = "hostel-guest") -> None:
        if size <= 0 or size % PAGE:
            raise GuestError(f"guest memory size {size} is not a positive multiple of {PAGE}")
        self.size = size
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self._map = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            os.close(self.fd)
            raise
        self.view = memoryview(self._map)
        # the address C (KVM, the virtqueue workers) uses for guest-physical 0
        self.host = ffi.cast("uint8_t *", ffi.from_buffer(self._map))

    def check(self, gpa: int, length: int) -> None:
        if gpa < 0 or length < 0 or gpa > self.size or length > self.size - gpa:
            raise GuestError(f"guest range {gpa:#x}+{length:#x} is outside guest memory "
                             f"(0..{self.size:#x}); give the guest more memory")

    def write(self, gpa: int, data: bytes | memoryview) -> None:
        self.check(gpa, len(data))
        self.view[gpa:gpa + len(data)] = data

    def read(self, gpa: int, length: int) -> bytes:
        self.check(gpa, length)
        return bytes(self.view[gpa:gpa + length])

    def zero(self, gpa: int, length: int) -> None:
        self.check(gpa, length)
        self.view[gpa:gpa + length] = bytes(length)

    def to_host(self, gpa: int, length: int) -> object:
        """A C pointer to guest-physical gpa, checked for `length` bytes."""
        self.check(gpa, length)
        return self.host + gpa

    def to_guest(self, host: object) -> int:
        """The guest-physical address of a C pointer into this memory."""
        gpa = int(ffi.cast("uintptr_t", host)) - int(ffi.cast("uintptr_t", self.host))
        self.check(gpa, 0)
        return gpa

    def close(self) -> None:
        self.host = None
        self.view.release()
        self._map.close()
        os.close(self.fd)

    def __enter__(self) -> "GuestMemory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
