"""org.hostel1.MachineManager and org.hostel1.Machine: the D-Bus face of the registry.

Methods validate, call the runner, and translate errors; the objects follow
the registry (exported when a machine appears, PropertiesChanged when it
changes, removed with it)."""
from __future__ import annotations

import asyncio
import logging
import os
import signal as signals
from pathlib import Path
from typing import Any, Callable

from dbus_fast import Variant
from dbus_fast.service import PropertyAccess, ServiceInterface, dbus_method, dbus_property, dbus_signal

from hostel.bus import (AlreadyExists, Dispatcher, InvalidArgs, NoSuchObject, escape_path_label, mutating,
                        secrets_visible)
from hostel.machine import enter, pool, rootfs, settings as machine_settings
from hostel.machine.machine_properties import MachineProperties
from hostel.machine.registry import Event, Machine, Registry, State
from hostel.machine.runner import MachineRunner, MachineStartFailed
from hostel.machine.settings import Stdio

log = logging.getLogger(__name__)

MANAGER_PATH = "/org/hostel1/machine"
KILL_WHO = ("leader", "all")
SECRET_SETTINGS = frozenset({"Environment"})
# registry field -> (property, signature)
PROPERTY_OF_FIELD = {
    "state": ("State", "s"), "leader": ("Leader", "u"), "exit_status": ("ExitStatus", "i"),
    "exit_signal": ("ExitSignal", "i"),
    "network_interfaces": ("NetworkInterfaces", "ai"), "id": ("Id", "ay"), "unit": ("Unit", "s"),
    "root_directory": ("RootDirectory", "s"),
}


def machine_path(name: str) -> str:
    return f"{MANAGER_PATH}/{escape_path_label(name)}"


def _same_pid_namespace(a: int, b: int) -> bool:
    try:
        return os.stat(f"/proc/{a}/ns/pid").st_ino == os.stat(f"/proc/{b}/ns/pid").st_ino
    except OSError:
        return False


def pid_in_machine(machine: Machine, pid: int) -> bool:
    """Any pid inside the container: same pid namespace as the leader, or in its cgroup."""
    runtime = machine.runtime
    if machine.leader and runtime is not None and not runtime.settings.share_system:
        return _same_pid_namespace(machine.leader, pid) and \
            not _same_pid_namespace(os.getpid(), pid)
    cgroup = getattr(runtime, "cgroup", None)
    return cgroup is not None and pid in cgroup.procs()


def parse_signal(number: int) -> int:
    if not 1 <= number < signals.SIGRTMAX:
        raise InvalidArgs(f"invalid signal number {number}")
    return number


async def os_release(machine: Machine) -> dict[str, str]:
    """The running container's os-release, read in a thread: the file is the guest's,
    and whatever it is (a FIFO, /proc/kmsg bound over it) must not stall the daemon."""
    if not machine.leader:
        raise NoSuchObject(f"machine {machine.name} has no running leader")
    return await asyncio.to_thread(rootfs.read_os_release, f"/proc/{machine.leader}/root")


class MachineInterface(MachineProperties):
    """org.hostel1.Machine: one object per machine."""

    def __init__(self, machine: Machine, manager: "MachineService") -> None:
        super().__init__("org.hostel1.Machine", machine)
        self.manager = manager

    @dbus_property(access=PropertyAccess.READ)
    def State(self) -> "s":
        return self.machine.state.value

    @dbus_property(access=PropertyAccess.READ)
    def ExitStatus(self) -> "i":
        return self.machine.exit_status

    @dbus_property(access=PropertyAccess.READ)
    def ExitSignal(self) -> "i":
        """The signal that ended PID 1, 0 if it exited: what hostelctl run says about
        the end ("terminated by signal KILL") beside ExitStatus, as nspawn does."""
        return self.machine.exit_signal

    @dbus_property(access=PropertyAccess.READ)
    def KillSignal(self) -> "i":
        """What asks the container to stop when its hostelctl run is interrupted, as in
        systemd-nspawn 252: --kill-signal's, else SIGRTMIN+3 for a booted init, else 0
        (none: the container is killed at once)."""
        settings = getattr(self.machine.runtime, "settings", None)
        if settings is None:
            return 0
        return settings.kill_signal or (signals.SIGRTMIN + 3 if settings.boot else 0)

    @dbus_property(access=PropertyAccess.READ)
    def Settings(self) -> "a{sv}":
        """The start's settings; to callers other than root without the environment,
        which is where passwords and tokens are passed (machined shows none of it)."""
        if secrets_visible():
            return self.machine.settings
        return {k: v for k, v in self.machine.settings.items() if k not in SECRET_SETTINGS}

    @dbus_property(access=PropertyAccess.READ)
    def ConsoleLog(self) -> "s":
        """What the payload wrote to its console: root only (it may print anything)."""
        console = getattr(self.machine.runtime, "console", None)
        return console.text() if console is not None and secrets_visible() else ""

    @dbus_method()
    @mutating
    async def Terminate(self):
        await self.manager.terminate(self.machine)

    @dbus_method()
    @mutating
    def Kill(self, who: "s", signal: "i"):
        self.manager.kill(self.machine, who, signal)

    @dbus_method()
    async def GetOSRelease(self) -> "a{ss}":
        return await os_release(self.machine)

    @dbus_method()
    @mutating
    def OpenPTY(self) -> "hs":
        pty, slave = enter.open_pty(self.machine)
        os.close(slave)
        return [pty.master, pty.path]

    @dbus_method()
    @mutating
    async def OpenShell(self, user: "s", path: "s", args: "as", environment: "as") -> "hs":
        pty = await enter.open_shell(self.machine, user, path, args, environment)
        return [pty.master, pty.path]


class MachineManagerInterface(ServiceInterface):
    def __init__(self, service: "MachineService") -> None:
        super().__init__("org.hostel1.MachineManager")
        self.service = service

    @dbus_method()
    def ListMachines(self) -> "a(ssso)":
        return [[m.name, m.klass, m.state.value, machine_path(m.name)]
                for m in self.service.registry.all()]

    @dbus_method()
    def GetMachine(self, name: "s") -> "o":
        return machine_path(self.service.registry.get(name).name)

    @dbus_method()
    def GetMachineByPID(self, pid: "u") -> "o":
        return machine_path(self.service.registry.by_pid(pid, pid_in_machine).name)

    @dbus_method()
    @mutating
    async def StartMachine(self, name: "s", settings: "a{sv}") -> "o":
        return await self.service.start(name, settings)

    @dbus_method()
    @mutating
    def RegisterMachine(self, name: "s", id: "ay", service: "s", machine_class: "s",
                        leader: "u", root_directory: "s") -> "o":
        return self.service.register(name, id, service, machine_class, leader, root_directory)

    @dbus_method()
    @mutating
    async def TerminateMachine(self, name: "s"):
        await self.service.terminate(self.service.registry.get(name))

    @dbus_method()
    @mutating
    def KillMachine(self, name: "s", who: "s", signal: "i"):
        self.service.kill(self.service.registry.get(name), who, signal)

    @dbus_signal()
    def MachineNew(self, name: str, path: str) -> "so":
        return [name, path]

    @dbus_signal()
    def MachineRemoved(self, name: str, path: str) -> "so":
        return [name, path]


class MachineService:
    """Wires registry, runner and D-Bus objects together."""

    def __init__(self, dispatcher: Dispatcher, registry: Registry, runner: MachineRunner,
                 machines_dir: Path) -> None:
        self.dispatcher = dispatcher
        self.registry = registry
        self.runner = runner
        self.machines_dir = machines_dir
        self.manager = MachineManagerInterface(self)
        self.objects: dict[str, MachineInterface] = {}
        # (name, class, service) of the running VM guests (the guest manager's
        # running_machines, set by the daemon): one name, one guest, so a machine
        # may not take one of their names
        self.running_vms: Callable[[], list[tuple[str, str, str]]] = list
        dispatcher.export(MANAGER_PATH, self.manager)
        registry.subscribe(self._on_registry)

    def _on_registry(self, event: Event, machine: Machine, changed: dict[str, Any]) -> None:
        path = machine_path(machine.name)
        if event is Event.NEW:
            self.objects[machine.name] = MachineInterface(machine, self)
            self.dispatcher.export(path, self.objects[machine.name])
            self.manager.MachineNew(machine.name, path)
        elif event is Event.CHANGED and machine.name in self.objects:
            props = {PROPERTY_OF_FIELD[k][0]: (v.value if isinstance(v, State) else v)
                     for k, v in changed.items() if k in PROPERTY_OF_FIELD}
            if props:
                self.objects[machine.name].emit_properties_changed(props)
        elif event is Event.REMOVED and machine.name in self.objects:
            self.dispatcher.unexport(path, self.objects.pop(machine.name))
            self.manager.MachineRemoved(machine.name, path)

    async def start(self, name: str, raw: dict[str, Variant]) -> str:
        raw = await self._from_pool(name, raw)
        settings = machine_settings.from_dbus(name, raw, self.machines_dir)
        self._refuse_running_vm(settings.name)
        settings.stdio = Stdio(*(os.dup(fd) if fd is not None else None
                                 for fd in (settings.stdio.stdin, settings.stdio.stdout,
                                            settings.stdio.stderr)))
        try:
            machine = await self.runner.start(settings)
        except OSError as e:
            log.error("starting machine %s: %s", settings.name, e)
            raise MachineStartFailed(f"starting machine {settings.name}: {e}") from None
        return machine_path(machine.name)

    async def _from_pool(self, name: str, raw: dict[str, Variant]) -> dict[str, Variant]:
        """A name without a tree or image is looked up in the pool, as systemd-nspawn 252
        finds `-M NAME` (a directory NAME or an image NAME.raw, in /var/lib/machines
        among others; see pool.py)."""
        given = [raw[key].value for key in ("Directory", "Image") if key in raw]
        if any(given) or not machine_settings.machine_name_is_valid(name):
            return raw  # from_dbus says what is wrong with a bad name
        try:
            entry = await asyncio.to_thread(pool.find, name, pool.pool_dirs(self.machines_dir.parent))
        except pool.NotInPool as e:
            raise InvalidArgs(f"No image for machine '{name}'. ({e})") from None
        key, path = ("Directory", entry.directory) if entry.directory else ("Image", entry.image)
        return {**raw, key: Variant("s", path)}

    def register(self, name: str, machine_id: bytes, service: str, klass: str, leader: int,
                 root_directory: str) -> str:
        if not machine_settings.machine_name_is_valid(name):
            raise InvalidArgs(f"Invalid machine name: {name}")
        if len(machine_id) not in (0, 16):
            raise InvalidArgs("machine id must be 16 bytes (or empty)")
        self._refuse_running_vm(name)
        if klass not in ("", "container", "vm"):
            raise InvalidArgs(f"invalid machine class {klass!r} (container or vm)")
        if leader <= 1 or not os.path.exists(f"/proc/{leader}"):
            raise InvalidArgs(f"leader pid {leader} is not a running process")
        if root_directory and not root_directory.startswith("/"):
            raise InvalidArgs(f"root directory {root_directory!r} is not absolute")
        machine = Machine(name, id=machine_id or os.urandom(16), klass=klass or "container",
                          service=service, leader=leader, root_directory=root_directory,
                          state=State.OPENING, registered_only=True)
        self.registry.reserve(machine)
        self.runner.track_registered(machine)
        self.registry.update(machine, state=State.RUNNING)
        return machine_path(name)

    def _refuse_running_vm(self, name: str) -> None:
        """The guest side refuses a VM a machine's name; this is the other way round."""
        if any(vm == name for vm, _klass, _service in self.running_vms()):
            raise AlreadyExists(f"a guest named {name!r} is already running (a vm); pick "
                                f"another machine name, or end the guest first with "
                                f"'hostelctl guest terminate {name}'")

    async def terminate(self, machine: Machine) -> None:
        if machine.state is State.EXITED:  # found dead at adoption: forget it now
            self.registry.remove(machine)
            return
        await self.runner.terminate(machine)

    def kill(self, machine: Machine, who: str, signal: int) -> None:
        if who not in KILL_WHO and who != "":
            raise InvalidArgs(f"invalid kill target {who!r}: leader or all")
        self.runner.kill(machine, who or "all", parse_signal(signal))
