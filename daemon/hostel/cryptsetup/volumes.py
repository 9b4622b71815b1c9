"""The volume manager's model: crypttab and the kernel command line, read by the
generator's own parser, with each source found and its LUKS header read.

Everything here blocks (reading crypttab, scanning block devices, reading
headers): the service runs it in a worker thread and publishes the result."""
from __future__ import annotations

import io
import logging
import os
import stat
from contextlib import redirect_stderr
from dataclasses import dataclass, field
from typing import Any

from hostel.bus import InvalidArgs
from hostel.cryptsetup import crypttab, luks
from hostel.cryptsetup.unitname import fstab_node_to_udev_node

log = logging.getLogger(__name__)

INACTIVE, ACTIVE, MISSING_DEVICE = "inactive", "active", "missing-device"
MAPPER_DIR = "/dev/mapper"
NO_KEY_FILE = ("", "-", "none")   # crypttab's ways of saying "ask for a passphrase"
DM_NAME_MAX = 127                 # DM_NAME_LEN (128) less the NUL
_UDEV_LINK_DIRS = [(tag, f"/dev/disk/by-{tag.lower()}/")
                   for tag in ("UUID", "LABEL", "PARTUUID", "PARTLABEL")]


def _is_utf8(text: str) -> bool:
    """False for text with undecodable bytes (kept as surrogates when it was read)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def printable(text: str) -> str:
    """Text that may hold undecodable bytes, as valid UTF-8 a D-Bus string can carry."""
    return text.encode(errors="surrogateescape").decode(errors="backslashreplace")


def name_problem(name: str) -> str | None:
    """Why name cannot be a device-mapper name (and so not a volume), or None."""
    if not name:
        return "an empty volume name"
    if not _is_utf8(name):
        return (f"volume name {printable(name)} is not valid UTF-8, which D-Bus names and "
                "hostel's objects need")
    if "/" in name:
        return f"volume name {name!r} contains '/', which device-mapper names cannot"
    if name in (".", ".."):
        return f"volume name {name!r} is not allowed (it would be /dev/mapper/{name})"
    if len(name.encode()) > DM_NAME_MAX:
        return f"volume name {name[:20]!r}... is longer than {DM_NAME_MAX} bytes"
    return None


def check_name(name: str) -> None:
    problem = name_problem(name)
    if problem is not None:
        raise InvalidArgs(problem)


def split_options(options: str | None) -> list[str]:
    """crypttab's option field as a list, cut where the parser cuts it."""
    return crypttab._split_escaped(options, unescape=True) if options else []


def resolve_source(spec: str) -> str:
    """The node behind a source spec, "" when it is not there.

    A path is taken as it is (a file works as a source: libcryptsetup attaches
    a loop device when it maps one). UUID=/LABEL=/PARTUUID=/PARTLABEL= go to
    udev's /dev/disk/by-* link, and to libblkid's scan when udev made none
    (no udev, or not yet)."""
    node = fstab_node_to_udev_node(spec)
    if os.path.exists(node):
        return os.path.realpath(node)
    for tag, prefix in _UDEV_LINK_DIRS:
        if node.startswith(prefix):
            value = _udev_unescape(node[len(prefix):])
            return luks.evaluate_spec(f'{tag}="{value}"') or ""
    return ""


_KINDS = ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
          (stat.S_ISSOCK, "socket"), (stat.S_ISDIR, "directory"))


def blocking_kind(path: str) -> str | None:
    """What `path` is when reading it may block or never end (a FIFO, a character
    device, ...); None for a regular file or a block device, the only sources and key
    files read. Never opens it: opening a FIFO blocks too."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None  # absent: said elsewhere
    return next((kind for test, kind in _KINDS if test(mode)), None)


def _udev_unescape(element: str) -> str:
    """Undo udev's backslash-xNN escaping of a /dev/disk/by-* link name."""
    raw, i = bytearray(), 0
    while i < len(element):
        if element.startswith("\\x", i) and len(element) >= i + 4:
            raw.append(int(element[i + 2:i + 4], 16))
            i += 4
        else:
            raw += element[i].encode()
            i += 1
    return raw.decode(errors="surrogateescape")


@dataclass
class ManagedVolume:
    """One crypttab (or command-line) volume and what was found out about it."""

    entry: crypttab.Volume
    resolved: str = ""
    luks: luks.LuksInfo | None = None
    header_error: str = ""   # why there are no LUKS facts, for a person to read

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def options(self) -> list[str]:
        return split_options(self.entry.options)

    def option(self, name: str) -> tuple[bool, str | None]:
        found, value, _rest = crypttab.filter_options(self.entry.options, (name,))
        return found, value

    @property
    def header(self) -> str:
        """The detached header file (header=), "" when the header is on the source."""
        return self.option("header")[1] or ""

    def state(self) -> str:
        if os.path.exists(os.path.join(MAPPER_DIR, self.name)):
            return ACTIVE
        return INACTIVE if self.resolved else MISSING_DEVICE

    def properties(self) -> dict[str, Any]:
        """Every org.hostel1.Volume property, by D-Bus name."""
        info = self.luks
        return {
            "Name": self.name, "Device": self.entry.device, "ResolvedDevice": self.resolved,
            "KeyFile": self.entry.key_file or "", "KeyDevice": self.entry.key_device or "",
            "Options": self.options, "Header": self.header,
            "HeaderDevice": self.entry.header_device or "", "Source": self.entry.source,
            "State": self.state(),
            "LuksVersion": info.version if info else 0, "LuksUUID": info.uuid if info else "",
            "LuksCipher": info.cipher if info else "",
            "LuksKeySlots": list(info.key_slots) if info else [],
            "LuksLabel": info.label if info else "", "HeaderError": self.header_error,
        }

    def key_file_range(self) -> tuple[int, int]:
        """crypttab's keyfile-size= and keyfile-offset=, in bytes (0: the whole file)."""
        return self._byte_option("keyfile-size"), self._byte_option("keyfile-offset")

    def _byte_option(self, name: str) -> int:
        found, value = self.option(name)
        if not found:
            return 0
        if value is None or not value.isdigit():
            raise InvalidArgs(f"volume {self.name}: {name}={value or ''} in {self.entry.source} "
                              "is not a number of bytes; fix the entry and call Reload")
        return int(value)

    def read_only(self) -> bool:
        return crypttab.find_option(self.entry.options, ("readonly", "read-only")) is not None

    def discard(self) -> bool:
        return crypttab.find_option(self.entry.options, ("discard",)) is not None

    def configured_key_file(self) -> str | None:
        """The key file crypttab gives, if hosteld can read it as it stands."""
        key_file = self.entry.key_file
        if key_file in NO_KEY_FILE or key_file is None:
            return None
        return key_file

    def inspected(self) -> "ManagedVolume":
        """The same entry, its source found and header read afresh (blocks).

        A new object, not an update in place: the event loop may be reading
        this one's properties meanwhile."""
        fresh = ManagedVolume(self.entry)
        fresh._inspect()
        return fresh

    def _inspect(self) -> None:
        self.resolved = resolve_source(self.entry.device)
        kind = blocking_kind(self.resolved) if self.resolved else None
        if not self.resolved:
            self.header_error = f"source {self.entry.device} is not present"
        elif kind is not None:
            self.header_error = (f"source {self.entry.device} is a {kind}, not a block device "
                                 "or regular file; hosteld does not read it")
        elif self.entry.header_device:
            self.header_error = (f"the header is on device {self.entry.header_device}, "
                                 "which hosteld does not mount")
        else:
            try:
                self.luks = luks.read_header(self.resolved, self.header or None)
            except luks.LuksError as e:
                self.header_error = str(e)


@dataclass
class Loaded:
    """The result of reading crypttab and the command line once."""

    volumes: dict[str, ManagedVolume] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    error: str = ""   # the crypttab could not be read: nothing was loaded


def load(crypttab_path: str | None, cmdline: list[str] | None) -> Loaded:
    """Parse, validate names, find sources and read headers (blocks).

    The parser reports skipped lines the way systemd's generator does, on
    stderr; here those lines are caught and kept as warnings, so the daemon can
    show a user why an entry is missing."""
    loaded = Loaded()
    path = crypttab_path or crypttab.getenv_or("SYSTEMD_CRYPTTAB", crypttab.DEFAULT_CRYPTTAB)
    said = io.StringIO()
    try:
        with redirect_stderr(said):
            entries = crypttab.load_volumes(path, cmdline, initrd=None)
    except crypttab.CrypttabError as e:
        loaded.error = f"cannot read {path} ({os.strerror(e.errno)}): no volumes loaded"
        entries = []
    loaded.warnings += [printable(line) for line in said.getvalue().splitlines() if line]
    for entry in entries:
        problem = name_problem(entry.name) or _undecodable_field(entry)
        if problem is None and entry.name in loaded.volumes:
            problem = f"volume {entry.name} is defined again; the first definition counts"
        if problem is not None:
            loaded.warnings.append(printable(f"{_where(entry)}: {problem}; skipped"))
            continue
        loaded.volumes[entry.name] = ManagedVolume(entry).inspected()
    if loaded.error:
        loaded.warnings.append(loaded.error)
    for warning in loaded.warnings:
        log.warning("%s", warning)
    return loaded


def _undecodable_field(entry: crypttab.Volume) -> str | None:
    """An entry whose device, key file or options are not UTF-8 cannot be shown on D-Bus."""
    for what in ("device", "key_file", "key_device", "header_device", "options"):
        value = getattr(entry, what)
        if value and not _is_utf8(value):
            return (f"the {what.replace('_', ' ')} {printable(value)} of volume "
                    f"{entry.name} is not valid UTF-8")
    return None


def _where(entry: crypttab.Volume) -> str:
    return f"{entry.source}:{entry.line}" if entry.line else entry.source
