"""org.freedesktop.machine1: machined's API, so machinectl works against hosteld.

Served only when no systemd-machined holds the name; backed by the same
registry as org.hostel1, so both APIs always agree. Types and semantics follow
org.freedesktop.machine1(5). Image methods, which hostel has no notion of,
answer NotSupported instead of pretending. When a real machined is on the bus,
hosteld registers its containers there instead (as the nspawn seed's
register_machine does)."""
from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Any

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus
from dbus_fast.service import PropertyAccess, ServiceInterface, dbus_method, dbus_property, dbus_signal

from hostel.bus import Dispatcher, HostelError, NoSuchObject, escape_path_label, mutating
from hostel.machine import enter
from hostel.machine import network as machine_network
from hostel.machine.machine_properties import MachineProperties
from hostel.machine.registry import Event, Machine, Registry, State

log = logging.getLogger(__name__)

BUS_NAME = "org.freedesktop.machine1"
MANAGER_PATH = "/org/freedesktop/machine1"
MACHINE_PREFIX = "/org/freedesktop/machine1/machine"


class NoSuchMachine(HostelError):
    dbus_name = "org.freedesktop.machine1.NoSuchMachine"


class NoSuchImage(HostelError):
    dbus_name = "org.freedesktop.machine1.NoSuchImage"


class NotSupported(HostelError):
    dbus_name = "org.freedesktop.DBus.Error.NotSupported"


def machine_path(name: str) -> str:
    return f"{MACHINE_PREFIX}/{escape_path_label(name)}"


def _no_images(what: str) -> NotSupported:
    return NotSupported(f"{what}: hostel manages no machine images (machinectl's image "
                        "commands); use hostelctl image for guest images")


def _machined_state(machine: Machine) -> str:
    """machined knows opening, running and closing; an exited machine is closing."""
    return "closing" if machine.state is State.EXITED else machine.state.value


async def addresses(machine: Machine) -> list[list[Any]]:
    """a(iay): the container's addresses, read inside its network namespace (in a thread)."""
    if not machine.leader:
        return []
    try:
        found = await asyncio.to_thread(machine_network.interface_addresses, machine.leader)
    except (HostelError, OSError) as e:
        log.debug("addresses of machine %s: %s", machine.name, e)
        return []
    return [[family, socket.inet_pton(family, address)] for family, address in found]


class Machine1Machine(MachineProperties):
    def __init__(self, machine: Machine, compat: "Machine1Service") -> None:
        super().__init__("org.freedesktop.machine1.Machine", machine)
        self.compat = compat

    @dbus_property(access=PropertyAccess.READ)
    def State(self) -> "s":
        return _machined_state(self.machine)

    @dbus_method()
    @mutating
    async def Terminate(self):
        await self.compat.service.terminate(self.machine)

    @dbus_method()
    @mutating
    def Kill(self, who: "s", signal: "i"):
        self.compat.service.kill(self.machine, who, signal)

    @dbus_method()
    async def GetAddresses(self) -> "a(iay)":
        return await addresses(self.machine)

    @dbus_method()
    def GetOSRelease(self) -> "a{ss}":
        return self.compat.os_release(self.machine)

    @dbus_method()
    def GetUIDShift(self) -> "u":
        return self.compat.uid_shift(self.machine)

    @dbus_method()
    @mutating
    def OpenPTY(self) -> "hs":
        return self.compat.open_pty(self.machine)

    @dbus_method()
    @mutating
    def OpenLogin(self) -> "hs":
        raise self.compat.no_login(self.machine)

    @dbus_method()
    @mutating
    async def OpenShell(self, user: "s", path: "s", args: "as", environment: "as") -> "hs":
        return await self.compat.open_shell(self.machine, user, path, args, environment)


class Machine1Manager(ServiceInterface):
    def __init__(self, compat: "Machine1Service") -> None:
        super().__init__("org.freedesktop.machine1.Manager")
        self.compat = compat

    def _get(self, name: str) -> Machine:
        return self.compat.get(name)

    @dbus_property(access=PropertyAccess.READ)
    def PoolPath(self) -> "s":
        return str(self.compat.service.machines_dir)

    @dbus_property(access=PropertyAccess.READ)
    def PoolUsage(self) -> "t":
        return 2**64 - 1  # unknown, as machined reports it for a non-btrfs pool

    @dbus_property(access=PropertyAccess.READ)
    def PoolLimit(self) -> "t":
        return 2**64 - 1

    @dbus_method()
    def ListMachines(self) -> "a(ssso)":
        return [[m.name, m.klass, m.service, machine_path(m.name)]
                for m in self.compat.registry.all() if m.state is not State.EXITED]

    @dbus_method()
    def GetMachine(self, name: "s") -> "o":
        return machine_path(self._get(name).name)

    @dbus_method()
    def GetMachineByPID(self, pid: "u") -> "o":
        from hostel.machine.service import pid_in_machine

        try:
            return machine_path(self.compat.registry.by_pid(pid, pid_in_machine).name)
        except NoSuchObject as e:
            raise NoSuchMachine(str(e)) from None

    @dbus_method()
    @mutating
    def RegisterMachine(self, name: "s", id: "ay", service: "s", machine_class: "s",
                        leader: "u", root_directory: "s") -> "o":
        return self._register(name, id, service, machine_class, leader, root_directory, [])

    @dbus_method()
    @mutating
    def RegisterMachineWithNetwork(self, name: "s", id: "ay", service: "s", machine_class: "s",
                                   leader: "u", root_directory: "s", ifindices: "ai") -> "o":
        return self._register(name, id, service, machine_class, leader, root_directory,
                              list(ifindices))

    @dbus_method()
    @mutating
    def CreateMachine(self, name: "s", id: "ay", service: "s", machine_class: "s", leader: "u",
                      root_directory: "s", scope_properties: "a(sv)") -> "o":
        # machined would put the leader in a new scope unit; without systemd there is
        # none to create, so the machine is registered where it is.
        return self._register(name, id, service, machine_class, leader, root_directory, [])

    @dbus_method()
    @mutating
    def CreateMachineWithNetwork(self, name: "s", id: "ay", service: "s", machine_class: "s",
                                 leader: "u", root_directory: "s", ifindices: "ai",
                                 scope_properties: "a(sv)") -> "o":
        return self._register(name, id, service, machine_class, leader, root_directory,
                              list(ifindices))

    def _register(self, name: str, machine_id: bytes, service: str, klass: str, leader: int,
                  root_directory: str, ifindices: list[int]) -> str:
        self.compat.service.register(name, bytes(machine_id), service, klass, leader,
                                     root_directory)
        if ifindices:
            self.compat.registry.update(self._get(name), network_interfaces=ifindices)
        return machine_path(name)

    @dbus_method()
    @mutating
    async def UnregisterMachine(self, name: "s"):
        self.compat.registry.remove(self._get(name))

    @dbus_method()
    @mutating
    async def TerminateMachine(self, name: "s"):
        await self.compat.service.terminate(self._get(name))

    @dbus_method()
    @mutating
    def KillMachine(self, name: "s", who: "s", signal: "i"):
        self.compat.service.kill(self._get(name), who, signal)

    @dbus_method()
    async def GetMachineAddresses(self, name: "s") -> "a(iay)":
        return await addresses(self._get(name))

    @dbus_method()
    def GetMachineOSRelease(self, name: "s") -> "a{ss}":
        return self.compat.os_release(self._get(name))

    @dbus_method()
    def GetMachineUIDShift(self, name: "s") -> "u":
        return self.compat.uid_shift(self._get(name))

    @dbus_method()
    @mutating
    def OpenMachinePTY(self, name: "s") -> "hs":
        return self.compat.open_pty(self._get(name))

    @dbus_method()
    @mutating
    def OpenMachineLogin(self, name: "s") -> "hs":
        raise self.compat.no_login(self._get(name))

    @dbus_method()
    @mutating
    async def OpenMachineShell(self, name: "s", user: "s", path: "s", args: "as",
                               environment: "as") -> "hs":
        return await self.compat.open_shell(self._get(name), user, path, args, environment)

    # Images: hostel has none of machined's kind.

    @dbus_method()
    def ListImages(self) -> "a(ssbttto)":
        raise _no_images("ListImages")

    @dbus_method()
    def GetImage(self, name: "s") -> "o":
        raise _no_images("GetImage")

    @dbus_method()
    @mutating
    def RemoveImage(self, name: "s"):
        raise _no_images("RemoveImage")

    @dbus_method()
    @mutating
    def RenameImage(self, name: "s", new_name: "s"):
        raise _no_images("RenameImage")

    @dbus_method()
    @mutating
    def CloneImage(self, name: "s", new_name: "s", read_only: "b"):
        raise _no_images("CloneImage")

    @dbus_method()
    @mutating
    def MarkImageReadOnly(self, name: "s", read_only: "b"):
        raise _no_images("MarkImageReadOnly")

    @dbus_method()
    @mutating
    def SetPoolLimit(self, size: "t"):
        raise _no_images("SetPoolLimit")

    @dbus_method()
    @mutating
    def CleanPool(self, mode: "s") -> "a(st)":
        raise _no_images("CleanPool")

    @dbus_signal()
    def MachineNew(self, name: str, path: str) -> "so":
        return [name, path]

    @dbus_signal()
    def MachineRemoved(self, name: str, path: str) -> "so":
        return [name, path]


class Machine1Service:
    """Owns the compat objects, following the registry like MachineService does."""

    def __init__(self, dispatcher: Dispatcher, registry: Registry, service: Any) -> None:
        self.dispatcher = dispatcher
        self.registry = registry
        self.service = service  # hostel.machine.service.MachineService
        self.manager = Machine1Manager(self)
        self.objects: dict[str, Machine1Machine] = {}

    def export(self) -> None:
        self.dispatcher.export(MANAGER_PATH, self.manager)
        for machine in self.registry.all():
            self._on_registry(Event.NEW, machine, {})
        self.registry.subscribe(self._on_registry)

    def _on_registry(self, event: Event, machine: Machine, changed: dict[str, Any]) -> None:
        path = machine_path(machine.name)
        if event is Event.NEW:
            self.objects[machine.name] = Machine1Machine(machine, self)
            self.dispatcher.export(path, self.objects[machine.name])
            self.manager.MachineNew(machine.name, path)
        elif event is Event.CHANGED and machine.name in self.objects:
            props = {}
            if "state" in changed:
                props["State"] = _machined_state(machine)
            if "leader" in changed:
                props["Leader"] = machine.leader
            if "network_interfaces" in changed:
                props["NetworkInterfaces"] = machine.network_interfaces
            if props:
                self.objects[machine.name].emit_properties_changed(props)
        elif event is Event.REMOVED and machine.name in self.objects:
            self.dispatcher.unexport(path, self.objects.pop(machine.name))
            self.manager.MachineRemoved(machine.name, path)

    def get(self, name: str) -> Machine:
        try:
            return self.registry.get(name)
        except NoSuchObject as e:
            raise NoSuchMachine(str(e)) from None

    @staticmethod
    def os_release(machine: Machine) -> dict[str, str]:
        from hostel.machine.service import os_release

        return os_release(machine)

    @staticmethod
    def uid_shift(machine: Machine) -> int:
        if not machine.leader:
            return 0
        first = open(f"/proc/{machine.leader}/uid_map").read().split()
        return int(first[1]) if first and first[0] == "0" else 0

    @staticmethod
    def open_pty(machine: Machine) -> list[Any]:
        pty, slave = enter.open_pty(machine)
        os.close(slave)
        return [pty.master, pty.path]

    @staticmethod
    def no_login(machine: Machine) -> HostelError:
        return NotSupported(f"machine {machine.name}: no getty hostel can reach (machined "
                            "starts one through systemd inside the container); use "
                            "'machinectl shell' instead")

    @staticmethod
    async def open_shell(machine: Machine, user: str, path: str, args: list[str],
                         env: list[str]) -> list[Any]:
        pty = await enter.open_shell(machine, user, path, args, env)
        return [pty.master, pty.path]


async def register_with_machined(bus: MessageBus, registry: Registry) -> None:
    """A real machined owns the name: tell it about our containers as nspawn does."""
    def manager_call(member: str, signature: str, body: list[Any]) -> None:
        bus.send(Message(destination=BUS_NAME, path=MANAGER_PATH,
                         interface="org.freedesktop.machine1.Manager", member=member,
                         signature=signature, body=body))

    def on_event(event: Event, machine: Machine, changed: dict[str, Any]) -> None:
        if machine.registered_only:
            return  # registered with us by someone else; machined is theirs to tell
        if event is Event.CHANGED and changed.get("state") is State.RUNNING:
            manager_call("RegisterMachineWithNetwork", "sayssusai",
                         [machine.name, machine.id, "hostel", machine.klass, machine.leader,
                          machine.root_directory, machine.network_interfaces])
        elif event is Event.REMOVED:
            # machined cannot see the end of a process outside any systemd unit: tell it.
            manager_call("UnregisterMachine", "s", [machine.name])

    registry.subscribe(on_event)
    log.info("systemd-machined owns %s: registering hostel's machines with it", BUS_NAME)


async def name_has_owner(bus: MessageBus, name: str) -> bool:
    reply = await bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                                   interface="org.freedesktop.DBus", member="NameHasOwner",
                                   signature="s", body=[name]))
    return reply.message_type == MessageType.METHOD_RETURN and reply.body[0]
