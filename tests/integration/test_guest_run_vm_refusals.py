"""`hostelctl guest run --isolation=vm` through a real hosteld, where it must refuse.

(Booting needs a KVM that runs stock kernels: lab/test_guest_run_vm.py.)"""
from __future__ import annotations

from pathlib import Path

from hostel.privatebus import DaemonProcess

from conftest import hostelctl
from unit.test_guest_images import busybox_layer, docker_archive


def test_bad_vm_requests_are_refused_by_name(hosteld: DaemonProcess, tmp_path: Path) -> None:
    archive = docker_archive(tmp_path / "bb.tar", [busybox_layer(("sh",)).tar()])
    assert hostelctl(hosteld.address, "image", "import", str(archive), "--name", "bb"
                     ).returncode == 0
    (tmp_path / "not-a-kernel").mkdir()
    refusals = [
        (["--isolation=vm", "--kernel", str(tmp_path / "not-a-kernel")],
         "not-a-kernel is not a kernel directory"),
        (["--isolation=vm", "--kernel", str(tmp_path / "missing")],
         "cannot tell which configuration and modules go with kernel"),
        (["--isolation=container", "--cpus", "2"], "CPUs are for isolation 'vm' only"),
        (["--isolation=vm", "--cpus", "0"], "0 vCPUs is out of range"),
        (["--isolation=vm", "--memory", "1"], "memory 1 MB is out of range"),
        (["--isolation=vm", "--image", "nosuchimage"], "nosuchimage"),
    ]
    for options, needle in refusals:
        image = [] if "--image" in options else ["--image", "bb"]
        result = hostelctl(hosteld.address, "guest", "run", "--quiet", *image, *options,
                           "--", "true")
        assert result.returncode != 0 and needle in result.stderr, (options, result.stderr)
        assert "Traceback" not in result.stderr, result.stderr
    # hosteld is still there, and nothing of the refused runs is left behind
    assert hostelctl(hosteld.address, "guest", "list").returncode == 0
    assert [p for p in hosteld.runtime_dir.rglob("*") if p.parent.name == "vm"] == []
