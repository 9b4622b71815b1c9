"""Booting Debian's stock kernel (bzImage) through the launcher.

Only on hosts with hardware virtualization (kvm_intel or kvm_amd): PVM, the
KVM of hosts without it, runs purpose-built guests only. The kernel has no
root filesystem here, so it boots until it panics (panic=-1 reboots, which
ends the guest as a shutdown); its serial console shows how far it got."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from guests.run import run_to_end
from guests.kernel import HOW_TO_GET_ONE, debian_kernel
from hostel.guest.launcher import Launcher
from hostel.guest.settings import GuestSettings

HARDWARE_KVM = any(os.path.exists(f"/sys/module/{m}") for m in ("kvm_intel", "kvm_amd"))
pytestmark = pytest.mark.skipif(
    not HARDWARE_KVM, reason="needs kvm_intel or kvm_amd: this host's KVM (PVM or none) cannot "
                             "boot a stock Linux kernel")
TIMEOUT = 60


def test_debian_kernel_boots_to_its_panic_on_the_serial_console(tmp_path: Path) -> None:
    kernel = debian_kernel(tmp_path)
    if kernel is None:
        pytest.skip(HOW_TO_GET_ONE)
    log = tmp_path / "console"
    with open(log, "wb") as console:
        launcher = Launcher(GuestSettings(memory_mb=256, kernel=kernel,
                                          cmdline="console=ttyS0 panic=-1"), console.fileno())
        result = run_to_end(launcher, TIMEOUT)
    text = log.read_text(errors="replace")
    assert "Linux version" in text
    assert "virtio_mmio" in text or "virtio-mmio" in text
    assert result.reason == "shutdown", text[-2000:]
