"""pool_images on throwaway pool directories: what is an image, which one wins, what
travels with it, and what names are refused."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from hostel.errors import InvalidArgs, NotSupported
from hostel.machine import pool_images, rootfs


def make_pool(base: Path) -> tuple[Path, Path]:
    first, second = base / "first", base / "second"
    for d in (first, second):
        d.mkdir()
    (first / "tree").mkdir()
    (first / "tree/etc").mkdir()
    (first / "tree/etc/hostname").write_text("# comment\nbox-name\n")
    (first / "tree.nspawn").write_text("[Exec]\nBoot=no\n")
    (second / "tree.raw").write_bytes(b"hidden by first/tree")
    (second / "disk.raw").write_bytes(b"x" * 5000)
    (second / ".hidden").mkdir()
    (second / ".#clone-0123").mkdir()
    (second / "notes.txt").write_text("not an image")
    os.mkfifo(second / "fifo.raw")
    return first, second


def test_discover_lists_trees_and_raw_images_first_directory_first(tmp_path: Path) -> None:
    first, second = make_pool(tmp_path)
    images = pool_images.discover([str(first), str(second), str(tmp_path / "absent")])
    assert [(i.name, i.type, i.path) for i in images] == [
        ("disk", "raw", str(second / "disk.raw")), ("tree", "directory", str(first / "tree"))]
    disk = images[0]
    assert disk.limit == disk.limit_exclusive == 5000
    assert disk.usage == (second / "disk.raw").stat().st_blocks * 512
    assert images[1].usage == images[1].limit == pool_images.UNKNOWN
    assert images[1].mtime_us == (first / "tree").stat().st_mtime_ns // 1000


def test_metadata_of_a_tree_and_not_of_a_raw_image(tmp_path: Path) -> None:
    first, second = make_pool(tmp_path)
    tree = pool_images.find("tree", [str(first)])
    assert pool_images.hostname(tree) == "box-name"
    assert pool_images.machine_id(tree) == b""
    (first / "tree/etc/machine-id").write_text("00112233445566778899aabbccddeeff\n")
    assert pool_images.machine_id(tree) == bytes.fromhex("00112233445566778899aabbccddeeff")
    (first / "tree/etc/hostname").unlink()
    (first / "tree/etc/hostname").symlink_to("/etc/hostname")  # resolved inside the tree:
    with pytest.raises(rootfs.RootfsError, match="Too many levels"):  # a loop, not the host's
        pool_images.hostname(tree)
    (first / "tree/etc/hostname").unlink()
    (first / "tree/etc/hostname").symlink_to("../../../../../../etc/inner-name")
    (first / "tree/etc/inner-name").write_text("inner\n")
    assert pool_images.hostname(tree) == "inner"
    with pytest.raises(NotSupported, match="raw disk image"):
        pool_images.os_release(pool_images.find("disk", [str(second)]))


def test_clone_and_rename_carry_the_settings_file(tmp_path: Path) -> None:
    first, second = make_pool(tmp_path)
    dirs = [str(first), str(second)]
    tree = pool_images.find("tree", dirs)
    pool_images.clone(tree, "copy", False, dirs)
    assert (first / "copy/etc/hostname").exists() and (first / "copy.nspawn").exists()
    pool_images.clone(pool_images.find("disk", dirs), "disk2", False, dirs)
    assert (first / "disk2.raw").read_bytes() == b"x" * 5000  # into the first directory
    pool_images.rename(pool_images.find("copy", dirs), "moved", dirs)
    assert (first / "moved").is_dir() and (first / "moved.nspawn").exists()
    assert not (first / "copy").exists() and not (first / "copy.nspawn").exists()
    with pytest.raises(pool_images.ImageExists, match="exists already"):
        pool_images.clone(tree, "disk", False, dirs)  # in another directory: still taken
    pool_images.remove(pool_images.find("moved", dirs))
    assert not (first / "moved").exists() and not (first / "moved.nspawn").exists()
    assert not [p for p in first.iterdir() if p.name.startswith(".#")]


@pytest.mark.parametrize("name", ["", ".x", "a/b", "..", "x.raw", "x.nspawn", "tab\there",
                                  "n" * 252])
def test_bad_new_names(name: str) -> None:
    with pytest.raises(InvalidArgs, match="is invalid"):
        pool_images.check_new_name(name)


def test_busy_names_the_machines(tmp_path: Path) -> None:
    first, _ = make_pool(tmp_path)
    tree = pool_images.find("tree", [str(first)])
    pool_images.refuse_if_busy(tree, [], "remove")
    with pytest.raises(pool_images.ImageBusy, match="in use by running machines a, b"):
        pool_images.refuse_if_busy(tree, ["a", "b"], "remove")
