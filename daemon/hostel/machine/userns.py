"""--private-users: the uid/gid map of a container's user namespace.

Container uids 0..RANGE-1 map to host uids BASE..BASE+RANGE-1, so root in
the container is an unprivileged uid on the host. "yes" takes BASE from the
owner of the root directory (as nspawn does); "pick" (and "yes" on a
root-owned tree) chooses a free, deterministic range in nspawn's window."""
from __future__ import annotations

import hashlib
import os

from hostel.bus import HostelError
from hostel.machine.settings import PrivateUsers

PICK_MIN = 0x00080000
PICK_MAX = 0x6FFF0000


class UidRangeUnavailable(HostelError):
    pass


def _ranges_in_use() -> list[tuple[int, int]]:
    """Host uid ranges already mapped into some user namespace (from every process)."""
    used = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            lines = open(f"/proc/{entry.name}/uid_map").read().split("\n")
        except OSError:
            continue
        for line in filter(None, lines):
            _inside, outside, count = map(int, line.split())
            if not (outside == 0 and count == 4294967295):  # the initial namespace
                used.add((outside, outside + count))
    return sorted(used)


def pick_uid_base(name: str, size: int) -> int:
    """A free base in [PICK_MIN, PICK_MAX), first tried where the name hashes to."""
    slots = (PICK_MAX - PICK_MIN) // 0x10000
    start = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") % slots
    used = _ranges_in_use()
    for i in range(slots):
        base = PICK_MIN + ((start + i) % slots) * 0x10000
        if base + size <= PICK_MAX and all(base + size <= lo or base >= hi for lo, hi in used):
            return base
    raise UidRangeUnavailable(f"no free uid range of {size} for machine {name} between "
                              f"{PICK_MIN} and {PICK_MAX}; give one with --private-users=UID:RANGE")


def uid_base(users: PrivateUsers, name: str, view: str | None) -> int:
    if users.base is not None:
        return users.base
    if users.mode == "root-owner" and view is not None:
        owner = os.stat(view).st_uid
        if owner != 0:
            return owner
    return pick_uid_base(name, users.range)


def write_id_maps(pid: int, users: PrivateUsers, name: str, view: str | None) -> int:
    """Map the child's namespace (it waits at its first step meanwhile); returns the base."""
    base = uid_base(users, name, view)
    mapping = f"0 {base} {users.range}\n"
    for map_name in ("uid_map", "gid_map"):
        with open(f"/proc/{pid}/{map_name}", "w") as f:
            f.write(mapping)
    return base
