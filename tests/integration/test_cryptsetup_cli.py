"""hostelctl cryptsetup list | status | check-key | attach | detach, as a user runs them."""
from __future__ import annotations

import os
import pty
import select
import shutil
import sys
import time
from pathlib import Path

import pytest

from hostel.cryptsetup import luks
from hostel.privatebus import DaemonProcess, PrivateBus

from conftest import hostelctl
from .test_cryptsetup_service import ABSENT_UUID, PASSPHRASE, UUID2, Volumes, cryptd, images  # noqa: F401 (fixtures)


def test_list_shows_volumes_states_and_warnings(private_bus: PrivateBus, cryptd: DaemonProcess,
                                                images: Volumes) -> None:
    out = hostelctl(private_bus.address, "cryptsetup", "list")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["VOLUME", "STATE", "DEVICE"]
    rows = {line.split()[0]: line.split() for line in lines[1:-2]}  # sorted by name
    assert [line.split()[0] for line in lines[1:-2]] == sorted(rows)
    assert rows["one"] == ["one", "inactive", str(images.luks1)]
    assert rows["gone"] == ["gone", "missing-device", f"UUID={ABSENT_UUID}"]
    assert lines[-1] == "4 volumes listed."
    assert f"warning: {images.crypttab}:7: volume name 'a/b' contains '/'" in out.stderr


def test_status_shows_the_header_facts(private_bus: PrivateBus, cryptd: DaemonProcess,
                                       images: Volumes) -> None:
    out = hostelctl(private_bus.address, "cryptsetup", "status", "two")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "two (inactive)",
        f"     Device: {images.luks2}",
        f"   Resolved: {os.path.realpath(images.luks2)}",
        f"   Key file: {images.key_file}",
        "    Options: luks,discard",
        "     Header: (on the device)",
        f"       From: {images.crypttab}",
        f"       LUKS: LUKS2, aes-xts-plain64, UUID {UUID2}, label 'hostel-test', key slots 0 1"]
    plain = hostelctl(private_bus.address, "cryptsetup", "status", "plain")
    assert "LUKS: none (" in plain.stdout and "is not a LUKS device" in plain.stdout
    missing = hostelctl(private_bus.address, "cryptsetup", "status", "nope")
    assert missing.returncode == 1 and "no volume named 'nope'" in missing.stderr


@pytest.mark.parametrize("passphrase, status, verdict", [
    (PASSPHRASE, 0, "opens"), ("wrong", 2, "does not open")])
def test_check_key_reads_a_passphrase_from_a_pipe(private_bus: PrivateBus, cryptd: DaemonProcess,
                                                  passphrase: str, status: int, verdict: str) -> None:
    out = hostelctl(private_bus.address, "cryptsetup", "check-key", "one", input=passphrase + "\n")
    assert (out.returncode, out.stdout.strip()) == (status, f"one: the key {verdict} the volume")


def test_check_key_with_a_key_file(private_bus: PrivateBus, cryptd: DaemonProcess,
                                   images: Volumes) -> None:
    out = hostelctl(private_bus.address, "cryptsetup", "check-key", "two", "--key-file",
                    str(images.key_file))
    assert out.returncode == 0 and "opens" in out.stdout
    empty = hostelctl(private_bus.address, "cryptsetup", "check-key", "one", input="")
    assert empty.returncode == 1 and "no passphrase for one on standard input" in empty.stderr


def test_check_key_uses_the_crypttab_key_file(private_bus: PrivateBus, cryptd: DaemonProcess,
                                              images: Volumes) -> None:
    # "two" names a key file in crypttab: nothing is read from stdin, so a wrong
    # passphrase there must not matter.
    out = hostelctl(private_bus.address, "cryptsetup", "check-key", "two", input="wrong\n")
    assert (out.returncode, out.stdout.strip()) == (0, "two: the key opens the volume"), out.stderr
    wrong = images.key_file.with_name("wrong.key")
    wrong.write_bytes(b"not the key")
    bad = hostelctl(private_bus.address, "cryptsetup", "check-key", "two", "--key-file", str(wrong))
    assert (bad.returncode, bad.stdout.strip()) == (2, "two: the key does not open the volume")


def test_check_key_checks_the_name_before_asking(private_bus: PrivateBus,
                                                 cryptd: DaemonProcess) -> None:
    screen = run_on_terminal(private_bus.address, ["cryptsetup", "check-key", "nope"], "x",
                             expect_prompt=False)
    assert "Passphrase for" not in screen
    assert "no volume named 'nope'" in screen and screen.endswith("[exit 4]")


def run_on_terminal(address: str, args: list[str], typed: str, timeout: float = 30,
                    expect_prompt: bool = True) -> str:
    """Run hostelctl with a pseudo-terminal as its controlling terminal; type once prompted."""
    exe = shutil.which("hostelctl", path=str(Path(sys.executable).parent))
    pid, fd = pty.fork()
    if pid == 0:  # the child: only exec
        os.execve(exe, [exe, *args], dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=address))
    seen, typed_yet, deadline = b"", False, time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not typed_yet and b"Passphrase for" in seen:
                os.write(fd, typed.encode() + b"\r")
                typed_yet = True
            ready, _, _ = select.select([fd], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                seen += chunk
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    assert typed_yet == expect_prompt, seen
    return seen.decode(errors="replace") + f"\n[exit {os.waitstatus_to_exitcode(status)}]"


def test_the_passphrase_prompt_does_not_echo(private_bus: PrivateBus, cryptd: DaemonProcess) -> None:
    screen = run_on_terminal(private_bus.address, ["cryptsetup", "check-key", "one"], PASSPHRASE)
    assert "Passphrase for one: " in screen
    assert PASSPHRASE not in screen
    assert "one: the key opens the volume" in screen and screen.endswith("[exit 0]")


@pytest.mark.skipif(luks.device_mapper_missing() is None, reason="this kernel has device-mapper")
def test_attach_says_why_it_cannot(private_bus: PrivateBus, cryptd: DaemonProcess) -> None:
    # "two" has a key file in crypttab, so nothing is asked for.
    out = hostelctl(private_bus.address, "cryptsetup", "attach", "two")
    assert out.returncode == 1
    assert out.stderr.startswith("hostelctl cryptsetup attach: cannot attach two: "
                                 "this kernel has no device-mapper")
    asked = hostelctl(private_bus.address, "cryptsetup", "attach", "one", input=PASSPHRASE + "\n")
    assert asked.returncode == 1 and "no device-mapper" in asked.stderr


def test_detach_of_an_inactive_volume(private_bus: PrivateBus, cryptd: DaemonProcess) -> None:
    out = hostelctl(private_bus.address, "cryptsetup", "detach", "one")
    assert out.returncode == 1
    assert out.stderr.strip() == ("hostelctl cryptsetup detach: volume one is not attached "
                                  "(there is no /dev/mapper/one)")
    slash = hostelctl(private_bus.address, "cryptsetup", "detach", "a/b")
    assert slash.returncode == 1 and "contains '/'" in slash.stderr


def test_the_commands_need_the_daemon(tmp_path: Path) -> None:
    out = hostelctl(f"unix:path={tmp_path}/no-bus", "cryptsetup", "list")
    assert out.returncode == 69 and "cannot reach the system bus" in out.stderr
