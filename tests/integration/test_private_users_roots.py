"""--private-users with --ephemeral and with -i IMAGE: root inside owns its root.

As nspawn 252's --private-users-ownership=auto: the overlay's lower layer and
an image's file system are idmapped through the container's user namespace,
so `/` and its files are 0:0 inside while nothing on disk changes (the
overlay's upper layer belongs to the container's uids); an image whose file
system cannot be idmapped is chowned into the range once if it is writable,
and refused with a message saying what to do if it is read-only. Whatever
happens, nothing stays mounted or attached after the container is gone."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from hostel import native
from hostel.privatebus import DaemonProcess

from conftest import HOSTELCTL, hostelctl

PROBE = ("stat -c %u:%g / /etc/passwd; touch /created && stat -c %u:%g /created; "
         "cat /proc/self/uid_map")


def run_probe(hosteld: DaemonProcess, name: str, *root: str, script: str = PROBE,
              mode: str = "pick") -> subprocess.CompletedProcess[str]:
    return hostelctl(hosteld.address, "run", "-q", "-M", name, *root,
                     f"--private-users={mode}", "/bin/sh", "-c", script)


def base_of(uid_map_line: str) -> int:
    inside, outside, count = map(int, uid_map_line.split())
    assert inside == 0 and count == 65536, uid_map_line
    return outside


def owners(tree: Path) -> dict[str, tuple[int, int, int]]:
    """(uid, gid, mode) of every entry of the tree, as on disk."""
    found = {}
    for directory, dirs, files in os.walk(tree):
        for name in [".", *dirs, *files]:
            path = os.path.join(directory, name)
            st = os.lstat(path)
            found[os.path.relpath(path, tree)] = (st.st_uid, st.st_gid, st.st_mode)
    return found


def machine_dir(hosteld: DaemonProcess, name: str) -> str:
    return str(hosteld.runtime_dir / "machines" / name)


def mount_lines(pid: int | str, *needles: str) -> list[str]:
    with open(f"/proc/{pid}/mountinfo") as f:
        return [line for line in f if any(n in line for n in needles)]


def descriptors_on(pid: int, *needles: str) -> list[str]:
    """hosteld's open descriptors (detached mounts among them) that name one of `needles`."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if any(n in target for n in needles):
            found.append(target)
    return found


def assert_nothing_left(hosteld: DaemonProcess, *needles: str, image: Path | None = None) -> None:
    """No mount of the root in our mount table or hosteld's, no descriptor of it held by
    hosteld (an unattached detached mount shows in no table), no loop on the image."""
    assert hosteld.proc is not None
    pid = hosteld.proc.pid
    deadline = time.monotonic() + 10  # the machine's cleanup ends just after the client exits
    while True:
        left = (mount_lines("self", *needles) + mount_lines(pid, *needles)
                + descriptors_on(pid, *needles))
        if image is not None:
            left += subprocess.run(["losetup", "-j", str(image)], capture_output=True,
                                   text=True, check=True).stdout.splitlines()
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert left == []


def on_disk(image: Path, path: str) -> tuple[int, int]:
    """The owner of `path` in an ext2/3/4 image, read by debugfs (no mount involved)."""
    out = subprocess.run(["debugfs", "-R", f"stat {path}", str(image)], capture_output=True,
                         text=True, check=True).stdout
    found = re.search(r"User:\s*(\d+)\s+Group:\s*(\d+)", out)
    assert found, out
    return int(found.group(1)), int(found.group(2))


def make_ext(path: Path, source: Path, fstype: str) -> Path:
    subprocess.run([f"mkfs.{fstype}", "-q", "-F", "-d", str(source), str(path), "16M"],
                   check=True, capture_output=True)
    return path


# --ephemeral --------------------------------------------------------------------------

def leader_of(hosteld: DaemonProcess, name: str) -> int:
    status = hostelctl(hosteld.address, "status", name).stdout
    found = re.search(r"^\s*Leader:\s*(\d+)", status, re.M)
    assert found, status
    return int(found.group(1))


@pytest.mark.parametrize("mode", ["pick", "yes"])
def test_an_ephemeral_root_is_roots_inside_and_the_tree_never_changes(
        hosteld: DaemonProcess, tree: Path, mode: str) -> None:
    name = f"pu-eph-{mode}"
    before = owners(tree)
    script = PROBE + "; echo ready; read line"
    proc = subprocess.Popen(
        [HOSTELCTL, "run", "-q", "-M", name, "-D", str(tree), "--ephemeral",
         f"--private-users={mode}", "/bin/sh", "-c", script],
        env=hosteld.environment(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        lines = [proc.stdout.readline().strip() for _ in range(5)]
        assert lines[:3] == ["0:0", "0:0", "0:0"] and lines[4] == "ready", \
            (lines, proc.stderr.read() if proc.poll() is not None and proc.stderr else "")
        base = base_of(lines[3])
        assert base >= 0x80000
        # Seen from the host through the container's root: the upper layer's file is
        # the container root's, i.e. the mapped base uid, and it is not in the tree.
        created = os.stat(f"/proc/{leader_of(hosteld, name)}/root/created")
        assert (created.st_uid, created.st_gid) == (base, base)
        assert not (tree / "created").exists()
        proc.stdin.write("\n")
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert owners(tree) == before  # nothing chowned, nothing written
    assert_nothing_left(hosteld, str(tree), machine_dir(hosteld, name))


def test_an_ephemeral_root_matches_systemd_nspawn(hosteld: DaemonProcess, tree: Path) -> None:
    """systemd-nspawn 252 -U --ephemeral is the oracle: the same owners inside, and the
    tree unchanged by either. Its /run state goes to a private tmpfs."""
    nspawn = shutil.which("systemd-nspawn")
    if nspawn is None:
        pytest.fail("systemd-nspawn (systemd-container) is not installed; make setup installs it")
    before = owners(tree)
    script = ("mount --make-rprivate / && mount -t tmpfs tmpfs /run && mkdir /run/systemd && "
              f"{nspawn} -q --register=no --keep-unit -U --ephemeral -D {tree} "
              f"/bin/sh -c '{PROBE}'")
    theirs = subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True,
                            text=True, timeout=120)
    assert theirs.returncode == 0, theirs.stderr
    ours = run_probe(hosteld, "pu-eph-oracle", "-D", str(tree), "--ephemeral")
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout.splitlines()[:3] == theirs.stdout.splitlines()[:3] == ["0:0"] * 3
    assert owners(tree) == before


def test_an_ephemeral_tree_that_cannot_be_idmapped_is_refused_and_left_alone(
        hosteld: DaemonProcess, tree: Path, tmp_path: Path) -> None:
    """ramfs has no idmapped mounts, and an overlay's lower layer is never chowned."""
    ram = tmp_path / "ram"
    ram.mkdir()
    native.mount("ramfs", str(ram), "ramfs", 0, None)
    try:
        copy = ram / "tree"
        subprocess.run(["cp", "-a", str(tree), str(copy)], check=True)
        before = owners(copy)
        done = run_probe(hosteld, "pu-eph-ramfs", "-D", str(copy), "--ephemeral")
        assert done.returncode == 1, done.stdout
        assert f"the tree {copy}" in done.stderr and "idmapped" in done.stderr
        assert "without --ephemeral" in done.stderr and "Traceback" not in done.stderr
        assert owners(copy) == before
        assert_nothing_left(hosteld, str(copy), machine_dir(hosteld, "pu-eph-ramfs"))
    finally:
        native.umount(str(ram), native.MNT_DETACH)


# -i IMAGE -----------------------------------------------------------------------------

def test_an_ext4_image_is_idmapped_and_its_owners_stay_on_disk(
        hosteld: DaemonProcess, tree: Path, tmp_path: Path) -> None:
    image = make_ext(tmp_path / "root.ext4", tree, "ext4")
    done = run_probe(hosteld, "pu-img-ext4", "-i", str(image))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:3] == ["0:0", "0:0", "0:0"], lines
    assert base_of(lines[3]) >= 0x80000  # root inside is an unprivileged host uid
    assert on_disk(image, "/") == (0, 0) and on_disk(image, "/etc/passwd") == (0, 0)
    # Written by host uid BASE through the idmapped mount: stored as the image's uid 0
    # (a chown pass would have left BASE on disk, here and on every file above).
    assert on_disk(image, "/created") == (0, 0)
    assert_nothing_left(hosteld, str(image), machine_dir(hosteld, "pu-img-ext4"), image=image)


def test_a_squashfs_image_is_idmapped(hosteld: DaemonProcess, tree: Path,
                                      tmp_path: Path) -> None:
    image = tmp_path / "root.squashfs"
    subprocess.run(["mksquashfs", str(tree), str(image), "-quiet", "-noappend"], check=True)
    done = run_probe(hosteld, "pu-img-sqfs", "-i", str(image),
                     script="stat -c %u:%g / /etc/passwd /bin/busybox; id -u")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["0:0", "0:0", "0:0", "0"]
    assert_nothing_left(hosteld, str(image), machine_dir(hosteld, "pu-img-sqfs"), image=image)


def test_a_writable_image_without_idmapped_mounts_is_chowned_once(
        hosteld: DaemonProcess, tree: Path, tmp_path: Path) -> None:
    """This kernel's ext2 driver cannot idmap: as nspawn's auto ownership, the image is
    chowned into the range, and its root's owner records it for the next pick."""
    image = make_ext(tmp_path / "root.ext2", tree, "ext2")
    first = run_probe(hosteld, "pu-img-ext2", "-i", str(image))
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert lines[:3] == ["0:0", "0:0", "0:0"], lines
    base = base_of(lines[3])
    assert on_disk(image, "/") == (base, base) and on_disk(image, "/etc/passwd") == (base, base)
    assert on_disk(image, "/created") == (base, base)
    assert_nothing_left(hosteld, str(image), machine_dir(hosteld, "pu-img-ext2"), image=image)
    again = run_probe(hosteld, "pu-img-ext2", "-i", str(image), script="stat -c %u:%g /; "
                      "cat /proc/self/uid_map")
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[0] == "0:0" and base_of(again.stdout.splitlines()[1]) == base


def test_a_read_only_image_without_idmapped_mounts_is_refused_clearly(
        hosteld: DaemonProcess, tree: Path, tmp_path: Path) -> None:
    image = make_ext(tmp_path / "root.ext2", tree, "ext2")
    done = run_probe(hosteld, "pu-img-ro", "-i", str(image), "--read-only")
    assert done.returncode == 1, done.stdout
    assert f"image {image}" in done.stderr and "idmapped" in done.stderr
    assert "--read-only" in done.stderr and "without --private-users" in done.stderr
    assert "Traceback" not in done.stderr
    assert on_disk(image, "/") == (0, 0)
    assert_nothing_left(hosteld, str(image), machine_dir(hosteld, "pu-img-ro"), image=image)


def test_an_ephemeral_btrfs_snapshot_is_roots_inside_and_goes_away(
        hosteld: DaemonProcess, tree: Path, tmp_path: Path) -> None:
    """On btrfs the ephemeral root is a snapshot: handed over idmapped like a tree."""
    from hostel.machine.loop import LoopDevice

    fs = tmp_path / "btrfs.img"
    with open(fs, "wb") as f:
        f.truncate(128 << 20)
    subprocess.run(["mkfs.btrfs", "-q", str(fs)], check=True, capture_output=True)
    mnt = tmp_path / "btrfs"
    mnt.mkdir()
    with LoopDevice(str(fs)) as loop:
        native.mount(loop.device, str(mnt), "btrfs")
        try:
            subprocess.run(["btrfs", "subvolume", "create", str(mnt / "tree")], check=True,
                           capture_output=True)
            subprocess.run(["cp", "-a", f"{tree}/.", str(mnt / "tree")], check=True)
            before = owners(mnt / "tree")
            done = run_probe(hosteld, "pu-eph-btrfs", "-D", str(mnt / "tree"), "--ephemeral")
            assert done.returncode == 0, done.stderr
            assert done.stdout.splitlines()[:3] == ["0:0", "0:0", "0:0"], done.stdout
            assert owners(mnt / "tree") == before
            assert sorted(p.name for p in mnt.iterdir()) == ["tree"]  # the snapshot is gone
            assert_nothing_left(hosteld, machine_dir(hosteld, "pu-eph-btrfs"))
        finally:
            native.umount(str(mnt))
