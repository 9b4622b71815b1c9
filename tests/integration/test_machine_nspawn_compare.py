"""The same probe in systemd-nspawn and in `hostelctl run`, on the same busybox tree.

A container must look from the inside the way an nspawn container does. Both
run on a pty (nspawn's interactive console), and the probe reports PID,
hostname, mount points with their read-only flags, /dev, the capability
bounding set and the seccomp mode. The differences that remain are listed
below with the reason for each; any other difference fails the test."""
from __future__ import annotations

import os
import pty
import shutil
import time
from pathlib import Path

import pytest

from hostel.privatebus import DaemonProcess

from conftest import HOSTELCTL

PROBE = ("echo PID=$$; echo HOST=$(hostname); echo MOUNTS; cut -d' ' -f5,6 /proc/self/mountinfo;"
         " echo DEV; ls -1 /dev; echo CAPS; grep -E 'CapBnd|Seccomp:' /proc/self/status; echo END")

# Mounts systemd-nspawn v252 makes that the seed (v219) does not, and hostel follows the seed:
# /tmp (v219 leaves it to the OS), /run/host (v246's host interface), /etc/localtime
# (v252 binds it; the seed and hostel make a symlink), /sys/fs/cgroup (a cgroup view;
# hostel does not virtualise cgroups yet on this hybrid hierarchy).
NSPAWN_ONLY = ("/tmp", "/run/host", "/etc/localtime", "/sys/fs/cgroup")
# hostel's extra mounts: the empty /etc/machine-id of the tree gets the machine id bound
# over it; /proc/sysrq-trigger is read-only; /dev/console is the host pty bound over a
# node, as in the seed (v252 instead opens a pty on the container's own devpts and
# makes /dev/console a symlink to it).
HOSTEL_ONLY = ("/etc/machine-id", "/proc/sysrq-trigger", "/dev/console")


BOOT_ID = "/proc/sys/kernel/random/boot_id"


def run_on_pty(argv: list[str], env: dict[str, str], timeout: float = 60) -> str:
    pid, master = pty.fork()
    if pid == 0:
        try:
            os.execve(argv[0], argv, env)
        finally:
            os._exit(127)
    output = b""
    deadline = time.monotonic() + timeout
    try:
        while b"END" not in output and time.monotonic() < deadline:
            try:
                output += os.read(master, 65536)
            except OSError:
                break
    finally:
        os.waitpid(pid, 0)
        os.close(master)
    return output.decode(errors="replace").replace("\r\n", "\n")


def parse(output: str) -> dict[str, object]:
    lines = output.splitlines()
    sections: dict[str, list[str]] = {}
    current = None
    fields = {}
    for line in lines:
        if line in ("MOUNTS", "DEV", "CAPS", "END"):
            current = line
            sections[current] = []
        elif current is None and "=" in line:
            key, _, value = line.partition("=")
            fields[key] = value.strip()
        elif current is not None:
            sections[current].append(line.strip())
    mounts: dict[str, str] = {}
    for line in sections["MOUNTS"]:  # the last mount at a point is the one in effect
        point, options = line.split(" ", 1)
        mounts[point] = options.split(",")[0]
    return {"pid": fields["PID"], "host": fields["HOST"], "mounts": mounts,
            "dev": set(" ".join(sections["DEV"]).split()), "caps": sections["CAPS"]}


def _outside(point: str, prefixes: tuple[str, ...]) -> bool:
    return not any(point == p or point.startswith(p + "/") for p in prefixes)


@pytest.mark.skipif(not shutil.which("systemd-nspawn"), reason="systemd-nspawn not installed")
def test_container_looks_like_an_nspawn_container(hosteld: DaemonProcess, tree: Path) -> None:
    env = hosteld.environment()
    ours = parse(run_on_pty([HOSTELCTL, "run", "-q", "-D", str(tree), "-M", "probe",
                             "/bin/sh", "-c", PROBE], env))
    # nspawn keeps state under /run/systemd: give it a private /run, not the host's.
    nspawn = ["/usr/bin/systemd-nspawn", "--register=no", "--keep-unit", "-q", "-D", str(tree),
              "-M", "probe", "/bin/sh", "-c", PROBE]
    theirs = parse(run_on_pty(["/usr/bin/unshare", "-m", "--propagation=private", "/bin/sh", "-c",
                               'mount -t tmpfs tmpfs /run && exec "$@"', "sh", *nspawn], env))
    assert (ours["pid"], ours["host"]) == (theirs["pid"], theirs["host"]) == ("1", "probe")
    assert ours["caps"] == theirs["caps"]
    assert ours["dev"] == theirs["dev"]
    common = {p for p in theirs["mounts"] if _outside(p, NSPAWN_ONLY)}
    mine = {p for p in ours["mounts"] if _outside(p, HOSTEL_ONLY)}
    assert mine == common
    for point in common - {BOOT_ID}:
        assert ours["mounts"][point] == theirs["mounts"][point], point
    assert ours["mounts"][BOOT_ID] == "ro"  # the seed's setup_boot_id; v252 leaves it rw
