"""The lguest backend: the /dev/lguest protocol of the original launcher.

lguest left Linux in 4.14 and only ever ran 32-bit x86 guests on 32-bit
hosts, so this backend cannot run anything on a current kernel; it speaks the
protocol (requests are arrays of unsigned longs written to the device; the
guest runs inside pread) and says exactly that when the device is missing."""
from __future__ import annotations

import errno
import os
import struct
import threading
from dataclasses import dataclass

from hostel._vmm import ffi

from hostel.guest.backend import GuestExit, MmioHandler
from hostel.guest.boot import LongModeEntry
from hostel.guest.errors import BackendUnavailable, GuestError
from hostel.guest.memory import PAGE, GuestMemory

DEVICE = "/dev/lguest"
WORD = 4            # lguest hosts were 32-bit: an unsigned long is 4 bytes
ERESTART = 85       # Linux's "interrupted system call should be restarted"

# enum lguest_req
LHREQ_INITIALIZE = 0   # + guest base, page frame limit, entry point
LHREQ_GETDMA = 1       # retired
LHREQ_IRQ = 2          # + irq
LHREQ_BREAK = 3        # retired
LHREQ_EVENTFD = 4      # + notify address, eventfd
LHREQ_GETREG = 5       # + offset in struct pt_regs; the value is then read
LHREQ_SETREG = 6       # + offset in struct pt_regs, value
LHREQ_TRAP = 7         # + trap number to deliver

MISSING = (f"{DEVICE} does not exist: lguest was removed from Linux in 4.14 (this kernel is "
           f"{os.uname().release}) and only ever ran 32-bit x86 guests on 32-bit hosts; "
           "use --backend=kvm")


def encode(request: int, *args: int, word: int = WORD) -> bytes:
    """One request as the device reads it: unsigned longs in host byte order."""
    limit = 1 << (8 * word)
    for value in (request, *args):
        if not 0 <= value < limit:
            raise GuestError(f"lguest request {request}: {value:#x} does not fit in {word} bytes")
    return struct.pack(f"<{1 + len(args)}{'I' if word == 4 else 'Q'}", request, *args)


def initialize(guest_base: int, mem_size: int, entry: int) -> bytes:
    return encode(LHREQ_INITIALIZE, guest_base, mem_size // PAGE, entry)


def irq(number: int) -> bytes:
    return encode(LHREQ_IRQ, number)


def eventfd(notify_addr: int, fd: int) -> bytes:
    return encode(LHREQ_EVENTFD, notify_addr, fd)


def getreg(offset: int) -> bytes:
    return encode(LHREQ_GETREG, offset)


def setreg(offset: int, value: int) -> bytes:
    return encode(LHREQ_SETREG, offset, value)


def trap(number: int) -> bytes:
    return encode(LHREQ_TRAP, number)


@dataclass(frozen=True)
class RunResult:
    """What one pread of the run loop meant."""

    kind: str           # "notify", "dead", "restart"
    notify_addr: int = 0


def interpret_run(data: bytes | None, err: int = 0) -> RunResult:
    """A word read: the guest notified that address. ENOENT: it died (read again
    for why). ERESTART: it asked for a reboot. Anything else is a launcher bug."""
    if data is not None and len(data) == WORD:
        return RunResult("notify", struct.unpack("<I", data)[0])
    if err == errno.ENOENT:
        return RunResult("dead")
    if err == ERESTART:
        return RunResult("restart")
    what = os.strerror(err) if err else f"a {len(data or b'')}-byte read"
    raise GuestError(f"running the lguest guest failed: {what}")


class LguestBackend:
    name = "lguest"

    def __init__(self) -> None:
        try:
            self._fd = os.open(DEVICE, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise BackendUnavailable(MISSING) from None
        except OSError as e:
            raise BackendUnavailable(f"cannot open {DEVICE}: {e.strerror}") from e
        self._mem: GuestMemory | None = None
        self._stop = threading.Event()

    def _request(self, data: bytes) -> None:
        try:
            os.write(self._fd, data)
        except OSError as e:
            raise GuestError(f"{DEVICE} refused request {data[:WORD].hex()}: {e.strerror}") from e

    def setup(self, mem: GuestMemory) -> None:
        self._mem = mem

    def add_notify(self, addr: int, value: int, fd: int) -> None:
        self._request(eventfd(addr, fd))

    def remove_notify(self, addr: int, value: int, fd: int) -> None:
        self._request(eventfd(addr, 0xFFFFFFFF))

    def add_interrupt(self, irq_number: int, fd: int) -> None:
        raise GuestError(f"the lguest backend has no irqfd for IRQ {irq_number}; its devices "
                         "interrupt with LHREQ_IRQ from the launcher")

    def run(self, entry: int, zero_page: int, tables: LongModeEntry,
            mmio: MmioHandler) -> GuestExit:
        if self._mem is None:
            raise GuestError("the lguest backend runs a guest only after setup(memory)")
        base = int(ffi.cast("uintptr_t", self._mem.host))  # the launcher's view of guest memory
        self._request(initialize(base, self._mem.size, entry))
        while not self._stop.is_set():
            try:
                result = interpret_run(os.pread(self._fd, WORD, 0))
            except OSError as e:
                result = interpret_run(None, e.errno or 0)  # a failed read always sets errno
            if result.kind == "dead":
                why = os.pread(self._fd, 1024, 0).rstrip(b"\0").decode(errors="replace")
                return GuestExit("shutdown", 0, f"the guest died: {why}")
            if result.kind == "restart":
                return GuestExit("reboot", 0, "the guest asked to reboot")
            mmio(result.notify_addr, WORD, struct.pack("<I", 0))
        return GuestExit("stopped", 0, "the guest was stopped by the launcher")

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        os.close(self._fd)
