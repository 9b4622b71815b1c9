"""org.hostel1.MachineManager: the D-Bus face of the machine registry."""
from __future__ import annotations

from dbus_fast.service import ServiceInterface, dbus_method, dbus_signal

from hostel.bus import NoSuchObject, mutating, not_implemented

MANAGER_PATH = "/org/hostel1/machine"
_PLANNED = "issue 3, the machine manager"


class MachineManagerInterface(ServiceInterface):
    def __init__(self):
        super().__init__("org.hostel1.MachineManager")

    @dbus_method()
    def ListMachines(self) -> "a(ssso)":
        return []

    @dbus_method()
    def GetMachine(self, name: "s") -> "o":
        raise NoSuchObject(f"no machine named {name!r}")

    @dbus_method()
    def GetMachineByPID(self, pid: "u") -> "o":
        raise NoSuchObject(f"process {pid} belongs to no machine")

    @dbus_method()
    @mutating
    def StartMachine(self, name: "s", settings: "a{sv}") -> "o":
        raise not_implemented(_PLANNED)

    @dbus_method()
    @mutating
    def RegisterMachine(self, name: "s", id: "ay", service: "s", machine_class: "s",
                        leader: "u", root_directory: "s") -> "o":
        raise not_implemented(_PLANNED)

    @dbus_method()
    @mutating
    def TerminateMachine(self, name: "s"):
        raise NoSuchObject(f"no machine named {name!r}")

    @dbus_method()
    @mutating
    def KillMachine(self, name: "s", who: "s", signal: "i"):
        raise NoSuchObject(f"no machine named {name!r}")

    @dbus_signal()
    def MachineNew(self, name: str, path: str) -> "so":
        return [name, path]

    @dbus_signal()
    def MachineRemoved(self, name: str, path: str) -> "so":
        return [name, path]
