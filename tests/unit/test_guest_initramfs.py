"""hostel.guest.initramfs on Debian's real cloud kernel (make setup's cache).

The archive is read back twice: by busybox cpio (the kernel's format, someone
else's reader) and by a reader here; the module order is checked against a
modules.dep made by the real depmod from the same modules, which works from
symbol tables rather than the .modinfo entries the builder reads."""
from __future__ import annotations

import lzma
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from hostel.guest import initramfs
from hostel.guest.errors import BadKernel, GuestError
from hostel.guest.initramfs import Kernel, read_kernel

CLOUD = initramfs.KERNEL_CACHE / initramfs.DEFAULT_FLAVOUR
# What the guest needs that Debian's cloud kernel builds as modules, and the
# helpers depmod says they pull in.
EXPECTED = {"virtio_mmio", "virtio_blk", "virtio_console", "squashfs", "overlay", "virtio_net",
            "virtio_rng", "virtio", "virtio_ring", "net_failover", "failover"}


@pytest.fixture(scope="module")
def cloud() -> Kernel:
    assert (CLOUD / "version").exists(), f"no kernel in {CLOUD}: run 'make setup'"
    return read_kernel(CLOUD)


def fake_init(path: Path, marker: bytes = b"") -> Path:
    """An ELF file standing in for the init (the builder only copies it)."""
    path.write_bytes(Path("/bin/busybox").read_bytes() + marker)
    return path


def read_newc(data: bytes) -> list[dict]:
    """An independent newc reader: every member's name, mode, rdev and data."""
    members, offset = [], 0
    while True:
        header = data[offset:offset + 110]
        assert header[:6] == b"070701", f"bad magic at {offset}"
        fields = [int(header[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = fields[11], fields[6]
        name_start = offset + 110
        name = data[name_start:name_start + namesize - 1].decode()
        data_start = name_start + namesize + (-(110 + namesize) % 4)
        body = data[data_start:data_start + filesize]
        offset = data_start + filesize + (-filesize % 4)
        if name == "TRAILER!!!":
            assert offset == len(data)
            return members
        members.append({"name": name, "mode": fields[1], "rdev": (fields[9], fields[10]),
                        "data": body, "uid": fields[2], "gid": fields[3]})


@pytest.fixture(scope="module")
def depmod_dep(cloud: Kernel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """modules.dep as depmod writes it for the cloud kernel, keyed by module name."""
    base = tmp_path_factory.mktemp("depmod")
    tree = base / "lib/modules" / cloud.version
    tree.mkdir(parents=True)
    (tree / "kernel").symlink_to(cloud.modules / "kernel")
    for name in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        shutil.copy(cloud.modules / name, tree / name)
    subprocess.run(["depmod", "-b", str(base), cloud.version], check=True)
    deps = {}
    for line in (tree / "modules.dep").read_text().splitlines():
        module, _, rest = line.partition(":")
        deps[initramfs.module_name(module)] = [initramfs.module_name(d) for d in rest.split()]
    return deps


def _assert_dependency_order(names: list[str], deps: dict[str, list[str]]) -> None:
    for position, name in enumerate(names):
        for dep in deps[name]:
            assert dep in names[:position], f"{name} is loaded before its dependency {dep}"


def test_archive_holds_the_init_and_the_needed_modules_in_order(
        cloud: Kernel, depmod_dep: dict[str, list[str]], tmp_path: Path) -> None:
    init = fake_init(tmp_path / "init")
    path = initramfs.build_initramfs(cloud, init, tmp_path / "cache")
    assert path.parent == tmp_path / "cache" and path.name.startswith(cloud.version + "-")
    members = {m["name"]: m for m in read_newc(path.read_bytes())}

    assert members["init"]["data"] == init.read_bytes()
    assert members["init"]["mode"] == stat.S_IFREG | 0o755
    assert members["dev/console"]["mode"] == stat.S_IFCHR | 0o600
    assert members["dev/console"]["rdev"] == (5, 1)
    assert all(m["uid"] == 0 and m["gid"] == 0 for m in members.values())
    listed = members[initramfs.LOAD_LIST]["data"].decode().splitlines()
    names = [Path(p).name.split("-", 1)[1][:-3] for p in listed]
    assert set(names) == EXPECTED and len(names) == len(EXPECTED)
    _assert_dependency_order(names, depmod_dep)
    for line in listed:
        module = members[line.lstrip("/")]["data"]
        assert module[:4] == b"\x7fELF"
        name = Path(line).name.split("-", 1)[1][:-3]
        source = next(cloud.modules.rglob(f"{name.replace('_', '?')}.ko"))
        assert module == source.read_bytes()

    extracted = tmp_path / "extracted"
    extracted.mkdir()
    with path.open("rb") as archive:
        subprocess.run(["busybox", "cpio", "-i", "-d", "-m"], stdin=archive, cwd=extracted,
                       check=True, capture_output=True)
    assert (extracted / "init").read_bytes() == init.read_bytes()
    assert os.access(extracted / "init", os.X_OK)
    assert stat.S_ISCHR((extracted / "dev/console").stat().st_mode)
    assert [p for p in listed if not (extracted / p.lstrip("/")).is_file()] == []


def test_modules_dep_is_followed_when_present(cloud: Kernel, depmod_dep: dict[str, list[str]],
                                              tmp_path: Path) -> None:
    """A kernel with modules.dep gets its order from there, not from .modinfo."""
    kernel = _kernel_copy(cloud, tmp_path / "k")
    rest = " ".join(sorted({f"kernel/x/{d}.ko" for d in ("failover", "virtio")}))
    lines = [f"kernel/drivers/net/virtio_net.ko: {rest}", "kernel/x/failover.ko:",
             "kernel/x/virtio.ko:"]
    (kernel.modules / "modules.dep").write_text("\n".join(lines) + "\n")
    order = [m.name for m in initramfs.resolve_modules(kernel, ["virtio_net"])]
    assert order == ["failover", "virtio", "virtio_net"]   # net_failover: not in this modules.dep

    real = tmp_path / "real"
    kernel = _kernel_copy(cloud, real)
    (kernel.modules / "modules.dep").write_text("".join(
        f"{name}: {' '.join(deps)}\n" for name, deps in depmod_dep.items()))
    from_dep = [m.name for m in initramfs.resolve_modules(kernel, initramfs.check_kernel(kernel))]
    from_modinfo = [m.name for m in
                    initramfs.resolve_modules(cloud, initramfs.check_kernel(cloud))]
    assert set(from_dep) == set(from_modinfo) == EXPECTED
    _assert_dependency_order(from_dep, depmod_dep)


def _kernel_copy(cloud: Kernel, where: Path, config: str | None = None) -> Kernel:
    """A kernel directory sharing the cloud kernel's module files, with its own config."""
    modules = where / "modules"
    modules.mkdir(parents=True)
    (modules / "kernel").symlink_to(cloud.modules / "kernel")
    (where / "vmlinuz").symlink_to(cloud.vmlinuz)
    (where / "config").write_text(cloud.config_path.read_text() if config is None else config)
    (where / "version").write_text(cloud.version + "\n")
    return read_kernel(where)


def test_cache_hit_and_miss(cloud: Kernel, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    init = fake_init(tmp_path / "init")
    first = initramfs.build_initramfs(cloud, init, cache)
    before = first.stat()
    again = initramfs.build_initramfs(cloud, init, cache)
    assert again == first
    after = again.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), "rebuilt"
    other = initramfs.build_initramfs(cloud, fake_init(tmp_path / "init2", b"other"), cache)
    assert other != first and other.exists() and first.exists()
    assert sorted(p.name for p in cache.iterdir()) == sorted([first.name, other.name])


@pytest.mark.parametrize("option,needle", [
    ("CONFIG_ACPI", "CONFIG_ACPI (ACPI, through which"),
    ("CONFIG_VIRTIO_MMIO", "CONFIG_VIRTIO_MMIO (virtio-mmio transport)"),
    ("CONFIG_SQUASHFS", "CONFIG_SQUASHFS (squashfs"),
    ("CONFIG_SQUASHFS_ZLIB", "CONFIG_SQUASHFS_ZLIB (gzip-compressed squashfs"),
    ("CONFIG_OVERLAY_FS", "CONFIG_OVERLAY_FS (overlayfs"),
    ("CONFIG_DEVTMPFS", "CONFIG_DEVTMPFS (devtmpfs"),
    ("CONFIG_BLK_DEV_INITRD", "CONFIG_BLK_DEV_INITRD (initramfs support)"),
])
def test_a_kernel_lacking_a_piece_is_refused_by_name(cloud: Kernel, tmp_path: Path, option: str,
                                                     needle: str) -> None:
    config = "\n".join(f"# {option} is not set" if line.startswith(f"{option}=") else line
                       for line in cloud.config_path.read_text().splitlines())
    kernel = _kernel_copy(cloud, tmp_path / "k", config)
    with pytest.raises(BadKernel) as raised:
        initramfs.build_initramfs(kernel, fake_init(tmp_path / "init"), tmp_path / "cache")
    message = str(raised.value)
    assert needle in message and cloud.version in message and f"{option}=y" in message, message
    assert not (tmp_path / "cache").exists()


def test_builtin_options_need_no_module(cloud: Kernel, tmp_path: Path) -> None:
    """=y means built in: nothing to load; an optional piece left out is just left out."""
    config = cloud.config_path.read_text()
    config = config.replace("CONFIG_OVERLAY_FS=m", "CONFIG_OVERLAY_FS=y")
    config = config.replace("CONFIG_HW_RANDOM_VIRTIO=m", "# CONFIG_HW_RANDOM_VIRTIO is not set")
    kernel = _kernel_copy(cloud, tmp_path / "k", config)
    names = [m.name for m in initramfs.resolve_modules(kernel, initramfs.check_kernel(kernel))]
    assert "overlay" not in names and "virtio_rng" not in names and "virtio_blk" in names


def test_a_missing_module_file_is_named(cloud: Kernel, tmp_path: Path) -> None:
    where = tmp_path / "k"
    (where / "modules/kernel").mkdir(parents=True)
    for path in (cloud.modules / "kernel/drivers/virtio").iterdir():
        (where / "modules/kernel" / path.name).symlink_to(path)
    (where / "vmlinuz").symlink_to(cloud.vmlinuz)
    shutil.copy(cloud.config_path, where / "config")
    (where / "version").write_text(cloud.version)
    with pytest.raises(BadKernel, match="has no module virtio_blk in .*modules directory complete"):
        initramfs.resolve_modules(read_kernel(where), ["virtio_mmio", "virtio_blk"])


def test_compressed_modules_are_stored_decompressed(cloud: Kernel, tmp_path: Path) -> None:
    where = tmp_path / "k"
    target = where / "modules/kernel/drivers/virtio"
    target.mkdir(parents=True)
    for name in ("virtio", "virtio_ring", "virtio_mmio"):
        (target / f"{name}.ko.xz").write_bytes(lzma.compress(
            (cloud.modules / f"kernel/drivers/virtio/{name}.ko").read_bytes(),
            format=lzma.FORMAT_XZ))
    (where / "vmlinuz").symlink_to(cloud.vmlinuz)
    shutil.copy(cloud.config_path, where / "config")
    (where / "version").write_text(cloud.version)
    modules = initramfs.resolve_modules(read_kernel(where), ["virtio_mmio"])
    assert [m.name for m in modules] == ["virtio_ring", "virtio", "virtio_mmio"]
    for module in modules:
        source = cloud.modules / f"kernel/drivers/virtio/{module.name}.ko"
        assert module.data == source.read_bytes()


@pytest.mark.parametrize("data,needle", [
    (b"", "not a 64-bit little-endian ELF"),
    (b"\x7fELF\x01\x01" + b"\0" * 100, "not a 64-bit little-endian ELF"),
    (b"\x7fELF\x02\x01" + b"\0" * 0x22 + (10**6).to_bytes(8, "little") + b"\0" * 10
     + b"\x40\x00\x05\x00\x01\x00" + b"\0" * 10, "section headers lie outside"),
])
def test_a_malformed_module_is_refused(data: bytes, needle: str) -> None:
    with pytest.raises(BadKernel, match=needle):
        initramfs.modinfo_depends(data, "bad.ko")


def test_truncated_real_module_is_refused(cloud: Kernel) -> None:
    data = (cloud.modules / "kernel/drivers/virtio/virtio_mmio.ko").read_bytes()
    assert initramfs.modinfo_depends(data, "virtio_mmio.ko") != []
    with pytest.raises(BadKernel, match="outside the file"):
        initramfs.modinfo_depends(data[: len(data) // 2], "virtio_mmio.ko")


def test_missing_init_says_how_to_build_it(cloud: Kernel, tmp_path: Path) -> None:
    with pytest.raises(GuestError, match="make guest-init"):
        initramfs.build_initramfs(cloud, tmp_path / "no-init", tmp_path / "cache")


def test_find_kernel_prefers_an_installed_one(cloud: Kernel, tmp_path: Path) -> None:
    root = tmp_path / "root"
    with pytest.raises(BadKernel, match="run 'make setup'"):
        initramfs.find_kernel(cache=tmp_path / "empty", root=root)
    assert initramfs.find_kernel(root=root).version == cloud.version   # from the cache
    (root / "boot").mkdir(parents=True)
    version = "6.1.0-99-cloud-amd64"
    (root / f"boot/vmlinuz-{version}").symlink_to(cloud.vmlinuz)
    shutil.copy(cloud.config_path, root / f"boot/config-{version}")
    (root / "lib/modules" / version).mkdir(parents=True)
    found = initramfs.find_kernel(root=root)
    assert found.version == version and found.modules == root / "lib/modules" / version
    assert found.option("CONFIG_ACPI") == "y"


def test_kernel_at_accepts_the_layouts_it_can_read(cloud: Kernel, tmp_path: Path) -> None:
    assert initramfs.kernel_at(CLOUD).version == cloud.version
    assert initramfs.kernel_at(CLOUD / "vmlinuz").modules == cloud.modules
    root = tmp_path / "root"
    version = "6.1.0-98-cloud-amd64"
    (root / "boot").mkdir(parents=True)
    (root / f"boot/vmlinuz-{version}").symlink_to(cloud.vmlinuz)
    shutil.copy(cloud.config_path, root / f"boot/config-{version}")
    (root / "lib/modules" / version).mkdir(parents=True)
    assert initramfs.kernel_at(root / f"boot/vmlinuz-{version}").modules == \
        root / "lib/modules" / version
    (root / f"boot/config-{version}").unlink()
    with pytest.raises(BadKernel, match=f"installed without {root}/boot/config-{version}"):
        initramfs.kernel_at(root / f"boot/vmlinuz-{version}")
    bare = tmp_path / "bzImage"
    bare.symlink_to(cloud.vmlinuz)
    with pytest.raises(BadKernel, match="cannot tell which configuration and modules go with"):
        initramfs.kernel_at(bare)
