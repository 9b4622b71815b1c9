"""The Python face of libcryptsetup (and of libblkid's UUID=/LABEL= lookup).

Every function here blocks: libcryptsetup reads headers and runs the PBKDF,
which takes as long as the header says (a second, by design). Call them from
a worker thread, never from the event loop.

libcryptsetup explains its failures only through its log callback, so one
process-wide callback collects the messages of the calling thread and the
errors raised here carry them: "Device /x is not a valid LUKS device" is worth
more to a person than EINVAL."""
from __future__ import annotations

import errno
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from hostel._luks import ffi, lib
from hostel.bus import ERROR_PREFIX, HostelError, NotSupported

LUKS_TYPES = {"LUKS1": 1, "LUKS2": 2}
KEY_SLOTS_IN_USE = frozenset({lib.CRYPT_SLOT_ACTIVE, lib.CRYPT_SLOT_ACTIVE_LAST,
                              lib.CRYPT_SLOT_UNBOUND})
PROC_MISC = "/proc/misc"
DM_CONTROL = "/dev/mapper/control"
MIN_HEADER_BYTES = 4096  # libcryptsetup reads this much before it looks for a signature


class LuksError(HostelError):
    """libcryptsetup refused; the message names the device and says why."""


class NotLuks(LuksError):
    dbus_name = f"{ERROR_PREFIX}.NotLuks"


class WrongKey(LuksError):
    dbus_name = f"{ERROR_PREFIX}.WrongKey"


class DeviceMapperUnavailable(NotSupported):
    """Attaching needs device-mapper; saying so beats libcryptsetup's 'name is invalid'."""


@dataclass(frozen=True)
class LuksInfo:
    version: int                 # 1 or 2
    uuid: str
    cipher: str                  # cipher-mode, as crypttab and cryptsetup spell it
    key_slots: tuple[int, ...]   # slots holding a key
    label: str                   # LUKS2 only; "" for LUKS1


@dataclass(frozen=True)
class Key:
    """What unlocks a volume: a passphrase, or a key file (part of it, per crypttab's
    keyfile-size= and keyfile-offset=)."""

    passphrase: bytes | None = None
    key_file: str | None = None
    key_file_size: int = 0       # 0: to the end of the file
    key_file_offset: int = 0

    def __post_init__(self) -> None:
        if (self.passphrase is None) == (self.key_file is None):
            raise ValueError("a Key is either a passphrase or a key file")


# Logging ---------------------------------------------------------------------------

_thread = threading.local()


@ffi.def_extern()
def hostel_luks_log(level: int, msg: object, _usrptr: object) -> None:
    lines = getattr(_thread, "lines", None)
    if lines is not None and level in (lib.CRYPT_LOG_ERROR, lib.CRYPT_LOG_NORMAL):
        lines.append(ffi.string(msg).decode(errors="replace").strip())


lib.crypt_set_log_callback(ffi.NULL, lib.hostel_luks_log, ffi.NULL)


@contextmanager
def _collecting_log() -> Iterator[list[str]]:
    _thread.lines = []
    try:
        yield _thread.lines
    finally:
        _thread.lines = None


def _failure(rc: int, what: str, log_lines: list[str]) -> str:
    reason = os.strerror(-rc) if rc < 0 else f"error {rc}"
    said = "; ".join(line for line in log_lines if line)
    return f"{what}: {reason}" + (f" (libcryptsetup: {said})" if said else "")


# Contexts --------------------------------------------------------------------------

@contextmanager
def _device(device: str, header: str | None = None) -> Iterator[tuple[object, list[str]]]:
    """A libcryptsetup context on device (with a detached header, if given), freed after."""
    with _collecting_log() as log_lines:
        cd = ffi.new("struct crypt_device **")
        if header:
            rc = lib.crypt_init_data_device(cd, header.encode(), device.encode())
        else:
            rc = lib.crypt_init(cd, device.encode())
        if rc < 0:
            raise LuksError(_failure(rc, f"cannot open {device}", log_lines))
        try:
            yield cd[0], log_lines
        finally:
            lib.crypt_free(cd[0])


def _load(cd: object, device: str, log_lines: list[str]) -> None:
    rc = lib.crypt_load(cd, ffi.NULL, ffi.NULL)  # NULL type: LUKS1 or LUKS2
    if rc == -errno.EINVAL:
        raise NotLuks(f"{device} is not a LUKS device (no LUKS1 or LUKS2 header found)")
    if rc == -errno.EIO and 0 <= _size(device) < MIN_HEADER_BYTES:
        raise NotLuks(f"{device} is not a LUKS device (smaller than any LUKS header)")
    if rc < 0:
        raise LuksError(_failure(rc, f"cannot read the LUKS header of {device}", log_lines))


def _size(device: str) -> int:
    """Bytes in device (a file or a block device); -1 when it cannot be opened."""
    try:
        with open(device, "rb") as f:
            return f.seek(0, os.SEEK_END)
    except OSError:
        return -1


def _text(ptr: object) -> str:
    return "" if ptr == ffi.NULL else ffi.string(ptr).decode(errors="replace")


# Header facts ----------------------------------------------------------------------

def read_header(device: str, header: str | None = None) -> LuksInfo:
    """The LUKS facts of device; NotLuks when it has no LUKS header."""
    with _device(device, header) as (cd, log_lines):
        _load(cd, device, log_lines)
        luks_type = _text(lib.crypt_get_type(cd))
        slots = tuple(slot for slot in range(lib.crypt_keyslot_max(luks_type.encode()))
                      if lib.crypt_keyslot_status(cd, slot) in KEY_SLOTS_IN_USE)
        return LuksInfo(version=LUKS_TYPES[luks_type], uuid=_text(lib.crypt_get_uuid(cd)),
                        cipher=f"{_text(lib.crypt_get_cipher(cd))}-"
                               f"{_text(lib.crypt_get_cipher_mode(cd))}",
                        key_slots=slots, label=_text(lib.crypt_get_label(cd)))


# Keys and activation ----------------------------------------------------------------

def _activate(cd: object, name: str | None, key: Key, flags: int) -> int:
    target = ffi.NULL if name is None else name.encode()
    if key.passphrase is not None:
        return lib.crypt_activate_by_passphrase(cd, target, lib.CRYPT_ANY_SLOT, key.passphrase,
                                                len(key.passphrase), flags)
    assert key.key_file is not None, "a Key without a passphrase has a key file (__post_init__)"
    return lib.crypt_activate_by_keyfile_device_offset(
        cd, target, lib.CRYPT_ANY_SLOT, key.key_file.encode(), key.key_file_size,
        key.key_file_offset, flags)


def _describe(key: Key) -> str:
    return "the passphrase" if key.passphrase is not None else f"key file {key.key_file}"


def check_key(device: str, key: Key, header: str | None = None) -> bool:
    """Whether key opens a key slot of device, without device-mapper (libcryptsetup's
    activation with no name does the whole unlock except creating the mapping)."""
    with _device(device, header) as (cd, log_lines):
        _load(cd, device, log_lines)
        rc = _activate(cd, None, key, 0)
        if rc >= 0:
            return True
        if rc == -errno.EPERM:
            return False
        raise LuksError(_failure(rc, f"cannot check {_describe(key)} against {device}", log_lines))


def device_mapper_missing() -> str | None:
    """Why this kernel cannot map volumes, or None when it can."""
    try:
        with open(PROC_MISC) as f:
            names = {line.split()[1] for line in f if len(line.split()) == 2}
    except OSError as e:
        return f"cannot read {PROC_MISC} to look for device-mapper: {e.strerror}"
    if "device-mapper" not in names:
        return ("this kernel has no device-mapper ('device-mapper' is not in /proc/misc): "
                "load it with 'modprobe dm_mod', or boot a kernel with CONFIG_BLK_DEV_DM")
    if not os.path.exists(DM_CONTROL):
        return (f"device-mapper is loaded but {DM_CONTROL} is missing: "
                "create it with 'dmsetup mknodes'")
    return None


def activate(name: str, device: str, key: Key, header: str | None = None,
             read_only: bool = False, discard: bool = False) -> None:
    """Map device as /dev/mapper/name.  On failure libcryptsetup has already undone
    its own steps (the loop device for a file, the half-made mapping)."""
    flags = (lib.CRYPT_ACTIVATE_READONLY if read_only else 0) | \
        (lib.CRYPT_ACTIVATE_ALLOW_DISCARDS if discard else 0)
    with _device(device, header) as (cd, log_lines):
        _load(cd, device, log_lines)
        rc = _activate(cd, name, key, flags)
        if rc >= 0:
            return
        if rc == -errno.EPERM:
            raise WrongKey(f"{_describe(key)} opens no key slot of {device}")
        missing = device_mapper_missing()
        if missing is not None:
            raise DeviceMapperUnavailable(f"cannot attach {name} ({device}): {missing}")
        raise LuksError(_failure(rc, f"cannot attach {name} ({device})", log_lines))


def deactivate(name: str) -> None:
    """Remove the mapping /dev/mapper/name."""
    with _collecting_log() as log_lines:
        cd = ffi.new("struct crypt_device **")
        rc = lib.crypt_init_by_name(cd, name.encode())
        if rc < 0:
            raise LuksError(_failure(rc, f"cannot detach {name}", log_lines))
        try:
            rc = lib.crypt_deactivate(cd[0], name.encode())
        finally:
            lib.crypt_free(cd[0])
        if rc < 0:
            raise LuksError(_failure(rc, f"cannot detach {name}", log_lines))


# Formatting ---------------------------------------------------------------------------

def format_volume(path: str, version: int, passphrases: list[bytes], *, label: str = "",
                  uuid: str | None = None, pbkdf2_iterations: int | None = None,
                  cipher: str = "aes", mode: str = "xts-plain64", key_bytes: int = 64) -> None:
    """Write a LUKS header to path with one key slot per passphrase (slots 0, 1, ...).

    pbkdf2_iterations fixes a PBKDF2 cost instead of libcryptsetup's benchmarked
    one: cheap keys for tests, never for real data."""
    if version not in (1, 2):
        raise ValueError(f"LUKS version must be 1 or 2, not {version}")
    if label and version == 1:
        raise ValueError("LUKS1 headers have no label")
    # cffi frees what ffi.new returned once nothing refers to it: keep the strings
    # the parameter structs point at alive until crypt_format has read them.
    keep = [ffi.new("char[]", text) for text in (b"pbkdf2", b"sha256", label.encode())]
    pbkdf = ffi.NULL
    if pbkdf2_iterations is not None:
        pbkdf = ffi.new("struct crypt_pbkdf_type *", {
            "type": keep[0], "hash": keep[1], "iterations": pbkdf2_iterations,
            "flags": lib.CRYPT_PBKDF_NO_BENCHMARK})
    if version == 1:
        params = ffi.new("struct crypt_params_luks1 *", {"hash": keep[1]})
    else:
        params = ffi.new("struct crypt_params_luks2 *",
                         {"pbkdf": pbkdf, "label": keep[2] if label else ffi.NULL})
    with _device(path) as (cd, log_lines):
        if pbkdf != ffi.NULL:
            _checked(lib.crypt_set_pbkdf_type(cd, pbkdf), f"setting the PBKDF for {path}", log_lines)
        _checked(lib.crypt_format(cd, f"LUKS{version}".encode(), cipher.encode(), mode.encode(),
                                  uuid.encode() if uuid else ffi.NULL, ffi.NULL, key_bytes, params),
                 f"formatting {path} as LUKS{version}", log_lines)
        for passphrase in passphrases:
            _checked(lib.crypt_keyslot_add_by_volume_key(cd, lib.CRYPT_ANY_SLOT, ffi.NULL, 0,
                                                         passphrase, len(passphrase)),
                     f"adding a key slot to {path}", log_lines)


def _checked(rc: int, what: str, log_lines: list[str]) -> None:
    if rc < 0:
        raise LuksError(_failure(rc, what, log_lines))


# Finding devices ------------------------------------------------------------------------

def evaluate_spec(spec: str) -> str | None:
    """The device node a TAG=value spec names (udev's /dev/disk/by-* links, else a scan
    of the block devices through libblkid's cache), or None."""
    found = lib.blkid_evaluate_spec(spec.encode(), ffi.NULL)
    if found == ffi.NULL:
        return None
    try:
        return ffi.string(found).decode(errors="surrogateescape")
    finally:
        lib.free(found)
