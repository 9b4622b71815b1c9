"""Container networking: veth pairs, bridges, macvlan and moved interfaces.

All of it runs in the parent after the child was cloned with CLONE_NEWNET and
before it execs its payload. The container's namespace is reached through
/proc/PID/ns/net: links are created straight into it (IFLA_NET_NS_FD), and the
few operations that must happen inside it (loopback up, reading addresses) go
through a netlink socket opened there by a short-lived thread, so the daemon
never forks and never changes its own namespace.

The functions here block on netlink; the daemon calls them from a worker
thread (asyncio.to_thread), never from the event loop.

MAC addresses are derived the way systemd-nspawn derives them, so a container
keeps the same addresses across restarts and matches what nspawn would give
it on the same host: SipHash-2-4 of the host's machine ID and the machine
name (plus an index for the second and later macvlans) under fixed keys."""
from __future__ import annotations

import asyncio
import errno
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pyudev
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from hostel import native
from hostel.bus import HostelError, InvalidArgs
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
    --network-veth, --network-bridge, --network-interface, --network-macvlan)."""

    private_network: bool = False
    veth: bool = False
    bridge: str | None = None
    interfaces: list[str] = field(default_factory=list)
    macvlan: list[str] = field(default_factory=list)

    @property
    def private(self) -> bool:
        """Whether the container gets its own network namespace: every network option implies one."""
        return (self.private_network or self.uses_veth
                or bool(self.interfaces) or bool(self.macvlan))

    @property
    def uses_veth(self) -> bool:
        """A bridge is joined through a veth, so --network-bridge implies --network-veth."""
        return self.veth or self.bridge is not None

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


def _failed(what: str, err: NetlinkError, hints: dict[int, str] | None = None) -> NetworkError:
    hint = (hints or {}).get(err.code) or _HINTS.get(err.code)
    return NetworkError(f"{what}: {os.strerror(err.code)}" + (f" ({hint})" if hint else ""))


def _require_no_event_loop() -> None:
    """pyroute2's synchronous API runs its own event loop; it cannot nest in the daemon's."""
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


def _netlink_socket_in(nsfd: int) -> int:
    """Open a NETLINK_ROUTE socket inside the namespace `nsfd`.

    A socket belongs to the namespace it was created in, so a throwaway thread
    joins the namespace, opens it and ends; the daemon's own threads stay put."""
    def create() -> int:
        native.setns(nsfd, native.CLONE_NEWNET)
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
                             socket.NETLINK_ROUTE)
        return sock.detach()

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="hostel-netns") as pool:
        return pool.submit(create).result()


@contextmanager
def _host_netlink() -> Iterator[IPRoute]:
    _require_no_event_loop()
    with IPRoute(ext_ack=True) as ipr:
        yield ipr


@contextmanager
def _container_netlink(nsfd: int, pid: int) -> Iterator[IPRoute]:
    _require_no_event_loop()
    try:
        fd = _netlink_socket_in(nsfd)
    except OSError as err:
        raise NetworkError(f"entering the network namespace of process {pid}: {err.strerror}") from err
    with IPRoute(fileno=fd, ext_ack=True) as ipr:
        yield ipr


def _index_of(ipr: IPRoute, name: str, where: str) -> int:
    found = ipr.link_lookup(ifname=name)
    if not found:
        raise NetworkError(f"looking up interface {name} {where}: no such interface "
                           "(was it renamed or removed meanwhile?)")
    return found[0]


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


def setup_network(settings: NetworkSettings, machine_name: str, pid: int) -> NetworkSetup:
    """Give the container `pid` (already in its own network namespace) its links.

    Order as in systemd-nspawn: move interfaces in, create the veth pair,
    join the bridge, create macvlans; then loopback up. On failure whatever
    was done is undone before the error is raised."""
    setup = NetworkSetup(machine_name, pid)
    if not settings.private:
        return setup
    if settings.uses_veth:
        _check_machine_name(machine_name)
    # Only MACs need the machine ID: a bare --private-network works without one.
    machine_id = read_machine_id() if settings.uses_veth or settings.macvlan else b""
    nsfd = open_netns(pid)
    try:
        _refuse_host_namespace(nsfd, pid)
        with _host_netlink() as host, _container_netlink(nsfd, pid) as container:
            try:
                _populate(setup, settings, host, container, nsfd, machine_id)
            except HostelError as err:
                for problem in _undo(setup, host, container):
                    err.add_note(problem)
                raise
    finally:
        os.close(nsfd)
    return setup


def _check_machine_name(machine_name: str) -> None:
    if not machine_name or any(c in "/:" or c.isspace() for c in machine_name):
        raise InvalidArgs(f"machine name {machine_name!r} cannot be part of an interface name "
                          "(it must be non-empty, without '/', ':' or whitespace)")


def _populate(setup: NetworkSetup, settings: NetworkSettings, host: IPRoute,
              container: IPRoute, nsfd: int, machine_id: bytes) -> None:
    for name in settings.interfaces:
        _move_interface(host, name, nsfd)
        setup.moved.append(name)
    if settings.uses_veth:
        _create_veth(setup, settings, host, nsfd, machine_id)
    for index, parent in enumerate(settings.macvlan):
        _create_macvlan(setup, host, parent, index, nsfd, machine_id)
    try:
        container.link("set", index=LOOPBACK_IFINDEX, state="up")
    except NetlinkError as err:
        raise _failed(f"bringing up loopback in the network namespace of process {setup.pid}", err) from err


def _move_interface(host: IPRoute, name: str, nsfd: int) -> None:
    try:
        host.link("set", index=_index_of(host, name, "on the host"), net_ns_fd=nsfd)
    except NetlinkError as err:
        raise _failed(f"moving interface {name} into the container", err, {
            errno.EINVAL: "loopback, bridges and some virtual interfaces cannot change network namespace",
        }) from err


def _create_veth(setup: NetworkSetup, settings: NetworkSettings, host: IPRoute,
                 nsfd: int, machine_id: bytes) -> None:
    name = veth_name(setup.machine_name, settings.bridge is not None)
    what = f"creating veth {name}/{CONTAINER_IFNAME}"
    try:
        host.link("add", ifname=name, kind="veth",
                  address=generate_mac(setup.machine_name, HOST_HASH_KEY, 0, machine_id),
                  peer={"ifname": CONTAINER_IFNAME,
                        "address": generate_mac(setup.machine_name, CONTAINER_HASH_KEY, 0, machine_id),
                        "net_ns_fd": nsfd})
    except NetlinkError as err:
        raise _failed(what, err, {errno.EEXIST: "another container with this name?"}) from err
    setup.host_veth = name
    setup.host_veth_index = _index_of(host, name, "on the host")
    link_up = {"state": "up"}
    if settings.bridge is not None:
        bridge_index = _index_of(host, settings.bridge, "on the host")
        link_up["master"] = bridge_index
        setup.interfaces.append(bridge_index)
        what = f"adding {name} to bridge {settings.bridge}"
    else:
        setup.interfaces.append(setup.host_veth_index)
        what = f"bringing up {name}"
    try:
        host.link("set", index=setup.host_veth_index, **link_up)
    except NetlinkError as err:
        raise _failed(what, err) from err


def _create_macvlan(setup: NetworkSetup, host: IPRoute, parent: str, index: int,
                    nsfd: int, machine_id: bytes) -> None:
    name = macvlan_name(parent)
    try:
        host.link("add", ifname=name, kind="macvlan", link=_index_of(host, parent, "on the host"),
                  macvlan_mode="bridge", net_ns_fd=nsfd,
                  address=generate_mac(setup.machine_name, MACVLAN_HASH_KEY, index, machine_id))
    except NetlinkError as err:
        raise _failed(f"creating macvlan {name} on {parent}", err) from err
    setup.macvlans.append(name)


def _undo(setup: NetworkSetup, host: IPRoute, container: IPRoute) -> list[str]:
    """Roll back a half-done setup: delete our veth and hand moved interfaces back,
    since virtual ones would otherwise die with the container's namespace.
    Returns what could not be undone, for the caller to add to its error."""
    problems = []
    try:
        _delete_host_veth(setup, host)
    except NetworkError as err:
        problems.append(f"while undoing: {err}")
    host_ns = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        for name in reversed(setup.moved):
            try:
                container.link("set", index=_index_of(container, name, "in the container"),
                               net_ns_fd=host_ns)
            except (NetlinkError, NetworkError) as err:
                problems.append(f"while undoing: moving {name} back to the host: {err}")
    finally:
        os.close(host_ns)
    setup.moved.clear()
    return problems


def _delete_host_veth(setup: NetworkSetup, host: IPRoute) -> None:
    """Delete the host end of our veth, if it is still ours: only an index that
    still carries our name, so an unrelated link can never be hit."""
    if setup.host_veth_index is None:
        return
    try:
        current = host.link("get", index=setup.host_veth_index)[0].get("ifname")
        if current == setup.host_veth:
            host.link("del", index=setup.host_veth_index)
    except NetlinkError as err:
        if err.code != errno.ENODEV:
            raise _failed(f"deleting veth {setup.host_veth}", err) from err
    setup.host_veth_index = None


def teardown_network(setup: NetworkSetup) -> None:
    """Remove what the container left on the host. The veth usually goes with
    the container's namespace; this covers a container that never ran or
    still runs. Safe to call more than once."""
    if setup.host_veth_index is None:
        return
    with _host_netlink() as host:
        _delete_host_veth(setup, host)


# Inspection ----------------------------------------------------------------


def interface_addresses(pid: int) -> list[tuple[int, str]]:
    """(family, address) of every address in the namespace of `pid` a peer could
    reach, as machined's GetAddresses lists them: no host-scope, no deprecated ones."""
    nsfd = open_netns(pid)
    try:
        with _container_netlink(nsfd, pid) as ipr:
            try:
                messages = ipr.addr("dump")
            except NetlinkError as err:
                raise _failed(f"listing addresses in the network namespace of process {pid}", err) from err
    finally:
        os.close(nsfd)
    found = []
    for msg in messages:
        flags = msg.get("IFA_FLAGS")
        if flags is None:
            flags = msg["flags"]
        if msg["scope"] >= RT_SCOPE_HOST or flags & IFA_F_DEPRECATED:
            continue
        # IFA_LOCAL is our own end of an IPv4 point-to-point link; IPv6 has only IFA_ADDRESS.
        found.append((msg["family"], msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")))
    return found
