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

from hostel.bus import HostelError, InvalidArgs
from hostel.machine import cgroup_properties, credentials, limits, nspawn_settings, overlays
from hostel.machine import bind_user as bind_user_
from hostel.machine import network_zone, port_forward
from hostel.machine.options import BY_KEY, SIGNATURES
from hostel.machine.overlays import Overlay, ResolvedOverlay
from hostel.settingsdict import unwrap

MACHINE_NAME_MAX = 64
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
PER_LINUX = 0x0000
PER_LINUX32 = 0x0008
PERSONALITIES = {"x86": PER_LINUX32, "x86-64": PER_LINUX}
LINK_JOURNAL_MODES = {"no", "auto", "guest", "host"}
CONSOLE_MODES = ("interactive", "read-only", "passive", "pipe")  # nspawn 252's
VOLATILE_MODES = {"no", "yes", "state"}
PRIVATE_USERS_RANGE = 0x10000
OWNERSHIP_MODES = ("off", "chown", "map", "auto")
TIMEZONE_MODES = ("off", "copy", "bind", "symlink", "delete", "auto")
RESOLV_CONF_MODES = ("off", "copy-host", "copy-static", "copy-uplink", "copy-stub",
                     "replace-host", "replace-static", "replace-uplink", "replace-stub",
                     "bind-host", "bind-static", "bind-uplink", "bind-stub", "delete", "auto")
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
        for fd in {fd for fd in (self.stdin, self.stdout, self.stderr) if fd is not None}:
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
    network_zone: str | None = None  # --network-zone: the zone's bridge, vz-NAME
    ports: list[port_forward.PortSpec] = field(default_factory=list)  # -p/--port
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
    @property
    def ownership(self) -> str:
        """--private-users-ownership in effect: as given, else auto with "pick", else off
        (nspawn 252's defaults; userns.py carries it out)."""
        if self.private_users_ownership is not None:
            return self.private_users_ownership
        return "auto" if self.private_users is not None and self.private_users.mode == "pick" \
            else "off"

    hostname: str | None = None      # --hostname: the UTS name, when not the machine's name
    no_new_privileges: bool = False
    rlimits: dict[str, limits.RLimit] = field(default_factory=dict)  # by resource name
    oom_score_adjust: int | None = None
    cpu_affinity: frozenset[int] | None = None
    syscall_allow: frozenset[str] = frozenset()  # --system-call-filter: names and @groups
    syscall_deny: frozenset[str] = frozenset()   # its "~" lists
    properties: list[cgroup_properties.Property] = field(default_factory=list)  # --property
    credentials: list[credentials.Credential] = field(default_factory=list)
    private_users_ownership: str | None = None  # --private-users-ownership, as given
    overlays: list[Overlay] = field(default_factory=list)  # --overlay, --overlay-ro
    resolved_overlays: list[ResolvedOverlay] = field(default_factory=list)  # made at the start
    timezone: str = "auto"           # --timezone: TIMEZONE_MODES
    resolv_conf: str = "auto"        # --resolv-conf: RESOLV_CONF_MODES
    bind_user: list[str] = field(default_factory=list)  # --bind-user, each name once
    bound_users: list[bind_user_.BoundUser] = field(default_factory=list)  # made at the start

    def wants_process_limits(self) -> bool:
        """Whether hosteld sets limits on the child before it may go on (limits.apply)."""
        return bool(self.rlimits) or self.cpu_affinity is not None \
            or self.oom_score_adjust is not None
    exact_environment: bool = False  # the payload gets `environment` and nothing else (guest images: launchconfig's rules)


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
    if value in ("state", "overlay"):
        return value
    if value.lower() in _TRUE | _FALSE:
        return "yes" if parse_boolean(value, "--volatile=") else "no"
    raise InvalidArgs(f"Failed to parse --volatile= argument: {value} "
                      "(expected yes, no, state or overlay)")


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
        raise InvalidArgs(f"Unknown console mode: {value} (expected {', '.join(CONSOLE_MODES)})")
    return value


def console_mode(values: dict[str, Any]) -> str | None:
    """--console=MODE, or --pipe/-P (nspawn 252: the same as --console=pipe)."""
    mode = parse_console(values["Console"]) if values.get("Console") else None
    if values.get("Pipe"):
        if mode not in (None, "pipe"):
            raise InvalidArgs(f"--pipe and --console={mode} may not be combined "
                              "(--pipe means --console=pipe)")
        return "pipe"
    return mode


def parse_syscall_filter(values: list[str]) -> tuple[frozenset[str], frozenset[str]]:
    """--system-call-filter=[~]NAME... (repeatable): the words to allow, and to deny."""
    from hostel.machine import seccomp

    allow: set[str] = set()
    deny: set[str] = set()
    for value in values:
        negative = value.startswith("~")
        for word in value.removeprefix("~").split():
            try:
                seccomp.check_filter_item(word)
            except HostelError as e:
                raise InvalidArgs(f"--system-call-filter={value}: {e}") from None
            (deny if negative else allow).add(word)
    return frozenset(allow), frozenset(deny)


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

# What StartMachine takes: every option but the machine's name, which is its own argument.
DBUS_SIGNATURES = {key: signature for key, signature in SIGNATURES.items() if key != "Machine"}


def _option(key: str) -> str:
    opt = BY_KEY.get(key)
    return f"--{opt.long}" if opt else key


def _paths(values: dict[str, Any]) -> dict[str, str | None]:
    return {key: (_absolute(values[key], _option(key)) if values.get(key) else None)
            for key in ("Directory", "Template", "Image")}


def from_dbus(name: str, raw: dict[str, Any], machines_dir: Path) -> MachineSettings:
    """Validate StartMachine's arguments into MachineSettings (descriptors are not dup'd here).

    The machine's .nspawn file, if any, is merged in once the name and root are known
    (nspawn_settings), and the merged settings are validated again as a whole."""
    values = unwrap(raw, DBUS_SIGNATURES, "setting")
    settings = _build(name, values, raw)
    determine_names(settings, values.get("CallerDirectory"), machines_dir)
    mode = values.get("Settings") or "yes"
    if mode not in nspawn_settings.SETTINGS_MODES:
        if mode.lower() in _TRUE | _FALSE:
            mode = "yes" if parse_boolean(mode, "--settings=") else "no"
        else:
            raise InvalidArgs(f"Failed to parse --settings= argument: {mode} "
                              "(expected yes, no, trusted or override)")
    merged, warnings = nspawn_settings.load(mode, settings.name, settings.image,
                                            settings.directory, values, check_value)
    if merged is not values:
        settings = _build(settings.name, merged, raw)
        determine_names(settings, merged.get("CallerDirectory"), machines_dir)
    nspawn_settings.show_warnings(warnings, values.get("StandardError"))
    check_combinations(settings)
    return settings


def check_value(key: str, value: Any) -> None:
    """Raise InvalidArgs unless `value` is one setting `key` takes (for a settings file's)."""
    if key in ("Capability", "DropCapability"):
        from hostel.machine import capabilities

        capabilities.parse_capabilities(value, f"{key}=")
        return
    _build("check", {key: value}, {})


def _build(name: str, values: dict[str, Any], raw: dict[str, Any]) -> MachineSettings:
    """MachineSettings from unwrapped values, each parsed; combinations are checked later."""
    paths = _paths(values)
    network_veth = (values.get("NetworkVeth", False) or bool(values.get("NetworkBridge"))
                    or "NetworkZone" in values)
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
        network_zone=(network_zone.bridge_name(values["NetworkZone"])
                      if "NetworkZone" in values else None),
        ports=port_forward.parse_ports(list(values.get("Port", []))),
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
        console=console_mode(values),
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
    _build_exec_options(settings, values)
    return settings


def _build_exec_options(settings: MachineSettings, values: dict[str, Any]) -> None:
    """The options of nspawn 252's that the seed lacks: each parsed with 252's rules."""
    if values.get("Hostname"):
        if not hostname_is_valid(values["Hostname"]):
            raise InvalidArgs(f"Hostname '{values['Hostname']}' is not valid.")
        settings.hostname = values["Hostname"]
    if values.get("NoNewPrivileges"):
        settings.no_new_privileges = parse_boolean(values["NoNewPrivileges"],
                                                   "--no-new-privileges=")
    settings.rlimits = limits.parse_rlimits(list(values.get("RLimits", [])))
    if values.get("OOMScoreAdjust"):
        settings.oom_score_adjust = limits.parse_oom_score_adjust(values["OOMScoreAdjust"])
    if values.get("CPUAffinity"):
        settings.cpu_affinity = limits.parse_cpu_affinity(values["CPUAffinity"])
    settings.syscall_allow, settings.syscall_deny = parse_syscall_filter(
        list(values.get("SystemCallFilter", [])))
    settings.properties = cgroup_properties.parse_properties(list(values.get("Property", [])))
    settings.credentials = credentials.parse(list(values.get("SetCredential", [])),
                                             list(values.get("LoadCredential", [])))
    if values.get("PrivateUsersOwnership"):
        if values["PrivateUsersOwnership"] not in OWNERSHIP_MODES:
            raise InvalidArgs("Cannot parse --private-users-ownership= value: "
                              f"{values['PrivateUsersOwnership']} (expected off, chown, map or auto)")
        settings.private_users_ownership = values["PrivateUsersOwnership"]
    settings.overlays = [overlays.parse_overlay(spec, key == "OverlayReadOnly",
                                                values.get("CallerDirectory"))
                         for key in ("Overlay", "OverlayReadOnly") for spec in values.get(key, [])]
    if values.get("Timezone"):
        if values["Timezone"] not in TIMEZONE_MODES:
            raise InvalidArgs(f"Failed to parse /etc/localtime mode: {values['Timezone']} "
                              f"(expected {', '.join(TIMEZONE_MODES)})")
        settings.timezone = values["Timezone"]
    if values.get("ResolvConf"):
        if values["ResolvConf"] not in RESOLV_CONF_MODES:
            raise InvalidArgs(f"Failed to parse /etc/resolv.conf mode: {values['ResolvConf']} "
                              f"(expected {', '.join(RESOLV_CONF_MODES)})")
        settings.resolv_conf = values["ResolvConf"]
    settings.bind_user = bind_user_.parse_names(list(values.get("BindUser", [])))


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
        base = os.path.basename((settings.image or settings.directory or "").rstrip("/"))
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
        (bool(s.network_bridge and s.network_zone),
         "--network-bridge= and --network-zone= may not be combined."),
        (bool(s.ports) and not s.private_network, "Cannot use --port= without private networking."),
        (s.keep_unit and bool(s.properties),
         "--property= needs the machine's own scope, to hold the limits: drop --keep-unit."),
        (bool(s.bind_user) and s.private_users is None, "--bind-user= requires --private-users"),
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
