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
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from hostel import native
from hostel.consolehub import ConsoleHub, piped_console
from hostel.errors import AlreadyExists, NoSuchObject
from hostel.guest import channel, hostfiles
from hostel.guest.errors import GuestError
from hostel.guest.launcher import settings_from_json, settings_to_json
from hostel.guest.settings import GuestSettings
from hostel.guest.vmlauncher import ports_to_json
from hostel.machine.statefile import process_start_time
from hostel.spawn import Plan, spawn, wait_exit, wait_readable

log = logging.getLogger(__name__)

RUNNING, EXITED = "running", "exited"
CONSOLE_DRAIN_SECONDS = 2.0


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
    # A guest init's frame channel (hosteld reads it): its exit frame's code
    # is the guest's exit status, as the payload's is a container's.
    channel_task: asyncio.Task[int | None] | None = None
    # hosteld's relay of its console (consolehub), which clients attach to; None for a
    # guest adopted from an earlier hosteld (whose relay ended with it)
    console: ConsoleHub | None = None
    # A VM run's own directory (its config disk): removed when the guest ends, by
    # whichever hosteld sees the end (it is in the state file)
    work_dir: Path | None = None
    image: str = ""   # the image a `guest run --isolation=vm` boots ("" for a launch)
    klass = "vm"      # machined's class: what `guest list` and machinectl list say

    @property
    def memory_mb(self) -> int:
        return self.settings.memory_mb

    @property
    def kernel(self) -> str:
        return str(self.settings.kernel)

    @property
    def backend(self) -> str:
        return self.settings.backend

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


def _console_of(guest: Guest) -> str:
    """Where to look for what the guest and its launcher printed."""
    if guest.console_log is not None:
        return f"the console log {guest.console_log}"
    return "the console output of the client that launched it"


def read_channel(name: str, fd: int) -> int | None:
    """A guest init's frames until EOF (in a thread): its log frames go to hosteld's
    log, the exit frame's code is returned (None without one: the guest died first)."""
    code = None
    try:
        while (message := channel.read_frame(fd)) is not None:
            if message["type"] == "exit" and isinstance(message.get("code"), int):
                code = message["code"]
            elif message["type"] == "log":
                log.info("guest %s: %s: %s", name, message.get("level"), message.get("message"))
    except (channel.ChannelError, OSError) as e:
        log.warning("guest %s: its channel broke: %s", name, e)
    finally:
        os.close(fd)
    return code


def _close_console(hub: ConsoleHub) -> None:
    """The relay's end: at the output's end, or after a grace time (a launcher's child
    still holding the pipe) at once."""
    if not hub.wait_ended(CONSOLE_DRAIN_SECONDS):
        hub.stop()


class GuestManager:
    """The registry of guests and their launcher processes."""

    def __init__(self, runtime_dir: Path, on_change: Callable[[Guest], None]) -> None:
        self.dir = runtime_dir / "guests"
        self.guests: dict[str, Guest] = {}
        self._on_change = on_change
        # told when a guest starts running (launched or adopted) and when it ends:
        # machined's API keeps a machine object per running VM (machine1_guests.py)
        self.followers: list[Callable[[Guest], None]] = []
        self._watchers: set[asyncio.Task[None]] = set()

    def _tell_followers(self, guest: Guest) -> None:
        for follower in self.followers:
            follower(guest)

    def _plan(self, guest: Guest, console_fd: int, input_fd: int, exit_file: Path,
              ports: Sequence[tuple[str, int]] = (), channel_port: str | None = None) -> Plan:
        """ports: (name, fd) of named console ports; their fds (3 or more) stay
        open across exec under the same numbers, for vmlauncher to attach;
        channel_port: the one of them carrying the init's frames (vmlauncher
        also sends it the end of stdin)."""
        plan = Plan()
        plan.fds.update((console_fd, input_fd))
        plan.dup2(input_fd, 0)
        plan.dup2(console_fd, 1)
        plan.dup2(console_fd, 2)
        for _name, fd in ports:
            plan.dup2(fd, fd)
        plan.setsid()
        env = [f"PATH={os.environ.get('PATH', '/usr/bin:/bin')}"]
        args = [settings_to_json(guest.settings), str(exit_file)]
        if ports:
            module = "hostel.guest.vmlauncher"
            args.append(ports_to_json(list(ports)))
            if channel_port is not None:
                args.append(channel_port)
        else:
            module = "hostel.guest.launcher"
        plan.execve(sys.executable, [sys.executable, "-m", module, *args], env)
        return plan

    async def start(self, name: str, settings: GuestSettings, console_fd: int | None,
                    input_fd: int | None = None, client_fd: int | None = None,
                    ports: Sequence[tuple[str, int]] = (), channel_port: str | None = None,
                    work_dir: Path | None = None, image: str = "") -> Guest:
        """console_fd: where the console goes (else a log file); input_fd: what the
        virtio-console reads (else nothing); client_fd: a pipe's read end that hangs
        up when the client is gone, which then ends the guest (_end_with_client);
        ports: (name, fd) of more console ports, whose output goes to fd;
        channel_port: the name of one more port, carrying a guest init's frames to
        hosteld (read_channel); work_dir: removed when the guest ends; image: the
        image it runs, if any (listed, and kept across a restart)."""
        old = self.guests.get(name)
        if old is not None and old.state == RUNNING:
            raise AlreadyExists(f"guest {name!r} is already running; terminate it first")
        self.dir.mkdir(parents=True, exist_ok=True)
        log_path = None
        if console_fd is None:
            log_path = settings.console_log or self.dir / f"{name}.console"
            # never blocks the event loop: a FIFO is refused, not waited on (hostfiles.py)
            owner_output = hostfiles.open_checked(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                                                  hostfiles.REGULAR, "console log",
                                                  "a regular file's path", 0o640)
        else:
            owner_output = fcntl.fcntl(console_fd, fcntl.F_DUPFD_CLOEXEC, 0)
        owner_input = fcntl.fcntl(input_fd, fcntl.F_DUPFD_CLOEXEC, 0) \
            if input_fd is not None else None
        # a VM run's payload reads stdin, which must end with the client's; a launched
        # guest's console input stays open for the clients that attach to it
        hub, console_fd, input_fd = piped_console(name, owner_output, owner_input,
                                                  input_ends_with_owner=channel_port is not None)
        console_fd, input_fd = _above_stdio(console_fd), _above_stdio(input_fd)
        exit_file = self.dir / f"{name}.exit"
        exit_file.unlink(missing_ok=True)
        guest = Guest(name, settings, log_path, console=hub, work_dir=work_dir, image=image)
        port_fds = [(port, _above_stdio(fd, keep=True)) for port, fd in ports]
        channel_r = -1
        if channel_port is not None:
            channel_r, channel_w = os.pipe2(os.O_CLOEXEC)
            port_fds.append((channel_port, _above_stdio(channel_w)))
        try:
            # pid 1 of a pid namespace of its own: part of the launcher's jail (jail.py)
            child = spawn(self._plan(guest, console_fd, input_fd, exit_file, port_fds,
                                     channel_port),
                          clone_flags=native.CLONE_NEWPID)
            try:
                await child.started()
            except OSError as e:
                child.close()
                if channel_r >= 0:
                    os.close(channel_r)
                raise GuestError(f"cannot start the launcher of guest {name!r}: {e}") from e
        finally:
            os.close(console_fd)
            os.close(input_fd)
            for _port, fd in port_fds:  # the launcher holds the only write ends now
                os.close(fd)
        if channel_r >= 0:
            guest.channel_task = asyncio.get_running_loop().create_task(
                asyncio.to_thread(read_channel, name, channel_r))
        guest.pid, guest.pidfd = child.pid, child.pidfd
        self.guests[name] = guest
        self._save(guest)
        self._track(self._watch(guest, exit_file))
        self._tell_followers(guest)
        if client_fd is not None:
            self._track(self._end_with_client(guest, _above_stdio(client_fd, keep=True)))
        log.info("guest %s started: launcher pid %d", name, guest.pid)
        return guest

    def _track(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    # A guest's launcher does not need hosteld: what a new hosteld needs to take it
    # back is kept in guests/NAME.json (the launcher reports how the guest ended in
    # guests/NAME.exit, which works across a restart too).

    async def _end_with_client(self, guest: Guest, client_fd: int) -> None:
        """client_fd: the read end of a pipe whose write end only the client holds.
        It hangs up when the client is gone, however it ended (even SIGKILL):
        a guest still running then is killed, as its client would have asked."""
        try:
            await wait_readable(client_fd)
        finally:
            os.close(client_fd)
        if guest.state == RUNNING and guest.pidfd >= 0:
            log.info("guest %s: its client is gone; terminating it", guest.name)
            native.pidfd_send_signal(guest.pidfd, signal.SIGKILL)

    def _state_file(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def _save(self, guest: Guest) -> None:
        state = {"name": guest.name, "settings": settings_to_json(guest.settings),
                 "pid": guest.pid, "start": process_start_time(guest.pid),
                 "console_log": str(guest.console_log) if guest.console_log else None,
                 "started_usec": guest.started_usec,
                 "work_dir": str(guest.work_dir) if guest.work_dir else None,
                 "image": guest.image}
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
                              pid=state["pid"], started_usec=state["started_usec"],
                              work_dir=Path(state["work_dir"]) if state.get("work_dir") else None,
                              image=state.get("image") or "")
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
                self._tell_followers(guest)
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
        if guest.console is not None:  # its output ends with the launcher: deliver all of it
            await asyncio.to_thread(_close_console, guest.console)
        # the launcher held the channel's only write end: it is at EOF now
        code = await guest.channel_task if guest.channel_task is not None else None
        self._record_exit(guest, exit_file, info)
        if code is not None:
            guest.exit_status = code
        self._on_change(guest)
        self._tell_followers(guest)

    def _record_exit(self, guest: Guest, exit_file: Path, info: native.ExitInfo | None) -> None:
        try:
            result = json.loads(exit_file.read_text())
            guest.exit_reason, guest.exit_detail = result["reason"], result["detail"]
            guest.exit_status = result["code"] if result["reason"] == "poweroff" else -1
            if result.get("traceback"):  # a launcher failure that is no GuestError
                log.error("guest %s: the launcher failed:\n%s", guest.name, result["traceback"])
        except (OSError, ValueError, KeyError):
            if info is None:  # adopted: only the launcher's absence is known
                guest.exit_reason = "killed"
                guest.exit_detail = "the launcher ended without reporting why (it was started " \
                                    "by an earlier hosteld)"
            else:
                guest.exit_reason = "killed" if not info.exited else "launcher-failed"
                guest.exit_detail = (f"the launcher ended (status {info.status}) without "
                                     f"reporting why; see {_console_of(guest)}")
        exit_file.unlink(missing_ok=True)
        if guest.work_dir is not None:
            shutil.rmtree(guest.work_dir, ignore_errors=True)
        self._state_file(guest.name).unlink(missing_ok=True)
        guest.state = EXITED
        guest.exited.set()
        log.info("guest %s exited: %s", guest.name, guest.exit_detail)

    def running_machines(self) -> list[tuple[str, str, str]]:
        """(name, class, service) of the running guests, for machinectl list."""
        return [(g.name, "vm", "hostel") for g in self.guests.values() if g.state == RUNNING]

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
