"""Fixtures: a private dbus-daemon with the project's policy, and a real hosteld on it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from hostel.privatebus import DaemonProcess, PrivateBus, start_daemon

REPO = Path(__file__).resolve().parents[1]
NOBODY = 65534
HOSTELCTL = shutil.which("hostelctl", path=str(Path(sys.executable).parent)) or "hostelctl"


def pytest_configure(config: pytest.Config) -> None:
    if os.geteuid() != 0:
        pytest.exit("hostel's tests need root: they create namespaces, mounts and devices", 2)


@pytest.fixture
def private_bus(tmp_path: Path) -> Iterator[PrivateBus]:
    bus = PrivateBus(tmp_path / "bus").start()
    try:
        yield bus
    finally:
        bus.stop()


@pytest.fixture
def open_bus(tmp_path: Path) -> Iterator[PrivateBus]:
    """A bus whose policy lets anyone call anything: only hosteld's own checks remain."""
    bus = PrivateBus(tmp_path / "openbus", open_policy=True).start()
    try:
        yield bus
    finally:
        bus.stop()


@pytest.fixture
def hosteld(private_bus: PrivateBus, tmp_path: Path) -> Iterator[DaemonProcess]:
    # A world-searchable runtime directory, as /run/hostel is: containers with
    # --private-users run as an unprivileged host uid that must reach it.
    runtime = Path(tempfile.mkdtemp(prefix="hostel-run-"))
    runtime.chmod(0o755)
    daemon = DaemonProcess(private_bus.address, runtime, tmp_path / "state", bus=private_bus)
    daemon.log_path = tmp_path / "hosteld.log"
    try:
        daemon.start()
        yield daemon
    finally:
        terminate_all_machines(daemon)  # they would outlive hosteld, as they should
        status = daemon.stop()
        shutil.rmtree(runtime, ignore_errors=True)
        assert status == 0, f"hosteld exited with {status} on SIGTERM:\n{daemon.log()}"


def terminate_all_machines(daemon: DaemonProcess) -> None:
    """Machines and guests outlive hosteld by design; a test must not leave any behind."""
    if daemon.proc is None or daemon.proc.poll() is not None:
        return
    guests = hostelctl(daemon.address, "guest", "list").stdout.splitlines()
    for line in guests[1:]:
        if line.strip() and "guests listed" not in line:
            hostelctl(daemon.address, "guest", "terminate", line.split()[0])
    listing = hostelctl(daemon.address, "list").stdout.splitlines()
    names = [line.split()[0] for line in listing[1:] if line.strip() and "machines listed" not in line]
    for name in names:
        hostelctl(daemon.address, "kill", name, "--signal=KILL")
    for _ in range(100):
        if "0 machines listed." in hostelctl(daemon.address, "list").stdout:
            return
        time.sleep(0.1)


@pytest.fixture
def hosteld_open(open_bus: PrivateBus, tmp_path: Path) -> Iterator[DaemonProcess]:
    daemon = start_daemon(open_bus, tmp_path)
    try:
        yield daemon
    finally:
        terminate_all_machines(daemon)
        daemon.stop()


def busctl(bus: PrivateBus, *args: str, uid: int | None = None,
           check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the real busctl against `bus`, optionally as an unprivileged uid."""
    cmd = ["busctl", f"--address={bus.address}", *args]
    if uid is not None:
        cmd = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=60)


def hostelctl(bus_address: str, *args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=bus_address)
    if "input" not in kwargs:
        kwargs.setdefault("stdin", subprocess.DEVNULL)
    kwargs.setdefault("timeout", 60)
    return subprocess.run([HOSTELCTL, *args], capture_output=True, text=True, env=env, **kwargs)


@pytest.fixture(scope="session")
def busybox_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One busybox root built for the session; tests get copies (see `tree`)."""
    base = tmp_path_factory.mktemp("busybox") / "tree"
    subprocess.run([str(REPO / "scripts/make-busybox-tree"), str(base)], check=True,
                   capture_output=True)
    return base


@pytest.fixture
def tree(busybox_base: Path, tmp_path: Path) -> Path:
    """A private busybox root directory for one test, named like a machine."""
    copy = tmp_path / "bbox"
    subprocess.run(["cp", "-a", str(busybox_base), str(copy)], check=True)
    return copy
