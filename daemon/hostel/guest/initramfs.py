"""The initramfs of a hostel VM: the static guest init and the modules it needs, nothing else.

A VM boots a stock distribution kernel (Debian's linux-image-cloud-amd64 by
default), which builds much of what a guest needs as modules. The initramfs
made here holds /init (guest-init/, built by `make setup`), the few modules
that kernel lacks built in (virtio-mmio, virtio-blk, virtio-console,
virtio-net and its failover helpers, squashfs, overlayfs, virtio-rng),
decompressed and in dependency order, and the list the init loads them from
(/lib/modules/hostel/load.list, one path a line). The kernel is checked
first: one that lacks what the guest needs is refused with the missing
option named, rather than booting into a guest that hangs looking for its
disk.

Dependencies come from the kernel's modules.dep when depmod has made one;
a kernel package unpacked without depmod (make setup's cache) has none, and
then each module's own .modinfo "depends=" is read, which is what depmod
itself would have found. The archive is a newc cpio, written here, cached
per kernel version and content hash, so a second VM of the same kernel and
init reuses the file."""
from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hostel.guest.errors import BadKernel, GuestError

KERNEL_CACHE = Path("/var/cache/hostel/kernels")
INITRAMFS_CACHE = Path("/var/cache/hostel/initramfs")
DEFAULT_FLAVOUR = "cloud-amd64"
DEFAULT_INIT = Path(__file__).resolve().parents[3] / "build/guest-init/init"
MODULE_DIR = "lib/modules/hostel"
LOAD_LIST = f"{MODULE_DIR}/load.list"
FORMAT = b"hostel-initramfs-1"   # part of the cache key: bump when the layout changes

# Built in, or the guest cannot start at all.
BUILTIN_OPTIONS = {
    "CONFIG_BLK_DEV_INITRD": "initramfs support",
    "CONFIG_BINFMT_ELF": "ELF executables (the init)",
    "CONFIG_DEVTMPFS": "devtmpfs on /dev",
    "CONFIG_TMPFS": "tmpfs (the overlay's upper layer)",
    "CONFIG_PROC_FS": "/proc",
    "CONFIG_SYSFS": "/sys",
    "CONFIG_CGROUPS": "cgroup2 (the task's cgroup)",
    "CONFIG_INET": "IPv4 networking",
    "CONFIG_ACPI": "ACPI, through which hostel's launcher announces its virtio-mmio devices",
}
# Built in or a module: (option, module name, what it is for, required).
MODULE_OPTIONS = (
    ("CONFIG_VIRTIO_MMIO", "virtio_mmio", "virtio-mmio transport", True),
    ("CONFIG_VIRTIO_BLK", "virtio_blk", "virtio-blk disks (image and config)", True),
    ("CONFIG_VIRTIO_CONSOLE", "virtio_console", "virtio-console (console and channel)", True),
    ("CONFIG_SQUASHFS", "squashfs", "squashfs (image and config disks)", True),
    ("CONFIG_OVERLAY_FS", "overlay", "overlayfs (the writable root)", True),
    ("CONFIG_VIRTIO_NET", "virtio_net", "virtio-net (the guest's network)", True),
    ("CONFIG_HW_RANDOM_VIRTIO", "virtio_rng", "virtio-rng (entropy)", False),
)
# A squashfs option that must be on whenever squashfs is there at all:
# images are made by mksquashfs with its default, gzip.
SQUASHFS_COMPRESSION = ("CONFIG_SQUASHFS_ZLIB", "gzip-compressed squashfs (mksquashfs's default)")
_COMPRESSED = {".xz": lzma.decompress, ".gz": gzip.decompress}
_MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.gz", ".ko.zst")


@dataclass(frozen=True)
class Kernel:
    """A kernel and what belongs with it: version, build configuration, modules."""

    vmlinuz: Path
    config_path: Path
    modules: Path
    version: str
    config: dict[str, str] = field(repr=False, compare=False)

    def option(self, name: str) -> str:
        """"y", "m", a value, or "" when the option is not set."""
        return self.config.get(name, "")


def _read_config(path: Path) -> dict[str, str]:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        raise BadKernel(f"cannot read the kernel configuration {path}: {e.strerror}") from e
    options = {}
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if sep and name.startswith("CONFIG_"):
            options[name] = value.strip('"')
    return options


def read_kernel(directory: Path) -> Kernel:
    """A kernel in the cache layout `make setup` fills: {vmlinuz,config,version,modules/}."""
    try:
        version = (directory / "version").read_text().strip()
    except OSError as e:
        raise BadKernel(f"{directory} is not a kernel directory (no readable version file: "
                        f"{e.strerror}); run 'make setup' or name a kernel directory") from e
    for name in ("vmlinuz", "config", "modules"):
        if not (directory / name).exists():
            raise BadKernel(f"kernel directory {directory} lacks {name}; run 'make setup' again")
    return Kernel(directory / "vmlinuz", directory / "config", directory / "modules", version,
                  _read_config(directory / "config"))


def read_host_kernel(version: str, root: Path = Path("/")) -> Kernel:
    """An installed kernel: /boot/vmlinuz-V, /boot/config-V, /lib/modules/V."""
    kernel = Kernel(root / f"boot/vmlinuz-{version}", root / f"boot/config-{version}",
                    root / f"lib/modules/{version}", version, {})
    for path in (kernel.vmlinuz, kernel.config_path, kernel.modules):
        if not path.exists():
            raise BadKernel(f"kernel {version} is installed without {path}")
    return Kernel(kernel.vmlinuz, kernel.config_path, kernel.modules, version,
                  _read_config(kernel.config_path))


def find_kernel(flavour: str = DEFAULT_FLAVOUR, cache: Path = KERNEL_CACHE,
                root: Path = Path("/")) -> Kernel:
    """The newest installed kernel of `flavour`, else the one in hostel's cache."""
    installed = sorted(path.name[len("vmlinuz-"):]
                       for path in (root / "boot").glob(f"vmlinuz-*-{flavour}"))
    if installed:
        return read_host_kernel(installed[-1], root)
    if (cache / flavour).is_dir():
        return read_kernel(cache / flavour)
    raise BadKernel(f"no {flavour} kernel: none installed in {root / 'boot'} and none in "
                    f"{cache}; run 'make setup' (it fetches Debian's linux-image-{flavour})")


def kernel_at(path: Path) -> Kernel:
    """What --kernel PATH names: a cache-layout directory or its vmlinuz, or /boot/vmlinuz-V.

    The configuration and modules must be findable from there: a bare bzImage
    says nothing about what it was built with, and the guest needs both."""
    if path.is_dir():
        return read_kernel(path)
    if path.name == "vmlinuz" and (path.parent / "version").exists():
        return read_kernel(path.parent)
    if path.name.startswith("vmlinuz-") and path.parent.name == "boot":
        return read_host_kernel(path.name[len("vmlinuz-"):], path.parent.parent)
    raise BadKernel(f"cannot tell which configuration and modules go with kernel {path}: name a "
                    "kernel directory (vmlinuz, config, version, modules/) or an installed "
                    "/boot/vmlinuz-VERSION")


# The kernel check ------------------------------------------------------------------------

def check_kernel(kernel: Kernel) -> list[str]:
    """Refuse a kernel the guest cannot run on; return the modules to load (not yet ordered)."""
    def refuse(option: str, why: str) -> BadKernel:
        return BadKernel(f"kernel {kernel.version} ({kernel.config_path}) lacks {option} ({why}); "
                         f"build it with {option}=y or boot Debian's linux-image-{DEFAULT_FLAVOUR}")

    for option, why in BUILTIN_OPTIONS.items():
        if kernel.option(option) != "y":
            raise refuse(option, why)
    wanted = []
    for option, module, why, required in MODULE_OPTIONS:
        value = kernel.option(option)
        if value == "m":
            wanted.append(module)
        elif value != "y" and required:
            raise refuse(option, why)
    if kernel.option(SQUASHFS_COMPRESSION[0]) != "y":
        raise refuse(*SQUASHFS_COMPRESSION)
    if wanted and kernel.option("CONFIG_MODULES") != "y":
        raise refuse("CONFIG_MODULES", f"loading {', '.join(wanted)}")
    return wanted


# Modules and their dependencies ----------------------------------------------------------

def module_name(path: str) -> str:
    """What the kernel calls the module in a file: its base name, '-' read as '_'."""
    base = os.path.basename(path)
    for suffix in _MODULE_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def _module_files(modules: Path) -> dict[str, str]:
    """Module name -> path relative to the modules directory, for every module file."""
    found = {}
    for directory, _dirs, files in os.walk(modules / "kernel"):
        for name in files:
            if name.endswith(_MODULE_SUFFIXES):
                relative = os.path.relpath(os.path.join(directory, name), modules)
                found[module_name(name)] = relative
    return found


def _read_modules_dep(path: Path) -> dict[str, list[str]]:
    """modules.dep: "kernel/a.ko: kernel/b.ko kernel/c.ko" -> {"a": ["b", "c"]}."""
    deps = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        module, sep, rest = line.partition(":")
        if not line.strip():
            continue
        if not sep:
            raise BadKernel(f"line {lineno} of {path} is not 'MODULE: DEPENDENCIES'; "
                            "run depmod again")
        deps[module_name(module)] = [module_name(d) for d in rest.split()]
    return deps


def module_bytes(path: Path) -> bytes:
    """A module file's contents, decompressed: the init hands them to finit_module as they are."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BadKernel(f"cannot read module {path}: {e.strerror}") from e
    decompress = _COMPRESSED.get(path.suffix)
    if path.suffix == ".zst":
        raise BadKernel(f"module {path} is zstd-compressed, which hostel cannot unpack; "
                        "decompress the kernel's modules (zstd -d) first")
    if decompress is None:
        return data
    try:
        return decompress(data)
    except (lzma.LZMAError, OSError, EOFError) as e:
        raise BadKernel(f"module {path} does not decompress: {e}") from e


def modinfo_depends(data: bytes, what: str) -> list[str]:
    """The "depends=" entry of an ELF64 module's .modinfo section (modpost writes it)."""
    def fail(why: str) -> BadKernel:
        return BadKernel(f"module {what} is not a usable kernel module: {why}")

    if data[:4] != b"\x7fELF" or len(data) < 64 or data[4] != 2 or data[5] != 1:
        raise fail("not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    if shentsize < 64 or shstrndx >= shnum or shoff + shnum * shentsize > len(data):
        raise fail("its section headers lie outside the file")

    def section(index: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", data, shoff + index * shentsize)
        if offset + size > len(data):
            raise fail(f"section {index} lies outside the file")
        return name, offset, size

    _, names_offset, names_size = section(shstrndx)
    for index in range(shnum):
        name, offset, size = section(index)
        if name >= names_size:
            raise fail(f"section {index} has no name")
        end = data.find(b"\0", names_offset + name, names_offset + names_size)
        if end >= 0 and data[names_offset + name:end] == b".modinfo":
            for entry in data[offset:offset + size].split(b"\0"):
                if entry.startswith(b"depends="):
                    value = entry[len(b"depends="):].decode(errors="replace")
                    return [module_name(d) for d in value.split(",") if d]
            return []
    raise fail("it has no .modinfo section")


@dataclass(frozen=True)
class Module:
    name: str
    path: Path        # the file in the kernel's modules directory
    data: bytes = field(repr=False)   # decompressed


def resolve_modules(kernel: Kernel, wanted: list[str]) -> list[Module]:
    """`wanted` and everything they need, each after its dependencies, each once."""
    files = _module_files(kernel.modules)
    dep_file = kernel.modules / "modules.dep"
    listed = _read_modules_dep(dep_file) if dep_file.exists() else None
    ordered: list[Module] = []
    done: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in done:
            return
        if name in chain:
            raise BadKernel(f"kernel {kernel.version}: modules depend on each other in a cycle: "
                            f"{' -> '.join(chain + (name,))}")
        if name not in files:
            needed = f", needed by {chain[-1]}" if chain else ""
            raise BadKernel(f"kernel {kernel.version} has no module {name}{needed} in "
                            f"{kernel.modules}; is the modules directory complete?")
        path = kernel.modules / files[name]
        data = module_bytes(path)
        deps = listed.get(name, []) if listed is not None else modinfo_depends(data, str(path))
        for dep in deps:
            visit(dep, chain + (name,))
        done.add(name)
        ordered.append(Module(name, path, data))

    for name in wanted:
        visit(name, ())
    return ordered


# The archive ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """One cpio member: a directory, a regular file or a character device."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)


def cpio_newc(entries: list[Entry]) -> bytes:
    """The "newc" (SVR4, no CRC) archive the kernel unpacks; owners root, times 0."""
    out = bytearray()
    for inode, entry in enumerate(entries + [Entry("TRAILER!!!", 0)], 1):
        name = entry.name.encode() + b"\0"
        nlink = 2 if entry.mode & 0o170000 == 0o040000 else 1
        fields = (inode, entry.mode, 0, 0, nlink, 0, len(entry.data), 0, 0,
                  entry.rdev[0], entry.rdev[1], len(name), 0)
        header = b"070701" + b"".join(b"%08x" % value for value in fields)
        out += header + name + _pad(len(header) + len(name))
        out += entry.data + _pad(len(entry.data))
    return bytes(out)


def initramfs_entries(init: bytes, modules: list[Module]) -> list[Entry]:
    directory, regular, executable = 0o040755, 0o100644, 0o100755
    entries = [Entry(name, directory) for name in
               ("dev", "proc", "sys", "root", "tmp", "run", "lib", "lib/modules", MODULE_DIR)]
    # The kernel opens /dev/console for init's stdio before anything is mounted.
    entries.append(Entry("dev/console", 0o020600, rdev=(5, 1)))
    entries.append(Entry("init", executable, init))
    paths = []
    for index, module in enumerate(modules):
        name = f"{MODULE_DIR}/{index:02d}-{module.name}.ko"
        entries.append(Entry(name, regular, module.data))
        paths.append(f"/{name}\n")
    entries.append(Entry(LOAD_LIST, regular, "".join(paths).encode()))
    return entries


def _cache_key(kernel: Kernel, init: bytes, modules: list[Module]) -> str:
    digest = hashlib.sha256(FORMAT)
    digest.update(hashlib.sha256(init).digest())
    for module in modules:
        digest.update(module.name.encode() + b"\0" + hashlib.sha256(module.data).digest())
    return f"{kernel.version}-{digest.hexdigest()[:16]}"


def _read_init(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise GuestError(f"the guest init {path} is missing; build it with 'make guest-init' "
                         "(or 'make setup')") from None
    except OSError as e:
        raise GuestError(f"cannot read the guest init {path}: {e.strerror}") from e
    if data[:4] != b"\x7fELF":
        raise GuestError(f"the guest init {path} is not an ELF executable; rebuild it with "
                         "'make guest-init'")
    return data


def build_initramfs(kernel: Kernel, init: Path = DEFAULT_INIT,
                    cache: Path = INITRAMFS_CACHE) -> Path:
    """The initramfs for `kernel`, from the cache when the same one was made before."""
    wanted = check_kernel(kernel)
    init_data = _read_init(init)
    modules = resolve_modules(kernel, wanted)
    target = cache / f"{_cache_key(kernel, init_data, modules)}.cpio"
    if target.exists():
        return target
    try:
        cache.mkdir(parents=True, exist_ok=True)
        fd, staging = tempfile.mkstemp(dir=cache, prefix=".staging-", suffix=".cpio")
    except OSError as e:
        raise GuestError(f"cannot write to the initramfs cache {cache}: {e.strerror}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(cpio_newc(initramfs_entries(init_data, modules)))
        os.chmod(staging, 0o644)
        os.replace(staging, target)   # complete or absent, even with builders racing
    except OSError as e:
        os.unlink(staging)
        raise GuestError(f"cannot write the initramfs {target}: {e.strerror}") from e
    return target
