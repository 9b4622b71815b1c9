"""--bind-user=NAME: a host user, with its home, inside a user-namespaced container.

As systemd-nspawn 252 does it: the user gets a container uid (and gid) from 60514
up (systemd's range for host users mapped into containers), which the namespace's
maps send to the user's host uid and primary gid instead of the container's
range; its home is bound, as it is, at /run/host/home/NAME (the maps make its
files the user's inside); and the container learns who the user is from JSON
user and group records in /run/host/userdb (NAME.user, NAME.group, the hashed
password in NAME.user-privileged, mode 0600, and UID.* links to them), which a
systemd inside reads as userdb drop-ins (nss-systemd). Host root and nobody are
refused, as is a name the container's own /etc/passwd or /etc/group has."""
from __future__ import annotations

import grp
import json
import os
import pwd
from dataclasses import dataclass

from hostel import native
from hostel.bus import HostelError, InvalidArgs
from hostel.machine.users import UserIds
from hostel.spawn import Plan

UID_MIN, UID_MAX = 60514, 60577   # systemd's "host users mapped into containers"
HOME_DIRECTORY = "/run/host/home"
USERDB_DIRECTORY = "/run/host/userdb"
SERVICE = "io.systemd.NSpawn"
SHADOW = "/etc/shadow"
_REFUSED_UIDS = (0, 65534)          # root and nobody: 252 will not map them


class BindUserError(HostelError):
    """A --bind-user= user that cannot be bound into this container."""


@dataclass
class BoundUser:
    """One host user as the container has it; `home_fd` is its home, a detached mount."""

    name: str
    group: str                       # the name of its primary group on the host
    host_uid: int
    host_gid: int
    host_home: str
    uid: int                         # its uid, and its group's gid, in the container
    hashed_password: str | None
    home_fd: int = -1

    @property
    def home(self) -> str:
        return f"{HOME_DIRECTORY}/{self.name}"

    @property
    def ids(self) -> UserIds:
        """The user as --user=NAME finds it (no groups but its own, as its record says)."""
        return UserIds(uid=self.uid, gid=self.uid, groups=(), home=self.home, name=self.name)


def parse_names(names: list[str]) -> list[str]:
    """The --bind-user= names, each once (252 drops repeats), valid as user names."""
    unique: list[str] = []
    for name in names:
        if not _valid_name(name):
            raise InvalidArgs(f"Invalid user name to bind: {name}")
        if name not in unique:
            unique.append(name)
    return unique


def _valid_name(name: str) -> bool:
    """systemd's strict user name rule: [a-zA-Z_][a-zA-Z0-9_-]*, at most 31 characters."""
    return 0 < len(name) <= 31 and name.isascii() and (name[0].isalpha() or name[0] == "_") \
        and all(c.isalnum() or c in "_-" for c in name)


def resolve(names: list[str], passwd: bytes, group: bytes, range_size: int) -> list[BoundUser]:
    """Look the users up on the host (NSS) and give each a free container uid; blocks
    (NSS, /etc/shadow): call it from a thread. `passwd` and `group` are the container's."""
    if not names:
        return []
    if range_size <= UID_MAX:
        raise BindUserError(f"--bind-user= needs a user namespace range of more than {UID_MAX} "
                            f"ids (for the bound users' uids {UID_MIN}..{UID_MAX}), not "
                            f"{range_size}; use --private-users=pick")
    users_inside, uids_inside = _names_and_ids(passwd)
    groups_inside, gids_inside = _names_and_ids(group)
    bound: list[BoundUser] = []
    candidate = UID_MIN
    for name in names:
        entry = _host_user(name)
        group_name = _host_group(entry)
        if entry.pw_name in users_inside:
            raise BindUserError(f"Sorry, specified user '{entry.pw_name}' already exists in "
                                "the container.")
        if group_name in groups_inside:
            raise BindUserError(f"Sorry, specified group '{group_name}' already exists in "
                                "the container.")
        while candidate in uids_inside or candidate in gids_inside:
            candidate += 1
        if candidate > UID_MAX:
            raise BindUserError(f"No free uid left in {UID_MIN}..{UID_MAX} for user '{name}' "
                                "in the container")
        bound.append(BoundUser(entry.pw_name, group_name, entry.pw_uid, entry.pw_gid,
                               entry.pw_dir, candidate, _hashed_password(entry.pw_name)))
        candidate += 1
    return bound


def _host_user(name: str) -> pwd.struct_passwd:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise BindUserError(f"Failed to resolve user '{name}': No such process") from None
    if entry.pw_uid in _REFUSED_UIDS:
        raise BindUserError(f"Mapping '{name}' user not supported, sorry.")
    if not os.path.isabs(entry.pw_dir):
        raise BindUserError(f"User '{name}' has no absolute home directory on the host "
                            f"({entry.pw_dir!r}); give it one to bind it")
    return entry


def _host_group(entry: pwd.struct_passwd) -> str:
    try:
        return grp.getgrgid(entry.pw_gid).gr_name
    except KeyError:
        raise BindUserError(f"Failed to resolve group of user '{entry.pw_name}' "
                            f"(gid {entry.pw_gid}): No such process") from None


def _hashed_password(name: str) -> str | None:
    """The user's hashed password from the host's shadow file, if it has one there."""
    try:
        with open(SHADOW, "rb") as f:
            lines = f.read().decode("utf-8", "surrogateescape").split("\n")
    except FileNotFoundError:
        return None
    for line in lines:
        fields = line.split(":")
        if len(fields) > 1 and fields[0] == name:
            return fields[1]
    return None


def _names_and_ids(database: bytes) -> tuple[set[str], set[int]]:
    """Names and ids (third field) of a passwd or group file, tolerating odd lines: a
    line that cannot be read claims nothing."""
    names, ids = set(), set()
    for line in database.decode("utf-8", "surrogateescape").split("\n"):
        fields = line.split(":")
        if len(fields) < 3 or line.startswith("#"):
            continue
        names.add(fields[0])
        if fields[2].isdigit():
            ids.add(int(fields[2]))
    return names, ids


def open_homes(bound: list[BoundUser]) -> None:
    """Clone each home's mount here, in hosteld's namespace, for the child to attach
    (the container's root may not reach it on the host). The caller closes home_fd."""
    for user in bound:
        try:
            user.home_fd = native.open_tree(user.host_home)
        except OSError as exc:
            raise BindUserError(f"Failed to bind home directory {user.host_home} of user "
                                f"'{user.name}': {exc.strerror}") from exc


def close_homes(bound: list[BoundUser]) -> None:
    """Close the homes' detached mounts (unmounting those the child never attached)."""
    for user in bound:
        if user.home_fd >= 0:
            os.close(user.home_fd)
            user.home_fd = -1


def id_map(base: int, size: int, bound: list[BoundUser], gids: bool) -> str:
    """The namespace's uid (or gid) map: the range at `base`, with a hole per bound user
    that maps its container id to its host uid (or primary gid) instead."""
    lines = []
    start = 0
    for user in sorted(bound, key=lambda u: u.uid):
        if user.uid > start:
            lines.append(f"{start} {base + start} {user.uid - start}")
        lines.append(f"{user.uid} {user.host_gid if gids else user.host_uid} 1")
        start = user.uid + 1
    if start < size:
        lines.append(f"{start} {base + start} {size - start}")
    return "".join(f"{line}\n" for line in lines)


def user_record(user: BoundUser) -> bytes:
    return _json({"userName": user.name, "uid": user.uid, "gid": user.uid,
                  "homeDirectory": user.home, "service": SERVICE})


def group_record(user: BoundUser) -> bytes:
    return _json({"groupName": user.group, "gid": user.uid, "service": SERVICE})


def privileged_record(user: BoundUser) -> bytes:
    return _json({"privileged": {"hashedPassword": [user.hashed_password]}})


def _json(record: dict[str, object]) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


def plan_bind_users(plan: Plan, root: str, bound: list[BoundUser]) -> None:
    """The homes at /run/host/home/NAME and the records in /run/host/userdb (after /run
    is mounted; paths below `root`, as the container sees them once inside)."""
    if not bound:
        return
    for directory in ("/run/host", HOME_DIRECTORY, USERDB_DIRECTORY):
        plan.mkdir(f"{root}{directory}", 0o755)
    for user in bound:
        target = f"{root}{user.home}"
        plan.mkdir(target, 0o755)
        plan.attach_mount(user.home_fd, target, f"the home {user.host_home} of user {user.name}")
        db = f"{root}{USERDB_DIRECTORY}"
        plan.write_file(f"{db}/{user.name}.user", user_record(user), 0o644)
        plan.symlink(f"{user.name}.user", f"{db}/{user.uid}.user")
        plan.write_file(f"{db}/{user.group}.group", group_record(user), 0o644)
        plan.symlink(f"{user.group}.group", f"{db}/{user.uid}.group")
        if user.hashed_password is not None:
            plan.write_file(f"{db}/{user.name}.user-privileged", privileged_record(user), 0o600)
            plan.symlink(f"{user.name}.user-privileged", f"{db}/{user.uid}.user-privileged")
