"""Container networking on real links: a real child in its own network namespace,
real veth pairs, bridges and macvlans, checked with iproute2 and ping from both
sides. Every link is named with this run's prefix and removed afterwards; the
host's own interfaces are only ever read."""
from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest

from hostel import native
from hostel.bus import InvalidArgs
from hostel.machine.network import (CONTAINER_HASH_KEY, HOST_HASH_KEY, MACVLAN_HASH_KEY,
                                    NetworkError, NetworkSettings, generate_mac,
                                    interface_addresses, read_machine_id, setup_network,
                                    teardown_network)
from hostel.spawn import Child, Plan, spawn

TAG = f"{os.getpid() % 100000:05d}"
PREFIX = f"h{TAG}-"  # test links: h12345-m0
MACHINE = f"t{TAG}"  # machine names: t12345v -> ve-t12345v
PATH_ENV = "PATH=/usr/sbin:/usr/bin:/sbin:/bin"


def ip(*args: str, pid: int | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = ["ip", *args]
    if pid is not None:
        cmd = ["nsenter", "-t", str(pid), "-n", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=30)


def link(name: str, pid: int | None = None) -> dict:
    """iproute2's own view of a link, on the host or inside the container."""
    return json.loads(ip("-j", "-d", "link", "show", "dev", name, pid=pid).stdout)[0]


def link_names(pid: int | None = None) -> set[str]:
    return {entry["ifname"] for entry in json.loads(ip("-j", "link", "show", pid=pid).stdout)}


def ping(address: str, pid: int | None = None) -> None:
    cmd = ["busybox", "ping", "-c", "1", "-W", "2", address]
    if pid is not None:
        cmd = ["nsenter", "-t", str(pid), "-n", *cmd]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"ping {address} from {'container' if pid else 'host'}: {result.stdout}{result.stderr}"


def free_subnet() -> tuple[str, str, int]:
    """Host and container addresses of a /30 in TEST-NET-2 or -3 that no route or
    address on the host touches, so a test never shadows a real address (this
    VM's own network may well be in TEST-NET-1)."""
    routes = json.loads(ip("-4", "-j", "route", "show", "table", "all").stdout)
    used = [ipaddress.ip_network(r["dst"], strict=False) for r in routes if r["dst"] != "default"]
    for block in ("198.51.100.0/24", "203.0.113.0/24"):
        for net in ipaddress.ip_network(block).subnets(new_prefix=30):
            if not any(net.overlaps(u) for u in used):
                host, guest = list(net.hosts())
                return str(host), str(guest), net.prefixlen
    raise AssertionError("no free /30 in TEST-NET-2/3 for a test address")


def ours(names: set[str]) -> set[str]:
    """The links this run made, or made for this run's machines."""
    machine_links = tuple(f"{kind}-{MACHINE}" for kind in ("ve", "vb"))
    return {n for n in names if n.startswith((PREFIX, f"mv-{PREFIX}", *machine_links))}


@pytest.fixture(autouse=True)
def nothing_left_behind() -> Iterator[None]:
    """After each test (and its other fixtures), no link of ours is left on the host.
    A namespace's links go away asynchronously after its last process, so wait a little."""
    assert not ours(link_names()), "links of this run existed before the test"
    yield
    deadline = time.monotonic() + 5
    while ours(link_names()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not ours(link_names())


@pytest.fixture
def host_links() -> Iterator[Callable[..., None]]:
    """Create test links on the host (`ip link add NAME ...`); all deleted afterwards."""
    made: list[str] = []

    def add(name: str, *spec: str, up: bool = True) -> None:
        ip("link", "add", name, *spec)
        made.append(name)
        if up:
            ip("link", "set", name, "up")

    try:
        yield add
    finally:
        for name in reversed(made):
            ip("link", "del", name, check=False)


@dataclass
class Container:
    """A child in a new network namespace, held before its payload until released,
    as the runner holds a container while the parent sets up its network."""

    child: Child
    go: int
    output: int
    running: bool = True

    @property
    def pid(self) -> int:
        return self.child.pid

    def release(self) -> str:
        """Let the payload run; return its first line (how it sees its loopback)."""
        os.write(self.go, b"x")
        self.child.wait_started()
        with os.fdopen(os.dup(self.output), "r") as out:
            return out.readline()

    def stop(self) -> None:
        if self.running:
            native.pidfd_send_signal(self.child.pidfd, signal.SIGKILL)
            native.pidfd_wait(self.child.pidfd, block=True)
            self.running = False

    def close(self) -> None:
        self.stop()
        self.child.close()
        os.close(self.go)
        os.close(self.output)


def start_container() -> Container:
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    plan = Plan()
    plan.dup2(out_w, 1)
    plan.wait_for_parent(go_r, "network set up")
    plan.execve("/bin/sh", ["sh", "-c", "ip -o link show dev lo; exec sleep 30"], [PATH_ENV])
    try:
        child = spawn(plan, native.CLONE_NEWNET)
    finally:
        os.close(go_r)
        os.close(out_w)
    return Container(child, go_w, out_r)


@pytest.fixture
def container() -> Iterator[Container]:
    box = start_container()
    try:
        yield box
    finally:
        box.close()


@pytest.fixture(scope="module")
def machine_id() -> bytes:
    return read_machine_id()


def test_veth_pair_with_nspawn_macs_and_traffic_both_ways(container: Container, machine_id: bytes) -> None:
    name = f"{MACHINE}v"
    setup = setup_network(NetworkSettings(veth=True), name, container.pid)

    host_end = link(f"ve-{name}")
    assert host_end["address"] == generate_mac(name, HOST_HASH_KEY, 0, machine_id)
    assert "UP" in host_end["flags"]
    assert setup.interfaces == [host_end["ifindex"]] and setup.host_veth == f"ve-{name}"
    inner = link("host0", pid=container.pid)
    assert inner["address"] == generate_mac(name, CONTAINER_HASH_KEY, 0, machine_id)
    assert inner["linkinfo"]["info_kind"] == "veth"
    assert "host0" not in link_names()

    host_addr, guest_addr, plen = free_subnet()
    ip("addr", "add", f"{host_addr}/{plen}", "dev", f"ve-{name}")
    ip("addr", "add", f"{guest_addr}/{plen}", "dev", "host0", pid=container.pid)
    ip("link", "set", "host0", "up", pid=container.pid)
    ping(host_addr, pid=container.pid)
    ping(guest_addr)

    addresses = interface_addresses(container.pid)
    assert (socket.AF_INET, guest_addr) in addresses
    assert not {(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")} & set(addresses)
    assert container.release().startswith("1: lo: <LOOPBACK,UP,LOWER_UP>")


def test_loopback_is_up_before_the_payload_starts(container: Container) -> None:
    setup = setup_network(NetworkSettings(private_network=True), f"{MACHINE}p", container.pid)
    assert setup.interfaces == [] and setup.host_veth is None
    assert link_names(container.pid) == {"lo"}
    first_line = container.release()
    assert first_line.startswith("1: lo: <LOOPBACK,UP,LOWER_UP>"), first_line


def test_daemon_path_through_a_worker_thread(container: Container) -> None:
    """The daemon runs these from its event loop through asyncio.to_thread."""
    name = f"{MACHINE}w"

    async def scenario() -> list[int]:
        setup = await asyncio.to_thread(setup_network, NetworkSettings(veth=True), name, container.pid)
        await asyncio.to_thread(teardown_network, setup)
        return setup.interfaces

    interfaces = asyncio.run(scenario())
    assert len(interfaces) == 1
    assert f"ve-{name}" not in link_names()


def test_macs_are_stable_across_containers_of_the_same_name(machine_id: bytes) -> None:
    name = f"{MACHINE}s"
    seen = []
    for _ in range(2):
        box = start_container()
        try:
            setup_network(NetworkSettings(veth=True), name, box.pid)
            seen.append((link(f"ve-{name}")["address"], link("host0", pid=box.pid)["address"]))
        finally:
            box.close()
        deadline = time.monotonic() + 5  # the old namespace must release the name
        while f"ve-{name}" in link_names() and time.monotonic() < deadline:
            time.sleep(0.05)
    assert seen[0] == seen[1]
    assert seen[0][0] != seen[0][1]


def test_bridge_mode_joins_the_bridge(container: Container, host_links: Callable[..., None]) -> None:
    bridge, name = f"{PREFIX}br", f"{MACHINE}b"
    host_links(bridge, "type", "bridge")
    host_addr, guest_addr, plen = free_subnet()
    ip("addr", "add", f"{host_addr}/{plen}", "dev", bridge)
    settings = NetworkSettings(bridge=bridge)
    settings.validate()
    setup = setup_network(settings, name, container.pid)

    host_end = link(f"vb-{name}")
    assert host_end["master"] == bridge and "UP" in host_end["flags"]
    assert setup.interfaces == [link(bridge)["ifindex"]]  # as nspawn registers it
    assert f"ve-{name}" not in link_names()
    ip("addr", "add", f"{guest_addr}/{plen}", "dev", "host0", pid=container.pid)
    ip("link", "set", "host0", "up", pid=container.pid)
    ping(host_addr, pid=container.pid)


def test_macvlans_in_bridge_mode_with_indexed_macs(container: Container, host_links: Callable[..., None],
                                                  machine_id: bytes) -> None:
    name = f"{MACHINE}m"
    host_links(f"{PREFIX}m0", "type", "veth", "peer", "name", f"{PREFIX}m1")
    host_links(f"{PREFIX}n0", "type", "veth", "peer", "name", f"{PREFIX}n1")
    ip("link", "set", f"{PREFIX}m1", "up")
    settings = NetworkSettings(macvlan=[f"{PREFIX}m0", f"{PREFIX}n0"])
    settings.validate()
    setup = setup_network(settings, name, container.pid)

    assert setup.macvlans == [f"mv-{PREFIX}m0", f"mv-{PREFIX}n0"] and setup.interfaces == []
    for index, parent in enumerate([f"{PREFIX}m0", f"{PREFIX}n0"]):
        inner = link(f"mv-{parent}", pid=container.pid)
        assert inner["linkinfo"]["info_kind"] == "macvlan"
        assert inner["linkinfo"]["info_data"]["mode"] == "bridge"
        assert inner["address"] == generate_mac(name, MACVLAN_HASH_KEY, index, machine_id)
        assert f"mv-{parent}" not in link_names()
    # Traffic leaves through the parent: the parent's veth peer on the host answers.
    host_addr, guest_addr, plen = free_subnet()
    ip("addr", "add", f"{host_addr}/{plen}", "dev", f"{PREFIX}m1")
    ip("addr", "add", f"{guest_addr}/{plen}", "dev", f"mv-{PREFIX}m0", pid=container.pid)
    ip("link", "set", f"mv-{PREFIX}m0", "up", pid=container.pid)
    ping(host_addr, pid=container.pid)


def test_network_interface_is_moved_in(container: Container, host_links: Callable[..., None]) -> None:
    inside, outside = f"{PREFIX}i0", f"{PREFIX}i1"
    host_links(inside, "type", "veth", "peer", "name", outside)
    settings = NetworkSettings(interfaces=[inside])
    settings.validate()
    setup = setup_network(settings, f"{MACHINE}i", container.pid)
    try:
        assert setup.moved == [inside]
        assert inside not in link_names() and inside in link_names(container.pid)
        host_addr, guest_addr, plen = free_subnet()
        ip("addr", "add", f"{host_addr}/{plen}", "dev", outside)
        ip("link", "set", outside, "up")
        ip("addr", "add", f"{guest_addr}/{plen}", "dev", inside, pid=container.pid)
        ip("link", "set", inside, "up", pid=container.pid)
        ping(host_addr, pid=container.pid)
    finally:
        teardown_network(setup)  # hands it back, as nspawn 252 does at exit
    assert inside in link_names() and inside not in link_names(container.pid)
    assert setup.netns_fd == -1  # the namespace is no longer pinned


def test_failed_setup_rolls_back_and_names_the_link(container: Container,
                                                    host_links: Callable[..., None]) -> None:
    name = f"{MACHINE}c"
    host_links(f"ve-{name}", "type", "veth", "peer", "name", f"{PREFIX}c1")  # someone else's
    host_links(f"{PREFIX}i0", "type", "veth", "peer", "name", f"{PREFIX}i1")
    settings = NetworkSettings(veth=True, interfaces=[f"{PREFIX}i0"])
    with pytest.raises(NetworkError) as failure:
        setup_network(settings, name, container.pid)
    assert str(failure.value) == (f"creating veth ve-{name}/host0: File exists "
                                  "(another container with this name?)")
    assert f"{PREFIX}i0" in link_names()  # handed back to the host
    assert f"{PREFIX}i0" not in link_names(container.pid)
    assert f"ve-{name}" in link_names()  # not ours, so left alone


def test_bridge_vanishing_before_setup_leaves_no_veth(container: Container) -> None:
    name = f"{MACHINE}g"
    with pytest.raises(NetworkError, match=f"looking up interface {PREFIX}gone on the host: no such interface"):
        setup_network(NetworkSettings(bridge=f"{PREFIX}gone"), name, container.pid)
    assert f"vb-{name}" not in link_names()
    assert "host0" not in link_names(container.pid)


def test_teardown_removes_the_host_end_and_is_idempotent(container: Container) -> None:
    name = f"{MACHINE}t"
    setup = setup_network(NetworkSettings(veth=True), name, container.pid)
    assert f"ve-{name}" in link_names()
    teardown_network(setup)
    assert f"ve-{name}" not in link_names()
    assert "host0" not in link_names(container.pid)
    teardown_network(setup)
    assert setup.host_veth_index is None


def test_teardown_after_the_container_died(container: Container) -> None:
    setup = setup_network(NetworkSettings(veth=True), f"{MACHINE}d", container.pid)
    container.stop()
    teardown_network(setup)  # whether or not the namespace has gone yet
    assert f"ve-{MACHINE}d" not in link_names()


def test_setup_for_a_process_that_is_gone() -> None:
    box = start_container()
    box.close()
    with pytest.raises(NetworkError, match=f"process {box.pid}: the process is gone"):
        setup_network(NetworkSettings(veth=True), f"{MACHINE}x", box.pid)


def test_child_without_its_own_network_namespace_is_refused() -> None:
    plan = Plan()
    plan.execve("/bin/sleep", ["sleep", "30"], [])
    child = spawn(plan, 0)
    try:
        child.wait_started()
        with pytest.raises(NetworkError, match=f"process {child.pid} shares the host's network namespace"):
            setup_network(NetworkSettings(veth=True), f"{MACHINE}h", child.pid)
    finally:
        native.pidfd_send_signal(child.pidfd, signal.SIGKILL)
        native.pidfd_wait(child.pidfd, block=True)
        child.close()
    assert "host0" not in link_names()


def test_validate_refuses_what_cannot_work(host_links: Callable[..., None]) -> None:
    host_links(f"{PREFIX}a0", "type", "veth", "peer", "name", f"{PREFIX}a1", up=False)
    cases = [
        (NetworkSettings(bridge=f"{PREFIX}a0"), f"--network-bridge={PREFIX}a0: this interface is not a bridge"),
        (NetworkSettings(bridge=f"{PREFIX}br9"), f"--network-bridge={PREFIX}br9: no such interface"),
        (NetworkSettings(interfaces=[f"{PREFIX}a0", f"{PREFIX}a0"]), f"--network-interface={PREFIX}a0: given twice"),
        (NetworkSettings(macvlan=[f"{PREFIX}a0", f"{PREFIX}a0"]), f"--network-macvlan={PREFIX}a0: given twice"),
        (NetworkSettings(interfaces=[f"{PREFIX}a0"], macvlan=[f"{PREFIX}a0"]),
         f"--network-macvlan={PREFIX}a0: this interface is moved into the container"),
        (NetworkSettings(interfaces=[f"{PREFIX}a1"], macvlan=[f"{PREFIX}a0" + "x" * 8]),
         f"--network-macvlan={PREFIX}a0xxxxxxxx: interface names are at most 15 bytes"),
    ]
    for settings, message in cases:
        with pytest.raises(InvalidArgs) as failure:
            settings.validate()
        assert str(failure.value).startswith(message), str(failure.value)


def test_macvlan_names_that_collide_after_the_cut_are_refused(host_links: Callable[..., None]) -> None:
    first, second = f"{PREFIX}abcdefg", f"{PREFIX}abcdefh"  # 15 chars; mv- names cut to 15
    host_links(first, "type", "veth", "peer", "name", f"{PREFIX}q1", up=False)
    host_links(second, "type", "veth", "peer", "name", f"{PREFIX}q2", up=False)
    with pytest.raises(InvalidArgs, match=f"--network-macvlan={second}: its macvlan would be named"):
        NetworkSettings(macvlan=[first, second]).validate()


NSPAWN_SCRIPT = textwrap.dedent("""\
    set -e
    mount --make-rprivate /
    mount -t tmpfs tmpfs /run
    mkdir -p /run/udev/data
    for ifindex in "$@"; do echo I:1 > /run/udev/data/n$ifindex; done
    systemd-nspawn -q --register=no --keep-unit -D "$ROOT" -M "$MACHINE" --network-veth \\
        --network-macvlan="$P0" --network-macvlan="$P1" \\
        /bin/busybox sh -c 'busybox ip -o link; busybox sleep 4' > "$OUT" 2>&1 &
    for _ in $(seq 50); do ip -o link show dev "ve-$MACHINE" && break; sleep 0.1; done
    wait
""")


@pytest.mark.skipif(shutil.which("systemd-nspawn") is None, reason="systemd-nspawn (systemd-container) not installed")
def test_macs_match_systemd_nspawn(tmp_path: Path, host_links: Callable[..., None], machine_id: bytes) -> None:
    """systemd-nspawn itself is the oracle. It insists on udev-initialized macvlan
    parents, so its udev database is faked in a private mount namespace."""
    root = tmp_path / "root"
    for sub in ("bin", "etc", "usr/lib", "proc", "sys", "dev", "run", "tmp"):
        (root / sub).mkdir(parents=True)
    shutil.copy(shutil.which("busybox") or "/bin/busybox", root / "bin" / "busybox")
    (root / "usr/lib/os-release").write_text("ID=hosteltest\n")
    name, parents = f"{MACHINE}o", [f"{PREFIX}o0", f"{PREFIX}p0"]
    for parent, peer in zip(parents, [f"{PREFIX}o1", f"{PREFIX}p1"]):
        host_links(parent, "type", "veth", "peer", "name", peer, up=False)
    env = dict(os.environ, ROOT=str(root), MACHINE=name, P0=parents[0], P1=parents[1],
               OUT=str(tmp_path / "out"))
    indexes = [str(link(parent)["ifindex"]) for parent in parents]
    result = subprocess.run(["unshare", "-m", "sh", "-c", NSPAWN_SCRIPT, "nspawn", *indexes],
                            capture_output=True, text=True, env=env, timeout=60)
    inside = (tmp_path / "out").read_text()
    assert result.returncode == 0, result.stderr + inside
    host_mac = result.stdout.split("link/ether ")[1].split()[0]
    assert host_mac == generate_mac(name, HOST_HASH_KEY, 0, machine_id)
    macs = {line.split(":")[1].strip().split("@")[0]: line.split("link/ether ")[1].split()[0]
            for line in inside.splitlines() if "link/ether" in line}
    assert macs == {
        "host0": generate_mac(name, CONTAINER_HASH_KEY, 0, machine_id),
        f"mv-{parents[0]}": generate_mac(name, MACVLAN_HASH_KEY, 0, machine_id),
        f"mv-{parents[1]}": generate_mac(name, MACVLAN_HASH_KEY, 1, machine_id),
    }
