"""-p/--port=[PROTOCOL:]HOSTPORT[:CONTAINERPORT]: host ports forwarded into a container.

As systemd-nspawn 252 does it: a DNAT rule in the host's nat table sends
connections to HOSTPORT on any of the host's own addresses (but not to
127.0.0.0/8, which the kernel would not route out) to CONTAINERPORT at the
container's IPv4 address. Neither nspawn nor hostel gives the container an
address; whoever configures its network does (systemd-networkd inside it, a
DHCP client, `ip addr add`). So, like 252, hostel watches the container's
namespace for addresses (RTM_NEWADDR/RTM_DELADDR on a netlink socket opened
in it) and points the rules at the first usable IPv4 address in 252's order
(lowest scope, then lowest interface index, then lowest address; global or
site scope only), moving them when it changes and removing them when the
container loses it or ends.

The rules are made with iptables(8) (252 falls back to libiptc where it has
no nftables; Debian 12's iptables is iptables-nft, so the rules land in
nf_tables either way). Each carries the comment "hostel:MACHINE" so that an
administrator can tell whose it is. The watcher is one thread per container
that has ports: it blocks in select() on the netlink socket and a stop pipe,
never on the event loop."""
from __future__ import annotations

import errno
import logging
import os
import select
import shlex
import shutil
import socket
import subprocess
import threading
from dataclasses import dataclass

from hostel.bus import HostelError, InvalidArgs
from hostel.machine import rtnl

log = logging.getLogger(__name__)

PROTOCOLS = ("tcp", "udp")
RT_SCOPE_LINK, RT_SCOPE_HOST, RT_SCOPE_NOWHERE = 253, 254, 255
IFA_F_DEPRECATED = 0x20
IPTABLES_TIMEOUT = 15.0
IPTABLES_LOCK_WAIT = "5"  # seconds iptables waits for the xtables lock


class PortForwardError(HostelError):
    """The firewall rules of a --port could not be made."""


class DuplicatePort(InvalidArgs):
    """A host port given twice for one protocol (252's EEXIST): a refusal on the command
    line, a warning in a settings file (nspawn_settings)."""


@dataclass(frozen=True)
class PortSpec:
    """One --port: connections to host_port go to container_port in the container."""

    protocol: str
    host_port: int
    container_port: int

    def __str__(self) -> str:
        return f"{self.protocol}:{self.host_port}:{self.container_port}"


# Parsing -------------------------------------------------------------------


def _port_number(text: str) -> int:
    """systemd 252's parse_ip_port(): strtoul() in base 0 (so 0x50 and 0120 are 80),
    no leading whitespace, nothing after the number, 1..65535. Raises OSError with
    252's errno: EINVAL for what is not a port number, ERANGE for one out of range."""
    body = text[1:] if text[:1] in ("+", "-") else text
    negative = text.startswith("-")
    if body[:2].lower() == "0x":
        digits, base = body[2:], 16
        valid = bool(digits) and all(c in "0123456789abcdefABCDEF" for c in digits)
    elif body.startswith("0"):
        digits, base = body, 8
        valid = all(c in "01234567" for c in digits)
    else:
        digits, base = body, 10
        valid = bool(digits) and digits.isascii() and digits.isdigit()
    if not valid:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
    value = int(digits, base)
    if value == 0:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
    if negative or value > 0xFFFF:
        raise OSError(errno.ERANGE, os.strerror(errno.ERANGE))
    return value


def parse_port(spec: str) -> PortSpec:
    """[PROTOCOL:]HOSTPORT[:CONTAINERPORT], as 252's expose_port_parse() reads it:
    PROTOCOL is tcp (the default) or udp, and one port stands for both."""
    protocol, rest = "tcp", spec
    for name in PROTOCOLS:
        if spec.startswith(name + ":"):
            protocol, rest = name, spec[len(name) + 1:]
    host_text, sep, container_text = rest.partition(":")
    try:
        host_port = _port_number(host_text)
        container_port = _port_number(container_text) if sep else host_port
    except OSError as err:
        raise InvalidArgs(f"Failed to parse host port {spec}: {err.strerror}") from None
    return PortSpec(protocol, host_port, container_port)


def parse_ports(specs: list[str]) -> list[PortSpec]:
    """Every --port in order; a host port given twice for one protocol is refused."""
    ports: list[PortSpec] = []
    for spec in specs:
        port = parse_port(spec)
        if any(p.protocol == port.protocol and p.host_port == port.host_port for p in ports):
            raise DuplicatePort(f"Duplicate port specification: {spec}")
        ports.append(port)
    return ports


# The rules -----------------------------------------------------------------


def iptables() -> str:
    """The iptables program, or a refusal that says how to get it."""
    found = shutil.which("iptables", path="/usr/sbin:/sbin:/usr/bin:/bin")
    if found is None:
        raise PortForwardError("--port needs iptables to forward ports into the container, "
                               "and it is not installed; install it ('apt-get install "
                               "iptables') or drop --port")
    return found


def rules(machine: str, port: PortSpec, address: str) -> list[list[str]]:
    """The nat-table rules (chain first) forwarding `port` to `address`: PREROUTING for
    connections from elsewhere, OUTPUT for the host's own (not to 127.0.0.0/8)."""
    match = ["-p", port.protocol, "--dport", str(port.host_port),
             "-m", "addrtype", "--dst-type", "LOCAL"]
    target = ["-m", "comment", "--comment", f"hostel:{machine}",
              "-j", "DNAT", "--to-destination", f"{address}:{port.container_port}"]
    return [["PREROUTING", *match, *target],
            ["OUTPUT", "!", "-d", "127.0.0.0/8", *match, *target]]


def _iptables(action: str, rule: list[str]) -> None:
    argv = [iptables(), "-w", IPTABLES_LOCK_WAIT, "-t", "nat", action, *rule]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=IPTABLES_TIMEOUT,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise PortForwardError(f"iptables {action} {' '.join(rule)} did not finish in "
                               f"{IPTABLES_TIMEOUT:.0f} s") from None
    except OSError as err:
        raise PortForwardError(f"running {argv[0]}: {err.strerror}") from None
    if done.returncode != 0:
        raise PortForwardError(f"iptables -t nat {action} {' '.join(rule)}: "
                               f"{done.stderr.strip() or f'exit status {done.returncode}'}")


def stale_rules(machine: str) -> list[list[str]]:
    """The nat rules that carry `machine`'s comment now (chain first), as iptables -S
    lists them: those a hosteld that was killed, or restarted, could not remove."""
    argv = [iptables(), "-w", IPTABLES_LOCK_WAIT, "-t", "nat", "-S"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=IPTABLES_TIMEOUT,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise PortForwardError(f"listing the nat rules: {err}") from None
    if done.returncode != 0:
        raise PortForwardError(f"listing the nat rules: {done.stderr.strip()}")
    found = []
    for line in done.stdout.splitlines():
        words = shlex.split(line)
        if words[:1] == ["-A"] and any(words[i:i + 2] == ["--comment", f"hostel:{machine}"]
                                       for i in range(len(words))):
            found.append(words[1:])
    return found


def purge(machine: str) -> None:
    """Remove every nat rule of `machine` (see stale_rules)."""
    for rule in stale_rules(machine):
        _iptables("-D", rule)


def pick_address(addresses: list[rtnl.Address]) -> str | None:
    """The address 252 forwards to: the first IPv4 one in local_addresses() order, if its
    scope is global or site (a link-local one is not reachable through the host)."""
    usable = sorted((a for a in addresses if a.family == socket.AF_INET
                     and a.scope not in (RT_SCOPE_HOST, RT_SCOPE_NOWHERE)
                     and not a.flags & IFA_F_DEPRECATED),
                    key=lambda a: (a.scope, a.index, socket.inet_aton(a.address)))
    if not usable or usable[0].scope >= RT_SCOPE_LINK:
        return None
    return usable[0].address


# The watcher ---------------------------------------------------------------


class PortForwarder:
    """Keeps a container's --port rules pointed at its current IPv4 address."""

    def __init__(self, machine: str, ports: list[PortSpec], watch: rtnl.Rtnl,
                 query: rtnl.Rtnl) -> None:
        self.machine = machine
        self.ports = ports
        self.address: str | None = None
        self._installed: list[list[str]] = []
        self._watch = watch    # bound to RTMGRP_IPV4_IFADDR, non-blocking
        self._query = query    # for address dumps
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"hostel-ports-{machine}")

    def start(self) -> None:
        """Point the rules at the address the container has now (if any), then follow it.
        Rules an earlier hosteld left for a machine of this name (a killed one's, or the
        rules of the machine this hosteld adopts) go once the new ones are in, so that an
        adopted machine's ports never stop forwarding, and stay if they cannot be made."""
        stale = stale_rules(self.machine)
        self._refresh()
        for rule in stale:
            _iptables("-D", rule)
        self._thread.start()

    def stop(self) -> None:
        """Remove the rules and close the sockets (which pin the container's namespace)."""
        os.write(self._stop_w, b"x")
        if self._thread.ident is not None:  # started
            self._thread.join(IPTABLES_TIMEOUT * 2)
        try:
            self._remove()
        finally:
            for sock in (self._watch, self._query):
                sock.close()
            os.close(self._stop_r)
            os.close(self._stop_w)

    def _run(self) -> None:
        while True:
            ready, _, _ = select.select([self._watch.fileno(), self._stop_r], [], [])
            if self._stop_r in ready:
                return
            self._watch.drain()
            try:
                self._refresh()
            except (HostelError, OSError) as err:  # 252 warns and goes on
                log.warning("machine %s: failed to modify the firewall for --port: %s",
                            self.machine, err)

    def _refresh(self) -> None:
        address = pick_address(self._query.addresses(socket.AF_INET))
        if address == self.address:
            return
        self._remove()
        if address is not None:
            log.info("machine %s: forwarding %s to %s", self.machine,
                     ", ".join(map(str, self.ports)), address)
            for port in self.ports:
                for rule in rules(self.machine, port, address):
                    _iptables("-A", rule)
                    self._installed.append(rule)
        self.address = address

    def _remove(self) -> None:
        problems = []
        while self._installed:
            rule = self._installed.pop()
            try:
                _iptables("-D", rule)
            except PortForwardError as err:
                problems.append(str(err))
        self.address = None
        if problems:
            raise PortForwardError("; ".join(problems))
