"""The real machinectl 252 against hosteld's machine pool images and a running container:
list-images, image-status, show-image, clone, rename, read-only, remove, set-limit on a
throwaway pool (HOSTEL_MACHINE_POOL) holding a busybox tree and a .raw image; copy-to,
copy-from and bind [--mkdir] [--read-only] into a running busybox container, checked
from inside (machinectl shell, /proc/LEADER/root). The container's tree is hostile:
its symlinks point at the host's /etc/shadow and /etc, and none of them may make a
copy read or write the host's files."""
from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from hostel.privatebus import DaemonProcess, PrivateBus

from conftest import HOSTELCTL, busctl, hostelctl, serve_with_pool

FS_IMMUTABLE_FL = 0x10
RAW_SIZE = 8 << 20
CONTAINER_SHADOW = "root:container-shadow-marker:19000:0:99999:7:::\n"


def machinectl(daemon: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """The real machinectl on the private bus (it needs /run/systemd/system: a private
    mount namespace gives it one)."""
    script = 'mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/system && exec machinectl "$@"'
    result = subprocess.run(["unshare", "-m", "--propagation=private", "sh", "-c", script, "sh",
                             "--no-pager", *args],
                            env={**daemon.environment(), "SYSTEMD_COLORS": "0"},
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert "Traceback" not in result.stderr
    return result


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def fails(result: subprocess.CompletedProcess[str], message: str) -> None:
    assert result.returncode != 0, result.stdout
    assert message in result.stderr, result.stderr


def properties(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def lsattr_immutable(path: Path) -> bool:
    flags = subprocess.run(["lsattr", "-d", str(path)], capture_output=True, text=True,
                           check=True).stdout.split()[0]
    return "i" in flags


@pytest.fixture
def pool_dir(busybox_base: Path, tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "pool"
    directory.mkdir()
    subprocess.run(["cp", "-a", str(busybox_base), str(directory / "img-tree")], check=True)
    (directory / "img-tree.nspawn").write_text("[Exec]\nEnvironment=FROM_NSPAWN=1\n")
    raw = directory / "img-disk.raw"
    with raw.open("wb") as f:
        f.write(b"hostel raw image head")
        f.truncate(RAW_SIZE)
    try:
        yield directory
    finally:  # an immutable tree left by a failed test would stop pytest's clean-up
        for tree in directory.iterdir():
            if tree.is_dir() and not tree.is_symlink():
                subprocess.run(["chattr", "-i", str(tree)], capture_output=True)


@pytest.fixture
def daemon(private_bus: PrivateBus, pool_dir: Path, tmp_path: Path) -> Iterator[DaemonProcess]:
    yield from serve_with_pool(private_bus, pool_dir, tmp_path)


def leader_of(daemon: DaemonProcess, name: str) -> int:
    got = busctl(daemon.bus, "--json=short", "get-property", "org.hostel1",
                 f"/org/hostel1/machine/{name.replace('-', '_2d')}", "org.hostel1.Machine",
                 "Leader", check=False)
    return json.loads(got.stdout)["data"] if got.returncode == 0 else 0


@pytest.fixture
def box(daemon: DaemonProcess, pool_dir: Path) -> Iterator[tuple[DaemonProcess, Path, int]]:
    """img-box: a running busybox container (sleep) on the pool's tree img-tree, with a
    hostile tree: symlinks at the host's /etc/shadow and /etc, its own /etc/shadow."""
    root = pool_dir / "img-tree"
    (root / "etc/shadow").write_text(CONTAINER_SHADOW)
    (root / "leak").symlink_to("/etc/shadow")
    (root / "leak-up").symlink_to("../../../../../../../etc/shadow")
    (root / "evil-etc").symlink_to("/etc")
    (root / "trap").symlink_to("/etc/shadow")
    (root / "tree/sub").mkdir(parents=True)
    (root / "tree/sub/data").write_text("inner data\n")
    (root / "tree/shadow-link").symlink_to("/etc/shadow")
    proc = subprocess.Popen([HOSTELCTL, "run", "-q", "-D", str(root), "-M", "img-box",
                             "--as-pid2", "sleep", "300"],
                            env=daemon.environment(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not re.search(r"^img-box\s+container\s+\S+\s+running",
                            hostelctl(daemon.address, "list").stdout, re.M):
            assert time.monotonic() < deadline, "img-box did not start"
            time.sleep(0.1)
        yield daemon, root, leader_of(daemon, "img-box")
    finally:
        hostelctl(daemon.address, "kill", "img-box", "--signal=KILL")
        proc.wait(timeout=30)


def inside(daemon: DaemonProcess, *command: str) -> subprocess.CompletedProcess[str]:
    return machinectl(daemon, "-q", "shell", "img-box", *command)


def host_shadow_digest() -> str:
    return hashlib.sha256(Path("/etc/shadow").read_bytes()).hexdigest()


# Images --------------------------------------------------------------------------


def test_list_images_status_and_show(daemon: DaemonProcess, pool_dir: Path) -> None:
    listing = ok(machinectl(daemon, "list-images"))
    assert re.search(r"^img-disk\s+raw\s+no\s+", listing, re.M), listing
    assert re.search(r"^img-tree\s+directory\s+no\s+", listing, re.M), listing
    assert "2 images listed." in listing
    assert "img-tree.nspawn" not in listing

    raw = properties(ok(machinectl(daemon, "show-image", "img-disk")))
    st = (pool_dir / "img-disk.raw").stat()
    assert raw["Name"] == "img-disk" and raw["Type"] == "raw"
    assert raw["Path"] == str(pool_dir / "img-disk.raw")
    assert raw["ReadOnly"] == "no"
    assert int(raw["Usage"]) == st.st_blocks * 512 == int(raw["UsageExclusive"])
    assert int(raw["Limit"]) == RAW_SIZE == int(raw["LimitExclusive"])
    assert raw["ModificationTimestamp"] != "n/a" and raw["ModificationTimestamp"]

    tree = properties(ok(machinectl(daemon, "show-image", "img-tree")))
    assert tree["Type"] == "directory" and tree["Path"] == str(pool_dir / "img-tree")
    assert tree["ReadOnly"] == "no"

    (pool_dir / "img-tree/etc/hostname").write_text("img-host\n")
    (pool_dir / "img-tree/etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    status = ok(machinectl(daemon, "image-status", "img-tree"))
    assert "Hostname: img-host" in status, status
    assert "Machine ID: 0123456789abcdef0123456789abcdef" in status, status
    assert "OS: hostel busybox container" in status, status

    status = ok(machinectl(daemon, "image-status", "img-disk"))
    assert re.search(rf"Path: {re.escape(str(pool_dir / 'img-disk.raw'))}", status), status
    assert re.search(r"Type: raw", status) and re.search(r"Usage: \S+", status)
    assert re.search(r"Limit: 8\.0M", status), status

    manager = properties(ok(machinectl(daemon, "show")))
    assert manager["PoolPath"] == str(pool_dir)
    # machined 252 reads PoolUsage/PoolLimit from btrfs quota groups: unknown elsewhere
    assert manager["PoolUsage"] == manager["PoolLimit"] == str(2**64 - 1)

    fails(machinectl(daemon, "image-status", "img-nosuch"), "no machine image 'img-nosuch'")


def test_clone_rename_read_only_remove(daemon: DaemonProcess, pool_dir: Path) -> None:
    ok(machinectl(daemon, "clone", "img-tree", "img-copy"))
    copy = pool_dir / "img-copy"
    assert (copy / "etc/os-release").read_bytes() == \
        (pool_dir / "img-tree/etc/os-release").read_bytes()
    assert (copy / "bin").is_symlink() == (pool_dir / "img-tree/bin").is_symlink()
    assert (pool_dir / "img-copy.nspawn").read_text() == (pool_dir / "img-tree.nspawn").read_text()

    ok(machinectl(daemon, "clone", "img-disk", "img-disk2"))
    clone = pool_dir / "img-disk2.raw"
    assert clone.read_bytes() == (pool_dir / "img-disk.raw").read_bytes()
    assert clone.stat().st_blocks * 512 < RAW_SIZE  # still sparse
    listing = ok(machinectl(daemon, "list-images"))
    assert "4 images listed." in listing, listing

    ok(machinectl(daemon, "read-only", "img-copy"))
    assert lsattr_immutable(copy)
    assert properties(ok(machinectl(daemon, "show-image", "img-copy")))["ReadOnly"] == "yes"
    assert re.search(r"^img-copy\s+directory\s+yes\s+",
                     ok(machinectl(daemon, "list-images")), re.M)
    ok(machinectl(daemon, "read-only", "img-disk2"))
    assert clone.stat().st_mode & 0o222 == 0
    assert properties(ok(machinectl(daemon, "show-image", "img-disk2")))["ReadOnly"] == "yes"
    ok(machinectl(daemon, "read-only", "img-disk2", "false"))
    assert clone.stat().st_mode & 0o200

    ok(machinectl(daemon, "rename", "img-copy", "img-moved"))  # read-only: renamed all the same
    moved = pool_dir / "img-moved"
    assert not copy.exists() and moved.is_dir() and lsattr_immutable(moved)
    assert (pool_dir / "img-moved.nspawn").exists() and not (pool_dir / "img-copy.nspawn").exists()
    fails(machinectl(daemon, "show-image", "img-copy"), "no machine image 'img-copy'")
    assert properties(ok(machinectl(daemon, "show-image", "img-moved")))["ReadOnly"] == "yes"

    ok(machinectl(daemon, "remove", "img-moved", "img-disk2"))  # a read-only tree too
    assert not moved.exists() and not clone.exists()
    assert not (pool_dir / "img-moved.nspawn").exists()
    assert "2 images listed." in ok(machinectl(daemon, "list-images"))

    ok(machinectl(daemon, "clone", "--read-only", "img-tree", "img-frozen"))
    assert lsattr_immutable(pool_dir / "img-frozen")
    ok(machinectl(daemon, "remove", "img-frozen"))
    assert not (pool_dir / "img-frozen").exists()
    assert not [p for p in pool_dir.iterdir() if p.name.startswith(".#")]


def test_bad_image_requests(daemon: DaemonProcess, pool_dir: Path) -> None:
    fails(machinectl(daemon, "clone", "img-tree", "img-disk"), "exists already")
    fails(machinectl(daemon, "rename", "img-tree", "img-disk"), "exists already")
    fails(machinectl(daemon, "clone", "img-tree", ".hidden"), "is invalid")
    fails(machinectl(daemon, "rename", "img-tree", "x.raw"), "is invalid")
    fails(machinectl(daemon, "remove", "img-nosuch"), "no machine image 'img-nosuch'")
    fails(machinectl(daemon, "clone", "img-nosuch", "img-x"), "no machine image 'img-nosuch'")
    fails(machinectl(daemon, "set-limit", "1G"), "quota is only supported on btrfs")
    fails(machinectl(daemon, "set-limit", "img-disk", "1G"), "quota is only supported on btrfs")
    assert sorted(p.name for p in pool_dir.iterdir()) == ["img-disk.raw", "img-tree",
                                                          "img-tree.nspawn"]


def test_unprivileged_callers_cannot_change_images(daemon: DaemonProcess, pool_dir: Path) -> None:
    for method, signature, args in (("RemoveImage", "s", ["img-tree"]),
                                    ("CloneImage", "ssb", ["img-tree", "img-x", "false"]),
                                    ("CopyToMachine", "sss", ["img-box", "/etc", "/x"])):
        got = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                              "busctl", "call", "org.freedesktop.machine1",
                              "/org/freedesktop/machine1", "org.freedesktop.machine1.Manager",
                              method, signature, *args],
                             env={"DBUS_SYSTEM_BUS_ADDRESS": daemon.address},
                             capture_output=True, text=True, timeout=30)
        assert got.returncode != 0 and "denied" in got.stderr.lower(), got.stderr
    assert (pool_dir / "img-tree").is_dir() and not (pool_dir / "img-x").exists()


def image_call(daemon: DaemonProcess, name: str, method: str, signature: str = "",
               *args: str) -> subprocess.CompletedProcess[str]:
    return busctl(daemon.bus, "call", "org.freedesktop.machine1",
                  f"/org/freedesktop/machine1/image/{name.replace('-', '_2d')}",
                  "org.freedesktop.machine1.Image", method, *([signature, *args] if signature
                                                              else []), check=False)


def test_the_image_objects_methods(daemon: DaemonProcess, pool_dir: Path) -> None:
    ok(machinectl(daemon, "list-images"))
    ok(image_call(daemon, "img-tree", "Clone", "sb", "img-obj", "true"))
    assert lsattr_immutable(pool_dir / "img-obj")
    ok(image_call(daemon, "img-obj", "MarkReadOnly", "b", "false"))
    assert not lsattr_immutable(pool_dir / "img-obj")
    ok(image_call(daemon, "img-obj", "Rename", "s", "img-obj2"))
    assert (pool_dir / "img-obj2").is_dir() and not (pool_dir / "img-obj").exists()
    gone = image_call(daemon, "img-obj", "Remove")
    assert gone.returncode != 0  # the object went with the name
    limit = image_call(daemon, "img-disk", "SetLimit", "t", "1000000")
    assert limit.returncode != 0 and "quota is only supported on btrfs" in limit.stderr
    ok(image_call(daemon, "img-obj2", "Remove"))
    assert not (pool_dir / "img-obj2").exists()


def test_an_image_in_use_is_neither_removed_nor_renamed(box: tuple[DaemonProcess, Path, int],
                                                        pool_dir: Path) -> None:
    daemon, root, _ = box
    fails(machinectl(daemon, "remove", "img-tree"),
          "in use by running machine img-box; stop it first")
    fails(machinectl(daemon, "rename", "img-tree", "img-other"), "in use by running machine img-box")
    assert (root / "etc/os-release").exists() and not (pool_dir / "img-other").exists()
    ok(machinectl(daemon, "clone", "img-tree", "img-snap"))  # reading it is fine
    assert (pool_dir / "img-snap/etc/os-release").exists()

    # machinectl clean --all removes what no running machine uses, and says so
    ok(machinectl(daemon, "clone", "img-disk", "img-spare"))
    cleaned = machinectl(daemon, "clean", "--all")
    assert cleaned.returncode == 0, cleaned.stderr
    assert "img-spare" in cleaned.stdout + cleaned.stderr and "img-tree" not in cleaned.stdout
    left = sorted(p.name for p in pool_dir.iterdir() if not p.name.startswith(".#"))  # locks
    assert left == ["img-tree", "img-tree.nspawn"]
    ok(machinectl(daemon, "clean"))  # hidden images only: the pool keeps none
    assert (pool_dir / "img-tree").is_dir()


def test_a_raw_image_in_use_is_not_removed(daemon: DaemonProcess, pool_dir: Path) -> None:
    image = pool_dir / "img-ext.raw"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(pool_dir / "img-tree"), str(image), "16M"],
                   check=True, capture_output=True)
    proc = subprocess.Popen([HOSTELCTL, "run", "-q", "-i", str(image), "-M", "img-onraw",
                             "--as-pid2", "sleep", "300"],
                            env=daemon.environment(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not re.search(r"^img-onraw\s+container\s+\S+\s+running",
                            hostelctl(daemon.address, "list").stdout, re.M):
            assert proc.poll() is None and time.monotonic() < deadline, "img-onraw did not start"
            time.sleep(0.1)
        fails(machinectl(daemon, "remove", "img-ext"), "in use by running machine img-onraw")
        fails(machinectl(daemon, "rename", "img-ext", "img-ext2"), "in use by running machine")
        assert image.exists()
    finally:
        hostelctl(daemon.address, "kill", "img-onraw", "--signal=KILL")
        proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while "img-onraw" in hostelctl(daemon.address, "list").stdout:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    ok(machinectl(daemon, "remove", "img-ext"))  # no longer in use
    assert not image.exists()


# copy-to, copy-from, bind ---------------------------------------------------------


def test_copy_to_and_from_a_running_container(box: tuple[DaemonProcess, Path, int],
                                              tmp_path: Path) -> None:
    daemon, root, leader = box
    source = tmp_path / "to-box.txt"
    source.write_text("carried in\n")
    os.chown(source, 1234, 4321)
    ok(machinectl(daemon, "copy-to", "img-box", str(source), "/root/in.txt"))
    assert ok(inside(daemon, "/bin/cat", "/root/in.txt")).strip() == "carried in"
    copied = Path(f"/proc/{leader}/root/root/in.txt")
    assert (copied.stat().st_uid, copied.stat().st_gid) == (1234, 4321)

    tree = tmp_path / "dir-in"
    (tree / "deep").mkdir(parents=True)
    (tree / "deep/file").write_text("deep file\n")
    (tree / "link").symlink_to("deep/file")
    ok(machinectl(daemon, "copy-to", "img-box", str(tree), "/root/dir-in"))
    assert ok(inside(daemon, "/bin/cat", "/root/dir-in/link")).strip() == "deep file"
    assert os.readlink(f"/proc/{leader}/root/root/dir-in/link") == "deep/file"

    fails(machinectl(daemon, "copy-to", "img-box", str(source), "/root/in.txt"),
          "exists already")
    source.write_text("replaced\n")
    ok(machinectl(daemon, "copy-to", "--force", "img-box", str(source), "/root/in.txt"))
    assert ok(inside(daemon, "/bin/cat", "/root/in.txt")).strip() == "replaced"

    # the machine object's own CopyTo (machined has both)
    ok(busctl(daemon.bus, "call", "org.freedesktop.machine1",
              "/org/freedesktop/machine1/machine/img_2dbox", "org.freedesktop.machine1.Machine",
              "CopyTo", "ss", str(source), "/root/by-object"))
    assert ok(inside(daemon, "/bin/cat", "/root/by-object")).strip() == "replaced"
    bad = busctl(daemon.bus, "call", "org.freedesktop.machine1", "/org/freedesktop/machine1",
                 "org.freedesktop.machine1.Manager", "CopyToMachineWithFlags", "ssst", "img-box",
                 str(source), "/root/x", "2", check=False)
    assert bad.returncode != 0 and "Invalid 'flags' parameter '2'" in bad.stderr
    relative = machinectl(daemon, "copy-from", "img-box", "etc/../etc/passwd", str(tmp_path / "r"))
    assert relative.returncode != 0 and "absolute and normalized" in relative.stderr

    ok(machinectl(daemon, "copy-from", "img-box", "/etc/os-release", str(tmp_path / "os")))
    assert (tmp_path / "os").read_bytes() == (root / "etc/os-release").read_bytes()
    ok(machinectl(daemon, "copy-from", "img-box", "/tree", str(tmp_path / "tree-out")))
    assert (tmp_path / "tree-out/sub/data").read_text() == "inner data\n"

    fails(machinectl(daemon, "copy-from", "img-box", "/nosuch", str(tmp_path / "x")),
          "No such file or directory")
    fails(machinectl(daemon, "copy-from", "img-box", "/proc/uptime", str(tmp_path / "up")),
          "kernel interface")
    assert not (tmp_path / "up").exists()
    # the container's /proc/kmsg is a FIFO: copied as one, never read (which would block)
    ok(machinectl(daemon, "copy-from", "img-box", "/proc/kmsg", str(tmp_path / "kmsg")))
    assert stat.S_ISFIFO((tmp_path / "kmsg").lstat().st_mode)
    fails(machinectl(daemon, "copy-to", "img-nosuch", str(source), "/x"), "img-nosuch")


def test_copy_from_never_reads_the_hosts_files(box: tuple[DaemonProcess, Path, int],
                                               tmp_path: Path) -> None:
    daemon, _, _ = box
    for link in ("/leak", "/leak-up", "/evil-etc/shadow"):
        out = tmp_path / link.strip("/").replace("/", "-")
        ok(machinectl(daemon, "copy-from", "img-box", link, str(out)))
        assert out.read_text() == CONTAINER_SHADOW, link  # the container's, not the host's
    ok(machinectl(daemon, "copy-from", "img-box", "/tree", str(tmp_path / "tree")))
    link = tmp_path / "tree/shadow-link"
    assert link.is_symlink() and os.readlink(link) == "/etc/shadow"  # copied, not read


def test_copy_to_never_writes_the_hosts_files(box: tuple[DaemonProcess, Path, int],
                                              tmp_path: Path) -> None:
    daemon, root, leader = box
    before = host_shadow_digest()
    source = tmp_path / "payload"
    source.write_text("payload\n")
    fails(machinectl(daemon, "copy-to", "img-box", str(source), "/trap"), "exists already")
    ok(machinectl(daemon, "copy-to", "--force", "img-box", str(source), "/trap"))
    trap = Path(f"/proc/{leader}/root/trap")
    assert not trap.is_symlink() and trap.read_text() == "payload\n"  # the link replaced
    assert (root / "etc/shadow").read_text() == CONTAINER_SHADOW

    # merging a tree into the container never descends through its symlinked directories
    tree = tmp_path / "merge"
    (tree / "evil-etc").mkdir(parents=True)
    (tree / "evil-etc/hostel-merge-marker").write_text("payload\n")
    (root / "box-dir").mkdir()
    (root / "box-dir/evil-etc").symlink_to("/etc")
    for force in ((), ("--force",)):
        fails(machinectl(daemon, "copy-to", *force, "img-box", str(tree), "/box-dir"),
              "/box-dir/evil-etc in the container exists already")
        fails(machinectl(daemon, "copy-to", *force, "img-box", str(tree / "evil-etc"),
                         "/evil-etc"), "/evil-etc in the container exists already")
    assert not Path("/etc/hostel-merge-marker").exists()
    assert not (root / "etc/hostel-merge-marker").exists()
    assert os.readlink(root / "evil-etc") == "/etc"

    marker = Path("/etc/hostel-copy-to-marker")
    assert not marker.exists()
    try:
        ok(machinectl(daemon, "copy-to", "img-box", str(source), f"/evil-etc/{marker.name}"))
        assert not marker.exists()
        assert (root / "etc" / marker.name).read_text() == "payload\n"  # the container's /etc
        assert host_shadow_digest() == before
    finally:  # should the host's /etc have been written, undo it
        marker.unlink(missing_ok=True)


def test_bind_mkdir_and_read_only(box: tuple[DaemonProcess, Path, int], tmp_path: Path) -> None:
    daemon, root, leader = box
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "hello").write_text("from the host\n")
    fails(machinectl(daemon, "bind", "img-box", str(shared), "/mnt/nosuch"), "--mkdir")

    ok(machinectl(daemon, "bind", "--mkdir", "img-box", str(shared), "/mnt/rw"))
    assert ok(inside(daemon, "/bin/cat", "/mnt/rw/hello")).strip() == "from the host"
    ok(inside(daemon, "/bin/sh", "-c", "echo from-inside > /mnt/rw/back"))
    assert (shared / "back").read_text() == "from-inside\n"
    assert not os.path.ismount(root / "mnt/rw")  # in the container's namespace only

    ok(machinectl(daemon, "bind", "--mkdir", "--read-only", "img-box", str(shared), "/mnt/ro"))
    assert ok(inside(daemon, "/bin/cat", "/mnt/ro/hello")).strip() == "from the host"
    result = inside(daemon, "/bin/sh", "-c", "touch /mnt/ro/nope 2>&1; echo status=$?")
    assert "Read-only file system" in result.stdout and "status=1" in result.stdout, result
    assert not (shared / "nope").exists()

    single = tmp_path / "single-file"
    single.write_text("one file\n")
    ok(machinectl(daemon, "bind", "--mkdir", "img-box", str(single), "/srv/deep/file"))
    assert ok(inside(daemon, "/bin/cat", "/srv/deep/file")).strip() == "one file"

    # a destination through a symlink at the host's /etc stays in the container
    host_side = Path("/etc/hostel-bind")
    assert not host_side.exists()
    try:
        ok(machinectl(daemon, "bind", "--mkdir", "img-box", str(shared), "/evil-etc/hostel-bind"))
        assert not host_side.exists()
        assert Path(f"/proc/{leader}/root/etc/hostel-bind/hello").read_text() == "from the host\n"
    finally:  # should the host's /etc have been written, undo it
        if host_side.is_dir() and not os.path.ismount(host_side):
            host_side.rmdir()


# machined's documented signatures, org.freedesktop.machine1(5)
IMAGE_MANAGER_METHODS = {
    "ListImages": ("-", "a(ssbttto)"), "GetImage": ("s", "o"), "RemoveImage": ("s", "-"),
    "RenameImage": ("ss", "-"), "CloneImage": ("ssb", "-"), "MarkImageReadOnly": ("sb", "-"),
    "SetPoolLimit": ("t", "-"), "SetImageLimit": ("st", "-"),
    "GetImageHostname": ("s", "s"), "GetImageMachineID": ("s", "ay"),
    "GetImageMachineInfo": ("s", "a{ss}"), "GetImageOSRelease": ("s", "a{ss}"),
    "CopyFromMachine": ("sss", "-"), "CopyToMachine": ("sss", "-"),
    "CopyFromMachineWithFlags": ("ssst", "-"), "CopyToMachineWithFlags": ("ssst", "-"),
    "BindMountMachine": ("sssbb", "-"), "CleanPool": ("s", "a(st)")}
IMAGE_PROPERTIES = {"Name": "s", "Path": "s", "Type": "s", "ReadOnly": "b",
                    "CreationTimestamp": "t", "ModificationTimestamp": "t", "Usage": "t",
                    "Limit": "t", "UsageExclusive": "t", "LimitExclusive": "t"}


def members(daemon: DaemonProcess, path: str) -> dict[str, tuple[str, str, str]]:
    out = ok(busctl(daemon.bus, "introspect", "org.freedesktop.machine1", path))
    return {m.group(1): (m.group(2), m.group(3), m.group(4)) for m in
            re.finditer(r"^\.(\w+)\s+(method|property|signal)\s+(\S+)\s+(\S+)", out, re.M)}


def test_types_match_machined_documentation(daemon: DaemonProcess) -> None:
    manager = members(daemon, "/org/freedesktop/machine1")
    for name, (sig_in, sig_out) in IMAGE_MANAGER_METHODS.items():
        assert manager[name] == ("method", sig_in, sig_out), name
    for name in ("PoolPath", "PoolUsage", "PoolLimit"):
        assert manager[name][:2] == ("property", "s" if name == "PoolPath" else "t"), name
    ok(machinectl(daemon, "list-images"))  # exports the image objects
    image = members(daemon, "/org/freedesktop/machine1/image/img_2dtree")
    for name, signature in IMAGE_PROPERTIES.items():
        assert image[name][:2] == ("property", signature), name



def test_copy_into_and_out_of_a_user_namespaced_container(daemon: DaemonProcess, pool_dir: Path,
                                                          tmp_path: Path) -> None:
    """-U: what goes in belongs to the container's root, what comes out to the host's
    (machined's rule); the idmapped tree takes no file from an unmapped host root."""
    root = pool_dir / "img-tree"
    (root / "etc/owned").write_text("inside\n")
    os.chown(root / "etc/owned", 1000, 1000)
    proc = subprocess.Popen([HOSTELCTL, "run", "-q", "-D", str(root), "-M", "img-userns",
                             "--private-users=pick", "--as-pid2", "sleep", "300"],
                            env=daemon.environment(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not re.search(r"^img-userns\s+container\s+\S+\s+running",
                            hostelctl(daemon.address, "list").stdout, re.M):
            assert proc.poll() is None and time.monotonic() < deadline, "img-userns did not start"
            time.sleep(0.1)
        leader = leader_of(daemon, "img-userns")
        shift = int(Path(f"/proc/{leader}/uid_map").read_text().split()[1])
        assert shift > 0
        source = tmp_path / "in"
        source.write_text("to userns\n")
        os.chown(source, 1234, 1234)
        ok(machinectl(daemon, "copy-to", "img-userns", str(source), "/root/in"))
        listed = ok(machinectl(daemon, "-q", "shell", "img-userns", "/bin/ls", "-ln", "/root/in"))
        assert re.search(r"^-\S+\s+1\s+0\s+0\s", listed, re.M), listed  # the container's root
        assert ok(machinectl(daemon, "-q", "shell", "img-userns", "/bin/cat",
                             "/root/in")).strip() == "to userns"
        assert os.stat(f"/proc/{leader}/root/root/in").st_uid == shift

        ok(machinectl(daemon, "copy-from", "img-userns", "/etc/owned", str(tmp_path / "out")))
        out = (tmp_path / "out").stat()
        assert (tmp_path / "out").read_text() == "inside\n" and (out.st_uid, out.st_gid) == (0, 0)
        fails(machinectl(daemon, "bind", "img-userns", str(tmp_path), "/mnt"),
              "user namespacing")
    finally:
        hostelctl(daemon.address, "kill", "img-userns", "--signal=KILL")
        proc.wait(timeout=30)
