"""--private-users: the uid/gid map of a container's user namespace.

Container uids 0..RANGE-1 map to host uids BASE..BASE+RANGE-1, so root in
the container is an unprivileged uid on the host. "yes" takes BASE from the
owner of the root directory (as nspawn does); "pick" (and "yes" on a
root-owned tree) chooses a free, deterministic range in nspawn's window."""
from __future__ import annotations

import errno
import hashlib
import os
import stat
from dataclasses import dataclass, field

from hostel.bus import HostelError
from hostel.machine.bind_user import BoundUser, id_map
from hostel.machine.settings import PrivateUsers

PICK_MIN = 0x00080000
PICK_MAX = 0x6FFF0000


class UidRangeUnavailable(HostelError):
    pass


def _ranges_in_use() -> list[tuple[int, int]]:
    """Host uid ranges already mapped into some user namespace (from every process)."""
    used = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            lines = open(f"/proc/{entry.name}/uid_map").read().split("\n")
        except OSError:
            continue
        for line in filter(None, lines):
            _inside, outside, count = map(int, line.split())
            if not (outside == 0 and count == 4294967295):  # the initial namespace
                used.add((outside, outside + count))
    return sorted(used)


def pick_uid_base(name: str, size: int) -> int:
    """A free base in [PICK_MIN, PICK_MAX), first tried where the name hashes to."""
    slots = (PICK_MAX - PICK_MIN) // 0x10000
    start = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") % slots
    used = _ranges_in_use()
    for i in range(slots):
        base = PICK_MIN + ((start + i) % slots) * 0x10000
        if base + size <= PICK_MAX and all(base + size <= lo or base >= hi for lo, hi in used):
            return base
    raise UidRangeUnavailable(f"no free uid range of {size} for machine {name} between "
                              f"{PICK_MIN} and {PICK_MAX}; give one with --private-users=UID:RANGE")


def uid_base(users: PrivateUsers, name: str, view: str | None) -> int:
    """The host uid that is root inside. As nspawn 252, "yes" and "pick" read it off the
    owner of the root directory (its upper 16 bits: a root chowned into a range by an
    earlier start says which); "pick" keeps it only if it lies in the window and no
    namespace maps it yet."""
    if users.base is not None:
        return users.base
    shift = root_shift(view) if view is not None else 0
    if users.mode == "root-owner" and shift != 0:
        return shift
    if users.mode == "pick" and PICK_MIN <= shift < PICK_MAX \
            and all(shift + users.range <= lo or shift >= hi for lo, hi in _ranges_in_use()):
        return shift  # chowned into this range by an earlier start
    return pick_uid_base(name, users.range)


def root_shift(root: str) -> int:
    """The uid range a root directory is owned in (its owner's upper 16 bits); nspawn
    252 refuses a root whose uid and gid disagree on it, and so does hostel."""
    st = os.stat(root)
    shift = st.st_uid & ~RANGE_MASK
    if shift != st.st_gid & ~RANGE_MASK:
        raise OwnershipError(f"UID and GID base of {root} don't match (owner {st.st_uid}:"
                             f"{st.st_gid}); chown its root directory to one range")
    return shift


def effective_ownership(given: str | None, users: PrivateUsers, view: str | None) -> str:
    """--private-users-ownership as nspawn 252 defaults it: auto with "pick", off with a
    fixed base or "yes" -- except "yes" on a tree root owns, where 252 maps the ids 1:1
    (the files are root's inside) and hostel, which never maps host root, picks a range
    instead: auto then gives the payload the same view as 252's."""
    if given is not None:
        return given
    if users.mode == "pick":
        return "auto"
    if users.mode == "root-owner" and users.base is None and view is not None \
            and root_shift(view) == 0:
        return "auto"
    return "off"


def owner_root(view: str | None, ownership: Ownership | None) -> str | None:
    """Where the root's owner is read from: its first detached mount, else the tree."""
    return ownership.root_path() if ownership is not None else view


def write_id_maps(pid: int, users: PrivateUsers, base: int, view: str | None,
                  ownership: Ownership | None = None, mode: str | None = None,
                  bound: list[BoundUser] | None = None) -> None:
    """Map the child's namespace to `base` (uid_base, chosen before the clone: hosteld
    makes the container's /dev for it), with a hole for each --bind-user user
    (bind_user.id_map), then give root inside its root as --private-users-ownership `mode`
    says (None: 252's default; see map_ownership; the child attaches the mounts only
    after this). Blocks (a chown pass walks the tree): call it from a thread."""
    effective = effective_ownership(mode, users, owner_root(view, ownership))
    for map_name, gids in (("uid_map", False), ("gid_map", True)):
        with open(f"/proc/{pid}/{map_name}", "w") as f:
            f.write(id_map(base, users.range, bound or [], gids))
    if ownership is not None:
        map_ownership(pid, base, users, ownership, effective)


# Ownership: root inside must own its root ------------------------------------------
#
# A root on disk is usually owned by host root, which the container's namespace does
# not map: everything shows as the overflow uid 65534 and root inside cannot write to
# its own /. --private-users-ownership says what to do about it, as in nspawn 252:
#   off   nothing (the payload sees the files as nobody's);
#   chown every owner (and ACL entry) in the tree is moved into the container's range,
#         keeping its lower 16 bits, so the pass also moves a tree from one range to
#         another and back; the root directory goes last, and its owner is the record
#         that the tree is done: a root already in the range is not walked again (while
#         a pass runs, the root is owned by the "busy" range, which no start takes for
#         done, so an interrupted pass is redone);
#   map   each mount of the root (a tree, an overlay's lower layer, an image's file
#         systems) is a detached mount idmapped through the container's namespace: the
#         on-disk owners stay, uid N on disk reads as N inside; an error where the file
#         system cannot, or where the root is already chowned into some range;
#   auto  map where the file system allows it and the root is not chowned, else chown.
# Where a chown is not allowed (the lower layer of an ephemeral overlay, a read-only
# image), the start fails and says why.

MOUNT_ATTR_IDMAP = 0x00100000
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
_UNSUPPORTED = (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS)
RANGE_MASK = 0xFFFF           # the part of an id a chown keeps
UID_BUSY_BASE = 0x7FFE0000    # nspawn 252's: the root's range while a chown pass runs
CHOWN_RANGE = 0x10000


class OwnershipError(HostelError):
    """A root could not be given to root in the container as the mode asks."""


def kernel_call(name: str, *args: object) -> int:
    """A system call that neither libc nor the bindings wrap (the new mount API), by
    its name as libseccomp resolves it for this architecture; OSError on failure."""
    import ctypes

    try:
        import seccomp as libseccomp
    except ImportError:
        import pyseccomp as libseccomp
    number = libseccomp.resolve_syscall(libseccomp.Arch.NATIVE, name)
    libc = ctypes.CDLL(None, use_errno=True)
    result = libc.syscall(ctypes.c_long(number), *args)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), name)
    return int(result)


def idmap_mount(mount_fd: int, pid: int) -> None:
    """Make the detached mount `mount_fd` show its files through pid's user namespace."""
    import ctypes
    import struct

    userns_fd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    try:
        attr = ctypes.create_string_buffer(struct.pack("<QQQQ", MOUNT_ATTR_IDMAP, 0, 0, userns_fd))
        kernel_call("mount_setattr", ctypes.c_int(mount_fd), b"",
                    ctypes.c_uint(AT_EMPTY_PATH | AT_RECURSIVE), attr, ctypes.c_size_t(32))
    finally:
        os.close(userns_fd)


_FSOPEN_CLOEXEC = 0x1
_FSMOUNT_CLOEXEC = 0x1
_FSCONFIG_SET_STRING = 1
_FSCONFIG_CMD_CREATE = 6
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
MOUNT_ATTR_STRICTATIME = 0x20


def fresh_mount(fstype: str, options: dict[str, str], attrs: int) -> int:
    """A new `fstype` file system mounted here in no mount namespace (fsopen, fsmount):
    its superblock belongs to hosteld's user namespace (device nodes on it open, sysfs
    shows hosteld's network namespace), and a container in a user namespace of its own
    gets it whole with Plan.attach_mount. Closing the descriptor unmounts it unless it
    was attached. OSError names the step that failed."""
    import ctypes

    context = kernel_call("fsopen", fstype.encode(), ctypes.c_uint(_FSOPEN_CLOEXEC))
    try:
        for key, value in options.items():
            kernel_call("fsconfig", ctypes.c_int(context), ctypes.c_uint(_FSCONFIG_SET_STRING),
                        key.encode(), value.encode(), ctypes.c_int(0))
        kernel_call("fsconfig", ctypes.c_int(context), ctypes.c_uint(_FSCONFIG_CMD_CREATE),
                    None, None, ctypes.c_int(0))
        return kernel_call("fsmount", ctypes.c_int(context), ctypes.c_uint(_FSMOUNT_CLOEXEC),
                           ctypes.c_uint(attrs))
    finally:
        os.close(context)


def chown_tree(view: str, base: int) -> int:
    """Move the tree into the range at `base` (see the comment above); returns how many
    entries changed, 0 for a root already in that range."""
    st = os.stat(view)
    if st.st_uid & ~RANGE_MASK != st.st_gid & ~RANGE_MASK:
        raise OwnershipError(f"Upper 16 bits of root directory UID and GID of {view} do not "
                             "match; chown its root directory to one range")
    if st.st_uid & ~RANGE_MASK == base:
        return 0
    if st.st_uid & ~RANGE_MASK != UID_BUSY_BASE:
        os.chown(view, UID_BUSY_BASE | (st.st_uid & RANGE_MASK),
                 UID_BUSY_BASE | (st.st_gid & RANGE_MASK))
    special = _special_file_systems()
    changed = 0
    directories = []
    for directory, dirs, files in os.walk(view):
        kept = []
        for name in dirs:
            path = os.path.join(directory, name)
            if os.lstat(path).st_dev in special:
                continue  # /proc, /sys and the like, mounted in the tree: not ours to chown
            kept.append(name)
            directories.append(path)
        dirs[:] = kept
        changed += sum(_shift(os.path.join(directory, name), base) for name in files)
    changed += sum(_shift(path, base) for path in reversed(directories))  # inner ones first
    return changed + _shift(view, base)


# nspawn 252 does not descend into these (their files are not on any disk).
_SPECIAL_TYPES = {"binfmt_misc", "bpf", "cgroup", "cgroup2", "debugfs", "devpts", "efivarfs",
                  "hugetlbfs", "mqueue", "proc", "pstore", "securityfs", "selinuxfs",
                  "smackfs", "sysfs", "tracefs"}


def _special_file_systems() -> set[int]:
    """The device numbers of the mounts of _SPECIAL_TYPES (from our mountinfo)."""
    devices = set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            fstype = fields[fields.index("-") + 1]
            if fstype in _SPECIAL_TYPES:
                major, minor = map(int, fields[2].split(":"))
                devices.add(os.makedev(major, minor))
    return devices


ACL_XATTRS = ("system.posix_acl_access", "system.posix_acl_default")
_ACL_USER, _ACL_GROUP = 0x02, 0x08


def _shift(path: str, base: int) -> int:
    """Move one entry's owner and its ACL's named users and groups into the range; a
    read-only subtree is left as it is, as 252 leaves it."""
    st = os.lstat(path)
    uid = base | (st.st_uid & RANGE_MASK)
    gid = base | (st.st_gid & RANGE_MASK)
    link = stat.S_ISLNK(st.st_mode)
    try:
        acls = 0 if link else _shift_acls(path, base, stat.S_ISDIR(st.st_mode))
        if (uid, gid) != (st.st_uid, st.st_gid):
            os.chown(path, uid, gid, follow_symlinks=False)
        elif not acls:
            return 0
        if not link:
            os.chmod(path, stat.S_IMODE(st.st_mode))  # chown clears set-id bits, ACLs the mask
    except OSError as exc:
        if exc.errno == errno.EROFS:
            return 0
        raise
    return 1


def _shift_acls(path: str, base: int, directory: bool) -> int:
    """Shift the ids of the named entries of the access (and a directory's default) ACL,
    kept in the kernel's xattr format: a 4-byte version, then (tag u16, perm u16, id u32)."""
    changed = 0
    for name in ACL_XATTRS[:2 if directory else 1]:
        try:
            original = os.getxattr(path, name, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in (errno.ENODATA, errno.EOPNOTSUPP):
                continue
            raise
        value = bytearray(original)
        for offset in range(4, len(value) - 7, 8):
            tag = int.from_bytes(value[offset:offset + 2], "little")
            if tag in (_ACL_USER, _ACL_GROUP):
                old = int.from_bytes(value[offset + 4:offset + 8], "little")
                value[offset + 4:offset + 8] = (base | (old & RANGE_MASK)).to_bytes(4, "little")
        if value != original:
            os.setxattr(path, name, bytes(value), follow_symlinks=False)
            changed += 1
    return changed


@dataclass
class OwnedMount:
    """One detached mount of a container's root that root inside must own.

    `chown_root` is where the files can be reached for a chown pass when the file
    system cannot be idmapped; None where chowning is not allowed, `refusal` then
    says why and what to do instead."""

    fd: int
    what: str                      # "the tree /x", "the ext2 root of image /y"
    chown_root: str | None
    refusal: str = ""

    @property
    def root_path(self) -> str:
        return mount_root_path(self.fd)


def mount_root_path(fd: int) -> str:
    """The root directory of the detached mount `fd`, as this process can reach it (the
    trailing "." makes even lstat and lchown resolve the /proc magic link)."""
    return f"/proc/self/fd/{fd}/."


@dataclass
class Ownership:
    """The mounts of a container's root, the first being its "/"."""

    mounts: list[OwnedMount] = field(default_factory=list)

    def root_path(self) -> str:
        return self.mounts[0].root_path


def map_ownership(pid: int, base: int, users: PrivateUsers, ownership: Ownership,
                  mode: str = "auto") -> list[str]:
    """Give root inside each mount of the root as `mode` says (see the comment above);
    returns how, per mount ("off", "already", "idmap" or "chown"). Must run before the
    child attaches the mounts."""
    return [_own(pid, base, users, m, mode) for m in ownership.mounts]


def _own(pid: int, base: int, users: PrivateUsers, mount: OwnedMount, mode: str) -> str:
    if mode == "off":
        return "off"
    shift = root_shift(mount.root_path)
    if shift == base and mode != "map":
        return "already"  # a recorded chown, or a root prepared for this range
    if mode == "map" and shift != 0:
        raise OwnershipError(f"UID base of {mount.what} is not zero ({shift}: it was chowned "
                             "into a range), UID mapping not supported; use "
                             "--private-users-ownership=chown or auto")
    if mode == "map" or (mode == "auto" and shift == 0):
        try:
            idmap_mount(mount.fd, pid)
            return "idmap"
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise OwnershipError(f"idmapping {mount.what} for uid base {base}: "
                                     f"{exc.strerror}") from exc
            if mode == "map":
                raise OwnershipError(f"ID mapped mounts are apparently not available for "
                                     f"{mount.what}, sorry; use --private-users-ownership="
                                     "chown or auto (they chown the tree instead)") from exc
        why = f"the file system of {mount.what} supports no idmapped mounts"
    else:
        why = f"--private-users-ownership={mode} chowns {mount.what}"
    _chown(mount, base, users, why)
    return "chown"


def _chown(mount: OwnedMount, base: int, users: PrivateUsers, why: str) -> None:
    if mount.chown_root is None:
        raise OwnershipError(f"{why}, so root in the container (host uid {base}) cannot own "
                             f"it; {mount.refusal}")
    if base & RANGE_MASK or users.range != CHOWN_RANGE:
        raise OwnershipError(f"{why}, and automatic UID/GID adjusting is only supported for "
                             "UID/GID ranges starting at multiples of 2^16 with a range of "
                             f"2^16 (not {base}:{users.range}); use --private-users=pick")
    try:
        chown_tree(mount.chown_root, base)
    except OSError as exc:
        raise OwnershipError(f"{why}, and chowning it to uid base {base} failed at "
                             f"{exc.filename}: {exc.strerror}") from exc
