"""Attaching a client to a running guest's console (GuestManager.AttachConsole).

Every guest's console runs through a hub in hosteld (hostel.consolehub): a VM's
(launched, or a `guest run --isolation=vm`) is its launcher's console port,
relayed by the guest manager; a container's (a `guest run` container is a
machine) is its pty, relayed by the machine runtime. This module finds the hub
by the guest's name, says plainly why there is none, and hands it the
client's socket.

The client passes its own end of a socket pair rather than hosteld handing
one out, as StartGuest's StandardInput does: hosteld then holds exactly one
descriptor of the pair, so the client's exit (or its ^]^]^]) is an end of
file for the hub at once."""
from __future__ import annotations

import fcntl
import os
import socket

from hostel.consolehub import ConsoleHub
from hostel.errors import InvalidArgs, NoSuchObject, NotSupported
from hostel.guest.manager import EXITED, Guest
from hostel.machine.registry import Registry, State


def find_console(name: str, vms: dict[str, Guest], registry: Registry | None) -> ConsoleHub:
    """The hub of the running guest `name` (a VM first, then a container)."""
    vm = vms.get(name)
    if vm is not None and vm.state != EXITED:
        if vm.console is None:
            raise NotSupported(f"the console of guest {name!r} cannot be attached to: an "
                               "earlier hosteld started it, and its console relay ended with "
                               "that hosteld (its output goes nowhere since)")
        return vm.console
    machine = None
    if registry is not None:
        machine = next((m for m in registry.all() if m.name == name), None)
    if machine is None or machine.state is State.EXITED:
        if vm is not None or machine is not None:
            raise NotSupported(f"guest {name!r} has exited: its console is closed")
        raise NoSuchObject(f"no guest named {name!r} ('hostelctl guest list' shows the guests)")
    runtime = machine.runtime
    console = runtime.console if runtime is not None else None
    if console is None or console.hub is None or console.hub.ended:
        if runtime is not None and runtime.adopted:
            why = "an earlier hosteld started it, and its console relay ended with that hosteld"
        elif console is not None and console.mode == "pipe":
            why = ("its standard input and output are its client's own descriptors (it was "
                   "started off a terminal, or with --console=pipe); start it on a terminal "
                   "to give it a console")
        else:
            why = "it has no console relayed by hosteld now"
        raise NotSupported(f"the console of guest {name!r} cannot be attached to: {why}")
    return console.hub


def attach(name: str, fd: int, vms: dict[str, Guest], registry: Registry | None) -> None:
    """Attach the client's end `fd` (the message's own copy, closed after the call: the
    hub gets a copy) to the console of guest `name`. It must be a unix stream socket,
    which the client reads and writes."""
    copy = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 0)
    try:
        sock = socket.socket(fileno=copy)
    except OSError:  # not a socket at all
        os.close(copy)
        sock = None
    if sock is None or sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        if sock is not None:
            sock.close()
        raise InvalidArgs("AttachConsole takes one end of a unix stream socket pair "
                          "(socketpair(AF_UNIX, SOCK_STREAM)); the console is read and "
                          "written through it")
    try:
        hub = find_console(name, vms, registry)
    except BaseException:
        sock.close()
        raise
    hub.attach(sock.detach())
