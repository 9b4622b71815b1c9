"""The network of `guest run --network=veth`: one point-to-point /30 per run.

Each run gets a /30 from a private pool (DEFAULT_POOL, or HOSTEL_GUEST_NETWORK_POOL
in hosteld's environment): the first usable address is the host's end and the
guest's gateway, the second the guest's address, and the guest's resolvers are
the host's own (those in /etc/resolv.conf a guest can reach: no loopback).

Which /30: the one the machine name hashes to (so a name keeps its addresses
from run to run), else the next free one after it, wrapping around. A /30 is
free when it overlaps no route in any of the host's routing tables (default
routes aside: they overlap everything) and no address on the host, and no other
run holds it. A container's host end is addressed while the allocation lock is
held, so its route marks the /30 taken from then on; a VM's tap is addressed
later by its launcher, so its /30 is also written in the run's directory
(RESERVATION_FILE), which goes when the guest ends, after a restart of hosteld
too (see images_service.reserved_vm_networks).

Container isolation: hosteld makes a network namespace (in a short-lived thread
of its own, so that the daemon never changes namespace), a veth pair with the
guest's end (GUEST_LINK, as in the VM) inside it, and configures both ends; the
container joins that namespace (a setns step of its plan) before it mounts
/sys. The host end goes when the run ends (teardown, or with the namespace when
the last process in it exits, which also covers a run an adopting hosteld
ends). VM isolation: the launcher's tap carries the host end (network.py), the
guest init configures the guest's end from the launch configuration.

The functions here block on netlink: call them from a thread."""
from __future__ import annotations

import errno
import hashlib
import ipaddress
import logging
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from hostel import native
from hostel.errors import ERROR_PREFIX, HostelError, InvalidArgs
from hostel.guest.launchconfig import NetworkConfig

log = logging.getLogger(__name__)

NETWORK_MODES = ("none", "veth")
POOL_ENV = "HOSTEL_GUEST_NETWORK_POOL"
DEFAULT_POOL = "10.231.0.0/16"
SLOT_PREFIX = 30
GUEST_LINK = "eth0"          # the guest's end, in a container as in a VM
RESERVATION_FILE = "network.json"
RESOLV_CONF = Path("/etc/resolv.conf")
IFNAMSIZ = 16
LOOPBACK_IFINDEX = 1

_allocation = threading.Lock()


class AddressPoolExhausted(HostelError):
    dbus_name = f"{ERROR_PREFIX}.AddressPoolExhausted"


class RunNetworkError(HostelError):
    """Setting up or removing a run's links failed."""


def check_mode(mode: str) -> str:
    if mode not in NETWORK_MODES:
        raise InvalidArgs(f"unknown network mode {mode!r}: expected {' or '.join(NETWORK_MODES)} "
                          "(veth: a point-to-point link to the host; none: loopback only)")
    return mode


# The pool and the choice of a /30 ---------------------------------------------------------

def parse_pool(text: str) -> ipaddress.IPv4Network:
    """A private IPv4 network with room for at least one /30."""
    where = f"{POOL_ENV}={text}"
    try:
        pool = ipaddress.IPv4Network(text, strict=True)
    except ValueError as e:
        raise InvalidArgs(f"{where}: not an IPv4 network such as {DEFAULT_POOL} ({e})") from None
    if not pool.is_private or pool.is_loopback or pool.is_link_local or pool.is_multicast:
        raise InvalidArgs(f"{where}: the guest network pool must be a private range "
                          "(10.0.0.0/8, 172.16.0.0/12 or 192.168.0.0/16)")
    if pool.prefixlen > SLOT_PREFIX:
        raise InvalidArgs(f"{where}: too small; each run needs a /{SLOT_PREFIX}")
    return pool


def pool_from_environment() -> ipaddress.IPv4Network:
    return parse_pool(os.environ.get(POOL_ENV) or DEFAULT_POOL)


def slot_count(pool: ipaddress.IPv4Network) -> int:
    return 1 << (SLOT_PREFIX - pool.prefixlen)


def slot_network(pool: ipaddress.IPv4Network, index: int) -> ipaddress.IPv4Network:
    base = int(pool.network_address) + (index << (32 - SLOT_PREFIX))
    return ipaddress.IPv4Network((base, SLOT_PREFIX))


def first_slot(name: str, pool: ipaddress.IPv4Network) -> int:
    """Where a machine name's search starts: the same slot for the same name, every run."""
    digest = hashlib.sha256(name.encode()).digest()
    return int.from_bytes(digest[:8], "big") % slot_count(pool)


@dataclass(frozen=True)
class Taken:
    network: ipaddress.IPv4Network
    why: str                       # "route 10.0.0.0/8 dev tun0", "address ...", "run vm-a"


def host_networks(ipr: IPRoute) -> list[Taken]:
    """Every route (any table, default routes aside) and address of the host, as networks."""
    names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
    taken = []
    for route in ipr.route("dump", family=socket.AF_INET):
        destination = route.get_attr("RTA_DST")
        if route["dst_len"] == 0 or destination is None:
            continue
        device = names.get(route.get_attr("RTA_OIF"), "")
        table = route.get_attr("RTA_TABLE") or route["table"]
        taken.append(Taken(ipaddress.IPv4Network(f"{destination}/{route['dst_len']}",
                                                 strict=False),
                           f"route {destination}/{route['dst_len']}"
                           + (f" dev {device}" if device else "") + f" table {table}"))
    for address in ipr.addr("dump", family=socket.AF_INET):
        local = address.get_attr("IFA_LOCAL") or address.get_attr("IFA_ADDRESS")
        taken.append(Taken(ipaddress.IPv4Network(f"{local}/32"),
                           f"address {local} on {address.get_attr('IFA_LABEL')}"))
    return taken


def choose(name: str, pool: ipaddress.IPv4Network, taken: list[Taken]) -> ipaddress.IPv4Network:
    """The name's slot, else the next free one; AddressPoolExhausted says why none is."""
    count = slot_count(pool)
    start = first_slot(name, pool)
    blocking = [t for t in taken if t.network.overlaps(pool)]
    for step in range(count):
        candidate = slot_network(pool, (start + step) % count)
        if not any(t.network.overlaps(candidate) for t in blocking):
            return candidate
    examples = "; ".join(dict.fromkeys(t.why for t in blocking))
    raise AddressPoolExhausted(
        f"no free /{SLOT_PREFIX} left for {name!r} in the guest network pool {pool} "
        f"({count} in all; taken by: {examples[:300]}); end a run that uses --network=veth, "
        f"or give hosteld a larger or other private pool in {POOL_ENV}")


@dataclass(frozen=True)
class Addressing:
    """One run's /30: the host's end (the guest's gateway) and the guest's address."""

    network: ipaddress.IPv4Network

    @property
    def host(self) -> ipaddress.IPv4Interface:
        return ipaddress.IPv4Interface((self.network.network_address + 1, SLOT_PREFIX))

    @property
    def guest(self) -> ipaddress.IPv4Interface:
        return ipaddress.IPv4Interface((self.network.network_address + 2, SLOT_PREFIX))

    def guest_config(self, nameservers: tuple[str, ...]) -> NetworkConfig:
        """The launch configuration's network section for the guest's end."""
        return NetworkConfig(link=GUEST_LINK, ipv4_address=str(self.guest),
                             ipv4_gateway=str(self.host.ip), nameservers=nameservers)


def allocate(name: str, pool: ipaddress.IPv4Network, reserved: Callable[[], Iterable[Taken]],
             claim: Callable[[Addressing], None]) -> Addressing:
    """Choose the run's /30 and `claim` it (address a link, write a reservation) under one
    lock, with the host's routes and the `reserved` /30s read under it too, so that two
    runs starting at once never get the same one."""
    with _allocation, IPRoute() as ipr:
        addressing = Addressing(choose(name, pool, host_networks(ipr) + list(reserved())))
        claim(addressing)
    return addressing


def host_nameservers(path: Path = RESOLV_CONF) -> tuple[str, ...]:
    """The host's resolvers a guest can reach over its link: not the host's loopback."""
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        log.warning("the guests get no DNS resolver: cannot read %s: %s", path, e.strerror)
        return ()
    found = []
    for line in text.splitlines():
        words = line.split()
        if len(words) < 2 or words[0] != "nameserver":
            continue
        try:
            address = ipaddress.ip_address(words[1])
        except ValueError:
            continue
        if not address.is_loopback and not address.is_unspecified:
            found.append(str(address))
    return tuple(dict.fromkeys(found))


def resolv_conf(config: NetworkConfig) -> bytes:
    """/etc/resolv.conf as both guest inits write it (init.network_setup, netconf.c)."""
    lines = ["# hostel resolver configuration"]
    lines += [f"nameserver {server}" for server in config.nameservers]
    return ("\n".join(lines) + "\n").encode()


# A container's namespace and veth pair -------------------------------------------------------

def host_link_name(name: str, network: ipaddress.IPv4Network, pool: ipaddress.IPv4Network) -> str:
    """gvSLOT-NAME, cut to the kernel's limit: the slot keeps it unique, the name readable."""
    index = (int(network.network_address) - int(pool.network_address)) >> (32 - SLOT_PREFIX)
    return f"gv{index}-{name}"[:IFNAMSIZ - 1]


def _new_namespace() -> tuple[int, int]:
    """A fresh network namespace: (its descriptor, a netlink socket inside it). A thread of
    its own unshares and ends; the daemon's threads never leave the host's namespace."""
    result: list[tuple[int, int]] = []
    failure: list[OSError] = []

    def thread() -> None:
        try:
            native.unshare(native.CLONE_NEWNET)
            nsfd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
                                 socket.NETLINK_ROUTE)
            result.append((nsfd, sock.detach()))
        except OSError as e:
            failure.append(e)

    worker = threading.Thread(target=thread, name="hostel-guest-netns")
    worker.start()
    worker.join()
    if failure:
        raise RunNetworkError(f"cannot create the guest's network namespace: "
                              f"{failure[0].strerror}") from failure[0]
    return result[0]


@dataclass
class ContainerNetwork:
    """What make_container_network made: the namespace the container joins, and the host end."""

    netns_fd: int
    host_link: str
    host_index: int
    addressing: Addressing
    config: NetworkConfig

    def teardown(self) -> None:
        """Delete the host end if it is still ours (the guest's end goes with it); close the
        namespace. Safe to call twice."""
        if self.host_index >= 0:
            try:
                with IPRoute() as ipr:
                    (link,) = ipr.link("get", index=self.host_index)
                    if link.get_attr("IFLA_IFNAME") == self.host_link:
                        ipr.link("del", index=self.host_index)
            except NetlinkError as e:
                if e.code != errno.ENODEV:
                    raise RunNetworkError(f"deleting {self.host_link}: {os.strerror(e.code)}") \
                        from e
            self.host_index = -1
        if self.netns_fd >= 0:
            os.close(self.netns_fd)
            self.netns_fd = -1


def _netlink_failed(what: str, e: NetlinkError) -> RunNetworkError:
    hint = " (a link of that name exists already)" if e.code == errno.EEXIST else ""
    return RunNetworkError(f"{what}: {os.strerror(e.code)}{hint}")


def _configure_guest_end(sock: int, config: NetworkConfig) -> None:
    """Inside the namespace (through `sock`, which this closes): loopback up, the guest's
    address, its link up, the default route."""
    address, prefix = config.ipv4_address.split("/")
    with IPRoute(fileno=sock) as inside:
        try:
            inside.link("set", index=LOOPBACK_IFINDEX, state="up")
            (index,) = inside.link_lookup(ifname=config.link)
            inside.addr("add", index=index, address=address, prefixlen=int(prefix))
            inside.link("set", index=index, state="up")
            inside.route("add", dst="0.0.0.0/0", gateway=config.ipv4_gateway, oif=index)
        except NetlinkError as e:
            raise _netlink_failed(f"configuring {config.link} in the guest's namespace", e) \
                from e


def make_container_network(name: str, pool: ipaddress.IPv4Network,
                           nameservers: tuple[str, ...]) -> ContainerNetwork:
    """A namespace with the guest's end configured, and the host's end addressed and up."""
    nsfd, sock = _new_namespace()
    made: list[ContainerNetwork] = []

    def claim(addressing: Addressing) -> None:
        link = host_link_name(name, addressing.network, pool)
        network = ContainerNetwork(nsfd, link, -1, addressing,
                                   addressing.guest_config(nameservers))
        made.append(network)
        with IPRoute() as host:
            try:
                host.link("add", ifname=link, kind="veth",
                          peer={"ifname": GUEST_LINK, "net_ns_fd": nsfd})
                (network.host_index,) = host.link_lookup(ifname=link)
                host.addr("add", index=network.host_index, address=str(addressing.host.ip),
                          prefixlen=SLOT_PREFIX)
                host.link("set", index=network.host_index, state="up")
            except NetlinkError as e:
                raise _netlink_failed(f"creating veth {link}/{GUEST_LINK} for {name}", e) from e

    try:
        try:
            allocate(name, pool, lambda: (), claim)
        except BaseException:
            os.close(sock)
            raise
        _configure_guest_end(sock, made[0].config)   # the IPRoute there closes sock
    except BaseException:
        if made:
            made[0].teardown()
        else:
            os.close(nsfd)
        raise
    return made[0]
