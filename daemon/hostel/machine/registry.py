"""The machine registry: what is running, under which name, and who wants to know.

The registry is the single source of truth behind org.hostel1 (and later
org.freedesktop.machine1): the D-Bus layer only observes it. Names are
reserved while a machine is still opening, so two starts of the same name
cannot race."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from hostel.bus import AlreadyExists, NoSuchObject

if TYPE_CHECKING:  # the runtime names the runner's pieces; the registry only holds it
    from hostel.machine.runtime import Runtime


class State(str, enum.Enum):
    OPENING = "opening"
    RUNNING = "running"
    CLOSING = "closing"
    EXITED = "exited"


class Event(enum.Enum):
    NEW = "new"
    CHANGED = "changed"
    REMOVED = "removed"


def _realtime_us() -> int:
    return time.time_ns() // 1000


def _monotonic_us() -> int:
    return time.monotonic_ns() // 1000


@dataclass
class Machine:
    name: str
    id: bytes = b"\0" * 16
    klass: str = "container"
    service: str = "hostel"
    unit: str = ""
    leader: int = 0
    root_directory: str = ""
    state: State = State.OPENING
    timestamp_us: int = field(default_factory=_realtime_us)
    timestamp_monotonic_us: int = field(default_factory=_monotonic_us)
    network_interfaces: list[int] = field(default_factory=list)
    exit_status: int = -1
    exit_signal: int = 0  # the signal that ended PID 1 (0: it exited)
    settings: dict[str, Any] = field(default_factory=dict)
    registered_only: bool = False  # RegisterMachine: hostel did not start it
    runtime: Runtime | None = None  # the runner's handle (pidfd, cgroups, cleanup)


Listener = Callable[[Event, Machine, dict[str, Any]], None]


class Registry:
    def __init__(self) -> None:
        self._machines: dict[str, Machine] = {}
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def _emit(self, event: Event, machine: Machine, changed: dict[str, Any] | None = None) -> None:
        for listener in self._listeners:
            listener(event, machine, changed or {})

    def reserve(self, machine: Machine) -> Machine:
        """Take the name (state "opening"); a second start of a live name is refused."""
        existing = self._machines.get(machine.name)
        if existing is not None:
            raise AlreadyExists(f"a machine named {machine.name!r} is already {existing.state.value} "
                                f"(leader {existing.leader}); pick another name with -M or "
                                f"terminate it first")
        self._machines[machine.name] = machine
        self._emit(Event.NEW, machine)
        return machine

    def update(self, machine: Machine, **changes: Any) -> None:
        """Change fields and tell listeners which ones changed (PropertiesChanged)."""
        changed = {k: v for k, v in changes.items() if getattr(machine, k) != v}
        for key, value in changed.items():
            setattr(machine, key, value)
        if changed:
            self._emit(Event.CHANGED, machine, changed)

    def remove(self, machine: Machine) -> None:
        if self._machines.get(machine.name) is machine:
            del self._machines[machine.name]
            self._emit(Event.REMOVED, machine)

    def get(self, name: str) -> Machine:
        machine = self._machines.get(name)
        if machine is None:
            raise NoSuchObject(f"no machine named {name!r}")
        return machine

    def all(self) -> list[Machine]:
        return list(self._machines.values())

    def by_pid(self, pid: int, pid_lookup: Callable[[Machine, int], bool]) -> Machine:
        for machine in self._machines.values():
            if machine.leader == pid or pid_lookup(machine, pid):
                return machine
        raise NoSuchObject(f"process {pid} belongs to no machine")
