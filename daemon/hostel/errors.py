"""The error classes every layer raises: each maps to one D-Bus error name.

They live apart from the D-Bus glue (hostel.bus re-exports them) so that the
guest launcher and other processes that never talk D-Bus can raise them
without importing dbus_fast and asyncio."""
from __future__ import annotations

ERROR_PREFIX = "org.hostel1.Error"
ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"
INVALID_ARGS = "org.freedesktop.DBus.Error.InvalidArgs"


class HostelError(Exception):
    """An error a caller can act on; its class decides the D-Bus error name."""

    dbus_name = f"{ERROR_PREFIX}.Failed"


class NotImplementedYet(HostelError):
    dbus_name = f"{ERROR_PREFIX}.NotImplemented"


class NoSuchObject(HostelError):
    dbus_name = f"{ERROR_PREFIX}.NoSuchObject"


class AlreadyExists(HostelError):
    dbus_name = f"{ERROR_PREFIX}.AlreadyExists"


class NotSupported(HostelError):
    dbus_name = f"{ERROR_PREFIX}.NotSupported"


class InvalidArgs(HostelError):
    dbus_name = INVALID_ARGS


class AccessDenied(HostelError):
    dbus_name = ACCESS_DENIED
