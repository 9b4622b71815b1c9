"""The lab's parts that run on the host: the cpio writer, as a real cpio reads it back,
and the module dependencies, as the Debian kernel's own .modinfo gives them."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from lab.initramfs import LOAD_ORDER, Initramfs
from lab.kernels import kernel
from lab.modules import index


def test_the_archive_reads_back_with_busybox_cpio(tmp_path: Path) -> None:
    image = Initramfs()
    image.add_console()
    image.add_file("/etc/deep/file", b"content\n" * 3, 0o640)
    image.add_symlink("/bin/sh", "busybox")
    image.add_file("/odd", b"12345")   # a size that needs padding
    archive = image.write(tmp_path / "initrd")
    listed = subprocess.run(["busybox", "cpio", "-t"], stdin=open(archive, "rb"),
                            capture_output=True, text=True, check=True).stdout.split()
    assert listed == ["bin", "bin/sh", "dev", "dev/console", "etc", "etc/deep", "etc/deep/file",
                      "odd"]
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["busybox", "cpio", "-i", "-d"], cwd=out, stdin=open(archive, "rb"),
                   capture_output=True, check=True)
    assert (out / "etc/deep/file").read_bytes() == b"content\n" * 3
    assert stat.S_IMODE((out / "etc/deep/file").stat().st_mode) == 0o640
    assert (out / "odd").read_bytes() == b"12345"
    assert (out / "bin/sh").readlink() == Path("busybox")
    console = (out / "dev/console").stat()
    assert stat.S_ISCHR(console.st_mode) and (console.st_rdev >> 8, console.st_rdev & 0xFF) == (5, 1)


def test_dependencies_load_first() -> None:
    modules = index(kernel("amd64").modules)
    order = [m.name for m in modules.load_order(["dm_crypt", "kvm_amd"])]
    assert order.index("dm_mod") < order.index("dm_crypt")
    assert order.index("kvm") < order.index("kvm_amd")
    assert order[-1] == "kvm_amd" and len(order) == len(set(order))
    with pytest.raises(KeyError, match="no module no_such_module"):
        modules.load_order(["no-such-module"])


def test_add_modules_writes_the_load_order(tmp_path: Path) -> None:
    image = Initramfs()
    names = image.add_modules(kernel("cloud-amd64"), ["virtio_mmio"])
    assert names[-1] == "virtio_mmio.ko" and "virtio_ring.ko" in names
    assert image.entries[LOAD_ORDER].data.decode().split() == names
    assert f"/lib/modules/{names[0]}" in image.entries


LAB_TESTS = '''
import pytest

@pytest.mark.lab("dm")
def test_needs_device_mapper():
    pass

@pytest.mark.lab("gpu")
def test_needs_something_unknown():
    pass
'''


def test_a_lab_that_cannot_run_fails_its_tests_never_skips(tmp_path: Path) -> None:
    """The plugin's promise, on a lab cut short (HOSTEL_LAB_TIMEOUT=1) and on a
    marker naming a need the lab does not know."""
    (tmp_path / "test_in_lab.py").write_text(LAB_TESTS)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]),
               HOSTEL_LAB="always", HOSTEL_LAB_TIMEOUT="1")
    out = subprocess.run([sys.executable, "-m", "pytest", "-p", "lab.plugin", "-p", "no:cacheprovider",
                          "-q", "-rfEs", "-W", "ignore::pytest.PytestUnknownMarkWarning",
                          str(tmp_path / "test_in_lab.py")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "1 failed, 1 error" in out.stdout, out.stdout
    assert "skipped" not in out.stdout
    assert "the lab VM did not finish within 1 s (HOSTEL_LAB_TIMEOUT)" in out.stdout
    assert "@pytest.mark.lab names 'gpu'; the lab knows 'kvm', 'dm'" in out.stdout
