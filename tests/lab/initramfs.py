"""Initial ramdisks, written as the kernel reads them (an uncompressed newc cpio
archive): for the lab VM itself and for the Linux guests tests boot.

Uncompressed on purpose: under QEMU's TCG, unpacking gzip at boot costs more
than reading a few more megabytes from memory.

    image = Initramfs()
    image.add_console()                       # /dev/console for /init's output
    image.add_busybox()                       # /bin/busybox and /bin/sh
    image.add_file("/init", script, 0o755)
    image.add_modules(kernel("cloud-amd64"), ["virtio_mmio", "virtio_blk"])
    image.write(tmp_path / "initrd")

add_modules puts the modules and what they depend on under /lib/modules/ and
their load order in /lib/modules/load-order (one file name a line), for an
/init to insmod in that order."""
from __future__ import annotations

import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from lab.kernels import Kernel
from lab.modules import index

BUSYBOX = "/bin/busybox"
LOAD_ORDER = "/lib/modules/load-order"
_TRAILER = "TRAILER!!!"


@dataclass
class _Entry:
    mode: int          # file type and permission bits
    data: bytes = b""  # a file's content or a symlink's target
    rdev: tuple[int, int] = (0, 0)   # a device node's major and minor


@dataclass
class Initramfs:
    entries: dict[str, _Entry] = field(default_factory=dict)

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        path = _clean(path)
        parent = str(PurePosixPath(path).parent)
        if parent != "/" and parent not in self.entries:
            self.add_dir(parent)
        self.entries.setdefault(path, _Entry(stat.S_IFDIR | mode))

    def add_file(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        path = _clean(path)
        self.add_dir(str(PurePosixPath(path).parent))
        self.entries[path] = _Entry(stat.S_IFREG | mode, data.encode() if isinstance(data, str) else data)

    def add_symlink(self, path: str, target: str) -> None:
        path = _clean(path)
        self.add_dir(str(PurePosixPath(path).parent))
        self.entries[path] = _Entry(stat.S_IFLNK | 0o777, target.encode())

    def add_char_device(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        path = _clean(path)
        self.add_dir(str(PurePosixPath(path).parent))
        self.entries[path] = _Entry(stat.S_IFCHR | mode, rdev=(major, minor))

    def add_console(self) -> None:
        """/dev/console, which the kernel opens for /init's stdio before any devtmpfs."""
        self.add_char_device("/dev/console", 5, 1)

    def add_busybox(self) -> None:
        """The host's static busybox as /bin/busybox, /bin/sh a link to it
        (`busybox --install -s /bin` in /init makes the other applets)."""
        found = shutil.which("busybox")
        if found is None:
            raise FileNotFoundError("no busybox on PATH: install busybox-static ('make setup' does)")
        self.add_file(BUSYBOX, Path(found).read_bytes(), 0o755)
        self.add_symlink("/bin/sh", "busybox")

    def add_modules(self, kernel: Kernel, names: list[str]) -> list[str]:
        """Copy names and their dependencies from kernel's modules; return the load order."""
        order = index(kernel.modules).load_order(names)
        for module in order:
            self.add_file(f"/lib/modules/{PurePosixPath(module.path).name}",
                          (kernel.modules / module.path).read_bytes())
        names_in_order = [PurePosixPath(module.path).name for module in order]
        self.add_file(LOAD_ORDER, "".join(f"{name}\n" for name in names_in_order))
        return names_in_order

    def write(self, path: Path) -> Path:
        with open(path, "wb") as out:
            for ino, (name, entry) in enumerate(sorted(self.entries.items()), start=1):
                out.write(_record(name.lstrip("/"), entry, ino))
            out.write(_record(_TRAILER, _Entry(0), 0))
        return path


def _clean(path: str) -> str:
    if not path.startswith("/"):
        raise ValueError(f"initramfs paths are absolute, not {path!r}")
    return str(PurePosixPath(path))


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _record(name: str, entry: _Entry, ino: int) -> bytes:
    """One newc header (13 eight-digit hex fields after the magic), name and data,
    each padded to four bytes."""
    raw_name = name.encode() + b"\0"
    fields = [ino, entry.mode, 0, 0, 1, 0, len(entry.data), 0, 0, *entry.rdev, len(raw_name), 0]
    header = b"070701" + b"".join(b"%08x" % value for value in fields)
    head = header + raw_name
    return head + _pad4(len(head)) + entry.data + _pad4(len(entry.data))
