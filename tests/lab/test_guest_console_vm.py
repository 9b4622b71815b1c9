"""The console of a `guest run --isolation=vm` on real ptys, in the lab (a stock kernel
needs a real KVM): `hostelctl guest console` attaches to the VM's hvc0, what the viewer
types reaches the payload and its answer comes back; the viewer's ^]^]^] detaches and
the VM runs on; the running client's ^]^]^] kills the VM, as systemd-nspawn's escape
kills a container. One VM boot in all."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from conftest import hostelctl
from hostel.privatebus import DaemonProcess, PrivateBus
from lab.plugin import time_scale
from ptyclient import ESCAPE, OnPty
from unit.test_guest_images import busybox_layer, docker_archive, image_config

BOOT_TIMEOUT = 240  # seconds: the nested boot takes ~15-45 s, slower on a loaded host


def _listed(address: str, name: str) -> str | None:
    for line in hostelctl(address, "guest", "list", "--no-legend").stdout.splitlines():
        fields = line.split()
        if fields and fields[0] == name:
            return fields[2]
    return None


@pytest.mark.lab("kvm")
def test_a_vm_runs_console_attaches_detaches_and_its_escape_kills_it(
        private_bus: PrivateBus, hosteld: DaemonProcess, tmp_path: Path) -> None:
    layers = [busybox_layer(("sh", "echo", "cat", "sleep")).tar()]
    archive = docker_archive(tmp_path / "c.tar", layers, image_config(layers))
    address = private_bus.address
    assert hostelctl(address, "image", "import", str(archive), "--name", "con-vm-image",
                     timeout=120 * time_scale()).returncode == 0
    owner = OnPty(address, "guest", "run", "--isolation=vm", "--image", "con-vm-image",
                  "--name", "con-vm", "--", "sh", "-c",
                  "echo ready; while read line; do echo got-$line; done",
                  env={"TERM": "xterm"})
    viewer = None
    try:
        owner.read_until(b"Press ^] three times within 1s to kill the guest.")
        owner.read_until(b"ready", timeout=BOOT_TIMEOUT)
        viewer = OnPty(address, "guest", "console", "con-vm")
        viewer.read_until(b"Press ^] three times within 1s to detach.", 60 * time_scale())
        viewer.type(b"from-viewer\r")
        viewer.read_until(b"got-from-viewer", 60 * time_scale())
        owner.read_until(b"got-from-viewer", 60 * time_scale())
        viewer.type(ESCAPE)
        assert viewer.wait(30 * time_scale()) == 0, viewer.output
        assert viewer.terminal_restored(), "the viewer left its terminal in raw mode"
        time.sleep(1)
        assert _listed(address, "con-vm") == "running", "detaching ended the VM"
        owner.type(b"from-owner\r")
        owner.read_until(b"got-from-owner", 60 * time_scale())  # its own input still works
        owner.type(ESCAPE)
        assert owner.wait(60 * time_scale()) == 1, owner.output
        assert b"Guest con-vm terminated by signal KILL." in owner.output, owner.output
        assert owner.terminal_restored(), "the running client left its terminal raw"
        assert _listed(address, "con-vm") is None, hostelctl(address, "guest", "list").stdout
    finally:
        for client in (viewer, owner):
            if client is not None:
                client.close()
        hostelctl(address, "guest", "terminate", "con-vm")
