"""Running an imported busybox image in a container: in this process through the real
machine runtime, and through hosteld with `hostelctl guest run`."""
from __future__ import annotations

import asyncio
import dataclasses
import glob
import os
from pathlib import Path
from typing import Any, Iterator

import pytest
from dbus_fast import Variant

from hostel.bus import InvalidArgs, NoSuchObject
from hostel.guest.images_service import ROOT_HOOK, WORKDIR_HOOK, ImageService
from hostel.machine.registry import Event, Registry
from hostel.machine.runner import MachineRunner
from hostel.machine.settings import MachineSettings
from hostel.privatebus import DaemonProcess

from conftest import hostelctl
from unit.test_guest_images import (Layer, busybox_layer, docker_archive, image_config,
                                     mounted_squashfs)

FIELDS = {f.name for f in dataclasses.fields(MachineSettings)}
needs_root_hook = pytest.mark.skipif(
    ROOT_HOOK not in FIELDS, reason=f"the machine runtime has no MachineSettings.{ROOT_HOOK} "
    "hook yet (tree.prepare_root must call it): container isolation cannot start")
needs_workdir_hook = pytest.mark.skipif(
    WORKDIR_HOOK not in FIELDS, reason=f"the machine runtime has no MachineSettings."
    f"{WORKDIR_HOOK} yet: an image's WorkingDir cannot be applied")


def _image_archive(path: Path, **config: Any) -> Path:
    layers = [busybox_layer().tar()]
    return docker_archive(path, layers, image_config(layers, Env=[
        "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "FROM_IMAGE=yes"], **config))


def _loops_backed_by(path: Path) -> list[str]:
    found = []
    for backing in glob.glob("/sys/block/loop*/loop/backing_file"):
        with open(backing) as f:
            if f.read().strip().startswith(str(path)):
                found.append(backing)
    return found


def _mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(str(path))]


@dataclasses.dataclass
class Harness:
    service: ImageService
    registry: Registry
    base: Path

    async def run(self, image: str, command: list[str] | None = None,
                  **settings: Variant) -> tuple[int, str]:
        """Start the image, wait for the machine to go away; its status and output."""
        done = asyncio.get_running_loop().create_future()

        def on_event(event: Event, machine: Any, _changed: dict) -> None:
            if event is Event.REMOVED and not done.done():
                done.set_result(machine.exit_status)

        self.registry.subscribe(on_event)
        out_r, out_w = os.pipe()
        raw = {"Image": Variant("s", image), "StandardOutput": Variant("h", out_w),
               "StandardError": Variant("h", out_w), **settings}
        if command is not None:
            raw["Command"] = Variant("as", command)
        try:
            await self.service.run_container("", raw)
        finally:
            os.close(out_w)
        status = await asyncio.wait_for(done, 30)
        with os.fdopen(out_r, "rb") as f:
            return status, f.read().decode()


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    registry = Registry()
    runner = MachineRunner(registry, tmp_path / "run", tmp_path / "machines")
    yield Harness(ImageService(tmp_path / "images", tmp_path / "run", runner), registry, tmp_path)
    assert _loops_backed_by(tmp_path) == [], "a loop device was left attached"
    assert _mounts_under(tmp_path) == [], "a mount was left behind"
    assert not (tmp_path / "run/machines").exists() or not os.listdir(tmp_path / "run/machines")


@needs_root_hook
async def test_output_status_environment_and_writes(harness: Harness, tmp_path: Path) -> None:
    await harness.service.import_image(str(_image_archive(tmp_path / "a.tar")), "bb")
    status, out = await harness.run("bb", ["sh", "-c", 'echo "out:$MINE $FROM_IMAGE '
                                           '$(hostname) $(id -u)"; env | sort; '
                                           'echo x > /written; cat /written; exit 6'],
                                    Environment=Variant("as", ["MINE=mine"]),
                                    Hostname=Variant("s", "boxed"))
    # exactly launchconfig's environment: nothing of the machine runtime's own
    env = ["FROM_IMAGE=yes", "HOME=/root", "HOSTNAME=boxed", "MINE=mine",
           "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "PWD=/", "SHLVL=1"]
    assert status == 6 and out == "out:mine yes boxed 0\n" + "".join(
        f"{line}\n" for line in env) + "x\n", out
    status, out = await harness.run("bb", ["sh", "-c", "test -e /written || echo fresh"])
    assert status == 0 and out == "fresh\n"   # the last run's write died with its tmpfs
    with mounted_squashfs(harness.service.store.get("bb").squashfs, tmp_path / "m") as root:
        assert not (root / "written").exists()


@needs_root_hook
async def test_image_cmd_entrypoint_and_user(harness: Harness, tmp_path: Path) -> None:
    archive = _image_archive(tmp_path / "a.tar", Entrypoint=["echo", "entry"],
                             Cmd=["default"], User="user")
    await harness.service.import_image(str(archive), "echoer")
    assert await harness.run("echoer") == (0, "entry default\n")
    assert await harness.run("echoer", ["mine"]) == (0, "entry mine\n")
    archive = _image_archive(tmp_path / "b.tar", Cmd=["id", "-u"], User="user")
    await harness.service.import_image(str(archive), "ider")
    assert await harness.run("ider") == (0, "1000\n")


@needs_root_hook
@needs_workdir_hook
async def test_working_directory_from_the_image(harness: Harness, tmp_path: Path) -> None:
    await harness.service.import_image(str(_image_archive(tmp_path / "a.tar",
                                                          WorkingDir="/srv")), "wd")
    assert await harness.run("wd", ["pwd"]) == (0, "/srv\n")


async def test_refusals(harness: Harness, tmp_path: Path) -> None:
    await harness.service.import_image(str(_image_archive(tmp_path / "a.tar")), "bb")
    with pytest.raises(InvalidArgs, match="isolation 'vm' is not a container's"):
        await harness.service.run_container("", {"Image": Variant("s", "bb"),
                                                 "Isolation": Variant("s", "vm")})
    with pytest.raises(InvalidArgs, match="unknown setting 'Directory'"):
        await harness.service.run_container("", {"Image": Variant("s", "bb"),
                                                 "Directory": Variant("s", "/")})
    with pytest.raises(InvalidArgs, match="must be of type 'as'"):
        await harness.service.run_container("", {"Image": Variant("s", "bb"),
                                                 "Command": Variant("s", "ls")})
    with pytest.raises(InvalidArgs, match="differ"):
        await harness.service.run_container("a", {"Image": Variant("s", "bb"),
                                                  "Hostname": Variant("s", "b")})
    with pytest.raises(NoSuchObject, match="no image named 'nope'"):
        await harness.service.run_container("", {"Image": Variant("s", "nope")})


def test_hostelctl_guest_run(hosteld: DaemonProcess, tmp_path: Path) -> None:
    archive = _image_archive(tmp_path / "a.tar")
    imported = hostelctl(hosteld.address, "image", "import", str(archive), "--name", "bb")
    if "not implemented" in imported.stderr:
        pytest.skip(f"hosteld's ImportImage is not wired yet: {imported.stderr.strip()}")
    assert imported.returncode == 0, imported.stderr
    result = hostelctl(hosteld.address, "guest", "run", "--image", "bb", "--env", "K=V",
                       "--hostname", "ctl-guest", "--", "sh", "-c",
                       'echo "$K $HOSTNAME $(hostname) $(pwd)"; exit 3')
    if "not implemented" in result.stderr:
        pytest.skip(f"StartGuest with an Image is not wired yet: {result.stderr.strip()}")
    assert (result.returncode, result.stdout) == (3, "V ctl-guest ctl-guest /\n"), result.stderr
    assert "Running image bb in a container." in result.stderr
    assert _loops_backed_by(hosteld.state_dir) == []
    assert _mounts_under(hosteld.runtime_dir) == []


def test_a_missing_or_unexecutable_command_is_127_or_126(hosteld: DaemonProcess,
                                                          tmp_path: Path) -> None:
    """What the static init prints and exits with in a VM (test_guest_run_relay.py)."""
    layers = [busybox_layer(("sh",)).tar(), Layer().file("not-exec", b"#!/bin/sh\n", 0o644).tar()]
    archive = docker_archive(tmp_path / "a.tar", layers, image_config(layers, Env=["PATH=/bin"]))
    assert hostelctl(hosteld.address, "image", "import", str(archive), "--name", "bad").returncode == 0
    for command, code, message in ((["nope", "arg"], 127, "nope: No such file or directory"),
                                   (["/nope"], 127, "/nope: No such file or directory"),
                                   (["/not-exec"], 126, "/not-exec: Permission denied")):
        result = hostelctl(hosteld.address, "guest", "run", "--quiet", "--image", "bad", "--",
                           *command)
        assert (result.returncode, result.stdout, result.stderr) == \
            (code, "", f"hostel: cannot run {message}\n"), command
