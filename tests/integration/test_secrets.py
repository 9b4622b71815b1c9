"""No secret of a machine or volume reaches a local user who is not root.

Plants a secret in each place one can be given to hosteld: a machine's
environment, its console output, a volume's key file path and a crypttab
option. Then reads every property of every object on both bus names
(org.hostel1 and org.freedesktop.machine1) as uid 65534 with the real
busctl, through Properties.Get, Properties.GetAll (per interface and "")
and ObjectManager.GetManagedObjects, and finds none of them; root, asking
the same, sees them all. Signals go to every listener, so those a start and
a reload emit are checked too."""
from __future__ import annotations

import asyncio
import signal
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from hostel.privatebus import DaemonProcess, PrivateBus, start_daemon

from conftest import NOBODY, busctl, terminate_all_machines

ENV_SECRET = "hostel-env-secret-4f2a"
CONSOLE_SECRET = "hostel-console-secret-91b7"
KEY_SECRET = "hostel-keyfile-secret-33c1"
OPTION_SECRET = "hostel-option-secret-77d0"
# The command prints it without containing it: the command line is no secret.
ESCAPED = "".join(f"\\{ord(c):03o}" for c in CONSOLE_SECRET)
SECRETS = (ENV_SECRET, CONSOLE_SECRET, KEY_SECRET, OPTION_SECRET)
BUS_NAMES = ("org.hostel1", "org.freedesktop.machine1")


@pytest.fixture
def daemon(open_bus: PrivateBus, tmp_path: Path) -> Iterator[DaemonProcess]:
    volumes = tmp_path / "volumes"
    volumes.mkdir()
    (volumes / "disk.img").write_bytes(bytes(1 << 20))
    key = volumes / f"{KEY_SECRET}.key"
    key.write_bytes(b"k" * 32)
    crypttab = volumes / "crypttab"
    crypttab.write_text(f"vault {volumes / 'disk.img'} {key} luks,x-{OPTION_SECRET}\n")
    env = {"SYSTEMD_CRYPTTAB": str(crypttab), "SYSTEMD_PROC_CMDLINE": "",
           "SYSTEMD_EFI_OPTIONS": "", "SYSTEMD_IN_INITRD": "0"}
    hosteld = start_daemon(open_bus, tmp_path, extra_env=env)
    try:
        yield hosteld
    finally:
        terminate_all_machines(hosteld)
        hosteld.stop()


def objects(bus: PrivateBus, name: str) -> list[str]:
    return busctl(bus, "tree", "--list", name).stdout.split()


def interfaces_and_properties(bus: PrivateBus, name: str, path: str) -> dict[str, list[str]]:
    """From busctl introspect's table: interface rows, then their ".Member type ..." rows."""
    found: dict[str, list[str]] = {}
    interface = ""
    for line in busctl(bus, "introspect", "--no-legend", name, path).stdout.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[1] == "interface":
            interface = fields[0]
        elif len(fields) >= 2 and fields[1] == "property":
            found.setdefault(interface, []).append(fields[0].lstrip("."))
    return found


def everything_readable(bus: PrivateBus, uid: int | None) -> str:
    """All property values hosteld shows `uid` (None: root), by every way of asking."""
    out = []
    for name in BUS_NAMES:
        out.append(busctl(bus, "--json=short", "call", name, "/",
                          "org.freedesktop.DBus.ObjectManager", "GetManagedObjects",
                          uid=uid).stdout)
        for path in objects(bus, name):
            out.append(busctl(bus, "--json=short", "call", name, path,
                              "org.freedesktop.DBus.Properties", "GetAll", "s", "",
                              uid=uid, check=False).stdout)
            for interface, props in interfaces_and_properties(bus, name, path).items():
                out.append(busctl(bus, "--json=short", "call", name, path,
                                  "org.freedesktop.DBus.Properties", "GetAll", "s", interface,
                                  uid=uid).stdout)
                for prop in props:
                    out.append(busctl(bus, "--json=short", "get-property", name, path,
                                      interface, prop, uid=uid).stdout)
    return "\n".join(out)


async def start_machine(address: str, tree: Path, signals: list[Message]) -> None:
    bus = await MessageBus(bus_address=address).connect()
    try:
        bus.add_message_handler(lambda m: signals.append(m) if m.message_type ==
                                MessageType.SIGNAL else None)
        await bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                               interface="org.freedesktop.DBus", member="AddMatch",
                               signature="s", body=["type='signal'"]))
        settings = {"Directory": Variant("s", str(tree)),
                    "Environment": Variant("as", [f"PASSWORD={ENV_SECRET}"]),
                    "Command": Variant("as", ["/bin/sh", "-c",
                                              f"printf '{ESCAPED}\\n'; exec sleep 60"])}
        reply = await bus.call(Message(destination="org.hostel1", path="/org/hostel1/machine",
                                       interface="org.hostel1.MachineManager",
                                       member="StartMachine", signature="sa{sv}",
                                       body=["secretive", settings]))
        assert reply.message_type == MessageType.METHOD_RETURN, reply.body
        await bus.call(Message(destination="org.hostel1", path="/org/hostel1/cryptsetup",
                               interface="org.hostel1.CryptsetupManager", member="Reload"))
        await asyncio.sleep(0.5)  # let the signals arrive
    finally:
        bus.disconnect()


def console_has_run(bus: PrivateBus) -> bool:
    out = busctl(bus, "get-property", "org.hostel1", "/org/hostel1/machine/secretive",
                 "org.hostel1.Machine", "ConsoleLog").stdout
    return CONSOLE_SECRET in out


def test_no_secret_reaches_uid_65534(daemon: DaemonProcess, open_bus: PrivateBus,
                                     tree: Path) -> None:
    signals: list[Message] = []
    asyncio.run(start_machine(daemon.address, tree, signals))
    for _ in range(50):
        if console_has_run(open_bus):
            break
        subprocess.run(["sleep", "0.1"], check=True)
    as_root = everything_readable(open_bus, None)
    assert [s for s in SECRETS if s not in as_root] == []  # they are there to be found
    as_nobody = everything_readable(open_bus, NOBODY)
    assert "secretive" in as_nobody and "vault" in as_nobody  # the objects were read
    assert [s for s in SECRETS if s in as_nobody] == []
    broadcast = "\n".join(repr(m.body) for m in signals)
    assert "InterfacesAdded" in {m.member for m in signals}
    assert [s for s in SECRETS if s in broadcast] == []
    busctl(open_bus, "call", "org.hostel1", "/org/hostel1/machine", "org.hostel1.MachineManager",
           "KillMachine", "ssi", "secretive", "all", str(int(signal.SIGKILL)))
