"""Files the container takes from the host: timezone, resolv.conf, machine id.

As in the seed, these are conveniences: when the tree does not allow them
(read-only, a symlinked resolv.conf) the container starts anyway. The
`view` argument is a host path where the parent can read the container's
tree before it starts (the directory, or an ephemeral snapshot's lower
tree); None for disk images, whose trees the parent cannot see."""
from __future__ import annotations

import logging
import os
import uuid as uuidlib

from hostel.spawn import Plan

log = logging.getLogger(__name__)
ZONEINFO_PREFIXES = ("../usr/share/zoneinfo/", "/usr/share/zoneinfo/")


def _zone(link: str) -> str | None:
    for prefix in ZONEINFO_PREFIXES:
        if link.startswith(prefix):
            return link[len(prefix):]
    return None


def plan_timezone(plan: Plan, root: str, view: str | None, name: str) -> None:
    """Point the container's /etc/localtime at the host's zone, if it has that zone."""
    try:
        zone = _zone(os.readlink("/etc/localtime"))
    except OSError:
        log.debug("%s: /etc/localtime is not a symlink, not updating container timezone", name)
        return
    if zone is None or view is None:
        return
    try:
        if _zone(os.readlink(f"{view}/etc/localtime")) == zone:
            return
    except OSError:
        pass  # missing or not a link: replace it
    if not os.path.exists(f"{view}/usr/share/zoneinfo/{zone}"):
        log.warning("%s: timezone %s does not exist in container, not updating container "
                    "timezone", name, zone)
        return
    plan.unlink(f"{root}/etc/localtime", best_effort=True)
    plan.symlink(f"../usr/share/zoneinfo/{zone}", f"{root}/etc/localtime", best_effort=True)


def plan_resolv_conf(plan: Plan, root: str, private_network: bool) -> None:
    """Give the container the host's resolvers, unless it has no network to use them."""
    if private_network:
        return
    try:
        data = open("/etc/resolv.conf", "rb").read()
    except OSError:
        return
    plan.write_file(f"{root}/etc/resolv.conf", data, 0o644, best_effort=True)


def container_machine_id(view: str | None, requested: bytes | None) -> bytes:
    """The machine's 16-byte id: --uuid, else the tree's /etc/machine-id, else a random one."""
    if requested:
        return requested
    if view is not None:
        try:
            text = open(f"{view}/etc/machine-id").read().strip()
            return bytes.fromhex(text) if len(text) == 32 else uuidlib.uuid4().bytes
        except (OSError, ValueError):
            pass
    return uuidlib.uuid4().bytes


def plan_machine_id(plan: Plan, root: str, view: str | None, machine_id: bytes) -> None:
    """An empty /etc/machine-id (an image prepared for first boot) gets the machine's id,
    bound over it from /run so the tree itself is not written."""
    if view is None:
        return
    path = f"{view}/etc/machine-id"
    if not os.path.isfile(path) or os.path.getsize(path) != 0:
        return
    source = f"{root}/run/machine-id"
    plan.write_file(source, f"{machine_id.hex()}\n".encode(), 0o444)
    plan.bind(source, f"{root}/etc/machine-id", readonly=True, recursive=False)
