"""The machine pool's images as machined 252 sees them: list, inspect, clone, rename,
mark read-only, remove.

An image is a tree (type "directory", or "subvolume" on btrfs) or a NAME.raw disk
image in one of the pool's directories (machine/pool.py decides which ones and
how NAME is found). The numbers are machined's: a raw image's usage is its
allocated blocks and its limit its size; a tree's usage and limit are unknown
(2^64-1) unless btrfs quotas say otherwise, which hostel does not set, so limits
answer NotSupported as machined does off btrfs. Read-only is the immutable
flag on a tree's top directory (a tree's own mode would change the container)
and the write bits of a raw image, as machined keeps them.

Everything here blocks (copies, removals): the D-Bus layer runs it in a thread.
The pool's directories are the host administrator's, so their entries are
trusted to be what they are; a tree's contents are copied with `cp -a`, which
never follows the symlinks inside it."""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import secrets
import stat
import struct
import subprocess
from dataclasses import dataclass
from typing import Iterable

from hostel.errors import HostelError, InvalidArgs, NotSupported
from hostel.machine import pool, rootfs

UNKNOWN = 2**64 - 1
SETTINGS_SUFFIX = ".nspawn"
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_IMMUTABLE_FL = 0x00000010
_STATX_BTIME = 0x800
_AT_FDCWD = -100
_libc = ctypes.CDLL(None, use_errno=True)


class NoSuchImage(HostelError):
    dbus_name = "org.freedesktop.machine1.NoSuchImage"


class ImageBusy(HostelError):
    dbus_name = "System.Error.EBUSY"  # what sd-bus makes of machined's EBUSY


class ImageExists(HostelError):
    dbus_name = "org.freedesktop.DBus.Error.FileExists"


class ImageFailed(HostelError):
    dbus_name = "System.Error.EIO"


@dataclass(frozen=True)
class Image:
    """One image with the properties of org.freedesktop.machine1.Image."""

    name: str
    path: str
    type: str                 # "directory", "subvolume" or "raw"
    read_only: bool
    crtime_us: int            # 0: the file system keeps no birth time
    mtime_us: int
    usage: int
    usage_exclusive: int
    limit: int
    limit_exclusive: int

    @property
    def settings_file(self) -> str:
        """NAME.nspawn beside the image, which travels with it (clone, rename, remove)."""
        return os.path.join(os.path.dirname(self.path), self.name + SETTINGS_SUFFIX)


def _birth_time_us(path: str) -> int:
    """statx's btime (Python 3.11 has no os.statx); 0 where the file system has none."""
    buf = ctypes.create_string_buffer(256)
    if _libc.statx(_AT_FDCWD, os.fsencode(path), 0, _STATX_BTIME, buf) != 0:
        return 0
    mask = struct.unpack_from("<I", buf.raw, 0)[0]
    if not mask & _STATX_BTIME:
        return 0
    seconds, nanoseconds = struct.unpack_from("<qI", buf.raw, 80)
    return seconds * 1_000_000 + nanoseconds // 1000


def _inode_flags(path: str) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        return struct.unpack("l", fcntl.ioctl(fd, FS_IOC_GETFLAGS, struct.pack("l", 0)))[0]
    except OSError:
        return 0  # no inode flags on this file system: never immutable
    finally:
        os.close(fd)


def _set_immutable(path: str, on: bool) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_DIRECTORY)
    try:
        flags = struct.unpack("l", fcntl.ioctl(fd, FS_IOC_GETFLAGS, struct.pack("l", 0)))[0]
        flags = flags | FS_IMMUTABLE_FL if on else flags & ~FS_IMMUTABLE_FL
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("l", flags))
    except OSError as e:
        if e.errno in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL):
            raise NotSupported(f"{path}: its file system has no immutable flag, which is how a "
                               "tree is marked read-only off btrfs") from None
        raise ImageFailed(f"Couldn't change the immutable flag of {path}: {e.strerror}") from None
    finally:
        os.close(fd)


def _on_read_only_fs(path: str) -> bool:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)


def image_of(entry: pool.PoolEntry) -> Image:
    """The properties of a pool entry, read now."""
    st = os.stat(entry.root)
    mtime_us = st.st_mtime_ns // 1000
    if entry.directory:
        subvolume = rootfs.is_btrfs_subvolume(entry.directory)
        read_only = (_on_read_only_fs(entry.directory)
                     or bool(_inode_flags(entry.directory) & FS_IMMUTABLE_FL))
        return Image(entry.name, entry.directory, "subvolume" if subvolume else "directory",
                     read_only, _birth_time_us(entry.directory), mtime_us,
                     UNKNOWN, UNKNOWN, UNKNOWN, UNKNOWN)
    read_only = not st.st_mode & 0o222 or _on_read_only_fs(entry.root)
    usage = st.st_blocks * 512
    return Image(entry.name, entry.root, "raw", read_only, _birth_time_us(entry.root),
                 mtime_us, usage, usage, st.st_size, st.st_size)


def _entries(pool_dir: str) -> Iterable[pool.PoolEntry]:
    try:
        names = sorted(os.listdir(pool_dir))
    except FileNotFoundError:
        return
    for filename in names:
        name = filename[:-len(pool.RAW_SUFFIX)] if filename.endswith(pool.RAW_SUFFIX) else filename
        if not pool.name_is_poolable(name):
            continue  # hidden entries, and the ".#" temporaries of a clone in progress
        try:
            entry = pool.find(name, [pool_dir])
        except pool.NotInPool:
            continue  # a NAME.nspawn, a socket, ...
        if os.path.basename(entry.root) == filename:
            yield entry


def discover(dirs: list[str]) -> list[Image]:
    """Every image in the pool, sorted by name; a name in an earlier directory hides
    the same name further down the list, as the search order finds it."""
    found: dict[str, Image] = {}
    for pool_dir in dirs:
        for entry in _entries(pool_dir):
            if entry.name not in found:
                try:
                    found[entry.name] = image_of(entry)
                except FileNotFoundError:
                    continue  # removed while we looked
    return [found[name] for name in sorted(found)]


def find(name: str, dirs: list[str]) -> Image:
    try:
        return image_of(pool.find(name, dirs))
    except pool.NotInPool as e:
        raise NoSuchImage(str(e)) from None
    except FileNotFoundError:
        raise NoSuchImage(f"image {name!r} disappeared while it was being read") from None


def check_new_name(name: str) -> None:
    """machined's image_name_is_valid, plus the pool's own rule (nothing hidden)."""
    valid = (pool.name_is_poolable(name) and len(name.encode()) <= 255 - len(pool.RAW_SUFFIX)
             and name.isprintable() and not name.endswith((pool.RAW_SUFFIX, SETTINGS_SUFFIX)))
    if not valid:
        raise InvalidArgs(f"Image name {name!r} is invalid: use a file name without '/', "
                          f"control characters or a leading '.', not ending in "
                          f"{pool.RAW_SUFFIX} or {SETTINGS_SUFFIX}")


def _refuse_existing(new_name: str, dirs: list[str]) -> None:
    try:
        other = pool.find(new_name, dirs)
    except pool.NotInPool:
        return
    raise ImageExists(f"an image named {new_name!r} exists already: {other.root}")


def refuse_if_busy(image: Image, users: list[str], action: str) -> None:
    """`users`: running machines whose root is this image."""
    if users:
        raise ImageBusy(f"Cannot {action} image {image.name!r}: it is in use by running "
                        f"machine{'s' if len(users) > 1 else ''} {', '.join(users)}; "
                        "stop it first (machinectl poweroff or terminate)")


def _rename_noreplace(source: str, target: str) -> None:
    if _libc.renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), 1) == 0:
        return
    err = ctypes.get_errno()
    if err == errno.EEXIST:
        raise ImageExists(f"{target} exists already")
    raise ImageFailed(f"Couldn't rename {source} to {target}: {os.strerror(err)}")


def _copy(source: str, target: str) -> None:
    """cp -a with reflinks where the file system has them; a raw image stays sparse."""
    result = subprocess.run(["cp", "-a", "--reflink=auto", "--sparse=always", "--", source, target],
                            capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise ImageFailed(f"Couldn't copy {source} to {target}: "
                          f"{result.stderr.strip() or 'cp failed'}")


def _target_path(image: Image, new_name: str, directory: str) -> str:
    return os.path.join(directory, new_name + (pool.RAW_SUFFIX if image.type == "raw" else ""))


def clone(image: Image, new_name: str, read_only: bool, dirs: list[str]) -> str:
    """Copy the image (a btrfs snapshot where it can) to NEW_NAME in the first pool
    directory, as machined clones into /var/lib/machines; its .nspawn file too."""
    check_new_name(new_name)
    _refuse_existing(new_name, dirs)
    target_dir = dirs[0]
    os.makedirs(target_dir, 0o700, exist_ok=True)
    target = _target_path(image, new_name, target_dir)
    temporary = os.path.join(target_dir, f".#clone-{secrets.token_hex(8)}")
    try:
        if image.type == "subvolume" and rootfs.can_snapshot(image.path, target_dir):
            rootfs.snapshot(image.path, temporary)
        else:
            _copy(image.path, temporary)
        if image.type == "directory" and _inode_flags(temporary) & FS_IMMUTABLE_FL:
            _set_immutable(temporary, False)  # cp -a keeps no flags, but a snapshot may
        _rename_noreplace(temporary, target)
    except BaseException:
        _remove_path(temporary)
        raise
    if os.path.isfile(image.settings_file):
        _copy(image.settings_file, os.path.join(target_dir, new_name + SETTINGS_SUFFIX))
    if read_only:
        mark_read_only(find(new_name, [target_dir]), True)
    return target


def rename(image: Image, new_name: str, dirs: list[str]) -> str:
    """Rename in place (its .nspawn file with it); a read-only tree stays read-only."""
    check_new_name(new_name)
    _refuse_existing(new_name, dirs)
    target = _target_path(image, new_name, os.path.dirname(image.path))
    immutable = image.type == "directory" and bool(_inode_flags(image.path) & FS_IMMUTABLE_FL)
    if immutable:
        _set_immutable(image.path, False)
    try:
        _rename_noreplace(image.path, target)
    finally:
        if immutable:
            _set_immutable(target if os.path.isdir(target) else image.path, True)
    if os.path.isfile(image.settings_file):
        _rename_noreplace(image.settings_file,
                          os.path.join(os.path.dirname(target), new_name + SETTINGS_SUFFIX))
    return target


def mark_read_only(image: Image, read_only: bool) -> None:
    if image.type == "subvolume":
        result = subprocess.run(["btrfs", "property", "set", "-ts", image.path, "ro",
                                 "true" if read_only else "false"],
                                capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            raise ImageFailed(f"Couldn't mark {image.path} read-only: {result.stderr.strip()}")
    elif image.type == "directory":
        _set_immutable(image.path, read_only)
    else:
        mode = stat.S_IMODE(os.stat(image.path).st_mode)
        os.chmod(image.path, (mode & 0o444) | (0 if read_only else 0o200))


def _remove_path(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        if _inode_flags(path) & FS_IMMUTABLE_FL:
            _set_immutable(path, False)
        rootfs.remove_tree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def remove(image: Image) -> None:
    """Remove the image (read-only ones too, as machined does) and its .nspawn file."""
    try:
        _remove_path(image.path)
        if os.path.isfile(image.settings_file):
            os.unlink(image.settings_file)
    except OSError as e:
        raise ImageFailed(f"Couldn't remove image {image.name!r} ({image.path}): "
                          f"{e.strerror}") from None


def set_limit(image: Image | None, size: int) -> None:
    """Quotas are btrfs qgroups in machined, and hostel sets none: what machined answers
    off btrfs, for the pool and every image."""
    what = "the pool" if image is None else f"image {image.name!r} ({image.type})"
    raise NotSupported(f"Cannot set a size limit on {what}: quota is only supported on btrfs "
                       "subvolumes, and hostel does not manage btrfs quotas")


def _refuse_raw(image: Image) -> None:
    if image.type == "raw":
        raise NotSupported(f"image {image.name!r} is a raw disk image: hostel reads the "
                           "metadata of trees only (machined would mount the image)")


def _tree_text(image: Image, path: str) -> str | None:
    """A small file of the tree, resolved inside it (its symlinks may point anywhere)."""
    _refuse_raw(image)
    data = rootfs.read_file_in_root(image.path, path, 64 << 10)
    return None if data is None else data.decode("utf-8", errors="replace")


def hostname(image: Image) -> str:
    """/etc/hostname of a tree ("" without one), read inside the tree."""
    text = _tree_text(image, "/etc/hostname") or ""
    return next((line.strip() for line in text.splitlines()
                 if line.strip() and not line.startswith("#")), "")


def machine_id(image: Image) -> bytes:
    """/etc/machine-id as 16 bytes; empty when absent or not an id."""
    text = (_tree_text(image, "/etc/machine-id") or "").strip()
    try:
        return bytes.fromhex(text) if len(text) == 32 else b""
    except ValueError:
        return b""


def machine_info(image: Image) -> dict[str, str]:
    return rootfs.parse_os_release(_tree_text(image, "/etc/machine-info") or "")


def os_release(image: Image) -> dict[str, str]:
    _refuse_raw(image)
    try:
        return rootfs.read_os_release(image.path)
    except rootfs.RootfsError:
        return {}


def paths_equal(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.normpath(a) == os.path.normpath(b)

