"""The few org.freedesktop.systemd1 calls machinectl makes for start/enable/disable.

machinectl 252 does not ask machined to start a machine: `machinectl start NAME`
calls org.freedesktop.machine1.Manager.GetImage(NAME) (the image must exist),
then org.freedesktop.systemd1.Manager.StartUnit("systemd-nspawn@NAME.service",
"fail") and waits for the JobRemoved signal of the job path it got back;
`enable`/`disable` call GetImage, then EnableUnitFiles(["systemd-nspawn@NAME.service"],
false, false) / DisableUnitFiles([...], false), print the a(sss) changes, and call
Reload() (seen with dbus-monitor on a private bus, machinectl 252.39).

On a host with systemd, systemd answers these and runs systemd-nspawn itself.
Where no systemd owns the name (as on this project's test machines, whose PID 1
is not systemd), hosteld answers them, for systemd-nspawn@*.service units only,
by doing what machine/services.py does for hostelctl start/enable/disable.
Every other unit is refused with systemd's NoSuchUnit error. Where this differs
from systemd: StartUnit answers once the machine runs (or fails, as a D-Bus
error machinectl prints), and its job ends "done" right after; Reload does
nothing, as hostel reads its enabled set when it starts."""
from __future__ import annotations

import asyncio
import itertools
import logging

from dbus_fast.aio import MessageBus
from dbus_fast.service import ServiceInterface, dbus_method, dbus_signal

from hostel.bus import Dispatcher, HostelError, InvalidArgs, mutating, request_name
from hostel.machine.machine1 import name_has_owner
from hostel.machine.services import MachineServices, UnitFileChange

log = logging.getLogger(__name__)

BUS_NAME = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
JOB_PREFIX = "/org/freedesktop/systemd1/job"
UNIT_PREFIX = "systemd-nspawn@"
UNIT_SUFFIX = ".service"
JOB_MODES = frozenset({"replace", "fail", "isolate", "ignore-dependencies",
                       "ignore-requirements", "flush", "triggering"})


class NoSuchUnit(HostelError):
    dbus_name = "org.freedesktop.systemd1.NoSuchUnit"


def machine_of_unit(unit: str) -> str:
    """systemd-nspawn@NAME.service -> NAME; any other unit is not hostel's to answer."""
    if unit.startswith(UNIT_PREFIX) and unit.endswith(UNIT_SUFFIX):
        name = unit[len(UNIT_PREFIX):-len(UNIT_SUFFIX)]
        if name:
            return name
    raise NoSuchUnit(f"Unit {unit} not found: no systemd runs here, and hosteld answers "
                     f"for {UNIT_PREFIX}NAME{UNIT_SUFFIX} (machines in its pool) only")


def _changes(changes: list[UnitFileChange]) -> list[list[str]]:
    return [change.as_dbus() for change in changes]


class Systemd1Manager(ServiceInterface):
    """org.freedesktop.systemd1.Manager, the subset above."""

    def __init__(self, services: MachineServices) -> None:
        super().__init__("org.freedesktop.systemd1.Manager")
        self.services = services
        self._job_ids = itertools.count(1)

    @dbus_method()
    @mutating
    async def StartUnit(self, unit: "s", mode: "s") -> "o":
        name = machine_of_unit(unit)
        if mode not in JOB_MODES:
            raise InvalidArgs(f"Job mode {mode} invalid")
        if self.services.running(name) is None:  # an active unit's start is a no-op job
            await self.services.start(name)
        job = next(self._job_ids)
        path = f"{JOB_PREFIX}/{job}"
        # After the reply: the Dispatcher sends it in this same step of the loop, and the
        # caller only waits for the job once it knows the path.
        asyncio.get_running_loop().call_soon(self.JobRemoved, job, path, unit, "done")
        return path

    @dbus_method()
    @mutating
    async def EnableUnitFiles(self, files: "as", runtime: "b", force: "b") -> "ba(sss)":
        changes: list[UnitFileChange] = []
        for name in [machine_of_unit(unit) for unit in files]:
            changes += await self.services.enable(name)
        return [False, _changes(changes)]  # no [Install] section asks for more

    @dbus_method()
    @mutating
    async def DisableUnitFiles(self, files: "as", runtime: "b") -> "a(sss)":
        changes: list[UnitFileChange] = []
        for name in [machine_of_unit(unit) for unit in files]:
            changes += await self.services.disable(name)
        return _changes(changes)

    @dbus_method()
    @mutating
    def Reload(self):
        """Nothing to reload: hosteld reads its enabled set when it starts."""

    @dbus_signal()
    def JobRemoved(self, job: int, path: str, unit: str, result: str) -> "uoss":
        return [job, path, unit, result]


async def serve(bus: MessageBus, dispatcher: Dispatcher, services: MachineServices) -> bool:
    """Answer as org.freedesktop.systemd1 when nobody does (True if hosteld now owns it)."""
    if await name_has_owner(bus, BUS_NAME):
        return False
    dispatcher.export(MANAGER_PATH, Systemd1Manager(services))
    if not await request_name(bus, BUS_NAME):
        log.warning("could not own %s: machinectl start/enable/disable will not reach hosteld",
                    BUS_NAME)
        return False
    log.info("serving %s (systemd-nspawn@*.service only) for machinectl start/enable",
             BUS_NAME)
    return True
