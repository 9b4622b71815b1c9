"""The container's mount namespace: root, API file systems, binds, tmpfs, volatile modes.

Everything here adds steps to a Plan; the steps run in the cloned child, in
its own mount namespace, so every mount vanishes with the container and
nothing is left to unmount on the host. The order follows the seed's child
(main(), after clone): propagation, root, volatile, read-only, mount_all,
then devices (devices.py), then binds and tmpfs."""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from hostel import native
from hostel.bus import InvalidArgs
from hostel.machine.settings import BindMount, MachineSettings, TmpfsMount
from hostel.spawn import Plan

TTY_GID = 5
API_FLAGS = native.MS_NOSUID | native.MS_NOEXEC | native.MS_NODEV


@dataclass(frozen=True)
class ApiMount:
    """One row of the seed's mount_all table."""

    what: str | None
    where: str
    fstype: str | None
    options: str | None
    flags: int
    fatal: bool = True


# Kernel interfaces under /proc a container may read but not change. Beyond the
# seed's /proc/sys: what systemd-nspawn (v252, what users compare with) also
# makes read-only. Missing ones are skipped.
PROC_READ_ONLY = ("/proc/sys", "/proc/acpi", "/proc/apm", "/proc/asound", "/proc/bus",
                  "/proc/fs", "/proc/irq", "/proc/scsi", "/proc/sysrq-trigger")


def _read_only_bind(path: str, fatal: bool) -> list[ApiMount]:
    return [ApiMount(path, path, None, None, native.MS_BIND, fatal=fatal),
            ApiMount(None, path, None, None,
                     native.MS_BIND | native.MS_RDONLY | native.MS_REMOUNT, fatal=fatal)]


def api_mounts(userns_without_netns: bool) -> list[ApiMount]:
    entries = [ApiMount("proc", "/proc", "proc", None, API_FLAGS)]
    for path in PROC_READ_ONLY:
        entries += _read_only_bind(path, fatal=path == "/proc/sys")
    if userns_without_netns:  # sysfs may only be mounted by the owner of the netns
        entries += [ApiMount("/sys", "/sys", None, None, native.MS_BIND | native.MS_REC),
                    ApiMount(None, "/sys", None, None,
                             native.MS_BIND | native.MS_RDONLY | native.MS_REMOUNT)]
    else:
        entries.append(ApiMount("sysfs", "/sys", "sysfs", None, native.MS_RDONLY | API_FLAGS))
    return entries + [
        ApiMount("tmpfs", "/dev", "tmpfs", "mode=755", native.MS_NOSUID | native.MS_STRICTATIME),
        ApiMount("devpts", "/dev/pts", "devpts", f"newinstance,ptmxmode=0666,mode=620,gid={TTY_GID}",
                 native.MS_NOSUID | native.MS_NOEXEC),
        ApiMount("tmpfs", "/dev/shm", "tmpfs", "mode=1777",
                 native.MS_NOSUID | native.MS_NODEV | native.MS_STRICTATIME),
        ApiMount("mqueue", "/dev/mqueue", "mqueue", None, API_FLAGS),
        ApiMount("tmpfs", "/run", "tmpfs", "mode=755",
                 native.MS_NOSUID | native.MS_NODEV | native.MS_STRICTATIME),
        *_read_only_bind("/sys/fs/selinux", fatal=False),
    ]


def mkdir_p(plan: Plan, root: str, path: str, mode: int = 0o755) -> None:
    """Create `path` (absolute, inside the container) and its parents below `root`."""
    current = root
    for part in [p for p in path.split("/") if p]:
        current = os.path.join(current, part)
        plan.mkdir(current, mode)


def plan_root(plan: Plan, root: str, settings: MachineSettings, runtime_dir: str) -> None:
    """Make `root` a mount of its own, then apply --volatile and --read-only."""
    plan.mount(root, root, None, native.MS_BIND | native.MS_REC)
    if settings.volatile == "yes":
        _plan_volatile_yes(plan, root, runtime_dir)
    elif settings.volatile == "state":
        plan.bind(root, root, readonly=True)
        mkdir_p(plan, root, "/var")
        plan.mount("tmpfs", f"{root}/var", "tmpfs", native.MS_STRICTATIME, "mode=755")
    elif settings.read_only:
        plan.mount(None, root, None, native.MS_BIND | native.MS_REMOUNT | native.MS_RDONLY)


def _plan_volatile_yes(plan: Plan, root: str, runtime_dir: str) -> None:
    """A tmpfs root with the tree's /usr bound in read-only (the seed's setup_volatile)."""
    staging = f"{runtime_dir}/volatile"
    plan.mkdir(staging, 0o755)
    plan.mount("tmpfs", staging, "tmpfs", native.MS_STRICTATIME, "mode=755")
    plan.mkdir(f"{staging}/usr", 0o755)
    plan.bind(f"{root}/usr", f"{staging}/usr", readonly=True)
    plan.mount(staging, root, None, native.MS_MOVE)


def plan_api_filesystems(plan: Plan, root: str, settings: MachineSettings) -> None:
    userns_without_netns = settings.private_users is not None and not settings.private_network
    for entry in api_mounts(userns_without_netns):
        where = f"{root}{entry.where}"
        if entry.what is not None and entry.fatal:  # remounts and optional ones need no mkdir
            plan.mkdir(where, 0o755)
        options = entry.options
        if settings.selinux_apifs_context and entry.what in ("tmpfs", "devpts"):
            options = f'{options},context="{settings.selinux_apifs_context}"'
        plan.mount(entry.what, where, entry.fstype, entry.flags, options,
                   optional=not entry.fatal)


def _mount_point_step(plan: Plan, root: str, bind: BindMount) -> None:
    """Create the bind's mount point with the source's type, refusing device nodes as the seed does."""
    try:
        st = os.stat(bind.source)
    except FileNotFoundError:
        raise InvalidArgs(f"Failed to stat {bind.source}: no such file or directory "
                          f"(--bind{'-ro' if bind.read_only else ''} source)") from None
    where = f"{root}{bind.destination}"
    mkdir_p(plan, root, os.path.dirname(bind.destination))
    if stat.S_ISDIR(st.st_mode):
        plan.mkdir(where, 0o755)
    elif stat.S_ISREG(st.st_mode):
        plan.write_file(where, b"", 0o644, truncate=False)
    elif stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode):
        kind = stat.S_IFIFO if stat.S_ISFIFO(st.st_mode) else stat.S_IFSOCK
        plan.mknod(where, kind | 0o644, 0)
    else:
        raise InvalidArgs(f"Refusing to create mountpoint for file: {bind.source} "
                          "(device nodes cannot be bind targets)")


def plan_binds(plan: Plan, root: str, binds: list[BindMount]) -> None:
    for bind in binds:
        _mount_point_step(plan, root, bind)
        plan.bind(bind.source, f"{root}{bind.destination}", readonly=bind.read_only,
                  recursive=True)


def plan_tmpfs(plan: Plan, root: str, mounts: list[TmpfsMount]) -> None:
    for tmpfs in mounts:
        mkdir_p(plan, root, tmpfs.path)
        plan.mount("tmpfs", f"{root}{tmpfs.path}", "tmpfs",
                   native.MS_NODEV | native.MS_STRICTATIME, tmpfs.options)


def plan_boot_id(plan: Plan, root: str) -> None:
    """A fresh boot id per container boot, over /proc/sys/kernel/random/boot_id."""
    import uuid

    source = f"{root}/dev/proc-sys-kernel-random-boot-id"
    plan.write_file(source, f"{uuid.uuid4()}\n".encode(), 0o444)
    target = f"{root}/proc/sys/kernel/random/boot_id"
    plan.mount(source, target, None, native.MS_BIND)
    plan.mount(None, target, None, native.MS_BIND | native.MS_REMOUNT | native.MS_RDONLY)
    plan.unlink(source)  # the mount keeps the file; /dev need not show it


def plan_enter_root(plan: Plan, root: str) -> None:
    """Move the root over / and chroot into it, as the seed does."""
    plan.chdir(root)
    plan.mount(root, "/", None, native.MS_MOVE)
    plan.chroot(".")
    plan.chdir("/")
