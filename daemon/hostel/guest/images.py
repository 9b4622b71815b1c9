"""OCI images on the host: import `docker save` archives and OCI layouts into squashfs.

An import reads the archive's manifest, applies the layers in order into a
staging tree (whiteouts and opaque directories as overlayfs would show them;
ownership, modes, symlinks, hard links, device nodes and xattrs kept),
checks every blob against the digests the manifest and the config name,
and packs the tree with mksquashfs. Everything happens in a hidden staging
directory that is renamed into place at the very end, so an image is
either complete or absent: a failed import leaves nothing behind.

An archive is untrusted input. Member names are checked before anything is
written (no absolute names, no ".."), links may not point out of the root,
and the staging tree is written with *at() calls that never follow a
symlink, so an earlier layer cannot redirect a later one's writes.

Store layout, under the images directory (the daemon's STATE/images):
    NAME/rootfs.squashfs   the root file system
    NAME/config.json       the image configuration, byte for byte as verified
    NAME/image.json        {"name", "digest", "format", "source"}"""
from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import subprocess
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable

from hostel.bus import AlreadyExists, HostelError, InvalidArgs, NoSuchObject
from hostel.guest.launchconfig import ImageConfig

ROOTFS = "rootfs.squashfs"
CONFIG = "config.json"
INFO = "image.json"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
DIGEST_RE = re.compile(r"sha256:([0-9a-f]{64})")
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
SMALL_FILE_MAX = 16 << 20       # manifests, indexes, configs
MKSQUASHFS_TIMEOUT = 3600
_CHUNK = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"

Progress = Callable[[str, int, int], None]   # (what is happening, done, total)


class ImageError(HostelError):
    """An image store operation failed for a reason on the host (disk, tools)."""


class CorruptImage(InvalidArgs):
    """The archive is not a well-formed, self-consistent image; nothing was imported."""


@dataclass(frozen=True)
class ImageInfo:
    name: str
    digest: str
    size: int
    directory: Path

    @property
    def squashfs(self) -> Path:
        return self.directory / ROOTFS

    @property
    def config_path(self) -> Path:
        return self.directory / CONFIG

    def config(self) -> ImageConfig:
        return ImageConfig.from_json(json.loads(self.config_path.read_bytes()))


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise InvalidArgs(f"invalid image name {name!r}: 1 to 64 letters, digits, '_', '.' "
                          "and '-', starting with a letter or digit")
    return name


def default_name(tag: str) -> str:
    """A store name from a tag such as docker.io/library/busybox:1.36 (busybox-1.36)."""
    base = tag.rsplit("/", 1)[-1].replace(":", "-").replace("@", "-")
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "", base).lstrip("._-")[:64]
    return cleaned or "image"


# Member names and link targets --------------------------------------------------------

def member_path(name: str, archive: str) -> str:
    """A member name as a relative path below the root, or CorruptImage when it leaves it."""
    if name.startswith("/"):
        raise CorruptImage(f"{archive}: member {name!r} has an absolute name; refusing "
                           "an archive that writes outside the image root")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise CorruptImage(f"{archive}: member {name!r} contains '..'; refusing an archive "
                           "that writes outside the image root")
    return "/".join(parts)


def _check_symlink(path: str, target: str, archive: str) -> None:
    """Absolute targets resolve inside the guest's root; relative ones may not climb out of it."""
    if not target or "\0" in target:
        raise CorruptImage(f"{archive}: symlink {path!r} has an empty or invalid target")
    if target.startswith("/"):
        return
    depth = path.count("/")   # directories above the link, below the root
    for part in target.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                raise CorruptImage(f"{archive}: symlink {path!r} -> {target!r} points outside "
                                   "the image root; refusing the archive")
        elif part not in ("", "."):
            depth += 1


# Hashing readers ------------------------------------------------------------------------

class _HashingReader:
    """A read()-only stream that hashes and counts what passes through it."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.hash = hashlib.sha256()
        self.size = 0
        self._pending = b""

    def peek(self, size: int) -> bytes:
        while len(self._pending) < size:
            more = self.raw.read(size - len(self._pending))
            if not more:
                break
            self._pending += more
        return self._pending[:size]

    def read(self, size: int = -1) -> bytes:
        if self._pending:
            data, self._pending = (self._pending, b"") if size < 0 or size >= len(self._pending) \
                else (self._pending[:size], self._pending[size:])
        else:
            data = self.raw.read(size)
        self.hash.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(_CHUNK):
            pass

    @property
    def digest(self) -> str:
        return f"sha256:{self.hash.hexdigest()}"


def _check_digest(actual: str, expected: str, what: str, archive: str) -> None:
    if actual != expected:
        raise CorruptImage(f"{archive}: {what} has digest {actual}, but the manifest says "
                           f"{expected}; the archive is corrupt or was tampered with")


# Archive sources ------------------------------------------------------------------------

class _Source:
    """The outer archive: a directory or a tar file, read by member name."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._tar: tarfile.TarFile | None = None
        self._members: dict[str, tarfile.TarInfo] = {}
        if os.path.isdir(path):
            return
        try:
            self._tar = tarfile.open(path, "r:*")
            for member in self._tar.getmembers():
                self._members[member_path(member.name, path)] = member
        except (tarfile.TarError, EOFError, OSError) as e:
            self.close()
            raise CorruptImage(f"{path} is neither a directory nor a readable tar archive "
                               f"({e}); pass a 'docker save' archive or an OCI layout") from e

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def exists(self, name: str) -> bool:
        name = member_path(name, self.path)
        if self._tar is None:
            return os.path.isfile(os.path.join(self.path, name))
        member = self._members.get(name)
        return member is not None and (member.isfile() or member.issym() or member.islnk())

    def open(self, name: str) -> IO[bytes]:
        relative = member_path(name, self.path)
        try:
            if self._tar is None:
                return open(os.path.join(self.path, relative), "rb")
            member = self._members.get(relative)
            stream = self._tar.extractfile(member) if member is not None else None
        except (tarfile.TarError, KeyError, OSError) as e:
            raise CorruptImage(f"{self.path}: cannot read {name}: {e}") from e
        if stream is None:
            raise CorruptImage(f"{self.path}: the archive lacks {name}, which its manifest names")
        return stream

    def read_small(self, name: str) -> bytes:
        with self.open(name) as f:
            data = f.read(SMALL_FILE_MAX + 1)
        if len(data) > SMALL_FILE_MAX:
            raise CorruptImage(f"{self.path}: {name} is larger than {SMALL_FILE_MAX} bytes")
        return data

    def read_json(self, name: str) -> object:
        return _parse_json(self.read_small(name), name, self.path)


def _parse_json(data: bytes, what: str, archive: str) -> object:
    try:
        return json.loads(data)
    except ValueError as e:
        raise CorruptImage(f"{archive}: {what} is not valid JSON ({e})") from None


# Manifests ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Layer:
    member: str
    digest: str | None     # of the blob as stored (None: docker's legacy layer.tar names)
    diff_id: str           # of the uncompressed tar, from the config


@dataclass(frozen=True)
class _Manifest:
    format: str
    digest: str            # the image's identity: manifest digest, or config digest
    config: bytes
    layers: list[_Layer]
    tag: str | None


def _expect(value: object, kind: type, what: str, archive: str) -> object:
    if not isinstance(value, kind):
        raise CorruptImage(f"{archive}: {what} is malformed (expected a {kind.__name__})")
    return value


def _blob_name(digest: object, archive: str) -> str:
    match = DIGEST_RE.fullmatch(digest) if isinstance(digest, str) else None
    if match is None:
        raise CorruptImage(f"{archive}: {digest!r} is not a sha256 digest")
    return f"blobs/sha256/{match.group(1)}"


def _read_verified(source: _Source, descriptor: object, what: str) -> bytes:
    desc = _expect(descriptor, dict, what, source.path)
    data = source.read_small(_blob_name(desc.get("digest"), source.path))
    _check_digest(f"sha256:{hashlib.sha256(data).hexdigest()}", desc["digest"], what, source.path)
    if desc.get("size") is not None and desc["size"] != len(data):
        raise CorruptImage(f"{source.path}: {what} is {len(data)} bytes, the manifest says "
                           f"{desc['size']}")
    return data


def _diff_ids(config: bytes, count: int, archive: str) -> list[str]:
    doc = _expect(_parse_json(config, "the image configuration", archive), dict,
                  "the image configuration", archive)
    ImageConfig.from_json(doc)   # refuse a config no guest could be started from, now
    rootfs = _expect(doc.get("rootfs"), dict, "the configuration's rootfs", archive)
    diff_ids = _expect(rootfs.get("diff_ids"), list, "rootfs.diff_ids", archive)
    if len(diff_ids) != count:
        raise CorruptImage(f"{archive}: the configuration lists {len(diff_ids)} layers, the "
                           f"manifest {count}")
    for diff_id in diff_ids:
        _blob_name(diff_id, archive)
    return diff_ids


def _docker_manifest(source: _Source) -> _Manifest:
    entries = _expect(source.read_json("manifest.json"), list, "manifest.json", source.path)
    if len(entries) != 1:
        raise CorruptImage(f"{source.path}: manifest.json describes {len(entries)} images; "
                           "save exactly one image per archive")
    entry = _expect(entries[0], dict, "manifest.json's entry", source.path)
    config_name = _expect(entry.get("Config"), str, "manifest.json's Config", source.path)
    layer_names = _expect(entry.get("Layers"), list, "manifest.json's Layers", source.path)
    config = source.read_small(config_name)
    config_digest = f"sha256:{hashlib.sha256(config).hexdigest()}"
    named = re.search(r"([0-9a-f]{64})(\.json)?$", config_name)
    if named is None:
        raise CorruptImage(f"{source.path}: config {config_name!r} is not named by its digest")
    _check_digest(config_digest, f"sha256:{named.group(1)}", "the image configuration",
                  source.path)
    diff_ids = _diff_ids(config, len(layer_names), source.path)
    layers = []
    for name, diff_id in zip(layer_names, diff_ids):
        name = _expect(name, str, "a layer name", source.path)
        blob = re.fullmatch(r"blobs/sha256/([0-9a-f]{64})", member_path(name, source.path))
        layers.append(_Layer(name, f"sha256:{blob.group(1)}" if blob else None, diff_id))
    tags = entry.get("RepoTags") or []
    return _Manifest("docker-save", config_digest, config, layers,
                     tags[0] if tags and isinstance(tags[0], str) else None)


def _pick_manifest(source: _Source, index: dict, what: str) -> dict:
    manifests = _expect(index.get("manifests"), list, f"{what}'s manifests", source.path)
    usable = [m for m in manifests if isinstance(m, dict) and
              m.get("platform", {}).get("architecture", "amd64") == _oci_arch()]
    if len(usable) != 1:
        raise CorruptImage(f"{source.path}: {what} lists {len(usable)} manifests for "
                           f"{_oci_arch()}; expected exactly one")
    return usable[0]


def _oci_arch() -> str:
    machine = os.uname().machine
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def _oci_manifest(source: _Source) -> _Manifest:
    index = _expect(source.read_json("index.json"), dict, "index.json", source.path)
    descriptor = _pick_manifest(source, index, "index.json")
    manifest_bytes = _read_verified(source, descriptor, "the image manifest")
    manifest = _expect(_parse_json(manifest_bytes, "the image manifest", source.path), dict,
                       "the image manifest", source.path)
    if manifest.get("mediaType") in (_OCI_INDEX, _DOCKER_LIST) or "manifests" in manifest:
        descriptor = _pick_manifest(source, manifest, "the nested index")
        manifest_bytes = _read_verified(source, descriptor, "the image manifest")
        manifest = _expect(_parse_json(manifest_bytes, "the image manifest", source.path),
                           dict, "the image manifest", source.path)
    config = _read_verified(source, manifest.get("config"), "the image configuration")
    layer_descs = _expect(manifest.get("layers"), list, "the manifest's layers", source.path)
    diff_ids = _diff_ids(config, len(layer_descs), source.path)
    layers = []
    for desc, diff_id in zip(layer_descs, diff_ids):
        desc = _expect(desc, dict, "a layer descriptor", source.path)
        layers.append(_Layer(_blob_name(desc.get("digest"), source.path), desc["digest"],
                             diff_id))
    tag = (descriptor.get("annotations") or {}).get("org.opencontainers.image.ref.name")
    return _Manifest("oci", descriptor["digest"], config, layers, tag)


def read_manifest(source: _Source) -> _Manifest:
    if source.exists("manifest.json"):
        return _docker_manifest(source)
    if source.exists("index.json"):
        return _oci_manifest(source)
    raise CorruptImage(f"{source.path} has neither manifest.json (docker save) nor index.json "
                       "(OCI image layout); it is not an image archive")


# Applying layers -----------------------------------------------------------------------------

def _lstat(name: str, dir_fd: int) -> os.stat_result | None:
    try:
        return os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return None


def _remove(name: str, dir_fd: int) -> None:
    st = _lstat(name, dir_fd)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)


class _LayerWriter:
    """Writes one layer's members into the staging root, the way overlayfs would show them."""

    def __init__(self, root: str, archive: str) -> None:
        self.root = root
        self.archive = archive
        self.created: set[str] = set()
        self.opaque: list[str] = []
        self.directories: list[tuple[str, tarfile.TarInfo]] = []

    def _parent(self, parent: str, create: bool = True) -> int | None:
        """An O_PATH descriptor of a directory below the root, made when missing.

        Nothing is followed: a symlink or a file where a directory must be is
        replaced by a directory, as an upper layer's directory hides it in an
        overlay. Without `create`, such a path gives None."""
        fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for part in [p for p in parent.split("/") if p]:
                st = _lstat(part, fd)
                if st is None or not stat.S_ISDIR(st.st_mode):
                    if not create:
                        os.close(fd)
                        return None
                    _remove(part, fd)
                    os.mkdir(part, 0o755, dir_fd=fd)
                child = os.open(part, _PATH_FLAGS | os.O_DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd = child
            return fd
        except BaseException:
            os.close(fd)
            raise

    def apply(self, tar: tarfile.TarFile) -> None:
        for member in tar:
            path = member_path(member.name, self.archive)
            parent, _, base = path.rpartition("/")
            if base == OPAQUE:
                self.opaque.append(parent)
                continue
            if base.startswith(WHITEOUT):
                self._whiteout(parent, base[len(WHITEOUT):])
                continue
            fd = self._parent(parent)
            try:
                if not base:
                    self._metadata(member, ".", fd)
                    self.directories.append(("", member))
                else:
                    self._entry(tar, member, path, base, fd)
                    self.created.add(path)
            finally:
                os.close(fd)
        for directory in self.opaque:
            self._prune(directory)
        for path, member in reversed(self.directories):
            fd = self._parent(path)
            try:
                os.utime(f"/proc/self/fd/{fd}", (member.mtime, member.mtime))
            finally:
                os.close(fd)

    def _whiteout(self, parent: str, name: str) -> None:
        fd = self._parent(parent, create=False)
        if fd is not None:
            try:
                _remove(name, fd)
            finally:
                os.close(fd)

    def _prune(self, directory: str) -> None:
        """Under an opaque directory only what this layer wrote survives."""
        fd = self._parent(directory)
        try:
            with os.scandir(f"/proc/self/fd/{fd}") as entries:
                names = [e.name for e in entries]
            for name in names:
                path = f"{directory}/{name}" if directory else name
                if path not in self.created:
                    _remove(name, fd)
                elif stat.S_ISDIR(os.lstat(name, dir_fd=fd).st_mode):
                    self._prune(path)
        finally:
            os.close(fd)

    def _entry(self, tar: tarfile.TarFile, member: tarfile.TarInfo, path: str, base: str,
               fd: int) -> None:
        existing = _lstat(base, fd)
        if member.isdir():
            if existing is None or not stat.S_ISDIR(existing.st_mode):
                _remove(base, fd)
                os.mkdir(base, 0o700, dir_fd=fd)
            self._metadata(member, base, fd)
            self.directories.append((path, member))
            return
        _remove(base, fd)
        if member.isreg():
            self._regular(tar, member, base, fd)
        elif member.issym():
            _check_symlink(path, member.linkname, self.archive)
            os.symlink(member.linkname, base, dir_fd=fd)
            os.chown(base, member.uid, member.gid, dir_fd=fd, follow_symlinks=False)
            os.utime(base, (member.mtime, member.mtime), dir_fd=fd, follow_symlinks=False)
        elif member.islnk():
            self._hardlink(member, base, fd)
        elif member.ischr() or member.isblk() or member.isfifo():
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK if member.isblk() \
                else stat.S_IFIFO
            os.mknod(base, kind | 0o600, os.makedev(member.devmajor, member.devminor)
                     if kind != stat.S_IFIFO else 0, dir_fd=fd)
            self._metadata(member, base, fd)
            os.utime(base, (member.mtime, member.mtime), dir_fd=fd, follow_symlinks=False)
        else:
            raise CorruptImage(f"{self.archive}: member {member.name!r} has an unsupported "
                               f"type {member.type!r}")

    def _regular(self, tar: tarfile.TarFile, member: tarfile.TarInfo, base: str,
                 fd: int) -> None:
        out = os.open(base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                      0o600, dir_fd=fd)
        with os.fdopen(out, "wb") as f:
            data = tar.extractfile(member)
            shutil.copyfileobj(data, f, _CHUNK)
            f.flush()
            self._metadata(member, base, fd)
            os.utime(f.fileno(), (member.mtime, member.mtime))

    def _hardlink(self, member: tarfile.TarInfo, base: str, fd: int) -> None:
        target = member_path(member.linkname, self.archive)
        if not target:
            raise CorruptImage(f"{self.archive}: hard link {member.name!r} points at the root")
        target_parent, _, target_base = target.rpartition("/")
        source_fd = self._parent(target_parent, create=False)
        try:
            if source_fd is None:
                raise FileNotFoundError(target)
            os.link(target_base, base, src_dir_fd=source_fd, dst_dir_fd=fd,
                    follow_symlinks=False)
        except FileNotFoundError:
            raise CorruptImage(f"{self.archive}: hard link {member.name!r} points at "
                               f"{member.linkname!r}, which is not in the image") from None
        finally:
            if source_fd is not None:
                os.close(source_fd)

    @staticmethod
    def _metadata(member: tarfile.TarInfo, base: str, fd: int) -> None:
        """Owner, then mode (chown clears set-id bits), then xattrs; never through a symlink."""
        handle = os.open(base, _PATH_FLAGS, dir_fd=fd)
        try:
            proc = f"/proc/self/fd/{handle}"
            os.chown(proc, member.uid, member.gid)
            os.chmod(proc, member.mode & 0o7777)
            for key, value in member.pax_headers.items():
                if key.startswith("SCHILY.xattr."):
                    os.setxattr(proc, key[len("SCHILY.xattr."):],
                                value.encode("utf-8", "surrogateescape"))
        finally:
            os.close(handle)


def _uncompressed(stream: _HashingReader, what: str, archive: str) -> _HashingReader:
    """The uncompressed layer (hashed again, for the diff_id) over the blob stream."""
    magic = stream.peek(4)
    if magic.startswith(_ZSTD_MAGIC):
        raise CorruptImage(f"{archive}: {what} is zstd-compressed, which this host cannot "
                           "read; save the image with gzip or uncompressed layers")
    if magic.startswith(_GZIP_MAGIC):
        return _HashingReader(gzip.GzipFile(fileobj=stream, mode="rb"))
    return _HashingReader(stream)


def _apply_layer(source: _Source, layer: _Layer, root: str) -> None:
    what = f"layer {layer.member}"
    with source.open(layer.member) as raw:
        blob = _HashingReader(raw)
        plain = _uncompressed(blob, what, source.path)
        try:
            with tarfile.open(fileobj=plain, mode="r|") as tar:
                _LayerWriter(root, source.path).apply(tar)
            plain.drain()
            blob.drain()
        except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise CorruptImage(f"{source.path}: {what} is not a valid tar stream ({e})") from e
    if layer.digest is not None:
        _check_digest(blob.digest, layer.digest, what, source.path)
    _check_digest(plain.digest, layer.diff_id, f"{what} (uncompressed)", source.path)


# The store --------------------------------------------------------------------------------------

def make_squashfs(tree: str, output: str) -> None:
    argv = ["mksquashfs", tree, output, "-noappend", "-no-progress", "-quiet", "-xattrs"]
    try:
        subprocess.run(argv, check=True, capture_output=True, text=True,
                       timeout=MKSQUASHFS_TIMEOUT)
    except FileNotFoundError as e:
        raise ImageError("mksquashfs is not installed; install squashfs-tools") from e
    except subprocess.CalledProcessError as e:
        raise ImageError(f"mksquashfs {tree} failed: {e.stderr.strip() or e.returncode}") from e
    except subprocess.TimeoutExpired as e:
        raise ImageError(f"mksquashfs {tree} took longer than {MKSQUASHFS_TIMEOUT} s") from e


class ImageStore:
    """Imported images under one directory (the daemon's STATE/images)."""

    def __init__(self, images_dir: Path) -> None:
        self.images_dir = images_dir

    def _staging(self) -> Path:
        self.images_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        staging = self.images_dir / f".import-{secrets.token_hex(8)}"
        staging.mkdir(mode=0o700)
        return staging

    def import_archive(self, path: str, name: str = "",
                       progress: Progress | None = None) -> ImageInfo:
        """Import a docker-save archive or OCI layout (directory or tar) as `name`."""
        report = progress or (lambda what, done, total: None)
        if name:
            check_name(name)
        if not os.path.exists(path):
            raise InvalidArgs(f"{path} does not exist; pass a 'docker save' archive or an OCI "
                              "image layout")
        source = _Source(path)
        staging = None
        try:
            manifest = read_manifest(source)
            name = name or check_name(default_name(manifest.tag or Path(path).stem))
            self._refuse_existing(name)
            staging = self._staging()
            root = staging / "rootfs"
            root.mkdir(mode=0o755)
            total = len(manifest.layers) + 1
            for number, layer in enumerate(manifest.layers, 1):
                report(f"applying layer {layer.diff_id[:19]}", number - 1, total)
                _apply_layer(source, layer, str(root))
            report("building the squashfs image", total - 1, total)
            make_squashfs(str(root), str(staging / ROOTFS))
            shutil.rmtree(root)
            (staging / CONFIG).write_bytes(manifest.config)
            (staging / INFO).write_text(json.dumps({
                "name": name, "digest": manifest.digest, "format": manifest.format,
                "source": os.path.abspath(path)}))
            self._publish(staging, name)
            staging = None
            report("imported", total, total)
        finally:
            source.close()
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
        return self.get(name)

    def _refuse_existing(self, name: str) -> None:
        if (self.images_dir / name).exists():
            raise AlreadyExists(f"an image named {name!r} exists already; remove it first "
                                f"('hostelctl image remove {name}') or pick another name")

    def _publish(self, staging: Path, name: str) -> None:
        try:
            os.rename(staging, self.images_dir / name)   # fails on a non-empty target
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise AlreadyExists(f"an image named {name!r} was imported meanwhile; "
                                    "remove it first or pick another name") from None
            raise ImageError(f"cannot move the imported image into {self.images_dir / name}: "
                             f"{e.strerror}") from e

    def get(self, name: str) -> ImageInfo:
        check_name(name)
        directory = self.images_dir / name
        try:
            info = json.loads((directory / INFO).read_text())
            size = (directory / ROOTFS).stat().st_size
        except FileNotFoundError:
            raise NoSuchObject(f"no image named {name!r}; 'hostelctl image list' shows the "
                               "imported images") from None
        except ValueError as e:
            raise ImageError(f"image {name!r}: {directory / INFO} is damaged ({e}); remove and "
                             "import the image again") from e
        return ImageInfo(name, str(info.get("digest", "")), size, directory)

    def list(self) -> list[ImageInfo]:
        try:
            names = sorted(n for n in os.listdir(self.images_dir) if NAME_RE.fullmatch(n))
        except FileNotFoundError:
            return []
        return [info for info in (self._maybe(n) for n in names) if info is not None]

    def _maybe(self, name: str) -> ImageInfo | None:
        try:
            return self.get(name)
        except NoSuchObject:
            return None

    def remove(self, name: str) -> None:
        info = self.get(name)
        doomed = self.images_dir / f".remove-{secrets.token_hex(8)}"
        os.rename(info.directory, doomed)   # gone from list() at once, then deleted
        shutil.rmtree(doomed)
