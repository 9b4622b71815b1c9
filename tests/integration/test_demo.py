"""`make demo`'s script, with no system bus and beside a hosteld already serving one.

The system bus is made up per test in a private mount namespace: /run/dbus is
covered by a tmpfs, which either stays empty (no system bus) or gets a
system_bus_socket leading to a private dbus-daemon on which a hosteld runs."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from conftest import REPO
from hostel.privatebus import DaemonProcess, PrivateBus

DEMO = REPO / "scripts/demo.py"


def demo(system_socket: str = "") -> subprocess.CompletedProcess[str]:
    """Run the demo where /run/dbus holds `system_socket` (a link to it) or nothing."""
    script = ('set -e\nmount -t tmpfs tmpfs /run/dbus\n'
              '[ -z "$SOCKET" ] || ln -s "$SOCKET" /run/dbus/system_bus_socket\n'
              'exec "$PYTHON" "$DEMO"\n')
    env = {k: v for k, v in os.environ.items() if k != "DBUS_SYSTEM_BUS_ADDRESS"}
    env.update(SOCKET=system_socket, PYTHON=sys.executable, DEMO=str(DEMO))
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", script],
                          env=env, capture_output=True, text=True, timeout=300)


def test_demo_starts_its_own_hosteld_on_a_private_bus() -> None:
    result = demo()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no usable system bus here: started a private dbus-daemon" in result.stdout
    assert "hello from busybox" in result.stdout
    assert "hosteld stopped (exit status 0)" in result.stdout


@pytest.fixture
def system_hosteld(private_bus: PrivateBus) -> Iterator[DaemonProcess]:
    """A hosteld as an installed one runs: on the bus, with the system's state directory."""
    runtime = Path(tempfile.mkdtemp(prefix="hostel-run-"))
    daemon = DaemonProcess(private_bus.address, runtime, Path("/var/lib/hostel"), bus=private_bus)
    try:
        yield daemon.start()
    finally:
        status = daemon.stop()
        subprocess.run(["rm", "-rf", str(runtime)], check=True)
        assert status == 0, daemon.log()


def test_demo_uses_the_hosteld_serving_the_system_bus(system_hosteld: DaemonProcess,
                                                      private_bus: PrivateBus) -> None:
    result = demo(str(private_bus.socket_path))
    assert result.returncode == 0, result.stdout + result.stderr
    pid = system_hosteld.proc.pid
    assert f"using the hosteld already serving the system bus (pid {pid})" in result.stdout
    assert "hello from busybox" in result.stdout
    assert system_hosteld.proc.poll() is None, "the demo must leave that hosteld running"
