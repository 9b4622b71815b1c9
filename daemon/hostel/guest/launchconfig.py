"""From an image's config and a launch request to the process a guest runs.

Both isolation modes use this module: the guest init (inside a VM) and the
container runner (on the host). The rules are the seed's `run`: the request's
command replaces the image's Cmd, the Entrypoint goes in front, /bin/sh is
the last resort; the executable is looked up through PATH inside the
guest's root; the working directory defaults to "/".

The environment is the same in both isolations, and nothing else (what
podman gives): PATH (a default), HOSTNAME, HOME (the image user's home in
the guest's /etc/passwd) and TERM only when the client is on a terminal;
over those the image's Env, over that the request's --env.

The launch request also travels to a VM as launch.json on the config device
(to_json/from_json), so everything in it is validated on the way in and
again on the way out: the guest side trusts nothing the host wrote either.
Only the standard library is used besides hostel.bus, so that the guest
init loads it before it leaves the host's file system."""
from __future__ import annotations

import ipaddress
import json
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from hostel.errors import InvalidArgs

DEFAULT_SHELL = "/bin/sh"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HOSTNAME_MAX = 64
ISOLATIONS = ("container", "vm")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LINK_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,15}")
_USER_PART = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.-]*")


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or "\0" in value:
        raise InvalidArgs(f"{what} must be a string without NUL bytes, got {value!r}")
    return value


def _text_list(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidArgs(f"{what} must be a list of strings, got {value!r}")
    return [_text(item, what) for item in value]


def check_env_name(name: str, what: str) -> str:
    if not _ENV_NAME.fullmatch(name):
        raise InvalidArgs(f"{what}: {name!r} is not a valid environment variable name "
                          "(letters, digits and '_', not starting with a digit)")
    return name


def parse_env_list(items: list[str], what: str) -> dict[str, str]:
    """KEY=VALUE strings to a mapping; a later KEY wins, as the seed's map does."""
    env: dict[str, str] = {}
    for item in items:
        key, sep, value = _text(item, what).partition("=")
        if not sep:
            raise InvalidArgs(f"{what}: {item!r} is not of the form KEY=VALUE")
        env[check_env_name(key, what)] = value
    return env


def check_hostname(name: str) -> str:
    labels = name.split(".")
    if (not name or len(name) > HOSTNAME_MAX or
            not all(label and all(c.isascii() and (c.isalnum() or c in "-_") for c in label)
                    for label in labels)):
        raise InvalidArgs(f"invalid hostname {name!r}: up to {HOSTNAME_MAX} characters, "
                          "dot-separated labels of letters, digits, '-' and '_'")
    return name


def check_user(spec: str) -> str:
    """OCI's User: "", USER, UID, USER:GROUP, UID:GID (names or numbers)."""
    if spec and not all(_USER_PART.fullmatch(part) for part in spec.split(":", 1)):
        raise InvalidArgs(f"invalid user {spec!r}: expected USER, UID, USER:GROUP or UID:GID")
    return spec


# The image side ---------------------------------------------------------------------

@dataclass(frozen=True)
class ImageConfig:
    """The part of an OCI image configuration ("config" of config.json) that decides the process."""

    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)
    working_dir: str = ""
    user: str = ""

    @classmethod
    def from_json(cls, document: Any) -> ImageConfig:
        """From a parsed config.json (the whole document; "config" may be absent or null)."""
        if not isinstance(document, dict):
            raise InvalidArgs("image configuration is not a JSON object; re-import the image")
        config = document.get("config") or {}
        if not isinstance(config, dict):
            raise InvalidArgs("image configuration's 'config' is not a JSON object")
        env = _text_list(config.get("Env"), "image Env")
        parse_env_list(env, "image Env")
        return cls(entrypoint=_text_list(config.get("Entrypoint"), "image Entrypoint"),
                   cmd=_text_list(config.get("Cmd"), "image Cmd"),
                   env=env,
                   working_dir=_text(config.get("WorkingDir") or "", "image WorkingDir"),
                   user=check_user(_text(config.get("User") or "", "image User")))


# The request side ---------------------------------------------------------------------

@dataclass(frozen=True)
class NetworkConfig:
    """One interface configured by the guest: addresses in CIDR form, gateways bare."""

    link: str
    ipv4_address: str
    ipv4_gateway: str
    ipv6_address: str = ""
    ipv6_gateway: str = ""
    nameservers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not _LINK_NAME.fullmatch(self.link or ""):
            raise InvalidArgs(f"invalid network link name {self.link!r}")
        _check_ip(self.ipv4_address, ipaddress.ip_interface, 4, "IPv4 address")
        _check_ip(self.ipv4_gateway, ipaddress.ip_address, 4, "IPv4 gateway")
        if self.ipv6_address or self.ipv6_gateway:
            _check_ip(self.ipv6_address, ipaddress.ip_interface, 6, "IPv6 address")
            _check_ip(self.ipv6_gateway, ipaddress.ip_address, 6, "IPv6 gateway")
        for server in self.nameservers:
            try:
                ipaddress.ip_address(server)
            except ValueError:
                raise InvalidArgs(f"invalid DNS resolver address {server!r}") from None


def _check_ip(value: str, parse: Callable[[str], Any], version: int, what: str) -> None:
    """An address (or, with ip_interface, ADDRESS/PREFIX: the prefix must be explicit)."""
    try:
        parsed = parse(value)
    except ValueError:
        parsed = None
    explicit = parse is not ipaddress.ip_interface or "/" in value
    if parsed is None or parsed.version != version or not explicit:
        hint = ": expected ADDRESS/PREFIX" if parse is ipaddress.ip_interface else ""
        raise InvalidArgs(f"invalid {what} {value!r}{hint}")


@dataclass(frozen=True)
class LaunchRequest:
    """What the caller asked for; None for command means "the image's Cmd"."""

    command: list[str] | None = None
    env: dict[str, str] = field(default_factory=dict)
    hostname: str | None = None
    network: NetworkConfig | None = None
    isolation: str = "container"
    terminal: str | None = None    # the client's TERM when it is on a terminal
    # A benchmark's: hostel's static init writes the boot marker (123 to port 0x3f0,
    # timestamped by the launcher) right before it executes the task. Never set by
    # hosteld; the reference init (init.py, which runs on hosts) ignores it.
    boot_marker: bool = False

    def __post_init__(self) -> None:
        if self.command is not None:
            _text_list(self.command, "command")
        for key, value in self.env.items():
            check_env_name(key, "environment")
            _text(value, f"environment variable {key}")
        if self.hostname is not None:
            check_hostname(self.hostname)
        if self.terminal is not None and (not _text(self.terminal, "terminal") or
                                          "=" in self.terminal):
            raise InvalidArgs(f"invalid terminal type {self.terminal!r}: a TERM value such as "
                              "xterm-256color")
        if not isinstance(self.boot_marker, bool):
            raise InvalidArgs(f"boot_marker must be true or false, got {self.boot_marker!r}")
        if self.isolation not in ISOLATIONS:
            raise InvalidArgs(f"unknown isolation {self.isolation!r}: expected "
                              f"{' or '.join(ISOLATIONS)}")

    def to_json(self) -> str:
        network = None if self.network is None else {
            "link": self.network.link, "ipv4": {"address": self.network.ipv4_address,
                                                "gateway": self.network.ipv4_gateway},
            "ipv6": {"address": self.network.ipv6_address, "gateway": self.network.ipv6_gateway},
            "resolver": {"nameservers": list(self.network.nameservers)}}
        return json.dumps({"run": self.command, "env": self.env, "hostname": self.hostname,
                           "network": network, "isolation": self.isolation,
                           "terminal": self.terminal, "boot_marker": self.boot_marker}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> LaunchRequest:
        try:
            doc = json.loads(text)
        except ValueError as e:
            raise InvalidArgs(f"launch configuration is not valid JSON: {e}") from None
        if not isinstance(doc, dict):
            raise InvalidArgs("launch configuration is not a JSON object")
        net = doc.get("network")
        network = None
        if net is not None:
            try:
                network = NetworkConfig(
                    link=net["link"], ipv4_address=net["ipv4"]["address"],
                    ipv4_gateway=net["ipv4"]["gateway"],
                    ipv6_address=net.get("ipv6", {}).get("address", ""),
                    ipv6_gateway=net.get("ipv6", {}).get("gateway", ""),
                    nameservers=tuple(net.get("resolver", {}).get("nameservers", [])))
            except (KeyError, TypeError, AttributeError) as e:
                raise InvalidArgs(f"launch configuration's network lacks {e}") from None
        env = doc.get("env") or {}
        if not isinstance(env, dict):
            raise InvalidArgs("launch configuration's env is not a JSON object")
        command = doc.get("run")
        return cls(command=None if command is None else _text_list(command, "command"),
                   env=env, hostname=doc.get("hostname"), network=network,
                   isolation=doc.get("isolation", "container"), terminal=doc.get("terminal"),
                   boot_marker=doc.get("boot_marker", False))


# The answer ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Process:
    path: str              # what execve gets (resolved through PATH when it could be)
    argv: list[str]        # argv[0] is the executable's file name, as the seed passes it
    env: dict[str, str]
    cwd: str
    user: str              # OCI User ("" means the image's default, root)

    @property
    def env_list(self) -> list[str]:
        return [f"{key}={value}" for key, value in self.env.items()]


def resolve_executable(env: dict[str, str], name: str, is_file: Callable[[str], bool]) -> str:
    """The seed's resolve_executable, with `is_file` asked about paths in the guest's root.

    An absolute name is taken as it is; a relative one that names a file from
    "/" (the guest's cwd at that point) is made absolute; otherwise each PATH
    entry is tried; a name found nowhere is returned unchanged, so execve
    reports it."""
    if name.startswith("/"):
        return name
    if is_file(posixpath.normpath("/" + name)):
        return posixpath.normpath("/" + name)
    for directory in env.get("PATH", "").split(":"):
        candidate = posixpath.join(directory, name)
        if directory and is_file(candidate):
            return candidate
    return name


def environment(image: ImageConfig, request: LaunchRequest, home: str) -> dict[str, str]:
    """PATH, HOSTNAME, HOME, TERM (on a terminal), then the image's Env, then the request's."""
    env = {"PATH": DEFAULT_PATH}
    if request.hostname:
        env["HOSTNAME"] = request.hostname
    env["HOME"] = home
    if request.terminal:
        env["TERM"] = request.terminal
    env.update(parse_env_list(image.env, "image Env"))
    env.update(request.env)
    return env


def build_process(image: ImageConfig, request: LaunchRequest,
                  is_file: Callable[[str], bool], home: str) -> Process:
    """home: the image user's home directory in the guest's /etc/passwd (see environment)."""
    command = list(image.cmd) if request.command is None else list(request.command)
    command = list(image.entrypoint) + command
    if not command:
        command = [DEFAULT_SHELL]
    env = environment(image, request, home)
    path = resolve_executable(env, command[0], is_file)
    argv = [posixpath.basename(path) or path] + command[1:]
    cwd = image.working_dir or "/"
    if not cwd.startswith("/"):
        cwd = posixpath.normpath("/" + cwd)
    return Process(path=path, argv=argv, env=env, cwd=cwd, user=image.user)
