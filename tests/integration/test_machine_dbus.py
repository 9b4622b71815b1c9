"""org.hostel1.MachineManager and Machine objects, through a dbus-fast client."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import uuid
from pathlib import Path

import pytest
from dbus_fast import BusType, DBusError, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from hostel.privatebus import DaemonProcess

from conftest import NOBODY, unprivileged_python

MANAGER = ("/org/hostel1/machine", "org.hostel1.MachineManager")


async def connect(address: str) -> MessageBus:
    return await MessageBus(bus_address=address, bus_type=BusType.SYSTEM,
                            negotiate_unix_fd=True).connect()


async def call(bus: MessageBus, path: str, interface: str, member: str, signature: str = "",
               body: list | None = None, fds: list[int] | None = None) -> list:
    reply = await bus.call(Message(destination="org.hostel1", path=path, interface=interface,
                                   member=member, signature=signature, body=body or [],
                                   unix_fds=fds or []))
    if reply.message_type == MessageType.ERROR:
        raise DBusError(reply.error_name, reply.body[0] if reply.body else "")
    return reply.body


async def prop(bus: MessageBus, path: str, name: str):
    (variant,) = await call(bus, path, "org.freedesktop.DBus.Properties", "Get", "ss",
                            ["org.hostel1.Machine", name])
    return variant.value


async def start(bus: MessageBus, name: str, tree: Path, command: list[str],
                extra: dict[str, Variant] | None = None, fds: list[int] | None = None) -> str:
    settings = {"Directory": Variant("s", str(tree)), "Command": Variant("as", command),
                **(extra or {})}
    (path,) = await call(bus, *MANAGER, "StartMachine", "sa{sv}", [name, settings], fds)
    return path


async def wait_gone(bus: MessageBus, name: str, timeout: float = 30) -> None:
    for _ in range(int(timeout * 10)):
        (machines,) = await call(bus, *MANAGER, "ListMachines")
        if name not in [m[0] for m in machines]:
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"machine {name} still listed")


async def test_lifecycle_signals_and_properties(hosteld: DaemonProcess, tree: Path) -> None:
    bus = await connect(hosteld.address)
    seen: list[tuple[str, object]] = []

    def on_message(msg: Message) -> None:
        if msg.message_type != MessageType.SIGNAL:
            return
        if msg.member in ("MachineNew", "MachineRemoved"):
            seen.append((msg.member, msg.body[0]))
        elif msg.member == "PropertiesChanged" and msg.path == "/org/hostel1/machine/life":
            changed = {k: v.value for k, v in msg.body[1].items()}
            seen.append(("changed", changed))

    bus.add_message_handler(on_message)
    await bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                           interface="org.freedesktop.DBus", member="AddMatch", signature="s",
                           body=["type='signal',sender='org.hostel1'"]))
    try:
        path = await start(bus, "life", tree, ["/bin/sleep", "30"],
                           {"AsPid2": Variant("b", True)})
        assert path == "/org/hostel1/machine/life"
        assert await prop(bus, path, "State") == "running"
        leader = await prop(bus, path, "Leader")
        assert os.path.exists(f"/proc/{leader}")
        assert len(await prop(bus, path, "Id")) == 16
        assert await prop(bus, path, "Unit") == "machine-life.scope"
        settings = await prop(bus, path, "Settings")
        assert settings["Command"].value == ["/bin/sleep", "30"]
        (machines,) = await call(bus, *MANAGER, "ListMachines")
        assert ("life", "container", "running", path) in [tuple(m) for m in machines]
        assert (await call(bus, *MANAGER, "GetMachine", "s", ["life"]))[0] == path
        release = (await call(bus, path, "org.hostel1.Machine", "GetOSRelease"))[0]
        assert release["ID"] == "hostel-busybox"
        await call(bus, *MANAGER, "TerminateMachine", "s", ["life"])
        await wait_gone(bus, "life")
        await asyncio.sleep(0.2)
    finally:
        bus.disconnect()
    assert ("MachineNew", "life") in seen and ("MachineRemoved", "life") in seen
    states = [c.get("State") for kind, c in seen if kind == "changed" and "State" in c]
    assert states[-3:] == ["running", "closing", "exited"] or states[-2:] == ["closing", "exited"]
    final = [c for kind, c in seen if kind == "changed" and c.get("State") == "exited"][0]
    # the stub init passed SIGTERM on; a payload killed by a signal makes it exit 255,
    # as systemd-nspawn 252's stub init does
    assert final["ExitStatus"] == 255


async def test_get_machine_by_any_pid_inside(hosteld: DaemonProcess, tree: Path) -> None:
    bus = await connect(hosteld.address)
    try:
        path = await start(bus, "bypid", tree, ["/bin/sh", "-c", "sleep 30 & sleep 31"])
        leader = await prop(bus, path, "Leader")
        children = []
        for _ in range(50):
            children = open(f"/proc/{leader}/task/{leader}/children").read().split()
            if len(children) == 2:
                break
            await asyncio.sleep(0.1)
        for pid in [leader, *map(int, children)]:
            assert (await call(bus, *MANAGER, "GetMachineByPID", "u", [pid]))[0] == path
        with pytest.raises(DBusError, match=f"process {os.getpid()} belongs to no machine"):
            await call(bus, *MANAGER, "GetMachineByPID", "u", [os.getpid()])
        await call(bus, *MANAGER, "KillMachine", "ssi", ["bypid", "all", signal.SIGKILL])
        await wait_gone(bus, "bypid")
    finally:
        bus.disconnect()


async def test_kill_leader_only(hosteld: DaemonProcess, tree: Path) -> None:
    bus = await connect(hosteld.address)
    try:
        path = await start(bus, "killme", tree, ["/bin/sh", "-c", "trap 'exit 42' USR1; "
                                                 "while true; do sleep 0.1; done"],
                           {"AsPid2": Variant("b", True)})
        await asyncio.sleep(0.5)
        with pytest.raises(DBusError, match="invalid kill target 'everyone'"):
            await call(bus, *MANAGER, "KillMachine", "ssi", ["killme", "everyone", 15])
        with pytest.raises(DBusError, match="invalid signal number 0"):
            await call(bus, *MANAGER, "KillMachine", "ssi", ["killme", "all", 0])
        assert await prop(bus, path, "State") == "running"
        await call(bus, *MANAGER, "KillMachine", "ssi", ["killme", "leader", signal.SIGUSR1])
        await wait_gone(bus, "killme")
    finally:
        bus.disconnect()


async def test_console_log_without_descriptors(hosteld: DaemonProcess, tree: Path) -> None:
    bus = await connect(hosteld.address)
    try:
        path = await start(bus, "logged", tree, ["/bin/sh", "-c", "echo to-the-log; sleep 30"])
        log = ""
        for _ in range(50):
            log = await prop(bus, path, "ConsoleLog")
            if "to-the-log" in log:
                break
            await asyncio.sleep(0.1)
        assert "to-the-log" in log
        await call(bus, *MANAGER, "KillMachine", "ssi", ["logged", "all", signal.SIGKILL])
        await wait_gone(bus, "logged")
    finally:
        bus.disconnect()


async def test_stdout_descriptor_receives_output(hosteld: DaemonProcess, tree: Path) -> None:
    bus = await connect(hosteld.address)
    read_end, write_end = os.pipe()
    try:
        await start(bus, "piped", tree, ["/bin/echo", "through the fd"],
                    {"StandardOutput": Variant("h", 0)}, fds=[write_end])
        os.close(write_end)
        write_end = -1
        assert os.read(read_end, 100) == b"through the fd\n"
        await wait_gone(bus, "piped")
    finally:
        bus.disconnect()
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


@pytest.mark.parametrize("settings,message", [
    ({"Bogus": Variant("s", "x")}, "unknown setting 'Bogus'"),
    ({"Boot": Variant("s", "yes")}, "setting 'Boot' must be of type 'b', got 's'"),
    ({"Command": Variant("s", "/bin/true")}, "setting 'Command' must be of type 'as'"),
    ({"Machine": Variant("s", "x")}, "unknown setting 'Machine'"),
])
async def test_bad_settings_name_the_key(hosteld: DaemonProcess, tree: Path,
                                         settings: dict, message: str) -> None:
    bus = await connect(hosteld.address)
    try:
        with pytest.raises(DBusError, match=message) as error:
            await call(bus, *MANAGER, "StartMachine", "sa{sv}",
                       ["bad", {"Directory": Variant("s", str(tree)), **settings}])
        assert error.value.type == "org.freedesktop.DBus.Error.InvalidArgs"
        assert (await call(bus, *MANAGER, "ListMachines"))[0] == []
    finally:
        bus.disconnect()


async def test_register_machine_started_elsewhere(hosteld: DaemonProcess) -> None:
    bus = await connect(hosteld.address)
    outsider = subprocess.Popen(["sleep", "30"])
    try:
        machine_id = uuid.uuid4().bytes
        (path,) = await call(bus, *MANAGER, "RegisterMachine", "sayssus",
                             ["outsider", machine_id, "test-suite", "container", outsider.pid, "/"])
        assert await prop(bus, path, "Leader") == outsider.pid
        assert await prop(bus, path, "Id") == machine_id
        assert await prop(bus, path, "Service") == "test-suite"
        assert (await call(bus, *MANAGER, "GetMachineByPID", "u", [outsider.pid]))[0] == path
        with pytest.raises(DBusError, match="leader pid 1 is not"):
            await call(bus, *MANAGER, "RegisterMachine", "sayssus",
                       ["pid1", b"", "x", "container", 1, "/"])
        with pytest.raises(DBusError, match="invalid machine class"):
            await call(bus, *MANAGER, "RegisterMachine", "sayssus",
                       ["cls", b"", "x", "toaster", outsider.pid, "/"])
        await call(bus, *MANAGER, "TerminateMachine", "s", ["outsider"])
        assert outsider.wait(timeout=10) == -signal.SIGTERM
        await wait_gone(bus, "outsider")
    finally:
        outsider.kill()
        outsider.wait()
        bus.disconnect()


CALLER = """
import json, sys
from hostel.client import CallFailed, Client
path, member, signature, args = json.loads(sys.argv[1])
with Client() as client:
    try:
        client.call(path, "org.hostel1.Machine", member, signature, *args)
        print(json.dumps("ok"))
    except CallFailed as e:
        print(json.dumps(e.name))
"""


def call_as_nobody(daemon: DaemonProcess, path: str, member: str, signature: str,
                   args: list) -> str:
    out = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                          unprivileged_python(), "-c", CALLER, json.dumps([path, member, signature, args])],
                         env=daemon.environment(), capture_output=True, text=True, check=True,
                         timeout=30).stdout
    return json.loads(out)


async def test_machine_object_mutations_are_root_only(hosteld_open: DaemonProcess,
                                                      tree: Path) -> None:
    bus = await connect(hosteld_open.address)
    try:
        path = await start(bus, "guarded", tree, ["/bin/sleep", "30"])
        assert await asyncio.to_thread(call_as_nobody, hosteld_open, path, "Terminate", "", []) \
            == "org.freedesktop.DBus.Error.AccessDenied"
        assert await asyncio.to_thread(call_as_nobody, hosteld_open, path, "Kill", "si",
                                       ["all", 9]) == "org.freedesktop.DBus.Error.AccessDenied"
        assert await asyncio.to_thread(call_as_nobody, hosteld_open, path, "GetOSRelease", "",
                                       []) == "ok"
        assert await prop(bus, path, "State") == "running"
        await call(bus, path, "org.hostel1.Machine", "Kill", "si", ["all", signal.SIGKILL])
        await wait_gone(bus, "guarded")
    finally:
        bus.disconnect()
