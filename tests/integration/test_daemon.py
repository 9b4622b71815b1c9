"""hosteld on a private system bus, checked with busctl (a client nobody here wrote)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from hostel.privatebus import DaemonProcess, PrivateBus, start_daemon

from conftest import busctl

MANAGERS = {
    "/org/hostel1/machine": "org.hostel1.MachineManager",
    "/org/hostel1/cryptsetup": "org.hostel1.CryptsetupManager",
    "/org/hostel1/guest": "org.hostel1.GuestManager",
}


def test_tree_has_the_three_managers(hosteld: DaemonProcess) -> None:
    tree = busctl(hosteld.bus, "--list", "tree", "org.hostel1").stdout.split()
    assert set(MANAGERS) | {"/org/hostel1"} <= set(tree)


@pytest.mark.parametrize("path,interface", MANAGERS.items())
def test_introspect_lists_the_manager_interface(hosteld: DaemonProcess, path: str,
                                                interface: str) -> None:
    out = busctl(hosteld.bus, "introspect", "org.hostel1", path).stdout
    assert re.search(rf"^{re.escape(interface)}\s+interface", out, re.M)


def test_machine_manager_methods_and_signatures(hosteld: DaemonProcess) -> None:
    rows = busctl(hosteld.bus, "introspect", "org.hostel1", "/org/hostel1/machine").stdout
    members = {m.group(1): (m.group(2), m.group(3)) for m in
               re.finditer(r"^\.(\w+)\s+(?:method|signal)\s+(\S+)\s+(\S+)", rows, re.M)}
    assert members["ListMachines"] == ("-", "a(ssso)")
    assert members["GetMachine"] == ("s", "o")
    assert members["GetMachineByPID"] == ("u", "o")
    assert members["StartMachine"] == ("sa{sv}", "o")
    assert members["RegisterMachine"] == ("sayssus", "o")
    assert members["KillMachine"] == ("ssi", "-")
    assert members["MachineNew"] == ("so", "-")


def test_object_manager_at_the_root(hosteld: DaemonProcess) -> None:
    out = busctl(hosteld.bus, "--json=short", "call", "org.hostel1", "/org/hostel1",
                 "org.freedesktop.DBus.ObjectManager", "GetManagedObjects").stdout
    objects = json.loads(out)["data"][0]
    for path, interface in MANAGERS.items():
        assert interface in objects[path]


def test_version_property(hosteld: DaemonProcess) -> None:
    from hostel import __version__

    out = busctl(hosteld.bus, "get-property", "org.hostel1", "/org/hostel1",
                 "org.hostel1.Daemon", "Version").stdout
    assert out.strip() == f's "{__version__}"'


def test_a_vm_run_of_a_missing_image_names_it_and_what_to_do(hosteld: DaemonProcess) -> None:
    result = busctl(hosteld.bus, "call", "org.hostel1", "/org/hostel1/guest",
                    "org.hostel1.GuestManager", "StartGuest", "sa{sv}", "vm", "2",
                    "Image", "s", "busybox", "Isolation", "s", "vm", check=False)
    assert result.returncode != 0
    assert "no image named 'busybox'" in result.stderr
    assert "'hostelctl image list' shows the imported images" in result.stderr


def test_missing_objects_are_clear_errors(hosteld: DaemonProcess) -> None:
    result = busctl(hosteld.bus, "call", "org.hostel1", "/org/hostel1/machine",
                    "org.hostel1.MachineManager", "GetMachine", "s", "nope", check=False)
    assert result.returncode != 0 and "no machine named 'nope'" in result.stderr


def test_wrong_signature_leaves_the_daemon_healthy(hosteld: DaemonProcess) -> None:
    bad = busctl(hosteld.bus, "call", "org.hostel1", "/org/hostel1/machine",
                 "org.hostel1.MachineManager", "GetMachine", "u", "5", check=False)
    assert bad.returncode != 0 and "could not be found" in bad.stderr
    ok = busctl(hosteld.bus, "call", "org.hostel1", "/org/hostel1/machine",
                "org.hostel1.MachineManager", "ListMachines")
    assert ok.stdout.strip() == "a(ssso) 0"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_exits_cleanly_on_signal(private_bus: PrivateBus, tmp_path: Path, sig: int) -> None:
    daemon = start_daemon(private_bus, tmp_path)
    assert daemon.stop(sig) == 0
    assert "stopping on signal" in daemon.log()
    owner = busctl(private_bus, "status", "org.hostel1", check=False)
    assert owner.returncode != 0  # the name is released


def test_second_instance_refuses_clearly(hosteld: DaemonProcess, tmp_path: Path) -> None:
    second = subprocess.run(
        [sys.executable, "-m", "hostel.daemon", "--runtime-dir", str(tmp_path / "run2")],
        env=hosteld.environment(), capture_output=True, text=True, timeout=30)
    assert second.returncode == 75
    assert "org.hostel1 is already owned" in second.stderr
    assert "another hosteld is running" in second.stderr
    busctl(hosteld.bus, "call", "org.hostel1", "/org/hostel1/machine",
           "org.hostel1.MachineManager", "ListMachines")  # the first one is untouched


def test_no_bus_is_a_clear_error(tmp_path: Path) -> None:
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=f"unix:path={tmp_path}/no-bus")
    result = subprocess.run([sys.executable, "-m", "hostel.daemon", "--runtime-dir",
                             str(tmp_path / "run")], env=env, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 69
    assert f"cannot connect to the system bus at unix:path={tmp_path}/no-bus" in result.stderr


def test_journal_format_has_priorities_and_no_timestamps(private_bus: PrivateBus,
                                                         tmp_path: Path) -> None:
    daemon = start_daemon(private_bus, tmp_path, extra_env={"JOURNAL_STREAM": "8:12345"})
    assert daemon.stop() == 0
    lines = daemon.log().splitlines()
    assert lines and all(re.match(r"^<[0-7]>", line) for line in lines)
    assert any(line.startswith("<6>hosteld 0.") for line in lines)
    assert not any(re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d", line) for line in lines)


def test_plain_stderr_format_has_timestamps(hosteld: DaemonProcess) -> None:
    first = hosteld.log().splitlines()[0]
    assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ hosteld\[\d+\] INFO: ", first)
