"""Reads are open to everyone; every mutating method needs root, at the bus and in hosteld."""
from __future__ import annotations

import json
import subprocess

import pytest

from hostel.cryptsetup.service import CryptsetupManagerInterface
from hostel.guest.service import GuestManagerInterface
from hostel.machine.service import MachineManagerInterface
from hostel.privatebus import DaemonProcess

from conftest import NOBODY, unprivileged_python

# Every mutating method, with arguments that are well-formed for its signature.
MUTATING_CALLS = [
    ("/org/hostel1/machine", "org.hostel1.MachineManager", "StartMachine", "sa{sv}", ["x", {}]),
    ("/org/hostel1/machine", "org.hostel1.MachineManager", "RegisterMachine", "sayssus",
     ["x", [], "svc", "container", 1, "/"]),
    ("/org/hostel1/machine", "org.hostel1.MachineManager", "TerminateMachine", "s", ["x"]),
    ("/org/hostel1/machine", "org.hostel1.MachineManager", "KillMachine", "ssi", ["x", "all", 15]),
    ("/org/hostel1/cryptsetup", "org.hostel1.CryptsetupManager", "Attach", "sa{sv}", ["x", {}]),
    ("/org/hostel1/cryptsetup", "org.hostel1.CryptsetupManager", "Detach", "s", ["x"]),
    ("/org/hostel1/cryptsetup", "org.hostel1.CryptsetupManager", "CheckKey", "sa{sv}", ["x", {}]),
    ("/org/hostel1/cryptsetup", "org.hostel1.CryptsetupManager", "Reload", "", []),
    ("/org/hostel1/guest", "org.hostel1.GuestManager", "StartGuest", "sa{sv}", ["x", {}]),
    ("/org/hostel1/guest", "org.hostel1.GuestManager", "TerminateGuest", "s", ["x"]),
    ("/org/hostel1/guest", "org.hostel1.GuestManager", "ImportImage", "ss", ["/x", "x"]),
    ("/org/hostel1/guest", "org.hostel1.GuestManager", "ImportImageEx", "ssa{sv}",
     ["/x", "x", {}]),
    ("/org/hostel1/guest", "org.hostel1.GuestManager", "PullImage", "ssa{sv}", ["x", "", {}]),
    ("/org/hostel1/guest", "org.hostel1.GuestManager", "RemoveImage", "s", ["x"]),
    # the caller's standard input stands in for the socket a console client passes
    ("/org/hostel1/guest", "org.hostel1.GuestManager", "AttachConsole", "sh", ["x", 0]),
]
READ_CALLS = [
    ("/org/hostel1/machine", "org.hostel1.MachineManager", "ListMachines", "", []),
    ("/org/hostel1/guest", "org.hostel1.GuestManager", "ListGuests", "", []),
    ("/org/hostel1/guest", "org.hostel1.GuestManager", "ListImages", "", []),
]

CALLER = """
import json, sys
from hostel.client import CallFailed, Client
path, interface, member, signature, args = json.loads(sys.argv[1])
with Client() as client:
    try:
        client.call(path, interface, member, signature, *args)
        print(json.dumps(["ok", ""]))
    except CallFailed as e:
        # hostelctl shows "requires root"; the daemon's own words are kept as detail
        print(json.dumps([e.name, getattr(e, "detail", str(e))]))
"""


def call_as(uid: int | None, daemon: DaemonProcess, call: tuple) -> tuple[str, str]:
    path, interface, member, signature, args = call
    cmd = [unprivileged_python(), "-c", CALLER, json.dumps([path, interface, member, signature, args])]
    if uid is not None:
        cmd = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *cmd]
    out = subprocess.run(cmd, env=daemon.environment(), capture_output=True, text=True,
                         timeout=30, check=True).stdout
    name, message = json.loads(out)
    return name, message


def mutating_methods(cls: type) -> set[str]:
    """Names of the methods of a ServiceInterface class marked @mutating."""
    names = set()
    for member in vars(cls).values():
        method = getattr(member, "__dict__", {}).get("__DBUS_METHOD")
        if method is not None and getattr(method.fn, "__hostel_mutating__", False):
            names.add(method.name)
    return names


def test_the_table_covers_every_mutating_method() -> None:
    declared = set()
    for cls in (MachineManagerInterface, CryptsetupManagerInterface, GuestManagerInterface):
        declared |= mutating_methods(cls)
    assert declared == {call[2] for call in MUTATING_CALLS}


@pytest.mark.parametrize("call", MUTATING_CALLS, ids=lambda c: c[2])
def test_bus_policy_denies_unprivileged_callers(hosteld: DaemonProcess, call: tuple) -> None:
    name, _ = call_as(NOBODY, hosteld, call)
    assert name == "org.freedesktop.DBus.Error.AccessDenied"


@pytest.mark.parametrize("call", MUTATING_CALLS, ids=lambda c: c[2])
def test_hosteld_denies_unprivileged_callers_itself(hosteld_open: DaemonProcess,
                                                    call: tuple) -> None:
    name, message = call_as(NOBODY, hosteld_open, call)
    assert name == "org.freedesktop.DBus.Error.AccessDenied"
    assert f"{call[2]} changes state and needs root" in message and "uid 65534" in message
    root_name, _ = call_as(None, hosteld_open, call)
    assert root_name != "org.freedesktop.DBus.Error.AccessDenied"


@pytest.mark.parametrize("call", READ_CALLS, ids=lambda c: c[2])
def test_reads_are_open_to_everyone(hosteld: DaemonProcess, call: tuple) -> None:
    assert call_as(NOBODY, hosteld, call) == ("ok", "")
