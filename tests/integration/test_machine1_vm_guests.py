"""A VM guest is a machine1 machine of its own (issue 17 point 5): the real machinectl's
status, show, kill and terminate work on a VM's name, as on machined's VMs, and a
container may not take a running VM's name (hostelctl run -M, RegisterMachine).

The VM is the freestanding spin guest (tests/guests/), which this host's KVM runs."""
from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Iterator

import pytest

from conftest import busctl, hostelctl
from guests.build import build
from hostel.privatebus import DaemonProcess
from integration.test_machinectl import machinectl

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="no /dev/kvm on this host")

VM = "m1vm-spin"
MACHINE1 = ("org.freedesktop.machine1", "/org/freedesktop/machine1",
            "org.freedesktop.machine1.Manager")


@pytest.fixture(scope="module")
def spin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build("spin", tmp_path_factory.mktemp("guests"))


def _guests(daemon: DaemonProcess) -> dict[str, dict]:
    listed = hostelctl(daemon.address, "guest", "list", "-o", "json")
    assert listed.returncode == 0, listed.stderr
    return {row["guest"]: row for row in json.loads(listed.stdout)}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait(condition, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


@pytest.fixture
def vm(hosteld: DaemonProcess, spin: Path) -> Iterator[int]:
    """A running spin VM guest: its launcher's pid, as hostelctl guest status says."""
    started = busctl(hosteld.bus, "call", "org.hostel1", "/org/hostel1/guest",
                     "org.hostel1.GuestManager", "StartGuest", "sa{sv}", VM, "2",
                     "Kernel", "s", str(spin), "MemoryMB", "u", "8", check=False)
    assert started.returncode == 0, started.stderr
    try:
        status = hostelctl(hosteld.address, "guest", "status", VM, "-o", "json")
        assert status.returncode == 0, status.stderr
        leader = json.loads(status.stdout)["Leader"]
        assert leader > 1 and _alive(leader)
        yield leader
    finally:
        for _ in range(2):  # kill, then forget the exited guest
            if VM in _guests(hosteld):
                hostelctl(hosteld.address, "guest", "terminate", VM)


def test_machinectl_status_and_show_read_the_vms_own_machine_object(
        hosteld: DaemonProcess, vm: int) -> None:
    status = machinectl(hosteld, "status", VM)
    assert status.stdout.startswith(VM), status.stdout
    assert re.search(r"^\s*Service: hostel; class vm$", status.stdout, re.M), status.stdout
    assert re.search(rf"^\s*Leader: {vm}\b", status.stdout, re.M), status.stdout
    assert re.search(r"^\s*Since: ", status.stdout, re.M), status.stdout

    shown = machinectl(hosteld, "show", VM).stdout
    props = dict(line.split("=", 1) for line in shown.splitlines())
    assert (props["Name"], props["Class"], props["Leader"], props["Service"],
            props["State"]) == (VM, "vm", str(vm), "hostel", "running"), props
    assert props.get("RootDirectory", "") == ""
    assert props.get("Timestamp"), props  # machinectl prints it as a date

    # the object machinectl found is the one GetMachine names, under machined's escaping
    path = busctl(hosteld.bus, "call", *MACHINE1, "GetMachine", "s", VM).stdout.split()[1]
    assert path == '"/org/freedesktop/machine1/machine/m1vm_2dspin"', path
    leader = busctl(hosteld.bus, "get-property", "org.freedesktop.machine1", path.strip('"'),
                    "org.freedesktop.machine1.Machine", "Leader").stdout
    assert leader.split() == ["u", str(vm)]

    # container-only calls are refused as machined refuses them on a VM
    for member in ("GetAddresses", "GetOSRelease"):
        refused = busctl(hosteld.bus, "call", "org.freedesktop.machine1", path.strip('"'),
                         "org.freedesktop.machine1.Machine", member, check=False)
        assert refused.returncode != 0 and \
            "only supported on container machines" in refused.stderr, refused.stderr
    os_release = busctl(hosteld.bus, "call", *MACHINE1, "GetMachineOSRelease", "s", VM,
                        check=False)
    assert "only supported on container machines" in os_release.stderr, os_release.stderr


def test_machinectl_kill_signals_the_launcher(hosteld: DaemonProcess, vm: int) -> None:
    bad = machinectl(hosteld, "kill", VM, "--kill-whom=nobody", check=False)
    assert bad.returncode != 0 and "nobody" in bad.stderr, bad.stderr
    machinectl(hosteld, "kill", VM, "--kill-whom=leader", "--signal=SIGKILL")
    _wait(lambda: _guests(hosteld)[VM]["state"] == "exited", "the killed VM has exited")
    assert not _alive(vm)
    # its machine object went with it, as machined's does
    gone = machinectl(hosteld, "status", VM, check=False)
    assert gone.returncode != 0 and VM in gone.stderr, gone.stderr
    assert VM not in machinectl(hosteld, "list", "--no-legend").stdout


def test_machinectl_terminate_ends_the_vm_and_forgets_it(hosteld: DaemonProcess,
                                                         vm: int) -> None:
    listed = machinectl(hosteld, "list", "--no-legend").stdout.splitlines()
    assert [line.split()[:2] for line in listed] == [[VM, "vm"]], listed
    machinectl(hosteld, "terminate", VM)
    assert not _alive(vm)
    assert VM not in _guests(hosteld)  # gone, as a terminated machine is from machined
    assert machinectl(hosteld, "list", "--no-legend").stdout.strip() == ""


def test_a_container_may_not_take_a_running_vms_name(hosteld: DaemonProcess, vm: int,
                                                     tree: Path) -> None:
    run = hostelctl(hosteld.address, "run", "-D", str(tree), "-M", VM, "/bin/true",
                    timeout=60)
    assert run.returncode != 0
    assert f"a guest named '{VM}' is already running (a vm)" in run.stderr, run.stderr
    assert f"hostelctl guest terminate {VM}" in run.stderr and "Traceback" not in run.stderr
    registered = busctl(hosteld.bus, "call", *MACHINE1, "RegisterMachine", "sayssus", VM,
                        "0", "test", "container", str(os.getpid()), "", check=False)
    assert registered.returncode != 0 and "already running (a vm)" in registered.stderr
    assert _guests(hosteld)[VM]["state"] == "running" and _alive(vm)
    # the machine registry knows no machine of that name: nothing was half started
    machines = json.loads(hostelctl(hosteld.address, "list", "-o", "json").stdout)
    assert [(m["machine"], m["class"]) for m in machines] == [(VM, "vm")], machines


def test_an_adopted_vm_is_a_machine_again_after_hosteld_was_killed(hosteld: DaemonProcess,
                                                                   vm: int) -> None:
    hosteld.stop(signal.SIGKILL)
    assert _alive(vm)  # the launcher does not need hosteld
    hosteld.start()
    _wait(lambda: _guests(hosteld).get(VM, {}).get("state") == "running", "the VM is adopted")
    props = dict(line.split("=", 1) for line in
                 machinectl(hosteld, "show", VM, "-p", "Class", "-p", "Leader").stdout.split())
    assert props == {"Class": "vm", "Leader": str(vm)}, props
    machinectl(hosteld, "terminate", VM)
    assert VM not in _guests(hosteld) and not _alive(vm)
