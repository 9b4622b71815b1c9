"""virtio-net on a tap, in a throwaway network namespace: a frame the guest
sends appears on the tap, and a frame injected on the tap reaches the guest."""
from __future__ import annotations

import os
import socket
import struct
import subprocess
import threading
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from guests.build import build
from guests.run import run_to_end
from hostel import native
from hostel.guest.errors import GuestError
from hostel.guest.launcher import Launcher
from hostel.guest.settings import GuestSettings, NetSpec

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/kvm") or not os.path.exists("/dev/net/tun"),
                                reason="needs /dev/kvm and /dev/net/tun")

ETHERTYPE = 0x88B5
GUEST_MAC = "02:00:5e:10:00:01"
TIMEOUT = 20


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"hostel-test-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for key in ("all", "default"):
            subprocess.run(["ip", "netns", "exec", name, "sysctl", "-qw",
                            f"net.ipv6.conf.{key}.disable_ipv6=1"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True)


def in_netns(name: str) -> None:
    """Move the calling thread (only) into the namespace: setns is per thread."""
    with open(f"/run/netns/{name}") as ns:
        native.setns(ns.fileno(), native.CLONE_NEWNET)


def test_frames_cross_the_tap_both_ways(netns: str, tmp_path: Path) -> None:
    program = build("devices", tmp_path)
    result: dict[str, object] = {}
    ready = threading.Event()
    console_r, console_w = os.pipe()

    def guest() -> None:
        in_netns(netns)
        launcher = Launcher(GuestSettings(memory_mb=8, kernel=program, cmdline="net",
                                          network=(NetSpec(address="10.99.0.1", mac=GUEST_MAC),)),
                            console_w)
        try:
            tap = launcher.bus.devices[1].device.name.split(":", 1)[1]
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
            sock.bind((tap, 0))
            sock.settimeout(TIMEOUT)
            result["tap"], result["sock"] = tap, sock
        except OSError:
            launcher.close()
            raise
        finally:
            ready.set()
        result["exit"] = run_to_end(launcher, TIMEOUT)

    thread = threading.Thread(target=guest)
    thread.start()
    try:
        assert ready.wait(TIMEOUT) and "sock" in result
        sock: socket.socket = result["sock"]
        frame, _addr = sock.recvfrom(2048)
        assert frame[:6] == b"\xff" * 6 and frame[6:12] == bytes.fromhex(GUEST_MAC.replace(":", ""))
        assert struct.unpack("!H", frame[12:14])[0] == ETHERTYPE
        assert frame[14:35] == b"hello from the guest\0"
        reply = frame[6:12] + b"\x02\x00\x00\x00\x00\x02" + struct.pack("!H", ETHERTYPE)
        sock.send(reply + b"hello from the host\0".ljust(46, b"\0"))
    finally:
        thread.join(TIMEOUT + 5)
        if "sock" in result:
            result["sock"].close()
        os.close(console_w)
    with os.fdopen(console_r, "rb") as f:
        console = f.read().decode()
    assert result["exit"].reason == "poweroff" and result["exit"].code == 0, console
    assert console == "net sent\nnet received hello from the host\n"
    links = subprocess.run(["ip", "-n", netns, "-o", "link"], capture_output=True, text=True).stdout
    assert result["tap"] not in links, "the tap goes away with the guest"


def test_a_bridge_tunnet_enslaves_the_tap(netns: str, tmp_path: Path) -> None:
    program = build("hello", tmp_path)
    subprocess.run(["ip", "-n", netns, "link", "add", "br-guest", "type", "bridge"], check=True)
    found: dict[str, str] = {}

    def setup() -> None:
        in_netns(netns)
        launcher = Launcher(GuestSettings(memory_mb=8, kernel=program,
                                          network=(NetSpec(bridge="br-guest"),)), -1)
        try:
            tap = launcher.bus.devices[1].device.name.split(":", 1)[1]
            found["link"] = subprocess.run(["ip", "-n", netns, "-o", "link", "show", tap],
                                           capture_output=True, text=True, check=True).stdout
        finally:
            launcher.close()

    thread = threading.Thread(target=setup)
    thread.start()
    thread.join(TIMEOUT)
    flags = found["link"].split("<", 1)[1].split(">", 1)[0].split(",")
    assert "master br-guest" in found["link"] and "UP" in flags


def test_a_missing_bridge_is_named(netns: str, tmp_path: Path) -> None:
    program = build("hello", tmp_path)
    errors: list[Exception] = []

    def setup() -> None:
        in_netns(netns)
        try:
            Launcher(GuestSettings(memory_mb=8, kernel=program,
                                   network=(NetSpec(bridge="br-none"),)), -1)
        except GuestError as e:
            errors.append(e)

    thread = threading.Thread(target=setup)
    thread.start()
    thread.join(TIMEOUT)
    assert len(errors) == 1 and "no bridge named 'br-none'" in str(errors[0])
    links = subprocess.run(["ip", "-n", netns, "-o", "link"], capture_output=True, text=True).stdout
    assert "hosteltap" not in links, "the tap is gone with the failed setup"
