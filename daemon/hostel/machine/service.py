"""org.hostel1.MachineManager and org.hostel1.Machine: the D-Bus face of the registry.

Methods validate, call the runner, and translate errors; the objects follow
the registry (exported when a machine appears, PropertiesChanged when it
changes, removed with it)."""
from __future__ import annotations

import logging
import os
import signal as signals
from pathlib import Path
from typing import Any

from dbus_fast import Variant
from dbus_fast.service import PropertyAccess, ServiceInterface, dbus_method, dbus_property, dbus_signal

from hostel.bus import Dispatcher, InvalidArgs, NoSuchObject, escape_path_label, mutating
from hostel.machine import enter, rootfs, settings as machine_settings
from hostel.machine.machine_properties import MachineProperties
from hostel.machine.registry import Event, Machine, Registry, State
from hostel.machine.runner import MachineRunner, MachineStartFailed
from hostel.machine.settings import Stdio

log = logging.getLogger(__name__)

MANAGER_PATH = "/org/hostel1/machine"
KILL_WHO = ("leader", "all")
# registry field -> (property, signature)
PROPERTY_OF_FIELD = {
    "state": ("State", "s"), "leader": ("Leader", "u"), "exit_status": ("ExitStatus", "i"),
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


def os_release(machine: Machine) -> dict[str, str]:
    if not machine.leader:
        raise NoSuchObject(f"machine {machine.name} has no running leader")
    return rootfs.read_os_release(f"/proc/{machine.leader}/root")


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
    def Settings(self) -> "a{sv}":
        return self.machine.settings

    @dbus_property(access=PropertyAccess.READ)
    def ConsoleLog(self) -> "s":
        console = getattr(self.machine.runtime, "console", None)
        return console.text() if console is not None else ""

    @dbus_method()
    @mutating
    async def Terminate(self):
        await self.manager.terminate(self.machine)

    @dbus_method()
    @mutating
    def Kill(self, who: "s", signal: "i"):
        self.manager.kill(self.machine, who, signal)

    @dbus_method()
    def GetOSRelease(self) -> "a{ss}":
        return os_release(self.machine)

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
        settings = machine_settings.from_dbus(name, raw, self.machines_dir)
        settings.stdio = Stdio(*(os.dup(fd) if fd is not None else None
                                 for fd in (settings.stdio.stdin, settings.stdio.stdout,
                                            settings.stdio.stderr)))
        try:
            machine = await self.runner.start(settings)
        except OSError as e:
            log.error("starting machine %s: %s", settings.name, e)
            raise MachineStartFailed(f"starting machine {settings.name}: {e}") from None
        return machine_path(machine.name)

    def register(self, name: str, machine_id: bytes, service: str, klass: str, leader: int,
                 root_directory: str) -> str:
        if not machine_settings.machine_name_is_valid(name):
            raise InvalidArgs(f"Invalid machine name: {name}")
        if len(machine_id) not in (0, 16):
            raise InvalidArgs("machine id must be 16 bytes (or empty)")
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

    async def terminate(self, machine: Machine) -> None:
        if machine.state is State.EXITED:  # found dead at adoption: forget it now
            self.registry.remove(machine)
            return
        await self.runner.terminate(machine)

    def kill(self, machine: Machine, who: str, signal: int) -> None:
        if who not in KILL_WHO and who != "":
            raise InvalidArgs(f"invalid kill target {who!r}: leader or all")
        self.runner.kill(machine, who or "all", parse_signal(signal))
