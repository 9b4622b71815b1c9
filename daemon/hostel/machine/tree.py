"""Which tree a container runs on: a directory, a template copy, an ephemeral snapshot, an image.

This joins the pieces of rootfs.py and image.py into one answer for the
runner: the root path as the child will see it, the steps that mount it (in
the child's mount namespace), where the parent can read the tree before
start (for users, timezone, os-release), and the cleanup to run at exit."""
from __future__ import annotations

import logging
import os
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from hostel import native
from hostel.bus import InvalidArgs
from hostel.machine import image, rootfs, userns
from hostel.machine.settings import MachineSettings
from hostel.spawn import Plan

log = logging.getLogger(__name__)


@dataclass
class PreparedRoot:
    root: str                         # the root path in the child, before it enters it
    view: str | None                  # readable tree on the host (None: image)
    mount_steps: Callable[[Plan], object] = lambda plan: None  # what it returns is not used
    image_files: dict[str, bytes | None] = field(default_factory=dict)
    devices: list[str] = field(default_factory=list)  # host nodes the container mounts
    ownership: userns.Ownership | None = None  # detached mounts mount_steps attaches (userns.map_ownership)

    def __post_init__(self) -> None:
        """Every step after the root's own mount steps that names a path in the tree is
        resolved inside the tree, wherever the plan builder takes it from (spawn.Plan.confine)."""
        attach = self.mount_steps

        def confined(plan: Plan) -> None:
            plan.confine(self.root)
            attach(plan)

        self.mount_steps = confined

    def read_file(self, path: str) -> bytes | None:
        """A small file of the tree (None if absent), read inside it and never blocking."""
        if self.view is None:
            return self.image_files.get(path)
        return rootfs.read_file_in_root(self.view, path)


FILES_FROM_IMAGE = ("/etc/passwd", "/etc/group", "/etc/os-release", "/usr/lib/os-release")


def _lexists_in_root(view: str, path: str) -> bool:
    try:
        os.close(rootfs.open_in_root(view, path, os.O_PATH | os.O_NOFOLLOW))
    except OSError:
        return False
    return True


def _check_binary(settings: MachineSettings, view: str) -> None:
    """The seed refuses a tree that lacks the binary to run (or /usr/bin/ at all)."""
    target = settings.command[0] if settings.command and settings.command[0].startswith("/") \
        else "/usr/bin/"
    if not settings.boot and not _lexists_in_root(view, target):
        raise InvalidArgs(f"Directory {view} lacks the binary to execute or doesn't look like "
                          "a binary tree. Refusing.")


def prepare_root(settings: MachineSettings, runtime_dir: Path, cleanup: ExitStack) -> PreparedRoot:
    if settings.root_provider is not None:
        return settings.root_provider(runtime_dir, cleanup)
    if settings.image:
        return _prepare_image(settings, runtime_dir, cleanup)
    directory = settings.directory
    assert directory is not None, "settings.determine_names gives a directory to an image-less machine"
    if settings.template:
        if rootfs.populate_from_template(settings.template, directory):
            log.info("populated %s from template %s", directory, settings.template)
        else:
            log.info("directory %s already exists, not populating from template %s",
                     directory, settings.template)
    if not os.path.isdir(directory):
        raise InvalidArgs(f"Directory {directory} does not exist; create it, or use --template=")
    rootfs.check_os_tree(directory)
    _check_binary(settings, directory)
    if settings.ephemeral:
        ephemeral = rootfs.EphemeralRoot(directory, str(runtime_dir), settings.private_users)
        cleanup.callback(ephemeral.remove)
        return PreparedRoot(ephemeral.root, directory, ephemeral.add_to_plan,
                            ownership=ephemeral.ownership)
    if settings.private_users is not None:
        return _root_through_descriptor(directory, runtime_dir, cleanup)
    return PreparedRoot(directory, directory)


def _root_through_descriptor(directory: str, runtime_dir: Path,
                             cleanup: ExitStack) -> PreparedRoot:
    """Hand the tree to the child as a detached mount, not as a path.

    In a user namespace the container's root is an unprivileged host uid,
    which may not traverse the directories above the tree (/var/lib/machines
    is 0700). The parent clones the tree's mount (open_tree) and the child
    attaches it under the runtime directory, which is world-searchable."""
    fd = native.open_tree(directory)
    cleanup.callback(os.close, fd)
    root = str(runtime_dir / "root")
    os.makedirs(root, exist_ok=True)

    def mount_steps(plan: Plan) -> None:
        plan.attach_mount(fd, root, directory)

    what = f"the tree {directory}"
    return PreparedRoot(root, directory, mount_steps,
                        ownership=userns.Ownership([userns.OwnedMount(fd, what, directory)]))


def _prepare_image(settings: MachineSettings, runtime_dir: Path, cleanup: ExitStack) -> PreparedRoot:
    assert settings.image is not None, "called for machines with an image"
    dissected = image.dissect(settings.image)
    files = image.read_files_from_image(dissected, FILES_FROM_IMAGE)
    mounts = image.attach_image(dissected, read_only=settings.read_only)
    cleanup.callback(mounts.detach)
    # A user namespace may not mount block devices: the mounts are made here, detached.
    ownership = mounts.mount_detached() if settings.private_users is not None else None
    root = str(runtime_dir / "root")
    os.makedirs(root, exist_ok=True)
    if dissected.personality is not None and settings.personality is None:
        settings.personality = dissected.personality  # an x86 root on x86-64, as the seed does
    return PreparedRoot(root, None, lambda plan: mounts.add_to_plan(plan, root), files,
                        [loop.device for loop in mounts.loops], ownership)
