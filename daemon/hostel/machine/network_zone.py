"""--network-zone=NAME: containers of one zone share the host bridge vz-NAME.

As in systemd-nspawn 252, the bridge is made when the first container of the
zone starts (created down: whoever serves the zone, systemd-networkd's
80-container-vz.network for one, configures and raises it), each container's
veth (vb-MACHINE) joins it, and the bridge is removed when a container leaves
it empty. Joining and leaving happen under 252's own system-wide lock,
/run/systemd/nspawn-network-zone, so hostel's containers and systemd-nspawn's
can share a zone without one removing the bridge the other is joining.

252 takes that lock with an OFD lock (fcntl F_OFD_SETLKW) in recent versions
and with flock() in older ones; the two kinds do not exclude each other, so
hostel takes both, flock first."""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from hostel.bus import HostelError, InvalidArgs
from hostel.machine import link_removal, rtnl

PREFIX = "vz-"
IFNAMSIZ = 16
LOCK_PATH = Path("/run/systemd/nspawn-network-zone")
LOCK_TIMEOUT = 10.0
SYS_CLASS_NET = Path("/sys/class/net")
F_OFD_SETLK = 37
JOIN_ATTEMPTS = 10  # 252's bound: someone removing the bridge as fast as we make it


class ZoneError(HostelError):
    """Joining or leaving a network zone failed."""


def _valid_ifname(name: str) -> bool:
    """systemd 252's ifname_valid(): at most 15 bytes of printable ASCII, none of
    ':', '/' and '%', and not "." or ".."."""
    if not name or len(name.encode()) >= IFNAMSIZ or name in (".", ".."):
        return False
    return all(32 < ord(c) < 127 and c not in ":/%" for c in name)


def bridge_name(zone: str) -> str:
    """The bridge of zone `zone`, vz-ZONE; refused with 252's words when no interface
    may have that name (so a zone name has at most 12 characters)."""
    name = PREFIX + zone
    if not _valid_ifname(name):
        raise InvalidArgs(f"Network zone name not valid: {name}")
    return name


@contextmanager
def zone_lock(path: Path = LOCK_PATH, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """Hold the system-wide zone lock (both kinds, see the module's docstring); give up
    after `timeout` seconds rather than hang a start behind a stuck holder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOCTTY, 0o600)
    try:
        deadline = time.monotonic() + timeout
        _wait_for(lambda: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB), path, deadline)
        whole_file = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        _wait_for(lambda: fcntl.fcntl(fd, F_OFD_SETLK, whole_file), path, deadline)
        yield
    finally:
        os.close(fd)  # releases both locks


def _wait_for(take: Callable[[], object], path: Path, deadline: float) -> None:
    while True:
        try:
            take()
            return
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise ZoneError(f"taking the network zone lock {path}: {err.strerror}") from err
        if time.monotonic() >= deadline:
            raise ZoneError(f"the network zone lock {path} has been held by another process "
                            "for too long; try again (a stuck systemd-nspawn?)")
        time.sleep(0.01)


def join_zone(host: rtnl.Rtnl, veth_index: int, veth: str, bridge: str) -> int:
    """Raise host veth `veth_index` and make it a port of the zone's bridge, creating the
    bridge if it does not exist yet; returns the bridge's index."""
    with zone_lock():
        for _ in range(JOIN_ATTEMPTS):
            try:
                index = socket.if_nametoindex(bridge)
            except OSError:
                _create_bridge(host, bridge)
                continue
            try:
                host.set_link(veth_index, up=True, master=index)
            except OSError as err:
                if err.errno == errno.ENODEV:  # removed between the lookup and the join
                    continue
                raise ZoneError(f"adding {veth} to the zone bridge {bridge}: {err.strerror}"
                                + _not_a_bridge(bridge)) from err
            return index
    raise ZoneError(f"adding {veth} to the zone bridge {bridge}: the bridge kept disappearing")


def _create_bridge(host: rtnl.Rtnl, bridge: str) -> None:
    try:
        host.add_bridge(bridge)
    except OSError as err:
        if err.errno != errno.EEXIST:
            raise ZoneError(f"creating the zone bridge {bridge}: {err.strerror}") from err


def _not_a_bridge(name: str) -> str:
    if (SYS_CLASS_NET / name).exists() and not (SYS_CLASS_NET / name / "bridge").is_dir():
        return f" ({name} exists and is not a bridge; remove it or pick another zone)"
    return ""


def leave_zone(host: rtnl.Rtnl, bridge: str, *, quick: bool = False) -> bool:
    """Remove the zone's bridge if no port is left on it (the caller's veth is gone
    already); returns whether it was removed. A bridge that is gone is fine.

    quick: return once the bridge is out of view, as 252's exit leaves it, and let a
    background thread wait for the kernel's acknowledgement (link_removal.py). The
    lock is held until then, so that no container joins the bridge being removed."""
    with zone_lock():
        try:
            if any((SYS_CLASS_NET / bridge / "brif").iterdir()):
                return False
            index = socket.if_nametoindex(bridge)
        except OSError:
            return False  # no such bridge (any more)
        try:
            if quick:
                link_removal.remove(index, bridge)
            else:
                host.delete_link(index)
        except OSError as err:
            if err.errno == errno.ENODEV:
                return False
            raise ZoneError(f"removing the empty zone bridge {bridge}: {err.strerror}") from err
        return True
