"""The image half of org.hostel1.GuestManager, and running an image in a container.

guest/service.py owns the D-Bus interface; its ImportImage, ListImages,
RemoveImage and (for settings carrying "Image") StartGuest call the
coroutines here. Imports run in a thread (they read archives and run
mksquashfs), so the event loop never waits on them.

Container isolation: the image's squashfs is attached to a read-only loop
device and, inside the container's own mount namespace, mounted with an
overlay whose upper layer is a tmpfs; the machine runtime then runs the
launch configuration (launchconfig.py, shared with the VM guest init) on
it. Writes vanish with the container; the loop device goes with it."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import stat
import tempfile
import threading
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from dbus_fast import Variant
from typing import Any, Callable, TypeVar

from hostel import native
from hostel.bus import InvalidArgs, NotImplementedYet
from hostel.guest.images import ImageInfo, ImageStore, Progress
from hostel.guest.launchconfig import LaunchRequest, Process, build_process, parse_env_list
from hostel.machine import rootfs
from hostel.machine.loop import LoopDevice
from hostel.machine.settings import MachineSettings, Stdio, machine_name_is_valid
from hostel.machine.tree import FILES_FROM_IMAGE, PreparedRoot
from hostel.spawn import Plan

log = logging.getLogger(__name__)

T = TypeVar("T")
ROOT_HOOK = "root_provider"            # MachineSettings field tree.prepare_root consults
WORKDIR_HOOK = "working_directory"     # MachineSettings field the runner chdirs to
GUEST_SETTINGS = {
    "Image": "s", "Isolation": "s", "Command": "as", "Environment": "as", "Hostname": "s",
    "Terminal": "s", "Console": "s",
    "StandardInput": "h", "StandardOutput": "h", "StandardError": "h",
}


@dataclass
class GuestRunSettings:
    """StartGuest's settings when they name an image; "vm" fits the same fields."""

    image: str
    isolation: str
    request: LaunchRequest
    terminal: str | None
    console: str | None
    stdio: Stdio

    @classmethod
    def from_dbus(cls, raw: dict[str, Any]) -> GuestRunSettings:
        values = {}
        for key, variant in raw.items():
            expected = GUEST_SETTINGS.get(key)
            if expected is None:
                raise InvalidArgs(f"unknown setting '{key}' for running an image; known: "
                                  f"{', '.join(sorted(GUEST_SETTINGS))}")
            if variant.signature != expected:
                raise InvalidArgs(f"setting '{key}' must be of type '{expected}', "
                                  f"got '{variant.signature}'")
            values[key] = variant.value
        if not values.get("Image"):
            raise InvalidArgs("setting 'Image' is required: the name of an imported image")
        request = LaunchRequest(
            command=list(values["Command"]) if values.get("Command") else None,
            env=parse_env_list(list(values.get("Environment", [])), "Environment"),
            hostname=values.get("Hostname") or None,
            isolation=values.get("Isolation") or "container")
        return cls(values["Image"], request.isolation, request, values.get("Terminal") or None,
                   values.get("Console") or None,
                   Stdio(values.get("StandardInput"), values.get("StandardOutput"),
                         values.get("StandardError")))


# Looking into an image without a mount anyone else sees ---------------------------------

def in_private_mount(squashfs: Path, work: Callable[[str], T], scratch_dir: Path) -> T:
    """Run `work(root)` with the squashfs mounted at root, in a thread of its own that
    moved to a private mount namespace: the mount is never visible, and dies with it."""
    result: list[T] = []
    failure: list[BaseException] = []

    def thread() -> None:
        try:
            native.unshare(native.CLONE_NEWNS)
            native.mount(None, "/", None, native.MS_REC | native.MS_PRIVATE)
            scratch_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
            with LoopDevice(str(squashfs), read_only=True) as loop:
                scratch = tempfile.mkdtemp(prefix="inspect-", dir=scratch_dir)
                try:
                    native.mount(loop.device, scratch, "squashfs",
                                 native.MS_RDONLY | native.MS_NODEV | native.MS_NOSUID)
                    try:
                        result.append(work(scratch))
                    finally:
                        native.umount(scratch)
                finally:
                    os.rmdir(scratch)
        except BaseException as e:  # handed to the calling thread below
            failure.append(e)

    worker = threading.Thread(target=thread, name=f"inspect {squashfs}")
    worker.start()
    worker.join()
    if failure:
        raise failure[0]
    return result[0]


def _is_file_in(root: str) -> Callable[[str], bool]:
    def is_file(path: str) -> bool:
        try:
            fd = rootfs.open_in_root(root, path)
        except OSError:
            return False
        try:
            return stat.S_ISREG(os.fstat(fd).st_mode)
        finally:
            os.close(fd)
    return is_file


def inspect_image(info: ImageInfo, request: LaunchRequest,
                  scratch_dir: Path) -> tuple[Process, dict[str, bytes | None]]:
    """The process to run (PATH resolved inside the image) and the files the runner reads."""
    image_config = info.config()

    def work(root: str) -> tuple[Process, dict[str, bytes | None]]:
        files = {p: rootfs.read_file_in_root(root, p) for p in FILES_FROM_IMAGE}
        return build_process(image_config, request, _is_file_in(root)), files

    return in_private_mount(info.squashfs, work, scratch_dir)


# The container's root -------------------------------------------------------------------

def prepare_image_root(info: ImageInfo, files: dict[str, bytes | None], runtime_dir: Path,
                       cleanup: ExitStack) -> PreparedRoot:
    """A root for the machine runtime: squashfs (read-only loop) under a tmpfs-backed overlay.

    The host only sees an empty staging directory and an attached loop
    device; the mounts are made by the plan inside the container's mount
    namespace (after / became a slave), so they die with it."""
    loop = LoopDevice(str(info.squashfs), read_only=True)
    cleanup.callback(loop.detach)
    staging = runtime_dir / "image"
    staging.mkdir(mode=0o700, parents=True, exist_ok=True)
    lower, upper, work, root = (str(staging / d) for d in ("lower", "upper", "work", "root"))

    def mount_steps(plan: Plan) -> None:
        plan.mount("tmpfs", str(staging), "tmpfs", native.MS_NODEV | native.MS_NOSUID,
                   "mode=0755")
        for path, mode in ((lower, 0o755), (upper, 0o755), (work, 0o700), (root, 0o755)):
            plan.mkdir(path, mode)
        plan.mount(loop.device, lower, "squashfs", native.MS_RDONLY | native.MS_NODEV)
        plan.mount("overlay", root, "overlay", 0,
                   f"lowerdir={lower},upperdir={upper},workdir={work}")

    return PreparedRoot(root, None, mount_steps, files, [loop.device])


def _hook_missing(name: str) -> bool:
    return name not in {f.name for f in dataclasses.fields(MachineSettings)}


def machine_settings(name: str, run: GuestRunSettings, process: Process,
                     provider: Callable[[Path, ExitStack], PreparedRoot]) -> MachineSettings:
    if _hook_missing(ROOT_HOOK):
        raise NotImplementedYet("running an image in a container needs the machine runtime "
                                f"to take a prepared root (MachineSettings.{ROOT_HOOK}); "
                                "this hosteld lacks it")
    if process.cwd != "/" and _hook_missing(WORKDIR_HOOK):
        raise NotImplementedYet(f"image {run.image} wants working directory {process.cwd}, "
                                "and this hosteld's machine runtime cannot set one")
    settings = MachineSettings(name=name, command=[process.path, *process.argv[1:]],
                               environment=process.env_list,
                               user=process.user.partition(":")[0] or None,
                               terminal=run.terminal, console=run.console, stdio=run.stdio,
                               raw={"Image": Variant("s", run.image),
                                    "Isolation": Variant("s", run.isolation)})
    setattr(settings, ROOT_HOOK, provider)
    if not _hook_missing(WORKDIR_HOOK):
        setattr(settings, WORKDIR_HOOK, process.cwd)
    return settings


def machine_name(name: str, run: GuestRunSettings) -> str:
    """The machine runtime names the host after the machine: the hostname is the name."""
    hostname = run.request.hostname
    if name and hostname and name != hostname:
        raise InvalidArgs(f"guest name {name!r} and hostname {hostname!r} differ; a container "
                          "is named after its hostname, so pass one of them or the same twice")
    chosen = name or hostname or run.image
    if not machine_name_is_valid(chosen):
        raise InvalidArgs(f"invalid guest name {chosen!r}: letters, digits, '-', '_' and '.'")
    return chosen


# The service -------------------------------------------------------------------------------

class ImageService:
    """ImportImage / ListImages / RemoveImage, and StartGuest for images in containers."""

    def __init__(self, images_dir: Path, runtime_dir: Path, runner: Any = None,
                 progress: Callable[[str, str, int, int], None] | None = None) -> None:
        self.store = ImageStore(images_dir)
        self.runtime_dir = runtime_dir
        self.runner = runner          # a hostel.machine.runner.MachineRunner
        self.progress = progress      # (image name, stage, done, total), e.g. a D-Bus signal

    def _reporter(self, name: str) -> Progress | None:
        if self.progress is None:
            return None
        loop = asyncio.get_running_loop()
        report = self.progress
        return lambda stage, done, total: loop.call_soon_threadsafe(report, name, stage, done,
                                                                    total)

    async def import_image(self, path: str, name: str) -> str:
        if not path.startswith("/"):
            raise InvalidArgs(f"image path {path!r} must be absolute")
        info = await asyncio.to_thread(self.store.import_archive, path, name,
                                       self._reporter(name or path))
        log.info("imported image %s (%s) from %s", info.name, info.digest, path)
        return info.name

    def list_images(self) -> list[list[Any]]:
        return [[i.name, i.digest, i.size] for i in self.store.list()]

    async def remove_image(self, name: str) -> None:
        """A running container keeps its image: its loop device holds the squashfs open."""
        await asyncio.to_thread(self.store.remove, name)
        log.info("removed image %s", name)

    async def run_container(self, name: str, raw: dict[str, Any]) -> str:
        """StartGuest with an "Image": the machine's object path (its ExitStatus tells the end)."""
        from hostel.machine.service import machine_path

        run = GuestRunSettings.from_dbus(raw)
        if run.isolation != "container":
            raise NotImplementedYet(f"isolation {run.isolation!r} for images is not "
                                    "implemented yet (next step: the guest init in a VM)")
        if self.runner is None:
            raise NotImplementedYet("this hosteld has no machine runtime to run images in")
        info = self.store.get(run.image)
        name = machine_name(name, run)
        process, files = await asyncio.to_thread(inspect_image, info, run.request,
                                                 self.runtime_dir / "inspect")
        settings = machine_settings(
            name, run, process,
            lambda runtime_dir, cleanup: prepare_image_root(info, files, runtime_dir, cleanup))
        # The caller's descriptors belong to the D-Bus message; the runner owns these copies.
        settings.stdio = Stdio(*(os.dup(fd) if fd is not None else None
                                 for fd in (run.stdio.stdin, run.stdio.stdout, run.stdio.stderr)))
        machine = await self.runner.start(settings)
        return machine_path(machine.name)
