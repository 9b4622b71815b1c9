"""Entering a running container: a pty on its own devpts, and a process in its namespaces.

What machinectl shell/OpenPTY need. The pty is allocated on the container's
devpts (through /proc/LEADER/root), so inside it is an ordinary /dev/pts/N.
The process joins the leader's namespaces with setns(), enters its root
through a descriptor (the container's root is mounted over / in its own
mount namespace, which setns alone would not show), forks once so that it
is inside the pid namespace, and keeps the container's capability limits
and seccomp filter. Before any of that it joins the container's own cgroup in
every hierarchy (so its device policy applies, and the machine's kill and
stop reach it) and then the container's cgroup namespace."""
from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import struct
from contextlib import ExitStack
from dataclasses import dataclass

from hostel import native
from hostel.bus import HostelError, NoSuchObject
from hostel.machine import capabilities, cgroups, users
from hostel.machine import seccomp as machine_seccomp
from hostel.machine.registry import Machine
from hostel.spawn import Plan, StepFailed, spawn, wait_exit

log = logging.getLogger(__name__)

TIOCSPTLCK = 0x40045431
TIOCGPTN = 0x80045430
TIOCGPTPEER = 0x5441
# Namespaces to join, in an order that works: the user namespace first (it
# grants the rights for the others), the mount namespace before the root.
NAMESPACES = (("user", native.CLONE_NEWUSER), ("cgroup", native.CLONE_NEWCGROUP),
              ("mnt", native.CLONE_NEWNS),
              ("uts", native.CLONE_NEWUTS), ("ipc", native.CLONE_NEWIPC),
              ("net", native.CLONE_NEWNET), ("pid", native.CLONE_NEWPID))
DEFAULT_ENV = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "container=hostel")


class EnterFailed(HostelError):
    dbus_name = "org.hostel1.Error.EnterFailed"


@dataclass
class Pty:
    master: int
    path: str      # as seen inside the container


def _leader(machine: Machine) -> int:
    if not machine.leader or not os.path.exists(f"/proc/{machine.leader}"):
        raise NoSuchObject(f"machine {machine.name} has no running leader")
    return machine.leader


def open_pty(machine: Machine) -> tuple[Pty, int]:
    """A pty on the container's devpts: (master with its inside path, slave fd)."""
    leader = _leader(machine)
    try:
        master = os.open(f"/proc/{leader}/root/dev/pts/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise EnterFailed(f"opening a pty in machine {machine.name}: {e.strerror} "
                          "(does it have /dev/pts?)") from e
    fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))
    number = struct.unpack("I", fcntl.ioctl(master, TIOCGPTN, b"\0" * 4))[0]
    slave = fcntl.ioctl(master, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    return Pty(master, f"/dev/pts/{number}"), slave


def _join_namespaces(plan: Plan, leader: int, keep: ExitStack) -> None:
    for name, flag in NAMESPACES:
        theirs = os.stat(f"/proc/{leader}/ns/{name}").st_ino
        if theirs == os.stat(f"/proc/self/ns/{name}").st_ino:
            continue  # shared with the host (e.g. --share-system)
        fd = os.open(f"/proc/{leader}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC)
        keep.callback(os.close, fd)
        plan.setns(fd, flag, f"the {name} namespace of pid {leader}")
    root = os.open(f"/proc/{leader}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    keep.callback(os.close, root)
    plan.fchdir(root, f"the root of pid {leader}")
    plan.chroot(".")
    plan.chdir("/")


async def run_in(machine: Machine, path: str, argv: list[str], env: list[str],
                 user: str | None, stdio_fd: int, tty: bool) -> int:
    """Start `path` (with argv) inside the machine, stdio on `stdio_fd`; returns its pid.

    hosteld reaps it in the background; the caller follows it through the pty."""
    leader = _leader(machine)
    passwd = _read_inside(leader, "/etc/passwd")
    group = _read_inside(leader, "/etc/group")
    ids = users.resolve_user(user, passwd or b"", group or b"")  # a missing file: no such user
    plan = Plan()
    cgroup = machine.runtime.cgroup if machine.runtime is not None else None
    join = cgroup.open_join() if cgroup is not None else cgroups.CgroupJoin()
    with ExitStack() as keep:
        keep.callback(join.close)
        join.plan_steps(plan, new_namespace=False)  # first: before it can fork
        _join_namespaces(plan, leader, keep)
        plan.stub_init()  # fork: the child is the first inside the pid namespace
        for target in (0, 1, 2):
            plan.dup2(stdio_fd, target)
        plan.setsid()
        if tty:
            plan.set_controlling_tty(0)
        bounding = _bounding_set(leader)
        plan.drop_bounding_caps(capabilities.bounding_drop_mask(bounding))
        plan.seccomp(machine_seccomp.container_filter(bounding))
        user_env = users.plan_change_user(plan, ids)
        full_env = list(DEFAULT_ENV) + user_env + [e for e in env if "=" in e]
        plan.chdir(ids.home, best_effort=True)
        plan.execve(path, argv, full_env)
        child = spawn(plan, 0, join.born_in)
    try:
        await child.started()
    except StepFailed as e:
        await wait_exit(child.pidfd)
        child.close()
        raise EnterFailed(f"running {path} in machine {machine.name} failed at {e}") from None
    task = asyncio.get_running_loop().create_task(_reap(child))
    _REAPERS.add(task)
    task.add_done_callback(_REAPERS.discard)
    return child.pid


_REAPERS: set[asyncio.Task] = set()


async def _reap(child) -> None:
    info = await wait_exit(child.pidfd)
    child.close()
    log.debug("process %d in a machine %s", child.pid, info.describe())


def _bounding_set(leader: int) -> int:
    """The container's own capability bounding set: a process entering it gets no more."""
    for line in open(f"/proc/{leader}/status"):
        if line.startswith("CapBnd:"):
            return int(line.split()[1], 16)
    raise EnterFailed(f"cannot read the capability bounding set of pid {leader}")


def _read_inside(leader: int, path: str) -> bytes | None:
    from hostel.machine.rootfs import read_file_in_root

    return read_file_in_root(f"/proc/{leader}/root", path)


async def open_shell(machine: Machine, user: str, path: str, args: list[str],
                     env: list[str]) -> Pty:
    """machinectl shell: a pty, and `path args` (default: the user's shell) on it."""
    pty, slave = open_pty(machine)
    if not path:  # a login shell, as machined starts one
        path, args = "/bin/sh", ["-sh"]
    try:
        await run_in(machine, path, list(args) or [path], env, user or None, slave, tty=True)
    except BaseException:
        os.close(pty.master)
        raise
    finally:
        os.close(slave)  # the shell holds it now; its end hangs up the master
    return pty
