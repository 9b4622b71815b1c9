"""With a real systemd-machined on the bus, hosteld registers its containers there instead.

systemd-machined runs here (in a private mount namespace whose /run has
/run/systemd/system) on the test's private bus; machinectl then talks to it,
not to hosteld, and must list hostel's container, then forget it at exit."""
from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from hostel.privatebus import DaemonProcess, PrivateBus

from conftest import HOSTELCTL, busctl, hostelctl

MACHINED = "/lib/systemd/systemd-machined"
pytestmark = pytest.mark.skipif(not (Path(MACHINED).exists() and shutil.which("machinectl")),
                                reason="systemd-machined/machinectl not installed")
PRIVATE_RUN = 'mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/system && exec "$@"'


def in_private_run(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["unshare", "-m", "--propagation=private", "sh", "-c", PRIVATE_RUN, "sh",
                           *argv], env=env, capture_output=True, text=True, timeout=60)


def wait_for(condition, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.1)


def test_containers_are_registered_with_a_real_machined(private_bus: PrivateBus, tree: Path,
                                                        tmp_path: Path) -> None:
    env = {"DBUS_SYSTEM_BUS_ADDRESS": private_bus.address, "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"}
    machined = subprocess.Popen(["unshare", "-m", "--propagation=private", "sh", "-c", PRIVATE_RUN,
                                 "sh", MACHINED], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    daemon = None
    client = None
    try:
        wait_for(lambda: busctl(private_bus, "status", "org.freedesktop.machine1",
                                check=False).returncode == 0)
        daemon = DaemonProcess(private_bus.address, tmp_path / "run", tmp_path / "state",
                               bus=private_bus).start()
        assert "registering hostel's machines with it" in daemon.log()
        client = subprocess.Popen([HOSTELCTL, "run", "-q", "-D", str(tree), "-M", "tracked",
                                   "--as-pid2", "sleep", "60"], env=daemon.environment(),
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)

        def listed() -> str:
            return in_private_run("machinectl", "--no-pager", "list", env=env).stdout

        wait_for(lambda: "tracked" in listed())
        assert re.search(r"^tracked\s+container\s+hostel\s+hostel-busybox", listed(), re.M)
        hostelctl(daemon.address, "kill", "tracked", "--signal=KILL")
        wait_for(lambda: "tracked" not in listed())
    finally:
        if client is not None:
            client.kill()
            client.wait()
        if daemon is not None:
            hostelctl(daemon.address, "kill", "tracked", "--signal=KILL")
            daemon.stop()
        machined.terminate()
        machined.wait(timeout=10)
