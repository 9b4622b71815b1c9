"""org.hostel1.MachineServices at /org/hostel1/machine: pool machines as services.

The D-Bus face of machine/services.py (hostelctl start/enable/disable/logs);
beside org.hostel1.MachineManager on the same object."""
from __future__ import annotations

import asyncio
import os

from dbus_fast.service import PropertyAccess, ServiceInterface, dbus_method, dbus_property

from hostel.bus import Dispatcher, mutating
from hostel.machine.service import MANAGER_PATH, machine_path
from hostel.machine.services import MachineServices

INTERFACE = "org.hostel1.MachineServices"
# The reply carries a descriptor by number until dbus-fast's writer has sent it, and
# the Dispatcher sends replies without telling the method when: hosteld's copy is
# closed this long after the call (a bounded number of open log descriptors).
SENT_FD_GRACE = 30.0


class MachineServicesInterface(ServiceInterface):
    def __init__(self, services: MachineServices) -> None:
        super().__init__(INTERFACE)
        self.services = services

    @dbus_property(access=PropertyAccess.READ)
    def PoolDirectories(self) -> "as":
        """Where NAME is looked for, in order (HOSTEL_MACHINE_POOL replaces the list)."""
        return self.services.pool_dirs()

    @dbus_method()
    def ListEnabled(self) -> "as":
        return self.services.enabled()

    @dbus_method()
    @mutating
    async def StartFromPool(self, name: "s") -> "o":
        machine = await self.services.start(name)
        return machine_path(machine.name)

    @dbus_method()
    @mutating
    async def Enable(self, name: "s") -> "a(sss)":
        """systemd's EnableUnitFiles changes: (type, symlink, destination)."""
        return [change.as_dbus() for change in await self.services.enable(name)]

    @dbus_method()
    @mutating
    async def Disable(self, name: "s") -> "a(sss)":
        return [change.as_dbus() for change in await self.services.disable(name)]

    @dbus_method()
    @mutating
    async def OpenConsoleLog(self, name: "s") -> "h":
        """A read-only descriptor of NAME's console log: root only, like ConsoleLog."""
        fd = await self.services.open_log(name)
        asyncio.get_running_loop().call_later(SENT_FD_GRACE, os.close, fd)
        return fd


def export(dispatcher: Dispatcher, services: MachineServices) -> MachineServicesInterface:
    interface = MachineServicesInterface(services)
    dispatcher.export(MANAGER_PATH, interface)
    return interface
