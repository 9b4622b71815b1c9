"""Directory trees as container roots: templates, ephemeral roots, OS checks.

A tree belongs to its guest, so every file read from it here is resolved
inside the tree (symlinks and ".." cannot lead out to the host's files), and
nothing the guest controls is followed by the daemon in the host's view."""
from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
import shutil
import stat
import subprocess
from types import TracebackType

from hostel import native
from hostel.bus import HostelError, InvalidArgs
from hostel.spawn import Plan

OS_RELEASE_PATHS = ("etc/os-release", "usr/lib/os-release")
BTRFS_SUBVOLUME_INODE = 256
_MAX_SYMLINKS = 40
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_OVERLAY_SPECIAL = frozenset(",:\\")
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

_libc = ctypes.CDLL(None, use_errno=True)


class RootfsError(HostelError):
    """Preparing a container's directory tree failed."""


# The mount table -----------------------------------------------------------------

def _unescape_mountinfo(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_table() -> list[tuple[str, str]]:
    """(mount point, filesystem type) of the calling thread's mount namespace, in order."""
    table = []
    with open("/proc/thread-self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            after = fields.index("-")
            table.append((_unescape_mountinfo(fields[4]), fields[after + 1]))
    return table


def _within(path: str, mount_point: str) -> bool:
    return path == mount_point or path.startswith(mount_point.rstrip("/") + "/")


def _covering_mount(path: str) -> tuple[str, str]:
    """(mount point, type) of the mount `path` is on; the last of stacked mounts wins."""
    real = os.path.realpath(path)
    best = ("", "")
    for mount_point, fstype in mount_table():
        if _within(real, mount_point) and len(mount_point) >= len(best[0]):
            best = (mount_point, fstype)
    return best


def filesystem_type(path: str) -> str:
    return _covering_mount(path)[1]


def is_mount_point(path: str) -> bool:
    real = os.path.realpath(path)
    return any(mount_point == real for mount_point, _ in mount_table())


# Files inside a tree -----------------------------------------------------------------

def _components(path: str) -> list[str]:
    return [c for c in path.split("/") if c not in ("", ".")]


def open_in_root(root: str, path: str) -> int:
    """An O_PATH descriptor of `path` as seen with `root` as "/".

    Walks one component at a time with O_NOFOLLOW and resolves each symlink
    itself, so an absolute symlink or a ".." in the guest's tree ends at the
    tree's root and never at the host's. Raises FileNotFoundError when absent."""
    flags = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
    # The root itself is trusted (it may be /proc/PID/root, a magic link); what is inside is not.
    stack = [os.open(root, os.O_PATH | os.O_CLOEXEC | os.O_DIRECTORY)]
    todo = _components(path)
    links = 0
    try:
        while todo:
            name = todo.pop(0)
            if name == "..":
                if len(stack) > 1:
                    os.close(stack.pop())
                continue
            fd = os.open(name, flags, dir_fd=stack[-1])
            mode = os.fstat(fd).st_mode
            if stat.S_ISLNK(mode):
                target = os.readlink(name, dir_fd=stack[-1])
                os.close(fd)
                links += 1
                if links > _MAX_SYMLINKS:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), os.path.join(root, path))
                if target.startswith("/"):
                    while len(stack) > 1:
                        os.close(stack.pop())
                todo[:0] = _components(target)
                continue
            stack.append(fd)
            if todo and not stat.S_ISDIR(mode):
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR),
                                         os.path.join(root, path))
        return stack.pop()
    finally:
        for fd in stack:
            os.close(fd)


def exists_in_root(root: str, path: str) -> bool:
    try:
        os.close(open_in_root(root, path))
    except (FileNotFoundError, NotADirectoryError):
        return False
    return True


def read_file_in_root(root: str, path: str, max_size: int = 1 << 20) -> bytes | None:
    """The contents of a small regular file inside `root`; None when it does not exist."""
    try:
        handle = open_in_root(root, path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise RootfsError(f"Cannot open {path} in {root}: {e.strerror}") from e
    try:
        if not stat.S_ISREG(os.fstat(handle).st_mode):
            raise RootfsError(f"{path} in {root} is not a regular file; refusing to read it")
        fd = os.open(f"/proc/self/fd/{handle}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(handle)
    with os.fdopen(fd, "rb") as f:
        data = f.read(max_size + 1)
    if len(data) > max_size:
        raise RootfsError(f"{path} in {root} is larger than {max_size} bytes; refusing to read it")
    return data


# os-release --------------------------------------------------------------------------

def _unquote(value: str) -> str:
    """Shell-style quoting as os-release(5) allows it: '...', "..." and backslashes."""
    out = []
    quote = ""
    chars = iter(value)
    for c in chars:
        if quote == "'":
            if c == "'":
                quote = ""
            else:
                out.append(c)
        elif c == "\\":
            nxt = next(chars, "")
            if quote == '"' and nxt not in '$"\\`':
                out.append(c)
            out.append(nxt)
        elif c in "'\"" and quote in ("", c):
            quote = "" if quote else c
        else:
            out.append(c)
    return "".join(out)


def parse_os_release(text: str) -> dict[str, str]:
    """KEY=VALUE pairs of an os-release file; comments and malformed lines are skipped."""
    fields = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if sep and _KEY.fullmatch(key):
            fields[key] = _unquote(value)
    return fields


def read_os_release(root_dir: str) -> dict[str, str]:
    """The os-release fields of the tree at `root_dir` (etc/ first, then usr/lib/)."""
    for path in OS_RELEASE_PATHS:
        data = read_file_in_root(root_dir, path, 64 << 10)
        if data is not None:
            return parse_os_release(data.decode("utf-8", errors="replace"))
    raise RootfsError(f"Directory {root_dir} has no os-release file "
                      f"({' or '.join(OS_RELEASE_PATHS)})")


def check_os_tree(directory: str, ephemeral: bool = False) -> None:
    """Refuse a tree that cannot be a container root, as nspawn does."""
    if os.path.realpath(directory) == "/" and not ephemeral:
        raise InvalidArgs("Spawning container on root directory is not supported. "
                          "Consider using --ephemeral.")
    if not os.path.isdir(directory):
        raise InvalidArgs(f"Directory {directory} does not exist or is not a directory.")
    if not any(exists_in_root(directory, p) for p in OS_RELEASE_PATHS):
        raise InvalidArgs(f"Directory {directory} doesn't look like an OS root directory "
                          "(os-release file is missing). Refusing.")


# Copies and snapshots ----------------------------------------------------------------

def _random_sibling(path: str) -> str:
    head, tail = os.path.split(os.path.abspath(path))
    return os.path.join(head, f".#{tail}{secrets.token_hex(8)}")


def _random_child(path: str) -> str:
    return os.path.join(os.path.abspath(path), f".#{secrets.token_hex(8)}")


def _rename_noreplace(source: str, target: str) -> bool:
    """Rename unless `target` exists (then False): a plain rename would replace an empty directory."""
    if _libc.renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target),
                       _RENAME_NOREPLACE) == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.EEXIST:
        return False
    raise RootfsError(f"Couldn't move {source} to {target}: {os.strerror(err)}")


def _run(argv: list[str], what: str) -> None:
    try:
        subprocess.run(argv, check=True, capture_output=True, text=True, timeout=3600)
    except FileNotFoundError as e:
        raise RootfsError(f"{what}: {argv[0]} is not installed") from e
    except subprocess.CalledProcessError as e:
        raise RootfsError(f"{what}: {e.stderr.strip() or f'{argv[0]} failed'}") from e


def is_btrfs_subvolume(path: str) -> bool:
    return (os.lstat(path).st_ino == BTRFS_SUBVOLUME_INODE
            and filesystem_type(path) == "btrfs")


def can_snapshot(source: str, target_dir: str) -> bool:
    """A btrfs snapshot works when the source is a subvolume reached through the
    same btrfs mount as the target (subvolumes have an st_dev of their own, so
    the mount is what tells)."""
    return (shutil.which("btrfs") is not None and is_btrfs_subvolume(source)
            and _covering_mount(source) == _covering_mount(target_dir))


def snapshot(source: str, target: str) -> None:
    _run(["btrfs", "subvolume", "snapshot", source, target],
         f"Couldn't create snapshot {target} from {source}")


def remove_tree(path: str) -> None:
    """Remove a copy or a snapshot made here; absent is fine."""
    if not os.path.lexists(path):
        return
    if is_btrfs_subvolume(path) and shutil.which("btrfs"):
        _run(["btrfs", "subvolume", "delete", path], f"Couldn't remove snapshot {path}")
    else:
        shutil.rmtree(path)


def populate_from_template(template: str, directory: str) -> bool:
    """Make `directory` a copy of `template`; False when it already exists.

    A btrfs snapshot when both are on one btrfs, else `cp -a --reflink=auto`
    (ownership, modes, xattrs, hard links, device nodes, symlinks; extents
    shared where the filesystem can). The copy is made under a hidden
    sibling name and renamed into place without replacing anything, so
    `directory` is either absent or complete, never half-copied."""
    if not os.path.isdir(template):
        raise InvalidArgs(f"Template {template} is not a directory.")
    if os.path.lexists(directory):
        return False
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, mode=0o755, exist_ok=True)
    scratch = _random_sibling(directory)
    populated = False
    try:
        if can_snapshot(template, parent):
            snapshot(template, scratch)
        else:
            _run(["cp", "-a", "--reflink=auto", "--no-target-directory", template, scratch],
                 f"Couldn't populate {directory} from template {template}")
        populated = _rename_noreplace(scratch, directory)
    finally:
        if not populated:
            remove_tree(scratch)
    return populated


# Ephemeral roots -----------------------------------------------------------------------

def _check_overlay_path(path: str, what: str) -> None:
    if _OVERLAY_SPECIAL & set(path):
        raise InvalidArgs(f"{what} {path} contains ',', ':' or '\\', which an overlay mount "
                          "cannot name; use a path without them.")


class EphemeralRoot:
    """A throw-away view of a tree: writes go elsewhere and vanish on exit.

    On btrfs, a snapshot next to the tree (inside it, if it is a mount point),
    removed by remove(). Elsewhere, an overlay with a tmpfs upper layer that
    the plan mounts inside the container's mount namespace, so it dies with
    the container; the host only sees an empty staging directory under
    `runtime_dir`. The plan must already have made / private (or slave)."""

    def __init__(self, tree: str, runtime_dir: str) -> None:
        self.tree = os.path.abspath(tree)
        if not os.path.isdir(self.tree):
            raise InvalidArgs(f"Directory {tree} does not exist or is not a directory.")
        self.snapshot_path: str | None = None
        self.staging: str | None = None
        self.root = ""   # the container's root directory, once the plan's steps have run
        container_dir = self.tree if is_mount_point(self.tree) else os.path.dirname(self.tree)
        if can_snapshot(self.tree, container_dir):
            name = _random_child(self.tree) if container_dir == self.tree else _random_sibling(self.tree)
            snapshot(self.tree, name)
            self.snapshot_path = self.root = name
        else:
            _check_overlay_path(self.tree, "Directory")
            staging = os.path.join(runtime_dir, "ephemeral")
            _check_overlay_path(staging, "Runtime directory")
            # A leftover of a crashed run is empty (its mounts died with its container).
            os.makedirs(staging, mode=0o700, exist_ok=True)
            self.staging = staging
            self.root = os.path.join(staging, "root")

    def add_to_plan(self, plan: Plan) -> str:
        """Mount the overlay in the child (nothing to do for a snapshot); returns root."""
        if self.staging is not None:
            st = os.stat(self.tree)
            upper, work = (os.path.join(self.staging, d) for d in ("upper", "work"))
            plan.mount("tmpfs", self.staging, "tmpfs", native.MS_NODEV | native.MS_NOSUID,
                       "mode=0700")
            plan.mkdir(upper, stat.S_IMODE(st.st_mode))
            plan.chown(upper, st.st_uid, st.st_gid)
            plan.mkdir(work, 0o700)
            plan.mkdir(self.root, 0o755)
            plan.mount("overlay", self.root, "overlay", 0,
                       f"lowerdir={self.tree},upperdir={upper},workdir={work}")
        return self.root

    def remove(self) -> None:
        """Remove the snapshot or the staging directory; safe to call twice."""
        if self.snapshot_path is not None:
            remove_tree(self.snapshot_path)
            self.snapshot_path = None
        if self.staging is not None:
            try:
                os.rmdir(self.staging)
            except FileNotFoundError:
                pass
            except OSError as e:
                raise RootfsError(f"Couldn't remove the ephemeral staging directory "
                                  f"{self.staging}: {e.strerror}") from e
            self.staging = None

    def __enter__(self) -> EphemeralRoot:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.remove()
