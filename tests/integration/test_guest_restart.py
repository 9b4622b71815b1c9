"""Guests outlive hosteld too: kill -9 the daemon, start it again, and take them back."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from hostel.privatebus import DaemonProcess, PrivateBus

from conftest import busctl

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="no /dev/kvm")


def guest_props(daemon: DaemonProcess, name: str) -> dict:
    out = busctl(daemon.bus, "--json=short", "call", "org.hostel1", f"/org/hostel1/guest/{name}",
                 "org.freedesktop.DBus.Properties", "GetAll", "s", "org.hostel1.Guest").stdout
    return {k: v["data"] for k, v in json.loads(out)["data"][0].items()}


def test_sigkill_restart_adopts_a_running_guest(private_bus: PrivateBus, tmp_path: Path) -> None:
    from guests.build import build

    spin = build("spin", tmp_path)
    runtime = tmp_path / "run"
    first = DaemonProcess(private_bus.address, runtime, tmp_path / "state", bus=private_bus).start()
    second = None
    try:
        busctl(private_bus, "call", "org.hostel1", "/org/hostel1/guest", "org.hostel1.GuestManager",
               "StartGuest", "sa{sv}", "spinner", "2", "Kernel", "s", str(spin),
               "MemoryMB", "u", "8")
        before = guest_props(first, "spinner")
        assert before["State"] == "running"
        first.stop(signal.SIGKILL)
        assert os.path.exists(f"/proc/{before['Leader']}")  # the launcher did not die with it

        second = DaemonProcess(private_bus.address, runtime, tmp_path / "state",
                               bus=private_bus).start()
        after = guest_props(second, "spinner")
        assert (after["State"], after["Leader"], after["Kernel"]) == \
            ("running", before["Leader"], before["Kernel"])
        busctl(private_bus, "call", "org.hostel1", "/org/hostel1/guest",
               "org.hostel1.GuestManager", "TerminateGuest", "s", "spinner")
        deadline = time.monotonic() + 20
        while guest_props(second, "spinner")["State"] != "exited":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert guest_props(second, "spinner")["ExitReason"] == "killed"
        assert not list((runtime / "guests").glob("*.json"))
    finally:
        for daemon in (second, first):
            if daemon is not None and daemon.proc is not None and daemon.proc.poll() is None:
                busctl(private_bus, "call", "org.hostel1", "/org/hostel1/guest",
                       "org.hostel1.GuestManager", "TerminateGuest", "s", "spinner", check=False)
                daemon.stop()
