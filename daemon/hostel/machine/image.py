"""Disk images as container roots: dissect, attach, mount inside the container.

An image is either a bare filesystem or a GPT disk laid out after the
Discoverable Partitions Specification. Both are read here in Python (the
superblock magics and the GPT with its checksums), so dissecting an image
needs neither libblkid nor udev, and never attaches anything. Attaching makes
one loop device per used partition; the mounts themselves are plan steps run
in the container's mount namespace, so they vanish with the container and
the daemon only has loop devices to release afterwards."""
from __future__ import annotations

import os
import platform
import stat
import struct
import tempfile
import threading
import uuid
import zlib
from contextlib import ExitStack
from dataclasses import dataclass, field
from types import TracebackType
from typing import Iterable

from hostel import native
from hostel.bus import InvalidArgs
from hostel.machine import userns
from hostel.machine.loop import LoopDevice, LoopError
from hostel.machine.rootfs import read_file_in_root
from hostel.spawn import Plan

SPEC_NOTE = ("Note that the disk image needs to follow the Discoverable Partitions Specification "
             "(https://uapi-group.org/specifications/specs/discoverable_partitions_specification/) "
             "to be supported.")

GPT_ROOT_X86_64 = uuid.UUID("4f68bce3-e8cd-4db1-96e7-fbcaf984b709")
GPT_ROOT_X86 = uuid.UUID("44479540-f297-41b2-9af7-d131d5f0458a")
GPT_ROOT_ARM64 = uuid.UUID("b921b045-1df0-41c3-af44-4c6f280d3fae")
GPT_ROOT_ARM = uuid.UUID("69dad710-2ce4-4e3c-b16c-21a1d49abed3")
GPT_HOME = uuid.UUID("933ac7e1-2eb4-4f13-b844-0e14e2aef915")
GPT_SRV = uuid.UUID("3b8f8425-20e0-4f3b-907f-1a25a76f98e8")

GPT_FLAG_READ_ONLY = 1 << 60
GPT_FLAG_NO_AUTO = 1 << 63

PER_LINUX32 = 0x0008

# machine -> (native root type, secondary root type needing PER_LINUX32)
_ROOT_TYPES = {
    "x86_64": (GPT_ROOT_X86_64, GPT_ROOT_X86),
    "aarch64": (GPT_ROOT_ARM64, GPT_ROOT_ARM),
}
_MOUNT_POINTS = {GPT_HOME: "/home", GPT_SRV: "/srv"}

# Filesystems that can only be mounted read-only.
READ_ONLY_FILESYSTEMS = frozenset({"squashfs", "erofs", "iso9660"})

_GPT_SIGNATURE = b"EFI PART"
_GPT_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
_GPT_ENTRY = struct.Struct("<16s16sQQQ72s")
_MAX_ENTRY_ARRAY = 4 << 20
_SECTOR_SIZES = (512, 4096)
_PROBE_SIZE = 0x10000 + 0x1000  # up to and including btrfs's superblock at 64 KiB


class ImageError(InvalidArgs):
    """The image cannot serve as a container root; the message says why."""


# Superblocks -------------------------------------------------------------------

def _ext_type(block: bytes) -> str | None:
    sb = block[1024:2048]
    if len(sb) < 0x68 or sb[0x38:0x3A] != b"\x53\xef":
        return None
    compat, incompat, ro_compat = struct.unpack_from("<III", sb, 0x5C)
    ext3_incompat = 0x2 | 0x4 | 0x8 | 0x10   # filetype, recover, journal_dev, meta_bg
    ext3_ro_compat = 0x1 | 0x2 | 0x4         # sparse_super, large_file, btree_dir
    if incompat & ~ext3_incompat or ro_compat & ~ext3_ro_compat:
        return "ext4"
    return "ext3" if compat & 0x4 else "ext2"


def _vfat(block: bytes) -> bool:
    if len(block) < 512 or block[510:512] != b"\x55\xaa" or block[0] not in (0xEB, 0xE9):
        return False
    sector_size = struct.unpack_from("<H", block, 0x0B)[0]
    fat_name = block[0x36:0x39] == b"FAT" or block[0x52:0x57] == b"FAT32"
    return fat_name and sector_size in (512, 1024, 2048, 4096)


def probe_filesystem(block: bytes) -> str | None:
    """The filesystem type (blkid's name) whose superblock starts `block`, if known."""
    if block[:6] == b"LUKS\xba\xbe":
        return "crypto_LUKS"
    if block[:4] == b"XFSB":
        return "xfs"
    if block[:4] == b"hsqs":
        return "squashfs"
    if block[0x10040:0x10048] == b"_BHRfS_M":
        return "btrfs"
    if block[1024:1028] == b"\xe2\xe1\xf5\xe0":
        return "erofs"
    if block[0x8001:0x8006] == b"CD001":
        return "iso9660"
    if (ext := _ext_type(block)) is not None:
        return ext
    if _vfat(block):
        return "vfat"
    return None


# Dissection --------------------------------------------------------------------

@dataclass(frozen=True)
class Partition:
    """A filesystem of the image: a GPT partition, or the whole of a bare image."""

    mount_point: str       # "/", "/home" or "/srv" inside the container
    fstype: str
    offset: int            # bytes from the start of the image
    size: int              # bytes
    number: int = 0        # GPT partition number; 0 for a bare filesystem
    type_uuid: uuid.UUID | None = None
    read_only: bool = False   # GPT attribute bit 60, or a read-only filesystem


@dataclass(frozen=True)
class DissectedImage:
    path: str
    size: int
    is_block_device: bool
    partition_table: str | None   # "gpt", or None for a bare filesystem
    root: Partition
    home: Partition | None = None
    srv: Partition | None = None
    personality: int | None = None   # PER_LINUX32 for a secondary-architecture root

    @property
    def partitions(self) -> list[Partition]:
        return [p for p in (self.root, self.home, self.srv) if p is not None]


@dataclass(frozen=True)
class _Entry:
    number: int
    type_uuid: uuid.UUID
    first_lba: int
    last_lba: int
    attributes: int


def _read_at(fd: int, offset: int, size: int) -> bytes:
    chunks = []
    while size > 0:
        chunk = os.pread(fd, size, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _has_protective_mbr(mbr: bytes) -> bool:
    if len(mbr) < 512 or mbr[510:512] != b"\x55\xaa":
        return False
    return any(mbr[446 + 16 * i + 4] == 0xEE for i in range(4))


def _has_mbr_partitions(mbr: bytes) -> bool:
    if len(mbr) < 512 or mbr[510:512] != b"\x55\xaa":
        return False
    return any(mbr[446 + 16 * i + 4] != 0 for i in range(4))


class _GptReader:
    """Reads and checks one GPT, falling back to the backup header like blkid does."""

    def __init__(self, path: str, fd: int, size: int, sector: int) -> None:
        self.path, self.fd, self.size, self.sector = path, fd, size, sector

    def entries(self) -> list[_Entry]:
        problems = []
        for lba in (1, self.size // self.sector - 1):
            try:
                return self._entries_from(lba)
            except ImageError as e:
                problems.append(str(e))
        raise ImageError(f"Image {self.path} has no valid GUID Partition Table: "
                         + "; ".join(problems) + ". The image is damaged or truncated.")

    def _entries_from(self, lba: int) -> list[_Entry]:
        where = "primary" if lba == 1 else "backup"
        raw = _read_at(self.fd, lba * self.sector, self.sector)
        if len(raw) < _GPT_HEADER.size or raw[:8] != _GPT_SIGNATURE:
            raise ImageError(f"{where} GPT header at LBA {lba} is missing")
        (_, _, header_size, header_crc, _, current, _, first_usable, last_usable, _,
         entries_lba, count, entry_size, entries_crc) = _GPT_HEADER.unpack_from(raw)
        if not _GPT_HEADER.size <= header_size <= self.sector:
            raise ImageError(f"{where} GPT header has an invalid size {header_size}")
        check = bytearray(raw[:header_size])
        check[16:20] = bytes(4)
        if zlib.crc32(check) != header_crc:
            raise ImageError(f"{where} GPT header CRC32 mismatch")
        if current != lba:
            raise ImageError(f"{where} GPT header claims to be at LBA {current}, not {lba}")
        if entry_size < _GPT_ENTRY.size or entry_size % 128 or count * entry_size > _MAX_ENTRY_ARRAY:
            raise ImageError(f"{where} GPT has an invalid partition entry array "
                             f"({count} entries of {entry_size} bytes)")
        array = _read_at(self.fd, entries_lba * self.sector, count * entry_size)
        if len(array) != count * entry_size:
            raise ImageError(f"{where} GPT partition entry array is cut short")
        if zlib.crc32(array) != entries_crc:
            raise ImageError(f"{where} GPT partition entry array CRC32 mismatch")
        return self._parse(array, count, entry_size, first_usable, last_usable)

    def _parse(self, array: bytes, count: int, entry_size: int,
               first_usable: int, last_usable: int) -> list[_Entry]:
        entries = []
        for i in range(count):
            type_raw, _, first, last, attributes, _ = _GPT_ENTRY.unpack_from(array, i * entry_size)
            if type_raw == bytes(16):
                continue
            number = i + 1
            if not first_usable <= first <= last <= last_usable:
                raise ImageError(f"partition {number} spans LBA {first}-{last}, outside the "
                                 f"usable area {first_usable}-{last_usable}")
            if (last + 1) * self.sector > self.size:
                raise ImageError(f"partition {number} ends beyond the end of the image "
                                 f"({self.size} bytes); is it truncated?")
            entries.append(_Entry(number, uuid.UUID(bytes_le=type_raw), first, last, attributes))
        return entries


def _image_size(fd: int, st: os.stat_result) -> int:
    return os.lseek(fd, 0, os.SEEK_END) if stat.S_ISBLK(st.st_mode) else st.st_size


def _probe_partition(path: str, fd: int, entry: _Entry, sector: int,
                     mount_point: str) -> Partition:
    offset = entry.first_lba * sector
    size = (entry.last_lba - entry.first_lba + 1) * sector
    fstype = probe_filesystem(_read_at(fd, offset, min(size, _PROBE_SIZE)))
    if fstype is None:
        raise ImageError(f"Cannot determine the file system type of partition {entry.number} "
                         f"({mount_point}) of {path}; format it with a filesystem Linux can "
                         "mount.")
    if fstype == "crypto_LUKS":
        raise ImageError(f"Partition {entry.number} ({mount_point}) of {path} is crypto_LUKS "
                         "encrypted; LUKS disk images are not supported. Unlock it and pass "
                         "the opened device instead.")
    read_only = bool(entry.attributes & GPT_FLAG_READ_ONLY) or fstype in READ_ONLY_FILESYSTEMS
    return Partition(mount_point, fstype, offset, size, entry.number, entry.type_uuid, read_only)


def _pick(entries: Iterable[_Entry], type_uuid: uuid.UUID | None) -> _Entry | None:
    """The lowest-numbered auto-mountable partition of a type, as nspawn chooses."""
    found = [e for e in entries if e.type_uuid == type_uuid and not e.attributes & GPT_FLAG_NO_AUTO]
    return min(found, key=lambda e: e.number, default=None)


def _dissect_gpt(path: str, fd: int, size: int, st: os.stat_result,
                 sector: int) -> DissectedImage:
    entries = _GptReader(path, fd, size, sector).entries()
    native_root, secondary_root = _ROOT_TYPES.get(platform.machine(), (None, None))
    personality = None
    root = _pick(entries, native_root)
    if root is None:
        root = _pick(entries, secondary_root)
        personality = PER_LINUX32
    if root is None:
        raise ImageError(f"Failed to identify root partition in disk image {path}. {SPEC_NOTE}")
    extra = {}
    for type_uuid, mount_point in _MOUNT_POINTS.items():
        entry = _pick(entries, type_uuid)
        if entry is not None:
            extra[mount_point.strip("/")] = _probe_partition(path, fd, entry, sector, mount_point)
    return DissectedImage(path, size, stat.S_ISBLK(st.st_mode), "gpt",
                          _probe_partition(path, fd, root, sector, "/"),
                          personality=personality, **extra)


def _gpt_sector(fd: int) -> int | None:
    for sector in _SECTOR_SIZES:
        if _read_at(fd, sector, 8) == _GPT_SIGNATURE:
            return sector
    return None


def dissect(path: str) -> DissectedImage:
    """Find the container's filesystems in an image file or block device."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as e:
        raise ImageError(f"Failed to open image {path}: {e.strerror}") from e
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise ImageError(f"{path} is not a regular file or block device")
        size = _image_size(fd, st)
        head = _read_at(fd, 0, _PROBE_SIZE)
        if head[:6] == b"LUKS\xba\xbe":
            raise ImageError(f"Image {path} is crypto_LUKS encrypted; LUKS disk images are not "
                             "supported. Unlock it and pass the opened device instead.")
        sector = _gpt_sector(fd)
        if sector is not None:
            if not _has_protective_mbr(head):
                raise ImageError(f"Image {path} has a GPT header but no protective MBR; "
                                 f"repair it with sgdisk or gdisk. {SPEC_NOTE}")
            return _dissect_gpt(path, fd, size, st, sector)
        fstype = probe_filesystem(head)
        if fstype is not None:
            read_only = fstype in READ_ONLY_FILESYSTEMS
            return DissectedImage(path, size, stat.S_ISBLK(st.st_mode), None,
                                  Partition("/", fstype, 0, size, read_only=read_only))
        if _has_mbr_partitions(head):
            raise ImageError(f"Image {path} does not carry a GUID Partition Table. {SPEC_NOTE}")
        raise ImageError(f"Failed to identify any partition table or file system on {path}. "
                         f"{SPEC_NOTE}")
    finally:
        os.close(fd)


# Attaching and mounting ----------------------------------------------------------

@dataclass(frozen=True)
class ImageMount:
    """One mount of the container root, as the plan will perform it."""

    device: str
    mount_point: str
    fstype: str
    read_only: bool

    @property
    def flags(self) -> int:
        return native.MS_NODEV | (native.MS_RDONLY if self.read_only else 0)


@dataclass
class ImageMounts:
    """The loop devices of an attached image, and the mounts to make from them.

    Keep it until the container has exited, then call detach() (or use it as
    a context manager): the mounts die with the container's mount namespace,
    and the loop devices go with detach()."""

    dissected: DissectedImage
    loops: list[LoopDevice] = field(default_factory=list)
    mounts: list[ImageMount] = field(default_factory=list)
    detached: list[int] = field(default_factory=list)  # see mount_detached(), one per mount

    def mount_detached(self) -> userns.Ownership:
        """Mount the image's file systems here, detached, for a container in a user
        namespace: it may not mount block devices itself, and root inside must own
        them (userns.map_ownership idmaps them, or chowns a writable one, before the
        child attaches them). Unmounted when detach() closes them, if never attached."""
        ownership = userns.Ownership()
        for m in self.mounts:
            fd = mount_detached(m.device, m.fstype, m.read_only, self.dissected.path)
            self.detached.append(fd)
            what = f"image {self.dissected.path} ({m.fstype}, at {m.mount_point})"
            ownership.mounts.append(userns.OwnedMount(
                fd, what, None if m.read_only else userns.mount_root_path(fd), READ_ONLY_REFUSAL))
        return ownership

    def add_to_plan(self, plan: Plan, root: str) -> None:
        """Mount the image at `root` in the child (before /dev is replaced: the
        loop nodes are the host's), or attach the mounts made by mount_detached()."""
        for i, m in enumerate(self.mounts):
            target = os.path.join(root, m.mount_point.lstrip("/")).rstrip("/") or "/"
            if m.mount_point != "/":
                plan.mkdir(target)
            if self.detached:
                plan.attach_mount(self.detached[i], target, f"{m.fstype} {m.device}")
            else:
                plan.mount(m.device, target, m.fstype, m.flags)

    def detach(self) -> None:
        """Release every mount made here and every loop device; safe to call twice."""
        while self.detached:
            os.close(self.detached.pop())
        failures = []
        for loop in self.loops:
            try:
                loop.detach()
            except LoopError as e:
                failures.append(e)
        if failures:
            raise failures[0]

    def __enter__(self) -> ImageMounts:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.detach()


READ_ONLY_REFUSAL = ("it is read-only, so it cannot be chowned into the container's range "
                     "either. Use an image whose file system supports idmapped mounts (ext3, "
                     "ext4, xfs, btrfs, squashfs, erofs; 'tune2fs -j IMAGE' makes ext2 ext3), "
                     "start it once without --read-only so that it is chowned into the range, "
                     "or run it without --private-users.")

_FSOPEN_CLOEXEC = 1
_FSMOUNT_CLOEXEC = 1
_FSCONFIG_SET_FLAG = 0
_FSCONFIG_SET_STRING = 1
_FSCONFIG_CMD_CREATE = 6
_MOUNT_ATTR_RDONLY = 0x1
_MOUNT_ATTR_NODEV = 0x4


def mount_detached(device: str, fstype: str, read_only: bool, image_path: str) -> int:
    """A mount of `device` that is in no mount namespace (fsopen, fsmount): a descriptor
    to idmap and hand to a container; closing it unmounts it unless it was attached."""
    import ctypes

    call = userns.kernel_call
    try:
        context = call("fsopen", fstype.encode(), ctypes.c_uint(_FSOPEN_CLOEXEC))
    except OSError as e:
        raise ImageError(f"Cannot mount the {fstype} file system of {image_path}: "
                         f"{e.strerror}; this kernel cannot mount {fstype}") from e
    try:
        call("fsconfig", ctypes.c_int(context), ctypes.c_uint(_FSCONFIG_SET_STRING), b"source",
             device.encode(), ctypes.c_int(0))
        if read_only:
            call("fsconfig", ctypes.c_int(context), ctypes.c_uint(_FSCONFIG_SET_FLAG), b"ro",
                 None, ctypes.c_int(0))
        call("fsconfig", ctypes.c_int(context), ctypes.c_uint(_FSCONFIG_CMD_CREATE), None,
             None, ctypes.c_int(0))
        attrs = _MOUNT_ATTR_NODEV | (_MOUNT_ATTR_RDONLY if read_only else 0)
        return call("fsmount", ctypes.c_int(context), ctypes.c_uint(_FSMOUNT_CLOEXEC),
                    ctypes.c_uint(attrs))
    except OSError as e:
        raise ImageError(f"Failed to mount the {fstype} file system of {image_path} "
                         f"({device}): {e.strerror}; is it damaged?") from e
    finally:
        os.close(context)


def attach_image(dissected: DissectedImage, read_only: bool = False) -> ImageMounts:
    """One loop device per used partition (offset and size limit on the image)."""
    mounts = ImageMounts(dissected)
    with ExitStack() as undo:
        for part in dissected.partitions:
            ro = read_only or part.read_only
            loop = LoopDevice(dissected.path, part.offset, part.size, read_only=ro)
            undo.callback(loop.detach)
            mounts.loops.append(loop)
            mounts.mounts.append(ImageMount(loop.device, part.mount_point, part.fstype, ro))
        undo.pop_all()
    return mounts


# Reading files without leaving a mount --------------------------------------------

def read_files_from_image(dissected: DissectedImage, paths: Iterable[str], *,
                          max_size: int = 1 << 20,
                          scratch_dir: str | None = None) -> dict[str, bytes | None]:
    """Read small files (passwd, os-release, ...) from the image's root filesystem.

    The filesystem is mounted read-only in a thread of its own that first
    moved to a private mount namespace: no other thread, and no other
    process, ever sees the mount, and it cannot outlive the thread. Missing
    files map to None; symlinks resolve inside the image."""
    wanted = list(paths)
    result: dict[str, bytes | None] = {}
    failure: list[BaseException] = []

    def work() -> None:
        try:
            result.update(_read_in_private_namespace(dissected, wanted, max_size, scratch_dir))
        except Exception as e:  # handed over to the calling thread below
            failure.append(e)

    worker = threading.Thread(target=work, name=f"read {dissected.path}")
    worker.start()
    worker.join()
    if failure:
        raise failure[0]
    return result


def _read_in_private_namespace(dissected: DissectedImage, paths: list[str], max_size: int,
                               scratch_dir: str | None) -> dict[str, bytes | None]:
    native.unshare(native.CLONE_NEWNS)
    native.mount(None, "/", None, native.MS_REC | native.MS_PRIVATE)
    root = dissected.root
    with LoopDevice(dissected.path, root.offset, root.size, read_only=True) as loop:
        target = tempfile.mkdtemp(prefix="hostel-image-", dir=scratch_dir)
        try:
            try:
                native.mount(loop.device, target, root.fstype, native.MS_RDONLY | native.MS_NODEV
                             | native.MS_NOSUID | native.MS_NOEXEC)
            except OSError as e:
                raise ImageError(f"Failed to mount the {root.fstype} root file system of "
                                 f"{dissected.path} ({loop.device}): {e.strerror}; is it "
                                 "damaged?") from e
            try:
                return {p: read_file_in_root(target, p, max_size) for p in paths}
            finally:
                # Synchronous, so the loop device is idle before it is detached.
                native.umount(target)
        finally:
            os.rmdir(target)
