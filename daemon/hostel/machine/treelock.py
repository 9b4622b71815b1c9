"""The lock on a running container's tree or image, taken as systemd-nspawn 252 takes it.

nspawn locks the tree (or image) it runs on twice: a file next to it,
DIR/.#NAME.lck (shared over NFS with whoever sees the same tree), and one in
/run/systemd/nspawn/locks named by the tree's device and inode (which also
catches a tree reached by two paths, or one that is a mount point). Both are
open file description locks on the whole file: exclusive for a writable
tree, shared for --read-only. Taking the same two locks the same way makes a
tree busy under nspawn busy for hostel too, and the other way round; OFD
locks (not flock, not process-owned POSIX locks) because one hosteld holds
the locks of all its machines, and nspawn's conflict with those only."""
from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
import time
from contextlib import ExitStack

from hostel.errors import ERROR_PREFIX, HostelError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from hostel.machine.settings import MachineSettings

LOCK_DIR = "/run/systemd/nspawn/locks"
# struct flock on Linux x86-64/aarch64: l_type, l_whence, (pad), l_start, l_len, l_pid, (pad)
_FLOCK = "hhxxxxqqixxxx"
# A releasing shared holder's exclusive moment lasts microseconds; a real
# exclusive holder makes a shared request wait at most this many milliseconds.
SHARED_LOCK_TRIES = 20


class TreeBusy(HostelError):
    dbus_name = f"{ERROR_PREFIX}.Busy"


def _flock(lock_type: int) -> bytes:
    return struct.pack(_FLOCK, lock_type, os.SEEK_SET, 0, 0, 0)


def _try_lock(fd: int, exclusive: bool) -> bool:
    """An OFD lock on the whole file, without waiting: False if someone else holds one."""
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK))
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _lock_file(path: str, exclusive: bool) -> int | None:
    """The lock file at `path`, created and locked; None when it is busy.

    A file unlinked between our open and our lock was released by its last
    holder (see _release): lock a fresh one instead. A shared request that
    finds the file locked tries again for a few milliseconds, because a shared
    holder that is releasing holds it exclusively for the moment it takes to
    unlink it: without that, two read-only starts could call each other busy."""
    tries = 1 if exclusive else SHARED_LOCK_TRIES
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC,
                     0o600)
        try:
            if not _try_lock(fd, exclusive):
                os.close(fd)
                tries -= 1
                if tries <= 0:
                    return None
                time.sleep(0.001)
                continue
            if os.fstat(fd).st_nlink > 0:
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _release(fd: int, path: str, exclusive: bool) -> None:
    """Drop the lock; the file goes too if nobody else holds it (a shared holder first
    tries to become the only one), as nspawn leaves no lock files behind."""
    try:
        if exclusive or _try_lock(fd, True):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
    finally:
        os.close(fd)


def lock_paths(path: str) -> list[str]:
    """The lock files nspawn uses for the tree or image at `path` (absolute)."""
    paths = []
    if not path.startswith("/dev/"):
        head, tail = os.path.split(path.rstrip("/"))
        paths.append(os.path.join(head, f".#{tail}.lck"))
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return paths  # a --template copy not made yet: only the lock next to it
    if stat.S_ISBLK(st.st_mode):
        paths.append(f"{LOCK_DIR}/block-{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")
    elif stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode):
        paths.append(f"{LOCK_DIR}/inode-{st.st_dev}:{st.st_ino}")
    return paths


def lock_tree(path: str, read_only: bool, what: str, cleanup: ExitStack) -> None:
    """Lock `path` for a container (shared when read-only) until `cleanup` closes.

    `what` is "Directory tree" or "Disk image", for nspawn's "... is currently busy."."""
    exclusive = not read_only
    path = os.path.realpath(path)  # as nspawn, which resolves the path before it locks it
    if path == "/":
        return  # only an ephemeral (or read-only) container runs on the host's root
    for lock_path in lock_paths(path):
        if lock_path.startswith(LOCK_DIR + "/"):
            os.makedirs(LOCK_DIR, mode=0o700, exist_ok=True)
        try:
            fd = _lock_file(lock_path, exclusive)
        except OSError as e:
            if e.errno == errno.EROFS and not exclusive:
                continue  # a shared lock on a read-only medium: nobody can write it anyway
            raise HostelError(f"Failed to lock {path} ({lock_path}): {e.strerror}") from None
        if fd is None:
            raise TreeBusy(f"{what} {path} is currently busy.")
        cleanup.callback(_release, fd, lock_path, exclusive)


def lock_root(settings: MachineSettings, cleanup: ExitStack) -> None:
    """Lock the tree or image a container runs on (at its start, and again when a
    restarted hosteld adopts it: the locks died with the hosteld that took them). An
    ephemeral container runs on a snapshot of its own, and a root made elsewhere (a
    guest image) is its maker's business."""
    if settings.ephemeral or settings.root_provider is not None:
        return
    root = settings.directory or settings.image
    if root and not os.path.lexists(root) and not settings.template:
        return  # not there: tree.prepare_root says so
    if settings.directory:
        lock_tree(settings.directory, settings.read_only, "Directory tree", cleanup)
    elif settings.image:
        lock_tree(settings.image, settings.read_only, "Disk image", cleanup)
