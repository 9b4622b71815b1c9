"""Directory trees as container roots: templates, ephemeral roots, OS checks.

A tree belongs to its guest, so every file read from it here is resolved
inside the tree (symlinks and ".." cannot lead out to the host's files), and
nothing the guest controls is followed by the daemon in the host's view."""
from __future__ import annotations

import ctypes
import errno
import fnmatch
import os
import re
import secrets
import shutil
import stat
import subprocess
from types import TracebackType

from hostel import native
from hostel._native import lib
from hostel.bus import HostelError, InvalidArgs
from hostel.machine import userns
from hostel.machine.settings import PrivateUsers
from hostel.spawn import Plan

OS_RELEASE_PATHS = ("etc/os-release", "usr/lib/os-release")
BTRFS_SUBVOLUME_INODE = 256
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

# File systems whose "regular files" are kernel interfaces: reading them may
# block for ever (/proc/kmsg), consume state, or wait on a user-space server
# (FUSE). statfs(2) f_type values.
PSEUDO_FILESYSTEMS = {
    0x9FA0: "proc", 0x62656572: "sysfs", 0x65735546: "fuse", 0x64626720: "debugfs",
    0x74726163: "tracefs", 0x73636673: "securityfs", 0x62656570: "configfs",
    0xCAFE4A11: "bpf", 0x6165676C: "pstore", 0xDE5E81E4: "efivarfs", 0x27E0EB: "cgroup",
    0x63677270: "cgroup2",
}
MAX_TREE_FILE = 1 << 20


def open_in_root(root: str, path: str, flags: int = os.O_PATH) -> int:
    """A descriptor of `path` as seen with `root` as "/" (openat2 RESOLVE_IN_ROOT).

    The kernel resolves every component inside the tree: an absolute symlink
    or a ".." in the guest's tree ends at the tree's root, never at the
    host's, and magic links are refused. `root` itself is trusted (it may be
    /proc/PID/root, a magic link). Raises FileNotFoundError when absent."""
    fd = lib.hostel_open_beneath(os.fsencode(root), os.fsencode(path.lstrip("/")),
                                 flags | os.O_CLOEXEC, 0)
    if fd < 0:
        raise OSError(-fd, os.strerror(-fd), os.path.join(root, path.lstrip("/")))
    return fd


def exists_in_root(root: str, path: str) -> bool:
    try:
        os.close(open_in_root(root, path, os.O_PATH))
    except (FileNotFoundError, NotADirectoryError):
        return False
    return True


def readlink_in_root(root: str, path: str) -> str:
    """The target of the symlink `path` in the tree (OSError if it is none)."""
    parent, name = os.path.split(path.strip("/"))
    fd = open_in_root(root, parent, os.O_PATH | os.O_DIRECTORY)
    try:
        return os.readlink(name, dir_fd=fd)
    finally:
        os.close(fd)


def makedirs_in_root(root: str, path: str, mode: int = 0o755) -> None:
    """mkdir -p of `path` inside the tree: each component made in its parent as the
    tree resolves it, so a symlinked /var cannot make the directories on the host."""
    done = ""
    for name in [c for c in path.split("/") if c not in ("", ".")]:
        fd = open_in_root(root, done, os.O_PATH | os.O_DIRECTORY)
        try:
            os.mkdir(name, mode, dir_fd=fd)
        except FileExistsError:
            pass
        finally:
            os.close(fd)
        done = f"{done}/{name}"


def _refuse_unreadable(fd: int, where: str) -> None:
    """Only regular files on ordinary file systems are read from a tree: a FIFO or a
    device blocks or never ends, and a kernel interface bound over a file may block."""
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        raise RootfsError(f"{where} is not a regular file; refusing to read it")
    fs_type = lib.hostel_fs_type(fd)
    if fs_type in PSEUDO_FILESYSTEMS:
        raise RootfsError(f"{where} is on a {PSEUDO_FILESYSTEMS[fs_type]} file system "
                          "(a kernel interface, not a file); refusing to read it")


def read_file_in_root(root: str, path: str, max_size: int = MAX_TREE_FILE) -> bytes | None:
    """The contents of a small regular file inside `root`; None when it does not exist.

    Never blocks: the file is checked through an O_PATH descriptor before it is
    opened (non-blocking) through that very descriptor, and at most max_size
    bytes are read (a huge sparse file is refused, not read)."""
    where = f"{path} in {root}"
    try:
        handle = open_in_root(root, path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise RootfsError(f"Cannot open {where}: {e.strerror}") from e
    try:
        _refuse_unreadable(handle, where)
        if os.fstat(handle).st_size > max_size:
            raise RootfsError(f"{where} is larger than {max_size} bytes; refusing to read it")
        fd = os.open(f"/proc/self/fd/{handle}",
                     os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as e:
        raise RootfsError(f"Cannot open {where}: {e.strerror}") from e
    finally:
        os.close(handle)
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(max_size + 1)
        except OSError as e:
            raise RootfsError(f"Cannot read {where}: {e.strerror}") from e
    if len(data) > max_size:
        raise RootfsError(f"{where} is larger than {max_size} bytes; refusing to read it")
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


# Where nspawn 252 looks for the tree's libsystemd-shared-VERSION.so ("*" one directory).
_SYSTEMD_LIBRARY_DIRS = ("/lib/systemd", "/lib64/systemd", "/usr/lib/*-linux-*/systemd",
                         "/usr/lib/systemd", "/usr/lib64/systemd")
_SHARED_LIBRARY = re.compile(r"libsystemd-shared-(\d+)[^/]*\.so")


def _names_in_root(root: str, directory: str) -> list[str]:
    """The entries of the tree's `directory`, opened inside the tree (its links end at the
    tree's root); none when it cannot be opened, which for a guess is as good as empty."""
    try:
        fd = open_in_root(root, directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return []
    try:
        return os.listdir(fd)
    finally:
        os.close(fd)


def _directories_in_root(root: str, pattern: str) -> list[str]:
    """The tree's directories matching `pattern`, whose one '*' component is an fnmatch."""
    head, star, tail = pattern.partition("*")
    if not star:
        return [pattern] if exists_in_root(root, pattern) else []
    parent, prefix = head.rsplit("/", 1)
    middle, _, rest = tail.partition("/")
    return [f"{parent}/{name}/{rest}" for name in sorted(_names_in_root(root, parent))
            if fnmatch.fnmatchcase(name, f"{prefix}*{middle}")
            and exists_in_root(root, f"{parent}/{name}/{rest}")]


def systemd_version_at_least(root: str, minimum: int) -> bool:
    """Whether the tree's systemd is `minimum` or newer, guessed as nspawn 252 guesses it
    (from the version in its libsystemd-shared library's name): what decides whether a
    container gets the cgroup2 hierarchy, which an older systemd would not understand."""
    for pattern in _SYSTEMD_LIBRARY_DIRS:
        for directory in _directories_in_root(root, pattern):
            if any((m := _SHARED_LIBRARY.fullmatch(name)) and int(m.group(1)) >= minimum
                   for name in _names_in_root(root, directory)):
                return True
    return False


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


EPHEMERAL_LOWER_REFUSAL = (
    "an ephemeral container writes to an overlay and its tree is never chowned. Put the "
    "tree on a file system that supports idmapped mounts (ext4, xfs, btrfs, tmpfs), or run "
    "it without --ephemeral (the tree is then chowned into the range once).")


class EphemeralRoot:
    """A throw-away view of a tree: writes go elsewhere and vanish on exit.

    On btrfs, a snapshot next to the tree (inside it, if it is a mount point),
    removed by remove(). Elsewhere, an overlay with a tmpfs upper layer that
    the plan mounts inside the container's mount namespace, so it dies with
    the container; the host only sees an empty staging directory under
    `runtime_dir`. The plan must already have made / private (or slave).

    With `users` (--private-users) root inside must own the root without the
    tree on disk ever changing: the overlay's lower layer is a detached mount of
    the tree (`ownership`, idmapped through the container's namespace before the
    child attaches it), and the upper layer is made by the child, so what it
    writes is owned by its own uids. A snapshot is a copy: it is handed over
    the same way, and may be chowned where it cannot be idmapped."""

    def __init__(self, tree: str, runtime_dir: str, users: PrivateUsers | None = None) -> None:
        self.tree = os.path.abspath(tree)
        if not os.path.isdir(self.tree):
            raise InvalidArgs(f"Directory {tree} does not exist or is not a directory.")
        self.users = users
        self.snapshot_path: str | None = None
        self.staging: str | None = None
        self.ownership: userns.Ownership | None = None
        self.root = ""   # the container's root directory, once the plan's steps have run
        container_dir = self.tree if is_mount_point(self.tree) else os.path.dirname(self.tree)
        if can_snapshot(self.tree, container_dir):
            name = _random_child(self.tree) if container_dir == self.tree else _random_sibling(self.tree)
            snapshot(self.tree, name)
            self.snapshot_path = self.root = name
            if users is not None:  # reached through a descriptor (see tree._root_through_descriptor)
                self.root = os.path.join(runtime_dir, "root")
                os.makedirs(self.root, exist_ok=True)
                self._own(name, f"the snapshot {name} of {self.tree}", name)
        else:
            _check_overlay_path(self.tree, "Directory")
            staging = os.path.join(runtime_dir, "ephemeral")
            _check_overlay_path(staging, "Runtime directory")
            # A leftover of a crashed run is empty (its mounts died with its container).
            os.makedirs(staging, mode=0o700, exist_ok=True)
            self.staging = staging
            self.root = os.path.join(staging, "root")
            if users is not None:
                self._own(self.tree, f"the tree {self.tree} (the lower layer of an ephemeral "
                          "overlay)", None)

    def _own(self, path: str, what: str, chown_root: str | None) -> None:
        fd = native.open_tree(path)
        self.ownership = userns.Ownership([userns.OwnedMount(fd, what, chown_root,
                                                             EPHEMERAL_LOWER_REFUSAL)])

    def _mount_fd(self) -> int | None:
        return self.ownership.mounts[0].fd if self.ownership is not None else None

    def add_to_plan(self, plan: Plan) -> str:
        """Mount the overlay (or attach the snapshot) in the child; returns root."""
        fd = self._mount_fd()
        if self.staging is None:
            if fd is not None:
                plan.attach_mount(fd, self.root, f"the snapshot {self.snapshot_path}")
            return self.root
        st = os.stat(self.tree)
        upper, work, lower = (os.path.join(self.staging, d) for d in ("upper", "work", "lower"))
        plan.mount("tmpfs", self.staging, "tmpfs", native.MS_NODEV | native.MS_NOSUID,
                   "mode=0700")
        plan.mkdir(upper, stat.S_IMODE(st.st_mode))
        plan.chown(upper, *self._owner_inside(st))
        plan.mkdir(work, 0o700)
        if fd is not None:
            plan.mkdir(lower, 0o700)
            plan.attach_mount(fd, lower, f"the tree {self.tree}")
        plan.mkdir(self.root, 0o755)
        plan.mount("overlay", self.root, "overlay", 0,
                   f"lowerdir={lower if fd is not None else self.tree},upperdir={upper},"
                   f"workdir={work}")
        return self.root

    def _owner_inside(self, st: os.stat_result) -> tuple[int, int]:
        """Who owns the upper layer's root (the container's "/"), in the child's ids: the
        tree root's owner, as the idmapped lower layer shows it; a root shifted into the
        range on disk (a recorded chown) shows as root."""
        if self.users is None:
            return st.st_uid, st.st_gid
        size = self.users.range
        return (st.st_uid if st.st_uid < size else 0, st.st_gid if st.st_gid < size else 0)

    def remove(self) -> None:
        """Remove the snapshot or the staging directory; safe to call twice."""
        if self.ownership is not None:
            os.close(self.ownership.mounts[0].fd)  # unmounts it, if it was never attached
            self.ownership = None
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
