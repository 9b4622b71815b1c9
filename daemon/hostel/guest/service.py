"""org.hostel1.GuestManager: the D-Bus face of guests and images."""
from __future__ import annotations

from dbus_fast.service import ServiceInterface, dbus_method

from hostel.bus import NoSuchObject, mutating, not_implemented

MANAGER_PATH = "/org/hostel1/guest"
_LAUNCHER = "issue 5, the guest launcher"
_IMAGES = "issue 6, OCI images"


class GuestManagerInterface(ServiceInterface):
    def __init__(self):
        super().__init__("org.hostel1.GuestManager")

    @dbus_method()
    def ListGuests(self) -> "a(ssso)":
        return []

    @dbus_method()
    @mutating
    def StartGuest(self, name: "s", settings: "a{sv}") -> "o":
        raise not_implemented(_LAUNCHER)

    @dbus_method()
    @mutating
    def TerminateGuest(self, name: "s"):
        raise NoSuchObject(f"no guest named {name!r}")

    @dbus_method()
    @mutating
    def ImportImage(self, path: "s", name: "s") -> "s":
        raise not_implemented(_IMAGES)

    @dbus_method()
    def ListImages(self) -> "a(sst)":
        return []

    @dbus_method()
    @mutating
    def RemoveImage(self, name: "s"):
        raise NoSuchObject(f"no image named {name!r}")
