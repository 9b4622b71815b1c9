"""What a VM run's foreground client sees when hosteld is killed under it: the same as a
container run's (tests/integration/test_guest_run_container_adoption.py): it says that
hosteld stopped while the guest was running and that the guest goes on, and exits 69;
the VM goes on and the next hosteld takes it back and terminates it."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from hostel.privatebus import DaemonProcess, PrivateBus

from conftest import HOSTELCTL, hostelctl
from lab.plugin import time_scale
from lab.test_guest_run_vm import RUN_TIMEOUT, _image, _leader, _listed

NAME = "vmclient-lost"
LOST = f"hosteld stopped while guest {NAME} was running; the guest goes on without this client"
EXIT_DAEMON_LOST = 69


@pytest.mark.lab("kvm")
def test_a_vm_runs_client_says_hosteld_is_gone_and_the_vm_goes_on(
        private_bus: PrivateBus, tmp_path: Path) -> None:
    address = private_bus.address
    daemon = DaemonProcess(address, tmp_path / "run", tmp_path / "state", bus=private_bus)
    daemon.start()
    err_path = tmp_path / "client.err"
    client: subprocess.Popen[bytes] | None = None
    try:
        assert hostelctl(address, "image", "import", str(_image(tmp_path / "p.tar")),
                         "--name", "parity").returncode == 0
        with open(err_path, "w") as err:   # the launcher holds the client's descriptors
            client = subprocess.Popen(
                [HOSTELCTL, "guest", "run", "--quiet", "--isolation=vm", "--image", "parity",
                 "--name", NAME, "--", "sleep", "600"],
                env=dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=address),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 60 * time_scale()
        while not _listed(address, NAME):
            assert client.poll() is None, err_path.read_text()
            assert time.monotonic() < deadline, hostelctl(address, "list").stdout
            time.sleep(0.5)
        launcher = _leader(address, NAME)

        daemon.stop(signal.SIGKILL)
        assert client.wait(30 * time_scale()) == EXIT_DAEMON_LOST, err_path.read_text()
        said = err_path.read_text()
        assert LOST in said and "Traceback" not in said, said
        assert os.path.exists(f"/proc/{launcher}"), "the VM ended with its client"

        daemon.start()
        assert _listed(address, NAME), daemon.log()[-3000:]
        assert hostelctl(address, "guest", "terminate", NAME).returncode == 0
        deadline = time.monotonic() + RUN_TIMEOUT
        while "State: exited" not in hostelctl(address, "guest", "status", NAME).stdout:
            assert time.monotonic() < deadline, daemon.log()[-3000:]
            time.sleep(0.5)
    finally:
        if client is not None and client.poll() is None:
            client.kill()
            client.wait()
        if daemon.proc is not None and daemon.proc.poll() is None:
            hostelctl(address, "guest", "terminate", NAME)
            daemon.stop()
