"""Pool machines as services: what systemd-nspawn@NAME.service is on a systemd host.

`hostelctl start NAME` (and machinectl start, through systemd1_units) starts
NAME from the pool (machine/pool.py) in the background, owned by hosteld, with
the options of nspawn@.service's ExecStart=

    systemd-nspawn --quiet --keep-unit --boot --link-journal=try-guest
                   --network-veth -U --settings=override --machine=%i

as hostel has them (NSPAWN_SERVICE_SETTINGS): --boot, --network-veth (so a
private network), -U as --private-users=pick (the root's ownership is then
handled as for any pick start: 252's -U adds --private-users-ownership=auto),
--link-journal=try-guest, and --settings=override (the NAME.nspawn file
beside the image wins; StartMachine's settings merge it, nspawn_settings.py).
Where hostel differs: there is no service unit to keep, so instead of
--keep-unit the machine gets hostel's own scope, as a plain start does; the
console goes to a per-machine log file (machine_log.py), not the journal; and
--quiet is left out, so hosteld's log says when a service machine starts.

The restart on exit status 133 (nspawn@.service's RestartForceExitStatus=133,
what a container's `reboot` ends in) is the runner's for every booted machine:
it starts the payload again on the same console (runner._watch). What systemd
adds for a unit, a start limit, is here: a pool machine that reboots more than
START_LIMIT_BURST times within START_LIMIT_INTERVAL seconds (systemd's default
StartLimitBurst=5 in 10 s) is stopped, and its log says why, so an init that
exits 133 at once cannot keep hosteld busy forever.

`enable` makes hosteld start NAME whenever hosteld starts: the mark is a
symlink STATE_DIR/enabled/NAME -> the image's path (as systemctl enable makes
a symlink), read back at start-up (start_enabled). Blocking file work runs in
threads."""
from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Coroutine

from dbus_fast import Variant

from hostel.bus import AlreadyExists, HostelError, InvalidArgs, NoSuchObject
from hostel.machine import machine_log, pool, rootfs
from hostel.machine import settings as machine_settings
from hostel.machine.options import SIGNATURES
from hostel.machine.registry import Event, Machine, Registry, State
from hostel.machine.runner import EXIT_REBOOT, MachineRunner, MachineStartFailed

log = logging.getLogger(__name__)

START_LIMIT_BURST = 5        # systemd's DefaultStartLimitBurst=
START_LIMIT_INTERVAL = 10.0  # seconds: systemd's DefaultStartLimitIntervalSec=

# nspawn@.service's command line, as StartMachine settings (see the module's docstring).
NSPAWN_SERVICE_SETTINGS: dict[str, Any] = {
    "Boot": True,
    "NetworkVeth": True,
    "PrivateUsers": "pick",
    "LinkJournal": "try-guest",  # "auto" for a tree without a machine ID: see _link_journal
    "Console": "pipe",
    "Settings": "override",
}


@dataclass(frozen=True)
class UnitFileChange:
    """One change of enable/disable, in systemd's a(sss) terms: type, file, destination."""

    kind: str         # "symlink" or "unlink"
    path: str
    destination: str  # the symlink's target; "" for unlink

    def as_dbus(self) -> list[str]:
        return [self.kind, self.path, self.destination]


def _adopted_reboot(machine: Machine) -> bool:
    """Whether an adopted machine's end asks to start it again: the runner relaunches its
    own machines in place (runner._watch), but an adopted one's console went with the
    hosteld that started it. Its exit status is known only where pidfs tells it
    (foreign_exit), and 133 is what nspawn_exit_status makes of a reboot; one being
    terminated, or registered by RegisterMachine, is not started again."""
    runtime = machine.runtime
    return (runtime is not None and runtime.adopted and not runtime.terminating
            and not machine.registered_only and machine.exit_status == EXIT_REBOOT)


def _valid_name(name: str) -> str:
    if not machine_settings.machine_name_is_valid(name) or not pool.name_is_poolable(name):
        raise InvalidArgs(f"Invalid machine name: {name!r} (up to "
                          f"{machine_settings.MACHINE_NAME_MAX} letters, digits, '-', '_' and '.')")
    return name


def _link_journal(entry: pool.PoolEntry) -> str:
    """try-guest, unless the tree has no machine ID: nspawn 252 then makes one up and links
    the journal under it, while hostel's --link-journal (v219's rules) refuses the start
    even with try-; with auto, a tree without an ID simply gets no journal link."""
    if entry.directory is None:
        return NSPAWN_SERVICE_SETTINGS["LinkJournal"]
    try:
        data = rootfs.read_file_in_root(entry.directory, "etc/machine-id", 4096) or b""
    except rootfs.RootfsError:
        data = b""
    machine_id = data.strip()
    if len(machine_id) == 32 and all(c in b"0123456789abcdef" for c in machine_id):
        return NSPAWN_SERVICE_SETTINGS["LinkJournal"]
    return "auto"


class MachineServices:
    """Starts pool machines, keeps the enabled set, and starts it with hosteld."""

    def __init__(self, registry: Registry, runner: MachineRunner, state_dir: Path) -> None:
        self.registry = registry
        self.runner = runner
        self.state_dir = state_dir
        self.enabled_dir = state_dir / "enabled"
        self.logs = machine_log.ConsoleLogs(state_dir / "logs")
        # machines started here -> when they last rebooted (for the start limit)
        self._reboots: dict[str, tuple[Machine, collections.deque[float]]] = {}
        self._stopping: set[asyncio.Task[None]] = set()
        registry.subscribe(self._on_registry)

    def pool_dirs(self) -> list[str]:
        return pool.pool_dirs(self.state_dir)

    async def find(self, name: str) -> pool.PoolEntry:
        """NAME's pool entry, or NoSuchObject naming the directories searched."""
        _valid_name(name)
        try:
            return await asyncio.to_thread(pool.find, name, self.pool_dirs())
        except pool.NotInPool as e:
            raise NoSuchObject(str(e)) from None

    def running(self, name: str) -> Machine | None:
        try:
            return self.registry.get(name)
        except NoSuchObject:
            return None

    # Start ---------------------------------------------------------------------------

    async def start(self, name: str) -> Machine:
        """Start NAME from the pool in the background; refused if a machine of that name runs."""
        _valid_name(name)
        existing = self.running(name)
        if existing is not None:
            raise AlreadyExists(f"machine {name} is already {existing.state.value} (leader "
                                f"{existing.leader}); 'hostelctl reboot {name}' restarts it, "
                                f"'hostelctl poweroff {name}' stops it")
        entry = await self.find(name)
        settings = await asyncio.to_thread(self._settings, entry)
        try:
            machine = await self.runner.start(settings)
            self._reboots[name] = (machine, collections.deque())
            return machine
        except OSError as e:
            failure: HostelError = MachineStartFailed(
                f"starting machine {name} from {entry.root}: {e}")
        except HostelError as e:
            failure = e
        await self._note(name, f"start failed: {failure}")
        raise failure

    def _on_registry(self, event: Event, machine: Machine, changed: dict[str, Any]) -> None:
        """Count the reboots of machines started here (the runner's OPENING again); one
        past the start limit is not launched again: marking it terminating while the
        runner is about to relaunch makes the runner end it instead (as systemd refuses a
        start past StartLimitBurst=), whatever the load. An adopted machine that ends
        asking for a reboot is started again here (_adopted_reboot)."""
        if changed.get("state") is State.EXITED and _adopted_reboot(machine):
            self._in_background(self._start_again(machine.name, machine.root_directory))
        tracked = self._reboots.get(machine.name)
        if tracked is None or tracked[0] is not machine:
            return
        if event is Event.REMOVED:
            del self._reboots[machine.name]
            return
        if changed.get("state") is not State.OPENING:
            return
        times = tracked[1]
        now = time.monotonic()
        times.append(now)
        while times and now - times[0] > START_LIMIT_INTERVAL:
            times.popleft()
        if len(times) > START_LIMIT_BURST and machine.runtime is not None:
            del self._reboots[machine.name]
            machine.runtime.terminating = True
            self._in_background(self._note_start_limit(machine))

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def _start_again(self, name: str, root: str) -> None:
        """An adopted pool machine's reboot: a new start from the pool, as the runner's
        relaunch would have been (the console it relaunches on went with the earlier
        hosteld; the new start opens the log again). The runner removes the machine
        right after its end, before this runs; a name now taken, or whose pool entry is
        another image, is left alone."""
        try:
            entry = await self.find(name)
        except NoSuchObject:
            log.info("machine %s rebooted; it is not in the pool, so nothing starts it again "
                     "(the hosteld that started it is gone)", name)
            return
        try:
            if entry.root != root:
                log.warning("machine %s rebooted, but its pool entry is now %s, not %s: "
                            "not started again", name, entry.root, root)
                return
            machine = await self.start(name)
        except HostelError as e:
            log.error("machine %s rebooted, and did not start again: %s", name, e)
            return
        log.info("machine %s rebooted: started again (leader %d)", name, machine.leader)

    async def _note_start_limit(self, machine: Machine) -> None:
        why = (f"rebooted more than {START_LIMIT_BURST} times within "
               f"{START_LIMIT_INTERVAL:.0f} s: stopped (systemd's start limit)")
        log.error("machine %s %s", machine.name, why)
        await self._note(machine.name, why)

    async def _note(self, name: str, text: str) -> None:
        try:
            await asyncio.to_thread(self.logs.note, name, text)
        except OSError as e:  # the failure itself still reaches the caller
            log.warning("writing to the console log of machine %s: %s", name, e)

    def _settings(self, entry: pool.PoolEntry) -> machine_settings.MachineSettings:
        """The start's settings: nspawn@.service's and the image, checked as any
        StartMachine's (which merges the .nspawn file); the log is the console, and
        takes what the start has to say about the settings (as nspawn's stderr would)."""
        values: dict[str, Any] = dict(NSPAWN_SERVICE_SETTINGS)
        values["Directory" if entry.directory else "Image"] = entry.root
        values["LinkJournal"] = _link_journal(entry)
        fd = self.logs.open_for_payload(entry.name, entry.root)
        try:
            values["StandardOutput"] = values["StandardError"] = fd
            raw = {key: Variant(SIGNATURES[key], value) for key, value in values.items()}
            return machine_settings.from_dbus(entry.name, raw, Path(entry.pool_dir))
        except BaseException:
            os.close(fd)
            raise

    async def start_enabled(self) -> None:
        """hosteld's start: every enabled machine not already running (adopted) is started;
        one that fails is logged and the others still start."""
        for name in await asyncio.to_thread(self.enabled):
            if self.running(name) is not None:
                continue
            try:
                machine = await self.start(name)
            except HostelError as e:
                log.error("enabled machine %s did not start: %s", name, e)
                continue
            log.info("started enabled machine %s (leader %d)", name, machine.leader)

    # Enable --------------------------------------------------------------------------

    def enabled(self) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self.enabled_dir)
                          if machine_settings.machine_name_is_valid(n))
        except FileNotFoundError:
            return []

    async def enable(self, name: str) -> list[UnitFileChange]:
        """Mark NAME to start with hosteld; it must be in the pool. Nothing changes (and
        nothing is listed) when it already is."""
        entry = await self.find(name)
        link = self.enabled_dir / name
        return await asyncio.to_thread(self._link, link, entry.root)

    @staticmethod
    def _link(link: Path, target: str) -> list[UnitFileChange]:
        link.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        if link.is_symlink() and os.readlink(link) == target:
            return []
        temporary = link.with_name(f".{link.name}.new")
        temporary.unlink(missing_ok=True)
        temporary.symlink_to(target)
        os.replace(temporary, link)
        return [UnitFileChange("symlink", str(link), target)]

    async def disable(self, name: str) -> list[UnitFileChange]:
        """Forget NAME's mark (a running machine keeps running, as systemctl disable)."""
        link = self.enabled_dir / _valid_name(name)
        try:
            await asyncio.to_thread(link.unlink)
        except FileNotFoundError:
            return []
        return [UnitFileChange("unlink", str(link), "")]

    # Logs ----------------------------------------------------------------------------

    async def open_log(self, name: str) -> int:
        try:
            return await asyncio.to_thread(self.logs.open_for_reading, _valid_name(name))
        except machine_log.NoConsoleLog as e:
            raise NoSuchObject(str(e)) from None
