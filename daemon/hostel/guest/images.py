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

Images are named by references as podman names them: NAME[:TAG] or
NAME@DIGEST, where NAME may start with a registry (localhost:5000/hostel/bb);
a NAME alone means NAME:latest. The reference is kept as given, tag and all.

Store layout, under the images directory (the daemon's STATE/images), one
directory per reference with its '/' written as '+' (never in a reference):
    REF/rootfs.squashfs   the root file system
    REF/config.json       the image configuration, byte for byte as verified
    REF/image.json        {"name", "digest", "format", "source", "layers", "imported"}

Imports and pulls are transfers (class Transfer): they report bytes as they
go, and stop, leaving nothing, when the client that asked goes away."""
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
import select
import subprocess
import tarfile
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable, Literal, Protocol, TypeVar, cast, overload

from hostel.errors import AlreadyExists, HostelError, InvalidArgs, NoSuchObject
from hostel.guest.launchconfig import ImageConfig

ROOTFS = "rootfs.squashfs"
CONFIG = "config.json"
INFO = "image.json"
# The reference grammar of docker/distribution (and so of podman and skopeo).
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_HOST_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST = rf"{_HOST_PART}(?:\.{_HOST_PART})*(?::[0-9]+)?"
REFERENCE_RE = re.compile(
    rf"(?P<name>(?:{_HOST}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*)"
    r"(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?")
NAME_MAX_CHARS = 255       # docker's limit on the name part
DEFAULT_TAG = "latest"
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

# (what is happening, bytes done, bytes in all or 0 when unknown); its result is unused
Progress = Callable[[str, int, int], object]
PROGRESS_INTERVAL = 0.1    # seconds between two reports of one transfer
CANCEL_POLL = 0.2          # seconds a blocked transfer waits before it looks at `cancel`


class ImageError(HostelError):
    """An image store operation failed for a reason on the host (disk, tools)."""


class CorruptImage(InvalidArgs):
    """The archive is not a well-formed, self-consistent image; nothing was imported."""


class Cancelled(HostelError):
    """The client cancelled the transfer (Ctrl-C, or it went away); nothing was kept."""

    dbus_name = "org.hostel1.Error.Cancelled"


class ImageInUse(HostelError):
    """A running machine or guest runs the image: removing it is refused."""

    dbus_name = "org.hostel1.Error.ImageInUse"


@dataclass
class Transfer:
    """How one import or pull reports progress and is stopped.

    The event loop sets `cancel` when the client goes away; the worker thread
    checks it at every chunk and between steps (and kills its child tools), so
    a cancelled transfer ends within CANCEL_POLL and its staging goes with it."""

    progress: Progress | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    _last: float = 0.0

    def check(self) -> None:
        if self.cancel.is_set():
            raise Cancelled("the transfer was cancelled (the client was interrupted or went "
                            "away); nothing was kept")

    def report(self, stage: str, done: int, total: int, force: bool = False) -> None:
        """Pass a report on, at most every PROGRESS_INTERVAL unless `force`d."""
        self.check()
        now = time.monotonic()
        if self.progress is not None and (force or now - self._last >= PROGRESS_INTERVAL):
            self._last = now
            self.progress(stage, done, total)

    def run(self, argv: list[str], what: str, timeout: float, env: dict[str, str] | None = None,
            tick: Callable[[], object] | None = None,
            output: IO[bytes] | None = None) -> tuple[int, str]:
        """Run a tool to its end, killed when the transfer is cancelled or the timeout
        passes: its exit status and its standard error (stdout goes to `output`, else
        nowhere). `tick` runs every CANCEL_POLL meanwhile (a pull reports the bytes
        written so far)."""
        with subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                              stdout=output if output is not None else subprocess.DEVNULL,
                              stderr=subprocess.PIPE, env=env) as child:
            assert child.stderr is not None
            errors = _Drain(child.stderr)
            deadline = time.monotonic() + timeout
            while child.poll() is None:
                if self.cancel.is_set() or time.monotonic() > deadline:
                    child.kill()
                    child.wait()
                    errors.join()
                    self.check()
                    raise ImageError(f"{what} took longer than {timeout:.0f} s")
                if tick is not None:
                    tick()
                try:
                    child.wait(CANCEL_POLL)
                except subprocess.TimeoutExpired:
                    pass
            errors.join()
            return child.returncode, errors.text


class _Drain(threading.Thread):
    """Reads a child's stderr to its end, so a chatty tool never blocks on a full pipe."""

    def __init__(self, stream: IO[bytes]) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.chunks: list[bytes] = []
        self.start()

    def run(self) -> None:
        while chunk := self.stream.read(_CHUNK):
            if sum(map(len, self.chunks)) < SMALL_FILE_MAX:
                self.chunks.append(chunk)

    @property
    def text(self) -> str:
        return b"".join(self.chunks).decode(errors="replace")


@dataclass(frozen=True)
class ImageInfo:
    name: str              # the reference, NAME:TAG or NAME@DIGEST
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


def normalize_reference(text: str) -> str:
    """An image reference as the store keys it: NAME:TAG, NAME@DIGEST or NAME:TAG@DIGEST,
    with ':latest' added to a bare NAME, as podman does."""
    match = REFERENCE_RE.fullmatch(text)
    if match is None or len(match.group("name")) > NAME_MAX_CHARS:
        raise InvalidArgs(
            f"invalid image reference {text!r}: expected NAME[:TAG] or NAME@sha256:DIGEST, "
            "where NAME is lower-case letters and digits ('.', '_' or '-' between them, '/' "
            "between components, at most 255 characters), optionally after a registry "
            "HOST[:PORT]/, e.g. localhost:5000/hostel/busybox:1.36")
    if match.group("tag") is None and match.group("digest") is None:
        return f"{text}:{DEFAULT_TAG}"
    return text


def reference_basename(reference: str) -> str:
    """The last path component of a reference, without tag or digest (busybox for
    localhost:5000/library/busybox:1.36): what a container from it is named after."""
    match = REFERENCE_RE.fullmatch(reference)
    name = match.group("name") if match else reference
    return name.rsplit("/", 1)[-1]


def default_name(tag: str) -> str:
    """A store reference from an archive's tag (docker.io/library/busybox:1.36 as is), or
    from a file name that is not one (My Image.tar: my-image:latest)."""
    try:
        return normalize_reference(tag)
    except InvalidArgs:
        base = tag.rsplit("/", 1)[-1].lower()
        cleaned = re.sub(r"[^a-z0-9]+", "-", base).strip("-")[:64]
        return normalize_reference(cleaned or "image")


def _directory_name(reference: str) -> str:
    return reference.replace("/", "+")


# Member names and link targets --------------------------------------------------------

MAX_MEMBER_BYTES = 4095   # PATH_MAX less the terminating NUL
NAME_MAX = 255
MAX_MEMBER_DEPTH = 256

def member_path(name: str, archive: str) -> str:
    """A member name as a relative path below the root, or CorruptImage when it leaves it."""
    if name.startswith("/"):
        raise CorruptImage(f"{archive}: member {name!r} has an absolute name; refusing "
                           "an archive that writes outside the image root")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise CorruptImage(f"{archive}: member {name!r} contains '..'; refusing an archive "
                           "that writes outside the image root")
    _check_name_limits(name, parts, archive)
    return "/".join(parts)


def _check_name_limits(name: str, parts: list[str], archive: str) -> None:
    """Names no file system takes, or trees deeper than any image needs (and than the
    recursion of walking and removing them allows), are refused up front."""
    shown = name if len(name) <= 80 else f"{name[:60]}...({len(name)} characters)"
    if len(name.encode(errors="surrogateescape")) > MAX_MEMBER_BYTES:
        raise CorruptImage(f"{archive}: member {shown!r} has a name longer than "
                           f"{MAX_MEMBER_BYTES} bytes; refusing the archive")
    long_part = next((p for p in parts if len(p.encode(errors="surrogateescape")) > NAME_MAX),
                     None)
    if long_part is not None:
        raise CorruptImage(f"{archive}: member {shown!r} has a path component longer than "
                           f"{NAME_MAX} bytes; refusing the archive")
    if len(parts) > MAX_MEMBER_DEPTH:
        raise CorruptImage(f"{archive}: member {shown!r} is {len(parts)} directories deep "
                           f"(at most {MAX_MEMBER_DEPTH}); refusing the archive")


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

class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class _HashingReader:
    """A read()-only stream that hashes and counts what passes through it."""

    def __init__(self, raw: _Readable, tick: Callable[[int], object] | None = None) -> None:
        self.raw = raw
        self.hash = hashlib.sha256()
        self.size = 0
        self.tick = tick          # told how many bytes each read returned
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
        if self.tick is not None:
            self.tick(len(data))
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

def _open_regular(path: str, what: str) -> IO[bytes]:
    """Open a file to read only if it is a regular one: a FIFO or a device named as an
    image would block the worker reading it (opened non-blocking, checked, then read)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InvalidArgs(f"{path} is not a regular file (nor a directory); {what} must be "
                          "a 'docker save' archive, an OCI layout, or a file in one")
    return os.fdopen(fd, "rb")


class _Source:
    """The outer archive: a directory or a tar file, read by member name. Messages name
    it by `label` (what the user gave: a path, standard input, a registry reference)."""

    def __init__(self, location: str, label: str | None = None) -> None:
        self.location = location
        self.path = label or location
        self._tar: tarfile.TarFile | None = None
        self._members: dict[str, tarfile.TarInfo] = {}
        self._file: IO[bytes] | None = None
        if os.path.isdir(location):
            return
        try:
            self._file = _open_regular(location, "the image archive")
            self._tar = tarfile.open(fileobj=self._file, mode="r:*")
            for member in self._tar.getmembers():
                self._members[member_path(member.name, self.path)] = member
        except (tarfile.TarError, EOFError, OSError) as e:
            self.close()
            raise CorruptImage(f"{self.path} is neither a directory nor a readable tar archive "
                               f"({e}); pass a 'docker save' archive or an OCI layout") from e

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def exists(self, name: str) -> bool:
        name = member_path(name, self.path)
        if self._tar is None:
            return os.path.isfile(os.path.join(self.location, name))
        member = self._members.get(name)
        return member is not None and (member.isfile() or member.issym() or member.islnk())

    def size(self, name: str) -> int:
        """A member's size as stored (0 when unknown: a link, or missing)."""
        name = member_path(name, self.path)
        if self._tar is None:
            try:
                return os.stat(os.path.join(self.location, name)).st_size
            except OSError:
                return 0
        member = self._members.get(name)
        return member.size if member is not None and member.isfile() else 0

    def open(self, name: str) -> IO[bytes]:
        relative = member_path(name, self.path)
        try:
            if self._tar is None:
                return _open_regular(os.path.join(self.location, relative),
                                     "an OCI layout file")
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
    size: int = 0          # of the blob as stored, for progress (0: unknown)


@dataclass(frozen=True)
class _Manifest:
    format: str
    digest: str            # the image's identity: manifest digest, or config digest
    config: bytes
    layers: list[_Layer]
    tag: str | None


T = TypeVar("T")


def _expect(value: object, kind: type[T], what: str, archive: str) -> T:
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
        layers.append(_Layer(name, f"sha256:{blob.group(1)}" if blob else None, diff_id,
                             source.size(name)))
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
        size = desc.get("size")
        layers.append(_Layer(_blob_name(desc.get("digest"), source.path), desc["digest"],
                             diff_id, size if isinstance(size, int) and size > 0 else 0))
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

    @overload
    def _parent(self, parent: str) -> int: ...

    @overload
    def _parent(self, parent: str, create: Literal[False]) -> int | None: ...

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
            assert data is not None, "only regular members come here, and they have data"
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
        # Read front to back only: the stream needs no seek(), which the stubs ask for.
        return _HashingReader(gzip.GzipFile(fileobj=cast(IO[bytes], stream), mode="rb"))
    return _HashingReader(stream)


def _apply_layer(source: _Source, layer: _Layer, root: str,
                 tick: Callable[[int], object] | None = None) -> None:
    what = f"layer {layer.member}"
    with source.open(layer.member) as raw:
        blob = _HashingReader(raw, tick)
        plain = _uncompressed(blob, what, source.path)
        try:
            with tarfile.open(fileobj=cast(IO[bytes], plain), mode="r|") as tar:
                _LayerWriter(root, source.path).apply(tar)
            plain.drain()
            blob.drain()
        except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise CorruptImage(f"{source.path}: {what} is not a valid tar stream ({e})") from e
    if layer.digest is not None:
        _check_digest(blob.digest, layer.digest, what, source.path)
    _check_digest(plain.digest, layer.diff_id, f"{what} (uncompressed)", source.path)


# The store --------------------------------------------------------------------------------------

def make_squashfs(tree: str, output: str, transfer: Transfer | None = None) -> None:
    argv = ["mksquashfs", tree, output, "-noappend", "-no-progress", "-quiet", "-xattrs"]
    try:
        status, errors = (transfer or Transfer()).run(argv, f"mksquashfs {tree}",
                                                      MKSQUASHFS_TIMEOUT)
    except FileNotFoundError as e:
        raise ImageError("mksquashfs is not installed; install squashfs-tools") from e
    if status != 0:
        raise ImageError(f"mksquashfs {tree} failed: {errors.strip() or status}")


def receive(fd: int, output: Path, size_hint: int, transfer: Transfer) -> None:
    """Copy a stream (a client's pipe, or a file it opened) into `output`, reporting
    bytes; it never blocks longer than CANCEL_POLL without looking at `cancel`."""
    done = 0
    with open(output, "xb") as out:
        while True:
            transfer.report("receiving", done, size_hint)
            ready, _w, _x = select.select([fd], [], [], CANCEL_POLL)
            if not ready:
                continue
            try:
                chunk = os.read(fd, _CHUNK)
            except OSError as e:
                raise InvalidArgs(f"cannot read the image from the passed stream: "
                                  f"{e.strerror}") from e
            if not chunk:
                break
            out.write(chunk)
            done += len(chunk)
    transfer.report("received", done, done, force=True)


def _total_bytes(layers: list[_Layer]) -> int:
    return sum(layer.size for layer in layers)


class ImageStore:
    """Imported images under one directory (the daemon's STATE/images)."""

    def __init__(self, images_dir: Path) -> None:
        self.images_dir = images_dir

    def staging(self, kind: str = "import") -> Path:
        """A hidden directory of the store's own (no reference starts with '.'): the
        work of one transfer, renamed into place or removed at its end."""
        self.images_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        staging = self.images_dir / f".{kind}-{secrets.token_hex(8)}"
        staging.mkdir(mode=0o700)
        return staging

    def import_archive(self, path: str, name: str = "", progress: Progress | None = None,
                       transfer: Transfer | None = None, label: str | None = None,
                       source_name: str | None = None) -> ImageInfo:
        """Import a docker-save archive or OCI layout (directory or tar) as `name` (a
        reference; by default the archive's tag). `label` names the archive in messages,
        `source_name` in image.json (both default to the path)."""
        transfer = transfer or Transfer(progress)
        if name:
            name = normalize_reference(name)
        if not os.path.exists(path):
            raise InvalidArgs(f"{path} does not exist; pass a 'docker save' archive or an OCI "
                              "image layout")
        source = _Source(path, label)
        staging = None
        try:
            manifest = read_manifest(source)
            name = name or default_name(manifest.tag or Path(path).stem)
            self.refuse_existing(name)
            staging = self.staging()
            self._unpack(source, manifest, staging, transfer)
            (staging / CONFIG).write_bytes(manifest.config)
            (staging / INFO).write_text(json.dumps({
                "name": name, "digest": manifest.digest, "format": manifest.format,
                "source": source_name or os.path.abspath(path),
                "layers": [layer.digest or layer.diff_id for layer in manifest.layers],
                "imported": int(time.time())}))
            transfer.check()
            self._publish(staging, name)
            staging = None
            total = _total_bytes(manifest.layers)
            transfer.report("imported", total, total, force=True)
        finally:
            source.close()
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
        return self.get(name)

    @staticmethod
    def _unpack(source: _Source, manifest: _Manifest, staging: Path, transfer: Transfer) -> None:
        """The layers applied in order (bytes reported as read), packed into the squashfs."""
        root = staging / "rootfs"
        root.mkdir(mode=0o755)
        total = _total_bytes(manifest.layers)
        before = 0   # bytes of the layers applied already
        for layer in manifest.layers:
            stage = f"applying layer {layer.diff_id[:19]}"
            read = 0

            def tick(count: int, stage: str = stage, start: int = before,
                     size: int = layer.size) -> None:
                nonlocal read
                read += count
                transfer.report(stage, start + min(read, size), total)

            transfer.report(stage, before, total, force=True)
            _apply_layer(source, layer, str(root), tick)
            before += layer.size
        transfer.report("building the squashfs image", total, total, force=True)
        make_squashfs(str(root), str(staging / ROOTFS), transfer)
        shutil.rmtree(root)

    def import_stream(self, fd: int, name: str, size_hint: int, transfer: Transfer,
                      label: str = "standard input") -> ImageInfo:
        """Import a tar read from `fd` (a pipe from the client): spooled into the store's
        own staging first, since an archive's members are read in manifest order."""
        if name:
            self.refuse_existing(normalize_reference(name))
        staging = self.staging("receive")
        try:
            archive = staging / "archive.tar"
            receive(fd, archive, size_hint, transfer)
            return self.import_archive(str(archive), name, transfer=transfer, label=label,
                                       source_name=label)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def refuse_existing(self, name: str) -> None:
        if (self.images_dir / _directory_name(name)).exists():
            raise AlreadyExists(f"an image named {name!r} exists already; remove it first "
                                f"('hostelctl image remove {name}') or pick another name")

    def _publish(self, staging: Path, name: str) -> None:
        try:
            # fails on a non-empty target
            os.rename(staging, self.images_dir / _directory_name(name))
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise AlreadyExists(f"an image named {name!r} was imported meanwhile; "
                                    "remove it first or pick another name") from None
            raise ImageError(f"cannot move the imported image into {self.images_dir}: "
                             f"{e.strerror}") from e

    def get(self, given: str) -> ImageInfo:
        """The image `given` names (NAME is NAME:latest); errors repeat it as given."""
        name = normalize_reference(given)
        directory = self.images_dir / _directory_name(name)
        try:
            info = json.loads((directory / INFO).read_text())
            size = (directory / ROOTFS).stat().st_size
        except FileNotFoundError:
            raise NoSuchObject(f"no image named {given!r}; 'hostelctl image list' shows the "
                               "imported images, 'hostelctl image pull' fetches one") from None
        except ValueError as e:
            raise ImageError(f"image {name!r}: {directory / INFO} is damaged ({e}); remove and "
                             "import the image again") from e
        return ImageInfo(name, str(info.get("digest", "")), size, directory)

    def list(self) -> list[ImageInfo]:
        try:
            entries = sorted(n for n in os.listdir(self.images_dir) if not n.startswith("."))
        except FileNotFoundError:
            return []
        return [info for info in (self._maybe(n.replace("+", "/")) for n in entries)
                if info is not None]

    def _maybe(self, name: str) -> ImageInfo | None:
        try:
            return self.get(name)
        except (NoSuchObject, InvalidArgs):   # a stray file, or a half-removed image
            return None

    def inspect(self, name: str) -> dict[str, object]:
        """What `podman image inspect` shows of an image, from what the store kept."""
        info = self.get(name)
        config_bytes = info.config_path.read_bytes()
        try:
            record = json.loads((info.directory / INFO).read_text())
            doc = json.loads(config_bytes)
        except ValueError as e:
            raise ImageError(f"image {info.name!r} is damaged ({e}); remove and import it "
                             "again") from e
        config = doc.get("config") or {}
        rootfs = doc.get("rootfs") or {}
        return {
            "Id": hashlib.sha256(config_bytes).hexdigest(),
            "Digest": info.digest,
            "RepoTags": [info.name],
            "Created": doc.get("created") or "",
            "Architecture": doc.get("architecture") or "",
            "Os": doc.get("os") or "",
            "Config": {key: config.get(key) for key in
                       ("Env", "Entrypoint", "Cmd", "WorkingDir", "User")},
            "Size": info.size,
            "Layers": record.get("layers") or list(rootfs.get("diff_ids") or []),
            "RootFS": {"Type": rootfs.get("type", "layers"),
                       "Layers": list(rootfs.get("diff_ids") or [])},
            "Source": record.get("source", ""),
            "Imported": record.get("imported", 0),
        }

    def remove(self, name: str) -> None:
        info = self.get(name)
        doomed = self.images_dir / f".remove-{secrets.token_hex(8)}"
        os.rename(info.directory, doomed)   # gone from list() at once, then deleted
        shutil.rmtree(doomed)
