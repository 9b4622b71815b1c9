"""hostelctl image pull from a real registry: Debian's docker-registry on loopback.

Each test starts its own registry (plain HTTP on 127.0.0.1, storage in the
test's directory) and pushes into it with skopeo an image built here as a
docker-save archive. The pulled image must run (its entrypoint's output is
compared), its layers must be the pushed ones, bad references and registries
must be refused with a message that says what to do, and Ctrl-C must cancel
a pull in hosteld. A throttling TCP relay in front of the registry makes a
pull last long enough to interrupt it mid-transfer."""
from __future__ import annotations

import hashlib
import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest

from hostel.privatebus import DaemonProcess

from conftest import HOSTELCTL, hostelctl
from unit.test_guest_images import busybox_layer, docker_archive, image_config

REGISTRY = "/usr/bin/docker-registry"
NO_TLS = "--tls-verify=false"
MACHINE = "pulled-echo"     # machine names are global: unique to this file


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as reply:
            return reply.status == 200
    except OSError:
        return False


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[str]:
    """A docker-registry on 127.0.0.1:PORT: its address, HOST:PORT."""
    assert os.access(REGISTRY, os.X_OK), "docker-registry is missing: run 'make setup'"
    port = _free_port()
    config = tmp_path / "registry.yml"
    config.write_text(f"version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
                      f"storage:\n  filesystem:\n    rootdirectory: {tmp_path / 'registry'}\n"
                      f"http:\n  addr: 127.0.0.1:{port}\n")
    log = open(tmp_path / "registry.log", "wb")
    proc = subprocess.Popen([REGISTRY, "serve", str(config)], stdout=log, stderr=log,
                            stdin=subprocess.DEVNULL)
    try:
        _wait_for(lambda: proc.poll() is None and _answers(f"http://127.0.0.1:{port}/v2/"),
                  "docker-registry to answer")
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def push(archive: Path, reference: str) -> None:
    subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false",
                    f"docker-archive:{archive}", f"docker://{reference}"], check=True,
                   capture_output=True, timeout=120)


def remote_manifest(reference: str) -> dict:
    raw = subprocess.run(["skopeo", "inspect", "--raw", NO_TLS, f"docker://{reference}"],
                         check=True, capture_output=True, timeout=60).stdout
    return json.loads(raw)


def _leftovers(hosteld: DaemonProcess) -> list[str]:
    images = hosteld.state_dir / "images"
    return sorted(os.listdir(images)) if images.exists() else []


def _skopeo_children(hosteld: DaemonProcess) -> list[int]:
    """skopeo processes whose parent is this test's hosteld."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            comm = stat[stat.index("(") + 1:stat.rindex(")")]
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        except (OSError, ValueError):
            continue
        if comm == "skopeo" and hosteld.proc is not None and ppid == hosteld.proc.pid:
            found.append(int(entry))
    return found


def test_pull_runs_the_pushed_image_with_its_layers(hosteld: DaemonProcess, registry: str,
                                                     tmp_path: Path) -> None:
    layer = busybox_layer(("sh", "echo", "cat")).file("srv/motd", b"pushed here\n").tar()
    config = image_config([layer], Entrypoint=["echo", "entrypoint of"], Cmd=["the", "pull"],
                          WorkingDir="/srv")
    archive = docker_archive(tmp_path / "echo.tar", [layer], config)
    reference = f"{registry}/hostel/echo:v1"
    push(archive, reference)

    pulled = hostelctl(hosteld.address, "image", "pull", reference, NO_TLS)
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout == f"pulled {reference} as image {reference}\n"
    assert pulled.stderr == "", "progress is drawn on a terminal only"
    listed = hostelctl(hosteld.address, "image", "list", "--no-legend")
    assert listed.stdout.split()[0] == reference

    inspected = hostelctl(hosteld.address, "image", "inspect", reference)
    assert inspected.returncode == 0, inspected.stderr
    (doc,) = json.loads(inspected.stdout)
    manifest = remote_manifest(reference)
    # The layer as built here (uncompressed) and as the registry stores it (gzip, by skopeo).
    assert doc["RootFS"]["Layers"] == [f"sha256:{hashlib.sha256(layer).hexdigest()}"]
    assert doc["Layers"] == [manifest["layers"][0]["digest"]]
    assert doc["Id"] == manifest["config"]["digest"].split(":")[1]
    assert doc["RepoTags"] == [reference] and doc["Source"] == f"docker://{reference}"
    assert (doc["Architecture"], doc["Os"]) == ("amd64", "linux")
    assert doc["Config"]["Entrypoint"] == ["echo", "entrypoint of"]
    assert doc["Config"]["WorkingDir"] == "/srv" and doc["Size"] > 0

    ran = hostelctl(hosteld.address, "guest", "run", "-q", "--name", MACHINE, "--image",
                    reference)
    assert (ran.returncode, ran.stdout) == (0, "entrypoint of the pull\n"), ran.stderr
    overridden = hostelctl(hosteld.address, "guest", "run", "-q", "--name", MACHINE, "--image",
                       reference, "--", "motd")
    assert overridden.stdout == "entrypoint of motd\n", overridden.stderr

    again = hostelctl(hosteld.address, "image", "pull", reference, NO_TLS)
    assert again.returncode == 1 and "exists already" in again.stderr
    renamed = hostelctl(hosteld.address, "image", "pull", reference, NO_TLS, "--name",
                        "echo:pulled")
    assert renamed.returncode == 0 and renamed.stdout.endswith("as image echo:pulled\n")
    removed = hostelctl(hosteld.address, "image", "remove", reference, "echo:pulled")
    assert removed.returncode == 0, removed.stderr
    assert _leftovers(hosteld) == []


def test_pull_refusals_say_what_to_do(hosteld: DaemonProcess, registry: str,
                                      tmp_path: Path) -> None:
    closed = f"127.0.0.1:{_free_port()}"
    cases = [
        ([f"{closed}/hostel/x:v1", NO_TLS],
         [f"cannot reach registry {closed}: connection refused", "Is a registry running"]),
        ([f"{registry}/hostel/absent:v1", NO_TLS],
         [f"registry {registry} has no image {registry}/hostel/absent:v1", "list-tags"]),
        ([f"{registry}/Hostel/UPPER:v1", NO_TLS], ["invalid image reference"]),
        ([f"{registry}/hostel/x:", NO_TLS], ["invalid image reference"]),
        (["hostel/x@sha256:1234", NO_TLS], ["invalid image reference"]),
        # A short name would be a guess (docker.io?): refused before any network use.
        (["hostel/busybox", NO_TLS], ["'hostel/busybox:latest' names no registry",
                                      "REGISTRY[:PORT]/NAME[:TAG]"]),
        ([f"{registry}/hostel/absent:v1"],
         [f"registry {registry} speaks plain HTTP", "--tls-verify=false"]),
    ]
    for argv, needles in cases:
        result = hostelctl(hosteld.address, "image", "pull", *argv)
        assert result.returncode == 1, (argv, result.stderr)
        assert all(n in result.stderr for n in needles), (argv, result.stderr)
        assert "Traceback" not in result.stderr
    bad_flag = hostelctl(hosteld.address, "image", "pull", "x", "--tls-verify=maybe")
    assert bad_flag.returncode == 2 and "expected true or false" in bad_flag.stderr
    assert _leftovers(hosteld) == []
    assert hostelctl(hosteld.address, "image", "list").stdout == "No images.\n"


@dataclass
class Relay:
    """A TCP relay from 127.0.0.1:port to `target`, sending the replies at `rate` bytes/s."""

    target: tuple[str, int]
    rate: int
    relayed: int = 0

    def __post_init__(self) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = [self.listener]
        self.stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, 0), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, self.rate),
                             daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, rate: int) -> None:
        chunk = max(rate // 20, 1) if rate else 65536
        try:
            while data := source.recv(chunk):
                sink.sendall(data)
                if rate:
                    self.relayed += len(data)
                    time.sleep(len(data) / rate)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.stopped.set()
        for sock in self.sockets:
            sock.close()


@pytest.fixture
def slow_registry(registry: str) -> Iterator[tuple[str, Relay]]:
    host, port = registry.split(":")
    relay = Relay((host, int(port)), 1 << 20)
    try:
        yield f"127.0.0.1:{relay.port}", relay
    finally:
        relay.close()


def _big_image(path: Path, megabytes: int) -> Path:
    layer = busybox_layer(("sh",)).file("srv/random", os.urandom(megabytes << 20)).tar()
    return docker_archive(path, [layer])


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_cancels_a_pull_in_hosteld(hosteld: DaemonProcess, registry: str,
                                          slow_registry: tuple[str, Relay], tmp_path: Path,
                                          presses: int) -> None:
    """SIGINT to the real hostelctl while skopeo downloads: exit 130 without a traceback
    (a second Ctrl-C too); hosteld kills skopeo and keeps no image, no staging."""
    push(_big_image(tmp_path / "big.tar", 6), f"{registry}/hostel/big:v1")
    address, relay = slow_registry
    proc = subprocess.Popen([HOSTELCTL, "image", "pull", f"{address}/hostel/big:v1", NO_TLS],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE,
                            env=dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=hosteld.address))
    try:
        _wait_for(lambda: relay.relayed > 1 << 20, "a megabyte of the layer to pass")
        assert _skopeo_children(hosteld), "skopeo is not downloading"
        for _ in range(presses):
            proc.send_signal(signal.SIGINT)
            time.sleep(0.05)
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert relay.relayed < 6 << 20, "the pull was not interrupted mid-transfer"
    assert proc.returncode == 130, err
    assert b"Traceback" not in err and b"interrupted" in err, err
    if presses == 1:
        assert b"hosteld cancelled it and kept nothing" in err, err
    _wait_for(lambda: not _skopeo_children(hosteld), "hosteld to kill skopeo", 10)
    _wait_for(lambda: _leftovers(hosteld) == [], "hosteld to remove its staging", 10)
    assert hostelctl(hosteld.address, "image", "list").stdout == "No images.\n"


def test_pull_progress_has_bytes_rate_and_eta_on_a_terminal(
        hosteld: DaemonProcess, registry: str, slow_registry: tuple[str, Relay],
        tmp_path: Path) -> None:
    push(_big_image(tmp_path / "big.tar", 3), f"{registry}/hostel/big:v1")
    address, _relay = slow_registry
    primary, secondary = pty.openpty()
    proc = subprocess.Popen([HOSTELCTL, "image", "pull", f"{address}/hostel/big:v1", NO_TLS],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=secondary,
                            env=dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=hosteld.address))
    os.close(secondary)
    seen = b""
    try:
        while True:
            if select.select([primary], [], [], 0.2)[0]:
                try:
                    chunk = os.read(primary, 65536)
                except OSError:   # EIO: hostelctl closed the terminal's last end
                    break
                if not chunk:
                    break
                seen += chunk
            elif proc.poll() is not None:
                break
        proc.wait(timeout=60)
    finally:
        os.close(primary)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, seen
    text = seen.decode(errors="replace")
    # e.g. "pulling ...: downloading 1.2M/4.0M 30% 1.0M/s ETA 0:02 0:01" (3M + busybox)
    assert re.search(rf"pulling {re.escape(address)}/hostel/big:v1: downloading "
                     r"\d+(\.\d)?[BKM]/4\.\dM \d+% \d+(\.\d)?[KM]/s ETA \d+:\d\d", text), text
    assert re.search(r"building the squashfs image 4\.\dM/4\.\dM 100% \d+:\d\d", text), text
    assert text.endswith("\r\x1b[K"), text
