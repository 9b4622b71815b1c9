"""hostel.guest.vmrun: the plan of a VM run (its real boot: integration/test_guest_initramfs_qemu)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from hostel.guest import initramfs, vmrun
from hostel.guest.errors import GuestError
from hostel.guest.images import ImageInfo, ImageStore
from hostel.guest.launchconfig import LaunchRequest
from unit.test_guest_images import busybox_layer, docker_archive, image_config


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> ImageInfo:
    base = tmp_path_factory.mktemp("vmrun")
    layers = [busybox_layer(("sh",)).tar()]
    archive = docker_archive(base / "image.tar", layers, image_config(layers, User="user"))
    return ImageStore(base / "images").import_archive(str(archive), "small")


def _unsquash(disk: Path, where: Path) -> Path:
    subprocess.run(["unsquashfs", "-no-progress", "-d", str(where), str(disk)], check=True,
                   capture_output=True)
    return where


def test_the_config_disk_holds_what_the_init_reads(image: ImageInfo, tmp_path: Path) -> None:
    request = LaunchRequest(command=["sh", "-c", "exit 3"], env={"A": "b"}, hostname="h1",
                            isolation="vm")
    disk = vmrun.make_config_disk(image, request, tmp_path / "run")
    tree = _unsquash(disk, tmp_path / "tree")
    assert sorted(str(p.relative_to(tree)) for p in tree.rglob("*")) == [
        "image", "image/config.json", "launch.json"]
    assert (tree / "image/config.json").read_bytes() == image.config_path.read_bytes()
    assert LaunchRequest.from_json((tree / "launch.json").read_text()) == request
    assert [p.name for p in (tmp_path / "run").iterdir()] == [vmrun.CONFIG_DISK]  # no staging left


def test_a_container_request_is_not_made_into_a_vm(image: ImageInfo, tmp_path: Path) -> None:
    with pytest.raises(GuestError, match="isolation 'vm', not 'container'"):
        vmrun.make_config_disk(image, LaunchRequest(), tmp_path)


def test_prepare_names_kernel_initramfs_disks_and_channel(image: ImageInfo,
                                                           tmp_path: Path) -> None:
    subprocess.run(["make", "-s", "-C", str(Path(__file__).resolve().parents[2] / "guest-init")],
                   check=True)
    run = vmrun.prepare(image, LaunchRequest(isolation="vm"), tmp_path / "run",
                        cache=tmp_path / "cache", extra=("console=ttyS0",))
    kernel = initramfs.find_kernel()
    assert run.kernel == kernel.vmlinuz and run.initrd.parent == tmp_path / "cache"
    assert run.disks == (image.squashfs, tmp_path / "run" / vmrun.CONFIG_DISK)
    assert run.channel_port == "hostel.channel"
    kernel_part, _, init_part = run.cmdline.partition(" -- ")
    assert kernel_part.split() == ["quiet", "panic=-1", "console=ttyS0"]
    assert init_part.split() == ["--image-device", "/dev/vda", "--config-device", "/dev/vdb",
                                 "--console", "/dev/hvc0", "--channel", "port:hostel.channel",
                                 "--stderr", "port:hostel.stderr"]
