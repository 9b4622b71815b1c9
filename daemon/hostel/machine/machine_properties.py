"""The properties a machine object shows on both of its interfaces.

org.hostel1.Machine and machined's org.freedesktop.machine1.Machine read
the same registry entry with the same names and types for these; each
interface adds its own (State differs: machined has no "exited")."""
from __future__ import annotations

from dbus_fast.service import PropertyAccess, ServiceInterface, dbus_method, dbus_property

from hostel.machine.registry import Machine


class MachineProperties(ServiceInterface):
    """A base for the two Machine interfaces; `machine` is the registry entry shown."""

    def __init__(self, interface: str, machine: Machine) -> None:
        super().__init__(interface)
        self.machine = machine

    @dbus_property(access=PropertyAccess.READ)
    def Name(self) -> "s":
        return self.machine.name

    @dbus_property(access=PropertyAccess.READ)
    def Id(self) -> "ay":
        return self.machine.id

    @dbus_property(access=PropertyAccess.READ)
    def Class(self) -> "s":
        return self.machine.klass

    @dbus_property(access=PropertyAccess.READ)
    def Service(self) -> "s":
        return self.machine.service

    @dbus_property(access=PropertyAccess.READ)
    def Unit(self) -> "s":
        return self.machine.unit

    @dbus_property(access=PropertyAccess.READ)
    def Leader(self) -> "u":
        return self.machine.leader

    @dbus_property(access=PropertyAccess.READ)
    def RootDirectory(self) -> "s":
        return self.machine.root_directory

    @dbus_property(access=PropertyAccess.READ)
    def Timestamp(self) -> "t":
        return self.machine.timestamp_us

    @dbus_property(access=PropertyAccess.READ)
    def TimestampMonotonic(self) -> "t":
        return self.machine.timestamp_monotonic_us

    @dbus_property(access=PropertyAccess.READ)
    def NetworkInterfaces(self) -> "ai":
        return self.machine.network_interfaces

    @dbus_method()
    async def GetAddresses(self) -> "a(iay)":
        """machined's Machine.GetAddresses, on both interfaces: hostelctl status and list
        show them as machinectl does (read in the machine's network namespace)."""
        from hostel.machine.machine1 import addresses  # machine1 builds on this module

        return await addresses(self.machine)
