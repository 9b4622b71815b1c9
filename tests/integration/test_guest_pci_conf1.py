"""PCI configuration mechanism 1 on the launcher's machine, which has no PCI
device: what Linux's conf1 probe (arch/x86/pci/direct.c) needs to find it
rather than "PCI: Fatal: No config space access function found". A
freestanding guest (tests/guests/pciconf.c) checks each answer through real
KVM port exits; the lab's Linux boot (test_guest_linux.py) checks the whole."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from guests.build import build
from hostel.guest.backend import GuestExit
from hostel.guest.launcher import Launcher
from hostel.guest.settings import GuestSettings

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="no /dev/kvm on this host")

TIMEOUT = 20  # seconds: the guest takes milliseconds; this only catches a hang
FAILURES = {1: "CONFIG_ADDRESS did not read back 0x80000000",
            2: "CONFIG_ADDRESS kept its reserved bits 1:0",
            4: "CONFIG_ADDRESS kept its reserved bits 30:24",
            8: "CONFIG_DATA did not read all ones with no device",
            16: "a byte write to 0xCFB changed CONFIG_ADDRESS",
            32: "CONFIG_ADDRESS did not take 0 back"}


def _run(kernel: Path) -> GuestExit:
    read_end, write_end = os.pipe()
    launcher = Launcher(GuestSettings(memory_mb=8, kernel=kernel), write_end)
    watchdog = threading.Timer(TIMEOUT, launcher.stop)
    watchdog.start()
    try:
        return launcher.run()
    finally:
        watchdog.cancel()
        launcher.close()
        os.close(read_end)
        os.close(write_end)


def test_conf1_latches_the_address_and_finds_no_device(tmp_path: Path) -> None:
    result = _run(build("pciconf", tmp_path))
    assert result.reason == "poweroff", result
    assert [text for bit, text in FAILURES.items() if result.code & bit] == []
