"""Container networking: veth pairs, bridges, zones (network_zone.py), macvlan, moved
interfaces, and the --port watcher's life (port_forward.py).

All of it runs in the parent after the child was cloned with CLONE_NEWNET and
before it execs its payload. The container's namespace is reached through
/proc/PID/ns/net: links are created straight into it (IFLA_NET_NS_FD), and the
few operations that must happen inside it (loopback up, reading addresses) go
through a netlink socket opened there by a helper thread (rtnl.open_in_netns),
so the daemon never forks and never changes its own namespace. Netlink is
spoken through rtnl.py, not pyroute2, which costs 1-2 ms per request.

The functions here block on netlink; the daemon calls them from a worker
thread (asyncio.to_thread), never from the event loop.

MAC addresses are derived the way systemd-nspawn derives them, so a container
keeps the same addresses across restarts and matches what nspawn would give
it on the same host: SipHash-2-4 of the host's machine ID and the machine
name (plus an index for the second and later macvlans) under fixed keys."""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

import pyudev

from hostel.bus import HostelError, InvalidArgs
from hostel.machine import link_removal, network_zone, port_forward, rtnl
from hostel.machine.port_forward import PortForwarder, PortSpec
from hostel.machine.siphash import siphash24

IFNAMSIZ = 16
CONTAINER_IFNAME = "host0"
LOOPBACK_IFINDEX = 1  # every network namespace registers its loopback first
ARPHRD_LOOPBACK = 772
IFA_F_DEPRECATED = 0x20
RT_SCOPE_HOST = 254

# Fixed keys, so that the addresses agree with systemd-nspawn's.
HOST_HASH_KEY = bytes.fromhex("1a376fc746ec450bada3d53106605db1")
CONTAINER_HASH_KEY = bytes.fromhex("c3c4f919b557b21ce6cf1427039ceea2")
MACVLAN_HASH_KEY = bytes.fromhex("00136dbc66834481bb0cf9511f24a66f")

log = logging.getLogger(__name__)

MACHINE_ID_PATH = Path("/etc/machine-id")
SYS_CLASS_NET = Path("/sys/class/net")
UDEV_CONTROL = Path("/run/udev/control")

_HINTS = {
    errno.EEXIST: "an interface with this name exists already",
    errno.ENODEV: "the interface is gone",
    errno.ESRCH: "the container's process is gone",
}


class NetworkError(HostelError):
    """Setting up or inspecting a container's network failed."""


# MAC addresses -------------------------------------------------------------


def read_machine_id(path: Path = MACHINE_ID_PATH) -> bytes:
    """The host's 16-byte machine ID: it makes MAC addresses unique to this host."""
    fix = f"create it with 'systemd-machine-id-setup' (or 'dbus-uuidgen > {path}')"
    try:
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except FileNotFoundError:
        raise NetworkError(f"{path} is missing, so container MAC addresses cannot be derived; {fix}") from None
    except OSError as err:
        raise NetworkError(f"reading {path}: {err.strerror}") from err
    if len(text) != 32 or any(c not in "0123456789abcdefABCDEF" for c in text) or not text.strip("0"):
        raise NetworkError(f"{path} does not hold a machine ID (32 hexadecimal digits, not all zero): "
                           f"{text[:40]!r}; {fix}")
    return bytes.fromhex(text)


def generate_mac(machine_name: str, hash_key: bytes, index: int, host_machine_id: bytes) -> str:
    """A stable, locally administered unicast MAC for link `index` of `machine_name`.

    Like systemd-nspawn, the index takes part in the hash only when it is not
    zero: the first link of each kind is keyed by host and name alone."""
    if len(host_machine_id) != 16:
        raise ValueError(f"host machine ID must be 16 bytes, not {len(host_machine_id)}")
    data = host_machine_id + machine_name.encode()
    if index > 0:
        data += index.to_bytes(8, "little")
    octets = bytearray(siphash24(hash_key, data)[:6])
    octets[0] = (octets[0] & 0xFE) | 0x02  # unicast, locally administered
    return ":".join(f"{b:02x}" for b in octets)


# Settings ------------------------------------------------------------------


def veth_name(machine_name: str, bridged: bool) -> str:
    """Host-side veth name: ve-NAME, or vb-NAME when bridged.

    Cut to 14 characters, one less than the kernel allows, because that is
    what systemd-nspawn v219 produces, and tools that look for a machine's
    veth by name expect the same string."""
    return f"{'vb' if bridged else 've'}-{machine_name}"[:IFNAMSIZ - 2]


def macvlan_name(parent: str) -> str:
    """Name of the macvlan made on `parent` inside the container."""
    return f"mv-{parent}"[:IFNAMSIZ - 1]


def check_ifname(name: str, option: str) -> None:
    """Reject what the kernel would refuse as an interface name, naming the option."""
    if not name:
        raise InvalidArgs(f"{option}=: empty interface name")
    if len(name.encode()) > IFNAMSIZ - 1:
        raise InvalidArgs(f"{option}={name}: interface names are at most {IFNAMSIZ - 1} bytes long")
    if name in (".", "..") or any(c in "/:" or c.isspace() for c in name):
        raise InvalidArgs(f"{option}={name}: not a valid interface name "
                          "(no '/', ':' or whitespace, not '.' or '..')")


def _host_ifindex(name: str, option: str) -> int:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        raise InvalidArgs(f"{option}={name}: no such interface") from None


def _is_loopback(name: str) -> bool:
    try:
        return int((SYS_CLASS_NET / name / "type").read_text()) == ARPHRD_LOOPBACK
    except FileNotFoundError:
        return False


def _check_udev_initialized(name: str, option: str) -> None:
    """Refuse an interface udev is still renaming: it could change name under us.

    Without a running udev nothing renames interfaces, so there is nothing
    to wait for."""
    if not UDEV_CONTROL.exists():
        return
    try:
        device = pyudev.Devices.from_name(pyudev.Context(), "net", name)
    except pyudev.DeviceNotFoundError:
        raise InvalidArgs(f"{option}={name}: udev does not know this interface") from None
    if not device.is_initialized:
        raise NetworkError(f"{option}={name}: udev has not initialized this interface yet; "
                           "wait for it ('udevadm settle') and try again")


def _check_host_interface(name: str, option: str) -> None:
    check_ifname(name, option)
    _host_ifindex(name, option)
    if _is_loopback(name):
        raise InvalidArgs(f"{option}={name}: the loopback interface cannot be given to a container")
    _check_udev_initialized(name, option)


@dataclass
class NetworkSettings:
    """The network options of a container (systemd-nspawn's --private-network,
    --network-veth, --network-bridge, --network-zone, --network-interface,
    --network-macvlan, --port)."""

    private_network: bool = False
    veth: bool = False
    bridge: str | None = None
    interfaces: list[str] = field(default_factory=list)
    macvlan: list[str] = field(default_factory=list)
    zone: str | None = None  # the zone's bridge name, vz-NAME (network_zone.bridge_name)
    ports: list[PortSpec] = field(default_factory=list)

    @property
    def private(self) -> bool:
        """Whether the container gets its own network namespace: every network option implies one."""
        return (self.private_network or self.uses_veth
                or bool(self.interfaces) or bool(self.macvlan))

    @property
    def uses_veth(self) -> bool:
        """A bridge or zone is joined through a veth, so --network-bridge and
        --network-zone imply --network-veth."""
        return self.veth or self.bridge is not None or self.zone is not None

    def validate(self) -> None:
        """Check every named interface on the host now, so a typo fails the call
        instead of a half-built container."""
        seen: set[str] = set()
        for name in self.interfaces:
            _check_host_interface(name, "--network-interface")
            if name in seen:
                raise InvalidArgs(f"--network-interface={name}: given twice")
            seen.add(name)
        parents: dict[str, str] = {}  # macvlan name -> parent
        for name in self.macvlan:
            _check_host_interface(name, "--network-macvlan")
            if name in self.interfaces:
                raise InvalidArgs(f"--network-macvlan={name}: this interface is moved into the "
                                  "container by --network-interface, so no macvlan can be made on it")
            other = parents.get(macvlan_name(name))
            if other == name:
                raise InvalidArgs(f"--network-macvlan={name}: given twice")
            if other is not None:
                raise InvalidArgs(f"--network-macvlan={name}: its macvlan would be named "
                                  f"{macvlan_name(name)}, like the one for {other}")
            parents[macvlan_name(name)] = name
        if self.bridge is not None:
            self._validate_bridge(self.bridge)

    def _validate_bridge(self, bridge: str) -> None:
        option = "--network-bridge"
        check_ifname(bridge, option)
        _host_ifindex(bridge, option)
        if not (SYS_CLASS_NET / bridge / "bridge").is_dir():
            raise InvalidArgs(f"{option}={bridge}: this interface is not a bridge")
        if bridge in self.interfaces:
            raise InvalidArgs(f"{option}={bridge}: the bridge cannot also be moved into "
                              "the container by --network-interface")


# Netlink plumbing ----------------------------------------------------------


def _failed(what: str, err: OSError, hints: dict[int, str] | None = None) -> NetworkError:
    code = err.errno or 0
    hint = (hints or {}).get(code) or _HINTS.get(code)
    detail = getattr(err, "detail", "")
    text = os.strerror(code) + (f": {detail}" if detail else "")
    return NetworkError(f"{what}: {text}" + (f" ({hint})" if hint else ""))


def _require_no_event_loop() -> None:
    """Netlink requests block (the zone lock for seconds, at worst): never on the daemon's loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError("container network setup blocks on netlink: call it through asyncio.to_thread")


def open_netns(pid: int) -> int:
    """A descriptor for the network namespace of `pid`; holding it pins that namespace."""
    try:
        return os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetworkError(f"opening the network namespace of process {pid}: "
                           "the process is gone (did the container exit early?)") from None


def _refuse_host_namespace(nsfd: int, pid: int) -> None:
    """A child cloned without CLONE_NEWNET would get host0 and the moved
    interfaces in the host's own namespace: refuse rather than rewire the host."""
    if os.fstat(nsfd).st_ino == os.stat("/proc/thread-self/ns/net").st_ino:
        raise NetworkError(f"process {pid} shares the host's network namespace; a container "
                           "with a private network must be cloned with CLONE_NEWNET")


def container_netlink(nsfd: int, pid: int, groups: int = 0, *,
                      nonblocking: bool = False) -> rtnl.Rtnl:
    """A netlink socket inside the container's namespace (see rtnl.open_in_netns)."""
    try:
        return rtnl.open_in_netns(nsfd, groups, nonblocking=nonblocking)
    except OSError as err:
        raise NetworkError(f"entering the network namespace of process {pid}: {err.strerror}") from err


def _host_index(name: str) -> int:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        raise NetworkError(f"looking up interface {name} on the host: no such interface "
                           "(was it renamed or removed meanwhile?)") from None


# Setup and teardown --------------------------------------------------------


@dataclass
class NetworkSetup:
    """What setup_network made: the machine's NetworkInterfaces, and what teardown removes."""

    machine_name: str
    pid: int
    interfaces: list[int] = field(default_factory=list)
    host_veth: str | None = None
    host_veth_index: int | None = None
    macvlans: list[str] = field(default_factory=list)
    moved: list[str] = field(default_factory=list)
    zone_bridge: str | None = None  # --network-zone's bridge, removed once no member is left
    # --port specs (PortSpec's str): the hosteld that adopts the machine follows its
    # address with them again (resume_forwarding); what it cannot follow is purged at exit.
    ports: list[str] = field(default_factory=list)
    # Pins the container's namespace while it has moved interfaces, so that teardown can
    # hand them back after the container ended (virtual links would die with it). Only
    # meaningful in this process: restore() drops a saved one.
    netns_fd: int = -1

    @classmethod
    def restore(cls, saved: dict) -> "NetworkSetup":
        """The setup of a machine an earlier hosteld started, from its state file; the
        namespace of a still running leader is pinned again for its moved interfaces."""
        setup = cls(**{k: v for k, v in saved.items() if k != "netns_fd"})
        if setup.moved:
            try:
                nsfd = open_netns(setup.pid)
            except NetworkError as err:
                log.warning("machine %s: cannot hand %s back at its exit: %s",
                            setup.machine_name, ", ".join(setup.moved), err)
                return setup
            if os.fstat(nsfd).st_ino == os.stat("/proc/thread-self/ns/net").st_ino:
                os.close(nsfd)  # not the container's (the pid is someone else's now)
            else:
                setup.netns_fd = nsfd
        return setup


def setup_network(settings: NetworkSettings, machine_name: str, pid: int) -> NetworkSetup:
    """Give the container `pid` (already in its own network namespace) its links.

    Order as in systemd-nspawn: move interfaces in, create the veth pair,
    join the bridge or zone, create macvlans; then loopback up. On failure
    whatever was done is undone before the error is raised."""
    setup = NetworkSetup(machine_name, pid)
    if not settings.private:
        return setup
    _require_no_event_loop()
    if settings.uses_veth:
        _check_machine_name(machine_name)
    # Only MACs need the machine ID: a bare --private-network works without one.
    machine_id = read_machine_id() if settings.uses_veth or settings.macvlan else b""
    nsfd = open_netns(pid)
    try:
        _refuse_host_namespace(nsfd, pid)
        with rtnl.Rtnl() as host, container_netlink(nsfd, pid) as container:
            try:
                _populate(setup, settings, host, container, nsfd, machine_id)
            except HostelError as err:
                for problem in _undo(setup, host, container):
                    err.add_note(problem)
                raise
    except BaseException:
        os.close(nsfd)
        raise
    if setup.moved:
        setup.netns_fd = nsfd  # teardown hands them back (see NetworkSetup.netns_fd)
    else:
        os.close(nsfd)
    return setup


# --port watchers by (machine name, leader pid): a thread is no state-file material.
_FORWARDERS: dict[tuple[str, int], PortForwarder] = {}


def _start_forwarding(setup: NetworkSetup, ports: list[PortSpec], nsfd: int) -> None:
    """Follow the container's address with its --port rules (port_forward.py); a failure
    undoes the links made, like any other part of the setup."""
    watch = container_netlink(nsfd, setup.pid, rtnl.RTMGRP_IPV4_IFADDR, nonblocking=True)
    try:
        forwarder = PortForwarder(setup.machine_name, ports, watch,
                                  container_netlink(nsfd, setup.pid))
    except BaseException:
        watch.close()
        raise
    try:
        forwarder.start()
    except BaseException as err:
        forwarder.stop()
        if isinstance(err, OSError):
            raise NetworkError(f"forwarding --port into the container: {err}") from err
        raise
    _FORWARDERS[(setup.machine_name, setup.pid)] = forwarder


def resume_forwarding(setup: NetworkSetup) -> None:
    """After a hosteld restart: follow the adopted container's address with its --port
    rules again, as the hosteld that started it did. Its namespace is its leader's
    (/proc/PID/ns/net; the caller has checked that the leader is the same process). The
    rules it has meanwhile are replaced once the new ones are in (PortForwarder.start).
    A failure is logged: the rules then stay as they are until the machine ends."""
    if not setup.ports or (setup.machine_name, setup.pid) in _FORWARDERS:
        return
    _require_no_event_loop()
    try:
        ports = [port_forward.parse_port(spec) for spec in setup.ports]
        nsfd = open_netns(setup.pid)
    except HostelError as err:
        log.warning("machine %s: its --port rules stay as they are until it ends: %s",
                    setup.machine_name, err)
        return
    try:
        _refuse_host_namespace(nsfd, setup.pid)
        _start_forwarding(setup, ports, nsfd)
    except HostelError as err:
        log.warning("machine %s: its --port rules stay as they are until it ends: %s",
                    setup.machine_name, err)
    finally:
        os.close(nsfd)  # the watcher's sockets pin the namespace


def _stop_forwarding(setup: NetworkSetup) -> None:
    """Remove the --port rules: the watcher's, or (adopted) whatever carries the machine's
    comment. A failure is logged: the rest of the teardown must still run."""
    forwarder = _FORWARDERS.pop((setup.machine_name, setup.pid), None)
    try:
        if forwarder is not None:
            forwarder.stop()
        elif setup.ports:
            port_forward.purge(setup.machine_name)
    except HostelError as err:
        log.error("machine %s: removing its --port rules: %s", setup.machine_name, err)
    setup.ports = []



def _check_machine_name(machine_name: str) -> None:
    if not machine_name or any(c in "/:" or c.isspace() for c in machine_name):
        raise InvalidArgs(f"machine name {machine_name!r} cannot be part of an interface name "
                          "(it must be non-empty, without '/', ':' or whitespace)")


def _populate(setup: NetworkSetup, settings: NetworkSettings, host: rtnl.Rtnl,
              container: rtnl.Rtnl, nsfd: int, machine_id: bytes) -> None:
    for name in settings.interfaces:
        _move_interface(host, name, nsfd)
        setup.moved.append(name)
    if settings.uses_veth:
        _create_veth(setup, settings, host, nsfd, machine_id)
    for index, parent in enumerate(settings.macvlan):
        _create_macvlan(setup, host, parent, index, nsfd, machine_id)
    try:
        container.set_link(LOOPBACK_IFINDEX, up=True)
    except OSError as err:
        raise _failed(f"bringing up loopback in the network namespace of process {setup.pid}", err) from err
    if settings.ports:
        setup.ports = [str(port) for port in settings.ports]
        _start_forwarding(setup, settings.ports, nsfd)


def _move_interface(host: rtnl.Rtnl, name: str, nsfd: int) -> None:
    try:
        host.set_link(_host_index(name), netns_fd=nsfd)
    except OSError as err:
        raise _failed(f"moving interface {name} into the container", err, {
            errno.EINVAL: "loopback, bridges and some virtual interfaces cannot change network namespace",
        }) from err


def _create_veth(setup: NetworkSetup, settings: NetworkSettings, host: rtnl.Rtnl,
                 nsfd: int, machine_id: bytes) -> None:
    bridged = settings.bridge is not None or settings.zone is not None
    name = veth_name(setup.machine_name, bridged)
    what = f"creating veth {name}/{CONTAINER_IFNAME}"
    try:
        host.add_veth(name, generate_mac(setup.machine_name, HOST_HASH_KEY, 0, machine_id),
                      CONTAINER_IFNAME,
                      generate_mac(setup.machine_name, CONTAINER_HASH_KEY, 0, machine_id), nsfd)
    except OSError as err:
        raise _failed(what, err, {errno.EEXIST: "another container with this name?"}) from err
    setup.host_veth = name
    setup.host_veth_index = _host_index(name)
    if settings.zone is not None:
        bridge_index = network_zone.join_zone(host, setup.host_veth_index, name, settings.zone)
        setup.zone_bridge = settings.zone
        setup.interfaces.append(bridge_index)
        return
    master = None
    if settings.bridge is not None:
        master = _host_index(settings.bridge)
        setup.interfaces.append(master)
        what = f"adding {name} to bridge {settings.bridge}"
    else:
        setup.interfaces.append(setup.host_veth_index)
        what = f"bringing up {name}"
    try:
        host.set_link(setup.host_veth_index, up=True, master=master)
    except OSError as err:
        raise _failed(what, err) from err


def _create_macvlan(setup: NetworkSetup, host: rtnl.Rtnl, parent: str, index: int,
                    nsfd: int, machine_id: bytes) -> None:
    name = macvlan_name(parent)
    try:
        host.add_macvlan(name, _host_index(parent),
                         generate_mac(setup.machine_name, MACVLAN_HASH_KEY, index, machine_id), nsfd)
    except OSError as err:
        raise _failed(f"creating macvlan {name} on {parent}", err) from err
    setup.macvlans.append(name)


def _undo(setup: NetworkSetup, host: rtnl.Rtnl, container: rtnl.Rtnl) -> list[str]:
    """Roll back a half-done setup: delete our veth (and an emptied zone bridge) and hand
    moved interfaces back, since virtual ones would otherwise die with the container's
    namespace. Returns what could not be undone, for the caller to add to its error."""
    problems = []
    try:
        _delete_host_veth(setup, host)
        if setup.zone_bridge is not None:
            network_zone.leave_zone(host, setup.zone_bridge)
    except NetworkError as err:
        problems.append(f"while undoing: {err}")
    return problems + [f"while undoing: {p}" for p in _move_back(setup, container)]


def _move_back(setup: NetworkSetup, container: rtnl.Rtnl) -> list[str]:
    """Hand the moved interfaces back to the host under their names, last moved first
    (as nspawn 252 does at exit); returns what could not be moved."""
    problems = []
    host_ns = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        for name in reversed(setup.moved):
            try:
                container.set_link(container.index_of(name), netns_fd=host_ns)
            except OSError as err:
                problems.append(str(_failed(f"moving {name} back to the host", err)))
    finally:
        os.close(host_ns)
    setup.moved.clear()
    return problems


def _delete_host_veth(setup: NetworkSetup, host: rtnl.Rtnl) -> None:
    """Delete the host end of our veth, if it is still ours: only an index that
    still carries our name, so an unrelated link can never be hit."""
    if setup.host_veth_index is None:
        return
    try:
        if socket.if_indextoname(setup.host_veth_index) == setup.host_veth:
            host.delete_link(setup.host_veth_index)
    except OSError as err:
        if err.errno not in (errno.ENODEV, errno.ENXIO):  # gone with the container's namespace
            raise _failed(f"deleting veth {setup.host_veth}", err) from err
    setup.host_veth_index = None


def teardown_network(setup: NetworkSetup, *, defer: bool = False) -> None:
    """Give the host back its moved interfaces and remove what the container left on it.
    The veth usually goes with the container's namespace; this covers a container that
    never ran or still runs. Safe to call more than once.

    defer: the kernel's acknowledgement of the deletions is left to a background thread
    (link_removal.py): this returns once the veth and an emptied zone bridge are out of
    view, as systemd-nspawn 252 leaves them when it exits, so that the container's exit
    is reported without the kernel's RCU wait (10-30 ms per link here)."""
    _require_no_event_loop()
    _stop_forwarding(setup)
    if setup.netns_fd >= 0:
        try:
            _return_interfaces(setup)
        finally:
            os.close(setup.netns_fd)
            setup.netns_fd = -1
    if setup.host_veth_index is None and setup.zone_bridge is None:
        return
    with rtnl.Rtnl() as host:
        if defer:
            _remove_host_veth_quickly(setup)
        else:
            _delete_host_veth(setup, host)
        if setup.zone_bridge is not None:
            network_zone.leave_zone(host, setup.zone_bridge, quick=defer)
            setup.zone_bridge = None


def _remove_host_veth_quickly(setup: NetworkSetup) -> None:
    if setup.host_veth_index is None or setup.host_veth is None:
        return
    try:
        link_removal.remove(setup.host_veth_index, setup.host_veth)
    except OSError as err:
        raise _failed(f"deleting veth {setup.host_veth}", err) from err
    setup.host_veth_index = None


def _return_interfaces(setup: NetworkSetup) -> None:
    """Move the interfaces back out of the pinned namespace; one that cannot go back (its
    name is taken on the host now, or the container removed it) is logged, not fatal:
    the rest of the teardown must still run."""
    if not setup.moved:
        return
    try:
        with container_netlink(setup.netns_fd, setup.pid) as container:
            problems = _move_back(setup, container)
    except NetworkError as err:
        problems = [str(err)]
    for problem in problems:
        log.error("machine %s: %s", setup.machine_name, problem)


# Inspection ----------------------------------------------------------------


def interface_addresses(pid: int) -> list[tuple[int, str]]:
    """(family, address) of every address in the namespace of `pid` a peer could
    reach, as machined's GetAddresses lists them: no host-scope, no deprecated ones."""
    _require_no_event_loop()
    nsfd = open_netns(pid)
    try:
        with container_netlink(nsfd, pid) as netlink:
            try:
                found = netlink.addresses()
            except OSError as err:
                raise _failed(f"listing addresses in the network namespace of process {pid}", err) from err
    finally:
        os.close(nsfd)
    return [(a.family, a.address) for a in found
            if a.scope < RT_SCOPE_HOST and not a.flags & IFA_F_DEPRECATED]
