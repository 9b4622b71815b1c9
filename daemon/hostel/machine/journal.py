"""--link-journal: make the container's journal visible on the host, as the seed's setup_journal.

guest: the host's /var/log/journal/ID is a symlink to the container's
directory; host: the container's directory is a bind mount of the host's;
auto: bind when the host already has the directory; try-*: failures are
not fatal. Host-side changes happen in the parent, the bind in the child."""
from __future__ import annotations

import logging
import os

from hostel.bus import HostelError
from hostel.machine import rootfs
from hostel.machine.settings import MachineSettings
from hostel.spawn import Plan

log = logging.getLogger(__name__)
HOST_JOURNAL = "/var/log/journal"


class JournalLinkError(HostelError):
    pass


def _host_machine_id() -> str | None:
    try:
        return open("/etc/machine-id").read().strip() or None
    except OSError:
        return None


def _guest_machine_id(view: str) -> str | None:
    try:
        data = rootfs.read_file_in_root(view, "etc/machine-id", 4096)
        text = (data or b"").decode("ascii").strip()
    except (rootfs.RootfsError, UnicodeDecodeError):
        return None
    return text if len(text) == 32 and all(c in "0123456789abcdef" for c in text) else None


def plan_journal(plan: Plan, root: str, view: str | None, settings: MachineSettings,
                 machine_id: str | None = None) -> None:
    """`machine_id`: the machine's (the tree's, else --uuid's, as in 252), else the tree's."""
    mode, tried = settings.link_journal, settings.link_journal_try
    if mode == "no" or settings.ephemeral or view is None:
        return
    machine_id = machine_id or _guest_machine_id(view)
    if machine_id is None:
        if mode == "auto":
            return
        raise JournalLinkError(f"--link-journal={mode}: cannot read a machine ID from "
                               f"{view}/etc/machine-id")
    if machine_id == _host_machine_id():
        if mode == "auto":
            log.warning("host and machine ids are equal (%s): refusing to link journals", machine_id)
            return
        raise JournalLinkError(f"host and machine ids are equal ({machine_id}): refusing to "
                               "link journals")
    try:  # whatever the mode, as 252 does
        rootfs.makedirs_in_root(view, "/var/log/journal")
    except OSError as e:
        if tried or mode == "auto":
            log.debug("skipping journal setup: %s", e)
            return
        raise JournalLinkError(f"--link-journal={mode}: creating /var/log/journal: {e}") from e
    host_dir = f"{HOST_JOURNAL}/{machine_id}"
    guest_dir = f"{view}/var/log/journal/{machine_id}"
    try:
        _prepare_host_side(mode, host_dir, guest_dir, view)
    except OSError as e:
        if tried:
            log.debug("skipping journal setup: %s", e)
            return
        raise JournalLinkError(f"--link-journal={mode}: {e}") from e
    if mode == "host" or (mode == "auto" and os.path.isdir(host_dir) and not os.path.islink(host_dir)):
        rootfs.makedirs_in_root(view, guest_dir[len(view):])
        plan.bind(host_dir, f"{root}/var/log/journal/{machine_id}", recursive=False)


def _prepare_host_side(mode: str, host_dir: str, guest_dir: str, view: str) -> None:
    """The host's side; the guest's directory is made inside the tree, never through
    the tree's symlinks (a /var pointing at a host directory)."""
    if os.path.islink(host_dir):
        if mode in ("guest", "auto") and os.readlink(host_dir) == guest_dir:
            rootfs.makedirs_in_root(view, guest_dir[len(view):])
            return
        os.unlink(host_dir)
    if mode == "guest":
        if os.path.isdir(host_dir):
            os.rmdir(host_dir)  # only an empty one: never throw away a host journal
        rootfs.makedirs_in_root(view, guest_dir[len(view):])
        os.symlink(guest_dir, host_dir)
    elif mode == "host":
        os.makedirs(host_dir, 0o755, exist_ok=True)
