"""VM guests as org.freedesktop.machine1 machines, so machinectl finds them by name.

machined keeps one object per machine of any class: `machinectl status/show/
terminate/kill VMNAME` first ask GetMachine (or TerminateMachine, KillMachine)
for the name, then talk to that object. A VM guest lives in the guest manager,
not in the machine registry, so this module follows the manager (its
`followers`: told when a guest starts running, is adopted, or ends) and keeps an
object for each running VM under the path machined would give it. The facts are
read from the guest each time, as the guest's own org.hostel1.Guest object does.

What machined 252 answers for a machine of class "vm" is kept: no root directory,
and the container-only calls (addresses, os-release, UID shift, PTYs, shells,
copying, bind mounts) refused with NotSupported."""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Protocol

from dbus_fast.service import PropertyAccess, ServiceInterface, dbus_method, dbus_property

from hostel import native
from hostel.bus import Dispatcher, HostelError, InvalidArgs, mutating
from hostel.guest.manager import EXITED, RUNNING, Guest, GuestManager
from hostel.machine.service import KILL_WHO, parse_signal

log = logging.getLogger(__name__)

CLASS, SERVICE = "vm", "hostel"
NULL_ID = bytes(16)  # machined's SD_ID128_NULL: hostel's VMs have no machine id of their own


class NotSupported(HostelError):
    dbus_name = "org.freedesktop.DBus.Error.NotSupported"


class GuestControl(Protocol):
    """What this module needs of the guest service (guest/service.py's GuestService)."""

    manager: GuestManager

    async def terminate(self, name: str) -> None: ...


def containers_only(what: str) -> NotSupported:
    """machined's answer to a container-only call on a VM, in its words."""
    return NotSupported(f"{what} is only supported on container machines.")


def _monotonic_usec(realtime_usec: int) -> int:
    """The guest's start on CLOCK_MONOTONIC: the manager keeps the wall-clock time only."""
    elapsed = time.time_ns() // 1000 - realtime_usec
    return max(0, time.monotonic_ns() // 1000 - elapsed)


def _pid_namespace(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/pid").st_ino
    except OSError:
        return None


def _namespace_members(leader: int) -> list[int]:
    """Every process in the launcher's pid namespace (it is that namespace's pid 1)."""
    namespace = _pid_namespace(leader)
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != leader and _pid_namespace(int(entry)) == namespace:
            members.append(int(entry))
    return members


class VmMachine(ServiceInterface):
    """org.freedesktop.machine1.Machine of one running VM guest."""

    def __init__(self, guest: Guest, control: GuestControl) -> None:
        super().__init__("org.freedesktop.machine1.Machine")
        self.guest = guest
        self.control = control
        self.monotonic_usec = _monotonic_usec(guest.started_usec)

    @dbus_property(access=PropertyAccess.READ)
    def Name(self) -> "s":
        return self.guest.name

    @dbus_property(access=PropertyAccess.READ)
    def Id(self) -> "ay":
        return NULL_ID

    @dbus_property(access=PropertyAccess.READ)
    def Class(self) -> "s":
        return CLASS

    @dbus_property(access=PropertyAccess.READ)
    def Service(self) -> "s":
        return SERVICE

    @dbus_property(access=PropertyAccess.READ)
    def Unit(self) -> "s":
        return ""  # the launcher runs in no unit of its own (no systemd to make a scope)

    @dbus_property(access=PropertyAccess.READ)
    def Leader(self) -> "u":
        return self.guest.pid

    @dbus_property(access=PropertyAccess.READ)
    def RootDirectory(self) -> "s":
        return ""  # as machined's for a VM: it has no tree on the host

    @dbus_property(access=PropertyAccess.READ)
    def Timestamp(self) -> "t":
        return self.guest.started_usec

    @dbus_property(access=PropertyAccess.READ)
    def TimestampMonotonic(self) -> "t":
        return self.monotonic_usec

    @dbus_property(access=PropertyAccess.READ)
    def NetworkInterfaces(self) -> "ai":
        return []

    @dbus_property(access=PropertyAccess.READ)
    def State(self) -> "s":
        return "running" if self.guest.state == RUNNING else "closing"

    @dbus_method()
    @mutating
    async def Terminate(self):
        await self.terminate()

    @dbus_method()
    @mutating
    def Kill(self, who: "s", signal: "i"):
        self.kill(who, signal)

    @dbus_method()
    def GetAddresses(self) -> "a(iay)":
        raise containers_only("Requesting IP address data")

    @dbus_method()
    def GetOSRelease(self) -> "a{ss}":
        raise containers_only("Requesting OS release data")

    @dbus_method()
    def GetUIDShift(self) -> "u":
        raise NotSupported("UID/GID shift may only be determined for container machines.")

    @dbus_method()
    def OpenPTY(self) -> "hs":
        raise containers_only("Opening pseudo TTYs")

    @dbus_method()
    def OpenLogin(self) -> "hs":
        raise containers_only("Opening logins")

    @dbus_method()
    def OpenShell(self, user: "s", path: "s", args: "as", environment: "as") -> "hs":
        raise containers_only("Opening shells")

    @dbus_method()
    def CopyFrom(self, source: "s", destination: "s"):
        raise containers_only("Copying files")

    @dbus_method()
    def CopyFromWithFlags(self, source: "s", destination: "s", flags: "t"):
        raise containers_only("Copying files")

    @dbus_method()
    def CopyTo(self, source: "s", destination: "s"):
        raise containers_only("Copying files")

    @dbus_method()
    def CopyToWithFlags(self, source: "s", destination: "s", flags: "t"):
        raise containers_only("Copying files")

    @dbus_method()
    def BindMount(self, source: "s", destination: "s", read_only: "b", mkdir: "b"):
        raise containers_only("Bind mounting")

    async def terminate(self) -> None:
        """machined's Terminate: the machine is gone afterwards. The guest service keeps
        an ended VM listed (for its exit reason) until told again; machinectl's caller
        asked for it to go, so it is forgotten too."""
        guest = self.guest
        await self.control.terminate(guest.name)
        if self.control.manager.guests.get(guest.name) is guest and guest.state == EXITED:
            await self.control.terminate(guest.name)

    def kill(self, who: str, signal: int) -> None:
        """who: "leader" signals the launcher; "all" (machined's default) every process
        of its pid namespace, as machined signals every process of a VM's scope."""
        if who not in KILL_WHO and who != "":
            raise InvalidArgs(f"invalid kill target {who!r}: leader or all")
        number = parse_signal(signal)
        guest = self.guest
        if guest.state != RUNNING or guest.pidfd < 0:
            raise InvalidArgs(f"guest {guest.name} is not running")
        members = _namespace_members(guest.pid) if who in ("", "all") else []
        native.pidfd_send_signal(guest.pidfd, number)
        for pid in members:
            try:
                os.kill(pid, number)
            except ProcessLookupError:
                pass  # it ended meanwhile


class VmMachines:
    """The VM objects: exported while their guest runs, announced as machined does."""

    def __init__(self, dispatcher: Dispatcher, control: GuestControl,
                 path_of: Callable[[str], str], announce: Callable[[str, str, bool], None],
                 path_taken: Callable[[str], bool]) -> None:
        """path_of(name): the machine's object path; announce(name, path, new):
        MachineNew or MachineRemoved; path_taken(name): whether a machine of the
        registry holds the name (and so the path)."""
        self.dispatcher = dispatcher
        self.control = control
        self.path_of = path_of
        self.announce = announce
        self.path_taken = path_taken
        self.objects: dict[str, VmMachine] = {}

    def follow(self) -> None:
        for guest in list(self.control.manager.guests.values()):
            self._on_guest(guest)
        self.control.manager.followers.append(self._on_guest)

    def get(self, name: str) -> VmMachine | None:
        return self.objects.get(name)

    def by_pid(self, pid: int) -> str | None:
        """The VM whose launcher's pid namespace `pid` is in (GetMachineByPID)."""
        namespace = _pid_namespace(pid)
        return next((name for name, obj in sorted(self.objects.items())
                     if namespace is not None and _pid_namespace(obj.guest.pid) == namespace
                     and namespace != _pid_namespace(os.getpid())), None)

    def listed(self) -> list[list[Any]]:
        """ListMachines' rows of the running VMs."""
        return [[name, CLASS, SERVICE, self.path_of(name)] for name in sorted(self.objects)]

    def _on_guest(self, guest: Guest) -> None:
        obj = self.objects.get(guest.name)
        path = self.path_of(guest.name)
        if guest.state == RUNNING and (obj is None or obj.guest is not guest):
            if obj is not None:
                self._remove(guest.name)
            if self.path_taken(guest.name):
                log.warning("guest %s: a machine of that name exists; machinectl shows "
                            "that machine only", guest.name)
                return
            self.objects[guest.name] = VmMachine(guest, self.control)
            self.dispatcher.export(path, self.objects[guest.name])
            self.announce(guest.name, path, True)
        elif guest.state != RUNNING and obj is not None and obj.guest is guest:
            self._remove(guest.name)

    def _remove(self, name: str) -> None:
        path = self.path_of(name)
        self.dispatcher.unexport(path, self.objects.pop(name))
        self.announce(name, path, False)
