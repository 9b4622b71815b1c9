"""--overlay and --overlay-ro: overlay file systems of host trees, mounted into the container.

nspawn 252's syntax: colon-separated paths ("\\:" for a colon in one), the
last the mount point in the container; with three or more, the ones before
are host trees from lowest to highest, and with --overlay the highest takes
the writes; with two, the second is both the upper tree (on the host) and the
mount point. A source may start with "+" (relative to the container's root
tree) and the upper tree may be empty (a fresh directory below /var/tmp,
removed when the container ends). overlayfs' workdir is made next to the
upper tree by hosteld, and removed at the end."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass

from hostel import native
from hostel.errors import InvalidArgs
from hostel.spawn import Plan

TEMPORARY_UPPER_PARENT = "/var/tmp"


@dataclass(frozen=True)
class Overlay:
    lowers: tuple[str, ...]      # lowest first; "+/x" is relative to the container's root
    upper: str | None            # None: read-only; "": a temporary directory
    destination: str
    read_only: bool


@dataclass(frozen=True)
class ResolvedOverlay:
    """The paths the child mounts ("+" ones inside the container's root), workdir made."""

    lowers: tuple[str, ...]
    upper: str | None
    workdir: str | None
    destination: str


def split_escaped(spec: str) -> list[str]:
    """Split on ':' not preceded by a backslash; backslash escapes are interpreted."""
    parts, current, escaped = [], [], False
    for char in spec:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _source(path: str, cwd: str | None, option: str) -> str:
    if path.startswith("+"):
        inner = path[1:]
        if not inner.startswith("/"):
            raise InvalidArgs(f"{option}: {path}: a '+' path must be absolute inside the root")
        return "+" + os.path.normpath(inner)
    if not path.startswith("/"):
        if cwd is None:
            raise InvalidArgs(f"{option}: {path} is relative and there is no caller directory")
        path = os.path.join(cwd, path)
    return os.path.normpath(path)


def parse_overlay(spec: str, read_only: bool, cwd: str | None) -> Overlay:
    option = f"--overlay{'-ro' if read_only else ''}={spec}"
    paths = split_escaped(spec)
    if len(paths) < 2:
        raise InvalidArgs(f"{option}: needs at least two paths (SOURCE...:DESTINATION)")
    destination = paths[-1]
    if not destination.startswith("/"):
        raise InvalidArgs(f"{option}: the destination {destination!r} must be absolute")
    sources = paths[:-1] if len(paths) > 2 else [paths[0], paths[1]]
    if read_only:
        lowers, upper = sources, None
    else:
        lowers, upper = sources[:-1], sources[-1]
    if any(not p for p in lowers):
        raise InvalidArgs(f"{option}: only the upper tree may be empty")
    resolved_upper = None if upper is None else ("" if upper == "" else _source(upper, cwd, option))
    return Overlay(tuple(_source(p, cwd, option) for p in lowers), resolved_upper,
                   os.path.normpath(destination), read_only)


def prepare(overlays: list[Overlay], view: str | None, cleanup: ExitStack) -> list[ResolvedOverlay]:
    """Make the temporary upper trees and the workdirs (removed by `cleanup`). `view` is the
    container's tree as hosteld sees it, for "+" paths (None: an image, which has none)."""
    resolved = []
    for overlay in overlays:
        upper = overlay.upper
        if upper == "":
            upper = tempfile.mkdtemp(prefix="hostel-overlay-", dir=TEMPORARY_UPPER_PARENT)
            cleanup.callback(shutil.rmtree, upper, True)
        workdir = None
        if upper is not None:
            inner = upper.removeprefix("+")
            workdir = tempfile.mkdtemp(prefix=f".#{os.path.basename(inner)}.",
                                       dir=os.path.dirname(_host(upper, view)))
            cleanup.callback(shutil.rmtree, workdir, True)
            if upper.startswith("+"):
                workdir = "+" + os.path.join(os.path.dirname(inner), os.path.basename(workdir))
        resolved.append(ResolvedOverlay(overlay.lowers, upper, workdir, overlay.destination))
    return resolved


def _host(path: str, root: str | None) -> str:
    """A source path where `root` shows the container's tree ("+" paths are inside it)."""
    if not path.startswith("+"):
        return path
    if root is None:
        raise InvalidArgs(f"--overlay: {path}: '+' paths need a directory tree, not an image")
    return f"{root}{path[1:]}"


def plan_overlays(plan: Plan, root: str, overlays: list[ResolvedOverlay]) -> None:
    from hostel.machine.mounts import mkdir_p

    for overlay in overlays:
        mkdir_p(plan, root, overlay.destination)
        lowers = [_host(p, root) for p in reversed(overlay.lowers)]  # overlayfs: highest first
        options = "lowerdir=" + ":".join(lowers)
        if overlay.upper is not None and overlay.workdir is not None:
            options += (f",upperdir={_host(overlay.upper, root)},"
                        f"workdir={_host(overlay.workdir, root)}")
        plan.mount("overlay", f"{root}{overlay.destination}", "overlay",
                   native.MS_RDONLY if overlay.upper is None else 0, options)
