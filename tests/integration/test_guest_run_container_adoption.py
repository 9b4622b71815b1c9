"""A `hostelctl guest run --image` container outlives a hosteld killed with -9, as a VM run
and a `hostelctl run` container do: its client says that hosteld is gone and exits (69, as
a VM run's client), the payload goes on, and the next hosteld takes it back -- listed by
`hostelctl guest list` and `hostelctl list` (its leader and link too), terminated by
`hostelctl guest terminate`, its host veth end, loop device, runtime directory and state file released when it ends, also
when it ended while no hosteld ran.

The tests hold the container's network namespace open (as an `ip netns` mount or another
process in it would): then the kernel does not delete the run's veth pair at the
container's end, and only hosteld's own deletion of the host end removes it."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from hostel.privatebus import DaemonProcess, PrivateBus

from conftest import HOSTELCTL, hostelctl, hosteld_with_env
from unit.test_guest_images import busybox_layer, docker_archive, image_config

POOL = "10.231.253.0/30"   # one /30: the addresses are known, and a leftover shows
IMAGE = "adoptimg"
APPLETS = ("sh", "sleep", "true", "echo")
# PID 1 of its namespace: SIGTERM reaches it only through a handler of its own
PAYLOAD = ["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1; done"]
LOST = "hosteld stopped while guest {name} was running; the guest goes on without this client"
EXIT_DAEMON_LOST = 69


@pytest.fixture
def daemon(private_bus: PrivateBus, tmp_path: Path) -> Iterator[DaemonProcess]:
    with hosteld_with_env(private_bus, tmp_path,
                          {"HOSTEL_GUEST_NETWORK_POOL": POOL}) as hosteld:
        layers = [busybox_layer(APPLETS).tar()]
        archive = docker_archive(tmp_path / "adopt.tar", layers, image_config(layers))
        imported = hostelctl(private_bus.address, "image", "import", str(archive), "--name",
                             IMAGE)
        assert imported.returncode == 0, imported.stderr
        yield hosteld


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def _host_links_named(name: str) -> list[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                         check=True).stdout
    return [m for m in re.findall(r"^\d+: ([^:@]+)", out, re.M) if m.endswith(f"-{name}")]


def _loops_on(directory: Path) -> list[str]:
    """Loop devices backed by a file under `directory` (the image store)."""
    out = subprocess.run(["losetup", "-l", "-n", "-O", "NAME,BACK-FILE"], capture_output=True,
                         text=True, check=True).stdout
    return [line for line in out.splitlines() if str(directory) in line]


def _show(daemon: DaemonProcess, name: str, prop: str) -> str:
    return hostelctl(daemon.address, "show", name, "-p", prop, "--value").stdout.strip()


def _start_run(daemon: DaemonProcess, name: str, *command: str) -> subprocess.Popen[str]:
    """The run's client, its stderr in a file (the payload holds the client's descriptors
    as its own, so a pipe would not end with the client)."""
    with open(daemon.state_dir.parent / f"{name}.client.err", "w+") as stderr:
        client = subprocess.Popen([HOSTELCTL, "guest", "run", "--quiet", "--image", IMAGE,
                                   "--name", name, "--network=veth", "--", *command],
                                  env=dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=daemon.address),
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=stderr, text=True)
    _wait_for(lambda: _show(daemon, name, "State") == "running" or client.poll() is not None,
              f"{name} never ran:\n{daemon.log()[-3000:]}")
    assert client.poll() is None, _client_err(daemon, name)
    return client


def _client_err(daemon: DaemonProcess, name: str) -> str:
    return (daemon.state_dir.parent / f"{name}.client.err").read_text()


def _start_time(pid: int) -> str | None:
    """The process's start time (its identity with the pid); None once it is gone or a
    zombie (an orphan of the killed hosteld, reaped by whoever inherited it)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def _crash(daemon: DaemonProcess, client: subprocess.Popen[str], name: str) -> None:
    """hosteld -9 under the run: its client must say so and end, the guest not."""
    daemon.stop(signal.SIGKILL)
    client.wait(timeout=30)
    err = _client_err(daemon, name)
    assert client.returncode == EXIT_DAEMON_LOST, err
    assert LOST.format(name=name) in err and "Traceback" not in err, err


@pytest.fixture
def pinned() -> Iterator[list[int]]:
    """Descriptors of network namespaces held open by the test, closed at its end."""
    fds: list[int] = []
    try:
        yield fds
    finally:
        for fd in fds:
            os.close(fd)


def test_a_run_outlives_a_killed_hosteld_and_the_next_takes_it_back(
        daemon: DaemonProcess, pinned: list[int]) -> None:
    name = "adopt-a"
    client = _start_run(daemon, name, *PAYLOAD)
    leader = int(_show(daemon, name, "Leader"))
    born = _start_time(leader)
    (link,) = _host_links_named(name)
    pinned.append(os.open(f"/proc/{leader}/ns/net", os.O_RDONLY | os.O_CLOEXEC))

    _crash(daemon, client, name)
    assert _start_time(leader) == born, "the payload died with hosteld"
    assert _host_links_named(name) == [link]

    daemon.start()
    guests = json.loads(hostelctl(daemon.address, "guest", "list", "-o", "json").stdout)
    assert [(g["guest"], g["class"], g["state"]) for g in guests] == \
        [(name, "container", "running")], guests
    machines = json.loads(hostelctl(daemon.address, "list", "-o", "json").stdout)
    assert [(m["machine"], m["class"]) for m in machines] == [(name, "container")], machines
    assert int(_show(daemon, name, "Leader")) == leader
    status = hostelctl(daemon.address, "status", name).stdout
    assert f"Iface: {link}" in status, status
    assert "saved settings no longer valid" not in daemon.log()

    ended = hostelctl(daemon.address, "guest", "terminate", name)
    assert ended.returncode == 0, ended.stderr
    assert _start_time(leader) is None
    # the namespace is still held here: only hosteld's deletion removed the host end
    assert _host_links_named(name) == [], daemon.log()[-3000:]
    _wait_for(lambda: _loops_on(daemon.state_dir) == [],
              f"the image's loop device outlived the run: {_loops_on(daemon.state_dir)}")
    machines_dir = daemon.runtime_dir / "machines"
    assert not (machines_dir / name).exists() and not (machines_dir / f"{name}.json").exists()
    assert name not in hostelctl(daemon.address, "list").stdout
    assert name not in hostelctl(daemon.address, "guest", "list").stdout
    os.close(pinned.pop())

    # its name, link name and /30 (the pool's only one) are free again
    again = hostelctl(daemon.address, "guest", "run", "--quiet", "--image", IMAGE, "--name",
                      name, "--network=veth", "--", "true")
    assert again.returncode == 0, again.stderr
    assert _host_links_named(name) == []


def test_a_run_that_ended_while_no_hosteld_ran_is_released_by_the_next(
        daemon: DaemonProcess, pinned: list[int]) -> None:
    name = "adopt-b"
    client = _start_run(daemon, name, "sh", "-c", "sleep 3; exit 3")
    leader = int(_show(daemon, name, "Leader"))
    pinned.append(os.open(f"/proc/{leader}/ns/net", os.O_RDONLY | os.O_CLOEXEC))
    _crash(daemon, client, name)
    _wait_for(lambda: _start_time(leader) is None, "the payload did not end")
    assert len(_host_links_named(name)) == 1   # held by the namespace the test pins

    daemon.start()
    assert _show(daemon, name, "State") == "exited"
    status = hostelctl(daemon.address, "guest", "status", name).stdout
    assert status.startswith(f"{name} (container)\n") and "State: exited" in status, status
    assert _host_links_named(name) == [], daemon.log()[-3000:]
    _wait_for(lambda: _loops_on(daemon.state_dir) == [],
              f"the image's loop device outlived the run: {_loops_on(daemon.state_dir)}")
    assert not (daemon.runtime_dir / "machines" / name).exists()
