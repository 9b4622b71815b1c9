""".nspawn settings files: found, read and merged the way systemd-nspawn 252 does it.

A file NAME.nspawn is looked for in /etc/systemd/nspawn/ and
/run/systemd/nspawn/ (trusted: every setting takes effect), then next to
the image or in the parent of the root directory (untrusted: the settings
that could reach host resources are ignored, each with a warning). What is
read becomes StartMachine settings keys, so the values then go through the
same validation as the caller's own; the caller's keys win, per group of
settings as in 252, unless --settings=override.

The daemon reads the files (StartMachine honours them as `hostelctl run`
does). A file is opened without blocking and must be a regular file of at
most MAX_FILE_SIZE bytes: a FIFO or a huge file must not stall or swamp
hosteld. Syntax problems are warnings naming the file and line and the
assignment is ignored, as in 252; a file that cannot be read at all fails
the start, naming the file.

HOSTEL_NSPAWN_SETTINGS_DIRS (colon-separated) replaces the two trusted
directories: tests use it, so that they never write into /etc."""
from __future__ import annotations

import errno
import logging
import os
import shlex
import stat
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from hostel.errors import InvalidArgs
from hostel.machine import port_forward

log = logging.getLogger(__name__)

TRUSTED_DIRS_ENV = "HOSTEL_NSPAWN_SETTINGS_DIRS"
DEFAULT_TRUSTED_DIRS = ("/etc/systemd/nspawn", "/run/systemd/nspawn")
SUFFIX = ".nspawn"
MAX_FILE_SIZE = 1024 * 1024
SETTINGS_MODES = ("yes", "no", "trusted", "override")
SECTIONS = ("Exec", "Files", "Network")

# A value checker: raises InvalidArgs when the value is not one the setting takes.
Checker = Callable[[str, Any], None]


class SettingsFileError(InvalidArgs):
    """The settings file exists but cannot be used at all."""


@dataclass
class SettingsFile:
    """What one file asked for, as StartMachine settings (only the keys it set)."""

    path: str
    trusted: bool
    values: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


# The keys of each section: file key -> (settings key, kind). Kinds: "bool", "boolword"
# (a boolean sent as "yes"/"no"), "string",
# "path" (absolute), "words" (whitespace-separated list, accumulating), "argv" (shell-like
# quoted words, accumulating), "list" (one item per assignment, accumulating), "port"
# (one --port per assignment, as 252's config_parse_expose_port), "unsupported" (read, then ignored with a warning: hostel has no such feature).
_KEYS: dict[str, dict[str, tuple[str, str]]] = {
    "Exec": {
        "Boot": ("Boot", "bool"),
        "Ephemeral": ("Ephemeral", "bool"),
        "ProcessTwo": ("AsPid2", "bool"),
        "Parameters": ("Command", "argv"),
        "Environment": ("Environment", "argv"),
        "User": ("User", "string"),
        "WorkingDirectory": ("WorkingDirectory", "path"),
        "Capability": ("Capability", "words"),
        "DropCapability": ("DropCapability", "words"),
        "KillSignal": ("KillSignal", "string"),
        "Personality": ("Personality", "string"),
        "MachineID": ("UUID", "string"),
        "PrivateUsers": ("PrivateUsers", "string"),
        "LinkJournal": ("LinkJournal", "string"),
        "Hostname": ("Hostname", "string"),
        "OOMScoreAdjust": ("OOMScoreAdjust", "string"),
        "CPUAffinity": ("CPUAffinity", "string"),
        "Timezone": ("Timezone", "string"),
        "SystemCallFilter": ("SystemCallFilter", "list"),
        "ResolvConf": ("ResolvConf", "string"),
        **{f"Limit{name}": ("RLimits", "rlimit") for name in (
            "CPU", "FSIZE", "DATA", "STACK", "CORE", "RSS", "NOFILE", "AS", "NPROC", "MEMLOCK",
            "LOCKS", "SIGPENDING", "MSGQUEUE", "NICE", "RTPRIO", "RTTIME")},
        "NoNewPrivileges": ("NoNewPrivileges", "boolword"),
        "PivotRoot": ("", "unsupported"),
        "AmbientCapability": ("", "unsupported"),
        "NotifyReady": ("", "unsupported"),
        "SuppressSync": ("", "unsupported"),
    },
    "Files": {
        "ReadOnly": ("ReadOnly", "bool"),
        "Volatile": ("Volatile", "string"),
        "Bind": ("Bind", "list"),
        "BindReadOnly": ("BindReadOnly", "list"),
        "TemporaryFileSystem": ("TemporaryFileSystem", "list"),
        "Overlay": ("Overlay", "list"),
        "OverlayReadOnly": ("OverlayReadOnly", "list"),
        "PrivateUsersOwnership": ("PrivateUsersOwnership", "string"),
        "PrivateUsersChown": ("PrivateUsersOwnership", "chown"),
        "Inaccessible": ("", "unsupported"),
        "BindUser": ("BindUser", "words"),
    },
    "Network": {
        "Private": ("PrivateNetwork", "bool"),
        "VirtualEthernet": ("NetworkVeth", "bool"),
        "Interface": ("NetworkInterface", "words"),
        "MACVLAN": ("NetworkMacvlan", "words"),
        "Bridge": ("NetworkBridge", "string"),
        "Zone": ("NetworkZone", "string"),
        "Port": ("Port", "port"),
        "IPVLAN": ("", "unsupported"),
        "VirtualEthernetExtra": ("", "unsupported"),
    },
}


# Groups of settings keys that 252 masks together: a caller that set any key of a group
# keeps the whole group; a file's group takes effect only when the caller set none.
# Each group: (its keys, those of them an untrusted file may not set, the warning then).
_GROUPS: list[tuple[tuple[str, ...], tuple[str, ...], str]] = [
    (("Boot", "AsPid2", "Command"), (), ""),
    (("Capability", "DropCapability"), ("Capability",),
     "Ignoring Capability= setting, file {} is not trusted."),
    (("UUID",), ("UUID",), "Ignoring MachineID= setting, file {} is not trusted."),
    (("Bind", "BindReadOnly", "TemporaryFileSystem", "Overlay", "OverlayReadOnly"),
     ("Bind", "BindReadOnly", "TemporaryFileSystem", "Overlay", "OverlayReadOnly"),
     "Ignoring TemporaryFileSystem=, Bind= and BindReadOnly= settings, file {} is not trusted."),
    (("PrivateNetwork", "NetworkVeth", "NetworkBridge", "NetworkZone", "NetworkInterface",
      "NetworkMacvlan"),
     ("PrivateNetwork", "NetworkVeth", "NetworkBridge", "NetworkZone", "NetworkInterface",
      "NetworkMacvlan"),
     "Ignoring network settings, file {} is not trusted."),
    (("Port",), ("Port",), "Ignoring Port= setting, file {} is not trusted."),
    (("BindUser",), ("BindUser",), "Ignoring bind user setting, file {} is not trusted."),
    (("OOMScoreAdjust",), ("OOMScoreAdjust",),
     "Ignoring OOMScoreAdjust= setting, file '{}' is not trusted."),
    (("CPUAffinity",), ("CPUAffinity",), "Ignoring CPUAffinity= setting, file '{}' is not trusted."),
    (("PrivateUsers", "PrivateUsersOwnership"), ("PrivateUsers", "PrivateUsersOwnership"),
     "Ignoring PrivateUsers= and PrivateUsersChown= settings, file {} is not trusted."),
    (("Ephemeral",), ("Ephemeral",), "Ignoring ephemeral setting, file {} is not trusted."),
    (("LinkJournal",), ("LinkJournal",),
     "Ignoring journal link setting, file '{}' is not trusted."),
]


def _group_of(key: str) -> tuple[tuple[str, ...], tuple[str, ...], str]:
    for group in _GROUPS:
        if key in group[0]:
            return group
    return (key,), (), ""


# Reading ---------------------------------------------------------------------------

def trusted_dirs() -> tuple[str, ...]:
    configured = os.environ.get(TRUSTED_DIRS_ENV)
    if configured is None:
        return DEFAULT_TRUSTED_DIRS
    return tuple(d for d in configured.split(":") if d)


def _read(path: str) -> bytes | None:
    """The file's bytes, None when there is none (ENOENT, as 252's fopen), else an error."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise SettingsFileError(f"Failed to open settings file {path}: {e.strerror}") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise SettingsFileError(f"Failed to read settings file {path}: it is a directory; "
                                    "remove it or pass --settings=no")
        if not stat.S_ISREG(info.st_mode):
            raise SettingsFileError(f"Failed to read settings file {path}: not a regular file; "
                                    "remove it or pass --settings=no")
        if info.st_size > MAX_FILE_SIZE:
            raise SettingsFileError(f"Failed to read settings file {path}: {info.st_size} bytes, "
                                    f"more than the {MAX_FILE_SIZE} a settings file may have")
        data = os.read(fd, MAX_FILE_SIZE + 1)
        if len(data) > MAX_FILE_SIZE:
            raise SettingsFileError(f"Failed to read settings file {path}: more than "
                                    f"{MAX_FILE_SIZE} bytes")
        return data
    except OSError as e:
        raise SettingsFileError(f"Failed to read settings file {path}: {e.strerror}") from None
    finally:
        os.close(fd)


def find(name: str, image: str | None, directory: str | None, *,
         trust_all: bool) -> tuple[str, bytes, bool] | None:
    """(path, contents, trusted) of NAME.nspawn, in 252's order; None when there is none."""
    filename = name + SUFFIX
    for base in trusted_dirs():
        path = os.path.join(base, filename)
        data = _read(path)
        if data is not None:
            return path, data, True
    beside = image or (directory if directory and directory != "/" else None)
    if beside is None:
        return None
    path = os.path.join(os.path.dirname(beside.rstrip("/")) or "/", filename)
    data = _read(path)
    return None if data is None else (path, data, trust_all)


# Parsing ---------------------------------------------------------------------------

def _lines(text: str) -> Iterator[tuple[int, str]]:
    """Logical lines with their first line number: a trailing backslash continues a line."""
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.rstrip("\r")
        if not pending:
            start = number
            if line.lstrip().startswith(("#", ";")):
                continue
        if line.endswith("\\"):
            pending.append(line[:-1] + " ")
            continue
        pending.append(line)
        yield start, "".join(pending).strip()
        pending = []
    if pending:
        yield start, "".join(pending).strip()


def parse(text: str, path: str, trusted: bool, check: Checker) -> SettingsFile:
    """Every assignment of the file; anything wrong is a warning and is ignored (252)."""
    result = SettingsFile(path, trusted)
    section: str | None = None
    known_section = False
    for number, line in _lines(text):
        where = f"{path}:{number}"
        if not line:
            continue
        if line.startswith("["):
            if not line.endswith("]") or len(line) < 3:
                result.warnings.append(f"{where}: Invalid section header '{line}', ignoring.")
                section, known_section = None, False
                continue
            section = line[1:-1]
            known_section = section in SECTIONS
            if not known_section and not section.startswith("X-"):
                result.warnings.append(f"{where}: Unknown section '{section}'. Ignoring.")
            continue
        if section is None:
            result.warnings.append(f"{where}: Assignment outside of section. Ignoring.")
            continue
        name, sep, value = line.partition("=")
        if not sep:
            result.warnings.append(f"{where}: Missing '=', ignoring line.")
            continue
        if known_section:
            _assign(result, where, section, name.strip(), value.strip(), check)
    if "Command" in result.values and not {"Boot", "AsPid2"} & result.values.keys():
        # 252 takes Parameters= only with the start mode: Boot= or ProcessTwo= (yes or no)
        del result.values["Command"]
        result.warnings.append(f"{path}: Parameters= without Boot= or ProcessTwo= is not "
                               "used (as in systemd-nspawn); add Boot=no to run it.")
    return result


def _assign(result: SettingsFile, where: str, section: str, name: str, value: str,
            check: Checker) -> None:
    entry = _KEYS[section].get(name)
    if entry is None:
        if not name.startswith("X-"):
            result.warnings.append(f"{where}: Unknown key '{name}' in section [{section}], "
                                   "ignoring.")
        return
    key, kind = entry
    if kind == "unsupported":
        result.warnings.append(f"{where}: {name}= is not supported by hostel, ignoring.")
        return
    if kind == "port":
        _assign_port(result, where, value)
        return
    if kind == "rlimit":  # LimitNOFILE=V is --rlimit=NOFILE=V
        kind, value = "list", f"{name.removeprefix('Limit')}={value}"
    try:
        if kind == "chown":  # PrivateUsersChown=BOOL: the older PrivateUsersOwnership=chown|off
            kind, value = "string", "chown" if _value("boolword", value) == "yes" else "off"
        parsed = _value(kind, value)
        if isinstance(parsed, list):
            if not parsed:  # an empty assignment resets the list
                result.values[key] = []
                return
            for item in parsed:
                check(key, [item])
            result.values[key] = list(result.values.get(key, [])) + parsed
        else:
            check(key, parsed)
            result.values[key] = parsed
    except InvalidArgs as e:
        if kind in ("bool", "boolword"):
            result.warnings.append(f"{where}: Failed to parse boolean value for {name}=, "
                                   f"ignoring: {value}")
        else:
            result.warnings.append(f"{where}: Failed to parse {name}=, ignoring: {value} ({e})")


def _assign_port(result: SettingsFile, where: str, value: str) -> None:
    """252 takes each Port= on its own: a host port given twice for one protocol, like one
    it cannot parse (an empty one too: it resets nothing), is a warning in 252's words,
    and the line is ignored; the start goes on with the others."""
    ports = list(result.values.get("Port", []))
    try:
        port_forward.parse_ports(ports + [value])
    except port_forward.DuplicatePort:
        result.warnings.append(f"{where}: Duplicate port specification, ignoring: {value}")
        return
    except InvalidArgs as e:
        result.warnings.append(f"{where}: {e}")
        return
    result.values["Port"] = ports + [value]


_TRUE = {"1", "yes", "y", "true", "t", "on"}
_FALSE = {"0", "no", "n", "false", "f", "off"}


def _value(kind: str, value: str) -> Any:
    if kind in ("bool", "boolword"):  # boolword: a key whose D-Bus value is "yes"/"no"
        if value.lower() in _TRUE:
            return True if kind == "bool" else "yes"
        if value.lower() in _FALSE:
            return False if kind == "bool" else "no"
        raise InvalidArgs("not a boolean")
    if kind == "path":
        if not value.startswith("/"):
            raise InvalidArgs("not an absolute path")
        return os.path.normpath(value)
    if kind == "words":
        return value.split()
    if kind == "argv":
        try:
            return shlex.split(value)
        except ValueError as e:
            raise InvalidArgs(f"Invalid syntax ({e})") from None
    if kind == "list":
        return [value] if value else []
    return value


# Merging ---------------------------------------------------------------------------

def merge(given: dict[str, Any], found: SettingsFile, override: bool) -> dict[str, Any]:
    """The caller's settings with the file's: per group, the caller's win (unless override);
    an untrusted file's privileged settings are dropped, with 252's warning."""
    merged = dict(given)
    done: set[tuple[str, ...]] = set()
    for key in found.values:
        if key == "RLimits":
            if found.trusted:
                merged[key] = _merge_rlimits(given.get(key, []), found.values[key], override)
            else:  # 252 takes no resource limit from an untrusted file
                found.warnings.extend(
                    f"Ignoring Limit{spec.partition('=')[0]}= setting, file '{found.path}' "
                    "is not trusted." for spec in found.values[key])
            continue
        if key == "SystemCallFilter" and not found.trusted and any(
                not spec.startswith("~") for spec in found.values[key]):
            # 252: an untrusted file may forbid more system calls, never allow more
            found.warnings.append(f"Ignoring SystemCallFilter= settings, file {found.path} "
                                  "is not trusted.")
            continue
        keys, privileged, warning = _group_of(key)
        if keys in done:
            continue
        done.add(keys)
        if not override and any(k in given for k in keys):
            continue
        if not found.trusted and any(k in found.values for k in privileged):
            found.warnings.append(warning.format(found.path))
        for k in keys:  # the group is the file's now (252 replaces it whole)
            if k in privileged and not found.trusted:
                continue
            merged.pop(k, None)
            if k in found.values:
                merged[k] = found.values[k]
    return merged


def _merge_rlimits(given: list[str], found: list[str], override: bool) -> list[str]:
    """252 masks each resource on its own: the caller's NOFILE keeps the file's NOFILE out,
    not its NPROC. Later entries win (settings.parse_rlimits), so the winner goes last."""
    def name(spec: str) -> str:
        return spec.partition("=")[0].removeprefix("RLIMIT_").removeprefix("Limit")

    if override:
        return list(given) + list(found)
    mine = {name(spec) for spec in given}
    return [spec for spec in found if name(spec) not in mine] + list(given)


def load(mode: str, name: str, image: str | None, directory: str | None,
         given: dict[str, Any], check: Checker) -> tuple[dict[str, Any], list[str]]:
    """The settings once the machine's file (if any) is merged in, and the warnings to show."""
    if mode == "no":
        return given, []
    hit = find(name, image, directory, trust_all=mode == "trusted")
    if hit is None:
        return given, []
    path, data, trusted = hit
    text = data.decode("utf-8", errors="replace")
    found = parse(text, path, trusted, check)
    merged = merge(given, found, mode == "override")
    for warning in found.warnings:
        log.warning("%s", warning)
    return merged, found.warnings


def show_warnings(warnings: list[str], fd: int | None) -> None:
    """Write the warnings where the caller sees them (its stderr), as nspawn prints them.

    Only if the descriptor is writable right now: a full pipe must never block hosteld."""
    if fd is None or not warnings:
        return
    import select

    data = "".join(f"{w}\n" for w in warnings).encode()
    try:
        _, writable, _ = select.select([], [fd], [], 0)
        if writable:
            os.write(fd, data[:4096])
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EPIPE, errno.EBADF):
            log.warning("showing settings file warnings: %s", e)
