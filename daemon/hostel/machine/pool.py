"""The machine pool: where a machine NAME's root lives, as machined and nspawn find it.

systemd-nspawn@NAME.service runs `systemd-nspawn --machine=NAME` without -D or -i,
and nspawn then looks NAME up in its image search path: a directory NAME or a
disk image NAME.raw, in /var/lib/machines among others. hostel searches
/var/lib/machines and its own STATE_DIR/machines (/var/lib/hostel/machines).
A NAME.nspawn file beside the image carries its settings (machine/nspawn_settings.py
reads it when the machine starts).

HOSTEL_MACHINE_POOL (a colon-separated list of directories) replaces that list:
for tests, and for hosts that keep their machines elsewhere. This module is the
one place that knows the list; it imports only `os`, so hostelctl can use it at
start-up too (`hostelctl run -M NAME`)."""
from __future__ import annotations

import os

POOL_ENV = "HOSTEL_MACHINE_POOL"
SYSTEM_POOL = "/var/lib/machines"
DEFAULT_STATE_DIR = "/var/lib/hostel"
RAW_SUFFIX = ".raw"


class PoolEntry:
    """NAME found in the pool: its tree or raw image.

    A plain class (not a dataclass) so hostelctl's start-up stays cheap."""

    __slots__ = ("name", "pool_dir", "directory", "image")

    def __init__(self, name: str, pool_dir: str, directory: str | None,
                 image: str | None) -> None:
        self.name = name
        self.pool_dir = pool_dir
        self.directory = directory          # a tree (exactly one of directory/image is set)
        self.image = image                  # a NAME.raw disk image

    @property
    def root(self) -> str:
        """The tree or image path (machined's image path)."""
        return self.directory or self.image or ""

    def __repr__(self) -> str:
        return f"PoolEntry({self.name!r}, {self.root!r})"


class NotInPool(LookupError):
    """NAME is in none of the pool's directories; the message lists what was searched."""


def pool_dirs(state_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """The directories searched, in order: $HOSTEL_MACHINE_POOL, else /var/lib/machines
    and STATE_DIR/machines."""
    override = os.environ.get(POOL_ENV)
    if override:
        return [d for d in override.split(":") if d]
    state = os.fspath(state_dir) if state_dir is not None else DEFAULT_STATE_DIR
    return [SYSTEM_POOL, os.path.join(state, "machines")]


def _entry_in(pool_dir: str, name: str) -> PoolEntry | None:
    """NAME in one directory: the tree first, then NAME.raw (nspawn's image_find order)."""
    tree = os.path.join(pool_dir, name)
    raw = tree + RAW_SUFFIX
    if os.path.isdir(tree):
        return PoolEntry(name, pool_dir, tree, None)
    if os.path.isfile(raw):
        return PoolEntry(name, pool_dir, None, raw)
    return None


def name_is_poolable(name: str) -> bool:
    """A name that cannot escape a pool directory: no '/', not '.', '..' or hidden."""
    return bool(name) and "/" not in name and "\0" not in name and not name.startswith(".")


def find(name: str, dirs: list[str]) -> PoolEntry:
    """NAME's entry in the first pool directory that has it; NotInPool naming the
    directories searched, so the user knows where to put the tree."""
    if name_is_poolable(name):
        for pool_dir in dirs:
            entry = _entry_in(pool_dir, name)
            if entry is not None:
                return entry
    searched = ", ".join(dirs) or "(no directories)"
    raise NotInPool(f"no machine image {name!r} in the pool: looked for {name}/ and "
                    f"{name}{RAW_SUFFIX} in {searched}; put a tree or raw image there "
                    f"(or set {POOL_ENV})")

