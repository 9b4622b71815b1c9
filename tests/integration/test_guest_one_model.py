"""One guest model (issue 17 point 5): a launched VM and a `guest run --image` container
are both found by `hostelctl guest list/status/terminate`, and by `hostelctl list` and the
real machinectl with their class; also after hosteld was killed and started again.

VM runs of an image are the lab's (tests/lab/test_guest_run_vm.py): this host's KVM runs
only the small freestanding guests, so the VM here is a launched one."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from hostel.privatebus import DaemonProcess

from conftest import HOSTELCTL, busctl, hostelctl
from integration.test_machinectl import machinectl
from unit.test_guest_images import busybox_layer, docker_archive, image_config

BOX, SPIN = "one-model-box", "one-model-spin"


def _import_busybox(daemon: DaemonProcess, tmp_path: Path) -> None:
    layers = [busybox_layer().tar()]
    archive = docker_archive(tmp_path / "bb.tar", layers,
                             image_config(layers, Env=["PATH=/bin:/usr/bin"]))
    imported = hostelctl(daemon.address, "image", "import", str(archive), "--name", "bb")
    assert imported.returncode == 0, imported.stderr


def _run_in_background(daemon: DaemonProcess, name: str, output: Path,
                       *command: str) -> subprocess.Popen:
    """Its output goes to a file: the payload holds it too, and a pipe would not end
    before the payload does, whatever happened to the client."""
    with open(output, "wb") as out:
        return subprocess.Popen([HOSTELCTL, "guest", "run", "--quiet", "--image", "bb",
                                 "--name", name, "--", *command],
                                env=dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=daemon.address),
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out)


def _guests(daemon: DaemonProcess) -> dict[str, dict]:
    listed = hostelctl(daemon.address, "guest", "list", "-o", "json")
    assert listed.returncode == 0, listed.stderr
    return {row["guest"]: row for row in json.loads(listed.stdout)}


def _wait_guest(daemon: DaemonProcess, name: str, client: subprocess.Popen | None = None) -> dict:
    """The guest once it runs (its client, if given, must not have ended meanwhile)."""
    deadline = time.monotonic() + 30
    while (found := _guests(daemon).get(name)) is None or found["state"] != "running":
        if client is not None and client.poll() is not None:
            pytest.fail(f"its client ended ({client.returncode})")
        assert time.monotonic() < deadline, f"guest {name} not running: {found}\n{daemon.log()}"
        time.sleep(0.1)
    return found


def _start_spin(daemon: DaemonProcess, kernel: Path, name: str = SPIN,
                check: bool = True) -> subprocess.CompletedProcess[str]:
    return busctl(daemon.bus, "call", "org.hostel1", "/org/hostel1/guest",
                  "org.hostel1.GuestManager", "StartGuest", "sa{sv}", name, "2",
                  "Kernel", "s", str(kernel), "MemoryMB", "u", "8", check=check)


@pytest.fixture
def spin(tmp_path: Path) -> Path:
    from guests.build import build

    return build("spin", tmp_path)


@pytest.fixture
def box(hosteld: DaemonProcess, tmp_path: Path) -> Iterator[subprocess.Popen]:
    """A container guest running sleep, its `hostelctl guest run` in the background."""
    _import_busybox(hosteld, tmp_path)
    output = tmp_path / "box.out"
    client = _run_in_background(hosteld, BOX, output, "sleep", "1000")
    try:
        _wait_guest(hosteld, BOX, client)
        yield client
    finally:
        if client.poll() is None:
            client.kill()
        client.wait()
        print(f"the run's output: {output.read_text(errors='replace')}")


needs_kvm = pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="no /dev/kvm")


@needs_kvm
def test_a_vm_and_a_container_are_listed_shown_and_terminated_alike(
        hosteld: DaemonProcess, box: subprocess.Popen, spin: Path) -> None:
    _start_spin(hosteld, spin)
    guests = _guests(hosteld)
    assert (guests[BOX]["class"], guests[SPIN]["class"]) == ("container", "vm"), guests

    status = hostelctl(hosteld.address, "guest", "status", BOX)
    assert status.returncode == 0, status.stderr
    assert status.stdout.startswith(f"{BOX} (container)\n") and "Image: bb:latest" in status.stdout
    assert "Kernel:" not in status.stdout
    assert hostelctl(hosteld.address, "guest", "status", SPIN).stdout.startswith(f"{SPIN} (vm)\n")
    for name, klass, image in ((BOX, "container", "bb:latest"), (SPIN, "vm", "")):
        props = hostelctl(hosteld.address, "guest", "status", name, "-p", "Class,Image",
                          "--value")
        assert props.stdout == f"{klass}\n{image}\n", props.stderr

    # hostelctl show and status know a VM guest too (a container guest is a machine)
    assert hostelctl(hosteld.address, "show", SPIN, "-p", "Class", "--value").stdout == "vm\n"
    assert hostelctl(hosteld.address, "status", SPIN).stdout.startswith(f"{SPIN} (vm)\n")
    assert hostelctl(hosteld.address, "show", BOX, "-p", "Class", "--value").stdout == \
        "container\n"

    # hostelctl list and machinectl list: each guest once, with its class
    machines = json.loads(hostelctl(hosteld.address, "list", "-o", "json").stdout)
    assert sorted((m["machine"], m["class"]) for m in machines) == \
        [(BOX, "container"), (SPIN, "vm")], machines
    listing = machinectl(hosteld, "list", "--no-legend").stdout.splitlines()
    assert sorted(line.split()[:2] for line in listing) == [[BOX, "container"], [SPIN, "vm"]]

    # one name, one guest, whatever the isolation
    clash = _start_spin(hosteld, spin, BOX, check=False)
    assert clash.returncode != 0 and f"a machine named '{BOX}' is already running" in clash.stderr
    second = subprocess.run([HOSTELCTL, "guest", "run", "--quiet", "--image", "bb", "--name",
                             SPIN, "--", "true"], capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=hosteld.address))
    assert second.returncode != 0 and f"a guest named '{SPIN}' is already running" in \
        second.stderr, second.stderr

    for name in (BOX, SPIN):
        ended = hostelctl(hosteld.address, "guest", "terminate", name)
        assert ended.returncode == 0, ended.stderr
    box.wait(timeout=30)  # the run's client ends with its container
    assert BOX not in _guests(hosteld)
    assert _guests(hosteld)[SPIN]["state"] == "exited"  # kept until forgotten, as before
    assert hostelctl(hosteld.address, "guest", "terminate", SPIN).returncode == 0
    assert _guests(hosteld) == {}


def test_a_container_guest_is_found_again_after_hosteld_was_killed(
        hosteld: DaemonProcess, box: subprocess.Popen) -> None:
    before = json.loads(hostelctl(hosteld.address, "guest", "status", BOX, "-o", "json").stdout)
    hosteld.stop(signal.SIGKILL)
    assert _alive(before["Leader"])  # the container does not need hosteld
    hosteld.start()
    after = _wait_guest(hosteld, BOX)
    assert after["class"] == "container"
    props = json.loads(hostelctl(hosteld.address, "guest", "status", BOX, "-o", "json").stdout)
    assert (props["Leader"], props["Image"], props["Class"]) == \
        (before["Leader"], "bb:latest", "container")
    ended = hostelctl(hosteld.address, "guest", "terminate", BOX)
    assert ended.returncode == 0, ended.stderr
    assert BOX not in _guests(hosteld)
    assert not _alive(before["Leader"])


def _alive(pid: int) -> bool:
    """Running, not a zombie (an adopted leader is not our child: init reaps it, later)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_terminating_no_such_guest_names_where_to_look(hosteld: DaemonProcess) -> None:
    result = hostelctl(hosteld.address, "guest", "terminate", "one-model-none")
    assert result.returncode == 1
    assert "no guest named 'one-model-none' ('hostelctl guest list'" in result.stderr
