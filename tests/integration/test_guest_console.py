"""The guest console on real ptys: `hostelctl guest console NAME` attaches to a running
guest (a launched tiny guest under this host's KVM, an image run in a container),
relays both ways and detaches with ^]^]^] leaving the guest running; the same keys on
the terminal of the client that started the guest end it, as in systemd-nspawn."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import HOSTELCTL, hostelctl
from ptyclient import ESCAPE, OnPty
from guests.build import build
from hostel.privatebus import DaemonProcess, PrivateBus
from unit.test_guest_images import busybox_layer, docker_archive, image_config

needs_kvm = pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="no /dev/kvm on this host")


def guest_state(address: str, name: str) -> str | None:
    for line in hostelctl(address, "guest", "list", "--no-legend").stdout.splitlines():
        fields = line.split()
        if fields and fields[0] == name:
            return fields[2]
    return None


def machine_listed(address: str, name: str) -> bool:
    """A container guest is a machine: `hostelctl list` shows it while it runs."""
    listing = hostelctl(address, "list", "--no-legend").stdout.splitlines()
    return any(line.split()[:1] == [name] for line in listing)


def wait_running(address: str, name: str, owner: OnPty, timeout: float = 30,
                 container: bool = False) -> None:
    deadline = time.monotonic() + timeout
    while not (machine_listed(address, name) if container
               else guest_state(address, name) == "running"):
        assert owner.proc.poll() is None, owner.output
        assert time.monotonic() < deadline, f"{name} never ran: {owner.output!r}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def guests_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("guests")
    build("spin", out)
    build("devices", out)
    return out


@needs_kvm
def test_attach_relays_both_ways_to_a_launched_guest(hosteld: DaemonProcess,
                                                     guests_dir: Path) -> None:
    """The echo guest prints what reaches its virtio console: typed on the attached
    terminal, it must come back there (and on the launching client's terminal)."""
    address = hosteld.address
    owner = OnPty(address, "guest", "launch", "--name", "con-echo", "8",
                  str(guests_dir / "devices"), "echo")
    viewer = None
    try:
        wait_running(address, "con-echo", owner)
        viewer = OnPty(address, "guest", "console", "con-echo")
        viewer.read_until(b"Press ^] three times within 1s to detach.")
        viewer.type(b"via-attach")
        viewer.read_until(b"echo via-attach")
        owner.read_until(b"echo via-attach")
        assert owner.wait() == 0, owner.output  # the guest powered off after echoing
        assert viewer.wait() == 0, viewer.output  # its console closed: the viewer ends too
        assert b"Connection to the console of guest con-echo terminated." in viewer.output
        assert viewer.terminal_restored(), "the viewer left its terminal in raw mode"
    finally:
        for client in (viewer, owner):
            if client is not None:
                client.close()


@needs_kvm
def test_escape_detaches_a_viewer_and_kills_from_the_launching_terminal(
        hosteld: DaemonProcess, guests_dir: Path) -> None:
    address = hosteld.address
    owner = OnPty(address, "guest", "launch", "--name", "con-spin", "8", str(guests_dir / "spin"))
    viewer = None
    try:
        owner.read_until(b"Press ^] three times within 1s to kill the guest.")
        wait_running(address, "con-spin", owner)
        viewer = OnPty(address, "guest", "console", "con-spin")
        viewer.read_until(b"Press ^] three times within 1s to detach.")
        viewer.type(ESCAPE)
        assert viewer.wait() == 0, viewer.output
        assert viewer.terminal_restored(), "the viewer left its terminal in raw mode"
        time.sleep(0.5)
        assert guest_state(address, "con-spin") == "running", "detaching ended the guest"
        assert owner.proc.poll() is None, owner.output

        owner.type(ESCAPE)
        assert owner.wait() == 1, owner.output
        assert b"Guest con-spin terminated by signal KILL." in owner.output, owner.output
        assert owner.terminal_restored(), "the launching client left its terminal raw"
        assert guest_state(address, "con-spin") is None  # killed, and forgotten by its client
    finally:
        for client in (viewer, owner):
            if client is not None:
                client.close()


def test_console_of_an_unknown_guest_is_a_clear_error(hosteld: DaemonProcess) -> None:
    result = hostelctl(hosteld.address, "guest", "console", "con-nosuch")
    assert result.returncode != 0
    assert "no guest named 'con-nosuch'" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_attach_console_takes_only_a_stream_socket(hosteld: DaemonProcess,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A caller of the D-Bus method itself, passing a pipe: refused, naming what it takes."""
    from hostel.client import CallFailed, Client

    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", hosteld.address)
    read, write = os.pipe()
    try:
        with Client() as client, pytest.raises(CallFailed, match="unix stream socket"):
            client.call("/org/hostel1/guest", "org.hostel1.GuestManager", "AttachConsole",
                        "sh", "con-any", read)
    finally:
        os.close(read)
        os.close(write)


@pytest.fixture
def image(hosteld: DaemonProcess, tmp_path: Path) -> str:
    layers = [busybox_layer(("sh", "echo", "sleep", "cat")).tar()]
    archive = docker_archive(tmp_path / "con.tar", layers, image_config(layers))
    result = hostelctl(hosteld.address, "image", "import", str(archive), "--name", "con-image")
    assert result.returncode == 0, result.stderr
    return "con-image"


def test_attach_to_a_container_guest_and_escapes(hosteld: DaemonProcess, image: str) -> None:
    """A `guest run` container on a terminal: its pty is the console an attached client
    types into and reads; the viewer's ^]^]^] leaves it running, the owner's kills it."""
    address = hosteld.address
    owner = OnPty(address, "guest", "run", "--image", image, "--name", "con-box", "--",
                  "sh", "-c", "while read line; do echo got-$line; done")
    viewer = None
    try:
        owner.read_until(b"Press ^] three times within 1s to kill container.")
        wait_running(address, "con-box", owner, container=True)
        viewer = OnPty(address, "guest", "console", "con-box")
        viewer.read_until(b"Press ^] three times within 1s to detach.")
        viewer.type(b"from-viewer\r")
        viewer.read_until(b"got-from-viewer")
        owner.read_until(b"got-from-viewer")
        owner.type(b"from-owner\r")
        viewer.read_until(b"got-from-owner")  # the owner's typing is seen by the viewer too
        viewer.type(ESCAPE)
        assert viewer.wait() == 0, viewer.output
        assert viewer.terminal_restored(), "the viewer left its terminal in raw mode"
        time.sleep(0.5)
        assert machine_listed(address, "con-box"), "detaching ended the container"
        owner.type(ESCAPE)
        assert owner.wait() != 0, owner.output  # killed
        assert b"Container con-box terminated by signal KILL." in owner.output, owner.output
        assert owner.terminal_restored(), "the owner left its terminal in raw mode"
    finally:
        for client in (viewer, owner):
            if client is not None:
                client.close()


def test_a_container_run_off_a_terminal_has_no_console_to_attach(
        hosteld: DaemonProcess, image: str) -> None:
    """Its stdio are the client's own pipes (no pty): the refusal says so, and why."""
    address = hosteld.address
    proc = subprocess.Popen([HOSTELCTL, "guest", "run", "--quiet", "--image", image, "--name",
                             "con-piped", "--", "sleep", "300"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=address))
    try:
        deadline = time.monotonic() + 30
        while not machine_listed(address, "con-piped"):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        result = hostelctl(address, "guest", "console", "con-piped")
        assert result.returncode != 0
        assert "cannot be attached to: its standard input and output are its client's" \
            in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


@needs_kvm
def test_an_adopted_guests_console_is_refused_with_the_reason(
        private_bus: PrivateBus, tmp_path: Path, guests_dir: Path) -> None:
    """hosteld killed under a launched guest: the next one adopts it, but its console
    relay died with the first; attaching says so instead of hanging on a dead pipe."""
    address = private_bus.address
    runtime, state = tmp_path / "run", tmp_path / "state"
    daemons = [DaemonProcess(address, runtime, state, bus=private_bus).start()]
    client = subprocess.Popen([HOSTELCTL, "guest", "launch", "--name", "con-adopted", "8",
                               str(guests_dir / "spin")], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=address))
    try:
        deadline = time.monotonic() + 30
        while guest_state(address, "con-adopted") != "running":
            assert client.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        daemons[0].stop(signal.SIGKILL)
        daemons.append(DaemonProcess(address, runtime, state, bus=private_bus).start())
        assert guest_state(address, "con-adopted") == "running"
        result = hostelctl(address, "guest", "console", "con-adopted")
        assert result.returncode != 0
        assert "an earlier hosteld started it" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    finally:
        client.kill()
        client.wait()
        for daemon in reversed(daemons):
            if daemon.proc is not None and daemon.proc.poll() is None:
                hostelctl(address, "guest", "terminate", "con-adopted")
                daemon.stop()
