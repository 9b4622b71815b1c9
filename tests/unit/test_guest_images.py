"""Image import: docker-save archives and OCI layouts, built here from busybox-static.

The builders at the top are also used by the integration tests (no registry
is reachable, so every image a test runs is made by these functions)."""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from hostel import native
from hostel.bus import AlreadyExists, InvalidArgs, NoSuchObject
from hostel.guest.images import CorruptImage, ImageStore, default_name
from hostel.machine.loop import LoopDevice

BUSYBOX = "/bin/busybox"
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
PASSWD = b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n"
GROUP = b"root:x:0:\nuser:x:1000:\n"


# Layers -----------------------------------------------------------------------------------

@dataclass
class Layer:
    """A layer tarball under construction: members in the order they are added."""

    members: list[tuple[tarfile.TarInfo, bytes | None]] = field(default_factory=list)

    def _add(self, name: str, kind: bytes, mode: int, data: bytes | None = None,
             **attrs: object) -> Layer:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.mtime = kind, mode, 1_700_000_000
        info.size = len(data) if data is not None else 0
        for key, value in attrs.items():
            setattr(info, key, value)
        self.members.append((info, data))
        return self

    def dir(self, name: str, mode: int = 0o755, **attrs: object) -> Layer:
        return self._add(name, tarfile.DIRTYPE, mode, **attrs)

    def file(self, name: str, data: bytes, mode: int = 0o644, xattrs: dict[str, str] | None = None,
             **attrs: object) -> Layer:
        pax = {f"SCHILY.xattr.{k}": v for k, v in (xattrs or {}).items()}
        return self._add(name, tarfile.REGTYPE, mode, data, pax_headers=pax, **attrs)

    def symlink(self, name: str, target: str) -> Layer:
        return self._add(name, tarfile.SYMTYPE, 0o777, linkname=target)

    def hardlink(self, name: str, target: str) -> Layer:
        return self._add(name, tarfile.LNKTYPE, 0o644, linkname=target)

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o666) -> Layer:
        return self._add(name, tarfile.CHRTYPE, mode, devmajor=major, devminor=minor)

    def fifo(self, name: str) -> Layer:
        return self._add(name, tarfile.FIFOTYPE, 0o644)

    def whiteout(self, path: str) -> Layer:
        head, _, base = path.rpartition("/")
        return self._add(f"{head}/.wh.{base}" if head else f".wh.{base}", tarfile.REGTYPE, 0o644, b"")

    def opaque(self, directory: str) -> Layer:
        return self._add(f"{directory}/.wh..wh..opq", tarfile.REGTYPE, 0o644, b"")

    def tar(self) -> bytes:
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for info, data in self.members:
                tar.addfile(info, io.BytesIO(data) if data is not None else None)
        return out.getvalue()


def busybox_layer(applets: tuple[str, ...] = ()) -> Layer:
    """A root with busybox-static and a symlink per applet (all of them by default)."""
    names = applets or tuple(os.popen(f"{BUSYBOX} --list").read().split())
    layer = Layer()
    for directory in ("bin", "etc", "home", "root", "tmp", "usr", "usr/bin", "srv"):
        layer.dir(directory, 0o1777 if directory == "tmp" else 0o755)
    layer.dir("home/user", 0o755, uid=1000, gid=1000)
    layer.file("bin/busybox", Path(BUSYBOX).read_bytes(), 0o755)
    for applet in names:
        if applet != "busybox":
            layer.symlink(f"bin/{applet}", "busybox")
    layer.file("etc/passwd", PASSWD).file("etc/group", GROUP)
    return layer


def image_config(layers: list[bytes], **config: object) -> dict:
    return {"architecture": "amd64", "os": "linux",
            "config": {"Env": [f"PATH={PATH}"], "Cmd": ["sh"], **config},
            "rootfs": {"type": "layers",
                       "diff_ids": [f"sha256:{hashlib.sha256(t).hexdigest()}" for t in layers]}}


def _hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_tar(path: Path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))


def docker_archive(path: Path, layers: list[bytes], config: dict | None = None,
                   tag: str = "hostel/busybox:test") -> Path:
    """A legacy `docker save` tar: <id>/layer.tar, <config digest>.json, manifest.json."""
    config_bytes = json.dumps(config or image_config(layers)).encode()
    files = {}
    names = []
    for number, tar in enumerate(layers):
        name = f"{_hex(tar + bytes([number]))}/layer.tar"
        files[name] = tar
        names.append(name)
    files[f"{_hex(config_bytes)}.json"] = config_bytes
    files["manifest.json"] = json.dumps([{"Config": f"{_hex(config_bytes)}.json",
                                          "RepoTags": [tag], "Layers": names}]).encode()
    _write_tar(path, files)
    return path


def oci_layout(path: Path, layers: list[bytes], config: dict | None = None, *,
               compress: bool = True, as_tar: bool = False, tag: str = "test") -> Path:
    """An OCI image layout (a directory, or a tar of one) with gzip or plain layers."""
    blobs: dict[str, bytes] = {}

    def blob(data: bytes, media_type: str) -> dict:
        blobs[f"blobs/sha256/{_hex(data)}"] = data
        return {"mediaType": media_type, "digest": f"sha256:{_hex(data)}", "size": len(data)}

    stored = [gzip.compress(t, mtime=0) if compress else t for t in layers]
    kind = "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if compress else "")
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": blob(json.dumps(config or image_config(layers)).encode(),
                               "application/vnd.oci.image.config.v1+json"),
                "layers": [blob(s, kind) for s in stored]}
    top = blob(json.dumps(manifest).encode(), manifest["mediaType"])
    top["annotations"] = {"org.opencontainers.image.ref.name": tag}
    files = {"oci-layout": b'{"imageLayoutVersion": "1.0.0"}',
             "index.json": json.dumps({"schemaVersion": 2, "manifests": [top]}).encode(), **blobs}
    if as_tar:
        _write_tar(path, files)
    else:
        for name, data in files.items():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            (path / name).write_bytes(data)
    return path


def multi_layer_image() -> list[bytes]:
    """Three layers that add, delete, replace, hide (opaque) and link files."""
    base = busybox_layer(("sh", "cat", "echo", "ls", "env", "pwd", "id", "hostname", "ip",
                          "sleep", "touch", "mkdir", "test", "true", "false"))
    base.dir("etc/app").file("etc/app/a", b"a\n").file("etc/app/b", b"b\n")
    base.file("etc/doomed", b"gone soon\n").file("etc/replaced", b"old\n")
    base.dir("var").dir("var/dir-to-file").file("var/dir-to-file/x", b"x")
    second = Layer().dir("etc").whiteout("etc/doomed").file("etc/replaced", b"new\n")
    second.dir("etc/app").opaque("etc/app").file("etc/app/c", b"c\n")
    second.file("var/dir-to-file", b"now a file\n")
    second.file("srv/owned", b"owned\n", 0o4750, uid=1000, gid=1000,
                xattrs={"user.hostel": "yes"})
    second.hardlink("srv/hardlink", "srv/owned").symlink("srv/link", "../etc/replaced")
    second.symlink("srv/abs", "/etc/passwd").chardev("srv/null", 1, 3).fifo("srv/fifo")
    third = Layer().file("srv/third", b"3\n").whiteout("srv/fifo")
    return [base.tar(), second.tar(), third.tar()]


@contextlib.contextmanager
def mounted_squashfs(image: Path, where: Path) -> Iterator[Path]:
    """The squashfs mounted read-only on a loop device; unmounted and detached after."""
    where.mkdir()
    with LoopDevice(str(image), read_only=True) as loop:
        native.mount(loop.device, str(where), "squashfs", native.MS_RDONLY)
        try:
            yield where
        finally:
            native.umount(str(where))


# Tests ------------------------------------------------------------------------------------

@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "images")


def _contents(store: ImageStore) -> list[str]:
    return sorted(os.listdir(store.images_dir)) if store.images_dir.exists() else []


def test_docker_save_archive_imports_and_lists(store: ImageStore, tmp_path: Path) -> None:
    layers = [busybox_layer(("sh", "echo")).tar()]
    archive = docker_archive(tmp_path / "bb.tar", layers)
    stages = []
    info = store.import_archive(str(archive), progress=lambda *a: stages.append(a))
    # The archive's tag is the reference, kept as is (not made "busybox-test").
    assert info.name == "hostel/busybox:test" and info.digest.startswith("sha256:")
    assert [i.name for i in store.list()] == ["hostel/busybox:test"]
    assert info.config().cmd == ["sh"] and info.size == info.squashfs.stat().st_size
    layer_bytes = len(layers[0])   # progress counts the layer's bytes as stored
    assert stages[0][1:] == (0, layer_bytes)
    assert stages[-1] == ("imported", layer_bytes, layer_bytes)
    with mounted_squashfs(info.squashfs, tmp_path / "mnt") as root:
        assert (root / "bin/busybox").read_bytes() == Path(BUSYBOX).read_bytes()
        assert os.readlink(root / "bin/sh") == "busybox"
        assert (root / "home/user").stat().st_uid == 1000
        assert stat.S_IMODE((root / "tmp").stat().st_mode) == 0o1777


@pytest.mark.parametrize("fmt", ["docker", "oci-dir-gzip", "oci-tar-plain"])
def test_multi_layer_whiteouts_opaque_links_devices(store: ImageStore, tmp_path: Path,
                                                    fmt: str) -> None:
    layers = multi_layer_image()
    path = tmp_path / "image"
    if fmt == "docker":
        docker_archive(path, layers)
    elif fmt == "oci-tar-plain":
        oci_layout(path, layers, compress=False, as_tar=True)
    else:
        path.mkdir()
        oci_layout(path, layers, compress=True)
    info = store.import_archive(str(path), "multi")
    with mounted_squashfs(info.squashfs, tmp_path / "mnt") as root:
        assert not (root / "etc/doomed").exists()
        assert (root / "etc/replaced").read_bytes() == b"new\n"
        assert sorted(os.listdir(root / "etc/app")) == ["c"]
        assert (root / "var/dir-to-file").read_bytes() == b"now a file\n"
        owned = (root / "srv/owned").stat()
        assert (owned.st_uid, owned.st_gid, stat.S_IMODE(owned.st_mode)) == (1000, 1000, 0o4750)
        assert os.getxattr(root / "srv/owned", "user.hostel") == b"yes"
        assert (root / "srv/hardlink").stat().st_ino == owned.st_ino and owned.st_nlink == 2
        assert os.readlink(root / "srv/link") == "../etc/replaced"
        assert os.readlink(root / "srv/abs") == "/etc/passwd"
        null = (root / "srv/null").lstat()
        assert stat.S_ISCHR(null.st_mode) and os.major(null.st_rdev) == 1 \
            and os.minor(null.st_rdev) == 3 and stat.S_IMODE(null.st_mode) == 0o666
        assert not (root / "srv/fifo").exists() and (root / "srv/third").read_bytes() == b"3\n"
        assert not any(name.startswith(".wh.") for _, dirs, files in os.walk(root)
                       for name in dirs + files)
    assert _contents(store) == ["multi:latest"]


def test_oci_layout_keeps_digest_and_ref_name(store: ImageStore, tmp_path: Path) -> None:
    (tmp_path / "layout").mkdir()
    layers = [busybox_layer(("sh",)).tar()]
    layout = oci_layout(tmp_path / "layout", layers, tag="v1.2")
    info = store.import_archive(str(layout))
    index = json.loads((layout / "index.json").read_text())
    assert info.name == "v1.2:latest" and info.digest == index["manifests"][0]["digest"]


def _tamper_layer_bytes(layers: list[bytes]) -> list[bytes]:
    return [layers[0].replace(b"root:x:0:0", b"root:x:0:1")]


def _rejected(store: ImageStore, path: Path, needle: str) -> None:
    with pytest.raises(CorruptImage, match=needle):
        store.import_archive(str(path), "bad")
    assert _contents(store) == [], "a rejected import left files behind"


def test_docker_diff_id_mismatch_is_rejected(store: ImageStore, tmp_path: Path) -> None:
    layers = [busybox_layer(("sh",)).tar()]
    archive = docker_archive(tmp_path / "a.tar", _tamper_layer_bytes(layers),
                             image_config(layers))
    _rejected(store, archive, "layer .* has digest sha256:[0-9a-f]+, but the manifest says")


def test_docker_config_name_mismatch_is_rejected(store: ImageStore, tmp_path: Path) -> None:
    layers = [busybox_layer(("sh",)).tar()]
    archive = docker_archive(tmp_path / "a.tar", layers)
    with tarfile.open(archive) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    manifest = json.loads(files["manifest.json"])
    config = files.pop(manifest[0]["Config"])
    files[manifest[0]["Config"]] = config.replace(b'"sh"', b'"ls"')
    _write_tar(tmp_path / "b.tar", files)
    _rejected(store, tmp_path / "b.tar", "the image configuration has digest")


def test_oci_blob_digest_mismatch_is_rejected(store: ImageStore, tmp_path: Path) -> None:
    (tmp_path / "layout").mkdir()
    layers = [busybox_layer(("sh",)).tar()]
    layout = oci_layout(tmp_path / "layout", layers, compress=False)
    manifest = json.loads(next(p for p in (layout / "blobs/sha256").iterdir()
                               if b'"layers"' in p.read_bytes()).read_text())
    blob = layout / "blobs/sha256" / manifest["layers"][0]["digest"].split(":")[1]
    blob.write_bytes(_tamper_layer_bytes([blob.read_bytes()])[0])
    _rejected(store, layout, "has digest sha256:[0-9a-f]+, but the manifest says")


@pytest.mark.parametrize("layer,needle", [
    (Layer().file("/etc/evil", b"x"), "absolute name"),
    (Layer().dir("etc").file("etc/../../evil", b"x"), "contains '..'"),
    (Layer().dir("a").dir("a/b").symlink("a/b/out", "../../../evil"), "points outside"),
    (Layer().symlink("top", ".."), "points outside"),
    (Layer().file("x", b"x").hardlink("y", "../x"), "contains '..'"),
    (Layer().hardlink("y", "/etc/passwd"), "absolute name"),
    (Layer().hardlink("y", "missing"), "not in the image"),
])
def test_escaping_members_are_rejected(store: ImageStore, tmp_path: Path, layer: Layer,
                                       needle: str) -> None:
    layers = [busybox_layer(("sh",)).tar(), layer.tar()]
    _rejected(store, docker_archive(tmp_path / "a.tar", layers), needle)
    assert not (tmp_path / "evil").exists() and not (store.images_dir.parent / "evil").exists()


def test_later_layer_cannot_write_through_a_symlink(store: ImageStore, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    first = Layer().symlink("escape", str(outside))
    second = Layer().file("escape/planted", b"x")
    info = store.import_archive(str(docker_archive(tmp_path / "a.tar",
                                                   [first.tar(), second.tar()])), "ok")
    assert not (outside / "planted").exists()
    with mounted_squashfs(info.squashfs, tmp_path / "mnt") as root:
        assert (root / "escape/planted").read_bytes() == b"x"   # a directory replaced the link


@pytest.mark.parametrize("content,needle", [
    (b"not a tar at all" * 100, "neither a directory nor a readable tar"),
])
def test_not_an_archive(store: ImageStore, tmp_path: Path, content: bytes, needle: str) -> None:
    (tmp_path / "junk").write_bytes(content)
    _rejected(store, tmp_path / "junk", needle)


def test_archive_without_manifest(store: ImageStore, tmp_path: Path) -> None:
    _write_tar(tmp_path / "empty.tar", {"hello": b"x"})
    _rejected(store, tmp_path / "empty.tar", "neither manifest.json")


def test_zstd_layer_is_refused_clearly(store: ImageStore, tmp_path: Path) -> None:
    fake = b"\x28\xb5\x2f\xfd" + bytes(600)
    archive = docker_archive(tmp_path / "z.tar", [fake], image_config([fake]))
    _rejected(store, archive, "zstd-compressed")


def test_truncated_layer_is_rejected(store: ImageStore, tmp_path: Path) -> None:
    layers = [busybox_layer(("sh",)).tar()]
    truncated = layers[0][:len(layers[0]) // 2]
    archive = docker_archive(tmp_path / "t.tar", [truncated], image_config(layers))
    with pytest.raises(CorruptImage):
        store.import_archive(str(archive), "bad")
    assert _contents(store) == []


def test_names_duplicates_and_removal(store: ImageStore, tmp_path: Path) -> None:
    archive = docker_archive(tmp_path / "a.tar", [busybox_layer(("sh",)).tar()])
    for bad in ("../x", "Upper", "a/", "x:", "x:-tag", "x@sha256:12"):
        with pytest.raises(InvalidArgs, match="invalid image reference"):
            store.import_archive(str(archive), bad)
    store.import_archive(str(archive), "one")
    with pytest.raises(AlreadyExists, match="exists already"):
        store.import_archive(str(archive), "one:latest")   # a bare name is NAME:latest
    store.import_archive(str(archive), "localhost:5000/hostel/one:v1")
    assert [i.name for i in store.list()] == ["localhost:5000/hostel/one:v1", "one:latest"]
    assert store.get("localhost:5000/hostel/one:v1").directory.name == \
        "localhost:5000+hostel+one:v1"
    store.remove("one")
    store.remove("localhost:5000/hostel/one:v1")
    assert store.list() == [] and _contents(store) == []
    with pytest.raises(NoSuchObject, match="no image named 'one'"):
        store.remove("one")
    with pytest.raises(InvalidArgs, match="does not exist"):
        store.import_archive(str(tmp_path / "nope.tar"), "two")


@pytest.mark.parametrize("tag,name", [
    ("docker.io/library/busybox:1.36", "docker.io/library/busybox:1.36"),
    ("busybox", "busybox:latest"), ("My Image", "my-image:latest"), ("...", "image:latest")])
def test_default_name(tag: str, name: str) -> None:
    assert default_name(tag) == name


@pytest.mark.parametrize("name, needle", [
    ("/".join(["d"] * 2000) + "/f", "2001 directories deep"),
    ("a" * 5000, "longer than 4095 bytes"),
    ("d/" + "n" * 300, "component longer than 255 bytes"),
])
def test_names_no_file_system_takes_are_refused_and_leave_nothing(
        store: ImageStore, tmp_path: Path, name: str, needle: str) -> None:
    """Was a RecursionError (removing the 2,000-deep staging tree) and an .import-* leftover."""
    layer = Layer().file(name, b"x")
    _rejected(store, docker_archive(tmp_path / "odd.tar", [layer.tar()]), needle)


def test_a_fifo_named_as_archive_is_refused_without_blocking(store: ImageStore,
                                                              tmp_path: Path) -> None:
    fifo = tmp_path / "image.tar"
    os.mkfifo(fifo)
    with pytest.raises(InvalidArgs, match="is not a regular file"):
        store.import_archive(str(fifo), "fifo")
