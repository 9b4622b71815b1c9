"""Loop devices, attached with ioctls: no losetup, no udev, no partition scan.

A disk image's partitions are exposed as one loop device each, with an
offset and a size limit on the image file, so the kernel never has to scan a
partition table (which needs udev to make the nodes, and races with it)."""
from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from types import TracebackType

from hostel.bus import HostelError

LOOP_SET_FD = 0x4C00
LOOP_CLR_FD = 0x4C01
LOOP_SET_STATUS64 = 0x4C04
LOOP_GET_STATUS64 = 0x4C05
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_GET_FREE = 0x4C82

LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4

LOOP_MAJOR = 7
_NAME_SIZE = 64
# struct loop_info64: device, inode, rdevice, offset, sizelimit (u64); number,
# encrypt_type, encrypt_key_size, flags (u32); file_name, crypt_name (64 bytes);
# encrypt_key (32 bytes); init[2] (u64).
_INFO64 = struct.Struct(f"=5Q4I{_NAME_SIZE}s{_NAME_SIZE}s32s2Q")
# struct loop_config: fd, block_size (u32); info; reserved[8] (u64).
_CONFIG_HEAD = struct.Struct("=II")
_CONFIG_TAIL = bytes(64)
_FLAGS_OFFSET = 5 * 8 + 3 * 4

_GET_FREE_ATTEMPTS = 64


class LoopError(HostelError):
    """A loop device could not be attached or detached."""


def _info64(path: str, offset: int, size: int, flags: int) -> bytes:
    name = os.fsencode(path)[: _NAME_SIZE - 1]
    return _INFO64.pack(0, 0, 0, offset, size, 0, 0, 0, flags, name, b"", b"", 0, 0)


def _open_node(number: int, path: str) -> int:
    """Open /dev/loopN, making the node if devtmpfs has not (yet) made it."""
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        os.mknod(path, stat.S_IFBLK | 0o660, os.makedev(LOOP_MAJOR, number))
        return os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)


class LoopDevice:
    """One loop device over a byte range of an image file (or block device).

    The device is attached with LO_FLAGS_AUTOCLEAR, and this object keeps it
    open until detach(): whatever happens to the daemon, the kernel frees the
    device once the last user (our descriptor, a mount) is gone."""

    def __init__(self, path: str, offset: int = 0, size: int = 0,
                 read_only: bool = False) -> None:
        if offset < 0 or size < 0:
            raise LoopError(f"loop device for {path}: offset {offset} and size {size} "
                            "must not be negative")
        self.path = path
        self.offset = offset
        self.size = size
        self.read_only = read_only
        self.number = -1
        self._fd = -1
        self._attach()

    @property
    def device(self) -> str:
        return f"/dev/loop{self.number}"

    @property
    def attached(self) -> bool:
        return self._fd >= 0

    def _attach(self) -> None:
        mode = os.O_RDONLY if self.read_only else os.O_RDWR
        try:
            backing = os.open(self.path, mode | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError as e:
            raise LoopError(f"cannot open image {self.path} for a loop device: "
                            f"{e.strerror}") from e
        try:
            for _ in range(_GET_FREE_ATTEMPTS):
                number = self._get_free()
                fd = self._try_configure(number, backing)
                if fd >= 0:
                    self.number, self._fd = number, fd
                    return
            raise LoopError(f"no loop device could be attached for {self.path}: every free "
                            f"device was taken by someone else {_GET_FREE_ATTEMPTS} times; "
                            "retry later")
        finally:
            os.close(backing)

    def _get_free(self) -> int:
        try:
            control = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError as e:
            raise LoopError(f"cannot open /dev/loop-control to attach {self.path}: "
                            f"{e.strerror}; is the loop module loaded?") from e
        try:
            return fcntl.ioctl(control, LOOP_CTL_GET_FREE)
        except OSError as e:
            raise LoopError(f"no free loop device for {self.path}: {e.strerror}") from e
        finally:
            os.close(control)

    def _try_configure(self, number: int, backing: int) -> int:
        """Bind `backing` to loop `number`; -1 when someone else got it first (EBUSY)."""
        device = f"/dev/loop{number}"
        flags = LO_FLAGS_AUTOCLEAR | (LO_FLAGS_READ_ONLY if self.read_only else 0)
        info = _info64(self.path, self.offset, self.size, flags)
        try:
            fd = _open_node(number, device)
        except OSError as e:
            raise LoopError(f"cannot open loop device {device} for {self.path}: "
                            f"{e.strerror}") from e
        try:
            try:
                fcntl.ioctl(fd, LOOP_CONFIGURE, _CONFIG_HEAD.pack(backing, 0) + info + _CONFIG_TAIL)
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ENOTTY):
                    raise
                self._set_fd_and_status(fd, backing, info)
        except OSError as e:
            os.close(fd)
            if e.errno == errno.EBUSY:
                return -1
            raise LoopError(f"cannot attach {self.path} to loop device {device}: "
                            f"{e.strerror}") from e
        return fd

    @staticmethod
    def _set_fd_and_status(fd: int, backing: int, info: bytes) -> None:
        """The pre-5.8 way: two ioctls, undone if the second fails."""
        fcntl.ioctl(fd, LOOP_SET_FD, backing)
        try:
            fcntl.ioctl(fd, LOOP_SET_STATUS64, info)
        except OSError:
            fcntl.ioctl(fd, LOOP_CLR_FD)
            raise

    def status_flags(self) -> int:
        """The device's lo_flags as the kernel reports them (for checks and tests)."""
        if not self.attached:
            raise LoopError(f"loop device for {self.path} is already detached")
        raw = fcntl.ioctl(self._fd, LOOP_GET_STATUS64, bytes(_INFO64.size))
        return struct.unpack_from("=I", raw, _FLAGS_OFFSET)[0]

    def detach(self) -> None:
        """Release the device; a device still mounted somewhere goes when unmounted."""
        if not self.attached:
            return
        fd, self._fd = self._fd, -1
        try:
            fcntl.ioctl(fd, LOOP_CLR_FD)
        except OSError as e:
            if e.errno != errno.ENXIO:  # already cleared (autoclear beat us to it)
                raise LoopError(f"cannot detach loop device {self.device} from "
                                f"{self.path}: {e.strerror}") from e
        finally:
            os.close(fd)

    def __enter__(self) -> LoopDevice:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.detach()

    def __repr__(self) -> str:
        state = self.device if self.attached else "detached"
        return f"LoopDevice({self.path!r}, offset={self.offset}, size={self.size}, {state})"
