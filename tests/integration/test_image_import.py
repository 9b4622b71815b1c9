"""Image import through ImageService (in this process) and through hosteld + hostelctl."""
from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import select
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import IO, Callable

import pytest

from hostel.bus import InvalidArgs, NoSuchObject
from hostel.guest.images import CorruptImage, ImageInUse
from hostel.guest.images_service import ImageService
from hostel.privatebus import DaemonProcess

from conftest import HOSTELCTL, hostelctl
from unit.test_guest_images import (Layer, busybox_layer, docker_archive, multi_layer_image,
                                    oci_layout)


@pytest.fixture
def service(tmp_path: Path) -> ImageService:
    return ImageService(tmp_path / "state/images", tmp_path / "run")


async def test_import_list_remove_both_formats(service: ImageService, tmp_path: Path) -> None:
    seen: list[tuple[str, str, int, int]] = []
    service.progress = lambda *report: seen.append(report)
    docker = docker_archive(tmp_path / "docker.tar", multi_layer_image())
    (tmp_path / "oci").mkdir()
    oci = oci_layout(tmp_path / "oci", [busybox_layer(("sh",)).tar()], tag="oci-one")
    assert await service.import_image(str(docker), "") == "hostel/busybox:test"
    assert await service.import_image(str(oci), "") == "oci-one:latest"
    listed = service.list_images()
    assert [row[0] for row in listed] == ["hostel/busybox:test", "oci-one:latest"]
    assert all(row[1].startswith("sha256:") and row[2] > 0 for row in listed)
    await asyncio.sleep(0)   # progress reports are delivered on the loop
    # Keyed by the requested name, or by the path while the name is still unknown; the
    # counts are bytes of the layers as stored (three tars for docker, one gzip for OCI).
    docker_bytes = sum(len(layer) for layer in multi_layer_image())
    assert (str(docker), "imported", docker_bytes, docker_bytes) in seen
    oci_done = [r for r in seen if r[0] == str(oci) and r[1] == "imported"]
    assert len(oci_done) == 1 and 0 < oci_done[0][2] == oci_done[0][3]
    assert any(r[0] == str(docker) and r[1].startswith("applying layer") and
               0 < r[2] < docker_bytes == r[3] for r in seen), seen
    await service.remove_image("oci-one")   # oci-one is oci-one:latest
    assert [row[0] for row in service.list_images()] == ["hostel/busybox:test"]
    with pytest.raises(NoSuchObject):
        await service.remove_image("oci-one:latest")


async def test_import_refusals_reach_the_caller(service: ImageService, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgs, match="must be absolute"):
        await service.import_image("relative.tar", "x")
    evil = docker_archive(tmp_path / "evil.tar", [Layer().file("../evil", b"x").tar()])
    with pytest.raises(CorruptImage, match="contains '..'"):
        await service.import_image(str(evil), "evil")
    assert service.list_images() == []
    assert not (tmp_path / "evil").exists()


def _wired(result) -> bool:
    return "not implemented" not in result.stderr


def test_hostelctl_image_import_list_remove(hosteld: DaemonProcess, tmp_path: Path) -> None:
    archive = docker_archive(tmp_path / "bb.tar", [busybox_layer(("sh",)).tar()])
    imported = hostelctl(hosteld.address, "image", "import", str(archive), "--name", "bb")
    if not _wired(imported):
        pytest.skip("hosteld's ImportImage is not wired to ImageService yet: "
                    f"{imported.stderr.strip()}")
    assert imported.returncode == 0, imported.stderr
    assert f"imported {archive} as image bb:latest\n" == imported.stdout
    assert imported.stderr == "", "progress is drawn on a terminal only"
    assert (hosteld.state_dir / "images/bb:latest/rootfs.squashfs").is_file()
    tagged = hostelctl(hosteld.address, "image", "import", str(archive), "--name",
                       "hostel/bb:v2")
    assert tagged.returncode == 0 and tagged.stdout.endswith("as image hostel/bb:v2\n")
    listed = hostelctl(hosteld.address, "image", "list")
    assert listed.returncode == 0 and "1 images listed." not in listed.stdout
    assert [line.split()[0] for line in listed.stdout.splitlines()[1:3]] == \
        ["bb:latest", "hostel/bb:v2"]
    again = hostelctl(hosteld.address, "image", "import", str(archive), "--name", "bb:latest")
    assert again.returncode == 1 and "exists already" in again.stderr
    bad = hostelctl(hosteld.address, "image", "import", str(tmp_path / "missing.tar"))
    assert bad.returncode == 1 and "does not exist" in bad.stderr
    malformed = hostelctl(hosteld.address, "image", "import", str(archive), "--name", "Bad:")
    assert malformed.returncode == 1 and "invalid image reference 'Bad:'" in malformed.stderr
    removed = hostelctl(hosteld.address, "image", "remove", "bb", "hostel/bb:v2")
    assert removed.returncode == 0, removed.stderr
    assert hostelctl(hosteld.address, "image", "list").stdout == "No images.\n"
    assert _leftovers(hosteld) == []


def _leftovers(hosteld: DaemonProcess) -> list[str]:
    images = hosteld.state_dir / "images"
    return sorted(os.listdir(images)) if images.exists() else []


def test_import_from_stdin_keeps_name_and_tag(hosteld: DaemonProcess, tmp_path: Path) -> None:
    """`import -` reads a pipe: fd 0 goes to hosteld, which reads it itself."""
    archive = docker_archive(tmp_path / "bb.tar", [busybox_layer(("sh", "echo")).tar()])
    with open(archive, "rb") as tar:
        piped = subprocess.run(f"cat {archive} | {HOSTELCTL} image import - --name "
                               "hostel/piped:v1", shell=True, capture_output=True, text=True,
                               env=_env(hosteld), stdin=subprocess.DEVNULL)
        assert piped.returncode == 0, piped.stderr
        assert piped.stdout == "imported standard input as image hostel/piped:v1\n"
        from_file = hostelctl(hosteld.address, "image", "import", "-", stdin=tar)
    assert from_file.returncode == 0, from_file.stderr   # no --name: the archive's tag
    assert from_file.stdout.endswith("as image hostel/busybox:test\n")
    inspected = hostelctl(hosteld.address, "image", "inspect", "hostel/piped:v1")
    assert inspected.returncode == 0, inspected.stderr
    (doc,) = json.loads(inspected.stdout)
    assert doc["RepoTags"] == ["hostel/piped:v1"] and doc["Source"] == "standard input"
    ran = hostelctl(hosteld.address, "guest", "run", "--image", "hostel/piped:v1", "--",
                    "echo", "from-stdin")
    assert (ran.returncode, ran.stdout) == (0, "from-stdin\n"), ran.stderr
    assert _leftovers(hosteld) == ["hostel+busybox:test", "hostel+piped:v1"]


@pytest.mark.parametrize("content, needle", [
    (b"hello, not a tar\n" * 64, "standard input is neither a directory nor a readable tar"),
    (b"", "standard input is neither a directory nor a readable tar"),
])
def test_stdin_that_is_not_an_image(hosteld: DaemonProcess, content: bytes,
                                    needle: str) -> None:
    result = hostelctl(hosteld.address, "image", "import", "-", "--name", "junk",
                       input=content.decode())
    assert result.returncode == 1 and needle in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert _leftovers(hosteld) == []
    assert hostelctl(hosteld.address, "image", "list").stdout == "No images.\n"


def test_import_dash_refuses_a_terminal(hosteld: DaemonProcess) -> None:
    primary, secondary = pty.openpty()
    try:
        result = hostelctl(hosteld.address, "image", "import", "-", stdin=secondary)
    finally:
        os.close(primary)
        os.close(secondary)
    assert result.returncode == 2 and "is a terminal; pipe a tar" in result.stderr


def _env(hosteld: DaemonProcess) -> dict[str, str]:
    return dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=hosteld.address)


class SlowWriter(threading.Thread):
    """Feeds a file into a pipe at about `rate` bytes/s: a transfer that lasts."""

    def __init__(self, source: Path, pipe: IO[bytes], rate: int) -> None:
        super().__init__(daemon=True)
        self.source, self.pipe, self.rate = source, pipe, rate
        self.written = 0
        self.stop = threading.Event()

    def run(self) -> None:
        chunk = max(self.rate // 20, 1)
        try:
            with open(self.source, "rb") as data:
                while not self.stop.is_set() and (block := data.read(chunk)):
                    self.pipe.write(block)
                    self.pipe.flush()
                    self.written += len(block)
                    time.sleep(0.05)
            self.pipe.close()
        except (BrokenPipeError, ValueError):
            pass  # hostelctl and hosteld stopped reading: what the test wants


def big_archive(path: Path, megabytes: int) -> Path:
    """A docker-save archive with a layer of incompressible random data."""
    layer = busybox_layer(("sh", "echo")).file("srv/random", os.urandom(megabytes << 20)).tar()
    return docker_archive(path, [layer])


def _wait_for(condition: "Callable[[], bool]", what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_during_import_from_stdin_cancels_it(hosteld: DaemonProcess, tmp_path: Path,
                                                    presses: int) -> None:
    """SIGINT to the real hostelctl mid-stream: exit 130, no traceback (a second Ctrl-C
    neither), and hosteld keeps no image and no staging directory."""
    archive = big_archive(tmp_path / "big.tar", 8)
    proc = subprocess.Popen([HOSTELCTL, "image", "import", "-", "--name", "cancelled"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=_env(hosteld))
    assert proc.stdin is not None
    writer = SlowWriter(archive, proc.stdin, 1 << 20)   # ~8 s for the whole archive
    writer.start()
    try:
        _wait_for(lambda: any(n.startswith(".receive-") for n in _leftovers(hosteld)),
                  "hosteld to start receiving")
        _wait_for(lambda: writer.written > 1 << 20, "a megabyte to pass")
        for _ in range(presses):
            proc.send_signal(signal.SIGINT)
            time.sleep(0.05)
        _out, err = proc.communicate(timeout=30)
    finally:
        writer.stop.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert writer.written < archive.stat().st_size, "the import was not interrupted mid-way"
    assert proc.returncode == 130, err
    assert b"Traceback" not in err and b"interrupted" in err, err
    if presses == 1:
        assert b"hosteld cancelled it and kept nothing" in err, err
    _wait_for(lambda: _leftovers(hosteld) == [], "hosteld to remove its staging")
    assert hostelctl(hosteld.address, "image", "list").stdout == "No images.\n"


def test_progress_shows_bytes_rate_and_eta_on_a_terminal(hosteld: DaemonProcess,
                                                         tmp_path: Path) -> None:
    archive = big_archive(tmp_path / "big.tar", 3)
    primary, secondary = pty.openpty()
    proc = subprocess.Popen([HOSTELCTL, "image", "import", "-", "--name", "shown"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=secondary,
                            env=_env(hosteld))
    os.close(secondary)
    assert proc.stdin is not None
    writer = SlowWriter(archive, proc.stdin, 1 << 20)
    writer.start()
    seen = b""
    try:
        while proc.poll() is None or select.select([primary], [], [], 0)[0]:
            if select.select([primary], [], [], 0.2)[0]:
                try:
                    seen += os.read(primary, 65536)
                except OSError:
                    break
        out = proc.stdout.read() if proc.stdout else b""
    finally:
        writer.stop.set()
        os.close(primary)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == 0, seen
    assert out == b"imported standard input as image shown:latest\n"
    text = seen.decode(errors="replace")
    # A pipe's length is unknown: bytes and rate, no percentage (a pull's ETA is tested
    # in test_image_pull); the line is redrawn in place and erased at the end.
    assert re.search(r"\r\x1b\[Kimporting standard input: receiving \d+\.\dM "
                     r"\d+(\.\d)?[KM]/s \d+:\d\d", text), text
    assert text.endswith("\r\x1b[K"), text


def test_an_image_in_use_is_not_removed(hosteld: DaemonProcess, tmp_path: Path) -> None:
    """Removal is refused, naming the running container, until the container is gone."""
    archive = docker_archive(tmp_path / "bb.tar", [busybox_layer(("sh", "echo", "sleep")).tar()])
    assert hostelctl(hosteld.address, "image", "import", str(archive), "--name",
                     "hostel/busy:v1").returncode == 0
    proc = subprocess.Popen([HOSTELCTL, "guest", "run", "-q", "--name", "img-in-use", "--image",
                             "hostel/busy:v1", "--", "sh", "-c", "echo ready; exec sleep 60"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=_env(hosteld))
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n", hosteld.log()
        refused = hostelctl(hosteld.address, "image", "remove", "hostel/busy:v1")
        assert refused.returncode == 1, refused.stderr
        assert "image hostel/busy:v1 is in use by container img-in-use" in refused.stderr
        assert "hostelctl terminate" in refused.stderr
        assert "hostel/busy:v1" in hostelctl(hosteld.address, "image", "list").stdout
        assert hostelctl(hosteld.address, "terminate", "img-in-use").returncode == 0
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _wait_for(lambda: "img-in-use" not in hostelctl(hosteld.address, "list").stdout,
              "the container to be gone")
    removed = hostelctl(hosteld.address, "image", "remove", "hostel/busy:v1")
    assert removed.returncode == 0, removed.stderr
    assert _leftovers(hosteld) == []


async def test_an_image_a_vm_runs_is_not_removed(service: ImageService, tmp_path: Path) -> None:
    """The guest service tells which VMs run which disks (running_vms); a VM booted from
    the image's squashfs keeps it (the lab runs real VMs; here the service's own check)."""
    archive = docker_archive(tmp_path / "bb.tar", [busybox_layer(("sh",)).tar()])
    name = await service.import_image(str(archive), "vm-image")
    info = service.store.get(name)
    service.running_vms = lambda: [("other", [tmp_path / "x.squashfs"]),
                                   ("vm-one", [info.squashfs, tmp_path / "config.squashfs"])]
    with pytest.raises(ImageInUse, match="image vm-image:latest is in use by vm vm-one; stop it"):
        await service.remove_image("vm-image")
    service.running_vms = lambda: []
    await service.remove_image("vm-image")
    assert service.list_images() == []


def test_ctrl_c_during_import_of_a_file_cancels_it(hosteld: DaemonProcess,
                                                   tmp_path: Path) -> None:
    """The case of the report: Ctrl-C during `image import PATH` used to raise
    KeyboardInterrupt while hosteld went on and imported the image anyway."""
    archive = big_archive(tmp_path / "big.tar", 24)   # seconds of layer and mksquashfs work
    proc = subprocess.Popen([HOSTELCTL, "image", "import", str(archive), "--name", "stopped"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=_env(hosteld))
    try:
        _wait_for(lambda: any(n.startswith(".import-") for n in _leftovers(hosteld)),
                  "hosteld to start importing", 60)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and out == b"", (out, err)
    assert b"hosteld cancelled it and kept nothing" in err and b"Traceback" not in err, err
    _wait_for(lambda: _leftovers(hosteld) == [], "hosteld to remove its staging")
    assert hostelctl(hosteld.address, "image", "list").stdout == "No images.\n"
