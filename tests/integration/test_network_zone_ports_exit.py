"""--network-zone and --port against systemd-nspawn 252 at the edges: a settings file's
duplicate Port=, what is left on the host the moment the client exits, and an adopted
machine's ports after a hosteld restart.

- 252 ignores a Port= that repeats a host port (and one it cannot parse) with a
  warning naming the file and line; the start goes on.
- 252 deletes its veth and an emptied zone bridge before it exits: a script running
  `ip link show` right after finds neither. hostel reports the exit once both are out
  of view (link_removal.py), leaving the kernel's RCU wait to a background thread.
- After kill -9 of hosteld, the next one takes the machine back and follows its
  address with the port rules, as the first did.

Names carry this run's pid (and differ from test_network_zone_ports.py's), so parallel
runs never meet; every link and rule of ours is checked gone after each test."""
from __future__ import annotations

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

from hostel.machine import link_removal, port_forward, rtnl
from hostel.privatebus import DaemonProcess, PrivateBus

from conftest import HOSTELCTL, terminate_all_machines
from integration.nspawn_pair import NSPAWN, hostel, needs_nspawn

TAG = f"{os.getpid() % 10000:04d}"
ZONE = f"x{TAG}"          # bridge vz-x1234
BRIDGE = f"vz-{ZONE}"
MACHINES = [f"nze{TAG}{suffix}" for suffix in "abc"]
SCRATCH = f"nzl{TAG}"     # links made straight by a test

needs_iptables = pytest.mark.skipif(not shutil.which("iptables"),
                                    reason="iptables not installed (make setup installs it)")


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def link_exists(name: str) -> bool:
    """As a script would ask: `ip link show NAME` succeeds, or /sys/class/net has it."""
    return ip("link", "show", name, check=False).returncode == 0 or os.path.lexists(
        f"/sys/class/net/{name}")


def our_links() -> set[str]:
    names = {e["ifname"] for e in json.loads(ip("-j", "link", "show").stdout)}
    return {n for n in names if n == BRIDGE or SCRATCH in n or any(m in n for m in MACHINES)}


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
        for name in our_links():
            ip("link", "del", name, check=False)
        ip("netns", "del", SCRATCH, check=False)
    if shutil.which("iptables"):
        left = nat_rules()
        for machine in MACHINES:
            port_forward.purge(machine)
        assert not left


@pytest.fixture
def daemon(trusted_hosteld: DaemonProcess) -> DaemonProcess:
    return trusted_hosteld


def nspawn_with_settings(tree: Path, name: str, settings: str,
                         *args: str) -> subprocess.CompletedProcess[str]:
    """systemd-nspawn 252 with /run/systemd/nspawn/NAME.nspawn holding `settings` (in its
    private /run, so the host's is never touched)."""
    script = ('mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/nspawn && '
              'printf %s "$0" > "/run/systemd/nspawn/$1.nspawn" && shift && exec "$@"')
    return subprocess.run(["/usr/bin/unshare", "-m", "--propagation=private", "/bin/sh", "-c",
                           script, settings, name, NSPAWN, "--register=no", "--keep-unit", "-q",
                           "-D", str(tree), "-M", name, *args],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)


# 1. Duplicate Port= in a settings file ------------------------------------------------

# An empty Port= first: 252 resets nothing with it (a parse error), so 80:81 repeats 80.
DUPLICATES = "[Network]\nPrivate=yes\nPort=\nPort=80\nPort=80:81\nPort=udp:80\nPort=foo\n"


@needs_nspawn
@needs_iptables
def test_a_repeated_port_line_is_ignored_with_252s_warning(daemon: DaemonProcess, tree: Path,
                                                           trusted_dir: Path) -> None:
    name = MACHINES[0]
    ours_file = trusted_dir / f"{name}.nspawn"
    ours_file.write_text(DUPLICATES)
    theirs = nspawn_with_settings(tree, name, DUPLICATES, "/bin/true")
    ours = hostel(daemon, tree, "-M", name, "/bin/true")
    assert (theirs.returncode, ours.returncode) == (0, 0), (theirs.stderr, ours.stderr)
    path = f"/run/systemd/nspawn/{name}.nspawn"
    expected = [f"{path}:3: Failed to parse host port : Invalid argument",
                f"{path}:5: Duplicate port specification, ignoring: 80:81",
                f"{path}:7: Failed to parse host port foo: Invalid argument"]
    assert theirs.stderr.splitlines() == expected
    assert ours.stderr.splitlines() == [line.replace(path, str(ours_file)) for line in expected]


# 2. What the host has the moment the client exits ---------------------------------------


def run_then_look(command: list[str], env: dict[str, str] | None, looked_for: str) -> bool:
    """Run a container to its end, then look for the link straight away, as
    `hostelctl run ...; ip link show NAME` would."""
    result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    return link_exists(looked_for)


@needs_nspawn
@pytest.mark.parametrize("option,link", [
    ("--network-veth", f"ve-{MACHINES[1]}"),
    (f"--network-zone={ZONE}", f"vb-{MACHINES[1]}"),
    (f"--network-zone={ZONE}", BRIDGE),
], ids=["veth", "zone-member", "zone-bridge"])
def test_links_are_gone_when_the_client_exits_as_after_nspawn(daemon: DaemonProcess, tree: Path,
                                                              option: str, link: str) -> None:
    name = MACHINES[1]
    nspawn = ["/usr/bin/unshare", "-m", "--propagation=private", "/bin/sh", "-c",
              'mount -t tmpfs tmpfs /run && exec "$@"', "sh", NSPAWN, "--register=no",
              "--keep-unit", "-q", "-D", str(tree), "-M", name, option, "/bin/true"]
    assert not run_then_look(nspawn, None, link)  # 252: deleted before it exits
    ours = [HOSTELCTL, "run", "-q", "-D", str(tree), "-M", name, option, "/bin/true"]
    seen = [run_then_look(ours, daemon.environment(), link) for _ in range(5)]
    assert seen == [False] * 5


def test_a_removed_link_is_out_of_view_when_remove_returns() -> None:
    """link_removal.remove returns with the veth unlisted and out of /sys/class/net (a
    namesake can be made at once), whether the kernel acknowledged it yet or not."""
    ip("netns", "add", SCRATCH)
    nsfd = os.open(f"/run/netns/{SCRATCH}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        for _ in range(3):
            with rtnl.Rtnl() as host:
                host.add_veth(SCRATCH, "02:00:00:00:00:01", "host0", "02:00:00:00:00:02", nsfd)
            index = socket.if_nametoindex(SCRATCH)
            link_removal.remove(index, SCRATCH)
            assert not link_exists(SCRATCH)
            assert link_removal.out_of_view(index, SCRATCH)
            with rtnl.Rtnl() as host:  # the name is free again
                host.add_veth(SCRATCH, "02:00:00:00:00:01", "host1", "02:00:00:00:00:03", nsfd)
            link_removal.remove(socket.if_nametoindex(SCRATCH), SCRATCH)
        link_removal.remove(index, SCRATCH)  # gone already: nothing to do, no error
    finally:
        os.close(nsfd)
        ip("netns", "del", SCRATCH, check=False)


# 3. An adopted machine's ports follow its address ---------------------------------------


@needs_iptables
def test_an_adopted_machines_rules_follow_its_address(private_bus: PrivateBus, tree: Path,
                                                      tmp_path: Path) -> None:
    """hosteld killed while a --port machine runs; the next one adopts it, and when the
    container then moves to another address the rules move with it, as under the first."""
    name = MACHINES[2]
    first_addr, second_addr = "198.18.47.2", "198.18.47.6"  # RFC 2544 benchmarking space
    os.mkfifo(tree / "go")
    script = (f"ip addr add {first_addr}/30 dev host0 && ip link set host0 up && echo ready && "
              f"read line < /go && ip addr del {first_addr}/30 dev host0 && "
              f"ip addr add {second_addr}/30 dev host0 && exec sleep 300")
    runtime = tmp_path / "run"
    first = DaemonProcess(private_bus.address, runtime, tmp_path / "state", bus=private_bus).start()
    second = None
    client = subprocess.Popen([HOSTELCTL, "run", "-q", "-D", str(tree), "-M", name, "--as-pid2",
                               "--network-veth", "-p", "8085:85", "/bin/sh", "-c", script],
                              env=first.environment(), stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert client.stdout is not None
        assert client.stdout.readline() == "ready\n"
        wait_until("the rules", lambda: sum(f"{first_addr}:85" in r for r in nat_rules()) == 2)
        first.stop(signal.SIGKILL)
        client.kill()
        client.wait()
        second = DaemonProcess(private_bus.address, runtime, tmp_path / "state",
                               bus=private_bus).start()
        go = os.open(tree / "go", os.O_WRONLY | os.O_NONBLOCK)  # ENXIO if it is not reading
        os.write(go, b"\n")  # the container changes its address now
        os.close(go)
        wait_until("the rules to follow the new address",
                   lambda: sorted(f"{second_addr}:85" in r for r in nat_rules()) == [True, True])
        result = subprocess.run([HOSTELCTL, "kill", name, "--signal=KILL"], capture_output=True,
                                text=True, env=second.environment(), timeout=30)
        assert result.returncode == 0, result.stderr
        wait_until("the adopted machine's rules to go", lambda: nat_rules() == [])
    finally:
        for daemon in (second, first):
            if daemon is not None and daemon.proc is not None and daemon.proc.poll() is None:
                terminate_all_machines(daemon)
                daemon.stop()
        if client.poll() is None:
            client.kill()
