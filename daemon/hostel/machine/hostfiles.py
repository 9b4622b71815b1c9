"""Files the container takes from the host: timezone, resolv.conf, machine id.

As in the seed, these are conveniences: when the tree does not allow them
(read-only, a symlinked resolv.conf) the container starts anyway. The
`view` argument is a host path where the parent can read the container's
tree before it starts (the directory, or an ephemeral snapshot's lower
tree); None for disk images, whose trees the parent cannot see. The tree is
the guest's: it is read only inside itself (rootfs.open_in_root), and the
plan's writes are resolved inside it by the trampoline (Plan.confine)."""
from __future__ import annotations

import errno
import logging
import os
import stat
import uuid as uuidlib

from hostel import native
from hostel.machine import rootfs
from hostel.spawn import Plan

log = logging.getLogger(__name__)
ZONEINFO_PREFIXES = ("../usr/share/zoneinfo/", "/usr/share/zoneinfo/")
MACHINE_ID_FILE_MAX = 4096


def _zone(link: str) -> str | None:
    for prefix in ZONEINFO_PREFIXES:
        if link.startswith(prefix):
            return link[len(prefix):]
    return None


RESOLV_CONF_SOURCES = {"host": "/etc/resolv.conf", "static": "/usr/lib/systemd/resolv.conf",
                       "uplink": "/run/systemd/resolve/resolv.conf",
                       "stub": "/run/systemd/resolve/stub-resolv.conf"}
HOST_FILE_MAX = 1024 * 1024
_RO_BIND = native.MS_BIND | native.MS_REMOUNT | native.MS_RDONLY | native.MS_NOSUID | native.MS_NODEV


def _timezone_mode(mode: str, read_only: bool) -> tuple[str, str | None]:
    """(the mode auto means here, the host's /etc/localtime link), as nspawn 252 decides."""
    if mode not in ("auto", "symlink"):
        return mode, None
    try:
        link = os.readlink("/etc/localtime")
    except FileNotFoundError:
        return ("off" if read_only else "delete") if mode == "auto" else "off", None
    except OSError as e:
        if e.errno == errno.EINVAL and mode == "auto":  # a regular file
            return ("bind" if read_only else "copy"), None
        log.warning("Failed to read host's /etc/localtime symlink, not updating container "
                    "timezone: %s", e.strerror)
        return "off", None
    return ("bind" if read_only and mode == "auto" else "symlink"), link


def plan_timezone(plan: Plan, root: str, view: str | None, name: str, mode: str = "auto",
                  read_only: bool = False, fresh_root: bool = False,
                  outside: bool = False) -> None:
    """--timezone: the container's /etc/localtime from the host's (252's modes and order:
    a symlink whose zone the tree lacks becomes a read-only bind of the host's file).

    fresh_root: the root is --volatile=yes's tmpfs, whose /etc is empty; `view` is the
    tree, whose /usr (zoneinfo) the container has. 252 creates the bind's target there.
    outside: the child is root of a user namespace that may not own the tree's /etc
    (--private-users-ownership=off): hosteld creates a missing bind target in the
    writable tree `view` itself, as 252 does from outside the namespace."""
    mode, link = _timezone_mode(mode, read_only)
    target = f"{root}/etc/localtime"
    if mode == "off":
        return
    if mode == "delete":
        plan.unlink(target, optional=True, best_effort=True)
        return
    if mode == "symlink":
        assert link is not None
        zone = _zone(link)
        if zone is None:
            log.warning("%s: /etc/localtime does not point into /usr/share/zoneinfo/, not "
                        "updating container timezone.", name)
            return
        if view is not None:
            try:
                if not fresh_root and rootfs.readlink_in_root(view, "etc/localtime") == f"../usr/share/zoneinfo/{zone}":
                    return
            except OSError:
                pass  # missing or not a link: replace it
            if rootfs.exists_in_root(view, f"usr/share/zoneinfo/{zone}"):
                plan.unlink(target, optional=True, best_effort=True)
                plan.symlink(f"../usr/share/zoneinfo/{zone}", target, best_effort=True)
                return
        mode = "bind"  # the zone is not in the tree (or cannot be checked): 252 binds then
    if mode == "bind" and _plan_ro_bind(plan, "/etc/localtime", target, view, "etc/localtime",
                                        fresh_root, outside):
        return
    data = _host_file("/etc/localtime")
    if data is not None:  # copy: a fresh file, in place of whatever was there
        plan.unlink(target, optional=True, best_effort=True)
        plan.write_file(target, data, 0o644, best_effort=True)


def _host_file(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read(HOST_FILE_MAX)
    except OSError as e:
        log.warning("Failed to read %s, not copying it into the container: %s", path, e.strerror)
        return None


def _plan_ro_bind(plan: Plan, source: str, target: str, view: str | None, inside: str,
                  fresh_root: bool = False, outside: bool = False) -> bool:
    """A read-only, nosuid, nodev bind of a host file; a missing target is created first
    (by hosteld in the tree when `outside`, see plan_timezone). Best effort, as 252's (a
    tree that has no /etc cannot have it). False, and nothing planned, when the target is
    a symlink to nothing: the bind would fail, and 252 copies. In a fresh root (see
    plan_timezone) the target is missing: created, not looked up."""
    if fresh_root:
        plan.write_file(target, b"", 0o644, truncate=False, best_effort=True)
    elif view is not None and not rootfs.exists_in_root(view, inside):
        try:
            rootfs.readlink_in_root(view, inside)
            return False
        except OSError:
            if outside:
                _create_in_tree(view, inside)
            else:
                plan.write_file(target, b"", 0o644, truncate=False, best_effort=True)
    plan.mount(source, target, None, native.MS_BIND, optional=True)
    plan.mount(None, target, None, _RO_BIND, optional=True)
    return True


def _create_in_tree(view: str, inside: str) -> None:
    """An empty file at `inside` (missing, no symlink there), created beneath the tree's
    root without following any link (the tree is the container's: hostile); best effort."""
    parent, name = os.path.split(inside)
    try:
        directory = rootfs.open_in_root(view, parent, os.O_PATH | os.O_DIRECTORY)
    except OSError:
        return  # no /etc: nothing to bind onto, as in 252
    try:
        os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o644, dir_fd=directory))
    except OSError:
        pass  # a read-only tree, or one that got the file meanwhile: the bind decides
    finally:
        os.close(directory)


def resolv_conf_mode(mode: str, private_network: bool, read_only: bool) -> str:
    """What auto means: nothing with a private network, else resolved's stub if it runs,
    else the host's file; copied into a writable tree (not through a symlink), bound into a
    read-only one."""
    if mode != "auto":
        return mode
    if private_network:
        return "off"
    kind = "stub" if os.path.exists(RESOLV_CONF_SOURCES["stub"]) else "host"
    return f"bind-{kind}" if read_only else f"copy-{kind}"


def plan_resolv_conf(plan: Plan, root: str, private_network: bool, mode: str = "auto",
                     read_only: bool = False, view: str | None = None) -> None:
    """--resolv-conf: the container's /etc/resolv.conf from the host's (252's modes)."""
    mode = resolv_conf_mode(mode, private_network, read_only)
    target = f"{root}/etc/resolv.conf"
    if mode == "off":
        return
    if mode == "delete":
        plan.unlink(target, optional=True, best_effort=True)
        return
    how, _, kind = mode.partition("-")
    source = RESOLV_CONF_SOURCES[kind]
    if how == "bind" and _plan_ro_bind(plan, source, target, view, "etc/resolv.conf"):
        return
    data = _host_file(source)
    if data is None:
        return
    if how == "replace":  # any inode there goes, a symlink too
        plan.unlink(target, optional=True, best_effort=True)
    plan.write_file(target, data, 0o644, best_effort=True)  # copy: never through a symlink


def container_machine_id(view: str | None, requested: bytes | None) -> bytes:
    """The machine's 16-byte id, as nspawn 252's setup_machine_id: the tree's own
    /etc/machine-id counts when it has one; else --uuid; else a random one."""
    if view is not None:
        try:
            data = rootfs.read_file_in_root(view, "etc/machine-id", MACHINE_ID_FILE_MAX)
            text = (data or b"").decode("ascii").strip()
            if len(text) == 32:
                return bytes.fromhex(text)
        except (rootfs.RootfsError, ValueError):
            pass  # unreadable or not an id: as if absent
    return requested or uuidlib.uuid4().bytes


def _is_empty_file(view: str, path: str) -> bool:
    try:
        fd = rootfs.open_in_root(view, path)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    return stat.S_ISREG(st.st_mode) and st.st_size == 0


def plan_machine_id(plan: Plan, root: str, view: str | None, machine_id: bytes) -> None:
    """An empty /etc/machine-id (an image prepared for first boot) gets the machine's id,
    bound over it from /run so the tree itself is not written."""
    if view is None:
        return
    if not _is_empty_file(view, "etc/machine-id"):
        return
    source = f"{root}/run/machine-id"
    plan.write_file(source, f"{machine_id.hex()}\n".encode(), 0o444)
    plan.bind(source, f"{root}/etc/machine-id", readonly=True, recursive=False)
