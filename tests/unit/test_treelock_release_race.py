"""A read-only start must not be told a tree is busy because another read-only
container is just releasing it (its shared lock briefly becomes exclusive so it
can unlink the lock file)."""
from __future__ import annotations

import fcntl
import os
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from hostel.machine import treelock


def _hold_exclusive(path: Path, seconds: float, held: threading.Event) -> None:
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, treelock._flock(fcntl.F_WRLCK))
        held.set()
        time.sleep(seconds)
    finally:
        os.close(fd)


def test_a_shared_lock_outlasts_a_releasing_holders_exclusive_moment(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    lock = tmp_path / ".#tree.lck"
    held = threading.Event()
    releaser = threading.Thread(target=_hold_exclusive, args=(lock, 0.005, held))
    releaser.start()
    held.wait(5)
    try:
        with ExitStack() as cleanup:
            treelock.lock_tree(str(tree), True, "Directory tree", cleanup)
    finally:
        releaser.join()


def test_a_real_exclusive_holder_still_makes_a_shared_request_busy(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    held = threading.Event()
    holder = threading.Thread(target=_hold_exclusive, args=(tmp_path / ".#tree.lck", 1.0, held))
    holder.start()
    held.wait(5)
    try:
        with ExitStack() as cleanup, pytest.raises(treelock.TreeBusy, match="currently busy"):
            treelock.lock_tree(str(tree), True, "Directory tree", cleanup)
    finally:
        holder.join()
