"""Initramfs images for Debian's cloud kernel as a hostel guest: busybox, the
kernel's own virtio modules (in dependency order) and an /init that mounts
the usual file systems, writes the boot marker, loads the modules and runs a
test's script.

The marker is how boot time is measured (first KVM_RUN to the init's
marker, as Firecracker measures it): it goes to the serial console before
anything else the init does."""
from __future__ import annotations

from pathlib import Path

from lab.initramfs import Initramfs
from lab.kernels import kernel

MARKER = "hostel-init-marker"
# What a guest using every hostel device needs; virtio_ring and virtio come as
# dependencies. pvpanic_mmio lets a panicking guest say so before it resets.
CLOUD_MODULES = ["virtio_mmio", "virtio_blk", "virtio_console", "virtio_net", "virtio_rng",
                 "pvpanic_mmio"]

INIT = """#!/bin/sh
export PATH=/bin
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo %(marker)s
while read -r module; do
    insmod "/lib/modules/$module" || echo "insmod $module failed"
done < /lib/modules/load-order
. /test.sh
poweroff -f
"""


def cloud_kernel() -> Path:
    return kernel("cloud-amd64").vmlinuz


def linux_initramfs(path: Path, script: str, modules: list[str]) -> Path:
    """Write an initramfs whose /init runs `script` (sh) after loading `modules`."""
    image = Initramfs()
    image.add_console()
    image.add_busybox()
    for directory in ("/proc", "/sys", "/dev", "/tmp"):
        image.add_dir(directory)
    image.add_modules(kernel("cloud-amd64"), modules)
    image.add_file("/init", INIT % {"marker": MARKER}, 0o755)
    image.add_file("/test.sh", script, 0o755)
    return image.write(path)
