"""A launcher failure that is no GuestError reaches the user as one line, never a
traceback: `hostelctl guest launch` prints one line naming what failed and what
to do and exits 1 (its "failure"); the traceback goes to hosteld's log.

The trigger is real: a launcher under an address-space limit (hosteld run
with LimitAS=, or under `ulimit -v`) that leaves room for the guest's memory
but not for the kernel's copy the loader reads: its read raises MemoryError,
which no GuestError wraps. (A kernel larger than guest memory, the old
trigger, is now refused by its size before it is read.) Before
launcher_failure.py that printed a Python traceback on the launching client's
console and left the exit record empty."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path
import pytest

from conftest import HOSTELCTL
from hostel.guest.launcher import settings_to_json
from hostel.guest.settings import GuestSettings
from hostel.privatebus import DaemonProcess

MIB = 1 << 20
GUEST_MB = 1024
# Sparse: no disk used. It fits the 1 GiB guest, so the loader reads it whole.
KERNEL_SIZE = 900 * MIB


def launcher_base_size() -> int:
    """The address space of a Python that has imported the launcher (and its C
    extension), as the launcher process has when it loads the kernel."""
    probe = subprocess.run(
        [sys.executable, "-c", "import hostel.guest.launcher, hostel._vmm\n"
         "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmPeak')))"],
        capture_output=True, text=True, check=True, timeout=60)
    return int(probe.stdout) * 1024


@pytest.fixture(scope="module")
def address_limit() -> int:
    """Room for the launcher, its guest memory and half the kernel: the guest's
    memory maps, the kernel's copy does not (a margin of 450 MiB either way)."""
    return launcher_base_size() + GUEST_MB * MIB + KERNEL_SIZE // 2


@pytest.fixture
def vast_kernel(tmp_path: Path) -> Path:
    path = tmp_path / "vast-vmlinuz"
    with open(path, "wb") as f:
        f.truncate(KERNEL_SIZE)
    return path


def test_the_launcher_process_reports_a_memory_error_in_one_line(vast_kernel: Path,
                                                                 tmp_path: Path,
                                                                 address_limit: int) -> None:
    """The launcher as hosteld runs it: exit status 1, nothing on its console, and
    the exit record has one line for people and the traceback for hosteld's log."""
    exit_file = tmp_path / "exit"
    settings = GuestSettings(memory_mb=GUEST_MB, kernel=vast_kernel)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (address_limit, address_limit))

    proc = subprocess.run([sys.executable, "-m", "hostel.guest.launcher",
                           settings_to_json(settings), str(exit_file)],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                          preexec_fn=limit)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    record = json.loads(exit_file.read_text())
    assert record["reason"] == "error" and record["code"] == 1
    assert "\n" not in record["detail"]
    assert "ran out of memory" in record["detail"] and "kernel or initrd" in record["detail"]
    # the path this test exists for: not a GuestError, so the traceback is kept
    assert record["traceback"].startswith("Traceback") and "MemoryError" in record["traceback"]


@pytest.fixture
def limited_hosteld(hosteld: DaemonProcess, address_limit: int) -> DaemonProcess:
    """hosteld under the address-space limit (as LimitAS= would set it): the
    launchers it starts inherit it."""
    assert hosteld.proc is not None
    pid = hosteld.proc.pid
    vm_size = int(next(line.split()[1] for line in Path(f"/proc/{pid}/status").read_text()
                       .splitlines() if line.startswith("VmSize"))) * 1024
    assert vm_size < address_limit, "hosteld itself needs more than the limit leaves"
    # not raised again afterwards (that needs CAP_SYS_RESOURCE): this hosteld is the
    # test's own and ends with it
    resource.prlimit(pid, resource.RLIMIT_AS, (address_limit, address_limit))
    return hosteld


def test_guest_launch_shows_one_line_for_a_non_guest_error(limited_hosteld: DaemonProcess,
                                                          vast_kernel: Path) -> None:
    hosteld = limited_hosteld
    proc = subprocess.run([HOSTELCTL, "guest", "launch", "--name", "vastkernel", str(GUEST_MB),
                           str(vast_kernel)],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                          env=dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=hosteld.address))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines == [f"hostelctl guest launch: vastkernel: {lines[0].split(': ', 2)[2]}"], output
    assert "ran out of memory" in lines[0] and "kernel or initrd" in lines[0]
    assert hosteld.log_path is not None
    log = hosteld.log_path.read_text()
    assert "guest vastkernel: the launcher failed:" in log and "MemoryError" in log, log[-3000:]
