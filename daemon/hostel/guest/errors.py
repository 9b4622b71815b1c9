"""The guest manager's errors: each names the guest, file or device at fault."""
from __future__ import annotations

from hostel.errors import ERROR_PREFIX, HostelError


class GuestError(HostelError):
    """The guest could not be set up or run."""

    dbus_name = f"{ERROR_PREFIX}.GuestFailed"


class BadKernel(GuestError):
    """The kernel (or initrd) file is malformed or does not fit in guest memory."""

    dbus_name = f"{ERROR_PREFIX}.BadKernel"


class BackendUnavailable(GuestError):
    """The hypervisor backend cannot run here (no /dev/kvm, no /dev/lguest)."""

    dbus_name = f"{ERROR_PREFIX}.BackendUnavailable"
