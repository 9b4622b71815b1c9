"""--network-zone and -p/--port on real links, through hosteld and `hostelctl run`.

Zones: the bridge vz-NAME appears with the zone's first container, holds each
container's vb-NAME and is removed when the last one leaves. Ports: a real TCP
connection from the host to a host port reaches a busybox nc in the container
(after the container gave itself an address, which hostel follows as 252
does), and the DNAT rules are gone once the container has ended. Refusals are
checked against systemd-nspawn 252's own words and exit status.

Names carry this run's pid, so parallel runs and other test files never meet;
every link and rule of ours is checked gone after each test."""
from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from hostel.machine import port_forward
from hostel.privatebus import DaemonProcess, PrivateBus

from conftest import HOSTELCTL, busctl, terminate_all_machines
from integration.nspawn_pair import hostel, needs_nspawn, nspawn

TAG = f"{os.getpid() % 10000:04d}"
ZONE = f"z{TAG}"          # bridge vz-z1234
BRIDGE = f"vz-{ZONE}"
MACHINES = [f"nzp{TAG}{suffix}" for suffix in "abc"]

needs_iptables = pytest.mark.skipif(not shutil.which("iptables"),
                                    reason="iptables not installed (make setup installs it)")


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def links() -> dict[str, dict]:
    return {entry["ifname"]: entry for entry in json.loads(ip("-j", "link", "show").stdout)}


def our_links() -> set[str]:
    return {name for name in links() if name == BRIDGE or any(m in name for m in MACHINES)}


def nat_rules() -> list[str]:
    out = subprocess.run(["iptables", "-w", "5", "-t", "nat", "-S"], capture_output=True,
                         text=True, check=True, timeout=30).stdout
    return [line for line in out.splitlines() if any(f"hostel:{m}" in line for m in MACHINES)]


def wait_until(what: str, check: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(autouse=True)
def nothing_left_behind() -> Iterator[None]:
    assert not our_links(), "links of this run existed before the test"
    yield
    try:
        wait_until("the links of this run to go", lambda: not our_links())
    finally:
        for name in our_links():  # never leave them on the host, even when failing
            ip("link", "del", name, check=False)
    if shutil.which("iptables"):
        left = nat_rules()
        for machine in MACHINES:  # never leave them on the host either
            port_forward.purge(machine)
        assert not left


@pytest.fixture
def daemon(trusted_hosteld: DaemonProcess) -> DaemonProcess:
    return trusted_hosteld


def start(daemon: DaemonProcess, tree: Path, name: str, *args: str) -> subprocess.Popen[str]:
    """`hostelctl run` of a container that prints 'ready' and then does what args say."""
    return subprocess.Popen([HOSTELCTL, "run", "-q", "-D", str(tree), "-M", name, *args],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=daemon.environment())


def ready(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line == "ready\n", f"{line!r} {proc.stderr.read() if proc.stderr else ''}"


def finish(proc: subprocess.Popen[str], timeout: float = 30) -> tuple[int, str, str]:
    if proc.stdin is not None and proc.stdin.closed:
        proc.stdin = None  # communicate() would flush it
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def brif(bridge: str) -> set[str]:
    return set(os.listdir(f"/sys/class/net/{bridge}/brif"))


# Zones -----------------------------------------------------------------------


def test_zone_bridge_lives_from_the_first_to_the_last_container(daemon: DaemonProcess,
                                                                 tree: Path) -> None:
    wait = ("/bin/sh", "-c", "echo ready; read line; exit 0")  # ends when its stdin (a pipe) closes
    first = subprocess.Popen([HOSTELCTL, "run", "-q", "-D", str(tree), "-M", MACHINES[0],
                              "--read-only", f"--network-zone={ZONE}", *wait],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=daemon.environment())
    second = subprocess.Popen([HOSTELCTL, "run", "-q", "-D", str(tree), "-M", MACHINES[1],
                               "--read-only", f"--network-zone={ZONE}", *wait],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=daemon.environment())
    try:
        ready(first)
        ready(second)
        found = links()
        assert found[BRIDGE]["link_type"] == "ether"
        assert brif(BRIDGE) == {f"vb-{MACHINES[0]}", f"vb-{MACHINES[1]}"}
        assert "UP" not in found[BRIDGE]["flags"]  # 252 leaves raising it to networkd
        assert "UP" in found[f"vb-{MACHINES[0]}"]["flags"]
        assert found[f"vb-{MACHINES[0]}"]["master"] == BRIDGE
        status = subprocess.run([HOSTELCTL, "show", MACHINES[0]], capture_output=True,
                                text=True, env=daemon.environment(), timeout=30).stdout
        assert f"NetworkInterfaces={found[BRIDGE]['ifindex']}" in status

        assert first.stdin is not None
        first.stdin.close()
        assert finish(first)[0] == 0
        wait_until("the first container's veth to leave the bridge",
                   lambda: brif(BRIDGE) == {f"vb-{MACHINES[1]}"})
        assert BRIDGE in links()  # still one member: the bridge stays
    finally:
        for proc in (first, second):
            if proc.poll() is None and proc.stdin is not None:
                proc.stdin.close()
    assert finish(second)[0] == 0
    wait_until("the zone bridge to go with its last member", lambda: BRIDGE not in links())


def test_zone_from_a_trusted_settings_file(daemon: DaemonProcess, tree: Path,
                                           trusted_dir: Path) -> None:
    """The file's Zone= puts the container's veth on the zone's bridge while it runs (a
    plain veth would give it host0 too: the bridge's member is what shows the zone)."""
    (trusted_dir / f"{MACHINES[2]}.nspawn").write_text(f"[Network]\nZone={ZONE}\n")
    proc = subprocess.Popen([HOSTELCTL, "run", "-q", "-D", str(tree), "-M", MACHINES[2],
                             "/bin/sh", "-c",
                             "echo $(ls /sys/class/net/); echo ready; read line; exit 0"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=daemon.environment())
    assert proc.stdin is not None and proc.stdout is not None
    try:
        interfaces = proc.stdout.readline().split()
        ready(proc)
        assert "host0" in interfaces, interfaces
        assert BRIDGE in links() and brif(BRIDGE) == {f"vb-{MACHINES[2]}"}
        proc.stdin.close()
        assert finish(proc)[0] == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wait_until("the file's zone bridge to go", lambda: BRIDGE not in links())


def start_machine(bus: PrivateBus, name: str, *settings: str,
                  check: bool = True) -> subprocess.CompletedProcess[str]:
    """StartMachine through the real busctl; settings as busctl's a{sv} words (KEY TYPE VALUE)."""
    count = sum(1 for word in settings if word in ("NetworkZone", "Port", "Directory",
                                                  "Command", "PrivateNetwork", "ReadOnly"))
    return busctl(bus, "call", "org.hostel1", "/org/hostel1/machine", "org.hostel1.MachineManager",
                  "StartMachine", "sa{sv}", name, str(count), *settings, check=check)


@needs_iptables
def test_zone_and_port_over_start_machine(daemon: DaemonProcess, private_bus: PrivateBus,
                                          tree: Path) -> None:
    """The container gives itself an address: its Port's DNAT rules then point at it."""
    name = MACHINES[2]
    _host_addr, guest_addr = free_subnet()
    (tree / "address-and-wait").write_text(  # a file: busctl takes a "-c" for its own
        f"ip addr add {guest_addr}/30 dev host0 && ip link set host0 up && exec sleep 60\n")
    start_machine(private_bus, name, "Directory", "s", str(tree), "ReadOnly", "b", "true",
                  "Command", "as", "2", "/bin/sh", "/address-and-wait", "NetworkZone", "s", ZONE,
                  "Port", "as", "1", "tcp:8082:80")
    try:
        wait_until("the machine's veth in the zone", lambda: BRIDGE in links()
                   and brif(BRIDGE) == {f"vb-{name}"})
        wait_until("the Port's rules for the machine's address",
                   lambda: len([r for r in nat_rules()
                                if "--dport 8082" in r and f"{guest_addr}:80" in r]) == 2)
    finally:
        busctl(private_bus, "call", "org.hostel1", "/org/hostel1/machine",
               "org.hostel1.MachineManager", "KillMachine", "ssi", name, "all", "9", check=False)
    wait_until("the zone bridge to go", lambda: BRIDGE not in links())

    refused = start_machine(private_bus, name, "Directory", "s", str(tree),
                            "Command", "as", "1", "/bin/true", "PrivateNetwork", "b", "true",
                            "Port", "as", "1", "tcp:99999", check=False)
    assert refused.returncode != 0
    assert "Failed to parse host port tcp:99999: Numerical result out of range" in refused.stderr
    refused = start_machine(private_bus, name, "Directory", "s", str(tree),
                            "Command", "as", "1", "/bin/true", "NetworkZone", "s", "x" * 13,
                            check=False)
    assert f"Network zone name not valid: vz-{'x' * 13}" in refused.stderr


# Ports -----------------------------------------------------------------------


def free_subnet() -> tuple[str, str]:
    routes = json.loads(ip("-4", "-j", "route", "show", "table", "all").stdout)
    used = [ipaddress.ip_network(r["dst"], strict=False) for r in routes if r["dst"] != "default"]
    for block in ("198.51.100.0/24", "203.0.113.0/24"):
        for net in ipaddress.ip_network(block).subnets(new_prefix=30):
            if not any(net.overlaps(u) for u in used):
                host, guest = list(net.hosts())
                return str(host), str(guest)
    raise AssertionError("no free /30 in TEST-NET-2/3 for a test address")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@needs_iptables
def test_port_reaches_a_listener_in_the_container(daemon: DaemonProcess, tree: Path) -> None:
    name = MACHINES[0]
    host_addr, guest_addr = free_subnet()
    host_port, container_port = free_port(), 7000 + int(TAG) % 1000
    script = (f"ip addr add {guest_addr}/30 dev host0 && ip link set host0 up && "
              f"echo ready && echo hello-from-the-container | nc -l -p {container_port}")
    proc = start(daemon, tree, name, "--network-veth", f"--port=tcp:{host_port}:{container_port}",
                 "/bin/sh", "-c", script)
    try:
        ready(proc)
        ip("addr", "add", f"{host_addr}/30", "dev", f"ve-{name}")
        ip("link", "set", f"ve-{name}", "up")
        wait_until("the DNAT rules for the container's address",
                   lambda: len([r for r in nat_rules() if f"{guest_addr}:{container_port}" in r]) == 2)
        rules = nat_rules()
        assert any(r.startswith("-A PREROUTING") and f"--dport {host_port}" in r for r in rules)
        assert any(r.startswith("-A OUTPUT") and "! -d 127.0.0.0/8" in r for r in rules)
        with socket.create_connection((host_addr, host_port), timeout=10) as conn:
            conn.settimeout(10)
            received = b""
            while chunk := conn.recv(100):
                received += chunk
        assert received == b"hello-from-the-container\n"
        status, _out, err = finish(proc)
        assert status == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert nat_rules() == []  # removed when the container ended, before hostelctl returned


@needs_iptables
def test_ports_follow_the_container_losing_its_address(daemon: DaemonProcess, tree: Path) -> None:
    name = MACHINES[1]
    _host_addr, guest_addr = free_subnet()
    script = (f"ip addr add {guest_addr}/30 dev host0 && ip link set host0 up && echo ready && "
              f"read line && ip addr del {guest_addr}/30 dev host0 && echo gone && read line; exit 0")
    proc = subprocess.Popen([HOSTELCTL, "run", "-q", "-D", str(tree), "-M", name,
                             "--network-veth", "-p", "udp:5353", "-p", "8080:80",
                             "/bin/sh", "-c", script],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=daemon.environment())
    assert proc.stdin is not None and proc.stdout is not None
    try:
        ready(proc)
        wait_until("two rules per port", lambda: len(nat_rules()) == 4)
        rules = nat_rules()
        assert sum("-p udp -m udp --dport 5353" in r and f"{guest_addr}:5353" in r
                   for r in rules) == 2
        assert sum("-p tcp -m tcp --dport 8080" in r and f"{guest_addr}:80" in r
                   for r in rules) == 2
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "gone\n"
        wait_until("the rules to go with the address", lambda: nat_rules() == [])
        proc.stdin.close()
        assert finish(proc)[0] == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@needs_iptables
def test_rules_a_killed_hosteld_left_are_purged(daemon: DaemonProcess, tree: Path) -> None:
    """A rule with the machine's comment (as a hosteld killed mid-run leaves it) goes when a
    machine of that name starts with --port, and whatever is left goes at its exit."""
    name = MACHINES[2]
    stale = ["OUTPUT", "-p", "tcp", "-m", "tcp", "--dport", "9", "-m", "comment",
             "--comment", f"hostel:{name}", "-j", "DNAT", "--to-destination", "192.0.2.1:9"]
    subprocess.run(["iptables", "-w", "5", "-t", "nat", "-A", *stale], check=True, timeout=30)
    try:
        result = subprocess.run([HOSTELCTL, "run", "-q", "-D", str(tree), "-M", name,
                                 "--private-network", "-p", "9", "/bin/sh", "-c",
                                 "iptables -V >/dev/null 2>&1; echo ran"],
                                stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                env=daemon.environment(), timeout=60)
        assert (result.returncode, result.stdout) == (0, "ran\n"), result.stderr
        assert nat_rules() == []
    finally:
        subprocess.run(["iptables", "-w", "5", "-t", "nat", "-D", *stale], capture_output=True,
                       timeout=30)


@needs_iptables
def test_port_from_a_settings_file_needs_trust(daemon: DaemonProcess, tree: Path) -> None:
    """Beside the tree a file is untrusted: its Port= is ignored with 252's warning."""
    named = tree.parent / MACHINES[2]
    tree.rename(named)
    (named.parent / f"{MACHINES[2]}.nspawn").write_text("[Network]\nVirtualEthernet=yes\nPort=8081\n")
    result = hostel(daemon, named, "/bin/true")
    assert result.returncode == 0, result.stderr
    assert (f"Ignoring Port= setting, file {named.parent}/{MACHINES[2]}.nspawn is not trusted."
            in result.stderr)


# Refusals, side by side with systemd-nspawn 252 ---------------------------------


REFUSALS = [
    (("-p", "80"), "Cannot use --port= without private networking."),
    (("-n", "-p", "foo"), "Failed to parse host port foo: Invalid argument"),
    (("-n", "-p", "tcp:0"), "Failed to parse host port tcp:0: Invalid argument"),
    (("-n", "-p", "sctp:80"), "Failed to parse host port sctp:80: Invalid argument"),
    (("-n", "-p", "80:70000"), "Failed to parse host port 80:70000: Numerical result out of range"),
    (("-n", "-p", "-5"), "Failed to parse host port -5: Numerical result out of range"),
    (("-n", "-p", "080"), "Failed to parse host port 080: Invalid argument"),
    (("--network-veth", "-p", "80", "-p", "80:81"), "Duplicate port specification: 80:81"),
    (("--network-zone=abcdefghijklm",), "Network zone name not valid: vz-abcdefghijklm"),
    (("--network-zone=a/b",), "Network zone name not valid: vz-a/b"),
    (("--network-zone=a%b",), "Network zone name not valid: vz-a%b"),
    (("--network-zone=x", "--network-bridge=br0"),
     "--network-bridge= and --network-zone= may not be combined."),
]


@needs_nspawn
@pytest.mark.parametrize("args,message", REFUSALS, ids=[" ".join(a) for a, _ in REFUSALS])
def test_refusals_match_nspawn(daemon: DaemonProcess, tree: Path, args: tuple[str, ...],
                               message: str) -> None:
    theirs = nspawn(tree, *args, "/bin/true")
    ours = hostel(daemon, tree, *args, "/bin/true")
    # nspawn's first line (it may add one about its zone lock: its /run is a private tmpfs)
    assert (theirs.returncode, theirs.stderr.splitlines()[:1]) == (1, [message])
    assert ours.returncode == 1 and message in ours.stderr, ours.stderr
    assert "Traceback" not in ours.stderr


@needs_nspawn
@pytest.mark.parametrize("spec", ["0x50", "0120", "+80", "udp:53:5353", "65535"])
def test_port_specs_nspawn_takes_are_taken(daemon: DaemonProcess, tree: Path, spec: str) -> None:
    theirs = nspawn(tree, "--private-network", "-p", spec, "/bin/true")
    ours = hostel(daemon, tree, "--private-network", "-p", spec, "/bin/true")
    assert (theirs.returncode, ours.returncode) == (0, 0), (theirs.stderr, ours.stderr)


# A hosteld restart -----------------------------------------------------------------


@needs_iptables
def test_an_adopted_machine_leaves_its_zone_and_rules_at_its_end(private_bus: PrivateBus,
                                                                  tree: Path,
                                                                  tmp_path: Path) -> None:
    """hosteld killed while a zone+port machine runs: the rules keep forwarding meanwhile,
    and the next hosteld, which adopts the machine, removes them and the bridge at its end."""
    name = MACHINES[0]
    _host_addr, guest_addr = free_subnet()
    runtime = tmp_path / "run"
    first = DaemonProcess(private_bus.address, runtime, tmp_path / "state", bus=private_bus).start()
    second = None
    client = subprocess.Popen(
        [HOSTELCTL, "run", "-q", "-D", str(tree), "-M", name, "--as-pid2",
         f"--network-zone={ZONE}", "-p", "8084:84", "/bin/sh", "-c",
         f"ip addr add {guest_addr}/30 dev host0 && ip link set host0 up && echo ready && "
         "exec sleep 300"],
        env=first.environment(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        ready(client)
        wait_until("the rules", lambda: len(nat_rules()) == 2)
        first.stop(signal.SIGKILL)
        client.kill()
        client.wait()
        assert len(nat_rules()) == 2 and brif(BRIDGE) == {f"vb-{name}"}
        second = DaemonProcess(private_bus.address, runtime, tmp_path / "state",
                               bus=private_bus).start()
        result = subprocess.run([HOSTELCTL, "kill", name, "--signal=KILL"], capture_output=True,
                                text=True, env=second.environment(), timeout=30)
        assert result.returncode == 0, result.stderr
        wait_until("the adopted machine's rules to go", lambda: nat_rules() == [])
        wait_until("its zone bridge to go", lambda: BRIDGE not in links())
    finally:
        for daemon in (second, first):
            if daemon is not None and daemon.proc is not None and daemon.proc.poll() is None:
                terminate_all_machines(daemon)
                daemon.stop()
        if client.poll() is None:
            client.kill()
            client.wait()
