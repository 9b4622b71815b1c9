"""Fixtures: a private dbus-daemon with the project's policy, and a real hosteld on it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from hostel.privatebus import DaemonProcess, PrivateBus, start_daemon

REPO = Path(__file__).resolve().parents[1]
NOBODY = 65534


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
    daemon = start_daemon(private_bus, tmp_path)
    try:
        yield daemon
    finally:
        status = daemon.stop()
        assert status == 0, f"hosteld exited with {status} on SIGTERM:\n{daemon.log()}"


@pytest.fixture
def hosteld_open(open_bus: PrivateBus, tmp_path: Path) -> Iterator[DaemonProcess]:
    daemon = start_daemon(open_bus, tmp_path)
    try:
        yield daemon
    finally:
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
    exe = shutil.which("hostelctl", path=str(Path(sys.executable).parent)) or "hostelctl"
    return subprocess.run([exe, *args], capture_output=True, text=True, env=env,
                          timeout=60, **kwargs)
