"""MachineSettings: every nspawn option, typed and validated, before anything runs.

StartMachine's a{sv} dictionary comes in; a MachineSettings (or an
InvalidArgs naming the key and what is wrong with it) comes out. The
combination rules are the seed's parse_argv rules, with its wording, so a
user who knows systemd-nspawn recognises every refusal."""
from __future__ import annotations

import os
import re
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hostel.bus import InvalidArgs
from hostel.machine.options import BY_KEY, SIGNATURES

MACHINE_NAME_MAX = 64
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
PER_LINUX = 0x0000
PER_LINUX32 = 0x0008
PERSONALITIES = {"x86": PER_LINUX32, "x86-64": PER_LINUX}
LINK_JOURNAL_MODES = {"no", "auto", "guest", "host"}
CONSOLE_MODES = {"interactive", "pipe", "passive"}
VOLATILE_MODES = {"no", "yes", "state"}
PRIVATE_USERS_RANGE = 0x10000
_TRUE = {"1", "yes", "y", "true", "t", "on"}
_FALSE = {"0", "no", "n", "false", "f", "off"}


def parse_boolean(value: str, what: str) -> bool:
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise InvalidArgs(f"Failed to parse {what} argument: {value} (expected yes or no)")


def hostname_is_valid(name: str) -> bool:
    """systemd's hostname_is_valid: letters, digits, '-', '_', dot-separated labels."""
    if not name or len(name) > MACHINE_NAME_MAX or name.startswith(".") or name.endswith("."):
        return False
    return ".." not in name and all(c.isascii() and (c.isalnum() or c in "-_.") for c in name)


def machine_name_is_valid(name: str) -> bool:
    return hostname_is_valid(name)


def hostname_cleanup(name: str) -> str:
    """Turn a directory or image name into a machine name, as nspawn's determine_names does."""
    cleaned = "".join(c for c in name if c.isascii() and (c.isalnum() or c in "-_."))
    cleaned = re.sub(r"\.{2,}", ".", cleaned).strip(".")
    return cleaned[:MACHINE_NAME_MAX]


@dataclass(frozen=True)
class BindMount:
    source: str
    destination: str
    read_only: bool


@dataclass(frozen=True)
class TmpfsMount:
    path: str
    options: str


@dataclass(frozen=True)
class PrivateUsers:
    """Container uid/gid 0..range-1 map to host base..base+range-1 ('pick': base chosen later)."""

    base: int | None
    range: int = PRIVATE_USERS_RANGE
    mode: str = "fixed"  # "fixed" (UID[:RANGE]), "root-owner" (yes), "pick"


@dataclass
class Stdio:
    """Descriptors the caller passed for the payload's standard streams (dup'd, owned here)."""

    stdin: int | None = None
    stdout: int | None = None
    stderr: int | None = None

    def close(self) -> None:
        for fd in {self.stdin, self.stdout, self.stderr} - {None}:
            os.close(fd)
        self.stdin = self.stdout = self.stderr = None


@dataclass
class MachineSettings:
    name: str
    directory: str | None = None
    template: str | None = None
    ephemeral: bool = False
    image: str | None = None
    boot: bool = False
    user: str | None = None
    uuid: bytes | None = None
    slice: str | None = None
    private_network: bool = False
    network_interfaces: list[str] = field(default_factory=list)
    network_macvlan: list[str] = field(default_factory=list)
    network_veth: bool = False
    network_bridge: str | None = None
    selinux_context: str | None = None
    selinux_apifs_context: str | None = None
    capability: list[str] = field(default_factory=list)
    drop_capability: list[str] = field(default_factory=list)
    link_journal: str = "auto"
    link_journal_try: bool = False
    read_only: bool = False
    binds: list[BindMount] = field(default_factory=list)
    tmpfs: list[TmpfsMount] = field(default_factory=list)
    environment: list[str] = field(default_factory=list)
    share_system: bool = False
    register: bool = True
    keep_unit: bool = False
    personality: int | None = None
    volatile: str = "no"
    quiet: bool = False
    private_users: PrivateUsers | None = None
    as_pid2: bool = False
    console: str | None = None
    kill_signal: int | None = None
    command: list[str] = field(default_factory=list)
    terminal: str | None = None
    stdio: Stdio = field(default_factory=Stdio)
    raw: dict[str, Any] = field(default_factory=dict)  # the validated input, for the Settings property
    root_provider: Any = None        # (runtime_dir, cleanup) -> tree.PreparedRoot: a root made elsewhere (guest images)
    working_directory: str | None = None  # chdir here (inside the container) before the command


# Parsing of individual values ------------------------------------------------------

def _absolute(value: str, key: str) -> str:
    if not value.startswith("/"):
        raise InvalidArgs(f"{key}={value!r}: not an absolute path")
    return os.path.normpath(value)


def parse_bind(spec: str, read_only: bool) -> BindMount:
    source, _, destination = spec.partition(":")
    destination = destination or source
    if not source.startswith("/") or not destination.startswith("/"):
        option = "--bind-ro" if read_only else "--bind"
        raise InvalidArgs(f"Invalid bind mount specification: {spec} ({option} takes "
                          "SOURCE[:DESTINATION], both absolute paths)")
    return BindMount(os.path.normpath(source), os.path.normpath(destination), read_only)


def parse_tmpfs(spec: str) -> TmpfsMount:
    path, sep, options = spec.partition(":")
    if not path.startswith("/"):
        raise InvalidArgs(f"Invalid tmpfs specification: {spec} (--tmpfs takes PATH[:OPTIONS], "
                          "PATH absolute)")
    return TmpfsMount(os.path.normpath(path), options if sep else "mode=0755")


def parse_environment(assignments: list[str]) -> list[str]:
    """Validate NAME=VALUE pairs; a later assignment of a name replaces an earlier one."""
    merged: dict[str, str] = {}
    for item in assignments:
        name, sep, _ = item.partition("=")
        if not sep or not ENV_NAME.match(name):
            raise InvalidArgs(f"Environment variable assignment '{item}' is not valid.")
        merged[name] = item
    return list(merged.values())


def parse_uuid(value: str) -> bytes:
    try:
        return uuidlib.UUID(value).bytes
    except ValueError:
        raise InvalidArgs(f"Invalid UUID: {value}") from None


def parse_personality(value: str) -> int:
    if value not in PERSONALITIES:
        raise InvalidArgs(f"Unknown or unsupported personality '{value}'. "
                          f"Known: {', '.join(sorted(PERSONALITIES))}.")
    return PERSONALITIES[value]


def parse_link_journal(value: str) -> tuple[str, bool]:
    mode, tried = (value[4:], True) if value.startswith("try-") else (value, False)
    if mode not in LINK_JOURNAL_MODES or (tried and mode not in ("guest", "host")):
        raise InvalidArgs(f"Failed to parse link journal mode {value} "
                          "(expected no, auto, guest, host, try-guest or try-host)")
    return mode, tried


def parse_volatile(value: str) -> str:
    if value == "state":
        return "state"
    if value.lower() in _TRUE | _FALSE:
        return "yes" if parse_boolean(value, "--volatile=") else "no"
    raise InvalidArgs(f"Failed to parse --volatile= argument: {value} (expected yes, no or state)")


def parse_private_users(value: str) -> PrivateUsers | None:
    lowered = value.lower()
    if lowered in _FALSE:
        return None
    if lowered in _TRUE:
        return PrivateUsers(None, mode="root-owner")
    if lowered == "pick":
        return PrivateUsers(None, mode="pick")
    base_text, _, range_text = value.partition(":")
    try:
        base = int(base_text)
        size = int(range_text) if range_text else PRIVATE_USERS_RANGE
    except ValueError:
        raise InvalidArgs(f"Failed to parse --private-users= argument: {value} "
                          "(expected yes, no, pick or UID[:RANGE])") from None
    if base <= 0 or size <= 0 or base + size > 2**32 - 1:
        raise InvalidArgs(f"--private-users={value}: the range must be a non-empty range of "
                          "non-root host uids below 4294967295")
    return PrivateUsers(base, size)


def parse_console(value: str) -> str:
    if value not in CONSOLE_MODES:
        raise InvalidArgs(f"Unknown console mode: {value} (expected interactive, pipe or passive)")
    return value


def parse_signal_name(value: str) -> int:
    """SIGTERM, TERM, 15, SIGRTMIN+3, RTMIN+3: what systemd's signal_from_string accepts."""
    import signal

    name = value.upper().removeprefix("SIG")
    try:
        if name.isdigit():
            number = int(name)
        elif name.startswith(("RTMIN+", "RTMAX-")):
            base = signal.SIGRTMIN if name.startswith("RTMIN") else signal.SIGRTMAX
            offset = int(name[6:])
            number = base + offset if name[5] == "+" else base - offset
        else:
            number = int(getattr(signal, f"SIG{name}"))
    except (AttributeError, ValueError):
        raise InvalidArgs(f"Failed to parse signal string {value}") from None
    if not 1 <= number <= signal.SIGRTMAX:
        raise InvalidArgs(f"Failed to parse signal string {value}: out of range")
    return number


# From D-Bus ----------------------------------------------------------------------

def _check_types(raw: dict[str, Any]) -> dict[str, Any]:
    """Unwrap variants, rejecting unknown keys and wrong types by name."""
    values = {}
    for key, variant in raw.items():
        expected = SIGNATURES.get(key)
        if expected is None or key == "Machine":
            raise InvalidArgs(f"unknown setting '{key}'; known settings: "
                              f"{', '.join(sorted(k for k in SIGNATURES if k != 'Machine'))}")
        if variant.signature != expected:
            raise InvalidArgs(f"setting '{key}' must be of type '{expected}', "
                              f"got '{variant.signature}'")
        values[key] = variant.value
    return values


def _option(key: str) -> str:
    opt = BY_KEY.get(key)
    return f"--{opt.long}" if opt else key


def _paths(values: dict[str, Any]) -> dict[str, str | None]:
    return {key: (_absolute(values[key], _option(key)) if values.get(key) else None)
            for key in ("Directory", "Template", "Image")}


def from_dbus(name: str, raw: dict[str, Any], machines_dir: Path) -> MachineSettings:
    """Validate StartMachine's arguments into MachineSettings (descriptors are not dup'd here)."""
    values = _check_types(raw)
    paths = _paths(values)
    network_veth = values.get("NetworkVeth", False) or bool(values.get("NetworkBridge"))
    settings = MachineSettings(
        name=name,
        directory=paths["Directory"], template=paths["Template"], image=paths["Image"],
        ephemeral=values.get("Ephemeral", False),
        boot=values.get("Boot", False),
        user=values.get("User") or None,
        uuid=parse_uuid(values["UUID"]) if values.get("UUID") else None,
        slice=values.get("Slice") or None,
        network_interfaces=list(values.get("NetworkInterface", [])),
        network_macvlan=list(values.get("NetworkMacvlan", [])),
        network_veth=network_veth,
        network_bridge=values.get("NetworkBridge") or None,
        selinux_context=values.get("SELinuxContext") or None,
        selinux_apifs_context=values.get("SELinuxApiFsContext") or None,
        capability=list(values.get("Capability", [])),
        drop_capability=list(values.get("DropCapability", [])),
        read_only=values.get("ReadOnly", False),
        binds=[parse_bind(s, False) for s in values.get("Bind", [])]
        + [parse_bind(s, True) for s in values.get("BindReadOnly", [])],
        tmpfs=[parse_tmpfs(s) for s in values.get("TemporaryFileSystem", [])],
        environment=parse_environment(list(values.get("Environment", []))),
        share_system=values.get("ShareSystem", False),
        register=parse_boolean(values["Register"], "--register=") if "Register" in values else True,
        keep_unit=values.get("KeepUnit", False),
        personality=parse_personality(values["Personality"]) if values.get("Personality") else None,
        volatile=parse_volatile(values["Volatile"]) if values.get("Volatile") else "no",
        quiet=values.get("Quiet", False),
        private_users=parse_private_users(values["PrivateUsers"]) if values.get("PrivateUsers") else None,
        as_pid2=values.get("AsPid2", False),
        console=parse_console(values["Console"]) if values.get("Console") else None,
        kill_signal=parse_signal_name(values["KillSignal"]) if values.get("KillSignal") else None,
        command=list(values.get("Command", [])),
        terminal=values.get("Terminal") or None,
        raw={k: v for k, v in raw.items() if SIGNATURES[k] != "h"},
    )
    settings.private_network = (values.get("PrivateNetwork", False) or network_veth
                                or bool(settings.network_interfaces) or bool(settings.network_macvlan))
    if "LinkJournal" in values:
        settings.link_journal, settings.link_journal_try = parse_link_journal(values["LinkJournal"])
    if values.get("LinkJournalTry"):
        settings.link_journal_try = True
    settings.stdio = Stdio(values.get("StandardInput"), values.get("StandardOutput"),
                           values.get("StandardError"))
    if values.get("WorkingDirectory"):
        settings.working_directory = _absolute(values["WorkingDirectory"], "--chdir")
    determine_names(settings, values.get("CallerDirectory"), machines_dir)
    check_combinations(settings)
    return settings


def determine_names(settings: MachineSettings, cwd: str | None, machines_dir: Path) -> None:
    """The seed's determine_names: default directory from the name, default name from the path."""
    if settings.name and not machine_name_is_valid(settings.name):
        raise InvalidArgs(f"Invalid machine name: {settings.name} (up to {MACHINE_NAME_MAX} "
                          "letters, digits, '-', '_' and '.')")
    if not settings.image and not settings.directory:
        if settings.name:
            settings.directory = str(machines_dir / settings.name)
        elif cwd:
            settings.directory = _absolute(cwd, "CallerDirectory")
        else:
            raise InvalidArgs("Failed to determine path, please use -D.")
    if not settings.name:
        base = os.path.basename((settings.image or settings.directory).rstrip("/"))
        settings.name = hostname_cleanup(base)
        if not machine_name_is_valid(settings.name):
            raise InvalidArgs("Failed to determine machine name automatically, please use -M.")


def check_combinations(s: MachineSettings) -> None:
    """The combinations the seed refuses, with its words."""
    if s.share_system:
        s.register = False
    refusals = [
        (s.boot and s.share_system, "--boot and --share-system may not be combined."),
        (bool(s.directory and s.image), "--directory= and --image= may not be combined."),
        (bool(s.template and s.image), "--template= and --image= may not be combined."),
        (s.ephemeral and bool(s.template), "--ephemeral and --template= may not be combined."),
        (s.ephemeral and bool(s.image), "--ephemeral and --image= may not be combined."),
        (s.ephemeral and s.link_journal not in ("no", "auto"),
         "--ephemeral and --link-journal= may not be combined."),
        (s.volatile != "no" and s.read_only,
         "Cannot combine --read-only with --volatile. Note that --volatile already implies a "
         "read-only base hierarchy."),
        (s.directory == "/" and not s.ephemeral,
         "Spawning container on root directory is not supported. Consider using --ephemeral."),
        (s.as_pid2 and s.boot, "--as-pid2 and --boot may not be combined."),
    ]
    for refused, message in refusals:
        if refused:
            raise InvalidArgs(message)
    check_selinux(s)


def selinux_enabled() -> bool:
    return os.path.exists("/sys/fs/selinux/enforce")


def check_selinux(s: MachineSettings) -> None:
    """Labels only mean something when SELinux is on; silently ignoring them would lie."""
    for option, value in (("--selinux-context", s.selinux_context),
                          ("--selinux-apifs-context", s.selinux_apifs_context)):
        if value and not selinux_enabled():
            raise InvalidArgs(f"{option}={value}: SELinux is not enabled on this host "
                              "(/sys/fs/selinux is not mounted); drop the option or enable SELinux")
