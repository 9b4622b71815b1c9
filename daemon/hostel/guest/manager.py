"""Guests as processes: start a launcher per guest, watch it, stop it.

Each guest runs in its own launcher process (see launcher.py), started
through the spawn trampoline and reaped through its pidfd on the event loop.
hosteld itself never touches /dev/kvm."""
from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from hostel import native
from hostel.bus import AlreadyExists, NoSuchObject
from hostel.guest.errors import GuestError
from hostel.guest.launcher import settings_from_json, settings_to_json
from hostel.guest.settings import GuestSettings
from hostel.machine.statefile import process_start_time
from hostel.spawn import Plan, spawn, wait_exit, wait_readable

log = logging.getLogger(__name__)

RUNNING, EXITED = "running", "exited"


@dataclass
class Guest:
    name: str
    settings: GuestSettings
    console_log: Path | None
    state: str = RUNNING
    pidfd: int = -1
    pid: int = 0
    exit_status: int = -1
    exit_reason: str = ""
    exit_detail: str = ""
    started_usec: int = field(default_factory=lambda: int(time.time() * 1e6))
    exited: asyncio.Event = field(default_factory=asyncio.Event)

    def devices(self) -> list[str]:
        found = [f"serial:{0x3F8:#x}", "console"]
        found += [f"block:{b.path}{':ro' if b.read_only else ''}" for b in self.settings.block]
        found += [f"net:{n.bridge or n.address}" for n in self.settings.network]
        return found + (["rng"] if self.settings.rng else [])


def _above_stdio(fd: int, keep: bool = False) -> int:
    """A copy of fd numbered 3 or more, so that the launcher's dup2 onto 0, 1 and 2
    cannot overwrite one source with another (hosteld may run with 0-2 closed)."""
    copy = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    if not keep:
        os.close(fd)
    return copy


class GuestManager:
    """The registry of guests and their launcher processes."""

    def __init__(self, runtime_dir: Path, on_change: Callable[[Guest], None]) -> None:
        self.dir = runtime_dir / "guests"
        self.guests: dict[str, Guest] = {}
        self._on_change = on_change
        self._watchers: set[asyncio.Task[None]] = set()

    def _plan(self, guest: Guest, console_fd: int, input_fd: int, exit_file: Path) -> Plan:
        plan = Plan()
        plan.fds.update((console_fd, input_fd))
        plan.dup2(input_fd, 0)
        plan.dup2(console_fd, 1)
        plan.dup2(console_fd, 2)
        plan.setsid()
        env = [f"PATH={os.environ.get('PATH', '/usr/bin:/bin')}"]
        plan.execve(sys.executable, [sys.executable, "-m", "hostel.guest.launcher",
                                     settings_to_json(guest.settings), str(exit_file)], env)
        return plan

    async def start(self, name: str, settings: GuestSettings, console_fd: int | None,
                    input_fd: int | None = None) -> Guest:
        """console_fd: where the console goes (else a log file); input_fd: what the
        virtio-console reads (else nothing)."""
        old = self.guests.get(name)
        if old is not None and old.state == RUNNING:
            raise AlreadyExists(f"guest {name!r} is already running; terminate it first")
        self.dir.mkdir(parents=True, exist_ok=True)
        log_path = None
        if console_fd is None:
            log_path = settings.console_log or self.dir / f"{name}.console"
            console_fd = _above_stdio(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC |
                                              os.O_CLOEXEC, 0o640))
        else:
            console_fd = _above_stdio(console_fd, keep=True)
        input_fd = _above_stdio(input_fd, keep=True) if input_fd is not None else \
            _above_stdio(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
        exit_file = self.dir / f"{name}.exit"
        exit_file.unlink(missing_ok=True)
        guest = Guest(name, settings, log_path)
        try:
            child = spawn(self._plan(guest, console_fd, input_fd, exit_file))
            try:
                await child.started()
            except OSError as e:
                child.close()
                raise GuestError(f"cannot start the launcher of guest {name!r}: {e}") from e
        finally:
            os.close(console_fd)
            os.close(input_fd)
        guest.pid, guest.pidfd = child.pid, child.pidfd
        self.guests[name] = guest
        self._save(guest)
        self._track(self._watch(guest, exit_file))
        log.info("guest %s started: launcher pid %d", name, guest.pid)
        return guest

    def _track(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    # A guest's launcher does not need hosteld: what a new hosteld needs to take it
    # back is kept in guests/NAME.json (the launcher reports how the guest ended in
    # guests/NAME.exit, which works across a restart too).

    def _state_file(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def _save(self, guest: Guest) -> None:
        state = {"name": guest.name, "settings": settings_to_json(guest.settings),
                 "pid": guest.pid, "start": process_start_time(guest.pid),
                 "console_log": str(guest.console_log) if guest.console_log else None,
                 "started_usec": guest.started_usec}
        tmp = self.dir / f".{guest.name}.json.tmp"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self._state_file(guest.name))

    def adopt(self) -> list[Guest]:
        """The guests an earlier hosteld left: running ones are watched again."""
        adopted = []
        for path in sorted(self.dir.glob("*.json")) if self.dir.is_dir() else []:
            try:
                state = json.loads(path.read_text())
                guest = Guest(state["name"], settings_from_json(state["settings"]),
                              Path(state["console_log"]) if state["console_log"] else None,
                              pid=state["pid"], started_usec=state["started_usec"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.error("ignoring guest state %s: %s", path, e)
                continue
            self.guests[guest.name] = guest
            adopted.append(guest)
            exit_file = self.dir / f"{guest.name}.exit"
            alive = state["start"] is not None and process_start_time(guest.pid) == state["start"]
            try:
                guest.pidfd = native.pidfd_open(guest.pid) if alive else -1
            except ProcessLookupError:
                guest.pidfd = -1
            if guest.pidfd >= 0:
                log.info("adopted guest %s (launcher pid %d)", guest.name, guest.pid)
                self._track(self._watch(guest, exit_file, adopted=True))
            else:
                self._record_exit(guest, exit_file, None)
        return adopted

    async def _watch(self, guest: Guest, exit_file: Path, adopted: bool = False) -> None:
        if adopted:  # not our child: the pidfd says when, the exit file says how
            await wait_readable(guest.pidfd)
            info = None
        else:
            info = await wait_exit(guest.pidfd)
        os.close(guest.pidfd)
        guest.pidfd = -1
        self._record_exit(guest, exit_file, info)
        self._on_change(guest)

    def _record_exit(self, guest: Guest, exit_file: Path, info: native.ExitInfo | None) -> None:
        try:
            result = json.loads(exit_file.read_text())
            guest.exit_reason, guest.exit_detail = result["reason"], result["detail"]
            guest.exit_status = result["code"] if result["reason"] == "poweroff" else -1
        except (OSError, ValueError, KeyError):
            if info is None:  # adopted: only the launcher's absence is known
                guest.exit_reason = "killed"
                guest.exit_detail = "the launcher ended without reporting why (it was started " \
                                    "by an earlier hosteld)"
            else:
                guest.exit_reason = "killed" if not info.exited else "launcher-failed"
                guest.exit_detail = (f"the launcher ended (status {info.status}) without "
                                     "reporting why; see the console log")
        exit_file.unlink(missing_ok=True)
        self._state_file(guest.name).unlink(missing_ok=True)
        guest.state = EXITED
        guest.exited.set()
        log.info("guest %s exited: %s", guest.name, guest.exit_detail)

    def get(self, name: str) -> Guest:
        try:
            return self.guests[name]
        except KeyError:
            raise NoSuchObject(f"no guest named {name!r} ('hostelctl guest list' or "
                               "ListGuests shows the guests)") from None

    async def terminate(self, name: str) -> Guest | None:
        """Kill a running guest and wait for it; forget an exited one (returned)."""
        guest = self.get(name)
        if guest.state == EXITED:
            del self.guests[name]
            return guest
        native.pidfd_send_signal(guest.pidfd, signal.SIGKILL)
        await guest.exited.wait()
        return None

    async def stop_all(self) -> None:
        for name in [n for n, g in self.guests.items() if g.state == RUNNING]:
            await self.terminate(name)
