"""The container's /dev: copied device nodes, ptmx, std* links, /dev/console, kmsg.

Device numbers are read on the host while the plan is built; the child only
creates nodes. Inside a user namespace mknod() of devices is forbidden, so
there the host's nodes are bind-mounted instead (what nspawn does too)."""
from __future__ import annotations

import os
import stat

from hostel import native
from hostel.spawn import Plan

# The seed's copy_devnodes list.
DEVNODES = ("null", "zero", "full", "random", "urandom", "tty", "net/tun")
# The seed's dev_setup also linked /dev/core to /proc/kcore; systemd dropped it,
# and a container has no business with the host's memory image.
STD_LINKS = (("/proc/self/fd", "fd"), ("/proc/self/fd/0", "stdin"),
             ("/proc/self/fd/1", "stdout"), ("/proc/self/fd/2", "stderr"))


def plan_devnodes(plan: Plan, root: str, userns: bool) -> None:
    plan.umask(0o000)
    plan.mkdir(f"{root}/dev/char", 0o755)
    for name in DEVNODES:
        host = f"/dev/{name}"
        try:
            st = os.stat(host)
        except FileNotFoundError:
            continue  # the seed skips nodes the host lacks
        if not (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            continue
        target = f"{root}/dev/{name}"
        if "/" in name:
            plan.mkdir(os.path.dirname(target), 0o755)
        if userns:
            plan.write_file(target, b"", 0o666, truncate=False)
            plan.bind(host, target, recursive=False)
        else:
            plan.mknod(target, st.st_mode, st.st_rdev)
        if stat.S_ISCHR(st.st_mode):  # /dev/char/MAJ:MIN, as udev (and nspawn) provide
            plan.symlink(f"../{name}", f"{root}/dev/char/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")
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
    """/proc/kmsg becomes a FIFO, and /dev/kmsg disappears, as in the seed's setup_kmsg.

    Writing to a FIFO nobody reads would block the container, so the
    writable /dev/kmsg is removed once /proc/kmsg has been covered."""
    fifo = f"{root}/dev/kmsg"
    plan.mknod(fifo, stat.S_IFIFO | 0o600, 0)
    plan.mount(fifo, f"{root}/proc/kmsg", None, native.MS_BIND)
    plan.unlink(fifo)
