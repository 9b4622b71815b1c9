"""`hostelctl guest run --network=veth` in a container, through hosteld: the payload has
eth0 with its run's /30, a default route and the host's resolvers, and reaches the host
(a ping reply, and a TCP reply from a listener the test runs on the host's end); without
the option it has `lo` only. The host's end is gone when the run ends, however it ends.

hosteld's pool is one /30 (HOSTEL_GUEST_NETWORK_POOL), so the addresses are known here
without asking hostel's own code, and a second run finds the pool exhausted."""
from __future__ import annotations

import ipaddress
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from hostel.privatebus import DaemonProcess, PrivateBus

from conftest import HOSTELCTL, busctl, hostelctl, hosteld_with_env
from unit.test_guest_images import busybox_layer, docker_archive, image_config

POOL = "10.231.254.0/30"
HOST_END, GUEST_END = "10.231.254.1", "10.231.254.2"
IMAGE = "netimg"
IP_FREEBIND = 15
APPLETS = ("sh", "ls", "cat", "ip", "ping", "nc", "echo", "sleep", "true")


@pytest.fixture
def daemon(private_bus: PrivateBus, tmp_path: Path) -> Iterator[DaemonProcess]:
    with hosteld_with_env(private_bus, tmp_path,
                          {"HOSTEL_GUEST_NETWORK_POOL": POOL}) as hosteld:
        layers = [busybox_layer(APPLETS).tar()]
        archive = docker_archive(tmp_path / "net.tar", layers, image_config(layers))
        imported = hostelctl(private_bus.address, "image", "import", str(archive), "--name",
                             IMAGE)
        assert imported.returncode == 0, imported.stderr
        yield hosteld


def _host_links_with(address: str) -> list[str]:
    out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True,
                         check=True).stdout
    return [line.split()[1] for line in out.splitlines() if f" {address}/" in line]


def _host_links_named(name: str) -> list[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                         check=True).stdout
    return [m for m in re.findall(r"^\d+: ([^:@]+)", out, re.M) if m.endswith(f"-{name}")]


def _expected_nameservers() -> list[str]:
    found = []
    for line in Path("/etc/resolv.conf").read_text().splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver" and \
                not ipaddress.ip_address(words[1]).is_loopback:
            found.append(words[1])
    return found


class HostListener:
    """A TCP listener on the host's end of the run's link (IP_FREEBIND: it binds before
    hosteld made the address); it answers one line and notes who sent it."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
        self.sock.bind((HOST_END, 0))
        self.sock.listen(1)
        self.sock.settimeout(60)
        self.port = self.sock.getsockname()[1]
        self.peer: str | None = None
        self.received = b""
        self.links_during_run: list[str] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, (self.peer, _port) = self.sock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(30)
            self.links_during_run = _host_links_with(HOST_END)
            while not self.received.endswith(b"\n"):
                part = conn.recv(100)
                if not part:
                    break
                self.received += part
            conn.sendall(b"host-reply:" + self.received)

    def close(self) -> None:
        self.sock.close()
        self.thread.join(10)


def _run(address: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return hostelctl(address, "guest", "run", "--quiet", "--image", IMAGE, *args,
                     timeout=timeout)


def test_with_veth_the_container_has_its_address_route_dns_and_reaches_the_host(
        private_bus: PrivateBus, daemon: DaemonProcess) -> None:
    listener = HostListener()
    script = "; ".join((
        "ls /sys/class/net", "ip -4 addr show eth0", "ip -4 route", "cat /etc/resolv.conf",
        f"ping -c 1 -W 10 {HOST_END}",
        f"echo guest-hello | nc -w 20 {HOST_END} {listener.port}"))
    try:
        run = _run(private_bus.address, "--name", "netrun-a", "--network=veth", "--",
                   "sh", "-c", script)
    finally:
        listener.close()
    assert run.returncode == 0, (run.stdout, run.stderr, daemon.log()[-2000:])
    out = run.stdout
    assert out.split("\n")[:2] == ["eth0", "lo"], out
    assert f"inet {GUEST_END}/30" in out, out
    assert f"default via {HOST_END} dev eth0" in out, out
    resolvers = [line.split()[1] for line in out.splitlines() if line.startswith("nameserver ")]
    assert resolvers == _expected_nameservers(), out
    assert "1 packets received" in out, out
    # only a host end that exists and answers gives these
    assert "host-reply:guest-hello" in out, out
    assert (listener.peer, listener.received) == (GUEST_END, b"guest-hello\n")
    assert len(listener.links_during_run) == 1 and \
        listener.links_during_run[0].endswith("-netrun-a"), listener.links_during_run
    assert _host_links_with(HOST_END) == [] and _host_links_named("netrun-a") == [], \
        "the host's end outlived the run"


def test_without_network_the_container_has_loopback_only(
        private_bus: PrivateBus, daemon: DaemonProcess) -> None:
    run = _run(private_bus.address, "--name", "netrun-b", "--", "sh", "-c",
               "ls /sys/class/net; cat /proc/net/dev; ip -4 addr")
    assert run.returncode == 0, (run.stdout, run.stderr)
    lines = run.stdout.splitlines()
    assert lines[0] == "lo", run.stdout
    devices = [line.split(":")[0].strip() for line in lines if re.match(r"^\s*\w+:\s+\d", line)]
    assert devices == ["lo"], run.stdout
    assert "inet 127.0.0.1/8" in run.stdout and HOST_END not in run.stdout, run.stdout
    assert _host_links_named("netrun-b") == []


def test_a_run_that_fails_to_start_leaves_no_link(
        private_bus: PrivateBus, daemon: DaemonProcess) -> None:
    run = _run(private_bus.address, "--name", "netrun-c", "--network=veth", "--",
               "no-such-command")
    assert run.returncode == 127, (run.stdout, run.stderr)
    assert _host_links_with(HOST_END) == [] and _host_links_named("netrun-c") == []


def _wait_for(condition, what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_an_exhausted_pool_and_an_unknown_mode_are_refused_by_name(
        private_bus: PrivateBus, daemon: DaemonProcess) -> None:
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=private_bus.address)
    holder = subprocess.Popen([HOSTELCTL, "guest", "run", "--quiet", "--image", IMAGE,
                               "--name", "netrun-d", "--network=veth", "--", "sleep", "120"],
                              env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: _host_links_with(HOST_END) != [] or holder.poll() is not None,
                  "the first run never got its link")
        assert holder.poll() is None, holder.communicate()
        second = _run(private_bus.address, "--name", "netrun-e", "--network=veth", "--", "true")
        assert second.returncode != 0
        assert f"no free /30 left for 'netrun-e' in the guest network pool {POOL}" \
            in second.stderr, second.stderr
        assert "HOSTEL_GUEST_NETWORK_POOL" in second.stderr and "Traceback" not in second.stderr
        # the first run is untouched, shows its host end and address as a machine, and its
        # link goes when it is ended
        (link,) = _host_links_with(HOST_END)
        status = hostelctl(private_bus.address, "status", "netrun-d").stdout
        assert re.search(rf"Iface: {re.escape(link)}\n", status), status
        assert re.search(rf"Address: {GUEST_END}\n", status), status
        assert hostelctl(private_bus.address, "terminate", "netrun-d").returncode == 0
        holder.wait(30)
        _wait_for(lambda: _host_links_with(HOST_END) == [], "the link outlived the run")
    finally:
        if holder.poll() is None:
            holder.send_signal(signal.SIGKILL)
        holder.communicate()
    bad = _run(private_bus.address, "--network=bogus", "--", "true")
    assert bad.returncode == 2 and "invalid choice: 'bogus'" in bad.stderr, bad.stderr
    refused = busctl(private_bus, "call", "org.hostel1", "/org/hostel1/guest",
                     "org.hostel1.GuestManager", "StartGuest", "sa{sv}", "netrun-f", "2",
                     "Image", "s", IMAGE, "Network", "s", "bogus", check=False)
    assert refused.returncode != 0
    assert "unknown network mode 'bogus': expected none or veth" in refused.stderr, \
        refused.stderr


def test_the_link_goes_with_a_run_whose_hosteld_was_killed(
        private_bus: PrivateBus, daemon: DaemonProcess, tmp_path: Path) -> None:
    """hosteld killed (-9) under a running --network=veth container, so that no teardown of
    its runs: the container goes on, its client says hosteld is gone, the next hosteld
    adopts it (listed, with its link), and the host's end goes when it is terminated.
    (test_guest_run_container_adoption.py has the rest of the adoption.)"""
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=private_bus.address)
    with open(tmp_path / "client.err", "w") as err:   # the payload holds the client's fds
        client = subprocess.Popen([HOSTELCTL, "guest", "run", "--quiet", "--image", IMAGE,
                                   "--name", "netrun-g", "--network=veth", "--", "sh", "-c",
                                   "trap 'exit 0' TERM; while :; do sleep 1; done"],
                                  env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=err)

    def state() -> str:
        return hostelctl(private_bus.address, "show", "netrun-g", "-p", "State",
                         "--value").stdout.strip()

    try:
        _wait_for(lambda: state() == "running", "the run never ran")
        (link,) = _host_links_named("netrun-g")
        daemon.stop(signal.SIGKILL)
        assert client.wait(30) == 69, (tmp_path / "client.err").read_text()
        assert "hosteld stopped while guest netrun-g was running" in \
            (tmp_path / "client.err").read_text()
        daemon.start()
        assert state() == "running", daemon.log()[-3000:]
        assert _host_links_named("netrun-g") == [link]
        assert hostelctl(private_bus.address, "terminate", "netrun-g").returncode == 0
        _wait_for(lambda: _host_links_named("netrun-g") == [] and
                  "netrun-g" not in hostelctl(private_bus.address, "list").stdout,
                  f"the link outlived the run:\n{daemon.log()[-3000:]}")
    finally:
        if client.poll() is None:
            client.kill()
        client.wait(30)
