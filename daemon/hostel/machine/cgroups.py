"""Per-container control groups: SLICE/machine-NAME.scope in every hierarchy we can write.

Names follow systemd-machined, so that tools that read cgroup paths (ps -o
cgroup, systemd-cgls, machinectl's own lookups) see what they expect: the
slice "machine.slice" unless --slice says otherwise, nested slices as
"a.slice/a-b.slice", and a scope "machine-<escaped name>.scope".

hosteld is not PID 1 and owns no cgroup tree of its own, so the slices are
created under the cgroup hosteld itself runs in, in each hierarchy. At the top
of the tree (the usual case) that is exactly machined's layout; in a delegated
or nested setup (a service with Delegate=yes, a VM agent's memory cgroup) the
containers stay inside what was delegated to us, and inside its limits.

Every layout is handled: the v2 unified hierarchy alone, the hybrid one (v1
controllers plus cgroup2 on /sys/fs/cgroup/unified) and v1 alone. These
functions block briefly (file writes, and remove() waits for the scope to
empty); the daemon calls them from a worker thread.

The container's processes live one level down, in SCOPE/payload, which is
also the root of their cgroup namespace: the device policy sits on the scope
(devices.allow in v1, a BPF device program in v2, see bpf_devices), out of
the container's sight, and the kernel lets no cgroup widen what its parent
allows -- so root in the container may write its own devices.allow, and
attach nothing in v2, without gaining a device."""
from __future__ import annotations

import errno
import functools
import logging
import os
import re
import signal
import stat
import threading
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from hostel import native
from hostel.bus import AlreadyExists, HostelError, InvalidArgs, NoSuchObject
from hostel.cryptsetup.unitname import UnitNameError, unit_name_escape, unit_name_unescape
from hostel.machine import bpf_devices
from hostel.machine.cgroup_properties import Property
from hostel.spawn import Plan

log = logging.getLogger(__name__)

DEFAULT_SLICE = "machine.slice"
PAYLOAD = "payload"   # the container's own cgroup below its scope (and its cgroup namespace root)
UNIT_NAME_MAX = 255
_UNIT_CHARS = re.compile(r"[A-Za-z0-9:_.\\-]+")
_OTHER_UNIT_TYPES = (".service", ".socket", ".target", ".device", ".mount", ".automount",
                     ".swap", ".timer", ".path", ".scope")
_SCOPE = re.compile(r"machine-(.+)\.scope")

# What a container may open (nspawn's DevicePolicy=strict plus DeviceAllow=):
# the API devices, the tun clone device, and ptys, which it may use but not create.
DEVICE_ALLOW: tuple[tuple[str, str], ...] = (
    ("/dev/null", "rwm"), ("/dev/zero", "rwm"), ("/dev/full", "rwm"),
    ("/dev/random", "rwm"), ("/dev/urandom", "rwm"), ("/dev/tty", "rwm"),
    ("/dev/net/tun", "rwm"), ("/dev/pts/ptmx", "rw"), ("char-pts", "rw"),
)


class CgroupError(HostelError):
    """A cgroup operation failed; the message names the cgroup file or directory."""


# Layout ------------------------------------------------------------------------

@dataclass(frozen=True)
class Hierarchy:
    """One mounted cgroup hierarchy and hosteld's own cgroup in it."""

    mountpoint: str
    version: int                    # 1 or 2
    controllers: frozenset[str]     # v1: {"memory"}, {"cpu", "cpuacct"}, {"name=systemd"}; v2: empty
    base: str                       # hosteld's cgroup, relative to the mount ("/" at the top)

    def path(self, relative: str = "") -> str:
        return os.path.join(self.mountpoint, self.base.strip("/"), relative).rstrip("/")

    def names(self, controllers_field: str) -> bool:
        """Whether a /proc/PID/cgroup controllers field refers to this hierarchy."""
        if self.version == 2:
            return controllers_field == ""
        return frozenset(controllers_field.split(",")) == self.controllers


@dataclass(frozen=True)
class CgroupLayout:
    mode: str                       # "unified", "hybrid" or "legacy"
    hierarchies: tuple[Hierarchy, ...]

    @classmethod
    def detect(cls, mountinfo: str = "/proc/self/mountinfo",
               own_cgroup: str = "/proc/self/cgroup") -> CgroupLayout:
        """The hierarchies mounted here that hosteld can write, from the mount table."""
        mounts = list(_cgroup_mounts(mountinfo))
        hierarchies = []
        for _hid, controllers, path in _read_cgroup_file(own_cgroup):
            hierarchy = _hierarchy_for(mounts, controllers, path)
            if hierarchy is not None and os.access(hierarchy.path(), os.W_OK):
                hierarchies.append(hierarchy)
        v2_points = {m.mountpoint for m in mounts if m.fstype == "cgroup2"}
        has_v1 = any(m.fstype == "cgroup" for m in mounts)
        if "/sys/fs/cgroup" in v2_points:
            mode = "unified"
        elif v2_points and has_v1:
            mode = "hybrid"
        elif has_v1:
            mode = "legacy"
        else:
            raise CgroupError(f"no cgroup hierarchy is mounted (see {mountinfo}); "
                              "mount cgroup2 on /sys/fs/cgroup")
        if not hierarchies:
            raise CgroupError(f"no cgroup hierarchy in {mountinfo} is writable by hosteld; "
                              "run it as root with /sys/fs/cgroup mounted read-write")
        return cls(mode, tuple(hierarchies))


@functools.lru_cache(maxsize=1)  # hierarchies are mounted at boot and stay while we run
def current_layout() -> CgroupLayout:
    """This host's layout, read once: what a container's /sys/fs/cgroup shows."""
    return CgroupLayout.detect()


@dataclass(frozen=True)
class _Mount:
    root: str
    mountpoint: str
    fstype: str
    options: frozenset[str]


def _unescape_mountinfo(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _cgroup_mounts(mountinfo: str) -> Iterator[_Mount]:
    with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
                continue
            yield _Mount(_unescape_mountinfo(fields[3]), _unescape_mountinfo(fields[4]),
                         tail[0], frozenset(tail[2].split(",")))


def _read_cgroup_file(path: str) -> list[tuple[str, str, str]]:
    """(hierarchy id, controllers, path) for each line of a /proc/PID/cgroup file."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        rows = (line.rstrip("\n").split(":", 2) for line in f if line.count(":") >= 2)
        return [(hid, controllers, cgroup) for hid, controllers, cgroup in rows]


def _hierarchy_for(mounts: list[_Mount], field: str, path: str) -> Hierarchy | None:
    version = 2 if field == "" else 1
    wanted = frozenset(field.split(",")) if field else frozenset()
    for mount in mounts:
        if (mount.fstype == "cgroup2") != (version == 2) or not wanted <= mount.options:
            continue
        if not (path == mount.root or path.startswith(mount.root.rstrip("/") + "/")):
            continue  # a bind mount of some other part of the tree
        base = "/" + path[len(mount.root):].strip("/")
        return Hierarchy(mount.mountpoint, version, wanted, base)
    return None


# Names -------------------------------------------------------------------------

def slice_unit(name: str | None) -> str:
    """The slice unit for a --slice value: "machine.slice" by default, ".slice" appended if missing."""
    if not name:
        return DEFAULT_SLICE
    if not name.endswith(".slice"):
        if name.endswith(_OTHER_UNIT_TYPES):
            raise InvalidArgs(f"--slice {name!r} names a {name.rsplit('.', 1)[1]} unit, not a slice")
        name += ".slice"
    prefix = name[:-len(".slice")]
    if (len(name) > UNIT_NAME_MAX or not _UNIT_CHARS.fullmatch(name)
            or (prefix != "-" and (not prefix or prefix.startswith("-")
                                   or prefix.endswith("-") or "--" in prefix))):
        raise InvalidArgs(
            f"invalid slice name {name!r} in --slice: use letters, digits and ':_.\\', with '-' "
            "only between parts of a nested slice (\"a-b.slice\" lives in \"a.slice\")")
    return name


def slice_path(unit: str) -> str:
    """Where a slice lives, relative to the tree root: "a-b.slice" -> "a.slice/a-b.slice"."""
    prefix = unit[:-len(".slice")]
    if prefix == "-":
        return ""
    parts = prefix.split("-")
    return "/".join(_cg_escape("-".join(parts[:i + 1]) + ".slice") for i in range(len(parts)))


def scope_unit(machine: str) -> str:
    """The scope unit of a machine: "machine-<name, unit-escaped>.scope", as machined names it."""
    if not machine or "/" in machine or "\0" in machine:
        raise InvalidArgs(f"invalid machine name {machine!r}: it must be non-empty, "
                          "without '/' or NUL")
    unit = f"machine-{unit_name_escape(machine)}.scope"
    if len(unit.encode("utf-8", "surrogateescape")) > UNIT_NAME_MAX:
        raise InvalidArgs(f"machine name {machine!r} is too long for a scope unit name")
    return unit


def _cg_escape(component: str) -> str:
    """Keep a directory name from colliding with a cgroupfs file, as systemd's cg_escape does."""
    head = component.split(".", 1)[0]
    if component.startswith(("_", ".")) or component in ("notify_on_release", "release_agent",
                                                         "tasks") or head in _controller_names():
        return "_" + component
    return component


@functools.lru_cache(maxsize=1)  # controllers are compiled in or not: fixed while we run
def _controller_names() -> frozenset[str]:
    names = {"cgroup"}
    try:
        with open("/proc/cgroups", encoding="ascii") as f:
            names.update(line.split()[0] for line in f if not line.startswith("#"))
    except FileNotFoundError:
        pass  # no v1 controllers compiled in; "cgroup." is still reserved
    return frozenset(names)


# Device access -----------------------------------------------------------------

def device_rules(allow: Iterable[tuple[str, str]] = DEVICE_ALLOW) -> list[str]:
    """The allow list as v1 devices.allow lines; host nodes that do not exist are skipped."""
    rules = []
    for spec, perms in allow:
        if spec.startswith("char-"):
            rules += [f"c {major}:* {perms}" for major in _char_majors(spec[len("char-"):])]
            continue
        try:
            st = os.stat(spec)
        except FileNotFoundError:
            continue  # e.g. no tun module: nothing to allow
        kind = "c" if stat.S_ISCHR(st.st_mode) else "b" if stat.S_ISBLK(st.st_mode) else None
        if kind:
            rules.append(f"{kind} {os.major(st.st_rdev)}:{os.minor(st.st_rdev)} {perms}")
    return rules


def _char_majors(driver: str) -> list[int]:
    majors = []
    with open("/proc/devices", encoding="ascii") as f:
        in_char = False
        for line in f:
            if line.strip().endswith("devices:"):
                in_char = line.startswith("Character")
            elif in_char and line.split()[1:] == [driver]:
                majors.append(int(line.split()[0]))
    return majors


# The per-container set -----------------------------------------------------------

def _write(path: str, data: str) -> None:
    try:
        with open(path, "w", encoding="ascii") as f:
            f.write(data)
    except OSError as exc:
        raise CgroupError(f"writing {data.strip()!r} to {path}: {exc.strerror}") from exc


def _read_pids(path: str) -> set[int]:
    try:
        with open(os.path.join(path, "cgroup.procs"), encoding="ascii") as f:
            return {int(line) for line in f if line.strip()}
    except FileNotFoundError:
        return set()


def _subtree(path: str) -> list[str]:
    """`path` and every cgroup below it, deepest first (the order rmdir needs)."""
    if not os.path.isdir(path):
        return []
    return [root for root, _dirs, _files in os.walk(path, topdown=False)]


@dataclass
class CgroupJoin:
    """How a child enters its scope without the kernel's global migration lock.

    Writing a pid to cgroup.procs takes cgroup_threadgroup_rwsem for writing,
    and the first writer after a quiet spell waits for an RCU grace period:
    5-20 ms per start on this VM, more than the rest of a start. Two ways
    around it, which together cover every layout: the child is born in the
    v2 cgroup (clone3 with CLONE_INTO_CGROUP), and in each v1 hierarchy it
    writes "0" to the scope's `tasks` file as its first step, which moves only
    the calling thread (all of the child, single-threaded as it is) and needs
    no global lock. The files are opened here, by hosteld, so the permission
    check is hosteld's even when the child is already in a user namespace."""

    born_in: int = -1                                   # v2 directory, for CLONE_INTO_CGROUP
    tasks: list[tuple[str, int]] = field(default_factory=list)  # v1: (tasks file, fd)

    def plan_steps(self, plan: Plan, new_namespace: bool = True) -> None:
        """Join every v1 cgroup, then (unless the caller joins an existing one) make the
        cgroup namespace whose root is the cgroup just joined, as nspawn does: inside,
        /proc/self/cgroup shows "/" and cgroupfs mounts show nothing above it.
        unshare() needs CAP_SYS_ADMIN, which a child has even in its fresh, still
        unmapped user namespace; so the namespace belongs to the container's own."""
        for path, fd in self.tasks:
            plan.write_fd(fd, b"0", f"join cgroup {os.path.dirname(path)}")
        if new_namespace:
            plan.unshare(native.CLONE_NEWCGROUP)

    def close(self) -> None:
        for fd in [self.born_in, *(fd for _path, fd in self.tasks)]:
            if fd >= 0:
                os.close(fd)
        self.born_in, self.tasks = -1, []


def _open(path: str, flags: int) -> int:
    try:
        return os.open(path, flags | os.O_CLOEXEC)
    except OSError as exc:
        raise CgroupError(f"opening {path}: {exc.strerror}") from exc


@dataclass
class CgroupSet:
    """A container's scope, one directory per hierarchy."""

    machine: str
    unit: str
    slice: str
    paths: tuple[str, ...]          # the scope in each hierarchy

    @property
    def payload_paths(self) -> tuple[str, ...]:
        """Where the container's processes live: one level below the device policy."""
        return tuple(os.path.join(path, PAYLOAD) for path in self.paths)

    def apply_properties(self, properties: list[Property]) -> None:
        """Write --property's limits into the scope (cgroup_properties), in every hierarchy
        that has the file; a property no hierarchy here can hold is an error."""
        for prop in properties:
            written = False
            for path in self.paths:
                if _is_v2(path):
                    for file, value in prop.v2:
                        if _enable_controller(path, file):
                            _write(os.path.join(path, file), value)
                            written = True
                else:
                    for _controller, file, value in prop.v1:
                        if os.path.exists(os.path.join(path, file)):
                            _write(os.path.join(path, file), value)
                            written = True
            if not written:
                raise CgroupError(f"--property={prop.name}=: no cgroup hierarchy of this host "
                                  f"can hold it (it needs {', '.join(f for f, _ in prop.v2)} "
                                  "of cgroup v2)")

    def open_join(self) -> CgroupJoin:
        """Descriptors through which a new child enters the payload cgroup in every hierarchy."""
        join = CgroupJoin()
        try:
            # A scope made by an older hosteld (adopted) has no payload cgroup: join the scope.
            for path in [p if os.path.isdir(p) else os.path.dirname(p) for p in self.payload_paths]:
                if os.path.exists(os.path.join(path, "cgroup.controllers")):  # v2
                    join.born_in = _open(path, os.O_RDONLY | os.O_DIRECTORY)
                else:
                    tasks = os.path.join(path, "tasks")
                    join.tasks.append((tasks, _open(tasks, os.O_WRONLY)))
        except CgroupError:
            join.close()
            raise
        return join

    def allow_devices(self, nodes: Iterable[str]) -> None:
        """Also let the container use these host nodes (e.g. the loop devices of its image,
        which it mounts from inside the scope)."""
        extra = device_rules([(node, "rw") for node in nodes])
        if not extra:
            return
        for path in self.paths:
            allow = os.path.join(path, "devices.allow")
            if os.path.exists(allow):  # v1 children copy their parent's list only when made
                for directory in (path, os.path.join(path, PAYLOAD)):
                    for rule in extra:
                        _write(os.path.join(directory, "devices.allow"), rule + "\n")
            elif _is_v2(path):  # a program is replaced whole: the defaults go in again
                _attach_device_program(path, device_rules() + extra)

    def delegate(self, uid: int, gid: int) -> None:
        """Let root of a user-namespaced container (host uid, gid) manage its own cgroup
        tree, as nspawn does: the payload directory and the files that move processes or
        enable controllers, in the hierarchies an init keeps its tree in (name=systemd,
        cgroup2) -- never devices.allow, whose writes the kernel keeps for host root."""
        for path in self.payload_paths:
            if not os.path.isdir(path) or not _in_init_hierarchy(path):
                continue
            for name in ("", "cgroup.procs", "cgroup.threads", "cgroup.subtree_control", "tasks",
                         "notify_on_release", "cgroup.clone_children"):
                target = os.path.join(path, name)
                try:
                    os.chown(target, uid, gid, follow_symlinks=False)
                except FileNotFoundError:
                    continue  # a file this version of the hierarchy does not have
                except OSError as exc:
                    raise CgroupError(f"delegating {target} to uid {uid}: {exc.strerror}") from exc

    def procs(self) -> set[int]:
        """Every process in the scope or below it, in any hierarchy."""
        pids: set[int] = set()
        for path in self.paths:
            for cgroup in _subtree(path):
                pids |= _read_pids(cgroup)
        return pids

    def kill(self, sig: int) -> int:
        """Send `sig` to every process in the scope; return how many were signalled.

        Processes forked while we signal are caught by going round again until
        no new ones appear. For SIGKILL, a v2 hierarchy's cgroup.kill does it
        atomically first, and the loop only mops up."""
        sent: set[int] = set()
        kill_files = [os.path.join(p, "cgroup.kill") for p in self.paths]
        kill_files = [f for f in kill_files if os.path.exists(f)]
        if sig == signal.SIGKILL and kill_files:
            sent = self.procs()
            _write(kill_files[0], "1")
        while fresh := self.procs() - sent:
            for pid in fresh:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass  # exited between reading cgroup.procs and now
            sent |= fresh
        return len(sent)

    def remove(self, grace: float = 1.0) -> None:
        """Wait for the scope to empty, SIGKILL what is left after `grace` seconds, remove it.

        Safe to call again, and on a set some of whose directories are gone.
        Slices left empty are removed too, as systemd stops unused slices."""
        with _TREE_LOCK:
            if self._remove_empty_scopes():
                return
        self._wait_empty(grace)
        with _TREE_LOCK:
            for path in self.paths:
                for cgroup in _subtree(path):
                    if not _rmdir(cgroup, missing_ok=True):
                        raise CgroupError(f"cgroup {cgroup} of machine {self.machine!r} is busy "
                                          "again after it was emptied; remove it once more")
                _prune_slices(path, self.slice)

    def _remove_empty_scopes(self) -> bool:
        """The usual end, in one rmdir per hierarchy: an empty scope with no child cgroups.
        False (and the scope as it was, in the hierarchies not yet done) otherwise."""
        for path in self.paths:
            if not (_rmdir(os.path.join(path, PAYLOAD), missing_ok=True)
                    and _rmdir(path, missing_ok=True)):
                return False
            _prune_slices(path, self.slice)
        return True

    def _wait_empty(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        killed = False
        while pids := self.procs():
            if time.monotonic() >= deadline:
                if killed:
                    raise CgroupError(f"processes {sorted(pids)} of machine {self.machine!r} "
                                      f"survived SIGKILL; {self.unit} is left in place")
                self.kill(signal.SIGKILL)
                killed = True
                deadline = time.monotonic() + grace
            time.sleep(0.005)


def _rmdir(path: str, missing_ok: bool) -> bool:
    try:
        os.rmdir(path)
    except FileNotFoundError:
        if not missing_ok:
            raise
    except OSError as exc:
        if exc.errno in (errno.EBUSY, errno.ENOTEMPTY):
            return False
        raise CgroupError(f"removing cgroup {path}: {exc.strerror}") from exc
    return True


def _prune_slices(scope_path: str, slice_name: str) -> None:
    """rmdir the slice directories above a removed scope while they are empty."""
    path = os.path.dirname(scope_path)
    for _ in slice_path(slice_name).split("/") if slice_path(slice_name) else ():
        if not _rmdir(path, missing_ok=True):
            return  # another container still uses it
        path = os.path.dirname(path)


def _copy_cpuset(path: str) -> None:
    """A new v1 cpuset cgroup starts with no CPUs and no memory nodes: give it its parent's."""
    parent = os.path.dirname(path)
    for name in ("cpuset.cpus", "cpuset.mems"):
        try:
            with open(os.path.join(path, name), encoding="ascii") as f:
                if f.read().strip():
                    continue
            with open(os.path.join(parent, name), encoding="ascii") as f:
                inherited = f.read()
        except OSError as exc:
            raise CgroupError(f"reading {name} for cgroup {path}: {exc.strerror}") from exc
        _write(os.path.join(path, name), inherited)


# Starts and exits run in threads: creating a scope (mkdir slice, mkdir scope) and
# pruning an emptied slice (rmdir) must not interleave, or one container's pruning
# removes the slice another is about to create its scope in.
_TREE_LOCK = threading.Lock()


def _make_dirs(hierarchy: Hierarchy, relative: str) -> str:
    """Create each directory of `relative` under the hierarchy's base; return the last."""
    path = hierarchy.path()
    for component in relative.split("/"):
        path = os.path.join(path, component)
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            pass
        except OSError as exc:
            raise CgroupError(f"creating cgroup {path}: {exc.strerror}") from exc
        if "cpuset" in hierarchy.controllers:
            _copy_cpuset(path)
    return path


def _restrict_devices(path: str, rules: list[str]) -> None:
    _write(os.path.join(path, "devices.deny"), "a\n")
    for rule in rules:
        _write(os.path.join(path, "devices.allow"), rule + "\n")


def _is_v2(path: str) -> bool:
    return os.path.exists(os.path.join(path, "cgroup.controllers"))


def _enable_controller(path: str, file: str) -> bool:
    """Make a controller's `file` appear in v2 cgroup `path`: enable the controller in the
    parents' cgroup.subtree_control, from the highest one that does not delegate it yet.
    False when this v2 hierarchy does not have the controller (a hybrid host's v1 has it)."""
    if os.path.exists(os.path.join(path, file)):
        return True
    controller = file.split(".")[0]
    with open(os.path.join(os.path.dirname(path), "cgroup.controllers")) as f:
        if controller not in f.read().split():
            return False
    missing = []
    parent = os.path.dirname(path)
    while _is_v2(parent):
        with open(os.path.join(parent, "cgroup.subtree_control")) as f:
            if controller in f.read().split():
                break
        missing.append(parent)
        parent = os.path.dirname(parent)
    for cgroup in reversed(missing):
        _write(os.path.join(cgroup, "cgroup.subtree_control"), f"+{controller}")
    return True


def _in_init_hierarchy(path: str) -> bool:
    """Whether `path` is in cgroup2 or a named v1 hierarchy (name=systemd): where an init
    system keeps its own tree, and where nspawn delegates to a user-namespaced container."""
    for hierarchy in current_layout().hierarchies:
        if path.startswith(hierarchy.mountpoint.rstrip("/") + "/"):
            return hierarchy.version == 2 or any(c.startswith("name=")
                                                 for c in hierarchy.controllers)
    return False


def _attach_device_program(path: str, rules: list[str]) -> None:
    """The v2 policy. A kernel that refuses the program (no CONFIG_CGROUP_BPF) fails the
    start, unless a v1 devices hierarchy enforces the same rules anyway (hybrid hosts)."""
    try:
        bpf_devices.attach(path, [bpf_devices.DeviceRule.parse(rule) for rule in rules])
    except bpf_devices.BpfError as exc:
        if any("devices" in h.controllers for h in current_layout().hierarchies):
            log.warning("%s; the v1 devices hierarchy still enforces the allow list", exc)
            return
        raise CgroupError(f"{exc}; without it a container on this cgroup2 host could open "
                          "any device") from exc


def create(machine: str, slice_name: str | None = None,
           layout: CgroupLayout | None = None) -> CgroupSet:
    """Create the scope of `machine` in every writable hierarchy, with the device allow list.

    A scope left over from a machine that is gone (no processes) is removed and
    made afresh; one that still has processes means the name is in use."""
    layout = layout or CgroupLayout.detect()
    unit, slice_unit_name = scope_unit(machine), slice_unit(slice_name)
    relative = "/".join(filter(None, (slice_path(slice_unit_name), unit)))
    stale = CgroupSet(machine, unit, slice_unit_name,
                      tuple(h.path(relative) for h in layout.hierarchies))
    if any(os.path.isdir(path) for path in stale.paths):
        if occupants := stale.procs():
            raise AlreadyExists(f"cgroup {unit} still has processes {sorted(occupants)}; "
                                f"terminate machine {machine!r} first")
        stale.remove(grace=0)
    paths = []
    try:
        with _TREE_LOCK:  # another start's or exit's slice pruning must not cut under us
            for hierarchy in layout.hierarchies:
                paths.append(_make_dirs(hierarchy, relative))
        rules = device_rules()
        for path, hierarchy in zip(paths, layout.hierarchies):
            if "devices" in hierarchy.controllers:
                _restrict_devices(path, rules)
            elif hierarchy.version == 2:
                _attach_device_program(path, rules)
            # Made after the policy, so that it inherits the v1 rules at creation.
            _make_dirs(hierarchy, f"{relative}/{PAYLOAD}")
    except CgroupError:
        CgroupSet(machine, unit, slice_unit_name, tuple(paths)).remove(grace=0)
        raise
    return CgroupSet(machine, unit, slice_unit_name, tuple(paths))


def machine_of_pid(pid: int, layout: CgroupLayout | None = None) -> str | None:
    """The machine whose scope (under one of our slices) holds `pid`, or None.

    Looks through every hierarchy we manage, so a container that moved its
    processes around in one of them (its own init does, in name=systemd) is
    still found through the others."""
    layout = layout or CgroupLayout.detect()
    try:
        lines = _read_cgroup_file(f"/proc/{pid}/cgroup")
    except FileNotFoundError:
        raise NoSuchObject(f"no process with PID {pid}") from None
    for _hid, controllers, path in lines:
        for hierarchy in layout.hierarchies:
            if hierarchy.names(controllers):
                name = _machine_in(path, hierarchy.base)
                if name is not None:
                    return name
    return None


def _machine_in(path: str, base: str) -> str | None:
    prefix = base.rstrip("/") + "/"
    if not path.startswith(prefix):
        return None
    components = path[len(prefix):].split("/")
    depth = 0
    while depth < len(components) and components[depth].endswith(".slice"):
        depth += 1
    if depth == 0 or depth == len(components):
        return None
    match = _SCOPE.fullmatch(components[depth])
    if match is None:
        return None
    try:
        return unit_name_unescape(match.group(1))
    except UnitNameError:
        return None  # not a name machined or hostel would have escaped
