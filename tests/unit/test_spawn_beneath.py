"""Plan steps on paths inside a container tree stay inside it, whatever the tree's symlinks say.

Each test builds a hostile tree whose links point at a directory standing in
for the host (`host`), runs real steps in a real child (its own mount
namespace), and checks the host directory is untouched while the step
landed in the tree or failed."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from hostel import native
from hostel.spawn import Plan, StepFailed, spawn


def run(plan: Plan) -> None:
    child = spawn(plan, native.CLONE_NEWNS)
    try:
        child.wait_started()
        info = native.pidfd_wait(child.pidfd, block=True)
        assert info is not None and info.exited and info.status == 0, info
    finally:
        child.close()


def snapshot(path: Path) -> dict[str, tuple[int, int]]:
    """Every entry below `path` with its mode and mtime: what "unchanged" means."""
    out = {}
    for entry in [path, *path.rglob("*")]:
        st = entry.lstat()
        out[str(entry)] = (st.st_mode, st.st_mtime_ns)
    return out


@pytest.fixture
def hostile(tmp_path: Path) -> tuple[Path, Path]:
    """(tree, host): the tree's etc -> the host dir (absolute), var -> ../../host (relative)."""
    host = tmp_path / "host"
    host.mkdir()
    (host / "resolv.conf").write_text("host's own\n")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "etc").symlink_to(host)
    (tree / "var").symlink_to("../../host")
    (tree / "run").mkdir()
    (tree / str(host).lstrip("/")).mkdir(parents=True)  # where etc leads, seen in the tree
    (tree / "host").mkdir()  # where ../../host leads: ".." stops at the tree's root
    return tree, host


def confined(tree: Path) -> Plan:
    plan = Plan()
    plan.mount(None, "/", None, native.MS_SLAVE | native.MS_REC)
    plan.confine(str(tree))
    return plan


def test_writes_mkdirs_and_links_through_a_symlinked_etc_stay_in_the_tree(hostile) -> None:
    tree, host = hostile
    before = snapshot(host)
    plan = confined(tree)
    plan.write_file(f"{tree}/etc/resolv.conf", b"nameserver 192.0.2.1\n", best_effort=True)
    plan.mkdir(f"{tree}/etc/created-dir")
    plan.mkdir(f"{tree}/var/created-dir")
    plan.symlink("/x", f"{tree}/var/created-link", best_effort=True)
    plan.mknod(f"{tree}/etc/fifo", 0o10644, 0)
    plan.write_file(f"{tree}/../host/dotdot", b"x")
    plan.unlink(f"{tree}/etc/resolv.conf", best_effort=True)
    run(plan)
    assert snapshot(host) == before
    assert (host / "resolv.conf").read_text() == "host's own\n"
    # The tree's absolute link resolves to the tree's own copy of that path: made there.
    inner = tree / str(host).lstrip("/")
    assert (inner / "created-dir").is_dir() and (inner / "fifo").exists()
    assert (tree / "host" / "created-dir").is_dir()  # ../../host stops at the tree's root
    assert (tree / "host" / "dotdot").read_bytes() == b"x"


def test_a_bind_mount_point_under_a_symlink_is_made_in_the_tree(hostile, tmp_path: Path) -> None:
    tree, host = hostile
    source = tmp_path / "source"
    source.mkdir()
    (source / "marker").write_text("bound\n")
    before = snapshot(host)
    plan = confined(tree)
    plan.mkdir(f"{tree}/etc/mnt")
    plan.bind(str(source), f"{tree}/etc/mnt", readonly=True)
    plan.execve("/bin/sh", ["sh", "-c", f"test -f {tree}{host}/mnt/marker"], [])
    run(plan)
    assert snapshot(host) == before


def test_a_bind_source_inside_the_tree_is_resolved_in_the_tree(hostile, tmp_path: Path) -> None:
    """Binding the tree's /usr (as --volatile=yes does) must not bind the host's dir instead."""
    tree, host = hostile
    (tree / "usr").symlink_to(host)  # absolute: on the host that is `host`
    staging = tmp_path / "staging"
    staging.mkdir()
    plan = confined(tree)
    plan.bind(f"{tree}/usr", str(staging), readonly=True)
    plan.execve("/bin/sh", ["sh", "-c", f"test ! -e {staging}/resolv.conf"], [])
    run(plan)


def test_an_existing_fifo_or_device_is_not_written(hostile) -> None:
    tree, _host = hostile
    os.mkfifo(tree / "run" / "hostname")
    for path in ("run/hostname", "run/null"):
        if path == "run/null":
            os.mknod(tree / path, 0o20666, os.makedev(1, 3))
        plan = confined(tree)
        plan.write_file(f"{tree}/{path}", b"x\n")
        child = spawn(plan, native.CLONE_NEWNS)
        try:
            with pytest.raises(StepFailed) as failed:
                child.wait_started()  # returns: a blocking open would hang here
        finally:
            child.close()
        assert failed.value.errno == errno.EINVAL
        assert f"write {tree}/{path}" in str(failed.value)


def test_a_symlinked_file_is_not_written_through(hostile) -> None:
    tree, host = hostile
    (tree / "run" / "machine-id").symlink_to(host / "resolv.conf")
    plan = confined(tree)
    plan.write_file(f"{tree}/run/machine-id", b"0" * 32)
    child = spawn(plan, native.CLONE_NEWNS)
    try:
        with pytest.raises(StepFailed) as failed:
            child.wait_started()
    finally:
        child.close()
    assert failed.value.errno == errno.ELOOP
    assert (host / "resolv.conf").read_text() == "host's own\n"


def test_confinement_ends_where_the_child_enters_its_root(tmp_path: Path) -> None:
    plan = Plan()
    plan.confine(str(tmp_path))
    plan.mkdir(f"{tmp_path}/inside")
    plan.chroot(".")
    plan.mkdir(f"{tmp_path}/after")
    assert plan.steps[0].root == str(tmp_path) and plan.steps[0].path == "inside"
    assert plan.steps[2].root is None and plan.steps[2].path == f"{tmp_path}/after"
