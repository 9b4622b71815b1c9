"""What a guest is made of: the launcher's options as a validated dataclass.

The same settings come from `hostelctl guest launch` (the lguest launcher's
command line) and from StartGuest's a{sv}; both end here."""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from hostel.errors import InvalidArgs

MIN_MEMORY_MB = 2
MAX_MEMORY_MB = 1 << 20
BACKENDS = ("kvm", "lguest")
MAX_CPUS = 254
ON_REBOOT = ("exit", "restart")
_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class BlockSpec:
    path: Path
    read_only: bool = False


@dataclass(frozen=True)
class NetSpec:
    """--tunnet=IP[:MAC] (a tap with that host address) or bridge:BR[:MAC]."""

    address: str = ""
    bridge: str = ""
    mac: str = ""


@dataclass(frozen=True)
class GuestSettings:
    memory_mb: int
    kernel: Path
    cmdline: str = ""
    initrd: Path | None = None
    block: tuple[BlockSpec, ...] = ()
    network: tuple[NetSpec, ...] = ()
    rng: bool = False
    console_log: Path | None = None
    backend: str = "kvm"
    chroot: Path | None = None
    username: str = ""
    verbose: bool = False
    cpus: int = 1
    on_reboot: str = "exit"     # a guest reboot ends it ("exit") or boots it again ("restart")

    def __post_init__(self) -> None:
        if not MIN_MEMORY_MB <= self.memory_mb <= MAX_MEMORY_MB:
            raise InvalidArgs(f"memory {self.memory_mb} MB is out of range "
                              f"({MIN_MEMORY_MB}..{MAX_MEMORY_MB} MB)")
        if not 1 <= self.cpus <= MAX_CPUS:
            raise InvalidArgs(f"{self.cpus} vCPUs is out of range (1..{MAX_CPUS})")
        if self.on_reboot not in ON_REBOOT:
            raise InvalidArgs(f"--on-reboot={self.on_reboot}: use one of {', '.join(ON_REBOOT)}")
        if self.backend not in BACKENDS:
            raise InvalidArgs(f"unknown backend {self.backend!r}; use one of {', '.join(BACKENDS)}")
        paths = [("kernel", self.kernel), ("initrd", self.initrd), ("chroot", self.chroot),
                 ("console log", self.console_log)] + [("block", b.path) for b in self.block]
        for label, path in paths:
            if path is not None and not path.is_absolute():
                raise InvalidArgs(f"the {label} path {str(path)!r} must be absolute")
        if "\0" in self.cmdline:
            raise InvalidArgs("the kernel command line contains a NUL byte")


def validate_name(name: str) -> str:
    if not _NAME.match(name):
        raise InvalidArgs(f"guest name {name!r} is invalid: use 1-64 letters, digits, '_', '.', "
                          "'-', starting with a letter or digit")
    return name


def parse_tunnet(arg: str) -> NetSpec:
    """The seed's --tunnet syntax: IP[:MAC] or bridge:NAME[:MAC] (MAC has colons too)."""
    if arg.startswith("bridge:"):
        rest = arg[len("bridge:"):]
        bridge, _, mac = rest.partition(":")
        if not _IFNAME.match(bridge):
            raise InvalidArgs(f"--tunnet={arg}: {bridge!r} is not a valid bridge name")
        spec = NetSpec(bridge=bridge, mac=mac)
    else:
        address, _, mac = arg.partition(":")
        try:
            ipaddress.IPv4Address(address)
        except ipaddress.AddressValueError as e:
            raise InvalidArgs(f"--tunnet={arg}: {address!r} is not an IPv4 address") from e
        spec = NetSpec(address=address, mac=mac)
    if spec.mac and not _MAC.match(spec.mac):
        raise InvalidArgs(f"--tunnet={arg}: {spec.mac!r} is not a MAC address (xx:xx:xx:xx:xx:xx)")
    return spec
