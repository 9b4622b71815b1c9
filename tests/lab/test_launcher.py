"""Debian's stock cloud kernel booted by `hostelctl guest launch` through a real
hosteld: the kernel runs our /init (busybox), whose output reaches the console
(hostelctl's stdout) and whose chosen code comes back as hostelctl's exit status.

Needs a KVM that boots stock kernels, so where the host has PVM these run in
the lab VM (nested KVM on QEMU's emulated SVM: ~45 s for the boot)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from hostel.privatebus import DaemonProcess, PrivateBus

from conftest import hostelctl
from lab.initramfs import Initramfs
from lab.kernels import kernel

HERE = Path(__file__).resolve().parent
CODE = 37
# Worked out by the guest's shell, so that only a running /init can print it
# (it is on no command line the kernel could echo).
INIT = f"""#!/bin/sh
/bin/busybox mount -t proc proc /proc
echo "lab-marker: $(( 6 * 7 )) from $(/bin/busybox cat /proc/sys/kernel/ostype) pid $$"
exec /bin/exit-code {CODE}
"""
MARKER = "lab-marker: 42 from Linux pid 1"
CMDLINE = ["console=ttyS0", "quiet", "panic=-1"]
LAUNCH_TIMEOUT = 240   # seconds; the boot takes ~15-45 s in the lab


def build_exit_code(out: Path) -> Path:
    binary = out / "exit-code"
    subprocess.run(["gcc", "-static", "-O2", "-Wall", "-o", str(binary), str(HERE / "exit_code.c")],
                   check=True, capture_output=True, timeout=120)
    return binary


def guest_initramfs(out: Path) -> Path:
    image = Initramfs()
    image.add_console()
    image.add_busybox()
    image.add_dir("/proc")
    image.add_file("/bin/exit-code", build_exit_code(out).read_bytes(), 0o755)
    image.add_file("/init", INIT, 0o755)
    return image.write(out / "initrd")


@pytest.mark.lab("kvm")
def test_cloud_kernel_runs_init_which_powers_off_with_its_code(
        private_bus: PrivateBus, hosteld: DaemonProcess, tmp_path: Path) -> None:
    cloud = kernel("cloud-amd64")
    initrd = guest_initramfs(tmp_path)
    try:
        out = hostelctl(private_bus.address, "guest", "launch", "--name", "labguest",
                        "--initrd", str(initrd), "256", str(cloud.vmlinuz), *CMDLINE,
                        timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        console = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout
        pytest.fail(f"the guest did not end within {LAUNCH_TIMEOUT} s; console:\n{console}\n"
                    f"hosteld:\n{hosteld.log()}")
    assert MARKER in out.stdout, f"console:\n{out.stdout[-3000:]}\n{out.stderr}\n{hosteld.log()}"
    assert out.returncode == CODE, f"{out.stderr}\nconsole:\n{out.stdout[-3000:]}"
