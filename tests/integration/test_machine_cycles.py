"""Fifty start/exit cycles with every kind of root and network leave nothing behind."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from hostel.privatebus import DaemonProcess

from conftest import hostelctl

CYCLES = 50


def host_state(daemon_pid: int) -> dict[str, object]:
    """What a leaking container would leave on the host."""
    cgroups = subprocess.run(["find", "/sys/fs/cgroup", "-name", "machine-*.scope"],
                             capture_output=True, text=True).stdout.split()
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return {
        "mounts": open("/proc/self/mountinfo").read().count("\n"),
        "links": sorted(line.split(": ")[1].split("@")[0] for line in links.splitlines()),
        "cgroups": sorted(cgroups),
        "loops": subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout,
        "daemon_fds": len(os.listdir(f"/proc/{daemon_pid}/fd")),
    }


def test_cycles_leave_no_mounts_links_cgroups_loops_or_fds(hosteld: DaemonProcess, tree: Path,
                                                           tmp_path: Path) -> None:
    from unit.test_machine_image import make_ext4

    image = make_ext4(tmp_path / "root.ext4", tree, 16)
    variants = [
        ["-D", str(tree)],
        ["-D", str(tree), "--network-veth"],
        ["-D", str(tree), "--ephemeral"],
        ["-i", str(image)],
        ["-D", str(tree), "--private-users=pick", "--private-network"],
    ]
    # One warm-up start of each kind, so lazily created state (slices, the loaded device
    # programs shared by scopes with the same rules: bpf_devices) is not counted as a leak.
    for args in variants:
        result = hostelctl(hosteld.address, "run", "-q", "-M", "cycle0", *args, "/bin/true")
        assert result.returncode == 0, (args, result.stderr)
    before = host_state(hosteld.proc.pid)
    for i in range(CYCLES):
        args = variants[i % len(variants)]
        result = hostelctl(hosteld.address, "run", "-q", "-M", f"cycle{i % 3}", *args,
                           "/bin/sh", "-c", f"exit {i % 7}")
        assert result.returncode == i % 7, (args, result.stderr)
    assert host_state(hosteld.proc.pid) == before
    assert hostelctl(hosteld.address, "list").stdout.strip() == "No machines."
