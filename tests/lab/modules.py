"""Kernel modules of an unpacked Debian kernel: names, dependencies, aliases.

The kernel cache holds a package's lib/modules/VERSION as it was unpacked,
without the modules.dep that depmod would have written at install time (and
this host has no kmod). The lab needs dependencies twice: to insmod the 9p
and overlay modules in order from its initramfs, and to give busybox's
modprobe a modules.dep, so that `modprobe` and the kernel's own module
requests (dm-crypt for a LUKS mapping, tun for a tap) work inside. Both come
from each module's .modinfo section, read here."""
from __future__ import annotations

import functools
import struct
from dataclasses import dataclass, field
from pathlib import Path

ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2


@dataclass(frozen=True)
class Module:
    name: str                 # as the kernel names it: dashes become underscores
    path: str                 # relative to lib/modules/VERSION, e.g. kernel/fs/9p/9p.ko
    depends: tuple[str, ...]
    aliases: tuple[str, ...]


def canonical(name: str) -> str:
    """Module names compare with '-' and '_' the same, as modprobe treats them."""
    return name.replace("-", "_")


def read_modinfo(path: Path) -> dict[str, list[str]]:
    """The key=value pairs of a module's .modinfo section (a key may repeat: alias)."""
    data = path.read_bytes()
    if data[:4] != ELF_MAGIC or data[4] != ELFCLASS64:
        raise ValueError(f"{path} is not a 64-bit ELF module")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(index: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", data, shoff + index * shentsize)
        return name, offset, size

    _, strtab, _ = section(shstrndx)
    info: dict[str, list[str]] = {}
    for index in range(shnum):
        name_offset, offset, size = section(index)
        end = data.index(b"\0", strtab + name_offset)
        if data[strtab + name_offset:end] != b".modinfo":
            continue
        for entry in data[offset:offset + size].split(b"\0"):
            key, sep, value = entry.decode(errors="replace").partition("=")
            if sep:
                info.setdefault(key, []).append(value)
    return info


@dataclass
class ModuleIndex:
    """Every module of one kernel, by canonical name; built-ins known as such."""

    root: Path                                  # lib/modules/VERSION
    modules: dict[str, Module] = field(default_factory=dict)
    builtin: frozenset[str] = frozenset()

    @classmethod
    def scan(cls, root: Path) -> "ModuleIndex":
        builtin = frozenset(canonical(Path(line).stem) for line in
                            (root / "modules.builtin").read_text().split())
        index = cls(root, builtin=builtin)
        for ko in sorted(root.glob("kernel/**/*.ko")):
            info = read_modinfo(ko)
            name = canonical(info.get("name", [ko.stem])[0])
            depends = tuple(canonical(d) for d in ",".join(info.get("depends", [])).split(",") if d)
            index.modules[name] = Module(name, str(ko.relative_to(root)), depends,
                                         tuple(info.get("alias", [])))
        return index

    def load_order(self, names: list[str]) -> list[Module]:
        """names and everything they depend on, each after its dependencies
        (built-in ones left out: they are loaded already)."""
        order: list[Module] = []
        seen: set[str] = set()

        def visit(name: str, wanted_by: str) -> None:
            name = canonical(name)
            if name in seen or name in self.builtin:
                return
            if name not in self.modules:
                raise KeyError(f"no module {name} (wanted by {wanted_by}) in {self.root}")
            seen.add(name)
            for dependency in self.modules[name].depends:
                visit(dependency, name)
            order.append(self.modules[name])

        for name in names:
            visit(name, "the lab")
        return order

    def modules_dep(self) -> str:
        """modules.dep as depmod writes it: each module, then all it needs, nearest first."""
        lines = []
        for module in self.modules.values():
            needs = [m.path for m in reversed(self.load_order([module.name])[:-1])]
            lines.append(f"{module.path}: {' '.join(needs)}".rstrip() + "\n")
        return "".join(lines)

    def modules_alias(self) -> str:
        return "".join(f"alias {alias} {module.name}\n"
                       for module in self.modules.values() for alias in module.aliases)


@functools.cache
def index(root: Path) -> ModuleIndex:
    """The index of one kernel's modules, scanned once per process (it reads ~4000 files)."""
    return ModuleIndex.scan(root)
