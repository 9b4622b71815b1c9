"""--private-users: the container's /dev and /sys are hosteld's detached mounts (nspawn 252
makes them outside the user namespace), and they give the container nothing of the host's.

A tmpfs mounted inside a user namespace cannot hold a device node that opens, so hosteld
makes the /dev tmpfs and its nodes itself and gives them to the container's root; a
container sharing the host's network gets a fresh read-only sysfs made by hosteld, not a
bind of the host's /sys with its submounts."""
from __future__ import annotations

from pathlib import Path

from hostel.privatebus import DaemonProcess

from conftest import hostelctl

SCRIPT = r"""
stat -c '%n %u:%g %d' /dev /dev/null /dev/zero /dev/net/tun /dev/char
echo x > /dev/null && echo null-writable
head -c 4 /dev/zero | od -An -tx1
mknod /dev/made c 1 3 2>/dev/null && echo mknod-worked || echo mknod-refused
awk '{for (i = 7; $i != "-"; i++) ; print "mount", $5, $6, $(i + 1), $(i + 3)}' \
    /proc/self/mountinfo
# even where the container makes its /sys writable, the host's attributes are not its own
mount -o remount,bind,rw /sys 2>/dev/null
t=/sys/module/printk/parameters/time  # rewritten with its own value: nothing changes
echo "$(cat $t)" > $t 2>/dev/null && echo sysfs-written \
    || echo sysfs-refused
"""


def run(hosteld: DaemonProcess, tree: Path, *args: str) -> list[str]:
    result = hostelctl(hosteld.address, "run", "-q", "-M", "pu-apifs", "-D", str(tree),
                       "--private-users=pick", *args, "/bin/sh", "-c", SCRIPT)
    assert result.returncode == 0, result.stderr
    return [line.strip() for line in result.stdout.splitlines()]


def mounts_at(lines: list[str], where: str) -> list[list[str]]:
    """[options, fstype, super options] of each mount on `where`."""
    return [line.split()[2:] for line in lines if line.split()[:2] == ["mount", where]]


def test_dev_nodes_are_roots_inside_and_open(hosteld: DaemonProcess, tree: Path) -> None:
    lines = run(hosteld, tree, "--private-network")
    stats = {line.split()[0]: line.split()[1:] for line in lines[:5]}
    dev_device = stats["/dev"][1]
    for node in ("/dev/null", "/dev/zero", "/dev/net/tun", "/dev/char"):
        assert stats[node] == ["0:0", dev_device], (node, lines)  # on the /dev tmpfs itself
    assert "null-writable" in lines and "00 00 00 00" in lines, lines
    assert "mknod-refused" in lines, lines
    assert [m[:2] for m in mounts_at(lines, "/dev")] == [["rw,nosuid", "tmpfs"]], lines
    assert not [line for line in lines if " devtmpfs " in line], lines  # no host node bound


def test_sys_is_a_fresh_read_only_sysfs(hosteld: DaemonProcess, tree: Path) -> None:
    lines = run(hosteld, tree)
    assert mounts_at(lines, "/sys") == [["ro,nosuid,nodev,noexec,relatime", "sysfs", "rw"]], lines
    cgroup = mounts_at(lines, "/sys/fs/cgroup")
    assert len(cgroup) == 1 and "uid=" in cgroup[0][2], lines  # the container's, not the host's
    assert not [line for line in lines if " devtmpfs " in line], lines
    assert "sysfs-refused" in lines, lines
