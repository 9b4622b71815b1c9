"""LUKS volumes attached for real: a hosteld on a private bus maps LUKS1 and LUKS2
images through device-mapper (dm-crypt), and what is written through
/dev/mapper/NAME is stored encrypted and read back after a new attach.

Device-mapper is needed, so where the host has none these run in the lab VM."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from hostel.cryptsetup import luks
from hostel.privatebus import DaemonProcess, PrivateBus

from conftest import busctl, hostelctl
from lab.plugin import time_scale

MANAGER = "/org/hostel1/cryptsetup"
VOLUME = "org.hostel1.Volume"
PASSPHRASE = "lab passphrase"
WRONG = "not the passphrase"
KEY_BYTES = b"\x00\x01 a key file for the lab \xff\n"
IMAGE_BYTES = 24 << 20
PLAINTEXT = b"hostel lab: written through dm-crypt\n" * 100
OFFSET = 1 << 20


@dataclass
class Images:
    crypttab: Path
    key_file: Path
    wrong_key_file: Path
    paths: dict[str, Path]   # volume name -> image file

    def env(self) -> dict[str, str]:
        return {"SYSTEMD_CRYPTTAB": str(self.crypttab), "SYSTEMD_PROC_CMDLINE": "",
                "SYSTEMD_EFI_OPTIONS": "", "SYSTEMD_IN_INITRD": "0"}


def make_image(path: Path, version: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(IMAGE_BYTES)
    # Both keys in both images: every volume opens with the passphrase and the key file.
    luks.format_volume(str(path), version, [PASSPHRASE.encode(), KEY_BYTES], pbkdf2_iterations=1000)
    return path


@pytest.fixture
def images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Images]:
    """A LUKS1 and a LUKS2 image and a crypttab naming them, in hosteld's environment
    (the `hosteld` fixture's daemon inherits it: request this fixture first).
    Whatever a failed test left mapped is removed afterwards (after hosteld stops)."""
    d = tmp_path / "volumes"
    d.mkdir()
    key_file = d / "key"
    key_file.write_bytes(KEY_BYTES)
    wrong = d / "wrong-key"
    wrong.write_bytes(b"some other key\n")
    paths = {"labone": make_image(d / "luks1.img", 1), "labtwo": make_image(d / "luks2.img", 2)}
    crypttab = d / "crypttab"
    crypttab.write_text(f"labone {paths['labone']} none luks\n"
                        f"labtwo {paths['labtwo']} {key_file} luks\n")
    found = Images(crypttab, key_file, wrong, paths)
    for key, value in found.env().items():
        monkeypatch.setenv(key, value)
    try:
        yield found
    finally:
        remove_leftovers(found)


def remove_leftovers(images: Images) -> None:
    """With the host's own tools, so that a broken hosteld cannot leave them behind."""
    for name, image in images.paths.items():
        if name in mappings():
            subprocess.run(["cryptsetup", "close", name], capture_output=True, timeout=120)
        for loop in loops_on(image):
            subprocess.run(["losetup", "-d", f"/dev/{loop}"], capture_output=True, timeout=60)


def ctl(address: str, *args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """hostelctl, with as much more time as the machine is slower (the lab's TCG)."""
    return hostelctl(address, *args, timeout=60 * time_scale(), **kwargs)


def state(bus: PrivateBus, name: str) -> str:
    out = busctl(bus, "--json=short", "get-property", "org.hostel1", f"{MANAGER}/{name}",
                 VOLUME, "State")
    return json.loads(out.stdout)["data"]


def attach_over_dbus(bus: PrivateBus, name: str, key: str, value: str) -> subprocess.CompletedProcess[str]:
    return busctl(bus, "call", "org.hostel1", MANAGER, "org.hostel1.CryptsetupManager", "Attach",
                  "sa{sv}", name, "1", key, "s", value, check=False)


def mappings() -> set[str]:
    """Names of every device-mapper device the kernel has."""
    return {(p / "dm/name").read_text().strip() for p in Path("/sys/block").glob("dm-*")}


def loops_on(image: Path) -> list[str]:
    """Loop devices backed by image (libcryptsetup attaches one to map a file)."""
    found = []
    for loop in Path("/sys/block").glob("loop*"):
        backing = loop / "loop/backing_file"
        if backing.exists() and backing.read_text().strip() == str(image):
            found.append(loop.name)
    return found


def assert_nothing_left(images: Images, name: str) -> None:
    assert name not in mappings()
    assert not os.path.exists(f"/dev/mapper/{name}")
    assert loops_on(images.paths[name]) == []


def write_through(name: str, data: bytes) -> None:
    fd = os.open(f"/dev/mapper/{name}", os.O_WRONLY)
    try:
        os.pwrite(fd, data, OFFSET)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_through(name: str, size: int) -> bytes:
    fd = os.open(f"/dev/mapper/{name}", os.O_RDONLY)
    try:
        return os.pread(fd, size, OFFSET)
    finally:
        os.close(fd)


@pytest.mark.lab("dm")
def test_attach_write_detach_and_read_back_luks1_and_luks2(
        images: Images, private_bus: PrivateBus, hosteld: DaemonProcess) -> None:
    """Each volume attached twice, by a different kind of key each time: what the
    first mapping wrote is ciphertext in the image and plaintext in the second."""
    address = private_bus.address
    first = {"labone": ctl(address, "cryptsetup", "attach", "labone", input=PASSPHRASE + "\n"),
             "labtwo": ctl(address, "cryptsetup", "attach", "labtwo")}   # crypttab's key file
    for name, out in first.items():
        assert (out.returncode, out.stdout.strip()) == (0, f"{name}: attached as /dev/mapper/{name}"), \
            out.stderr + hosteld.log()
        assert state(private_bus, name) == "active"
        assert name in mappings()
        write_through(name, PLAINTEXT + name.encode())
        detached = ctl(address, "cryptsetup", "detach", name)
        assert detached.returncode == 0, detached.stderr
        assert state(private_bus, name) == "inactive"
        assert_nothing_left(images, name)
        assert PLAINTEXT not in images.paths[name].read_bytes(), "the image holds plaintext"

    second = {"labone": attach_over_dbus(private_bus, "labone", "KeyFile", str(images.key_file)),
              "labtwo": attach_over_dbus(private_bus, "labtwo", "Passphrase", PASSPHRASE)}
    for name, out in second.items():
        assert out.returncode == 0, out.stderr + hosteld.log()
        assert state(private_bus, name) == "active"
        assert read_through(name, len(PLAINTEXT) + len(name)) == PLAINTEXT + name.encode()
        assert ctl(address, "cryptsetup", "detach", name).returncode == 0
        assert_nothing_left(images, name)


@pytest.mark.lab("dm")
def test_a_wrong_key_is_a_clear_error_and_leaves_nothing(
        images: Images, private_bus: PrivateBus, hosteld: DaemonProcess) -> None:
    address = private_bus.address
    by_passphrase = ctl(address, "cryptsetup", "attach", "labone", input=WRONG + "\n")
    assert by_passphrase.returncode == 1
    assert by_passphrase.stderr.strip() == (
        f"hostelctl cryptsetup attach: the passphrase opens no key slot of {images.paths['labone']}")
    by_key_file = ctl(address, "cryptsetup", "attach", "labtwo", "--key-file",
                            str(images.wrong_key_file))
    assert by_key_file.returncode == 1
    assert by_key_file.stderr.strip() == (
        f"hostelctl cryptsetup attach: key file {images.wrong_key_file} opens no key slot of "
        f"{images.paths['labtwo']}")
    for name in ("labone", "labtwo"):
        assert state(private_bus, name) == "inactive"
        assert_nothing_left(images, name)
    # The daemon is unharmed: the right key still works.
    right = ctl(address, "cryptsetup", "attach", "labtwo")
    assert right.returncode == 0, right.stderr + hosteld.log()
    assert ctl(address, "cryptsetup", "detach", "labtwo").returncode == 0
    assert_nothing_left(images, "labtwo")


def test_units_for_the_lab_crypttab_pass_systemd_analyze_verify(images: Images, tmp_path: Path) -> None:
    """The generator's units for the crypttab the tests above attach from (no
    device-mapper needed: this runs wherever the tests run)."""
    # Imported here: that module brings hypothesis, seconds of start-up in the lab.
    from integration.test_generator_oracle import verify

    out = tmp_path / "units"
    out.mkdir()
    generator = Path(sys.executable).parent / "hostel-cryptsetup-generator"
    subprocess.run([str(generator), str(out), str(out), str(out)], check=True, timeout=60,
                   env=dict(os.environ, RUNTIME_DIRECTORY=str(tmp_path / "run")))
    units = sorted(p for p in out.glob("*") if p.is_file() and p.suffix == ".service")
    assert [p.name for p in units] == ["systemd-cryptsetup@labone.service",
                                       "systemd-cryptsetup@labtwo.service"]
    result = verify(units, out)
    assert result.returncode == 0, result.stdout + result.stderr
