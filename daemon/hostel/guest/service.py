"""org.hostel1.GuestManager and org.hostel1.Guest: the D-Bus face of guests and images."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Awaitable, Callable, Union

from dbus_fast import Variant
from dbus_fast.service import (PropertyAccess, ServiceInterface, dbus_method, dbus_property,
                               dbus_signal)

from hostel.bus import (AlreadyExists, Dispatcher, InvalidArgs, escape_path_label, mutating,
                        secrets_visible)
from hostel.guest import console_attach
from hostel.guest.container_guest import ContainerGuest, is_image_run
from hostel.guest.images_service import GuestRunSettings, ImageService, machine_name
from hostel.guest.manager import EXITED, Guest, GuestManager
from hostel.machine.registry import Event, Machine, Registry, State
from hostel.guest.settings import BlockSpec, GuestSettings, parse_tunnet, validate_name
from hostel.settingsdict import unwrap

log = logging.getLogger(__name__)

MANAGER_PATH = "/org/hostel1/guest"
# What an org.hostel1.Guest object shows: a VM (the guest manager's) or an image run's
# container (the machine runtime's), through the same attributes.
GuestView = Union[Guest, ContainerGuest]

# StartGuest key -> (D-Bus signature, GuestSettings field)
SETTINGS_KEYS = {
    "Kernel": ("s", "kernel"), "Initrd": ("s", "initrd"), "CommandLine": ("s", "cmdline"),
    "MemoryMB": ("u", "memory_mb"), "Block": ("a(sb)", "block"), "Network": ("as", "network"),
    "Rng": ("b", "rng"), "Console": ("h", None), "ConsoleInput": ("h", None),
    "ClientAlive": ("h", None),
    "ConsoleLog": ("s", "console_log"),
    "Backend": ("s", "backend"), "Chroot": ("s", "chroot"), "User": ("s", "username"),
    "Verbose": ("b", "verbose"), "CPUs": ("u", "cpus"), "OnReboot": ("s", "on_reboot"),
}
_PATH_FIELDS = ("kernel", "initrd", "console_log", "chroot")
_SIGNATURES = {key: signature for key, (signature, _field) in SETTINGS_KEYS.items()}


def guest_path(name: str) -> str:
    return f"{MANAGER_PATH}/{escape_path_label(name)}"


def settings_from_dbus(settings: dict[str, Variant]) -> tuple[GuestSettings, dict[str, int]]:
    """StartGuest's a{sv} -> GuestSettings and the console fds passed (by key)."""
    values: dict[str, Any] = {}
    fds: dict[str, int] = {}
    raw = unwrap(settings, _SIGNATURES, "guest setting")
    for key, value in raw.items():
        name = SETTINGS_KEYS[key][1]
        if name is None:
            fds[key] = value
        elif name in _PATH_FIELDS:
            values[name] = Path(value) if value else None
        elif name == "block":
            values[name] = tuple(BlockSpec(Path(path), read_only) for path, read_only in value)
        elif name == "network":
            values[name] = tuple(parse_tunnet(arg) for arg in value)
        else:
            values[name] = value
    for required in ("Kernel", "MemoryMB"):
        if required not in settings:
            raise InvalidArgs(f"guest setting {required} is required")
    return GuestSettings(**values), fds


class GuestInterface(ServiceInterface):
    """org.hostel1.Guest: one guest's state, why it ended, where its console went."""

    def __init__(self, guest: GuestView, terminate: Callable[[str], Awaitable[None]]) -> None:
        super().__init__("org.hostel1.Guest")
        self.guest = guest
        self._terminate = terminate

    @dbus_property(access=PropertyAccess.READ)
    def Name(self) -> "s":
        return self.guest.name

    @dbus_property(access=PropertyAccess.READ)
    def Class(self) -> "s":
        """machined's class: "vm" or "container" (the isolation it runs in)."""
        return self.guest.klass

    @dbus_property(access=PropertyAccess.READ)
    def Image(self) -> "s":
        """The image it runs ("" for a launched kernel)."""
        return self.guest.image

    @dbus_property(access=PropertyAccess.READ)
    def State(self) -> "s":
        return self.guest.state

    @dbus_property(access=PropertyAccess.READ)
    def MemoryMB(self) -> "u":
        return self.guest.memory_mb

    @dbus_property(access=PropertyAccess.READ)
    def Kernel(self) -> "s":
        return self.guest.kernel

    @dbus_property(access=PropertyAccess.READ)
    def Backend(self) -> "s":
        return self.guest.backend

    @dbus_property(access=PropertyAccess.READ)
    def Devices(self) -> "as":
        return self.guest.devices()

    @dbus_property(access=PropertyAccess.READ)
    def Leader(self) -> "u":
        return self.guest.pid

    @dbus_property(access=PropertyAccess.READ)
    def ExitStatus(self) -> "i":
        return self.guest.exit_status

    @dbus_property(access=PropertyAccess.READ)
    def ExitReason(self) -> "s":
        return self.guest.exit_reason

    @dbus_property(access=PropertyAccess.READ)
    def ExitDetail(self) -> "s":
        return self.guest.exit_detail

    @dbus_property(access=PropertyAccess.READ)
    def ConsoleLog(self) -> "s":
        """The guest's console output: root only (it may print anything)."""
        return str(self.guest.console_log or "") if secrets_visible() else ""

    @dbus_method()
    @mutating
    async def Terminate(self):
        await self._terminate(self.guest.name)


class GuestManagerInterface(ServiceInterface):
    def __init__(self, service: "GuestService", images: ImageService) -> None:
        super().__init__("org.hostel1.GuestManager")
        self._service = service
        self._images = images

    @dbus_method()
    def ListGuests(self) -> "a(ssso)":
        """Every guest, VM or container: name, class, state, its Guest object."""
        return [[g.name, g.klass, g.state, guest_path(g.name)]
                for g in sorted(self._service.all(), key=lambda g: g.name)]

    @dbus_method()
    @mutating
    async def StartGuest(self, name: "s", settings: "a{sv}") -> "o":
        """A container's answer is its machine's path (the run's client watches the
        machine, as hostelctl run does); its Guest object is there too."""
        if "Image" in settings:  # an OCI image, in a container or a VM
            isolation = settings.get("Isolation")
            if isolation is not None and isolation.value == "vm":
                return await self._service.start_vm(name, settings)
            run = GuestRunSettings.from_dbus(settings)
            self._service.refuse_running_vm(machine_name(name, run))
            return await self._images.run_container(name, settings)
        return await self._service.start(validate_name(name), settings)

    @dbus_method()
    @mutating
    async def TerminateGuest(self, name: "s"):
        await self._service.terminate(name)

    @dbus_method()
    @mutating
    def AttachConsole(self, name: "s", client: "h"):
        """Attach `client`, one end of a unix stream socket pair, to the running guest's
        console: the guest's output from now on is written to it, what is written to it
        reaches the console's input; closing it detaches (console_attach.py). Root only:
        a console shows and takes anything."""
        self._service.attach_console(name, client)

    @dbus_method()
    @mutating
    async def ImportImage(self, path: "s", name: "s") -> "s":
        return await self._images.import_image(path, name)

    @dbus_method()
    @mutating
    async def ImportImageEx(self, path: "s", name: "s", options: "a{sv}") -> "s":
        """ImportImage with options: Source (h, read the tar from it; `path` names it),
        Size (t, its length if known), ClientAlive (h, cancel when it hangs up)."""
        return await self._images.import_image(path, name, options)

    @dbus_method()
    @mutating
    async def PullImage(self, reference: "s", name: "s", options: "a{sv}") -> "s":
        """Pull from a registry (skopeo); options TLSVerify (b), ClientAlive (h)."""
        return await self._images.pull_image(reference, name, options)

    @dbus_method()
    async def InspectImage(self, name: "s") -> "s":
        return await self._images.inspect_image(name)

    @dbus_method()
    def ListImages(self) -> "a(sst)":
        return self._images.list_images()

    @dbus_method()
    @mutating
    async def RemoveImage(self, name: "s"):
        await self._images.remove_image(name)

    @dbus_signal()
    def ImportProgress(self, key: str, stage: str, done: int, total: int) -> "sstt":
        """Bytes done and in all (0: unknown) of an import or pull, keyed as it was asked."""
        return [key, stage, done, total]


class GuestService:
    """Exports the manager and one object per guest; VM guests stay listed after they
    exit (so ExitReason can be read) until TerminateGuest forgets them.

    An image run in a container lives in the machine registry (its machine goes
    when it ends, or, found dead at adoption, when forgotten); the service follows
    the registry to export its Guest object beside the machine's, so guests of both
    isolations are listed, shown and terminated here alike."""

    def __init__(self, dispatcher: Dispatcher, runtime_dir: Path, images: ImageService) -> None:
        self._dispatcher = dispatcher
        self.manager = GuestManager(runtime_dir, self._changed)
        self.objects: dict[str, GuestInterface] = {}
        self.containers: dict[str, GuestInterface] = {}
        self.interface = GuestManagerInterface(self, images)
        self.images = images
        images.progress = self.interface.ImportProgress
        images.running_vms = lambda: [
            (g.name, [disk.path for disk in g.settings.block])
            for g in self.manager.guests.values() if g.state != EXITED]
        dispatcher.export(MANAGER_PATH, self.interface)
        self.registry: Registry | None = images.runner.registry if images.runner else None
        if self.registry is not None:
            for machine in self.registry.all():  # adopted before this service existed
                self._on_machine(Event.NEW, machine, {})
            self.registry.subscribe(self._on_machine)

    def all(self) -> list[GuestView]:
        return [*self.manager.guests.values(),
                *(obj.guest for obj in self.containers.values())]

    def refuse_running_vm(self, name: str) -> None:
        """One name, one guest: a container guest may not take a running VM's name (both
        would be NAME in machinectl list, and share a Guest object's path); the machine
        registry refuses a machine's name itself."""
        vm = self.manager.guests.get(name)
        if vm is not None and vm.state != EXITED:
            raise AlreadyExists(f"a guest named {name!r} is already running (a vm); pick "
                                "another name or terminate it first")

    def _on_machine(self, event: Event, machine: Machine, changed: dict[str, Any]) -> None:
        if not is_image_run(machine):
            return
        path = guest_path(machine.name)
        obj = self.containers.get(machine.name)
        if event is Event.NEW:
            self._forget(machine.name)  # an exited VM of that name: replaced, as by a VM
            if machine.name in self.objects:  # a VM that started meanwhile holds the path
                log.warning("guest %s: a vm of that name runs; the container is listed as "
                            "a machine only", machine.name)
                return
            obj = GuestInterface(ContainerGuest(machine), self.terminate)
            self.containers[machine.name] = obj
            self._dispatcher.export(path, obj)
        elif obj is None or not isinstance(obj.guest, ContainerGuest) \
                or obj.guest.machine is not machine:
            return
        elif event is Event.CHANGED:
            props = {"State": obj.guest.state, "Leader": obj.guest.pid,
                     "ExitStatus": obj.guest.exit_status, "ExitReason": obj.guest.exit_reason,
                     "ExitDetail": obj.guest.exit_detail}
            obj.emit_properties_changed(props)
        elif event is Event.REMOVED:
            self._dispatcher.unexport(path, self.containers.pop(machine.name))

    async def start(self, name: str, raw: dict[str, Variant]) -> str:
        settings, fds = settings_from_dbus(raw)
        self._refuse_machine(name)
        guest = await self.manager.start(name, settings, fds.get("Console"), fds.get("ConsoleInput"),
                                         fds.get("ClientAlive"))
        return self._export(guest)

    def _refuse_machine(self, name: str) -> None:
        """A VM may not take the name of a machine (container guest or not)."""
        if self.registry is not None and name in {m.name for m in self.registry.all()}:
            raise AlreadyExists(f"a machine named {name!r} is already "
                                f"{self.registry.get(name).state.value}; pick another name "
                                "or terminate it first")

    async def start_vm(self, name: str, raw: dict[str, Variant]) -> str:
        """An image in a VM (images_service.prepare_vm); its config disk goes with it."""
        vm = await self.images.prepare_vm(name, raw)
        try:
            self._refuse_machine(vm.name)
            image = self.images.store.get(raw["Image"].value).name
            guest = await self.manager.start(vm.name, vm.settings, vm.console_fd, vm.input_fd,
                                             vm.client_fd, vm.ports, vm.channel_port,
                                             vm.work_dir, image)
        except BaseException:
            shutil.rmtree(vm.work_dir, ignore_errors=True)
            raise
        finally:
            vm.close()
        return self._export(guest)

    def _export(self, guest: Guest) -> str:
        name = guest.name
        old = self.objects.pop(name, None)
        if old is not None:  # an exited guest of the same name: replaced
            self._dispatcher.unexport(guest_path(name), old)
        obj = GuestInterface(guest, self.terminate)
        self.objects[name] = obj
        self._dispatcher.export(guest_path(name), obj)
        return guest_path(name)

    def attach_console(self, name: str, client_fd: int) -> None:
        runner = self.images.runner
        console_attach.attach(name, client_fd, self.manager.guests,
                              runner.registry if runner is not None else None)

    async def terminate(self, name: str) -> None:
        """A container guest ends as its machine does (TerminateMachine); a VM is killed."""
        container = self.containers.get(name)
        if container is not None and isinstance(container.guest, ContainerGuest):
            await self._terminate_machine(container.guest.machine)
            return
        forgotten = await self.manager.terminate(name)
        if forgotten is not None:
            self._dispatcher.unexport(guest_path(name), self.objects.pop(name))

    async def _terminate_machine(self, machine: Machine) -> None:
        assert self.registry is not None and self.images.runner is not None
        if machine.state is State.EXITED:  # found dead at adoption: forget it now
            self.registry.remove(machine)
            return
        await self.images.runner.terminate(machine)

    def _forget(self, name: str) -> None:
        """An exited VM guest, replaced by a guest of the same name."""
        vm = self.manager.guests.get(name)
        if vm is not None and vm.state == EXITED:
            del self.manager.guests[name]
            old = self.objects.pop(name, None)
            if old is not None:
                self._dispatcher.unexport(guest_path(name), old)

    def _changed(self, guest: Guest) -> None:
        obj = self.objects.get(guest.name)
        if obj is not None and obj.guest is guest:
            obj.emit_properties_changed({"State": guest.state, "ExitStatus": guest.exit_status,
                                         "ExitReason": guest.exit_reason,
                                         "ExitDetail": guest.exit_detail})

    def adopt(self) -> None:
        """Export the guests an earlier hosteld left (running or, if they ended, exited)."""
        for guest in self.manager.adopt():
            obj = GuestInterface(guest, self.terminate)
            self.objects[guest.name] = obj
            self._dispatcher.export(guest_path(guest.name), obj)

    async def stop_all(self) -> None:
        await self.manager.stop_all()
