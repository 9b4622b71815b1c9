"""org.hostel1.CryptsetupManager and org.hostel1.Volume: the D-Bus face of the volume manager.

The objects show a snapshot (volumes.load / ManagedVolume.inspected, made in a
worker thread); every method that can change what is known re-takes it and
announces the differences: PropertiesChanged for kept volumes, and
InterfacesAdded/InterfacesRemoved (which dbus-fast sends on export/unexport)
for volumes that came or went."""
from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from dbus_fast import Variant
from dbus_fast.service import PropertyAccess, ServiceInterface, dbus_method, dbus_property

from hostel.bus import (ERROR_PREFIX, AlreadyExists, Dispatcher, HostelError, InvalidArgs,
                        NoSuchObject, NotSupported, escape_path_label, mutating,
                        secrets_visible)
from hostel.cryptsetup import luks, volumes
from hostel.cryptsetup.volumes import ManagedVolume

log = logging.getLogger(__name__)

MANAGER_PATH = "/org/hostel1/cryptsetup"
VOLUME_INTERFACE = "org.hostel1.Volume"
SECRET_PROPERTIES = frozenset({"KeyFile", "KeyDevice", "Options"})  # root's only
KEY_OPTIONS = {"Passphrase": "s", "KeyFile": "s"}
ATTACH_OPTIONS = {**KEY_OPTIONS, "ReadOnly": "b"}


class NoSuchDevice(HostelError):
    dbus_name = f"{ERROR_PREFIX}.NoSuchDevice"


class NotActive(HostelError):
    dbus_name = f"{ERROR_PREFIX}.NotActive"


class CrypttabUnreadable(HostelError):
    dbus_name = f"{ERROR_PREFIX}.CrypttabUnreadable"


def volume_path(name: str) -> str:
    return f"{MANAGER_PATH}/{escape_path_label(name)}"


def parse_options(options: dict[str, Variant], allowed: dict[str, str]) -> dict[str, Any]:
    """Check an a{sv} against allowed {key: signature}; InvalidArgs names the bad key."""
    values = {}
    for key, variant in options.items():
        if key not in allowed:
            raise InvalidArgs(f"unknown option {key!r} (known: {', '.join(allowed)})")
        if variant.signature != allowed[key]:
            raise InvalidArgs(f"option {key} must have type {allowed[key]!r}, "
                              f"not {variant.signature!r}")
        values[key] = variant.value
    return values


def key_for(volume: ManagedVolume, values: dict[str, Any]) -> luks.Key:
    """The key a call gave, else the key file crypttab names for the volume."""
    if "Passphrase" in values and "KeyFile" in values:
        raise InvalidArgs("give Passphrase or KeyFile, not both")
    if "Passphrase" in values:
        return luks.Key(passphrase=values["Passphrase"].encode())
    size, offset = volume.key_file_range()
    key_file = values.get("KeyFile")
    if key_file is None:
        if volume.entry.key_device and volume.configured_key_file():
            raise NotSupported(f"volume {volume.name} reads its key file from device "
                               f"{volume.entry.key_device}, which hosteld does not mount; "
                               "pass Passphrase or KeyFile")
        key_file = volume.configured_key_file()
        if key_file is None:
            raise InvalidArgs(f"volume {volume.name} has no key file in {volume.entry.source}; "
                              "pass Passphrase or KeyFile")
    if not key_file.startswith("/"):
        raise InvalidArgs(f"key file {key_file!r} is not an absolute path")
    if not os.path.exists(key_file):
        raise InvalidArgs(f"key file {key_file} does not exist")
    kind = volumes.blocking_kind(key_file)
    if kind is not None:
        raise InvalidArgs(f"key file {key_file} is a {kind}, not a regular file or block "
                          "device; reading it could block for ever")
    return luks.Key(key_file=key_file, key_file_size=size, key_file_offset=offset)


class VolumeInterface(ServiceInterface):
    """org.hostel1.Volume: one object per crypttab or command-line volume."""

    def __init__(self, volume: ManagedVolume) -> None:
        super().__init__(VOLUME_INTERFACE)
        self.volume = volume
        self.published = volume.properties()   # what clients were last told

    def publish(self, volume: ManagedVolume) -> None:
        """Show volume's facts from now on, and tell clients what changed."""
        self.volume = volume
        current = volume.properties()
        changed = {k: v for k, v in current.items() if self.published.get(k) != v}
        self.published = current
        if changed:  # a signal goes to every listener: secrets are only said to have changed
            self.emit_properties_changed(
                {k: v for k, v in changed.items() if k not in SECRET_PROPERTIES},
                [k for k in changed if k in SECRET_PROPERTIES])

    def _get(self, name: str) -> Any:
        return self.volume.properties()[name]

    def _secret(self, name: str) -> Any:
        """Key file paths and crypttab options are root's: others get an empty value."""
        value = self._get(name)
        return value if secrets_visible() else type(value)()

    @dbus_property(access=PropertyAccess.READ)
    def Name(self) -> "s":
        return self.volume.name

    @dbus_property(access=PropertyAccess.READ)
    def Device(self) -> "s":
        return self._get("Device")

    @dbus_property(access=PropertyAccess.READ)
    def ResolvedDevice(self) -> "s":
        return self._get("ResolvedDevice")

    @dbus_property(access=PropertyAccess.READ)
    def KeyFile(self) -> "s":
        return self._secret("KeyFile")

    @dbus_property(access=PropertyAccess.READ)
    def KeyDevice(self) -> "s":
        return self._secret("KeyDevice")

    @dbus_property(access=PropertyAccess.READ)
    def Options(self) -> "as":
        return self._secret("Options")

    @dbus_property(access=PropertyAccess.READ)
    def Header(self) -> "s":
        return self._get("Header")

    @dbus_property(access=PropertyAccess.READ)
    def HeaderDevice(self) -> "s":
        return self._get("HeaderDevice")

    @dbus_property(access=PropertyAccess.READ)
    def Source(self) -> "s":
        return self._get("Source")

    @dbus_property(access=PropertyAccess.READ)
    def State(self) -> "s":
        return self.volume.state()

    @dbus_property(access=PropertyAccess.READ)
    def LuksVersion(self) -> "u":
        return self._get("LuksVersion")

    @dbus_property(access=PropertyAccess.READ)
    def LuksUUID(self) -> "s":
        return self._get("LuksUUID")

    @dbus_property(access=PropertyAccess.READ)
    def LuksCipher(self) -> "s":
        return self._get("LuksCipher")

    @dbus_property(access=PropertyAccess.READ)
    def LuksKeySlots(self) -> "au":
        return self._get("LuksKeySlots")

    @dbus_property(access=PropertyAccess.READ)
    def LuksLabel(self) -> "s":
        return self._get("LuksLabel")

    @dbus_property(access=PropertyAccess.READ)
    def HeaderError(self) -> "s":
        return self._get("HeaderError")


class CryptsetupManagerInterface(ServiceInterface):
    def __init__(self, service: "CryptsetupService") -> None:
        super().__init__("org.hostel1.CryptsetupManager")
        self.service = service

    @dbus_property(access=PropertyAccess.READ)
    def Crypttab(self) -> "s":
        return self.service.crypttab_path or ""

    @dbus_property(access=PropertyAccess.READ)
    def Warnings(self) -> "as":
        """Warnings quote crypttab entries, options included: root only."""
        return self.service.warnings if secrets_visible() else []

    @dbus_method()
    async def ListVolumes(self) -> "a(ssso)":
        return await self.service.list_volumes()

    @dbus_method()
    @mutating
    async def Attach(self, name: "s", options: "a{sv}"):
        await self.service.attach(name, options)

    @dbus_method()
    @mutating
    async def Detach(self, name: "s"):
        await self.service.detach(name)

    @dbus_method()
    @mutating
    async def CheckKey(self, name: "s", options: "a{sv}") -> "b":
        return await self.service.check_key(name, options)

    @dbus_method()
    @mutating
    async def Reload(self):
        await self.service.reload()


class CryptsetupService:
    """Owns the volume objects and keeps them in step with crypttab and the devices.

    crypttab_path and cmdline default to what systemd's generator reads
    ($SYSTEMD_CRYPTTAB else /etc/crypttab; $SYSTEMD_PROC_CMDLINE else
    /proc/cmdline, plus the SystemdOptions EFI variable), so the daemon shows
    exactly the volumes the generator made units for."""

    def __init__(self, dispatcher: Dispatcher, crypttab_path: str | None = None,
                 cmdline: list[str] | None = None) -> None:
        self.dispatcher = dispatcher
        self.crypttab_path = crypttab_path
        self.cmdline = cmdline
        self.warnings: list[str] = []
        self.objects: dict[str, VolumeInterface] = {}
        self.manager = CryptsetupManagerInterface(self)
        self._lock = asyncio.Lock()   # one snapshot at a time: reloads and refreshes queue
        dispatcher.export(MANAGER_PATH, self.manager)
        # The first load starts at once; methods wait for it, and so can the daemon.
        self._loading = asyncio.get_running_loop().create_task(self._first_load())

    async def _first_load(self) -> None:
        async with self._lock:
            self._apply(await asyncio.to_thread(volumes.load, self.crypttab_path, self.cmdline))

    async def start(self) -> "CryptsetupService":
        """Wait for the first load, so the volume objects exist before the daemon says
        it is ready. A crypttab that cannot be read leaves no volumes and a warning."""
        await self._loading
        return self

    async def reload(self) -> None:
        await self._loading
        async with self._lock:
            loaded = await asyncio.to_thread(volumes.load, self.crypttab_path, self.cmdline)
            if loaded.error:
                # A half-edited crypttab should not make every volume vanish: keep them.
                self._set_warnings(loaded.warnings)
                raise CrypttabUnreadable(f"{loaded.error}; the volumes loaded before are kept")
            self._apply(loaded)

    def _apply(self, loaded: volumes.Loaded) -> None:
        for name in [n for n in self.objects if n not in loaded.volumes]:
            self.dispatcher.unexport(volume_path(name), self.objects.pop(name))
        for name, volume in loaded.volumes.items():
            if name in self.objects:
                self.objects[name].publish(volume)
            else:
                self.objects[name] = VolumeInterface(volume)
                self.dispatcher.export(volume_path(name), self.objects[name])
        self._set_warnings(loaded.warnings)

    def _set_warnings(self, warnings: list[str]) -> None:
        if warnings != self.warnings:
            self.warnings = warnings
            self.manager.emit_properties_changed({}, ["Warnings"])  # root's only: re-read

    async def _refresh(self, names: list[str]) -> None:
        """Look at the devices again (they come and go without a crypttab change)."""
        await self._loading
        async with self._lock:
            current = [self.objects[n].volume for n in names if n in self.objects]
            fresh = await asyncio.to_thread(lambda: [v.inspected() for v in current])
            for volume in fresh:
                if volume.name in self.objects:
                    self.objects[volume.name].publish(volume)

    def _volume(self, name: str) -> ManagedVolume:
        volumes.check_name(name)
        found = self.objects.get(name)
        if found is None:
            raise NoSuchObject(f"no volume named {name!r} in crypttab or on the kernel "
                               "command line ('hostelctl cryptsetup list' shows them)")
        return found.volume

    async def list_volumes(self) -> list[list[str]]:
        await self._refresh(list(self.objects))
        return [[name, obj.volume.entry.device, obj.volume.state(), volume_path(name)]
                for name, obj in self.objects.items()]

    def _present_luks(self, volume: ManagedVolume) -> str:
        if not volume.resolved:
            raise NoSuchDevice(f"the source of volume {volume.name}, {volume.entry.device}, "
                               "is not present")
        if volume.luks is None:
            raise luks.NotLuks(f"volume {volume.name}: {volume.header_error}")
        return volume.resolved

    async def check_key(self, name: str, options: dict[str, Variant]) -> bool:
        await self._loading
        key = key_for(self._volume(name), parse_options(options, KEY_OPTIONS))
        await self._refresh([name])
        volume = self._volume(name)
        device = self._present_luks(volume)
        return await asyncio.to_thread(luks.check_key, device, key, volume.header or None)

    async def attach(self, name: str, options: dict[str, Variant]) -> None:
        await self._loading
        values = parse_options(options, ATTACH_OPTIONS)
        key = key_for(self._volume(name), values)
        if self._volume(name).state() == volumes.ACTIVE:
            raise AlreadyExists(f"volume {name} is already attached as /dev/mapper/{name}")
        missing = luks.device_mapper_missing()
        if missing is not None:
            raise luks.DeviceMapperUnavailable(f"cannot attach {name}: {missing}")
        await self._refresh([name])
        volume = self._volume(name)
        device = self._present_luks(volume)
        try:
            await asyncio.to_thread(luks.activate, name, device, key, volume.header or None,
                                    values.get("ReadOnly", False) or volume.read_only(),
                                    volume.discard())
        finally:
            await self._refresh([name])
        log.info("attached volume %s (%s) as /dev/mapper/%s", name, device, name)

    async def detach(self, name: str) -> None:
        await self._loading
        if self._volume(name).state() != volumes.ACTIVE:
            raise NotActive(f"volume {name} is not attached (there is no /dev/mapper/{name})")
        try:
            await asyncio.to_thread(luks.deactivate, name)
        finally:
            await self._refresh([name])
        log.info("detached volume %s", name)
