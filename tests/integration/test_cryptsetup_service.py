"""org.hostel1.CryptsetupManager over a real bus: a real hosteld reading a real crypttab
that points at real LUKS1/LUKS2 images, checked with busctl and with dbus-fast."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from hostel.cryptsetup import luks
from hostel.privatebus import DaemonProcess, PrivateBus, start_daemon

from conftest import NOBODY, busctl

MANAGER = "/org/hostel1/cryptsetup"
MANAGER_IFACE = "org.hostel1.CryptsetupManager"
VOLUME_IFACE = "org.hostel1.Volume"
PASSPHRASE = "correct horse battery staple"
KEY_BYTES = b"\x00\x01 a key file, not a line \xff"
UUID2 = "0a6e5a4c-0b4b-4d8e-9a43-1f2a3b4c5d6e"
ABSENT_UUID = "ffffffff-0000-4000-8000-00000000dead"
IMAGE_BYTES = 20 << 20


@dataclass
class Volumes:
    """Images, a key file and a crypttab naming them."""

    dir: Path
    crypttab: Path
    luks1: Path
    luks2: Path
    plain: Path
    key_file: Path

    def env(self) -> dict[str, str]:
        return {"SYSTEMD_CRYPTTAB": str(self.crypttab), "SYSTEMD_PROC_CMDLINE": "",
                "SYSTEMD_EFI_OPTIONS": "", "SYSTEMD_IN_INITRD": "0"}


def make_image(path: Path, version: int, passphrases: list[bytes], **kwargs: Any) -> Path:
    with open(path, "wb") as f:
        f.truncate(IMAGE_BYTES)
    luks.format_volume(str(path), version, passphrases, pbkdf2_iterations=1000, **kwargs)
    return path


def crypttab_text(v: Volumes) -> str:
    return (f"# volumes for hostel's tests\n"
            f"one {v.luks1} none luks\n"
            f"two {v.luks2} {v.key_file} luks,discard\n"
            f"plain {v.plain} none\n"
            f"gone UUID={ABSENT_UUID} none luks\n"
            f"onefield\n"
            f"a/b {v.luks2} none\n")


@pytest.fixture
def images(tmp_path: Path) -> Volumes:
    d = tmp_path / "volumes"
    d.mkdir()
    plain = d / "plain.img"
    plain.write_bytes(bytes(1 << 20))
    key_file = d / "two.key"
    key_file.write_bytes(KEY_BYTES)
    v = Volumes(d, d / "crypttab", make_image(d / "luks1.img", 1, [PASSPHRASE.encode()]),
                make_image(d / "luks2.img", 2, [PASSPHRASE.encode(), KEY_BYTES],
                           label="hostel-test", uuid=UUID2),
                plain, key_file)
    v.crypttab.write_text(crypttab_text(v))
    return v


@pytest.fixture
def cryptd(private_bus: PrivateBus, tmp_path: Path, images: Volumes) -> Iterator[DaemonProcess]:
    daemon = start_daemon(private_bus, tmp_path, extra_env=images.env())
    try:
        yield daemon
    finally:
        status = daemon.stop()
        assert status == 0, f"hosteld exited with {status}:\n{daemon.log()}"


@pytest.fixture
async def client(private_bus: PrivateBus, cryptd: DaemonProcess) -> MessageBus:
    bus = await MessageBus(bus_address=private_bus.address).connect()
    try:
        yield bus
    finally:
        bus.disconnect()


async def call(bus: MessageBus, member: str, signature: str = "", body: list | None = None,
               path: str = MANAGER, interface: str = MANAGER_IFACE) -> Message:
    return await bus.call(Message(destination="org.hostel1", path=path, interface=interface,
                                  member=member, signature=signature, body=body or []))


async def ok(bus: MessageBus, *args: Any, **kwargs: Any) -> list:
    reply = await call(bus, *args, **kwargs)
    assert reply.message_type == MessageType.METHOD_RETURN, reply.body
    return reply.body


async def error(bus: MessageBus, *args: Any, **kwargs: Any) -> tuple[str, str]:
    reply = await call(bus, *args, **kwargs)
    assert reply.message_type == MessageType.ERROR, reply.body
    return reply.error_name, reply.body[0]


async def get_all(bus: MessageBus, path: str) -> dict[str, Any]:
    (props,) = await ok(bus, "GetAll", "s", [VOLUME_IFACE], path=path,
                        interface="org.freedesktop.DBus.Properties")
    return {k: v.value for k, v in props.items()}


def expected_two(v: Volumes) -> dict[str, Any]:
    return {"Name": "two", "Device": str(v.luks2), "ResolvedDevice": os.path.realpath(v.luks2),
            "KeyFile": str(v.key_file), "KeyDevice": "", "Options": ["luks", "discard"],
            "Header": "", "HeaderDevice": "", "Source": str(v.crypttab), "State": "inactive",
            "LuksVersion": 2, "LuksUUID": UUID2, "LuksCipher": "aes-xts-plain64",
            "LuksKeySlots": [0, 1], "LuksLabel": "hostel-test", "HeaderError": ""}


# Listing and properties ----------------------------------------------------------------------

async def test_volumes_are_listed_and_bad_lines_explained(client: MessageBus,
                                                          images: Volumes) -> None:
    (listed,) = await ok(client, "ListVolumes")
    assert [list(row) for row in listed] == [
        ["one", str(images.luks1), "inactive", f"{MANAGER}/one"],
        ["two", str(images.luks2), "inactive", f"{MANAGER}/two"],
        ["plain", str(images.plain), "inactive", f"{MANAGER}/plain"],
        ["gone", f"UUID={ABSENT_UUID}", "missing-device", f"{MANAGER}/gone"]]
    (warnings,) = await ok(client, "Get", "ss", [MANAGER_IFACE, "Warnings"], path=MANAGER,
                           interface="org.freedesktop.DBus.Properties")
    assert warnings.value == [f"Failed to parse {images.crypttab}:6, ignoring.",
                              f"{images.crypttab}:7: volume name 'a/b' contains '/', which "
                              "device-mapper names cannot; skipped"]


async def test_every_property_over_dbus_fast(client: MessageBus, images: Volumes) -> None:
    assert await get_all(client, f"{MANAGER}/two") == expected_two(images)
    one = await get_all(client, f"{MANAGER}/one")
    info = luks.read_header(str(images.luks1))
    assert (one["LuksVersion"], one["LuksUUID"], one["LuksKeySlots"], one["LuksLabel"],
            one["KeyFile"]) == (1, info.uuid, [0], "", "none")
    plain = await get_all(client, f"{MANAGER}/plain")
    assert (plain["State"], plain["LuksVersion"], plain["LuksUUID"], plain["LuksKeySlots"]) == \
        ("inactive", 0, "", [])
    assert plain["HeaderError"] == f"{images.plain} is not a LUKS device (no LUKS1 or LUKS2 header found)"
    gone = await get_all(client, f"{MANAGER}/gone")
    assert (gone["State"], gone["ResolvedDevice"], gone["HeaderError"]) == \
        ("missing-device", "", f"source UUID={ABSENT_UUID} is not present")


def busctl_property(bus: PrivateBus, path: str, name: str, uid: int | None = None) -> Any:
    out = busctl(bus, "--json=short", "get-property", "org.hostel1", path, VOLUME_IFACE, name,
                 uid=uid).stdout
    return json.loads(out)


def test_every_property_with_busctl(private_bus: PrivateBus, cryptd: DaemonProcess,
                                    images: Volumes) -> None:
    signatures = {"LuksVersion": "u", "LuksKeySlots": "au", "Options": "as"}
    for name, value in expected_two(images).items():
        assert busctl_property(private_bus, f"{MANAGER}/two", name) == \
            {"type": signatures.get(name, "s"), "data": value}, name
    introspection = busctl(private_bus, "introspect", "org.hostel1", f"{MANAGER}/two").stdout
    for name in expected_two(images):
        assert f".{name} " in introspection
    tree = busctl(private_bus, "tree", "--list", "org.hostel1").stdout.split()
    assert {f"{MANAGER}/one", f"{MANAGER}/two", f"{MANAGER}/plain", f"{MANAGER}/gone"} <= set(tree)


def test_reads_are_open_to_everyone_and_key_checks_are_not(private_bus: PrivateBus,
                                                           cryptd: DaemonProcess) -> None:
    assert busctl_property(private_bus, f"{MANAGER}/two", "LuksVersion", uid=NOBODY)["data"] == 2
    listed = busctl(private_bus, "call", "org.hostel1", MANAGER, MANAGER_IFACE, "ListVolumes",
                    uid=NOBODY).stdout
    assert listed.startswith("a(ssso) 4 ")
    denied = busctl(private_bus, "call", "org.hostel1", MANAGER, MANAGER_IFACE, "CheckKey",
                    "sa{sv}", "two", "1", "Passphrase", "s", PASSPHRASE, uid=NOBODY, check=False)
    assert denied.returncode != 0 and "Access denied" in denied.stderr


# Keys -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["one", "two"])
async def test_check_key_right_and_wrong_passphrase(client: MessageBus, name: str) -> None:
    assert await ok(client, "CheckKey", "sa{sv}", [name, {"Passphrase": Variant("s", PASSPHRASE)}]) == [True]
    assert await ok(client, "CheckKey", "sa{sv}", [name, {"Passphrase": Variant("s", "nope")}]) == [False]


async def test_check_key_with_key_files(client: MessageBus, images: Volumes) -> None:
    # No key given: crypttab's key file for "two"; given: that file, or another.
    assert await ok(client, "CheckKey", "sa{sv}", ["two", {}]) == [True]
    assert await ok(client, "CheckKey", "sa{sv}",
                    ["two", {"KeyFile": Variant("s", str(images.key_file))}]) == [True]
    assert await ok(client, "CheckKey", "sa{sv}",
                    ["one", {"KeyFile": Variant("s", str(images.key_file))}]) == [False]


def test_check_key_with_busctl(private_bus: PrivateBus, cryptd: DaemonProcess) -> None:
    out = busctl(private_bus, "call", "org.hostel1", MANAGER, MANAGER_IFACE, "CheckKey", "sa{sv}",
                 "one", "1", "Passphrase", "s", PASSPHRASE).stdout
    assert out.strip() == "b true"


@pytest.mark.parametrize("name, options, dbus_error, message", [
    ("a/b", {}, "org.freedesktop.DBus.Error.InvalidArgs", "volume name 'a/b' contains '/'"),
    ("nope", {}, "org.hostel1.Error.NoSuchObject", "no volume named 'nope'"),
    ("one", {}, "org.freedesktop.DBus.Error.InvalidArgs", "volume one has no key file"),
    ("one", {"Pass": Variant("s", "x")}, "org.freedesktop.DBus.Error.InvalidArgs",
     "unknown option 'Pass' (known: Passphrase, KeyFile)"),
    ("one", {"Passphrase": Variant("i", 1)}, "org.freedesktop.DBus.Error.InvalidArgs",
     "option Passphrase must have type 's'"),
    ("one", {"Passphrase": Variant("s", "x"), "KeyFile": Variant("s", "/k")},
     "org.freedesktop.DBus.Error.InvalidArgs", "not both"),
    ("one", {"KeyFile": Variant("s", "relative")}, "org.freedesktop.DBus.Error.InvalidArgs",
     "not an absolute path"),
    ("one", {"KeyFile": Variant("s", "/nonexistent/key")}, "org.freedesktop.DBus.Error.InvalidArgs",
     "key file /nonexistent/key does not exist"),
    ("plain", {"Passphrase": Variant("s", "x")}, "org.hostel1.Error.NotLuks",
     "is not a LUKS device"),
    ("gone", {"Passphrase": Variant("s", "x")}, "org.hostel1.Error.NoSuchDevice",
     f"the source of volume gone, UUID={ABSENT_UUID}, is not present"),
])
async def test_check_key_bad_input_is_a_clear_error(client: MessageBus, name: str, options: dict,
                                                    dbus_error: str, message: str) -> None:
    name_got, text = await error(client, "CheckKey", "sa{sv}", [name, options])
    assert name_got == dbus_error and message in text
    assert await ok(client, "ListVolumes")  # and the daemon is still there


# Attach and detach -------------------------------------------------------------------------

needs_no_dm = pytest.mark.skipif(luks.device_mapper_missing() is None,
                                 reason="this kernel has device-mapper")


def losetup_list() -> str:
    return subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True).stdout


@needs_no_dm
@pytest.mark.parametrize("name, options", [
    ("one", {"Passphrase": Variant("s", PASSPHRASE)}), ("two", {})])
async def test_attach_says_there_is_no_device_mapper_and_leaves_nothing(
        client: MessageBus, name: str, options: dict) -> None:
    loops = losetup_list()
    name_got, text = await error(client, "Attach", "sa{sv}", [name, options])
    assert name_got == "org.hostel1.Error.NotSupported"
    assert text.startswith(f"cannot attach {name}: this kernel has no device-mapper")
    assert losetup_list() == loops and not os.path.exists(f"/dev/mapper/{name}")
    assert (await get_all(client, f"{MANAGER}/{name}"))["State"] == "inactive"


async def test_attach_and_detach_bad_input(client: MessageBus) -> None:
    assert await error(client, "Detach", "s", ["one"]) == (
        "org.hostel1.Error.NotActive", "volume one is not attached (there is no /dev/mapper/one)")
    assert (await error(client, "Detach", "s", ["x/y"]))[0] == "org.freedesktop.DBus.Error.InvalidArgs"
    assert (await error(client, "Attach", "sa{sv}", ["nope", {}]))[0] == "org.hostel1.Error.NoSuchObject"
    name, text = await error(client, "Attach", "sa{sv}", ["one", {"ReadOnly": Variant("s", "yes")}])
    assert name == "org.freedesktop.DBus.Error.InvalidArgs" and "ReadOnly must have type 'b'" in text


# Reload ------------------------------------------------------------------------------------

class Signals:
    """Every signal hosteld sends, collected."""

    def __init__(self, bus: MessageBus) -> None:
        self.seen: list[Message] = []
        bus.add_message_handler(self._on)

    def _on(self, msg: Message) -> None:
        if msg.message_type == MessageType.SIGNAL:
            self.seen.append(msg)

    def of(self, member: str) -> list[Message]:
        return [m for m in self.seen if m.member == member]


async def watch(bus: MessageBus) -> Signals:
    signals = Signals(bus)
    await bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                           interface="org.freedesktop.DBus", member="AddMatch", signature="s",
                           body=["type='signal',sender='org.hostel1'"]))
    return signals


async def wait_for(condition: Any, timeout: float = 5) -> None:
    for _ in range(int(timeout / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    assert condition()


async def test_reload_follows_a_changed_crypttab(client: MessageBus, images: Volumes) -> None:
    signals = await watch(client)
    images.crypttab.write_text(
        f"one {images.luks1} none luks,readonly\n"        # options changed
        f"two {images.luks2} {images.key_file} luks,discard\n"  # unchanged
        f"three {images.luks2} none\n")                   # new; plain and gone removed
    await ok(client, "Reload")
    (listed,) = await ok(client, "ListVolumes")
    assert [row[0] for row in listed] == ["one", "two", "three"]
    await wait_for(lambda: len(signals.of("InterfacesRemoved")) == 2
                   and signals.of("InterfacesAdded") and signals.of("PropertiesChanged"))
    removed = sorted(m.body[0] for m in signals.of("InterfacesRemoved"))
    assert removed == [f"{MANAGER}/gone", f"{MANAGER}/plain"]
    assert all(m.body[1] == [VOLUME_IFACE] for m in signals.of("InterfacesRemoved"))
    (added,) = signals.of("InterfacesAdded")
    assert added.body[0] == f"{MANAGER}/three"
    assert added.body[1][VOLUME_IFACE]["LuksUUID"].value == UUID2
    # Options and warnings (which quote crypttab) are root's: a signal, which every
    # listener gets, only says they changed; a root client reads them again.
    changes = [(m.path, m.body[0], {k: v.value for k, v in m.body[1].items()}, m.body[2])
               for m in signals.of("PropertiesChanged")]
    assert (f"{MANAGER}/one", VOLUME_IFACE, {}, ["Options"]) in changes
    assert (MANAGER, MANAGER_IFACE, {}, ["Warnings"]) in changes
    assert not [c for c in changes if c[0] == f"{MANAGER}/two"]
    assert (await get_all(client, f"{MANAGER}/one"))["Options"] == ["luks", "readonly"]


async def test_reload_of_an_unreadable_crypttab_keeps_the_volumes(client: MessageBus,
                                                                  images: Volumes) -> None:
    images.crypttab.unlink()
    images.crypttab.mkdir()
    name, text = await error(client, "Reload")
    assert name == "org.hostel1.Error.CrypttabUnreadable"
    assert text == (f"cannot read {images.crypttab} (Is a directory): no volumes loaded; "
                    "the volumes loaded before are kept")
    (listed,) = await ok(client, "ListVolumes")
    assert len(listed) == 4


def test_an_unreadable_crypttab_at_start_leaves_the_daemon_up(private_bus: PrivateBus,
                                                              tmp_path: Path,
                                                              images: Volumes) -> None:
    images.crypttab.unlink()
    images.crypttab.mkdir()
    daemon = start_daemon(private_bus, tmp_path, extra_env=images.env())
    try:
        out = busctl(private_bus, "call", "org.hostel1", MANAGER, MANAGER_IFACE,
                     "ListVolumes").stdout
        assert out.strip() == "a(ssso) 0"
        warnings = json.loads(busctl(private_bus, "--json=short", "get-property", "org.hostel1",
                                     MANAGER, MANAGER_IFACE, "Warnings").stdout)
        assert warnings["data"] == [f"cannot read {images.crypttab} (Is a directory): "
                                    "no volumes loaded"]
    finally:
        assert daemon.stop() == 0, daemon.log()


# Sources found by UUID on a real block device ----------------------------------------------------

@pytest.fixture
def loop_device(images: Volumes) -> Iterator[str]:
    device = subprocess.run(["losetup", "--find", "--show", str(images.luks2)],
                            capture_output=True, text=True, check=True).stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], check=True)


async def test_a_uuid_source_resolves_to_its_loop_device(private_bus: PrivateBus, tmp_path: Path,
                                                         images: Volumes, loop_device: str) -> None:
    images.crypttab.write_text(f"byuuid UUID={UUID2} none luks\n"
                               f"bylabel LABEL=hostel-test none luks\n")
    daemon = start_daemon(private_bus, tmp_path, extra_env=images.env())
    bus = await MessageBus(bus_address=private_bus.address).connect()
    try:
        for name in ("byuuid", "bylabel"):
            props = await get_all(bus, f"{MANAGER}/{name}")
            assert (props["ResolvedDevice"], props["State"], props["LuksUUID"]) == \
                (loop_device, "inactive", UUID2)
        assert await ok(bus, "CheckKey", "sa{sv}",
                        ["byuuid", {"Passphrase": Variant("s", PASSPHRASE)}]) == [True]
    finally:
        bus.disconnect()
        assert daemon.stop() == 0, daemon.log()


async def test_reload_refuses_what_would_block_or_cannot_be_shown(client: MessageBus,
                                                                  images: Volumes) -> None:
    """A FIFO source hung Reload with the manager's lock held (and every later call);
    a non-UTF-8 name was an Internal error. Both are now skipped or refused, by name."""
    fifo = images.dir / "source.fifo"
    os.mkfifo(fifo)
    key_fifo = images.dir / "key.fifo"
    os.mkfifo(key_fifo)
    images.crypttab.write_bytes(
        f"piped {fifo} none luks\n".encode()
        + b"bad\xff\xfename " + str(images.luks1).encode() + b" none luks\n"
        + f"keyed {images.luks2} {key_fifo} luks\n".encode())
    await asyncio.wait_for(ok(client, "Reload"), 10)
    (listed,) = await asyncio.wait_for(ok(client, "ListVolumes"), 10)
    assert sorted(row[0] for row in listed) == ["keyed", "piped"]
    piped = await get_all(client, f"{MANAGER}/piped")
    assert "is a FIFO, not a block device or regular file" in piped["HeaderError"]
    name, text = await asyncio.wait_for(error(client, "CheckKey", "sa{sv}", ["piped", {
        "Passphrase": Variant("s", PASSPHRASE)}]), 10)
    assert name != "org.hostel1.Error.Internal" and "FIFO" in text, (name, text)
    name, text = await asyncio.wait_for(error(client, "CheckKey", "sa{sv}", ["keyed", {}]), 10)
    assert name == "org.freedesktop.DBus.Error.InvalidArgs" and "is a FIFO" in text
    (warnings,) = await ok(client, "Get", "ss", [MANAGER_IFACE, "Warnings"], path=MANAGER,
                           interface="org.freedesktop.DBus.Properties")
    assert any("bad\\xff\\xfename is not valid UTF-8" in w for w in warnings.value)
    images.crypttab.unlink()
    os.mkfifo(images.crypttab)
    name, text = await asyncio.wait_for(error(client, "Reload"), 10)
    assert name == "org.hostel1.Error.CrypttabUnreadable", (name, text)
