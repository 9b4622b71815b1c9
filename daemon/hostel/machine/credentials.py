"""--load-credential and --set-credential: systemd credentials for the payload, as nspawn 252.

The container gets them in 252's layout: a ramfs (never swapped out) at
/run/host/credentials, mode 0500, one file per credential, mode 0400, owned by
the container's root, then made read-only (nosuid, nodev, noexec); the payload
finds it through $CREDENTIALS_DIRECTORY. hosteld reads --load-credential's
file when the start is asked for (regular files only, never blocking), and a
credential, like all of them together, may have at most 1 MiB."""
from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass

from hostel import native
from hostel.errors import InvalidArgs
from hostel.spawn import Plan

DIRECTORY = "/run/host/credentials"
SIZE_MAX = 1024 * 1024
NAME_MAX = 255
_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v",
            "\\": "\\", '"': '"', "'": "'", "s": " "}
_ESCAPE = re.compile(r"\\(x[0-9A-Fa-f]{2}|[0-7]{3}|.)", re.DOTALL)


@dataclass(frozen=True)
class Credential:
    name: str
    data: bytes


def _check_name(name: str, option: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\0" in name or len(name) > NAME_MAX:
        raise InvalidArgs(f"Credential name is not valid: {name!r} ({option}=ID:..., ID a "
                          "file name)")


def unescape(text: str) -> bytes:
    """C-style escapes as systemd's cunescape takes them (\\n, \\t, \\xNN, \\NNN, ...)."""
    def one(match: re.Match[str]) -> str:
        code = match.group(1)
        if code[0] == "x":
            return chr(int(code[1:], 16))
        if code.isdigit() and len(code) == 3:
            return chr(int(code, 8))
        if code in _ESCAPES:
            return _ESCAPES[code]
        raise InvalidArgs(f"Failed to unescape credential value: unknown escape \\{code}")
    return _ESCAPE.sub(one, text).encode("utf-8", "surrogateescape")


def parse_set(spec: str) -> Credential:
    name, sep, value = spec.partition(":")
    if not sep:
        raise InvalidArgs(f"--set-credential= expects ID:VALUE: {spec}")
    _check_name(name, "--set-credential")
    return Credential(name, unescape(value))


def load(spec: str) -> Credential:
    """--load-credential=ID:PATH: the file's contents, read now."""
    name, sep, path = spec.partition(":")
    if not sep or not path:
        raise InvalidArgs(f"--load-credential= expects ID:PATH: {spec}")
    _check_name(name, "--load-credential")
    if not path.startswith("/"):
        raise InvalidArgs(f"--load-credential={spec}: the path must be absolute")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as e:
        raise InvalidArgs(f"Failed to read credential '{name}' from {path}: {e.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidArgs(f"Failed to read credential '{name}' from {path}: not a regular file")
        data = os.read(fd, SIZE_MAX + 1)
    except OSError as e:
        raise InvalidArgs(f"Failed to read credential '{name}' from {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > SIZE_MAX:
        raise InvalidArgs(f"Credential '{name}' from {path} is larger than {SIZE_MAX} bytes")
    return Credential(name, data)


def parse(set_specs: list[str], load_specs: list[str]) -> list[Credential]:
    """All credentials, each name once, no more than SIZE_MAX bytes in all (as 252)."""
    creds = [parse_set(s) for s in set_specs] + [load(s) for s in load_specs]
    seen: set[str] = set()
    for cred in creds:
        if cred.name in seen:
            raise InvalidArgs(f"Duplicate credential '{cred.name}', refusing.")
        seen.add(cred.name)
    if sum(len(c.data) for c in creds) > SIZE_MAX:
        raise InvalidArgs(f"The credentials are larger than {SIZE_MAX} bytes in all")
    return creds


def plan_credentials(plan: Plan, root: str, creds: list[Credential]) -> None:
    """Mount the ramfs, write the files, make it read-only: 252's /run/host/credentials."""
    if not creds:
        return
    target = f"{root}{DIRECTORY}"
    for path in ("/run/host", DIRECTORY):
        plan.mkdir(f"{root}{path}", 0o755)
    flags = native.MS_NOSUID | native.MS_NODEV | native.MS_NOEXEC
    plan.mount("none", target, "ramfs", flags, "mode=0500")
    for cred in creds:
        plan.write_file(f"{target}/{cred.name}", cred.data, 0o400)
    plan.mount(None, target, None, native.MS_REMOUNT | native.MS_BIND | native.MS_RDONLY | flags)
