"""org.hostel1.CryptsetupManager: the D-Bus face of the volume manager."""
from __future__ import annotations

from dbus_fast.service import ServiceInterface, dbus_method

from hostel.bus import NoSuchObject, mutating, not_implemented

MANAGER_PATH = "/org/hostel1/cryptsetup"
_PLANNED = "issue 4, the cryptsetup manager"


class CryptsetupManagerInterface(ServiceInterface):
    def __init__(self):
        super().__init__("org.hostel1.CryptsetupManager")

    @dbus_method()
    def ListVolumes(self) -> "a(ssso)":
        raise not_implemented(_PLANNED)

    @dbus_method()
    @mutating
    def Attach(self, name: "s", options: "a{sv}"):
        raise not_implemented(_PLANNED)

    @dbus_method()
    @mutating
    def Detach(self, name: "s"):
        raise NoSuchObject(f"no volume named {name!r}")

    @dbus_method()
    @mutating
    def CheckKey(self, name: "s", options: "a{sv}") -> "b":
        raise not_implemented(_PLANNED)

    @dbus_method()
    @mutating
    def Reload(self):
        raise not_implemented(_PLANNED)
