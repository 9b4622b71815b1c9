"""org.hostel1.GuestManager and org.hostel1.Guest: the D-Bus face of guests and images."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Awaitable, Callable

from dbus_fast import Variant
from dbus_fast.service import (PropertyAccess, ServiceInterface, dbus_method, dbus_property,
                               dbus_signal)

from hostel.bus import Dispatcher, InvalidArgs, escape_path_label, mutating
from hostel.guest.images_service import ImageService
from hostel.guest.manager import Guest, GuestManager
from hostel.guest.settings import BlockSpec, GuestSettings, parse_tunnet, validate_name

MANAGER_PATH = "/org/hostel1/guest"

# StartGuest key -> (D-Bus signature, GuestSettings field)
SETTINGS_KEYS = {
    "Kernel": ("s", "kernel"), "Initrd": ("s", "initrd"), "CommandLine": ("s", "cmdline"),
    "MemoryMB": ("u", "memory_mb"), "Block": ("a(sb)", "block"), "Network": ("as", "network"),
    "Rng": ("b", "rng"), "Console": ("h", None), "ConsoleInput": ("h", None),
    "ConsoleLog": ("s", "console_log"),
    "Backend": ("s", "backend"), "Chroot": ("s", "chroot"), "User": ("s", "username"),
    "Verbose": ("b", "verbose"),
}
_PATH_FIELDS = ("kernel", "initrd", "console_log", "chroot")


def guest_path(name: str) -> str:
    return f"{MANAGER_PATH}/{escape_path_label(name)}"


def settings_from_dbus(settings: dict[str, Variant]) -> tuple[GuestSettings, dict[str, int]]:
    """StartGuest's a{sv} -> GuestSettings and the console fds passed (by key)."""
    values: dict[str, Any] = {}
    fds: dict[str, int] = {}
    for key, variant in settings.items():
        if key not in SETTINGS_KEYS:
            raise InvalidArgs(f"unknown guest setting {key!r}; known: {', '.join(SETTINGS_KEYS)}")
        signature, name = SETTINGS_KEYS[key]
        if variant.signature != signature:
            raise InvalidArgs(f"guest setting {key} must have type {signature!r}, "
                              f"not {variant.signature!r}")
        if name is None:
            fds[key] = variant.value
        elif name in _PATH_FIELDS:
            values[name] = Path(variant.value) if variant.value else None
        elif name == "block":
            values[name] = tuple(BlockSpec(Path(path), read_only) for path, read_only in variant.value)
        elif name == "network":
            values[name] = tuple(parse_tunnet(arg) for arg in variant.value)
        else:
            values[name] = variant.value
    for required in ("Kernel", "MemoryMB"):
        if required not in settings:
            raise InvalidArgs(f"guest setting {required} is required")
    return GuestSettings(**values), fds


class GuestInterface(ServiceInterface):
    """org.hostel1.Guest: one guest's state, why it ended, where its console went."""

    def __init__(self, guest: Guest, terminate: Callable[[str], Awaitable[None]]) -> None:
        super().__init__("org.hostel1.Guest")
        self.guest = guest
        self._terminate = terminate

    @dbus_property(access=PropertyAccess.READ)
    def Name(self) -> "s":
        return self.guest.name

    @dbus_property(access=PropertyAccess.READ)
    def State(self) -> "s":
        return self.guest.state

    @dbus_property(access=PropertyAccess.READ)
    def MemoryMB(self) -> "u":
        return self.guest.settings.memory_mb

    @dbus_property(access=PropertyAccess.READ)
    def Kernel(self) -> "s":
        return str(self.guest.settings.kernel)

    @dbus_property(access=PropertyAccess.READ)
    def Backend(self) -> "s":
        return self.guest.settings.backend

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
        return str(self.guest.console_log or "")

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
        return [[g.name, "vm", g.state, guest_path(g.name)]
                for g in self._service.manager.guests.values()]

    @dbus_method()
    @mutating
    async def StartGuest(self, name: "s", settings: "a{sv}") -> "o":
        if "Image" in settings:  # an OCI image, run with container isolation
            return await self._images.run_container(name, settings)
        return await self._service.start(validate_name(name), settings)

    @dbus_method()
    @mutating
    async def TerminateGuest(self, name: "s"):
        await self._service.terminate(name)

    @dbus_method()
    @mutating
    async def ImportImage(self, path: "s", name: "s") -> "s":
        return await self._images.import_image(path, name)

    @dbus_method()
    def ListImages(self) -> "a(sst)":
        return self._images.list_images()

    @dbus_method()
    @mutating
    async def RemoveImage(self, name: "s"):
        await self._images.remove_image(name)

    @dbus_signal()
    def ImportProgress(self, key: str, stage: str, done: int, total: int) -> "ssuu":
        return [key, stage, done, total]


class GuestService:
    """Exports the manager and one object per guest; guests stay listed after they
    exit (so ExitReason can be read) until TerminateGuest forgets them."""

    def __init__(self, dispatcher: Dispatcher, runtime_dir: Path, images: ImageService) -> None:
        self._dispatcher = dispatcher
        self.manager = GuestManager(runtime_dir, self._changed)
        self.objects: dict[str, GuestInterface] = {}
        self.interface = GuestManagerInterface(self, images)
        images.progress = self.interface.ImportProgress
        dispatcher.export(MANAGER_PATH, self.interface)

    async def start(self, name: str, raw: dict[str, Variant]) -> str:
        settings, fds = settings_from_dbus(raw)
        guest = await self.manager.start(name, settings, fds.get("Console"), fds.get("ConsoleInput"))
        old = self.objects.pop(name, None)
        if old is not None:  # an exited guest of the same name: replaced
            self._dispatcher.unexport(guest_path(name), old)
        obj = GuestInterface(guest, self.terminate)
        self.objects[name] = obj
        self._dispatcher.export(guest_path(name), obj)
        return guest_path(name)

    async def terminate(self, name: str) -> None:
        forgotten = await self.manager.terminate(name)
        if forgotten is not None:
            self._dispatcher.unexport(guest_path(name), self.objects.pop(name))

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
