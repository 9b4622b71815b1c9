"""What a `guest run --isolation=vm` hands the launcher: kernel, initramfs, disks, command line.

The guest side is fixed by the static init (guest-init/): the image's
squashfs is the first virtio-blk disk (/dev/vda), a small squashfs holding
the image configuration and the launch request is the second (/dev/vdb),
virtio-console port 0 is the payload's console (/dev/hvc0) and the port
named CHANNEL_PORT carries the init's frames, the port named STDERR_PORT
the payload's fd 2 (so that stdout and stderr stay apart, as in a
container). This module builds the config
disk and the initramfs and says all of that in one value, so that the
launcher only has to attach what it is given, in the order given.

The kernel command line sets no console= on purpose: kernel messages must
not reach hvc0, which is the payload's stdout (container and VM runs of the
same image must print the same bytes); a launcher that wants the kernel's
log adds its own console (a serial port) to `extra`."""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hostel.guest import initramfs
from hostel.guest.errors import GuestError
from hostel.guest.images import ImageInfo, make_squashfs
from hostel.guest.initramfs import Kernel
from hostel.guest.launchconfig import LaunchRequest

CHANNEL_PORT = "hostel.channel"
STDERR_PORT = "hostel.stderr"
IMAGE_DEVICE = "/dev/vda"
CONFIG_DEVICE = "/dev/vdb"
CONSOLE_DEVICE = "/dev/hvc0"
CONFIG_DISK = "config.squashfs"
# quiet: nothing but warnings from the kernel; panic=-1: an init that dies
# resets the VM at once instead of hanging it.
KERNEL_ARGUMENTS = ("quiet", "panic=-1")


@dataclass(frozen=True)
class VmRun:
    """Everything a VM run needs; disks are attached read-only, in this order."""

    kernel: Path
    initrd: Path
    cmdline: str
    disks: tuple[Path, ...]      # (image, config): /dev/vda, /dev/vdb in the guest
    channel_port: str            # the virtio-console port (beyond the console) for frames


def init_arguments() -> list[str]:
    """The guest init's command line (after the kernel's "--")."""
    return ["--image-device", IMAGE_DEVICE, "--config-device", CONFIG_DEVICE,
            "--console", CONSOLE_DEVICE, "--channel", f"port:{CHANNEL_PORT}",
            "--stderr", f"port:{STDERR_PORT}"]


def kernel_cmdline(extra: tuple[str, ...] = ()) -> str:
    return " ".join([*KERNEL_ARGUMENTS, *extra, "--", *init_arguments()])


def make_config_disk(image: ImageInfo, request: LaunchRequest, where: Path) -> Path:
    """where/config.squashfs: image/config.json and launch.json, as the init reads them."""
    if request.isolation != "vm":
        raise GuestError(f"a VM's launch request must say isolation 'vm', not "
                         f"{request.isolation!r}")
    where.mkdir(parents=True, exist_ok=True)
    tree = Path(tempfile.mkdtemp(prefix=".config-tree-", dir=where))
    try:
        (tree / "image").mkdir()
        shutil.copyfile(image.config_path, tree / "image/config.json")
        (tree / "launch.json").write_text(request.to_json())
        make_squashfs(str(tree), str(where / CONFIG_DISK))
    except OSError as e:
        raise GuestError(f"cannot build the config disk in {where}: {e.strerror}") from e
    finally:
        shutil.rmtree(tree, ignore_errors=True)
    return where / CONFIG_DISK


def prepare(image: ImageInfo, request: LaunchRequest, where: Path, kernel: Kernel | None = None,
            init: Path = initramfs.DEFAULT_INIT, cache: Path = initramfs.INITRAMFS_CACHE,
            extra: tuple[str, ...] = ()) -> VmRun:
    """Check the kernel, build (or reuse) its initramfs and the config disk for this run."""
    kernel = kernel or initramfs.find_kernel()
    initrd = initramfs.build_initramfs(kernel, init, cache)
    config = make_config_disk(image, request, where)
    return VmRun(kernel.vmlinuz, initrd, kernel_cmdline(extra), (image.squashfs, config),
                 CHANNEL_PORT)
