"""--user: resolving a user of the container, and becoming that user before execve.

nspawn asks the container's own NSS (getent, run inside the container). hostel
reads the container's /etc/passwd and /etc/group instead: the daemon gets the
bytes however the root is stored (a directory, a mounted image), parses them
here, and never runs a guest binary to find out who a user is. The answers
match `getent passwd USER` and `getent initgroups USER` for files-only NSS."""
from __future__ import annotations

import posixpath
from dataclasses import dataclass, replace

from hostel.bus import HostelError, InvalidArgs
from hostel.machine.capabilities import mask_of
from hostel.spawn import Plan

_ID_MAX = 0xFFFFFFFE  # (uid_t) -1 means "no change" to the kernel, so it is never an id


class ContainerUserError(HostelError):
    """The container's user database cannot be used as it is."""


@dataclass(frozen=True)
class UserIds:
    uid: int
    gid: int
    groups: tuple[int, ...]  # supplementary groups (memberships in /etc/group)
    home: str
    name: str


ROOT = UserIds(uid=0, gid=0, groups=(), home="/root", name="root")


@dataclass(frozen=True)
class _Entry:
    lineno: int
    fields: list[str]


def _entries(data: bytes, path: str, nfields: int) -> list[_Entry]:
    """The records of a colon-separated database; blank and '#' lines skipped, as nss_files does."""
    out = []
    text = data.decode("utf-8", "surrogateescape")
    for lineno, line in enumerate(text.split("\n"), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        fields = line.rstrip("\r").split(":")
        if len(fields) != nfields:
            raise ContainerUserError(
                f"line {lineno} of the container's {path} has {len(fields)} fields, "
                f"not {nfields}: {line!r}; fix that file in the container")
        out.append(_Entry(lineno, fields))
    return out


def _parse_id(text: str, what: str, path: str, lineno: int) -> int:
    if text.isdigit() and text.isascii() and int(text) <= _ID_MAX:
        return int(text)
    raise ContainerUserError(f"line {lineno} of the container's {path} has an invalid {what} "
                             f"{text!r}; fix that file in the container")


def _validate_user_argument(user: str) -> None:
    if not user or any(c in user for c in ":\n\0/") or len(user) > 256:
        raise InvalidArgs(f"invalid user name {user!r} in --user: it must be a non-empty "
                          "name or number without ':', '/', newlines or NUL")


def _passwd(data: bytes) -> list[UserIds]:
    """Every account in /etc/passwd, with its fields checked (groups filled in later)."""
    users = []
    for entry in _entries(data, "/etc/passwd", 7):
        name, _pw, uid_text, gid_text, _gecos, home, _shell = entry.fields
        uid = _parse_id(uid_text, "UID", "/etc/passwd", entry.lineno)
        gid = _parse_id(gid_text, "GID", "/etc/passwd", entry.lineno)
        if not posixpath.isabs(home):
            raise ContainerUserError(
                f"user {name!r} has home directory {home!r} on line {entry.lineno} of the "
                "container's /etc/passwd, which is not an absolute path; fix that file")
        users.append(UserIds(uid, gid, (), posixpath.normpath(home), name))
    return users


def _memberships(name: str, data: bytes) -> tuple[int, ...]:
    """The groups listing `name` as a member, in file order, like `getent initgroups`.

    The primary group is not added: getent initgroups leaves it out, and the
    gid passed to setresgid covers it."""
    gids: list[int] = []
    for entry in _entries(data, "/etc/group", 4):
        _group, _pw, gid_text, members = entry.fields
        gid = _parse_id(gid_text, "GID", "/etc/group", entry.lineno)
        if name in members.split(",") and gid not in gids:
            gids.append(gid)
    return tuple(gids)


def resolve_user(user: str | None, passwd: bytes, group: bytes,
                 bound: tuple[UserIds, ...] = ()) -> UserIds:
    """Who `user` (a name, or a number meaning a UID, as --user takes it) is in the container.

    root, by name or as 0, is not looked up: like nspawn, it always means ids 0
    with no supplementary groups, even in a container without /etc/passwd. After
    /etc/passwd come the --bind-user users (`bound`), as nss-systemd finds them in
    /run/host/userdb after the files."""
    if user is None or user in ("root", "0"):
        return ROOT
    _validate_user_argument(user)
    by_uid = user.isdigit() and user.isascii()
    for account in _passwd(passwd):
        if (account.uid == int(user)) if by_uid else (account.name == user):
            return replace(account, groups=_memberships(account.name, group))
    for account in bound:
        if (account.uid == int(user)) if by_uid else (account.name == user):
            return account
    raise InvalidArgs(f"user {user!r} not found in the container's /etc/passwd")


def plan_change_user(plan: Plan, ids: UserIds) -> list[str]:
    """Become `ids` at this point of the plan; return HOME, USER and LOGNAME for the payload.

    Must come after every step that needs privileges (mounts, chroot or
    pivot_root, dropping the bounding set, loading seccomp) and before execve;
    paths are as the container sees them. A missing home is created owned by
    the user, but an existing one is left alone (a home such as /usr/sbin must
    never change owner): the trampoline creates it after switching ids, with
    CAP_DAC_OVERRIDE raised for just that mkdir, so the kernel gives the new
    directory to the user and never touches one that exists."""
    env = [f"HOME={ids.home}", f"USER={ids.name}", f"LOGNAME={ids.name}"]
    if ids.uid == 0:
        plan.setgroups(ids.groups)
        plan.setresgid(ids.gid)
        plan.setresuid(ids.uid)
        return env
    for parent in _parents(ids.home):
        plan.mkdir(parent, 0o755)
    plan.setgroups(ids.groups)
    plan.setresgid(ids.gid)
    plan.keep_caps(True)
    plan.setresuid(ids.uid)
    override = mask_of("CAP_DAC_OVERRIDE")
    plan.set_caps(effective=override, permitted=override, inheritable=0)
    plan.mkdir(ids.home, 0o755)
    plan.set_caps(effective=0, permitted=0, inheritable=0)
    plan.keep_caps(False)
    return env


def _parents(path: str) -> list[str]:
    """The ancestors of an absolute path, outermost first, without "/"."""
    parts = path.strip("/").split("/")[:-1]
    return ["/" + "/".join(parts[:i]) for i in range(1, len(parts) + 1)]


LOGINUID_UNSET = b"4294967295"


def plan_reset_loginuid(plan: Plan, own: str = "/proc/self/loginuid") -> None:
    """Unset the audit login uid the container would inherit from hosteld, if any.

    A container's processes belong to no login session of the host, and a set
    loginuid stops the container's own login machinery from setting its own.
    The child inherits hosteld's value, so reading ours decides whether the
    step is needed at all; the step goes before any mount, while /proc/self is
    still the host's view of the child."""
    try:
        with open(own, "rb") as f:
            current = f.read().strip()
    except FileNotFoundError:
        return  # kernel without audit: nothing to reset
    if current != LOGINUID_UNSET:
        plan.write_file("/proc/self/loginuid", LOGINUID_UNSET, create=False)
