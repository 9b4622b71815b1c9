"""--private-users-ownership=off|chown|map|auto, side by side with systemd-nspawn 252.

Each test runs hostel and nspawn on two copies of one tree (a busybox root with a
user's file, a set-uid binary and a file with an ACL naming a user) and compares what
matters: the owners on disk afterwards, seen from the host relative to each container's
uid base (the two pick different bases: nspawn hashes the name with siphash), and what
the payload sees inside (its ids, the owners `stat` and `ls -ln` show)."""
from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from hostel import native
from hostel.privatebus import DaemonProcess

from conftest import hostelctl

USER = 1000  # the owner of /home/u and its file, inside
PROBE = ("id -u; id -g; for p in / /etc/passwd /home/u /home/u/f /bin/probe-setuid; do "
         "stat -c '%n %u %g %a' $p; done; ls -ln /home/u | tail -n 1 | awk '{print $3, $4}'; "
         "cat /proc/self/uid_map")
ACL = "system.posix_acl_access"
ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_MASK, ACL_OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
NO_ID = 0xFFFFFFFF


def _acl_naming(uid: int) -> bytes:
    """An access ACL in the kernel's xattr format: rw for the owner, r for user `uid`."""
    entries = [(ACL_USER_OBJ, 6, NO_ID), (ACL_USER, 4, uid), (ACL_GROUP_OBJ, 4, NO_ID),
               (ACL_MASK, 4, NO_ID), (ACL_OTHER, 0, NO_ID)]
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def _acl_users(path: Path) -> list[int]:
    value = os.getxattr(path, ACL)
    entries = [struct.unpack_from("<HHI", value, offset) for offset in range(4, len(value), 8)]
    return [ident for tag, _perm, ident in entries if tag == ACL_USER]


def _prepare(tree: Path) -> Path:
    home = tree / "home/u"
    home.mkdir(parents=True, exist_ok=True)
    (home / "f").write_text("mine\n")
    for path in (home, home / "f"):
        os.chown(path, USER, USER)
    (home / "f").chmod(0o640)
    os.setxattr(home / "f", ACL, _acl_naming(USER))
    setuid = tree / "bin/probe-setuid"
    setuid.write_bytes(b"")
    setuid.chmod(0o4755)
    return tree


@pytest.fixture
def trees(tree: Path, tmp_path: Path) -> tuple[Path, Path]:
    """Two identical trees: the first for hostel, the second for systemd-nspawn."""
    _prepare(tree)
    twin = tmp_path / "twin"
    subprocess.run(["cp", "-a", str(tree), str(twin)], check=True)
    return tree, twin


def owners(tree: Path) -> dict[str, tuple[int, int, int]]:
    """(uid, gid, permission bits) of every entry, from the host."""
    found = {}
    for directory, dirs, files in os.walk(tree):
        for name in [".", *dirs, *files]:
            path = os.path.join(directory, name)
            st = os.lstat(path)
            found[os.path.relpath(path, tree)] = (st.st_uid, st.st_gid, st.st_mode & 0o7777)
    return found


# What the managers write into the tree themselves, each its own way (nspawn 252 makes
# /etc/localtime, a bind mount point, as host root after its chown pass; hostel makes
# /var/log/journal and resolv.conf before it): not the tree's own files compared here.
MANAGERS_FILES = {"etc/localtime", "etc/resolv.conf", "var/log", "var/log/journal"}


def relative(found: dict[str, tuple[int, int, int]], base: int) -> dict[str, tuple[int, int, int]]:
    """The owners of the tree's own files, less `base`."""
    return {path: (uid - base, gid - base, mode) for path, (uid, gid, mode) in found.items()
            if path not in MANAGERS_FILES}


def run_hostel(hosteld: DaemonProcess, tree: Path, name: str,
               *args: str) -> subprocess.CompletedProcess[str]:
    return hostelctl(hosteld.address, "run", "-q", "-D", str(tree), "-M", name, *args,
                     "/bin/sh", "-c", PROBE)


def run_nspawn(tree: Path, name: str, *args: str) -> subprocess.CompletedProcess[str]:
    """systemd-nspawn 252 with a private /run (it keeps state there), as the benchmarks run it."""
    argv = ["/usr/bin/systemd-nspawn", "--register=no", "--keep-unit", "-q", "-D", str(tree),
            "-M", name, *args, "/bin/sh", "-c", PROBE]
    return subprocess.run(["/usr/bin/unshare", "-m", "--propagation=private", "/bin/sh", "-c",
                           'mount -t tmpfs tmpfs /run && exec "$@"', "sh", *argv],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)


def view(done: subprocess.CompletedProcess[str]) -> tuple[list[str], int]:
    """What the payload saw (every probe line but the uid map), and the uid base."""
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.strip().split("\n")
    inside, base, _count = map(int, lines[-1].split())
    assert inside == 0
    return lines[:-1], base


def both(hosteld: DaemonProcess, trees: tuple[Path, Path], name: str,
         *args: str) -> tuple[tuple[list[str], int], tuple[list[str], int]]:
    return (view(run_hostel(hosteld, trees[0], f"{name}-h", *args)),
            view(run_nspawn(trees[1], f"{name}-n", *args)))


ROOTS_VIEW = ["0", "0", "/ 0 0 755", "/etc/passwd 0 0 644", f"/home/u {USER} {USER} 755",
              f"/home/u/f {USER} {USER} 640", "/bin/probe-setuid 0 0 4755", f"{USER} {USER}"]


def test_chown_moves_the_tree_into_the_range_as_nspawn_does(
        hosteld: DaemonProcess, trees: tuple[Path, Path]) -> None:
    before = owners(trees[0])
    (ours, base), (theirs, nspawn_base) = both(hosteld, trees, "own-chown", "-U",
                                               "--private-users-ownership=chown")
    assert ours == theirs == ROOTS_VIEW
    assert relative(owners(trees[0]), base) == relative(owners(trees[1]), nspawn_base) \
        == relative(before, 0)  # every owner moved by the base, the set-uid bit kept
    assert os.stat(trees[0]).st_uid == base  # the record: the root is in the range
    assert _acl_users(trees[0] / "home/u/f") == [base + USER]
    assert _acl_users(trees[1] / "home/u/f") == [nspawn_base + USER]


def test_a_recorded_chown_is_not_walked_again(hosteld: DaemonProcess,
                                              trees: tuple[Path, Path]) -> None:
    first, base = view(run_hostel(hosteld, trees[0], "own-again", "-U",
                                  "--private-users-ownership=chown"))
    changed = os.lstat(trees[0] / "etc/passwd").st_ctime_ns
    again, same = view(run_hostel(hosteld, trees[0], "own-again", "-U",
                                  "--private-users-ownership=chown"))
    assert (again, same) == (first, base)
    assert os.lstat(trees[0] / "etc/passwd").st_ctime_ns == changed  # no chown this time


def test_chown_moves_a_chowned_tree_to_another_range_and_back(
        hosteld: DaemonProcess, trees: tuple[Path, Path]) -> None:
    """The lower 16 bits stay: a tree goes from one range to another, as with nspawn."""
    before = owners(trees[0])
    for base in (0x70000000 - 0x20000, 0x70000000 - 0x40000):
        fixed = (f"--private-users={base}:65536", "--private-users-ownership=chown")
        (ours, our_base), (theirs, their_base) = both(hosteld, trees, "own-move", *fixed)
        assert our_base == their_base == base
        assert ours == theirs == ROOTS_VIEW
        assert relative(owners(trees[0]), base) == relative(owners(trees[1]), base) \
            == relative(before, 0)
        assert _acl_users(trees[0] / "home/u/f") == _acl_users(trees[1] / "home/u/f") \
            == [base + USER]


def test_off_changes_nothing_and_the_payload_sees_nobody(
        hosteld: DaemonProcess, trees: tuple[Path, Path]) -> None:
    before = owners(trees[0])
    (ours, _), (theirs, _) = both(hosteld, trees, "own-off", "-U",
                                  "--private-users-ownership=off")
    assert ours == theirs
    assert ours[2:4] == ["/ 65534 65534 755", "/etc/passwd 65534 65534 644"]
    assert relative(owners(trees[0]), 0) == relative(owners(trees[1]), 0) == relative(before, 0)


@pytest.mark.parametrize("ownership", ["map", "auto"])
def test_map_and_auto_idmap_an_ext4_tree_leaving_the_disk_alone(
        hosteld: DaemonProcess, trees: tuple[Path, Path], ownership: str) -> None:
    before = owners(trees[0])
    (ours, _), (theirs, _) = both(hosteld, trees, f"own-{ownership}", "-U",
                                  f"--private-users-ownership={ownership}")
    assert ours == theirs == ROOTS_VIEW
    assert relative(owners(trees[0]), 0) == relative(owners(trees[1]), 0) == relative(before, 0)


def test_pick_defaults_to_auto_and_a_fixed_base_to_off(
        hosteld: DaemonProcess, trees: tuple[Path, Path]) -> None:
    """252's defaults: -U (pick) maps the root-owned tree, a fixed base leaves it be."""
    (ours, _), (theirs, _) = both(hosteld, trees, "own-default", "-U")
    assert ours == theirs == ROOTS_VIEW
    fixed = f"--private-users={0x70000000 - 0x60000}:65536"
    (ours, _), (theirs, _) = both(hosteld, trees, "own-fixed", fixed)
    assert ours == theirs
    assert ours[2] == "/ 65534 65534 755"


def test_map_refuses_a_chowned_tree_and_auto_keeps_its_chown(
        hosteld: DaemonProcess, trees: tuple[Path, Path]) -> None:
    for tree, run in zip(trees, (lambda *a: run_hostel(hosteld, trees[0], "own-mapped", *a),
                                 lambda *a: run_nspawn(trees[1], "own-mapped", *a))):
        _seen, base = view(run("-U", "--private-users-ownership=chown"))
        refused = run("-U", "--private-users-ownership=map")
        assert refused.returncode != 0
        assert "UID base of" in refused.stderr and "UID mapping not supported" in refused.stderr
        seen, again = view(run("-U"))  # auto: the tree stays in its range, chowned
        assert (seen, again) == (ROOTS_VIEW, base)
        assert os.stat(tree).st_uid == base


@pytest.fixture
def ramfs_tree(busybox_base: Path, tmp_path: Path) -> Iterator[Path]:
    """A tree on ramfs, which supports no idmapped mounts."""
    ram = tmp_path / "ram"
    ram.mkdir()
    native.mount("ramfs", str(ram), "ramfs", 0, None)
    try:
        copy = ram / "tree"
        subprocess.run(["cp", "-a", str(busybox_base), str(copy)], check=True)
        yield copy
    finally:
        native.umount(str(ram), native.MNT_DETACH)


def test_map_refuses_a_file_system_without_idmapped_mounts(
        hosteld: DaemonProcess, ramfs_tree: Path) -> None:
    before = owners(ramfs_tree)
    ours = run_hostel(hosteld, ramfs_tree, "own-ramfs", "-U", "--private-users-ownership=map")
    theirs = run_nspawn(ramfs_tree, "own-ramfs", "-U", "--private-users-ownership=map")
    assert ours.returncode != 0 and theirs.returncode != 0
    assert "ID mapped mounts are apparently not available" in theirs.stderr
    assert "ID mapped mounts are apparently not available" in ours.stderr
    assert "Traceback" not in ours.stderr
    assert relative(owners(ramfs_tree), 0) == relative(before, 0)
