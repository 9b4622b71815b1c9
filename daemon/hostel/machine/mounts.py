"""The container's mount namespace: root, API file systems, binds, tmpfs, volatile modes.

Everything here adds steps to a Plan; the steps run in the cloned child, in
its own mount namespace, so every mount vanishes with the container and
nothing is left to unmount on the host. The order follows the seed's child
(main(), after clone): propagation, root, volatile, read-only, mount_all,
then devices (devices.py), then binds and tmpfs."""
from __future__ import annotations

import os
import platform
import stat
from dataclasses import dataclass
from typing import Callable

from hostel import native
from hostel.bus import HostelError, InvalidArgs
from hostel.machine import cgroups, devices, rootfs, userns
from hostel.machine.settings import BindMount, MachineSettings, TmpfsMount
from hostel.spawn import Plan

TTY_GID = 5
API_FLAGS = native.MS_NOSUID | native.MS_NOEXEC | native.MS_NODEV

# nspawn 252's tmpfs limits (systemd's mount-util.h), so that no container fills the
# host's memory through a file system it did not ask for: percentages are of RAM.
TMPFS_LIMITS_DEV = "size=4m,nr_inodes=64k"
TMPFS_LIMITS_SYS_FS_CGROUP = "size=4m,nr_inodes=1k"
TMPFS_LIMITS_SYS = "size=4m,nr_inodes=1k"        # /sys of a container with its own network
TMPFS_LIMITS_RUN = "size=20%,nr_inodes=800k"
TMPFS_LIMITS_NESTED = "size=10%,nr_inodes=400k"   # /dev/shm, /tmp
TMPFS_LIMITS_VAR = "size=25%,nr_inodes=1m"        # a volatile root or /var


@dataclass(frozen=True)
class ApiMount:
    """One row of the seed's mount_all table."""

    what: str | None
    where: str
    fstype: str | None
    options: str | None
    flags: int
    fatal: bool = True


# Kernel interfaces under /proc a container may read but not change, beside the seed's
# /proc/sys: what systemd-nspawn (v252, what users compare with) also makes read-only.
# Missing ones are skipped.
PROC_READ_ONLY = ("/proc/acpi", "/proc/apm", "/proc/asound", "/proc/bus",
                  "/proc/fs", "/proc/irq", "/proc/scsi", "/proc/sysrq-trigger")
# What a container with its own network namespace sees of sysfs (nspawn 252's mount_sysfs):
# enough for udev and networkd, on a read-only tmpfs /sys, and nothing of the rest (e.g.
# /sys/fs, /sys/module, /sys/firmware, /sys/power).
SYSFS_SUBTREES = ("block", "bus", "class", "dev", "devices", "kernel")


def _read_only_bind(path: str, fatal: bool) -> list[ApiMount]:
    """A read-only view of a kernel interface; nothing on it may be run, as nspawn 252 has it."""
    return [ApiMount(path, path, None, None, native.MS_BIND, fatal=fatal),
            ApiMount(None, path, None, None,
                     native.MS_BIND | native.MS_RDONLY | native.MS_REMOUNT | API_FLAGS,
                     fatal=fatal)]


def _writable_bind(path: str) -> list[ApiMount]:
    """A bind of a kernel interface the container may change, but run nothing from."""
    return [ApiMount(path, path, None, None, native.MS_BIND),
            ApiMount(None, path, None, None, native.MS_BIND | native.MS_REMOUNT | API_FLAGS)]


def api_mounts(private_network: bool) -> list[ApiMount]:
    """The seed's mount_all table, as nspawn 252 has it. A container with its own network
    namespace keeps /proc/sys/net writable (those sysctls are its own namespace's) and
    gets a read-only tmpfs /sys, which plan_netns_sysfs fills. In a user namespace /dev
    and (sharing the host's network) /sys are hosteld's detached mounts instead
    (detached_api_mounts), attached where the table mounts them."""
    entries = [ApiMount("proc", "/proc", "proc", None, API_FLAGS)]
    proc_sys = _read_only_bind("/proc/sys", fatal=True)
    if private_network:
        # One writable bind on the container's /proc and one on its read-only /proc/sys
        # bind: 252 has the two (its shared propagation copies the second onto the first).
        net = _writable_bind("/proc/sys/net")
        entries += net
        proc_sys[1:1] = net
    entries += proc_sys
    for path in PROC_READ_ONLY:
        entries += _read_only_bind(path, fatal=False)
    if private_network:
        entries.append(ApiMount("tmpfs", "/sys", "tmpfs", f"mode=555,{TMPFS_LIMITS_SYS}",
                                API_FLAGS))
    else:  # in a user namespace hosteld mounts it (detached_sysfs), the child attaches it
        entries.append(ApiMount("sysfs", "/sys", "sysfs", None, native.MS_RDONLY | API_FLAGS))
    return entries + [
        ApiMount("tmpfs", "/dev", "tmpfs", f"mode=755,{TMPFS_LIMITS_DEV}",
                 native.MS_NOSUID | native.MS_STRICTATIME),
        ApiMount("devpts", "/dev/pts", "devpts", f"newinstance,ptmxmode=0666,mode=620,gid={TTY_GID}",
                 native.MS_NOSUID | native.MS_NOEXEC),
        ApiMount("tmpfs", "/dev/shm", "tmpfs", f"mode=1777,{TMPFS_LIMITS_NESTED}",
                 native.MS_NOSUID | native.MS_NODEV | native.MS_STRICTATIME),
        ApiMount("mqueue", "/dev/mqueue", "mqueue", None, API_FLAGS),
        ApiMount("tmpfs", "/run", "tmpfs", f"mode=755,{TMPFS_LIMITS_RUN}",
                 native.MS_NOSUID | native.MS_NODEV | native.MS_STRICTATIME),
        # nspawn 252 makes /tmp a tmpfs whatever the tree has (a --read-only container gets a
        # writable /tmp); a --bind or --tmpfs on /tmp is mounted over it later.
        ApiMount("tmpfs", "/tmp", "tmpfs", f"mode=1777,{TMPFS_LIMITS_NESTED}",
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
    # The tree as the parent sees it, to decide the base file system's links (None: an image).
    view = None if settings.image else settings.directory
    if settings.volatile == "yes":
        _plan_volatile_yes(plan, root, runtime_dir, view)
        return
    if settings.volatile == "overlay":
        _plan_volatile_overlay(plan, root, runtime_dir, view)
        return
    # nspawn 252 completes the tree itself (before making it read-only): a merged-/usr tree
    # without its /bin link gets one. Not in a user namespace, whose root may not write there.
    if view is not None and settings.private_users is None:
        plan_base_filesystem(plan, root, view, lambda name: _lexists_in(view, name),
                             skip=API_MOUNT_POINTS)
    if settings.volatile == "state":
        plan.bind(root, root, readonly=True)
        mkdir_p(plan, root, "/var")
        plan.mount("tmpfs", f"{root}/var", "tmpfs", native.MS_STRICTATIME,
                   f"mode=755,{TMPFS_LIMITS_VAR}")
    elif settings.read_only:
        plan.mount(None, root, None, native.MS_BIND | native.MS_REMOUNT | native.MS_RDONLY)


def _volatile_staging(runtime_dir: str) -> str:
    """Where the volatile tmpfs is put together, made here by hosteld: a child in a user
    namespace (--private-users) may not create entries in hosteld's runtime directory."""
    staging = f"{runtime_dir}/volatile"
    os.makedirs(staging, 0o755, exist_ok=True)
    return staging


def _plan_volatile_yes(plan: Plan, root: str, runtime_dir: str, view: str | None) -> None:
    """A tmpfs root with the tree's /usr bound in read-only (the seed's setup_volatile),
    plus the base file system nspawn 252 creates, so that /bin/sh on a merged-/usr tree
    (/bin -> usr/bin) is found."""
    staging = _volatile_staging(runtime_dir)
    plan.mount("tmpfs", staging, "tmpfs", native.MS_STRICTATIME, f"mode=755,{TMPFS_LIMITS_VAR}")
    plan.mkdir(f"{staging}/usr", 0o755)
    plan.bind(f"{root}/usr", f"{staging}/usr", readonly=True)
    plan_base_filesystem(plan, staging, view, lambda name: name == "usr")
    plan.mount(staging, root, None, native.MS_MOVE)


def _overlay_path(path: str) -> str:
    """A path as overlayfs's option parser needs it: ',', ':' and '\\' escaped."""
    return "".join("\\" + c if c in ",:\\" else c for c in path)


def _plan_volatile_overlay(plan: Plan, root: str, runtime_dir: str, view: str | None) -> None:
    """nspawn 252's --volatile=overlay: the whole tree, with every change going to a tmpfs
    upper layer that vanishes with the container."""
    staging = _volatile_staging(runtime_dir)
    plan.mount("tmpfs", staging, "tmpfs", native.MS_STRICTATIME, f"mode=755,{TMPFS_LIMITS_VAR}")
    plan.mkdir(f"{staging}/upper", 0o755)
    plan.mkdir(f"{staging}/work", 0o755)
    plan.mount("overlay", root, "overlay", 0,
               f"lowerdir={_overlay_path(root)},upperdir={_overlay_path(staging + '/upper')},"
               f"workdir={_overlay_path(staging + '/work')}")
    in_tree = None if view is None else (lambda name: _lexists_in(view, name))
    plan_base_filesystem(plan, root, view, in_tree)


@dataclass(frozen=True)
class BaseEntry:
    """One entry of the base file system: a directory, or a link to the first target the
    tree has (that holds `holds`, if given)."""

    name: str
    mode: int = 0o755
    targets: tuple[str, ...] = ()
    holds: str | None = None


# What systemd 252's base_filesystem_create() makes in a root that lacks it.
BASE_FILESYSTEM = (
    BaseEntry("bin", targets=("usr/bin",)),
    BaseEntry("lib", targets=("usr/lib",)),
    BaseEntry("root", 0o750),
    BaseEntry("sbin", targets=("usr/sbin",)),
    BaseEntry("usr"),
    BaseEntry("var"),
    BaseEntry("etc"),
    BaseEntry("proc", 0o555),
    BaseEntry("sys", 0o555),
    BaseEntry("dev", 0o555),
) + ((BaseEntry("lib64", targets=("usr/lib/x86_64-linux-gnu", "usr/lib64"),
                holds="ld-linux-x86-64.so.2"),)
     if platform.machine() in ("x86_64", "i386", "i486", "i586", "i686") else ())


def _lexists_in(view: str, path: str) -> bool:
    """Whether `path` exists in the tree (a dangling link counts), looked up inside it."""
    try:
        os.close(rootfs.open_in_root(view, path, os.O_PATH | os.O_NOFOLLOW))
    except OSError:
        return False
    return True


def _link_target(entry: BaseEntry, view: str | None) -> str | None:
    """The entry's target in the tree; for an image (no view) the first plain target, since
    the parent cannot look (a link to where nothing is would mislead)."""
    if view is None:
        return entry.targets[0] if entry.holds is None else None
    for target in entry.targets:
        if _lexists_in(view, target) and (
                entry.holds is None or _lexists_in(view, f"{target}/{entry.holds}")):
            return target
    return None


# Made by the API file system steps (mode 0755, as nspawn 252's mount table makes them).
API_MOUNT_POINTS = frozenset({"proc", "sys", "dev"})


def plan_base_filesystem(plan: Plan, where: str, view: str | None,
                         present: Callable[[str], bool] | None,
                         skip: frozenset[str] = frozenset()) -> None:
    """Create the base file system at `where`, skipping what `present` says is there
    already (None: not known, so links are made best-effort)."""
    for entry in BASE_FILESYSTEM:
        if entry.name in skip or (present is not None and present(entry.name)):
            continue
        if not entry.targets:
            plan.mkdir(f"{where}/{entry.name}", entry.mode)
            continue
        target = _link_target(entry, view)
        if target is not None:
            plan.symlink(target, f"{where}/{entry.name}", best_effort=present is None)


class ApiMountFailed(HostelError):
    """hosteld could not make a container's /dev or /sys."""


def detached_sysfs() -> int:
    """A read-only sysfs (nosuid,nodev,noexec) of hosteld's network namespace, for a
    container in a user namespace that shares it: there sysfs may only be mounted by
    the owner of the network namespace, and nspawn 252 mounts it from outside too."""
    return userns.fresh_mount("sysfs", {}, userns.MOUNT_ATTR_RDONLY | userns.MOUNT_ATTR_NOSUID
                              | userns.MOUNT_ATTR_NODEV | userns.MOUNT_ATTR_NOEXEC)


def detached_api_mounts(settings: MachineSettings, base: int) -> dict[str, int]:
    """The API file systems hosteld makes for a container in a user namespace mapped
    at `base` ({where: detached mount}); the caller closes them."""
    made: dict[str, int] = {}
    try:
        made["/dev"] = devices.detached_dev(base, settings.selinux_apifs_context)
        if not settings.private_network:
            made["/sys"] = detached_sysfs()
    except OSError as e:
        close_detached(made)
        raise ApiMountFailed(f"starting machine {settings.name} failed: cannot mount "
                                 f"its API file systems ({e.filename}: {e.strerror}); "
                                 "hosteld needs the new mount API (Linux 5.2 or later)") from None
    return made


def close_detached(made: dict[str, int]) -> None:
    """Close what detached_api_mounts made (once the child has its copies: a mount it
    attached stays); safe to call twice."""
    while made:
        os.close(made.popitem()[1])


def plan_api_filesystems(plan: Plan, root: str, settings: MachineSettings,
                         runtime_dir: str, detached: dict[str, int] | None = None) -> None:
    """Mount the table's file systems; `detached`: those hosteld made (attached instead)."""
    in_userns = settings.private_users is not None
    for entry in api_mounts(settings.private_network):
        where = f"{root}{entry.where}"
        if entry.what is not None and entry.fatal:  # remounts and optional ones need no mkdir
            plan.mkdir(where, 0o755)
        options = entry.options
        if settings.selinux_apifs_context and entry.what in ("tmpfs", "devpts"):
            options = f'{options},context="{settings.selinux_apifs_context}"'
        if entry.what is not None and detached and entry.where in detached:
            plan.attach_mount(detached[entry.where], where, f"{entry.fstype} {entry.where}")
        else:
            plan.mount(entry.what, where, entry.fstype, entry.flags, options,
                       optional=not entry.fatal)
        if entry.where == "/sys" and entry.what is not None:
            if settings.private_network:
                plan_netns_sysfs(plan, root, runtime_dir)
            plan_cgroup_fs(plan, root, cgroups.current_layout(),
                           unified=wants_unified_cgroup(settings), userns=in_userns)
            if settings.private_network:
                plan.mount(None, f"{root}/sys", None,
                           native.MS_BIND | native.MS_REMOUNT | native.MS_RDONLY | API_FLAGS)


def plan_netns_sysfs(plan: Plan, root: str, runtime_dir: str) -> None:
    """sysfs's SYSFS_SUBTREES, read-only, on the tmpfs /sys, as nspawn 252's mount_sysfs.

    sysfs is mounted in the child's network namespace (its class/net shows the
    container's links) on a staging directory hosteld made outside the tree, so that
    nothing is left in /sys once it is unmounted."""
    staging = f"{runtime_dir}/sysfs"
    os.makedirs(staging, 0o755, exist_ok=True)
    plan.mount("sysfs", staging, "sysfs", API_FLAGS | native.MS_RDONLY)
    for name in SYSFS_SUBTREES:
        target = f"{root}/sys/{name}"
        plan.mkdir(target, 0o755)
        plan.mount(f"{staging}/{name}", target, None, native.MS_BIND)
        plan.mount(None, target, None,
                   native.MS_BIND | native.MS_REMOUNT | native.MS_RDONLY | API_FLAGS)
    plan.umount(staging)
    # The mount points of what comes later, made while /sys is still writable.
    mkdir_p(plan, root, "/sys/fs/cgroup")
    if os.path.isdir("/sys/fs/selinux"):
        mkdir_p(plan, root, "/sys/fs/selinux")


def wants_unified_cgroup(settings: MachineSettings) -> bool:
    """Whether a hybrid host's container gets the cgroup2 tree on /sys/fs/cgroup/unified:
    nspawn 252 gives it when the tree's systemd knows the hybrid layout (233 on), booted or
    not, and always to --as-pid2's stub init. The tree of an image is not looked at: one
    with a systemd is the common case."""
    if settings.as_pid2 or settings.image or settings.directory is None:
        return True
    return rootfs.systemd_version_at_least(settings.directory, 233)


def _hierarchy_dir(hierarchy: cgroups.Hierarchy) -> str:
    """The directory a v1 hierarchy gets under /sys/fs/cgroup: the host's name for it."""
    return os.path.basename(hierarchy.mountpoint.rstrip("/"))


def _v1_options(hierarchy: cgroups.Hierarchy) -> str:
    named = [c for c in hierarchy.controllers if c.startswith("name=")]
    return ",".join(["none", *named] if named else sorted(hierarchy.controllers))


def plan_cgroup_fs(plan: Plan, root: str, layout: cgroups.CgroupLayout, unified: bool,
                   userns: bool = False) -> None:
    """The container's /sys/fs/cgroup, as nspawn 252 mounts it (with a cgroup namespace).

    The child is already in its cgroup namespace (cgroups.CgroupJoin), so each
    mount shows the container's own cgroup as its root and nothing above it. On
    a v2-only host that is cgroup2 on /sys/fs/cgroup itself. Otherwise a small
    read-only tmpfs holds one mount per v1 hierarchy, read-only except
    name=systemd (the container's init keeps its own tree there), and, if
    `unified` (see wants_unified_cgroup), the container's cgroup2 tree on unified/.
    In a user namespace all stay writable, as 252 leaves them: what the
    namespace's root may change there is what the files' owners allow."""
    base = f"{root}/sys/fs/cgroup"
    if layout.mode == "unified":
        plan.mount("cgroup2", base, "cgroup2", API_FLAGS)
        return
    plan.mount("tmpfs", base, "tmpfs", API_FLAGS | native.MS_STRICTATIME,
               f"mode=755,{TMPFS_LIMITS_SYS_FS_CGROUP}")
    for hierarchy in layout.hierarchies:
        if hierarchy.version == 2:
            if unified:
                plan.mkdir(f"{base}/unified", 0o755)
                plan.mount("cgroup2", f"{base}/unified", "cgroup2", API_FLAGS)
            continue
        name = _hierarchy_dir(hierarchy)
        where = f"{base}/{name}"
        plan.mkdir(where, 0o755)
        plan.mount("cgroup", where, "cgroup", API_FLAGS, _v1_options(hierarchy))
        if not userns and not any(c.startswith("name=") for c in hierarchy.controllers):
            plan.mount(None, where, None, native.MS_BIND | native.MS_REMOUNT | native.MS_RDONLY
                       | API_FLAGS)
        if "," in name:  # co-mounted controllers: "cpu" -> "cpu,cpuacct", as on the host
            for controller in name.split(","):
                plan.symlink(name, f"{base}/{controller}")
    if not userns:
        plan.mount(None, base, None,
                   native.MS_REMOUNT | native.MS_RDONLY | native.MS_STRICTATIME | API_FLAGS,
                   f"mode=755,{TMPFS_LIMITS_SYS_FS_CGROUP}")


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
