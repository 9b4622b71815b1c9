"""The boot marker: a guest's write of 123 to port 0x3f0 (what hostel's static init
does right before it executes its task, when a benchmark asks) is timestamped by
the vCPU loop on the host's CLOCK_MONOTONIC, after the moment the vCPUs started;
any other value on that port is no marker. Real KVM, a freestanding guest."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from guests.build import build
from hostel.guest.kvm import KvmBackend
from hostel.guest.launcher import Launcher
from hostel.guest.settings import GuestSettings

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="no /dev/kvm on this host")

TIMEOUT = 20  # seconds: the guest takes milliseconds; this only catches a hang


def _boot(kernel: Path, cmdline: str) -> tuple[str, int | None, int | None]:
    """Run the guest to its end: its exit reason, first_run_ns and boot_marker_ns,
    read before the launcher closes (which releases the vCPUs)."""
    read_end, write_end = os.pipe()
    launcher = Launcher(GuestSettings(memory_mb=8, kernel=kernel, cmdline=cmdline), write_end)
    watchdog = threading.Timer(TIMEOUT, launcher.stop)
    watchdog.start()
    try:
        result = launcher.run()
        backend = launcher.backend
        assert isinstance(backend, KvmBackend)
        return result.reason, backend.first_run_ns, backend.boot_marker_ns
    finally:
        watchdog.cancel()
        launcher.close()
        os.close(read_end)
        os.close(write_end)


@pytest.fixture(scope="module")
def marker_guest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build("marker", tmp_path_factory.mktemp("guests"))


def test_the_marker_is_timestamped_on_the_hosts_clock_after_the_vcpus_start(
        marker_guest: Path) -> None:
    before = time.monotonic_ns()
    reason, first_run, marker = _boot(marker_guest, "marker")
    after = time.monotonic_ns()
    assert reason == "poweroff"
    assert first_run is not None and marker is not None, (first_run, marker)
    assert before <= first_run < marker <= after, (before, first_run, marker, after)


def test_another_value_on_the_port_is_no_marker(marker_guest: Path) -> None:
    reason, first_run, marker = _boot(marker_guest, "other")
    assert (reason, marker) == ("poweroff", None)
    assert first_run is not None
