"""Dissecting real images built with mkfs, sfdisk and cryptsetup; os-release and
in-tree file resolution. Nothing here attaches a loop device or mounts.

The image builders are imported by tests/integration/test_machine_rootfs.py."""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from hostel.machine import image
from hostel.machine.image import (GPT_HOME, GPT_ROOT_X86, GPT_ROOT_X86_64, GPT_SRV,
                                  PER_LINUX32, ImageError, dissect, probe_filesystem)
from hostel.machine.rootfs import (RootfsError, open_in_root, parse_os_release,
                                   read_file_in_root, read_os_release)

MIB = 1 << 20
SECTOR = 512
OS_RELEASE = 'NAME="Hostel Test"\nID=hosteltest\nVERSION_ID=1\n'


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (Debian: see the Makefile's APT_PACKAGES)")
    return path


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=120)


def make_tree(root: Path, name: str) -> Path:
    """A minimal OS tree: os-release behind a relative symlink, passwd, a marker file."""
    (root / "etc").mkdir(parents=True)
    (root / "usr/lib").mkdir(parents=True)
    (root / "home").mkdir()
    (root / "srv").mkdir()
    (root / "usr/lib/os-release").write_text(OS_RELEASE)
    (root / "etc/os-release").symlink_to("../usr/lib/os-release")
    (root / "etc/passwd").write_text(f"root:x:0:0:root:/root:/bin/sh\n{name}:x:1000:1000::/home/{name}:/bin/sh\n")
    (root / "etc/hello").write_text(f"hello from {name}\n")
    return root


def make_ext4(path: Path, source: Path, size_mib: int = 8) -> Path:
    need("mkfs.ext4")
    run("mkfs.ext4", "-q", "-F", "-d", str(source), str(path), f"{size_mib}M")
    return path


@dataclass
class Part:
    type_uuid: uuid.UUID
    size_mib: int
    content: Path | None = None      # a filesystem image to copy into the partition
    attrs: str = ""                  # sfdisk syntax, e.g. "GUID:60"


def make_gpt(path: Path, parts: list[Part]) -> Path:
    """A GPT disk written by sfdisk, each partition filled from its filesystem image."""
    need("sfdisk")
    total = sum(p.size_mib for p in parts) + 2
    with open(path, "wb") as f:
        f.truncate(total * MIB)
    lines = ["label: gpt"]
    for i, p in enumerate(parts):
        start = "start=2048, " if i == 0 else ""
        attrs = f', attrs="{p.attrs}"' if p.attrs else ""
        lines.append(f"{start}size={p.size_mib * MIB // SECTOR}, type={p.type_uuid}{attrs}")
    subprocess.run(["sfdisk", "-q", str(path)], input="\n".join(lines) + "\n", text=True,
                   check=True, capture_output=True, timeout=60)
    offset = MIB
    with open(path, "r+b") as disk:
        for p in parts:
            if p.content is not None:
                disk.seek(offset)
                disk.write(p.content.read_bytes())
            offset += p.size_mib * MIB
    return path


def make_luks(path: Path, size_mib: int, luks_type: str = "luks2") -> Path:
    need("cryptsetup")
    key = path.with_suffix(".key")
    key.write_bytes(b"hostel-test-key")
    with open(path, "wb") as f:
        f.truncate(size_mib * MIB)
    run("cryptsetup", "luksFormat", "--batch-mode", "--type", luks_type, "--pbkdf", "pbkdf2",
        "--pbkdf-force-iterations", "1000", "--key-file", str(key), str(path))
    return path


def ext4_from_tree(tmp_path: Path, name: str, size_mib: int = 8) -> Path:
    return make_ext4(tmp_path / f"{name}.ext4", make_tree(tmp_path / f"{name}-tree", name), size_mib)


def standard_gpt(tmp_path: Path, root_attrs: str = "") -> Path:
    """root + home + srv, each ext4 with a file of its own."""
    home, srv = tmp_path / "home-tree", tmp_path / "srv-tree"
    home.mkdir()
    srv.mkdir()
    (home / "h").write_text("home partition\n")
    (srv / "s").write_text("srv partition\n")
    return make_gpt(tmp_path / "disk.img", [
        Part(GPT_ROOT_X86_64, 8, ext4_from_tree(tmp_path, "root"), root_attrs),
        Part(GPT_HOME, 4, make_ext4(tmp_path / "home.ext4", home, 4)),
        Part(GPT_SRV, 4, make_ext4(tmp_path / "srv.ext4", srv, 4)),
    ])


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        value = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([value ^ 0xFF]))


# Bare filesystems ------------------------------------------------------------------

def test_bare_ext4_image_is_its_own_root(tmp_path: Path) -> None:
    path = ext4_from_tree(tmp_path, "bare")
    d = dissect(str(path))
    assert d.partition_table is None and not d.is_block_device
    assert (d.root.mount_point, d.root.fstype, d.root.offset, d.root.size) == ("/", "ext4", 0, 8 * MIB)
    assert (d.home, d.srv, d.personality, d.root.read_only) == (None, None, None, False)


@pytest.mark.parametrize("tool,args,size_mib,expected", [
    ("mkfs.ext2", ["-q", "-F"], 4, "ext2"),
    ("mkfs.ext3", ["-q", "-F"], 4, "ext3"),
    ("mkfs.vfat", [], 4, "vfat"),
    ("mkfs.xfs", ["-q", "-f"], 300, "xfs"),
    ("mkfs.btrfs", ["-q", "-f"], 120, "btrfs"),
])
def test_filesystem_type_comes_from_the_superblock(tmp_path: Path, tool: str, args: list[str],
                                                   size_mib: int, expected: str) -> None:
    need(tool)
    path = tmp_path / "fs.img"
    with open(path, "wb") as f:
        f.truncate(size_mib * MIB)
    run(tool, *args, str(path))
    assert dissect(str(path)).root.fstype == expected


def test_squashfs_is_read_only(tmp_path: Path) -> None:
    need("mksquashfs")
    path = tmp_path / "root.squashfs"
    run("mksquashfs", str(make_tree(tmp_path / "tree", "sq")), str(path), "-quiet", "-noappend")
    root = dissect(str(path)).root
    assert (root.fstype, root.read_only) == ("squashfs", True)


def test_probe_knows_nothing_of_zeros() -> None:
    assert probe_filesystem(bytes(0x11000)) is None


# GPT disks ---------------------------------------------------------------------------

def test_gpt_with_root_home_and_srv(tmp_path: Path) -> None:
    d = dissect(str(standard_gpt(tmp_path)))
    assert d.partition_table == "gpt"
    assert [(p.mount_point, p.number, p.fstype, p.offset, p.size, p.read_only)
            for p in d.partitions] == [
        ("/", 1, "ext4", MIB, 8 * MIB, False),
        ("/home", 2, "ext4", 9 * MIB, 4 * MIB, False),
        ("/srv", 3, "ext4", 13 * MIB, 4 * MIB, False),
    ]
    assert d.root.type_uuid == GPT_ROOT_X86_64 and d.personality is None


def test_read_only_attribute_makes_the_root_read_only(tmp_path: Path) -> None:
    d = dissect(str(standard_gpt(tmp_path, root_attrs="GUID:60")))
    assert d.root.read_only
    assert not d.home.read_only


def test_lowest_numbered_root_wins_and_no_auto_is_skipped(tmp_path: Path) -> None:
    fs = ext4_from_tree(tmp_path, "r", 4)
    path = make_gpt(tmp_path / "two-roots.img", [
        Part(GPT_ROOT_X86_64, 4, fs, "GUID:63"),
        Part(GPT_ROOT_X86_64, 4, fs),
        Part(GPT_ROOT_X86_64, 4, fs),
    ])
    assert dissect(str(path)).root.number == 2


def test_secondary_architecture_root_needs_per_linux32(tmp_path: Path) -> None:
    if image.platform.machine() != "x86_64":
        pytest.skip("the secondary-architecture table under test is x86-64's")
    path = make_gpt(tmp_path / "x86.img", [Part(GPT_ROOT_X86, 4, ext4_from_tree(tmp_path, "r", 4))])
    d = dissect(str(path))
    assert (d.root.type_uuid, d.personality) == (GPT_ROOT_X86, PER_LINUX32)


def test_gpt_without_root_names_the_specification(tmp_path: Path) -> None:
    path = make_gpt(tmp_path / "noroot.img", [Part(GPT_HOME, 4, ext4_from_tree(tmp_path, "h", 4))])
    with pytest.raises(ImageError, match="Failed to identify root partition in disk image "
                                         f"{path}.*Discoverable Partitions Specification"):
        dissect(str(path))


def test_mbr_disk_is_refused(tmp_path: Path) -> None:
    need("sfdisk")
    path = tmp_path / "mbr.img"
    with open(path, "wb") as f:
        f.truncate(8 * MIB)
    subprocess.run(["sfdisk", "-q", str(path)], input="label: dos\nstart=2048, type=83\n",
                   text=True, check=True, capture_output=True)
    with pytest.raises(ImageError, match=f"Image {path} does not carry a GUID Partition Table.*"
                                         "Discoverable Partitions"):
        dissect(str(path))


def test_unknown_content_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "zeros.img"
    path.write_bytes(bytes(MIB))
    with pytest.raises(ImageError, match="Failed to identify any partition table or file system"):
        dissect(str(path))


def test_partition_without_a_known_filesystem_is_refused(tmp_path: Path) -> None:
    path = make_gpt(tmp_path / "blank.img", [Part(GPT_ROOT_X86_64, 4)])
    with pytest.raises(ImageError, match="Cannot determine the file system type of partition 1 "):
        dissect(str(path))


def test_bare_luks_image_is_refused(tmp_path: Path) -> None:
    path = make_luks(tmp_path / "luks.img", 20)
    with pytest.raises(ImageError, match="crypto_LUKS.*not supported"):
        dissect(str(path))


def test_luks_root_partition_is_refused(tmp_path: Path) -> None:
    luks = make_luks(tmp_path / "part.luks", 4, "luks1")
    path = make_gpt(tmp_path / "luksdisk.img", [Part(GPT_ROOT_X86_64, 4, luks)])
    with pytest.raises(ImageError, match="Partition 1 \\(/\\) of .* is crypto_LUKS encrypted"):
        dissect(str(path))


def test_corrupt_primary_gpt_falls_back_to_the_backup(tmp_path: Path) -> None:
    path = standard_gpt(tmp_path)
    flip_byte(path, SECTOR + 60)  # inside the disk GUID: header CRC no longer matches
    assert dissect(str(path)).root.number == 1


def test_corrupt_primary_and_backup_gpt_is_refused(tmp_path: Path) -> None:
    path = standard_gpt(tmp_path)
    flip_byte(path, SECTOR + 60)
    flip_byte(path, path.stat().st_size - SECTOR + 60)
    with pytest.raises(ImageError, match="no valid GUID Partition Table: primary GPT header "
                                         "CRC32 mismatch; backup GPT header CRC32 mismatch"):
        dissect(str(path))


def test_corrupt_partition_entries_are_detected(tmp_path: Path) -> None:
    path = standard_gpt(tmp_path)
    flip_byte(path, 2 * SECTOR + 40)  # first_lba of entry 1, primary array
    entries_lba = struct.unpack_from("<Q", path.read_bytes()[-SECTOR:], 72)[0]
    flip_byte(path, entries_lba * SECTOR + 40)
    with pytest.raises(ImageError, match="primary GPT partition entry array CRC32 mismatch"):
        dissect(str(path))


def test_truncated_gpt_image_is_refused(tmp_path: Path) -> None:
    path = standard_gpt(tmp_path)
    os.truncate(path, 12 * MIB)
    with pytest.raises(ImageError, match="partition 2 ends beyond the end of the image.*truncated"):
        dissect(str(path))


def test_neither_file_nor_block_device_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=f"{tmp_path} is not a regular file or block device"):
        dissect(str(tmp_path))
    with pytest.raises(ImageError, match="Failed to open image .*missing.img: No such file"):
        dissect(str(tmp_path / "missing.img"))


# os-release and in-tree resolution ---------------------------------------------------

def test_os_release_quoting() -> None:
    text = ("# comment\n"
            "NAME=\"Debian GNU/Linux\"\n"
            "PRETTY='single $quoted'\n"
            "ESC=\"a \\\"b\\\" \\$c \\\\ \\n\"\n"
            "BARE=plain\\ word\n"
            "\n"
            "not a line\n"
            "9BAD=x\n"
            "EMPTY=\n")
    assert parse_os_release(text) == {
        "NAME": "Debian GNU/Linux",
        "PRETTY": "single $quoted",
        "ESC": 'a "b" $c \\ \\n',
        "BARE": "plain word",
        "EMPTY": "",
    }


def test_read_os_release_follows_symlinks_inside_the_tree(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "t", "t")
    assert read_os_release(str(root)) == {"NAME": "Hostel Test", "ID": "hosteltest",
                                          "VERSION_ID": "1"}
    (root / "etc/os-release").unlink()
    (root / "etc/os-release").symlink_to("/usr/lib/os-release")  # absolute: the tree's, not ours
    assert read_os_release(str(root))["ID"] == "hosteltest"


def test_symlinks_cannot_leave_the_tree(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "t", "inside")
    (root / "abs").symlink_to("/etc/passwd")
    (root / "rel").symlink_to("../../../../../../../../etc/passwd")
    (root / "etc/dots").symlink_to("../../..")
    own = (root / "etc/passwd").read_bytes()
    assert b"inside" in own
    for path in ("abs", "rel", "etc/dots/etc/passwd", "/../etc/passwd"):
        assert read_file_in_root(str(root), path) == own, path
    assert read_file_in_root(str(root), "etc/missing") is None
    assert read_file_in_root(str(root), "etc/passwd/below") is None


def test_symlink_loops_and_special_files_are_refused(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "t", "t")
    (root / "a").symlink_to("b")
    (root / "b").symlink_to("a")
    with pytest.raises(RootfsError, match="Cannot open a in .*: Too many levels of symbolic links"):
        read_file_in_root(str(root), "a")
    os.mkfifo(root / "fifo")
    with pytest.raises(RootfsError, match="fifo in .* is not a regular file"):
        read_file_in_root(str(root), "fifo")
    (root / "big").write_bytes(bytes(100))
    with pytest.raises(RootfsError, match="larger than 10 bytes"):
        read_file_in_root(str(root), "big", max_size=10)
    fd = open_in_root(str(root), "etc/../usr/lib")
    try:
        assert os.path.samestat(os.fstat(fd), os.stat(root / "usr/lib"))
    finally:
        os.close(fd)
