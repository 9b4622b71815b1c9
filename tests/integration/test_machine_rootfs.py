"""Container roots for real: loop devices, image mounts inside spawned children,
template copies, ephemeral overlays and btrfs snapshots.

Every test is checked afterwards for loop devices over its files (detached,
and the test failed, if any is left) and for mounts under its directory."""
from __future__ import annotations

import fcntl
import os
import stat
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import pytest

from hostel import native
from hostel.bus import InvalidArgs
from hostel.machine.image import GPT_ROOT_X86_64, attach_image, dissect, read_files_from_image
from hostel.machine import loop as loop_module
from hostel.machine.loop import LO_FLAGS_AUTOCLEAR, LO_FLAGS_READ_ONLY, LoopDevice, LoopError
from hostel.machine.rootfs import (EphemeralRoot, RootfsError, check_os_tree, is_btrfs_subvolume,
                                   populate_from_template, read_os_release)
from hostel.spawn import Plan, StepFailed, spawn
from unit.test_machine_image import (MIB, OS_RELEASE, ext4_from_tree, make_tree, need, run,
                                     standard_gpt)

T = TypeVar("T")


def loops_over(directory: Path) -> list[str]:
    out = subprocess.run(["losetup", "--list", "--noheadings", "--raw", "-O", "NAME,BACK-FILE"],
                         capture_output=True, text=True, check=True).stdout
    return [line.split(" ", 1)[0] for line in out.splitlines()
            if line.split(" ", 1)[1].startswith(str(directory))]


def mounts_under(directory: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if str(directory) in line]


@pytest.fixture(autouse=True)
def nothing_left_behind(tmp_path: Path) -> Iterator[None]:
    yield
    leftovers = loops_over(tmp_path)
    for device in leftovers:
        subprocess.run(["losetup", "-d", device], check=False)
    mounts = mounts_under(tmp_path)
    for line in reversed(mounts):
        subprocess.run(["umount", "-l", line.split()[4]], check=False)
    assert not leftovers, f"loop devices left attached: {leftovers}"
    assert not mounts, f"mounts left behind: {mounts}"


def run_plan(plan: Plan, flags: int = native.CLONE_NEWNS) -> tuple[bytes, int]:
    """Spawn `plan` with stdout and stderr on a pipe; its output and exit status."""
    out_r, out_w = os.pipe()
    plan.dup2(out_w, 1)
    plan.dup2(out_w, 2)
    plan.steps[:0] = plan.steps[-2:]
    del plan.steps[-2:]
    child = spawn(plan, flags)
    os.close(out_w)
    try:
        try:
            child.wait_started()
        finally:
            with os.fdopen(out_r, "rb") as out:
                data = out.read()
            status = native.pidfd_wait(child.pidfd, block=True).returncode
        return data, status
    finally:
        child.close()


def private_plan() -> Plan:
    plan = Plan()
    plan.mount(None, "/", None, native.MS_REC | native.MS_PRIVATE)
    return plan


def shell(plan: Plan, script: str) -> Plan:
    plan.execve("/bin/sh", ["sh", "-c", script], ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"])
    return plan


def in_private_mount_namespace(fn: Callable[[], T]) -> T:
    """Run `fn` in a thread of its own mount namespace: its mounts die with the thread."""
    def body() -> T:
        native.unshare(native.CLONE_NEWNS)
        native.mount(None, "/", None, native.MS_REC | native.MS_PRIVATE)
        return fn()
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(body).result()


def tree_digest(root: Path) -> dict[str, tuple]:
    """Everything that must survive a copy, or stay untouched under an overlay."""
    digest = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                content: object = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                content = path.read_bytes()
            else:
                content = st.st_rdev
            xattrs = {k: os.getxattr(path, k, follow_symlinks=False)
                      for k in os.listxattr(path, follow_symlinks=False)}
            digest[str(path.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid,
                                                   st.st_nlink, content, xattrs)
    return digest


# Loop devices ---------------------------------------------------------------------------

def test_loop_device_has_offset_size_and_flags(tmp_path: Path) -> None:
    backing = tmp_path / "backing.img"
    backing.write_bytes(bytes(MIB) + b"X" * MIB + bytes(MIB))
    with LoopDevice(str(backing), offset=MIB, size=MIB, read_only=True) as loop:
        name = os.path.basename(loop.device)
        sysfs = Path("/sys/block", name)
        assert (sysfs / "loop/offset").read_text().strip() == str(MIB)
        assert (sysfs / "loop/sizelimit").read_text().strip() == str(MIB)
        assert (sysfs / "ro").read_text().strip() == "1"
        assert loop.status_flags() & (LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR) == \
            LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR
        with open(loop.device, "rb") as dev:
            assert dev.read() == b"X" * MIB
        assert loops_over(tmp_path) == [loop.device]
    assert not loop.attached
    loop.detach()  # idempotent
    assert loops_over(tmp_path) == []


def test_concurrent_attaches_get_distinct_devices(tmp_path: Path) -> None:
    """Racing threads are handed the same free number; the losers must retry (EBUSY)."""
    backing = tmp_path / "b.img"
    backing.write_bytes(bytes(MIB))
    loops: list[LoopDevice] = []
    try:
        with ThreadPoolExecutor(max_workers=6) as pool:
            for future in [pool.submit(LoopDevice, str(backing)) for _ in range(6)]:
                loops.append(future.result())
        assert len({loop.device for loop in loops}) == 6
    finally:
        for loop in loops:
            loop.detach()


def test_pre_5_8_attach_path(tmp_path: Path) -> None:
    """LOOP_SET_FD + LOOP_SET_STATUS64, used where LOOP_CONFIGURE is unknown."""
    backing = tmp_path / "b.img"
    backing.write_bytes(b"Y" * MIB)
    loop = LoopDevice(str(backing))
    number = loop.number
    loop.detach()
    device_fd = os.open(f"/dev/loop{number}", os.O_RDWR | os.O_CLOEXEC)
    backing_fd = os.open(backing, os.O_RDONLY | os.O_CLOEXEC)
    try:
        info = loop_module._info64(str(backing), 4096, 8192, LO_FLAGS_READ_ONLY)
        LoopDevice._set_fd_and_status(device_fd, backing_fd, info)
        try:
            assert loops_over(tmp_path) == [f"/dev/loop{number}"]
            sysfs = Path(f"/sys/block/loop{number}")
            assert (sysfs / "loop/offset").read_text().strip() == "4096"
            assert (sysfs / "size").read_text().strip() == str(8192 // 512)
            assert (sysfs / "ro").read_text().strip() == "1"
        finally:
            fcntl.ioctl(device_fd, loop_module.LOOP_CLR_FD)
    finally:
        os.close(backing_fd)
        os.close(device_fd)


def test_loop_error_names_the_image(tmp_path: Path) -> None:
    with pytest.raises(LoopError, match=f"cannot open image {tmp_path}/absent.img"):
        LoopDevice(str(tmp_path / "absent.img"))


# Images mounted inside a child ---------------------------------------------------------

def test_gpt_partitions_mount_inside_the_child_only(tmp_path: Path) -> None:
    dissected = dissect(str(standard_gpt(tmp_path)))
    target = tmp_path / "mnt"
    target.mkdir()
    with attach_image(dissected) as mounts:
        assert [m.mount_point for m in mounts.mounts] == ["/", "/home", "/srv"]
        plan = private_plan()
        mounts.add_to_plan(plan, str(target))
        shell(plan, f"cat {target}/etc/hello {target}/home/h {target}/srv/s; "
                    f"grep -c '{target}.* ext4 /dev/loop.*' /proc/self/mountinfo; "
                    f"findmnt -n -o OPTIONS {target} | tr , '\\n' | grep -x nodev")
        out, status = run_plan(plan)
        assert status == 0, out
        assert out == b"hello from root\nhome partition\nsrv partition\n3\nnodev\n"
        assert mounts_under(target) == []
    assert loops_over(tmp_path) == []


def test_read_only_partition_is_mounted_read_only(tmp_path: Path) -> None:
    dissected = dissect(str(standard_gpt(tmp_path, root_attrs="GUID:60")))
    target = tmp_path / "mnt"
    target.mkdir()
    with attach_image(dissected) as mounts:
        assert mounts.loops[0].status_flags() & LO_FLAGS_READ_ONLY
        assert not mounts.loops[1].status_flags() & LO_FLAGS_READ_ONLY
        plan = private_plan()
        mounts.add_to_plan(plan, str(target))
        shell(plan, f"echo data > {target}/home/written && cat {target}/home/written && "
                    f"echo data > {target}/etc/written")
        out, status = run_plan(plan)
    assert status != 0
    assert out.startswith(b"data\n") and b"Read-only file system" in out


def test_block_device_as_image(tmp_path: Path) -> None:
    with LoopDevice(str(standard_gpt(tmp_path)), read_only=True) as disk:
        dissected = dissect(disk.device)
        assert dissected.is_block_device and dissected.partition_table == "gpt"
        assert dissected.size == 18 * MIB
        target = tmp_path / "mnt"
        target.mkdir()
        with attach_image(dissected, read_only=True) as mounts:
            assert all(m.read_only for m in mounts.mounts)
            plan = private_plan()
            mounts.add_to_plan(plan, str(target))
            shell(plan, f"cat {target}/srv/s")
            assert run_plan(plan) == (b"srv partition\n", 0)


def test_loops_are_released_when_the_child_fails(tmp_path: Path) -> None:
    dissected = dissect(str(ext4_from_tree(tmp_path, "bare")))
    with attach_image(dissected) as mounts:
        plan = private_plan()
        mounts.add_to_plan(plan, str(tmp_path / "no-such-dir"))
        shell(plan, "true")
        with pytest.raises(StepFailed, match="mount ext4 on .*/no-such-dir.*ENOENT"):
            run_plan(plan)
    mounts.detach()
    assert loops_over(tmp_path) == []

def test_gpt_with_4k_sectors(tmp_path: Path) -> None:
    """A disk made on a 4096-byte-sector device keeps its GPT at byte 4096."""
    need("sfdisk")
    path = tmp_path / "4k.img"
    with open(path, "wb") as f:
        f.truncate(16 * MIB)
    run("losetup", "--find", "--sector-size", "4096", str(path))
    device = loops_over(tmp_path)[0]
    try:
        subprocess.run(["sfdisk", "-q", device], input=f"label: gpt\nsize=2048, type={GPT_ROOT_X86_64}\n",
                       text=True, check=True, capture_output=True)
    finally:
        run("losetup", "-d", device)
    start = 256  # sfdisk's 1 MiB alignment in 4096-byte sectors
    with open(path, "r+b") as disk:
        disk.seek(start * 4096)
        disk.write(ext4_from_tree(tmp_path, "four", 8).read_bytes())
    root = dissect(str(path)).root
    assert (root.number, root.offset, root.size, root.fstype) == (1, MIB, 8 * MIB, "ext4")
    assert read_files_from_image(dissect(str(path)), ["etc/hello"]) == {"etc/hello": b"hello from four\n"}



def test_read_files_from_image_leaves_no_mount(tmp_path: Path) -> None:
    before = open("/proc/self/mountinfo").read()
    dissected = dissect(str(ext4_from_tree(tmp_path, "reader")))
    files = read_files_from_image(dissected, ["/etc/passwd", "/etc/os-release", "/etc/nothing"],
                                  scratch_dir=str(tmp_path))
    assert files["/etc/passwd"].startswith(b"root:x:0:0:")
    assert b"reader:x:1000:1000:" in files["/etc/passwd"]
    assert files["/etc/os-release"] == OS_RELEASE.encode()
    assert files["/etc/nothing"] is None
    assert open("/proc/self/mountinfo").read() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("hostel-image-")] == []


def test_read_files_from_a_gpt_root(tmp_path: Path) -> None:
    dissected = dissect(str(standard_gpt(tmp_path)))
    assert read_files_from_image(dissected, ["etc/hello"]) == {"etc/hello": b"hello from root\n"}


# Templates -------------------------------------------------------------------------------

def rich_tree(root: Path) -> Path:
    make_tree(root, "tmpl")
    (root / "etc/hardlink").hardlink_to(root / "etc/hello")
    (root / "bin").mkdir()
    (root / "bin/suid").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "bin/suid", 0o4750)
    (root / "tmp").mkdir()
    os.chmod(root / "tmp", 0o1777)
    os.chown(root / "home", 1234, 5678)
    os.setxattr(root / "etc/hello", "user.hostel", b"kept")
    (root / "dev").mkdir()
    os.mknod(root / "dev/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mkfifo(root / "dev/fifo")
    (root / "dangling").symlink_to("/nowhere")
    return root


def test_template_copy_keeps_everything(tmp_path: Path) -> None:
    template = rich_tree(tmp_path / "template")
    target = tmp_path / "machines" / "copy"
    assert populate_from_template(str(template), str(target)) is True
    assert tree_digest(target) == tree_digest(template)
    assert (target / "etc/hardlink").stat().st_ino == (target / "etc/hello").stat().st_ino
    assert (target / "etc/hello").stat().st_ino != (template / "etc/hello").stat().st_ino
    assert [p.name for p in target.parent.iterdir()] == ["copy"]


def test_existing_directory_is_not_populated(tmp_path: Path) -> None:
    template = make_tree(tmp_path / "template", "tmpl")
    target = tmp_path / "existing"
    target.mkdir()
    (target / "mine").write_text("untouched")
    assert populate_from_template(str(template), str(target)) is False
    assert [p.name for p in target.iterdir()] == ["mine"]


def test_failed_copy_leaves_no_partial_tree(tmp_path: Path) -> None:
    template = make_tree(tmp_path / "template", "tmpl")
    (template / "big").write_bytes(os.urandom(2 * MIB))
    small = tmp_path / "small"
    small.mkdir()

    def copy_onto_a_full_disk() -> list[str]:
        native.mount("tmpfs", str(small), "tmpfs", 0, "size=512k")
        try:
            with pytest.raises(RootfsError, match="Couldn't populate .*/small/copy from template"):
                populate_from_template(str(template), str(small / "copy"))
            return os.listdir(small)
        finally:
            native.umount(str(small))

    assert in_private_mount_namespace(copy_onto_a_full_disk) == []


# Ephemeral roots ----------------------------------------------------------------------------

def test_ephemeral_overlay_leaves_the_tree_untouched(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", "eph")
    original = tree_digest(tree)
    runtime = tmp_path / "run" / "machine"
    with EphemeralRoot(str(tree), str(runtime)) as eph:
        assert eph.snapshot_path is None and eph.staging == str(runtime / "ephemeral")
        plan = private_plan()
        root = eph.add_to_plan(plan)
        shell(plan, f"echo changed > {root}/etc/hello && rm {root}/etc/passwd && "
                    f"mkdir {root}/new && echo n > {root}/new/file && "
                    f"cat {root}/etc/hello {root}/new/file && stat -c %a {root}")
        out, status = run_plan(plan)
        assert (out, status) == (b"changed\nn\n755\n", 0)
        assert mounts_under(tmp_path) == []
    assert tree_digest(tree) == original
    assert os.listdir(runtime) == []


def test_check_os_tree_refusals(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgs, match="Spawning container on root directory is not supported. "
                                        "Consider using --ephemeral."):
        check_os_tree("/")
    check_os_tree("/", ephemeral=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidArgs, match=f"Directory {empty} doesn't look like an OS root "
                                        r"directory \(os-release file is missing\). Refusing."):
        check_os_tree(str(empty))
    check_os_tree(str(make_tree(tmp_path / "ok", "ok")))


# btrfs ------------------------------------------------------------------------------------

def test_btrfs_template_and_ephemeral_use_snapshots(tmp_path: Path) -> None:
    need("mkfs.btrfs")
    need("btrfs")
    fs = tmp_path / "btrfs.img"
    with open(fs, "wb") as f:
        f.truncate(128 * MIB)
    run("mkfs.btrfs", "-q", str(fs))
    mnt, sub = tmp_path / "btrfs", tmp_path / "sub"
    mnt.mkdir()
    sub.mkdir()

    def exercise(device: str) -> None:
        native.mount(device, str(mnt), "btrfs")
        try:
            run("btrfs", "subvolume", "create", str(mnt / "tree"))
            make_tree(mnt / "tree", "btr")
            original = tree_digest(mnt / "tree")

            assert populate_from_template(str(mnt / "tree"), str(mnt / "copy")) is True
            assert is_btrfs_subvolume(str(mnt / "copy"))
            assert tree_digest(mnt / "copy") == original

            with EphemeralRoot(str(mnt / "tree"), str(tmp_path / "run")) as eph:
                snap = Path(eph.root)
                assert eph.staging is None and snap.parent == mnt
                assert snap.name.startswith(".#tree") and is_btrfs_subvolume(str(snap))
                (snap / "etc/hello").write_text("changed\n")
                assert read_os_release(str(snap))["ID"] == "hosteltest"
            assert not snap.exists()
            assert tree_digest(mnt / "tree") == original

            native.mount(device, str(sub), "btrfs", 0, "subvol=tree")
            try:
                with EphemeralRoot(str(sub), str(tmp_path / "run")) as eph:
                    assert Path(eph.root).parent == sub and Path(eph.root).name.startswith(".#")
                assert [p.name for p in sub.iterdir() if p.name.startswith(".#")] == []
            finally:
                native.umount(str(sub))
        finally:
            native.umount(str(mnt))

    with LoopDevice(str(fs)) as loop:
        in_private_mount_namespace(lambda: exercise(loop.device))
