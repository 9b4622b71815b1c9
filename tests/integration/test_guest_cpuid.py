"""What a vCPU's CPUID says, read by a guest (tests/guests/cpuid.c): the
TSC-deadline timer (CPUID.1:ECX bit 24) is offered whenever KVM says its
in-kernel LAPIC emulates it (KVM_CAP_TSC_DEADLINE_TIMER), as QEMU offers it.
KVM_GET_SUPPORTED_CPUID of kernels before 6.14 leaves the bit out (it depends
on the in-kernel LAPIC), so without the launcher setting it a Linux guest
has no tsc_deadline_timer. On this host (6.18) the bit comes from KVM itself,
so this test holds the behaviour, not the launcher's part of it: that is
test_guest_linux.py's test_the_lapic_timer_runs_in_tsc_deadline_mode, in the
lab on Debian 12's 6.1."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from guests.build import build
from guests.run import run_to_end
from hostel._vmm import lib
from hostel.guest.launcher import Launcher
from hostel.guest.settings import GuestSettings

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="no /dev/kvm on this host")

TIMEOUT = 20  # seconds; the guest takes milliseconds
CPUID_1_ECX_TSC_DEADLINE = 1 << 24
CPUID_1_ECX_HYPERVISOR = 1 << 31


def kvm_has_tsc_deadline() -> bool:
    fd = lib.hostel_kvm_open()
    assert fd >= 0, os.strerror(-fd)
    try:
        return lib.hostel_kvm_check(fd, lib.KVM_CAP_TSC_DEADLINE_TIMER) > 0
    finally:
        os.close(fd)


def guest_cpuid_ecx(tmp_path: Path, cpus: int) -> list[int]:
    """Each line the guest printed: CPUID.1:ECX as the boot vCPU saw it."""
    read_end, write_end = os.pipe()
    try:
        launcher = Launcher(GuestSettings(memory_mb=8, kernel=build("cpuid", tmp_path),
                                          cpus=cpus), write_end)
        result = run_to_end(launcher, TIMEOUT)
        os.close(write_end)
        write_end = -1
        with os.fdopen(read_end, "rb") as f:
            read_end = -1
            console = f.read().decode()
    finally:
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)
    assert (result.reason, result.code) == ("poweroff", 0), (result, console)
    return [int(value, 16) for value in re.findall(r"cpuid1\.ecx=([0-9a-f]{8})", console)]


def test_the_guest_sees_the_tsc_deadline_timer_when_kvm_emulates_it(tmp_path: Path) -> None:
    assert kvm_has_tsc_deadline(), "this host's KVM has no TSC-deadline timer to offer"
    (ecx,) = guest_cpuid_ecx(tmp_path, 1)
    assert ecx & CPUID_1_ECX_HYPERVISOR, f"{ecx:#x}: the CPUID the launcher set is not in force"
    assert ecx & CPUID_1_ECX_TSC_DEADLINE, f"CPUID.1:ECX {ecx:#x} lacks the TSC-deadline bit"
