"""The container's /dev: copied device nodes, ptmx, std* links, /dev/console, kmsg.

Device numbers are read on the host while the plan is built; the child only
creates nodes. Inside a user namespace a node can neither be made nor opened on
a file system mounted there, so for such a container hosteld makes the whole
/dev tmpfs itself, detached, with the nodes in it given to the container's root
(what nspawn 252 does from its outer child), and the child attaches it."""
from __future__ import annotations

import os
import stat

from typing import Iterator

from hostel import native
from hostel.machine import userns
from hostel.spawn import Plan

# The seed's copy_devnodes list.
DEVNODES = ("null", "zero", "full", "random", "urandom", "tty", "net/tun")
# The seed's dev_setup also linked /dev/core to /proc/kcore; systemd dropped it,
# and a container has no business with the host's memory image.
STD_LINKS = (("/proc/self/fd", "fd"), ("/proc/self/fd/0", "stdin"),
             ("/proc/self/fd/1", "stdout"), ("/proc/self/fd/2", "stderr"))


def _host_nodes() -> Iterator[tuple[str, os.stat_result]]:
    """The DEVNODES the host has (the seed skips the others), with their stat."""
    for name in DEVNODES:
        try:
            st = os.stat(f"/dev/{name}")
        except FileNotFoundError:
            continue
        if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            yield name, st


def _char_link(st: os.stat_result) -> str:
    """/dev/char/MAJ:MIN, as udev (and nspawn) provide."""
    return f"char/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def detached_dev(base: int, selinux_context: str | None) -> int:
    """The /dev tmpfs of a container in a user namespace mapped at `base`, made here (a
    tmpfs mounted in the namespace has SB_I_NODEV: no node on it opens), as nspawn 252
    has it: the tmpfs and the nodes are the container's root's, and so are /dev/char
    and /dev/net; the /dev/char links stay host root's (nobody's inside). The child
    attaches it (Plan.attach_mount) and adds the rest of /dev itself."""
    options = {"mode": "755", "size": "4m", "nr_inodes": "64k",
               "uid": str(base), "gid": str(base)}
    if selinux_context:
        options["context"] = selinux_context
    fd = userns.fresh_mount("tmpfs", options,
                            userns.MOUNT_ATTR_NOSUID | userns.MOUNT_ATTR_STRICTATIME)
    try:
        _own_dir(fd, "char", base)
        for name, st in _host_nodes():
            if "/" in name and not os.path.isdir(f"/proc/self/fd/{fd}/{os.path.dirname(name)}"):
                _own_dir(fd, os.path.dirname(name), base)
            os.mknod(name, st.st_mode, st.st_rdev, dir_fd=fd)
            os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=fd)  # hosteld's umask aside
            os.chown(name, base, base, dir_fd=fd)
            if stat.S_ISCHR(st.st_mode):
                os.symlink(f"../{name}", _char_link(st), dir_fd=fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _own_dir(fd: int, name: str, base: int) -> None:
    os.mkdir(name, 0o755, dir_fd=fd)
    os.chmod(name, 0o755, dir_fd=fd)
    os.chown(name, base, base, dir_fd=fd)


def plan_devnodes(plan: Plan, root: str, userns: bool) -> None:
    """The nodes (copied from the host, without a user namespace: in one, detached_dev
    made them), ptmx and the std* links."""
    plan.umask(0o000)
    if not userns:
        plan.mkdir(f"{root}/dev/char", 0o755)
        for name, st in _host_nodes():
            target = f"{root}/dev/{name}"
            if "/" in name:
                plan.mkdir(os.path.dirname(target), 0o755)
            plan.mknod(target, st.st_mode, st.st_rdev)
            if stat.S_ISCHR(st.st_mode):
                plan.symlink(f"../{name}", f"{root}/dev/{_char_link(st)}")
    plan.umask(0o022)
    plan.symlink("pts/ptmx", f"{root}/dev/ptmx")
    for target, name in STD_LINKS:
        plan.symlink(target, f"{root}/dev/{name}")


def plan_console(plan: Plan, root: str, console: str | None, userns: bool) -> None:
    """/dev/console is the pty's slave, bound over a placeholder node (ptys live only on devpts)."""
    if console is None:
        return
    target = f"{root}/dev/console"
    if userns:
        plan.write_file(target, b"", 0o600, truncate=False)
    else:
        null = os.stat("/dev/null")
        plan.mknod(target, stat.S_IFCHR | 0o600, null.st_rdev)
    plan.bind(console, target, recursive=False)


def plan_kmsg(plan: Plan, root: str) -> None:
    """/proc/kmsg becomes a FIFO, and /dev/kmsg is never there, as in the seed's setup_kmsg.

    Writing to a FIFO nobody reads would block the container, so the FIFO is
    made in the container's /run (as nspawn 252 does: the bind then has /run's
    nosuid,nodev) and removed once /proc/kmsg has been covered."""
    fifo = f"{root}/run/proc-kmsg"
    plan.mknod(fifo, stat.S_IFIFO | 0o600, 0)
    plan.mount(fifo, f"{root}/proc/kmsg", None, native.MS_BIND)
    plan.unlink(fifo)
