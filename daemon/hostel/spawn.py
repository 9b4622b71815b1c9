"""Plans, and the trampoline that runs them in a cloned child.

A plan is prepared entirely in the parent: every path, buffer and argv is
converted to C memory before the clone, so the child (bindings/spawn.c) runs
only system calls. Each step carries a description, which is what a person
sees when that step fails: "step 7 (mount proc on /m/proc): EPERM"."""
from __future__ import annotations

import asyncio
import errno
import os
import posixpath
import struct
from dataclasses import dataclass, field
from typing import Any, Sequence

from hostel import native
from hostel._native import ffi, lib

_FAILURE = struct.Struct("=ii")
_NEEDS_OWN_MEMORY = frozenset({lib.HOSTEL_OP_WAIT_FD, lib.HOSTEL_OP_STUB_INIT})
_SHARES_MEMORY = bool(lib.hostel_spawn_shares_memory())
# Steps the trampoline can run on a path inside a tree (spawn.h, hostel_op.root).
_BENEATH_KINDS = frozenset({
    lib.HOSTEL_OP_MOUNT, lib.HOSTEL_OP_UMOUNT, lib.HOSTEL_OP_MKDIR, lib.HOSTEL_OP_MKNOD,
    lib.HOSTEL_OP_SYMLINK, lib.HOSTEL_OP_WRITE_FILE, lib.HOSTEL_OP_CHOWN, lib.HOSTEL_OP_UNLINK,
    lib.HOSTEL_OP_MOVE_MOUNT, lib.HOSTEL_OP_CHDIR})
_ENTERS_ROOT = frozenset({lib.HOSTEL_OP_PIVOT_ROOT, lib.HOSTEL_OP_CHROOT})


STUB_INIT_NAME = "(sd-stubinit)"


def _rlim(value: int) -> int:
    """Python's RLIM_INFINITY (-1) as the kernel's rlim_t: all bits set."""
    return value & 0xFFFF_FFFF_FFFF_FFFF


def _command_line_span() -> tuple[int, int]:
    """Where this process's argv strings lie in its memory (arg_start, arg_end: the
    48th and 49th fields of /proc/self/stat, after the parenthesised comm)."""
    with open("/proc/self/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    # fields[0] is the 3rd field (state): arg_start is the 48th.
    return int(fields[45]), int(fields[46])


class StepFailed(OSError):
    """A plan step failed inside the child; names the step and its errno."""

    strerror: str  # always set: __init__ passes the message

    def __init__(self, index: int, err: int, description: str) -> None:
        self.index = index
        self.description = description
        name = errno.errorcode.get(err, str(err))
        super().__init__(err, f"step {index} ({description}): {name} ({os.strerror(err)})")

    def __str__(self) -> str:
        return self.strerror


@dataclass
class Step:
    kind: int
    description: str
    path: str | None = None
    arg: str | None = None
    arg2: str | None = None
    arg3: str | None = None
    num: int = 0
    num2: int = 0
    num3: int = 0
    data: bytes | None = None
    count: int | None = None  # element count of data, when not its byte length
    argv: Sequence[str] | None = None
    envp: Sequence[str] | None = None
    flags: int = 0
    root: str | None = None  # set: `path` is relative to this tree and resolved inside it


@dataclass
class Plan:
    """An ordered list of steps, built by the concern modules (mounts, devices, ...)."""

    steps: list[Step] = field(default_factory=list)
    fds: set[int] = field(default_factory=set)
    tree: str | None = None  # see confine()

    def confine(self, root: str) -> None:
        """From here until the child enters its root, paths below `root` belong to the tree.

        The tree is the guest's: a symlinked /etc or a "../.." inside it must
        not make a step write resolv.conf or create a mount point on the
        host. Steps on such paths are resolved by the trampoline inside the
        tree (openat2 RESOLVE_IN_ROOT), whatever is mounted on `root` when
        the step runs; `root` itself is the host's name for the tree and is
        trusted. Entering the root (chroot, pivot_root) ends this: from then
        on the child's "/" is the tree."""
        root = posixpath.normpath(root)
        self.tree = None if root == "/" else root

    def add(self, step: Step) -> None:
        if self.tree is not None:
            self._confine(step)
        if step.kind in _ENTERS_ROOT:
            self.tree = None
        self.steps.append(step)

    def _inside(self, path: str | None) -> str | None:
        """`path` relative to the tree, if it is below it."""
        assert self.tree is not None
        if path is None or not path.startswith(self.tree + "/"):
            return None
        return posixpath.normpath(path[len(self.tree) + 1:])

    def _confine(self, step: Step) -> None:
        if step.kind not in _BENEATH_KINDS:
            return
        inside = self._inside(step.path)
        if inside is not None:
            step.root, step.path = self.tree, inside
            step.flags |= lib.HOSTEL_OPF_PATH_BENEATH
        if step.kind == lib.HOSTEL_OP_MOUNT and step.num & (native.MS_BIND | native.MS_MOVE):
            source = self._inside(step.arg)
            if source is not None:
                step.root, step.arg = self.tree, source
                step.flags |= lib.HOSTEL_OPF_SOURCE_BENEATH

    @property
    def may_share_memory(self) -> bool:
        """Whether the child may run on our address space until it execs (see spawn()).

        Not if it waits for us (the spawning thread sleeps until the exec, and
        the parent's work needs the pid it has not returned yet), nor if it
        stays behind as a stub init (it never execs)."""
        return not any(step.kind in _NEEDS_OWN_MEMORY for step in self.steps)

    # Filesystem ---------------------------------------------------------------

    def mount(self, source: str | None, target: str, fstype: str | None = None,
              flags: int = 0, data: str | None = None, *, optional: bool = False) -> None:
        what = fstype or source or "none"
        if flags & native.MS_BIND and not flags & native.MS_REMOUNT:
            what = f"bind {source}"
        elif flags & native.MS_REMOUNT:
            what = "remount"
        elif flags & (native.MS_PRIVATE | native.MS_SLAVE | native.MS_SHARED) and source is None:
            what = "propagation"
        self.add(Step(lib.HOSTEL_OP_MOUNT, f"mount {what} on {target}", path=target, arg=source,
                      arg2=fstype, arg3=data, num=flags,
                      flags=lib.HOSTEL_OPF_IGNORE_ENOENT if optional else 0))

    def bind(self, source: str, target: str, *, readonly: bool = False,
             recursive: bool = True, extra_flags: int = 0) -> None:
        self.mount(source, target, None, native.MS_BIND | (native.MS_REC if recursive else 0))
        if readonly or extra_flags:
            flags = native.MS_BIND | native.MS_REMOUNT | extra_flags
            self.mount(None, target, None, flags | (native.MS_RDONLY if readonly else 0))

    def attach_mount(self, mount_fd: int, target: str, what: str) -> None:
        """Attach a detached mount (native.open_tree) at `target` in the child's namespace."""
        self.fds.add(mount_fd)
        self.add(Step(lib.HOSTEL_OP_MOVE_MOUNT, f"attach {what} on {target}", path=target,
                      num=mount_fd))

    def umount(self, target: str, flags: int = 0) -> None:
        self.add(Step(lib.HOSTEL_OP_UMOUNT, f"umount {target}", path=target, num=flags))

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        self.add(Step(lib.HOSTEL_OP_MKDIR, f"mkdir {path}", path=path, num=mode))

    def mknod(self, path: str, mode: int, device: int) -> None:
        self.add(Step(lib.HOSTEL_OP_MKNOD, f"mknod {path}", path=path, num=mode, num2=device))

    def symlink(self, target: str, path: str, *, best_effort: bool = False) -> None:
        self.add(Step(lib.HOSTEL_OP_SYMLINK, f"symlink {path} -> {target}", path=path, arg=target,
                      flags=lib.HOSTEL_OPF_IGNORE_ERRORS if best_effort else 0))

    def write_file(self, path: str, data: bytes, mode: int = 0o644, *, create: bool = True,
                   truncate: bool = True, optional: bool = False,
                   best_effort: bool = False) -> None:
        """Write `data` to `path` (never through a symlink); `optional`: a missing path is fine."""
        open_flags = (os.O_CREAT if create else 0) | (os.O_TRUNC if truncate else 0)
        flags = lib.HOSTEL_OPF_IGNORE_ENOENT if optional else 0
        flags |= lib.HOSTEL_OPF_IGNORE_ERRORS if best_effort else 0
        self.add(Step(lib.HOSTEL_OP_WRITE_FILE, f"write {path}", path=path, data=data,
                      num=mode, num2=open_flags, flags=flags))

    def unlink(self, path: str, *, optional: bool = False, best_effort: bool = False) -> None:
        flags = lib.HOSTEL_OPF_IGNORE_ENOENT if optional else 0
        self.add(Step(lib.HOSTEL_OP_UNLINK, f"remove {path}", path=path,
                      flags=flags | (lib.HOSTEL_OPF_IGNORE_ERRORS if best_effort else 0)))

    def fail(self, err: int, description: str) -> None:
        """End the plan here with `err`, reported as `description` (e.g. a failed PATH search)."""
        self.add(Step(lib.HOSTEL_OP_FAIL, description, num=err))

    def chown(self, path: str, uid: int, gid: int) -> None:
        self.add(Step(lib.HOSTEL_OP_CHOWN, f"chown {path}", path=path, num=uid, num2=gid))

    def pivot_root(self, new_root: str) -> None:
        self.add(Step(lib.HOSTEL_OP_PIVOT_ROOT, f"pivot_root {new_root}", path=new_root))

    def chroot(self, path: str) -> None:
        self.add(Step(lib.HOSTEL_OP_CHROOT, f"chroot {path}", path=path))

    def chdir(self, path: str, *, best_effort: bool = False) -> None:
        self.add(Step(lib.HOSTEL_OP_CHDIR, f"chdir {path}", path=path,
                      flags=lib.HOSTEL_OPF_IGNORE_ERRORS if best_effort else 0))

    def fchdir(self, fd: int, what: str) -> None:
        self.fds.add(fd)
        self.add(Step(lib.HOSTEL_OP_FCHDIR, f"change directory to {what}", num=fd))

    def umask(self, mask: int) -> None:
        self.add(Step(lib.HOSTEL_OP_UMASK, f"umask {mask:03o}", num=mask))

    # Identity and privileges --------------------------------------------------

    def sethostname(self, name: str) -> None:
        self.add(Step(lib.HOSTEL_OP_SETHOSTNAME, f"sethostname {name}", arg=name))

    def setgroups(self, gids: Sequence[int]) -> None:
        data = struct.pack(f"={len(gids)}I", *gids)
        self.add(Step(lib.HOSTEL_OP_SETGROUPS, f"setgroups {list(gids)}", data=data,
                      count=len(gids)))

    def setresgid(self, gid: int) -> None:
        self.add(Step(lib.HOSTEL_OP_SETRESGID, f"setresgid {gid}", num=gid))

    def setresuid(self, uid: int) -> None:
        self.add(Step(lib.HOSTEL_OP_SETRESUID, f"setresuid {uid}", num=uid))

    def keep_caps(self, keep: bool) -> None:
        self.add(Step(lib.HOSTEL_OP_KEEPCAPS, f"keep capabilities {keep}", num=int(keep)))

    def drop_bounding_caps(self, mask: int) -> None:
        self.add(Step(lib.HOSTEL_OP_CAPBSET_DROP, f"drop bounding capabilities {mask:#x}", num=mask))

    def set_caps(self, effective: int, permitted: int, inheritable: int) -> None:
        self.add(Step(lib.HOSTEL_OP_CAPSET, f"capset {permitted:#x}",
                      num=effective, num2=permitted, num3=inheritable))

    def no_new_privs(self) -> None:
        self.add(Step(lib.HOSTEL_OP_NO_NEW_PRIVS, "set no_new_privs"))

    def seccomp(self, bpf: bytes) -> None:
        """Load a classic BPF program (as exported by libseccomp) as the seccomp filter."""
        if len(bpf) % 8:
            raise ValueError(f"seccomp program of {len(bpf)} bytes is not a whole number of sock_filter entries")
        self.add(Step(lib.HOSTEL_OP_SECCOMP, "load seccomp filter", data=bpf, count=len(bpf) // 8))

    def personality(self, persona: int) -> None:
        self.add(Step(lib.HOSTEL_OP_PERSONALITY, f"personality {persona:#x}", num=persona))

    # Processes, descriptors, namespaces ---------------------------------------

    def wait_for_parent(self, fd: int, why: str) -> None:
        """Block until the parent writes a byte to `fd` (parent-side work done)."""
        self.fds.add(fd)
        self.add(Step(lib.HOSTEL_OP_WAIT_FD, f"wait for parent: {why}", num=fd))

    def notify_parent(self, fd: int, why: str) -> None:
        self.fds.add(fd)
        self.add(Step(lib.HOSTEL_OP_NOTIFY_FD, f"notify parent: {why}", num=fd))

    def write_fd(self, fd: int, data: bytes, what: str) -> None:
        """Write `data` to a descriptor the parent opened (and the child may not be able to)."""
        self.fds.add(fd)
        self.add(Step(lib.HOSTEL_OP_WRITE_FD, what, num=fd, data=data))

    def dup2(self, old: int, new: int) -> None:
        """Install `old` as `new` for the payload (old == new just clears O_CLOEXEC)."""
        self.fds.add(old)
        self.add(Step(lib.HOSTEL_OP_DUP2, f"dup2 fd {old} to {new}", num=old, num2=new))

    def setsid(self) -> None:
        self.add(Step(lib.HOSTEL_OP_SETSID, "setsid"))

    def set_controlling_tty(self, fd: int) -> None:
        self.add(Step(lib.HOSTEL_OP_SETCTTY, f"make fd {fd} the controlling terminal", num=fd))

    def setns(self, fd: int, nstype: int, what: str) -> None:
        self.fds.add(fd)
        self.add(Step(lib.HOSTEL_OP_SETNS, f"join {what}", num=fd, num2=nstype))

    def unshare(self, flags: int) -> None:
        self.add(Step(lib.HOSTEL_OP_UNSHARE, f"unshare {flags:#x}", num=flags))

    def stub_init(self) -> None:
        """From here on, run as PID 2 under a minimal reaping PID 1, named as
        systemd-nspawn names its own: the child's copy of our command line (where the
        kernel reads /proc/PID/cmdline from) becomes STUB_INIT_NAME."""
        start, end = _command_line_span()
        self.add(Step(lib.HOSTEL_OP_STUB_INIT, "start stub init", arg=STUB_INIT_NAME,
                      num=start, num2=end))

    def setrlimit(self, resource: int, soft: int, hard: int) -> None:
        """A resource limit (RLIM_INFINITY as -1), as close as the child may set it."""
        self.add(Step(lib.HOSTEL_OP_SETRLIMIT, f"set resource limit {resource} to {soft}:{hard}",
                      num=resource, num2=_rlim(soft), num3=_rlim(hard)))

    def execve(self, path: str, argv: Sequence[str], envp: Sequence[str], *,
               try_next: bool = False) -> None:
        """Execute `path`; with try_next, a missing file moves on to the next step (a search)."""
        self.add(Step(lib.HOSTEL_OP_EXECVE, f"execute {path}", path=path, argv=list(argv),
                      envp=list(envp), flags=lib.HOSTEL_OPF_IGNORE_ENOENT if try_next else 0))


class _CPlan:
    """The C image of a plan; holds every buffer alive until the clone is done."""

    def __init__(self, plan: Plan) -> None:
        self._keep: list[object] = []
        self.ops = ffi.new("struct hostel_op[]", max(len(plan.steps), 1))
        for op, step in zip(self.ops, plan.steps):
            self._fill(op, step)

    def _cstr(self, value: str | None) -> object:
        if value is None:
            return ffi.NULL
        buf = ffi.new("char[]", os.fsencode(value))
        self._keep.append(buf)
        return buf

    def _cvec(self, values: Sequence[str] | None) -> object:
        if values is None:
            return ffi.NULL
        vec = ffi.new("char *[]", [self._cstr(v) for v in values] + [ffi.NULL])
        self._keep.append(vec)
        return vec

    def _fill(self, op: Any, step: Step) -> None:  # op: a cffi struct hostel_op *
        op.kind = step.kind
        op.flags = step.flags
        op.path = self._cstr(step.path)
        op.arg = self._cstr(step.arg)
        op.arg2 = self._cstr(step.arg2)
        op.arg3 = self._cstr(step.arg3)
        op.num, op.num2, op.num3 = step.num, step.num2, step.num3
        if step.data is not None:
            buf = ffi.new("char[]", step.data or b"\0")
            self._keep.append(buf)
            op.data = buf
            op.len = len(step.data) if step.count is None else step.count
        op.argv = self._cvec(step.argv)
        op.envp = self._cvec(step.envp)
        op.root = self._cstr(step.root)


@dataclass
class Child:
    """A spawned child: its pid, its pidfd, and the read end of its report pipe."""

    pid: int
    pidfd: int
    plan: Plan
    report_fd: int

    def _failure(self, raw: bytes) -> StepFailed:
        index, err = _FAILURE.unpack(raw)
        description = ("close inherited descriptors" if index < 0
                       else self.plan.steps[index].description)
        return StepFailed(index, err, description)

    def wait_started(self) -> None:
        """Block until the plan reached execve (or ended); raise StepFailed for a failed step."""
        try:
            raw = _read_report(self.report_fd)
        finally:
            os.close(self.report_fd)
            self.report_fd = -1
        if raw:
            raise self._failure(raw)

    async def started(self) -> None:
        """Like wait_started, without blocking the event loop."""
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        loop.add_reader(self.report_fd, ready.set_result, None)
        try:
            await ready
        finally:
            loop.remove_reader(self.report_fd)
        self.wait_started()

    def close(self) -> None:
        for fd in (self.report_fd, self.pidfd):
            if fd >= 0:
                os.close(fd)
        self.report_fd = self.pidfd = -1


def _read_report(fd: int) -> bytes:
    chunks = b""
    while len(chunks) < _FAILURE.size:
        part = os.read(fd, _FAILURE.size - len(chunks))
        if not part:
            break
        chunks += part
    return chunks


def spawn(plan: Plan, clone_flags: int = 0, cgroup_fd: int = -1) -> Child:
    """Clone a child into `clone_flags` namespaces and start it on `plan`.

    With `cgroup_fd` (a v2 cgroup directory) the child is born in that cgroup
    (CLONE_INTO_CGROUP, Linux 5.7), never passing through ours.

    A plan that may (Plan.may_share_memory) runs on our address space, as
    posix_spawn does: no copy of hosteld's page tables, which costs ~3 ms
    per start here and grows with the daemon. The call then returns only
    after the child exec'd or failed, so the daemon makes it from a thread."""
    report_r, report_w = os.pipe2(os.O_CLOEXEC)
    cplan = _CPlan(plan)
    keep = sorted(plan.fds)
    args = ffi.new("struct hostel_spawn_args *")
    args.clone_flags = clone_flags
    args.ops = cplan.ops
    args.n_ops = len(plan.steps)
    args.report_fd = report_w
    keep_fds = ffi.new("int[]", keep or [0])
    args.keep_fds = keep_fds
    args.n_keep_fds = len(keep)
    args.cgroup_fd = cgroup_fd
    args.share_memory = _SHARES_MEMORY and plan.may_share_memory
    pidfd = ffi.new("int *", -1)
    try:
        pid = lib.hostel_spawn(args, pidfd)
    finally:
        os.close(report_w)
    if pid < 0:
        os.close(report_r)
        into = f" into cgroup fd {cgroup_fd}" if cgroup_fd >= 0 else ""
        hint = (" (being born in a cgroup needs Linux 5.7 or later)"
                if cgroup_fd >= 0 and -pid in (errno.EINVAL, errno.E2BIG) else "")
        raise OSError(-pid, f"clone3 with flags {clone_flags:#x}{into}: "
                            f"{os.strerror(-pid)}{hint}")
    return Child(pid, pidfd[0], plan, report_r)


def _wake(future: asyncio.Future[None]) -> None:
    """A reader callback: resolve `future`, once (the callback may run again before removal)."""
    if not future.done():
        future.set_result(None)


async def wait_readable(fd: int) -> None:
    """Until `fd` is readable: for a pidfd of a process that is not our child, its end."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_reader(fd, _wake, ready)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


async def wait_exit(pidfd: int) -> native.ExitInfo:
    """Wait for the process behind `pidfd` to exit, from the event loop (no SIGCHLD)."""
    loop = asyncio.get_running_loop()
    while True:
        info = native.pidfd_wait(pidfd)
        if info is not None:
            return info
        ready = loop.create_future()
        loop.add_reader(pidfd, _wake, ready)
        try:
            await ready
        finally:
            loop.remove_reader(pidfd)
