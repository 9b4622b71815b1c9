"""dbus-daemon restarts under a running hosteld: it reconnects, takes its names back and
serves the machines that kept running meanwhile."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from hostel.privatebus import DaemonProcess, PrivateBus

from conftest import busctl, hostelctl


def _owner(bus: PrivateBus, name: str) -> bool:
    got = busctl(bus, "--json=short", "call", "org.freedesktop.DBus", "/org/freedesktop/DBus",
                 "org.freedesktop.DBus", "NameHasOwner", "s", name, check=False)
    return got.returncode == 0 and json.loads(got.stdout)["data"][0]


def _wait_for(condition, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def test_hosteld_reconnects_when_the_bus_restarts(private_bus: PrivateBus, hosteld: DaemonProcess,
                                                  tree: Path) -> None:
    busctl(private_bus, "call", "org.hostel1", "/org/hostel1/machine",
           "org.hostel1.MachineManager", "StartMachine", "sa{sv}", "steady", "2",
           "Directory", "s", str(tree), "Command", "as", "2", "/bin/sleep", "3000")
    (leader,) = [json.loads(busctl(private_bus, "--json=short", "get-property", "org.hostel1",
                                   "/org/hostel1/machine/steady", "org.hostel1.Machine",
                                   "Leader").stdout)["data"]]
    for round_ in range(2):  # twice: the second restart hits the reconnected connection
        private_bus.restart()
        _wait_for(lambda: _owner(private_bus, "org.hostel1")
                  and _owner(private_bus, "org.freedesktop.machine1"))
        assert hosteld.proc.poll() is None, f"hosteld exited:\n{hosteld.log()}"
        assert os.path.exists(f"/proc/{leader}"), "the machine died with the bus"
        listing = hostelctl(private_bus.address, "list")
        assert listing.returncode == 0, listing.stderr
        assert "steady" in listing.stdout and "running" in listing.stdout, listing.stdout
        # The objects are exported again: properties, the compat name, and methods work.
        got = busctl(private_bus, "--json=short", "get-property", "org.hostel1",
                     "/org/hostel1/machine/steady", "org.hostel1.Machine", "Leader")
        assert json.loads(got.stdout)["data"] == leader
        machined = busctl(private_bus, "call", "org.freedesktop.machine1",
                          "/org/freedesktop/machine1", "org.freedesktop.machine1.Manager",
                          "ListMachines")
        assert "steady" in machined.stdout
        version = busctl(private_bus, "get-property", "org.hostel1", "/org/hostel1",
                         "org.hostel1.Daemon", "Version")
        assert version.returncode == 0
    assert "reconnected to the system bus" in hosteld.log()
    assert hostelctl(private_bus.address, "terminate", "steady").returncode == 0
    _wait_for(lambda: "steady" not in hostelctl(private_bus.address, "list").stdout)
