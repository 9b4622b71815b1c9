"""Container trees built to hurt the host or hosteld, started by a real hosteld.

Each tree is the busybox tree with one trap: /etc or /etc/resolv.conf a
symlink to a directory standing in for the host's, /etc/passwd a FIFO,
/etc/group a huge sparse file or a character device, /proc/kmsg bound over
os-release. Throughout, hosteld answers ListMachines within a second; the
start either works or fails with a specific error (never Internal); and
nothing in the stand-in host directory changes (entries, modes, mtimes)."""
from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from hostel.privatebus import DaemonProcess

from conftest import NOBODY, unprivileged_python

MANAGER = ("/org/hostel1/machine", "org.hostel1.MachineManager")
INTERNAL = "org.hostel1.Error.Internal"
RESPONSIVE = 1.0  # seconds ListMachines may take while a hostile start is under way


def snapshot(path: Path) -> dict[str, tuple[int, int, int]]:
    out = {}
    for entry in [path, *path.rglob("*")]:
        st = entry.lstat()
        out[str(entry)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


async def call(bus: MessageBus, path: str, interface: str, member: str, signature: str = "",
               body: list[Any] | None = None) -> Message:
    return await bus.call(Message(destination="org.hostel1", path=path, interface=interface,
                                  member=member, signature=signature, body=body or []))


async def responsive_while(bus: MessageBus, work: "asyncio.Future[Message]") -> Message:
    """Wait for `work`, asking ListMachines all along; each answer must come within RESPONSIVE."""
    slowest = 0.0
    deadline = time.monotonic() + 60
    while not work.done():
        started = time.monotonic()
        reply = await asyncio.wait_for(call(bus, *MANAGER, "ListMachines"), 10)
        assert reply.message_type == MessageType.METHOD_RETURN
        slowest = max(slowest, time.monotonic() - started)
        assert time.monotonic() < deadline, "the start did not finish within 60 s"
        await asyncio.sleep(0.05)
    assert slowest < RESPONSIVE, f"ListMachines took {slowest:.2f} s"
    return await work


async def start(bus: MessageBus, name: str, tree: Path, **extra: Variant) -> Message:
    settings = {"Directory": Variant("s", str(tree)),
                "Command": Variant("as", ["/bin/sleep", "300"]), **extra}
    work = asyncio.ensure_future(call(bus, *MANAGER, "StartMachine", "sa{sv}", [name, settings]))
    return await responsive_while(bus, work)


def specific(reply: Message) -> bool:
    """A start that worked, or failed with a named error other than Internal."""
    return reply.message_type == MessageType.METHOD_RETURN or (
        reply.error_name is not None and reply.error_name != INTERNAL)


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """Stands in for a host directory the tree's links point at."""
    directory = tmp_path / "host-etc"
    directory.mkdir()
    (directory / "resolv.conf").write_text("# the host's own\n")
    (directory / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    return directory


def hostile_tree(tree: Path, host: Path, trap: str) -> dict[str, Variant]:
    """Set the trap in `tree`; return the settings that make a start walk into it."""
    etc = tree / "etc"
    if trap == "etc-symlink":
        (tree / "usr/lib").mkdir(parents=True, exist_ok=True)
        shutil.copy(etc / "os-release", tree / "usr/lib/os-release")
        shutil.rmtree(etc)
        etc.symlink_to(host)
        bind_source = tree.parent / "bind-source"
        bind_source.mkdir()
        return {"Bind": Variant("as", [f"{bind_source}:/etc/hostel-bind"])}
    if trap == "resolv-symlink":
        (etc / "resolv.conf").unlink(missing_ok=True)
        (etc / "resolv.conf").symlink_to(host / "resolv.conf")
        return {}
    if trap == "fifo-passwd":
        (etc / "passwd").unlink()
        os.mkfifo(etc / "passwd")
    elif trap == "sparse-group":
        with open(etc / "group", "r+b") as f:
            f.truncate(64 << 30)
    elif trap == "chardev-group":
        (etc / "group").unlink()
        os.mknod(etc / "group", 0o20644, os.makedev(1, 5))  # like /dev/zero
    return {"User": Variant("s", "nobody")}


async def run_trap(daemon: DaemonProcess, tree: Path, host: Path, trap: str) -> None:
    settings = hostile_tree(tree, host, trap)
    before = snapshot(host)
    bus = await MessageBus(bus_address=daemon.address).connect()
    try:
        reply = await start(bus, trap, tree, **settings)
        assert specific(reply), reply.body
        if trap in ("fifo-passwd", "sparse-group", "chardev-group"):
            assert reply.message_type == MessageType.ERROR
            assert "regular file" in reply.body[0] or "larger than" in reply.body[0], reply.body
    finally:
        bus.disconnect()
    assert snapshot(host) == before


@pytest.mark.parametrize("trap", ["etc-symlink", "resolv-symlink", "fifo-passwd",
                                  "sparse-group", "chardev-group"])
def test_hostile_tree_start(hosteld_open: DaemonProcess, tree: Path, host: Path,
                            trap: str) -> None:
    asyncio.run(run_trap(hosteld_open, tree, host, trap))
    rss_kib = int(next(line.split()[1] for line in
                       open(f"/proc/{hosteld_open.proc.pid}/status")
                       if line.startswith("VmRSS:")))
    assert rss_kib < 300 * 1024, f"hosteld grew to {rss_kib} KiB"


OS_RELEASE_AS_NOBODY = """
import sys
from hostel.client import CallFailed, Client
with Client() as client:
    try:
        client.call(sys.argv[1], "org.hostel1.Machine", "GetOSRelease", "")
        print("ok")
    except CallFailed as e:
        print(e.name)
"""


async def kmsg_over_os_release(daemon: DaemonProcess, tree: Path) -> str:
    bus = await MessageBus(bus_address=daemon.address).connect()
    try:
        reply = await start(bus, "kmsg", tree,
                            BindReadOnly=Variant("as", ["/proc/kmsg:/etc/os-release"]))
        assert reply.message_type == MessageType.METHOD_RETURN, reply.body
        (path,) = reply.body
        reader = asyncio.create_subprocess_exec(
            "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
            unprivileged_python(), "-c", OS_RELEASE_AS_NOBODY, path,
            env=daemon.environment(), stdout=subprocess.PIPE)
        process = await reader
        work = asyncio.ensure_future(process.communicate())
        while not work.done():  # the daemon keeps answering while nobody reads os-release
            started = time.monotonic()
            await asyncio.wait_for(call(bus, *MANAGER, "ListMachines"), 10)
            assert time.monotonic() - started < RESPONSIVE
            await asyncio.sleep(0.05)
        out, _ = await asyncio.wait_for(work, 30)
        return out.decode().strip()
    finally:
        bus.disconnect()


def test_kmsg_bound_over_os_release_does_not_freeze_hosteld(hosteld_open: DaemonProcess,
                                                            tree: Path) -> None:
    answer = asyncio.run(kmsg_over_os_release(hosteld_open, tree))
    assert answer not in ("ok", INTERNAL), answer
    assert answer.startswith("org.hostel1.Error."), answer
