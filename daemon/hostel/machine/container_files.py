"""Files into and out of a running container: machinectl copy-to, copy-from and bind.

The container's tree is hostile: its owner may plant symlinks pointing at the
host's /etc/shadow, or swap a directory for a symlink while a copy runs. So
the container side is reached only through descriptors: its root is
/proc/LEADER/root (its own mount tree, mounts and all), a path in it is
resolved by the kernel inside that root (openat2 RESOLVE_IN_ROOT, no magic
links: rootfs.open_in_root), and every entry below is opened relative to its
parent's descriptor without following symlinks. A symlink inside a copied
directory is copied as a symlink (cp -a), never read through; the top-level
source path is followed, inside the container. A destination that exists is
never written through: without `replace` it is an error, with it the entry
itself (a file or a symlink) is replaced. Kernel interfaces (proc, sysfs, ...)
are not read: they may block or never end.

Ownership follows machined 252: without a user namespace owners are kept;
with one, what goes in belongs to the container's root and what comes out to
the host's.

bind: the host path is cloned as a detached mount (open_tree), made read-only
on request (mount_setattr), and attached at the destination by a short-lived
child that joins the container's mount namespace and root (spawn.Plan).

Everything but bind's attach blocks: the D-Bus layer runs it in a thread."""
from __future__ import annotations

import asyncio
import ctypes
import os
import posixpath
import secrets
import stat
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

from hostel import native
from hostel._native import lib
from hostel.errors import HostelError, InvalidArgs, NotSupported
from hostel.machine import rootfs, userns
from hostel.spawn import Plan, StepFailed, spawn, wait_exit

MOUNT_ATTR_RDONLY = 0x1
_libc = ctypes.CDLL(None, use_errno=True)
_CHUNK = 1 << 20
Owner = Callable[[int, int], tuple[int, int]]


class CopyFailed(HostelError):
    dbus_name = "System.Error.EIO"


class DestinationExists(HostelError):
    dbus_name = "org.freedesktop.DBus.Error.FileExists"


class BindFailed(HostelError):
    dbus_name = "System.Error.EIO"


@dataclass(frozen=True)
class Copy:
    """One copy between the host and a container whose leader is `leader`."""

    leader: int
    host_path: str
    container_path: str
    replace: bool = False   # machined's MACHINE_COPY_REPLACE (machinectl --force)
    uid_shift: int = 0      # the container's user namespace base (0: none)


def check_path(path: str, what: str) -> None:
    """machined wants absolute, normalized paths on both sides."""
    if not path.startswith("/") or posixpath.normpath(path) != path.rstrip("/") or "\0" in path:
        raise InvalidArgs(f"{what} {path!r} must be absolute and normalized "
                          "(no '.', '..' or repeated '/')")


def _split(path: str, what: str) -> tuple[str, str]:
    parent, name = posixpath.split(path.rstrip("/"))
    if not name:
        raise InvalidArgs(f"{what} {path!r} names a root directory; name a path below it")
    return parent or "/", name


def _container_root(leader: int) -> str:
    return f"/proc/{leader}/root"


def _open_in_container(leader: int, path: str, flags: int) -> int:
    try:
        return rootfs.open_in_root(_container_root(leader), path, flags)
    except OSError as e:
        raise CopyFailed(f"{path} in the container: {e.strerror}") from None


def _refuse_kernel_file(fd: int, where: str) -> None:
    fs_type = lib.hostel_fs_type(fd)
    if fs_type in rootfs.PSEUDO_FILESYSTEMS:
        raise CopyFailed(f"{where} is on a {rootfs.PSEUDO_FILESYSTEMS[fs_type]} file system "
                         "(a kernel interface, not a file); refusing to copy it")


def _reopen(fd: int, flags: int) -> int:
    """A readable descriptor of what the O_PATH descriptor `fd` is (no path walked again)."""
    return os.open(f"/proc/self/fd/{fd}", flags | os.O_CLOEXEC | os.O_NOCTTY)


@contextmanager
def _fs_identity(uid: int) -> Iterator[None]:
    """Act on files as `uid` (fsuid and fsgid) in this thread only, then as root again.

    For writes into a container with a user namespace: its idmapped root refuses
    to create files for a host uid it cannot map (root), and takes its own root,
    `uid`, as the container's uid 0. setfsuid is per thread (glibc does not
    broadcast it), so the daemon's other threads keep root's identity; only
    destination-side calls run under it (the host-side source was opened as root)."""
    if not uid:
        yield
        return
    _libc.setfsgid(uid)
    _libc.setfsuid(uid)
    try:
        if _libc.setfsuid(-1) != uid:  # -1 only reports the current fsuid
            raise CopyFailed(f"Cannot act as uid {uid} (the container's root) to write there")
        yield
    finally:
        _libc.setfsuid(0)
        _libc.setfsgid(0)


def _temporary_name() -> str:
    return f".#copy-{secrets.token_hex(8)}"


class _Copier:
    """One tree copy from a source descriptor into a destination directory descriptor."""

    def __init__(self, replace: bool, owner: Owner, parent: str, side: str,
                 writer_uid: int = 0) -> None:
        self.replace = replace
        self.owner = owner
        self.dest_dirs = [parent]  # the destination directory being filled, as a path
        self.side = side           # " in the container" or " on the host"
        self.writer_uid = writer_uid  # who creates the destination's files (_fs_identity)

    def describe(self, name: str) -> str:
        """How the user knows destination entry `name`: its path, and on which side."""
        return posixpath.join(*self.dest_dirs, name) + self.side

    def node(self, src: int, dst_dir: int, name: str, where: str) -> None:
        """Copy what the O_PATH descriptor `src` is to `name` in `dst_dir`."""
        st = os.fstat(src)
        if stat.S_ISDIR(st.st_mode):
            self._directory(src, st, dst_dir, name, where)
        elif stat.S_ISREG(st.st_mode):
            self._file(src, st, dst_dir, name, where)
        else:
            self._special(st, dst_dir, name, where)

    def _exists(self, dst_dir: int, name: str) -> None:
        raise DestinationExists(f"{self.describe(name)} exists already; use --force to "
                                "replace it")

    def _finish(self, dst_dir: int, name: str, st: os.stat_result, fd: int | None) -> None:
        uid, gid = self.owner(st.st_uid, st.st_gid)
        os.chown(name, uid, gid, dir_fd=dst_dir, follow_symlinks=False)
        if fd is not None:
            os.fchmod(fd, stat.S_IMODE(st.st_mode))
        os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dst_dir,
                 follow_symlinks=False)

    def _directory(self, src: int, st: os.stat_result, dst_dir: int, name: str,
                   where: str) -> None:
        with _fs_identity(self.writer_uid):
            try:
                os.mkdir(name, 0o700, dir_fd=dst_dir)
            except FileExistsError:
                if not stat.S_ISDIR(os.stat(name, dir_fd=dst_dir,
                                            follow_symlinks=False).st_mode):
                    self._exists(dst_dir, name)  # a file or a symlink: never merged through
            dst = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=dst_dir)
        listing = _reopen(src, os.O_RDONLY | os.O_DIRECTORY)
        try:
            self.dest_dirs.append(name)
            for entry in sorted(os.listdir(listing)):
                self._child(listing, entry, dst, f"{where.rstrip('/')}/{entry}")
            self.dest_dirs.pop()
            with _fs_identity(self.writer_uid):
                self._finish(dst_dir, name, st, dst)
        finally:
            os.close(listing)
            os.close(dst)

    def _child(self, src_dir: int, name: str, dst: int, where: str) -> None:
        child = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_dir)
        try:
            st = os.fstat(child)
            if stat.S_ISLNK(st.st_mode):
                self._symlink(os.readlink(name, dir_fd=src_dir), st, dst, name)
            else:
                self.node(child, dst, name, where)
        finally:
            os.close(child)

    def _place(self, dst_dir: int, name: str, create: Callable[[str], None]) -> None:
        """Create `name` by `create(n)`; an existing entry is an error or, with replace,
        replaced by a rename (never opened, so never followed)."""
        with _fs_identity(self.writer_uid):
            self._create(dst_dir, name, create)

    def _create(self, dst_dir: int, name: str, create: Callable[[str], None]) -> None:
        if not self.replace:
            try:
                create(name)
            except FileExistsError:
                self._exists(dst_dir, name)
            return
        temporary = _temporary_name()
        create(temporary)
        try:
            os.rename(temporary, name, src_dir_fd=dst_dir, dst_dir_fd=dst_dir)
        except OSError as e:
            os.unlink(temporary, dir_fd=dst_dir)
            raise CopyFailed(f"Cannot replace {self.describe(name)}: {e.strerror}") from None

    def _file(self, src: int, st: os.stat_result, dst_dir: int, name: str, where: str) -> None:
        _refuse_kernel_file(src, where)
        reader = _reopen(src, os.O_RDONLY | os.O_NONBLOCK)
        try:
            def create(target: str) -> None:
                writer = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                 | os.O_CLOEXEC, 0o600, dir_fd=dst_dir)
                try:
                    while os.sendfile(writer, reader, None, _CHUNK):
                        pass
                    self._finish(dst_dir, target, st, writer)
                finally:
                    os.close(writer)

            self._place(dst_dir, name, create)
        finally:
            os.close(reader)

    def _symlink(self, target: str, st: os.stat_result, dst_dir: int, name: str) -> None:
        def create(entry: str) -> None:
            os.symlink(target, entry, dir_fd=dst_dir)
            self._finish(dst_dir, entry, st, None)

        self._place(dst_dir, name, create)

    def _special(self, st: os.stat_result, dst_dir: int, name: str, where: str) -> None:
        def create(entry: str) -> None:
            os.mknod(entry, stat.S_IFMT(st.st_mode) | 0o600, st.st_rdev, dir_fd=dst_dir)
            node = os.open(entry, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dst_dir)
            try:  # an O_PATH descriptor cannot fchmod; its /proc link can chmod
                os.chmod(f"/proc/self/fd/{node}", stat.S_IMODE(st.st_mode))
            finally:
                os.close(node)
            self._finish(dst_dir, entry, st, None)

        self._place(dst_dir, name, create)


def _run_copy(src: int, dst_parent: int, name: str, where: str, copier: _Copier) -> None:
    try:
        copier.node(src, dst_parent, name, where)
    except HostelError:
        raise
    except OSError as e:
        culprit = f" ({e.filename})" if e.filename else ""
        raise CopyFailed(f"Cannot copy {where}: {e.strerror}{culprit}") from None


def copy_from(request: Copy) -> None:
    """Container path -> host path."""
    check_path(request.container_path, "Container path")
    check_path(request.host_path, "Host path")
    parent, name = _split(request.host_path, "Host path")
    src = _open_in_container(request.leader, request.container_path, os.O_PATH)
    try:
        dst_parent = os.open(parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        os.close(src)
        raise CopyFailed(f"Host directory {parent}: {e.strerror}") from None
    shifted = request.uid_shift != 0

    def owner(uid: int, gid: int) -> tuple[int, int]:
        return (0, 0) if shifted else (uid, gid)

    copier = _Copier(request.replace, owner, parent, " on the host")
    try:
        _run_copy(src, dst_parent, name, f"{request.container_path} in the container", copier)
    finally:
        os.close(src)
        os.close(dst_parent)


def copy_to(request: Copy) -> None:
    """Host path -> container path."""
    check_path(request.host_path, "Host path")
    check_path(request.container_path, "Container path")
    parent, name = _split(request.container_path, "Container path")
    try:
        src = os.open(request.host_path, os.O_PATH | os.O_CLOEXEC)
    except OSError as e:
        raise CopyFailed(f"Host path {request.host_path}: {e.strerror}") from None
    try:
        dst_parent = _open_in_container(request.leader, parent, os.O_PATH | os.O_DIRECTORY)
    except HostelError:
        os.close(src)
        raise
    shift = request.uid_shift

    def owner(uid: int, gid: int) -> tuple[int, int]:
        return (shift, shift) if shift else (uid, gid)

    copier = _Copier(request.replace, owner, parent, " in the container", shift)
    try:
        _run_copy(src, dst_parent, name, request.host_path, copier)
    finally:
        os.close(src)
        os.close(dst_parent)


# bind ---------------------------------------------------------------------------


def _make_destination(leader: int, dest: str, directory: bool) -> None:
    """--mkdir: the destination and its parents, made inside the container's tree."""
    parent, name = _split(dest, "Destination path")
    root = _container_root(leader)
    try:
        rootfs.makedirs_in_root(root, parent)
        fd = rootfs.open_in_root(root, parent, os.O_PATH | os.O_DIRECTORY)
    except OSError as e:
        raise BindFailed(f"Cannot create {parent} in the container: {e.strerror}") from None
    try:
        if directory:
            os.mkdir(name, 0o755, dir_fd=fd)
        else:
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o644, dir_fd=fd))
    except FileExistsError:
        pass
    except OSError as e:
        raise BindFailed(f"Cannot create {dest} in the container: {e.strerror}") from None
    finally:
        os.close(fd)


def _make_read_only(mount_fd: int) -> None:
    attr = ctypes.create_string_buffer(struct.pack("<QQQQ", MOUNT_ATTR_RDONLY, 0, 0, 0))
    userns.kernel_call("mount_setattr", ctypes.c_int(mount_fd), b"",
                       ctypes.c_uint(userns.AT_EMPTY_PATH | userns.AT_RECURSIVE), attr,
                       ctypes.c_size_t(32))


def _detached_mount(source: str, read_only: bool) -> int:
    try:
        fd = native.open_tree(source)
    except OSError as e:
        raise BindFailed(f"Cannot clone the mount of {source}: {e.strerror}") from None
    if read_only:
        try:
            _make_read_only(fd)
        except OSError as e:
            os.close(fd)
            raise BindFailed(f"Cannot make the mount of {source} read-only: "
                             f"{e.strerror}") from None
    return fd


def prepare_bind(leader: int, source: str, dest: str, read_only: bool, mkdir: bool,
                 uid_shift: int) -> int:
    """Checks, --mkdir, and the detached mount to attach (blocking: run in a thread)."""
    check_path(source, "Source path")
    check_path(dest, "Destination path")
    if uid_shift:
        raise NotSupported("Can't bind mount on container with user namespacing applied "
                           "(as machined); use copy-to instead")
    try:
        source_is_dir = stat.S_ISDIR(os.stat(source).st_mode)
    except OSError as e:
        raise BindFailed(f"Source path {source}: {e.strerror}") from None
    if mkdir:
        _make_destination(leader, dest, source_is_dir)
    return _detached_mount(source, read_only)


def _attach_plan(leader: int, mount_fd: int, dest: str, keep: list[int]) -> Plan:
    plan = Plan()
    ns = os.open(f"/proc/{leader}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    keep.append(ns)
    root = os.open(_container_root(leader), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    keep.append(root)
    plan.setns(ns, native.CLONE_NEWNS, f"the mount namespace of pid {leader}")
    plan.fchdir(root, f"the root of pid {leader}")
    plan.chroot(".")
    plan.chdir("/")
    plan.attach_mount(mount_fd, dest, "the bind mount")
    return plan


async def attach(leader: int, mount_fd: int, source: str, dest: str) -> None:
    """Attach the detached mount at `dest` inside the container (closes mount_fd)."""
    keep: list[int] = [mount_fd]
    try:
        plan = _attach_plan(leader, mount_fd, dest, keep)
        child = await asyncio.to_thread(spawn, plan)
        try:
            await child.started()
        except StepFailed as e:
            raise BindFailed(f"Failed to mount {source} on {dest} in the container: "
                             f"{os.strerror(e.errno or 0)} (at '{e.description}'); does {dest} "
                             "exist there? (--mkdir creates it)") from None
        finally:
            await wait_exit(child.pidfd)
            child.close()
    finally:
        for fd in keep:
            os.close(fd)
