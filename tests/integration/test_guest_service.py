"""StartGuest / ListGuests / TerminateGuest and hostelctl guest launch, end to end:
a real bus, the real GuestService, launcher processes running freestanding
guests through real KVM exits."""
from __future__ import annotations

import argparse
import asyncio
import os
import re
from pathlib import Path
from typing import AsyncIterator

import pytest
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from guests.build import build
from hostel.bus import Dispatcher, connect_system_bus, request_name
from hostel.guest import commands
from hostel.guest.images_service import ImageService
from hostel.guest.service import MANAGER_PATH, GuestService
from hostel.privatebus import PrivateBus

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="no /dev/kvm on this host")

MANAGER = "org.hostel1.GuestManager"


async def connect_when_listening(timeout: float = 10) -> MessageBus:
    """dbus-daemon creates its socket file before it listens on it (PrivateBus
    waits only for the file): retry a refused connection for a moment."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                return await connect_system_bus()
            except ConnectionRefusedError:
                await asyncio.sleep(0.01)


@pytest.fixture
async def service(private_bus: PrivateBus, tmp_path: Path,
                  monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[GuestService]:
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", private_bus.address)
    bus = await connect_when_listening()
    svc = GuestService(Dispatcher(bus), tmp_path / "run",
                       ImageService(tmp_path / "images", tmp_path / "run"))
    try:
        assert await request_name(bus, "org.hostel1")
        yield svc
    finally:
        await svc.stop_all()
        bus.disconnect()


@pytest.fixture
async def client(service: GuestService) -> AsyncIterator[MessageBus]:
    bus = await connect_system_bus()
    try:
        yield bus
    finally:
        bus.disconnect()


async def call(bus: MessageBus, member: str, signature: str = "", body: list | None = None,
               path: str = MANAGER_PATH, interface: str = MANAGER,
               fds: list[int] | None = None) -> Message:
    return await bus.call(Message(destination="org.hostel1", path=path, interface=interface,
                                  member=member, signature=signature, body=body or [],
                                  unix_fds=fds or []))


async def get(bus: MessageBus, path: str, prop: str) -> object:
    reply = await call(bus, "Get", "ss", ["org.hostel1.Guest", prop], path,
                       "org.freedesktop.DBus.Properties")
    assert reply.message_type == MessageType.METHOD_RETURN, reply.body
    return reply.body[0].value


async def wait_exited(bus: MessageBus, path: str, timeout: float = 20) -> None:
    async with asyncio.timeout(timeout):
        while await get(bus, path, "State") != "exited":
            await asyncio.sleep(0.02)


@pytest.fixture(scope="module")
def hello(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build("hello", tmp_path_factory.mktemp("guests"))


async def test_start_guest_runs_it_and_reports_its_exit(client: MessageBus, hello: Path,
                                                         service: GuestService) -> None:
    reply = await call(client, "StartGuest", "sa{sv}", ["hello", {
        "Kernel": Variant("s", str(hello)), "MemoryMB": Variant("u", 8)}])
    assert reply.message_type == MessageType.METHOD_RETURN, reply.body
    path = reply.body[0]
    await wait_exited(client, path)
    assert await get(client, path, "ExitReason") == "poweroff"
    assert await get(client, path, "ExitStatus") == 0
    log = Path(await get(client, path, "ConsoleLog"))
    assert log.read_text().startswith("hello from the guest\n")
    listed = (await call(client, "ListGuests")).body[0]
    assert [list(row) for row in listed] == [["hello", "vm", "exited", path]]
    assert (await call(client, "TerminateGuest", "s", ["hello"])).message_type == MessageType.METHOD_RETURN
    assert (await call(client, "ListGuests")).body[0] == []


async def test_console_and_console_input_are_passed_descriptors(client: MessageBus,
                                                                tmp_path: Path) -> None:
    program = build("devices", tmp_path)
    console = tmp_path / "console"
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, b"sent over D-Bus\n")
        with open(console, "wb") as out:
            reply = await call(client, "StartGuest", "sa{sv}", ["echo", {
                "Kernel": Variant("s", str(program)), "MemoryMB": Variant("u", 8),
                "CommandLine": Variant("s", "echo"), "Console": Variant("h", 0),
                "ConsoleInput": Variant("h", 1)}], fds=[out.fileno(), read_end])
    finally:
        os.close(read_end)
        os.close(write_end)
    path = reply.body[0]
    await wait_exited(client, path)
    assert await get(client, path, "ExitStatus") == 0
    assert await get(client, path, "ConsoleLog") == ""
    assert console.read_bytes() == b"echo sent over D-Bus\n"


async def test_verbose_describes_the_guest_in_its_console_log(client: MessageBus, hello: Path,
                                                              tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.write_bytes(bytes(4096))
    reply = await call(client, "StartGuest", "sa{sv}", ["loud", {
        "Kernel": Variant("s", str(hello)), "MemoryMB": Variant("u", 8),
        "Verbose": Variant("b", True), "Rng": Variant("b", True),
        "Block": Variant("a(sb)", [[str(disk), True]])}])
    path = reply.body[0]
    await wait_exited(client, path)
    log = Path(await get(client, path, "ConsoleLog")).read_text()
    assert "guest: 8 MiB, elf kernel entry 0x100000, backend kvm" in log
    assert "device console: virtio_mmio.device=4K@0xd0000000:5" in log
    assert f"device block:{disk}: virtio_mmio.device=4K@0xd0001000:6" in log
    assert "device rng: virtio_mmio.device=4K@0xd0002000:7" in log
    assert "guest exit: the guest powered off with code 0" in log
    assert await get(client, path, "Devices") == ["serial:0x3f8", "console", f"block:{disk}:ro", "rng"]


@pytest.mark.parametrize("settings, message", [
    ({"MemoryMB": Variant("u", 8)}, "Kernel is required"),
    ({"Kernel": Variant("s", "/k"), "MemoryMB": Variant("s", "8")}, "must be of type 'u'"),
    ({"Kernel": Variant("s", "/k"), "MemoryMB": Variant("u", 8), "Bogus": Variant("b", True)},
     "unknown guest setting 'Bogus'"),
    ({"Kernel": Variant("s", "rel"), "MemoryMB": Variant("u", 8)}, "must be absolute"),
    ({"Kernel": Variant("s", "/k"), "MemoryMB": Variant("u", 1 << 30)}, "out of range"),
    ({"Kernel": Variant("s", "/k"), "MemoryMB": Variant("u", 8), "Backend": Variant("s", "xen")},
     "unknown backend 'xen'"),
    ({"Kernel": Variant("s", "/k"), "MemoryMB": Variant("u", 8), "Network": Variant("as", ["1.2.3"])},
     "not an IPv4 address"),
])
async def test_bad_settings_are_invalid_args(client: MessageBus, settings: dict, message: str) -> None:
    reply = await call(client, "StartGuest", "sa{sv}", ["bad", settings])
    assert reply.message_type == MessageType.ERROR
    assert reply.error_name == "org.freedesktop.DBus.Error.InvalidArgs"
    assert message in reply.body[0]


async def test_bad_kernel_ends_the_guest_with_the_loaders_reason(client: MessageBus,
                                                                  tmp_path: Path) -> None:
    kernel = tmp_path / "not-a-kernel"
    kernel.write_bytes(b"\x7fELF" + bytes(10))
    reply = await call(client, "StartGuest", "sa{sv}", ["bad", {
        "Kernel": Variant("s", str(kernel)), "MemoryMB": Variant("u", 8)}])
    path = reply.body[0]
    await wait_exited(client, path)
    assert await get(client, path, "ExitReason") == "error"
    assert "truncated ELF header" in await get(client, path, "ExitDetail")


async def test_terminate_kills_a_running_guest(client: MessageBus, tmp_path: Path) -> None:
    spin = build("spin", tmp_path)
    reply = await call(client, "StartGuest", "sa{sv}", ["spin", {
        "Kernel": Variant("s", str(spin)), "MemoryMB": Variant("u", 8)}])
    path = reply.body[0]
    assert await get(client, path, "State") == "running"
    started = await call(client, "StartGuest", "sa{sv}", ["spin", {
        "Kernel": Variant("s", str(spin)), "MemoryMB": Variant("u", 8)}])
    assert started.error_name == "org.hostel1.Error.AlreadyExists"
    await call(client, "TerminateGuest", "s", ["spin"])
    assert await get(client, path, "State") == "exited"
    assert await get(client, path, "ExitReason") == "killed"


def hostelctl_guest(argv: list[str]) -> int:
    """What hostelctl's 'guest' sub-parser does with these verbs (cli.py wires the same
    add_commands), run with the blocking client hostelctl uses."""
    from hostel.client import Client

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()

    def verb(sub, name, text, handler):
        p = sub.add_parser(name, help=text)
        p.set_defaults(handler=handler)
        return p

    commands.add_commands(sub, verb)
    args = parser.parse_args(argv)
    with Client() as client:
        return args.handler(args, client)


async def test_hostelctl_guest_list_and_terminate(service: GuestService, tmp_path: Path,
                                                  capfd: pytest.CaptureFixture[str]) -> None:
    spin = build("spin", tmp_path)
    await service.start("spinner", {"Kernel": Variant("s", str(spin)), "MemoryMB": Variant("u", 8)})
    assert await asyncio.to_thread(hostelctl_guest, ["list"]) == 0
    assert re.search(r"^spinner\s+vm\s+running$", capfd.readouterr().out, re.M)
    assert await asyncio.to_thread(hostelctl_guest, ["terminate", "spinner"]) == 0
    assert service.manager.guests["spinner"].exit_reason == "killed"
    assert await asyncio.to_thread(hostelctl_guest, ["terminate", "spinner"]) == 0  # forgets it
    assert service.manager.guests == {}


async def test_hostelctl_guest_launch_streams_the_console(service: GuestService, hello: Path,
                                                          tmp_path: Path) -> None:
    argv = ["launch", "--name", "cli", "8", str(hello), "console=ttyS0"]
    out = tmp_path / "console"

    def launch() -> int:
        saved = os.dup(1)
        with open(out, "wb") as f:
            os.dup2(f.fileno(), 1)
        try:
            return hostelctl_guest(argv)
        finally:
            os.dup2(saved, 1)
            os.close(saved)

    assert await asyncio.to_thread(launch) == 0
    assert out.read_bytes() == b"hello from the guest\n"
    assert service.manager.guests == {}


def process_uids(pid: int) -> list[int]:
    """Real, effective, saved and filesystem uid of a process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return [int(uid) for uid in line.split()[1:]]
    raise AssertionError(f"no Uid line for pid {pid}")


async def test_chroot_and_username_drop_the_launchers_privileges(client: MessageBus,
                                                                 tmp_path: Path) -> None:
    spin = build("spin", tmp_path)
    jail = tmp_path / "jail"
    jail.mkdir()
    (jail / "marker").touch()
    reply = await call(client, "StartGuest", "sa{sv}", ["jailed", {
        "Kernel": Variant("s", str(spin)), "MemoryMB": Variant("u", 8),
        "Chroot": Variant("s", str(jail)), "User": Variant("s", "nobody")}])
    assert reply.message_type == MessageType.METHOD_RETURN, reply.body
    path = reply.body[0]
    pid = await get(client, path, "Leader")
    try:
        async with asyncio.timeout(20):  # the launcher drops privileges once the guest is set up
            while process_uids(pid) != [65534] * 4:
                await asyncio.sleep(0.02)
        assert os.listdir(f"/proc/{pid}/root") == ["marker"], "the chroot is the jail's root"
        assert await get(client, path, "State") == "running", "the guest runs on unprivileged"
    finally:
        reply = await call(client, "Terminate", path=path, interface="org.hostel1.Guest")
        assert reply.message_type == MessageType.METHOD_RETURN, reply.body
    assert await get(client, path, "ExitReason") == "killed"


async def test_an_unknown_user_ends_the_guest_with_a_reason(client: MessageBus, hello: Path) -> None:
    reply = await call(client, "StartGuest", "sa{sv}", ["nouser", {
        "Kernel": Variant("s", str(hello)), "MemoryMB": Variant("u", 8),
        "User": Variant("s", "no-such-user-here")}])
    path = reply.body[0]
    await wait_exited(client, path)
    assert await get(client, path, "ExitReason") == "error"
    assert "no user named 'no-such-user-here'" in await get(client, path, "ExitDetail")
