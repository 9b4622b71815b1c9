"""The hypervisor backend interface the launcher drives.

Two implementations: `kvm` (runs guests) and `lguest` (speaks the /dev/lguest
protocol of the original launcher; no kernel since 4.14 has the device)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from hostel.guest.boot import LongModeEntry
from hostel.guest.memory import GuestMemory

# (address, size in bytes, data for a write or None for a read) -> data for a read
MmioHandler = Callable[[int, int, bytes | None], bytes]


@dataclass(frozen=True)
class GuestExit:
    """Why the guest ended: a short reason word, a code and a sentence for people."""

    reason: str        # "poweroff", "shutdown", "stopped", "internal-error", "failed-entry", "error"
    code: int
    detail: str


class Backend(Protocol):
    name: str

    def setup(self, mem: GuestMemory) -> None:
        """Create the VM around guest memory (and its interrupt controller)."""

    def add_notify(self, addr: int, value: int, fd: int) -> None:
        """A guest write of `value` to MMIO `addr` signals eventfd `fd` (queue kick)."""

    def remove_notify(self, addr: int, value: int, fd: int) -> None:
        """Undo add_notify (the queue was reset)."""

    def add_interrupt(self, irq: int, fd: int) -> None:
        """Signalling eventfd `fd` raises guest interrupt `irq` (queue completion)."""

    def run(self, entry: int, zero_page: int, tables: LongModeEntry,
            mmio: MmioHandler) -> GuestExit:
        """Run the guest until it ends; blocks the calling thread."""

    def stop(self) -> None:
        """Make run() return with reason "stopped"; callable from any thread."""

    def close(self) -> None:
        """Release the VM."""
