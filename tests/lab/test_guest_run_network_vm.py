"""`hostelctl guest run --isolation=vm --network=veth` (issue 14 point 4), in the lab: the
guest init configures eth0 from the launch configuration (its run's /30, the host's end
as default route, the host's resolvers), the payload reaches the host over the launcher's
virtio-net and tap (a ping reply, and a TCP reply from a listener on the host's end);
without the option the VM has `lo` only (up). The tap goes when the run ends.

The fixtures and the host's listener are the container test's (one-/30 pool, so the
addresses are known here without asking hostel's own code). Two VM boots."""
from __future__ import annotations

import subprocess

import pytest

from hostel.privatebus import DaemonProcess, PrivateBus

from conftest import hostelctl
from integration.test_guest_run_network import (  # noqa: F401 (the daemon fixture)
    GUEST_END, HOST_END, IMAGE, HostListener, _expected_nameservers, _host_links_with, daemon)

RUN_TIMEOUT = 240     # seconds for one VM run; the nested boot takes ~15-45 s


def _run_vm(address: str, hosteld: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    try:
        return hostelctl(address, "guest", "run", "--quiet", "--isolation=vm", "--image", IMAGE,
                         *args, timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"guest run --isolation=vm {args} did not end in {RUN_TIMEOUT} s: "
                    f"{e.stdout!r} {e.stderr!r}\n{hosteld.log()[-3000:]}")


@pytest.mark.lab("kvm")
def test_a_vm_with_veth_has_its_address_route_dns_and_reaches_the_host(
        private_bus: PrivateBus, daemon: DaemonProcess) -> None:  # noqa: F811
    listener = HostListener()
    script = "; ".join((
        "ls /sys/class/net", "ip -4 addr show eth0", "ip -4 route", "cat /etc/resolv.conf",
        f"ping -c 1 -W 20 {HOST_END}",
        f"echo guest-hello | nc -w 30 {HOST_END} {listener.port}"))
    try:
        run = _run_vm(private_bus.address, daemon, "--name", "vmnet-a", "--network=veth", "--",
                      "sh", "-c", script)
    finally:
        listener.close()
    out = run.stdout
    assert run.returncode == 0, (out, run.stderr, daemon.log()[-3000:])
    assert out.split("\n")[:2] == ["eth0", "lo"], out
    assert f"inet {GUEST_END}/30" in out, out
    assert f"default via {HOST_END} dev eth0" in out, out
    resolvers = [line.split()[1] for line in out.splitlines() if line.startswith("nameserver ")]
    assert resolvers == _expected_nameservers(), out
    assert "1 packets received" in out, out
    assert "host-reply:guest-hello" in out, out
    assert (listener.peer, listener.received) == (GUEST_END, b"guest-hello\n")
    assert len(listener.links_during_run) == 1 and \
        listener.links_during_run[0].startswith("hosteltap"), listener.links_during_run
    assert _host_links_with(HOST_END) == [], "the tap outlived the run"

    # loopback only, and up, as in a container without a network
    plain = _run_vm(private_bus.address, daemon, "--name", "vmnet-b", "--", "sh", "-c",
                    "ls /sys/class/net; cat /proc/net/dev; ip -4 addr; ping -c 1 -W 10 127.0.0.1")
    assert plain.returncode == 0, (plain.stdout, plain.stderr, daemon.log()[-3000:])
    lines = plain.stdout.splitlines()
    assert lines[0] == "lo" and "eth0" not in plain.stdout, plain.stdout
    assert "inet 127.0.0.1/8" in plain.stdout and "1 packets received" in plain.stdout, \
        plain.stdout
