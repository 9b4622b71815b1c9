"""org.freedesktop.machine1: machined's API, so machinectl works against hosteld.

Served only when no systemd-machined holds the name; backed by the same
registry as org.hostel1, so both APIs always agree. Types and semantics follow
org.freedesktop.machine1(5). Images are the machine pool's trees and raw
images (machine1_images.py, pool_images.py); copy-to/copy-from/bind act on a
running container through container_files.py. When a real machined is on the bus,
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

from hostel.bus import (Dispatcher, HostelError, InvalidArgs, NoSuchObject, escape_path_label,
                        mutating)
from hostel.machine import container_files, enter, pool_images
from hostel.machine import network as machine_network
from hostel.machine import pool
from hostel.machine.machine1_guests import (GuestControl, NotSupported, VmMachine, VmMachines,
                                            containers_only)
from hostel.machine.machine1_images import ImagePool, image_path, run_long
from hostel.machine.machine_properties import MachineProperties
from hostel.machine.pool_images import Image, paths_equal
from hostel.machine.registry import Event, Machine, Registry, State

log = logging.getLogger(__name__)

BUS_NAME = "org.freedesktop.machine1"
MANAGER_PATH = "/org/freedesktop/machine1"
MACHINE_PREFIX = "/org/freedesktop/machine1/machine"
MACHINE_COPY_REPLACE = 1  # machined's CopyTo/FromMachineWithFlags flag (machinectl --force)


class NoSuchMachine(HostelError):
    dbus_name = "org.freedesktop.machine1.NoSuchMachine"


def machine_path(name: str) -> str:
    return f"{MACHINE_PREFIX}/{escape_path_label(name)}"


def _copy_flags(flags: int) -> bool:
    """Whether to replace existing files; machined refuses unknown flags."""
    if flags & ~MACHINE_COPY_REPLACE:
        raise InvalidArgs(f"Invalid 'flags' parameter '{flags}'")
    return bool(flags & MACHINE_COPY_REPLACE)


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
    async def GetOSRelease(self) -> "a{ss}":
        return await self.compat.os_release(self.machine)

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

    @dbus_method()
    @mutating
    async def CopyFrom(self, source: "s", destination: "s"):
        await self.compat.copy(self.machine, source, destination, False, 0)

    @dbus_method()
    @mutating
    async def CopyFromWithFlags(self, source: "s", destination: "s", flags: "t"):
        await self.compat.copy(self.machine, source, destination, False, flags)

    @dbus_method()
    @mutating
    async def CopyTo(self, source: "s", destination: "s"):
        await self.compat.copy(self.machine, source, destination, True, 0)

    @dbus_method()
    @mutating
    async def CopyToWithFlags(self, source: "s", destination: "s", flags: "t"):
        await self.compat.copy(self.machine, source, destination, True, flags)

    @dbus_method()
    @mutating
    async def BindMount(self, source: "s", destination: "s", read_only: "b", mkdir: "b"):
        await self.compat.bind_mount(self.machine, source, destination or source, read_only,
                                     mkdir)


class Machine1Manager(ServiceInterface):
    def __init__(self, compat: "Machine1Service") -> None:
        super().__init__("org.freedesktop.machine1.Manager")
        self.compat = compat

    def _get(self, name: str, what: str = "This call") -> Machine:
        """A container machine; a VM guest's name is refused as machined refuses
        container-only calls on a VM."""
        return self.compat.get(name, what)

    def _vm(self, name: str) -> VmMachine | None:
        return self.compat.vms.get(name)

    @dbus_property(access=PropertyAccess.READ)
    def PoolPath(self) -> "s":
        return self.compat.pool_dirs()[0]  # where clones go, as /var/lib/machines for machined

    @dbus_property(access=PropertyAccess.READ)
    def PoolUsage(self) -> "t":
        # machined 252 reads it from the pool's btrfs quota group and reports 2^64-1
        # (unknown) for any other pool; hostel sets no quota groups
        return 2**64 - 1

    @dbus_property(access=PropertyAccess.READ)
    def PoolLimit(self) -> "t":
        return 2**64 - 1

    @dbus_method()
    def ListMachines(self) -> "a(ssso)":
        listed = [[m.name, m.klass, m.service, machine_path(m.name)]
                  for m in self.compat.registry.all() if m.state is not State.EXITED]
        return listed + self.compat.vms.listed()

    @dbus_method()
    def GetMachine(self, name: "s") -> "o":
        if self._vm(name) is not None:
            return machine_path(name)
        return machine_path(self._get(name).name)

    @dbus_method()
    def GetMachineByPID(self, pid: "u") -> "o":
        from hostel.machine.service import pid_in_machine

        vm = self.compat.vms.by_pid(pid)
        if vm is not None:
            return machine_path(vm)
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
        self.compat.registry.remove(self._get(name, "Unregistering (a hostel VM guest ends "
                                                   "by TerminateMachine)"))

    @dbus_method()
    @mutating
    async def TerminateMachine(self, name: "s"):
        vm = self._vm(name)
        if vm is not None:
            await vm.terminate()
            return
        await self.compat.service.terminate(self._get(name))

    @dbus_method()
    @mutating
    def KillMachine(self, name: "s", who: "s", signal: "i"):
        vm = self._vm(name)
        if vm is not None:
            vm.kill(who, signal)
            return
        self.compat.service.kill(self._get(name), who, signal)

    @dbus_method()
    async def GetMachineAddresses(self, name: "s") -> "a(iay)":
        return await addresses(self._get(name, "Requesting IP address data"))

    @dbus_method()
    async def GetMachineOSRelease(self, name: "s") -> "a{ss}":
        return await self.compat.os_release(self._get(name, "Requesting OS release data"))

    @dbus_method()
    def GetMachineUIDShift(self, name: "s") -> "u":
        return self.compat.uid_shift(self._get(name, "Determining the UID/GID shift"))

    @dbus_method()
    @mutating
    def OpenMachinePTY(self, name: "s") -> "hs":
        return self.compat.open_pty(self._get(name, "Opening pseudo TTYs"))

    @dbus_method()
    @mutating
    def OpenMachineLogin(self, name: "s") -> "hs":
        raise self.compat.no_login(self._get(name, "Opening logins"))

    @dbus_method()
    @mutating
    async def OpenMachineShell(self, name: "s", user: "s", path: "s", args: "as",
                               environment: "as") -> "hs":
        return await self.compat.open_shell(self._get(name, "Opening shells"), user, path,
                                            args, environment)

    # Images: the machine pool (machine1_images.py)

    @dbus_method()
    async def ListImages(self) -> "a(ssbttto)":
        return [ImagePool.list_entry(image) for image in await self.compat.images.discover()]

    @dbus_method()
    async def GetImage(self, name: "s") -> "o":
        """The pool image's object (machinectl start/enable/disable check that it exists)."""
        return image_path((await self.compat.images.get(name)).name)

    @dbus_method()
    async def GetImageHostname(self, name: "s") -> "s":
        return await self.compat.images.metadata(name, pool_images.hostname)

    @dbus_method()
    async def GetImageMachineID(self, name: "s") -> "ay":
        return await self.compat.images.metadata(name, pool_images.machine_id)

    @dbus_method()
    async def GetImageMachineInfo(self, name: "s") -> "a{ss}":
        return await self.compat.images.metadata(name, pool_images.machine_info)

    @dbus_method()
    async def GetImageOSRelease(self, name: "s") -> "a{ss}":
        return await self.compat.images.metadata(name, pool_images.os_release)

    @dbus_method()
    @mutating
    async def RemoveImage(self, name: "s"):
        await self.compat.images.remove(name)

    @dbus_method()
    @mutating
    async def RenameImage(self, name: "s", new_name: "s"):
        await self.compat.images.rename(name, new_name)

    @dbus_method()
    @mutating
    async def CloneImage(self, name: "s", new_name: "s", read_only: "b"):
        await self.compat.images.clone(name, new_name, read_only)

    @dbus_method()
    @mutating
    async def MarkImageReadOnly(self, name: "s", read_only: "b"):
        await self.compat.images.mark_read_only(name, read_only)

    @dbus_method()
    @mutating
    async def SetPoolLimit(self, size: "t"):
        await self.compat.images.set_limit(None, size)

    @dbus_method()
    @mutating
    async def SetImageLimit(self, name: "s", size: "t"):
        await self.compat.images.set_limit(name, size)

    # Files into and out of running containers (container_files.py)

    @dbus_method()
    @mutating
    async def CopyFromMachine(self, name: "s", source: "s", destination: "s"):
        await self.compat.copy(self._get(name, "Copying files"), source, destination, False, 0)

    @dbus_method()
    @mutating
    async def CopyFromMachineWithFlags(self, name: "s", source: "s", destination: "s",
                                       flags: "t"):
        await self.compat.copy(self._get(name, "Copying files"), source, destination, False, flags)

    @dbus_method()
    @mutating
    async def CopyToMachine(self, name: "s", source: "s", destination: "s"):
        await self.compat.copy(self._get(name, "Copying files"), source, destination, True, 0)

    @dbus_method()
    @mutating
    async def CopyToMachineWithFlags(self, name: "s", source: "s", destination: "s",
                                     flags: "t"):
        await self.compat.copy(self._get(name, "Copying files"), source, destination, True, flags)

    @dbus_method()
    @mutating
    async def BindMountMachine(self, name: "s", source: "s", destination: "s",
                               read_only: "b", mkdir: "b"):
        await self.compat.bind_mount(self._get(name, "Bind mounting"), source, destination or source,
                                     read_only, mkdir)

    @dbus_method()
    @mutating
    async def CleanPool(self, mode: "s") -> "a(st)":
        return await self.compat.images.clean(mode)

    @dbus_signal()
    def MachineNew(self, name: str, path: str) -> "so":
        return [name, path]

    @dbus_signal()
    def MachineRemoved(self, name: str, path: str) -> "so":
        return [name, path]


class Machine1Service:
    """Owns the compat objects, following the registry like MachineService does."""

    def __init__(self, dispatcher: Dispatcher, registry: Registry, service: Any,
                 guests: GuestControl) -> None:
        self.dispatcher = dispatcher
        self.registry = registry
        self.service = service  # hostel.machine.service.MachineService
        self.manager = Machine1Manager(self)
        self.objects: dict[str, Machine1Machine] = {}
        # the VM guests, kept by the guest manager: machines of class vm here
        self.vms = VmMachines(dispatcher, guests, machine_path, self._announce,
                              lambda name: name in self.objects)
        self.images = ImagePool(dispatcher, self.pool_dirs, self.machines_using)

    def pool_dirs(self) -> list[str]:
        return pool.pool_dirs(self.service.machines_dir.parent)

    def machines_using(self, image: Image) -> list[str]:
        """Running machines whose tree or disk image is `image`."""
        def paths(m: Machine) -> list[str]:
            given = [getattr(m.settings.get(k), "value", m.settings.get(k))
                     for k in ("Directory", "Image", "Template")]
            return [p for p in [m.root_directory, *given] if isinstance(p, str) and p]

        return sorted(m.name for m in self.registry.all() if m.state is not State.EXITED
                      and any(paths_equal(p, image.path) for p in paths(m)))

    def _running_container(self, machine: Machine, what: str) -> int:
        if machine.klass != "container":
            raise NotSupported(f"{what} is only supported on container machines.")
        if machine.state is not State.RUNNING or not machine.leader:
            raise NotSupported(f"{what}: machine {machine.name} is not running")
        return machine.leader

    async def copy(self, machine: Machine, source: str, destination: str, to_machine: bool,
                   flags: int) -> None:
        """machinectl copy-to (host source) and copy-from (container source)."""
        leader = self._running_container(machine, "Copying files")
        replace = _copy_flags(flags)
        host, inside = (source, destination) if to_machine else (destination, source)
        request = container_files.Copy(leader, host, inside or host, replace,
                                       self.uid_shift(machine))
        work = container_files.copy_to if to_machine else container_files.copy_from
        await run_long(work, request)

    async def bind_mount(self, machine: Machine, source: str, destination: str,
                         read_only: bool, mkdir: bool) -> None:
        leader = self._running_container(machine, "Bind mounting")
        mount_fd = await asyncio.to_thread(container_files.prepare_bind, leader, source,
                                           destination, read_only, mkdir,
                                           self.uid_shift(machine))
        await container_files.attach(leader, mount_fd, source, destination)

    def export(self) -> None:
        self.dispatcher.export(MANAGER_PATH, self.manager)
        for machine in self.registry.all():
            self._on_registry(Event.NEW, machine, {})
        self.registry.subscribe(self._on_registry)
        self.vms.follow()

    def _announce(self, name: str, path: str, new: bool) -> None:
        if new:
            self.manager.MachineNew(name, path)
        else:
            self.manager.MachineRemoved(name, path)

    def _on_registry(self, event: Event, machine: Machine, changed: dict[str, Any]) -> None:
        path = machine_path(machine.name)
        if event is Event.NEW:
            self.objects[machine.name] = Machine1Machine(machine, self)
            self.dispatcher.export(path, self.objects[machine.name])
            self.manager.MachineNew(machine.name, path)
        elif event is Event.CHANGED and machine.name in self.objects:
            props: dict[str, object] = {}
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

    def get(self, name: str, what: str = "This call") -> Machine:
        """The registry's machine; `what` names the call refused on a VM guest's name."""
        try:
            return self.registry.get(name)
        except NoSuchObject as e:
            if self.vms.get(name) is not None:
                raise containers_only(f"{what} (machine {name} is a VM)") from None
            raise NoSuchMachine(str(e)) from None

    @staticmethod
    async def os_release(machine: Machine) -> dict[str, str]:
        from hostel.machine.service import os_release

        return await os_release(machine)

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
