"""hosteld's side of `guest run --isolation=vm`: settings, the launcher's inputs, the channel.

The VM itself boots in the lab (lab/test_guest_run_vm.py); here, what hosteld
makes of StartGuest's settings before the launcher starts, and what it makes
of the init's frames after."""
from __future__ import annotations

import asyncio
import os
import subprocess
import threading
from pathlib import Path

import pytest
from dbus_fast import Variant

from hostel.errors import InvalidArgs
from hostel.guest import channel, initramfs, vmlauncher, vmrun
from hostel.guest.errors import GuestError
from hostel.guest.images import ImageInfo, ImageStore
from hostel.guest.images_service import (DEFAULT_VM_MEMORY_MB, INIT_STDIO, GuestRunSettings,
                                         ImageService,
                                         vm_launch)
from hostel.guest.launchconfig import LaunchRequest
from hostel.guest.manager import read_channel
from unit.test_guest_images import busybox_layer, docker_archive, image_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> ImageInfo:
    base = tmp_path_factory.mktemp("vmassembly")
    layers = [busybox_layer(("sh",)).tar()]
    archive = docker_archive(base / "image.tar", layers, image_config(layers))
    return ImageStore(base / "images").import_archive(str(archive), "small")


def _raw(**settings: Variant) -> dict[str, Variant]:
    return {"Image": Variant("s", "small"), **settings}


def test_vm_settings_are_read_with_their_defaults() -> None:
    run = GuestRunSettings.from_dbus(_raw(Isolation=Variant("s", "vm"),
                                          CPUs=Variant("u", 2), Kernel=Variant("s", "/k")))
    assert run.isolation == "vm" and run.request.isolation == "vm"
    assert (run.vm.cpus, run.vm.memory_mb, run.vm.kernel) == (2, DEFAULT_VM_MEMORY_MB, Path("/k"))
    default = GuestRunSettings.from_dbus(_raw(Isolation=Variant("s", "vm")))
    assert (default.vm.cpus, default.vm.kernel) == (1, None)


@pytest.mark.parametrize("settings,message", [
    ({"CPUs": Variant("u", 2)}, "CPUs are for isolation 'vm' only"),
    ({"MemoryMB": Variant("u", 64), "Kernel": Variant("s", "/k")},
     "MemoryMB, Kernel are for isolation 'vm' only"),
    ({"Isolation": Variant("s", "vm"), "Kernel": Variant("s", "vmlinuz")},
     "kernel path 'vmlinuz' must be absolute"),
    ({"Isolation": Variant("s", "vm"), "CPUs": Variant("s", "2")}, "'CPUs' must be of type 'u'"),
])
def test_bad_vm_settings_are_refused(settings: dict[str, Variant], message: str) -> None:
    with pytest.raises(InvalidArgs, match=message):
        GuestRunSettings.from_dbus(_raw(**settings))


def _unsquash(disk: Path, where: Path) -> Path:
    subprocess.run(["unsquashfs", "-no-progress", "-d", str(where), str(disk)], check=True,
                   capture_output=True)
    return where


def test_the_launcher_gets_read_only_disks_ports_and_the_name_as_hostname(
        image: ImageInfo, tmp_path: Path) -> None:
    subprocess.run(["make", "-s", "-C", str(REPO / "guest-init")], check=True)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    run = GuestRunSettings.from_dbus(_raw(
        Isolation=Variant("s", "vm"), CPUs=Variant("u", 2), MemoryMB=Variant("u", 128),
        Command=Variant("as", ["sh", "-c", "exit 3"]), Environment=Variant("as", ["A=b"]),
        StandardOutput=Variant("h", out_w), StandardError=Variant("h", err_w)))
    launch = vm_launch("vm-one", run, image, tmp_path / "run", cache=tmp_path / "cache")
    try:
        settings = launch.settings
        assert (settings.cpus, settings.memory_mb) == (2, 128)
        assert settings.kernel == initramfs.find_kernel().vmlinuz
        assert settings.initrd is not None and settings.initrd.parent == tmp_path / "cache"
        assert [(b.path, b.read_only) for b in settings.block] == [
            (image.squashfs, True), (tmp_path / "run" / vmrun.CONFIG_DISK, True)]
        assert settings.cmdline == f"{vmrun.kernel_cmdline()} {INIT_STDIO}"
        assert launch.channel_port == vmrun.CHANNEL_PORT
        # the launcher gets copies: the caller's descriptors stay the D-Bus message's
        assert [name for name, _fd in launch.ports] == [vmrun.STDERR_PORT]
        assert launch.console_fd not in (None, out_w) and launch.ports[0][1] != err_w
        assert os.path.samestat(os.fstat(launch.ports[0][1]), os.fstat(err_w))
        assert launch.input_fd is None and launch.client_fd is None
        tree = _unsquash(tmp_path / "run" / vmrun.CONFIG_DISK, tmp_path / "tree")
        request = LaunchRequest.from_json((tree / "launch.json").read_text())
        assert request == LaunchRequest(command=["sh", "-c", "exit 3"], env={"A": "b"},
                                        hostname="vm-one", isolation="vm")
    finally:
        launch.close()
        for fd in (out_r, out_w, err_r, err_w):
            os.close(fd)


def test_without_a_stderr_the_port_still_exists(image: ImageInfo, tmp_path: Path) -> None:
    """The init waits for its stderr port: hosteld always offers one (here to /dev/null)."""
    run = GuestRunSettings.from_dbus(_raw(Isolation=Variant("s", "vm")))
    launch = vm_launch("vm-two", run, image, tmp_path / "run", cache=tmp_path / "cache")
    try:
        (name, fd), = launch.ports
        assert name == vmrun.STDERR_PORT
        assert os.readlink(f"/proc/self/fd/{fd}") == os.devnull
    finally:
        launch.close()


def test_a_kernel_that_cannot_be_used_is_named_and_leaves_nothing(image: ImageInfo,
                                                                  tmp_path: Path) -> None:
    service = ImageService(image.squashfs.parent.parent, tmp_path / "runtime")
    raw = _raw(Isolation=Variant("s", "vm"), Kernel=Variant("s", str(tmp_path / "nokernel")))
    (tmp_path / "nokernel").mkdir()
    with pytest.raises(GuestError, match="nokernel is not a kernel directory"):
        asyncio.run(service.prepare_vm("vm-three", raw))
    assert list((tmp_path / "runtime/vm").iterdir()) == []


def _channel_with(data: bytes) -> int | None:
    r, w = os.pipe()
    writer = threading.Thread(target=lambda: (os.write(w, data), os.close(w)))
    writer.start()
    try:
        return read_channel("test", r)  # closes r
    finally:
        writer.join()


def test_the_exit_frame_gives_the_status() -> None:
    frames = (channel.encode({"type": "started", "pid": 2}) +
              channel.encode({"type": "log", "level": "warning", "message": "m"}) +
              channel.encode({"type": "exit", "code": 137}))
    assert _channel_with(frames) == 137


@pytest.mark.parametrize("data", [
    b"",                                                     # the guest died before any frame
    channel.encode({"type": "started", "pid": 2}),          # ... or before its exit frame
    channel.encode({"type": "exit", "code": "42"}),         # not a number
    b"\xff\xff\xff\xff" + b"x" * 16,                        # a frame larger than allowed
    channel.encode({"type": "exit", "code": 1})[:-1],       # cut in the middle
])
def test_no_valid_exit_frame_gives_no_status(data: bytes) -> None:
    assert _channel_with(data) is None


def test_the_launcher_ports_argument_is_checked() -> None:
    assert [(p.name, p.output_fd) for p in vmlauncher.ports_from_json(
        vmlauncher.ports_to_json([("hostel.channel", 5), ("hostel.stderr", 6)]))] == [
        ("hostel.channel", 5), ("hostel.stderr", 6)]
    for bad in ('{"a": 1}', '[["x"]]', '[["x", "5"]]', '[[5, 5]]'):
        with pytest.raises(GuestError, match="must be \\[name, fd\\] pairs"):
            vmlauncher.ports_from_json(bad)
