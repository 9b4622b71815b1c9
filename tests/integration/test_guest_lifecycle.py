"""A guest's lifecycle as its users see it: `hostelctl guest launch` takes its
guest with it whichever way it is ended; guests show in `machinectl list`
(class vm) and `hostelctl list`; `hostelctl guest status` and the exit detail
name the console log."""
from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import HOSTELCTL, busctl, hostelctl
from guests.build import build
from hostel.guest.manager import GuestManager
from hostel.guest.settings import GuestSettings
from hostel.privatebus import DaemonProcess

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="no /dev/kvm on this host")


@pytest.fixture(scope="module")
def spin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build("spin", tmp_path_factory.mktemp("guests"))


def guest_state(daemon: DaemonProcess, name: str) -> str | None:
    for line in hostelctl(daemon.address, "guest", "list").stdout.splitlines():
        fields = line.split()
        if fields and fields[0] == name:
            return fields[2]
    return None


def wait_for(condition, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


def status_field(daemon: DaemonProcess, name: str, field: str) -> str:
    out = hostelctl(daemon.address, "guest", "status", name)
    assert out.returncode == 0, out.stderr
    match = re.search(rf"^\s*{field}: (.*)$", out.stdout, re.M)
    assert match, out.stdout
    return match.group(1)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def launch(daemon: DaemonProcess, name: str, kernel: Path) -> subprocess.Popen[str]:
    """`hostelctl guest launch` as a user runs it, its console a pipe; returns once running."""
    proc = subprocess.Popen([HOSTELCTL, "guest", "launch", "--name", name, "8", str(kernel)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=daemon.address))
    try:
        wait_for(lambda: guest_state(daemon, name) == "running", f"{name} runs")
    except AssertionError:
        proc.kill()
        raise AssertionError(f"the guest did not start: {proc.communicate()[1]}") from None
    return proc


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP],
                         ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_the_guest_ends_with_its_launch_client(hosteld: DaemonProcess, spin: Path, sig: int) -> None:
    proc = launch(hosteld, "life", spin)
    try:
        leader = int(status_field(hosteld, "life", "Leader").split()[0])
        assert alive(leader)
        proc.send_signal(sig)
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, err   # ended, not by the signal's default action
    assert "Traceback" not in err
    wait_for(lambda: not alive(leader), "the launcher is gone")
    assert guest_state(hosteld, "life") is None, "the client forgot the guest too"


def test_the_guest_ends_even_when_its_client_is_killed(hosteld: DaemonProcess, spin: Path) -> None:
    """SIGKILL leaves hostelctl no chance to ask: hosteld sees its ClientAlive pipe
    hang up and ends the guest itself (which stays listed as exited, unforgotten)."""
    proc = launch(hosteld, "orphan", spin)
    try:
        leader = int(status_field(hosteld, "orphan", "Leader").split()[0])
        proc.kill()
        proc.communicate(timeout=30)
        wait_for(lambda: not alive(leader), "the launcher is gone")
        wait_for(lambda: guest_state(hosteld, "orphan") == "exited", "the guest is exited")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert hostelctl(hosteld.address, "guest", "terminate", "orphan").returncode == 0


@pytest.mark.skipif(not shutil.which("machinectl"), reason="machinectl not installed")
def test_guests_are_listed_by_machinectl_and_hostelctl(hosteld: DaemonProcess, spin: Path) -> None:
    proc = launch(hosteld, "listed-vm", spin)
    try:
        script = 'mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/system && exec machinectl "$@"'
        out = subprocess.run(["unshare", "-m", "--propagation=private", "sh", "-c", script, "sh",
                              "--no-pager", "list"], env={**hosteld.environment(), "SYSTEMD_COLORS": "0"},
                             capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert out.returncode == 0, out.stderr
        assert re.search(r"^listed-vm\s+vm\s+hostel", out.stdout, re.M), out.stdout
        listing = hostelctl(hosteld.address, "list").stdout
        assert re.search(r"^listed-vm\s+vm\b.*\brunning\b", listing, re.M), listing
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)


def test_guest_status_names_the_console_log(hosteld: DaemonProcess, spin: Path) -> None:
    started = busctl(hosteld.bus, "call", "org.hostel1", "/org/hostel1/guest",
                     "org.hostel1.GuestManager", "StartGuest", "sa{sv}", "logged", "2",
                     "Kernel", "s", str(spin), "MemoryMB", "u", "8")
    assert started.returncode == 0, started.stderr
    try:
        log = status_field(hosteld, "logged", "Console log")
        assert log == str(hosteld.runtime_dir / "guests" / "logged.console")
        assert Path(log).is_file()
    finally:
        assert hostelctl(hosteld.address, "guest", "terminate", "logged").returncode == 0


async def test_a_launcher_that_dies_unreported_names_its_console_log(tmp_path: Path, spin: Path) -> None:
    manager = GuestManager(tmp_path / "run", lambda guest: None)
    guest = await manager.start("dies", GuestSettings(memory_mb=8, kernel=spin), None)
    os.kill(guest.pid, signal.SIGKILL)   # not through hosteld: no exit reason is written
    async with asyncio.timeout(20):
        await guest.exited.wait()
    log = tmp_path / "run" / "guests" / "dies.console"
    assert guest.exit_reason == "killed"
    assert f"see the console log {log}" in guest.exit_detail
