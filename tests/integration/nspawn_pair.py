"""Run the same container under systemd-nspawn 252 and under `hostelctl run`, on one tree.

nspawn gets a private /run (it keeps state under /run/systemd) and runs
unregistered in the caller's cgroup, so that it touches nothing of the host's
machined; both get stdin from /dev/null and pipes for stdout and stderr."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Callable

import pytest

from hostel.privatebus import DaemonProcess

from conftest import HOSTELCTL

NSPAWN = "/usr/bin/systemd-nspawn"
needs_nspawn = pytest.mark.skipif(not shutil.which("systemd-nspawn"),
                                  reason="systemd-nspawn not installed")


def nspawn(tree: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    argv = [NSPAWN, "--register=no", "--keep-unit", "-q", "-D", str(tree), *args]
    return subprocess.run(["/usr/bin/unshare", "-m", "--propagation=private", "/bin/sh", "-c",
                           'mount -t tmpfs tmpfs /run && exec "$@"', "sh", *argv],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)


def hostel(daemon: DaemonProcess, tree: Path, *args: str,
           timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HOSTELCTL, "run", "-q", "-D", str(tree), *args],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          env=daemon.environment(), timeout=timeout)


def both(daemon: DaemonProcess, tree: Path, *args: str,
         prepare: Callable[[], None] | None = None) -> tuple[subprocess.CompletedProcess[str],
                                                             subprocess.CompletedProcess[str]]:
    """(hostel's run, nspawn's run) of the same arguments; `prepare` resets the tree before
    each (a run that writes into the tree must not change what the other one sees)."""
    if prepare:
        prepare()
    ours = hostel(daemon, tree, *args)
    if prepare:
        prepare()
    return ours, nspawn(tree, *args)


def same_stdout(daemon: DaemonProcess, tree: Path, *args: str,
                prepare: Callable[[], None] | None = None) -> str:
    """Run both; require the same exit status and stdout; return that stdout."""
    ours, theirs = both(daemon, tree, *args, prepare=prepare)
    assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout), (
        f"hostel: {ours.returncode} {ours.stdout!r} {ours.stderr!r}\n"
        f"nspawn: {theirs.returncode} {theirs.stdout!r} {theirs.stderr!r}")
    return ours.stdout
