"""Container cgroups on this machine's real hierarchies: create, join, kill, remove."""
from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from hostel import native
from hostel.bus import AlreadyExists, InvalidArgs, NoSuchObject
from hostel.machine import bpf_devices, cgroups
from hostel.machine.cgroups import CgroupLayout, CgroupSet
from hostel.spawn import Child, Plan, StepFailed, spawn

_counter = itertools.count()


def unique(prefix: str) -> str:
    return f"{prefix}{os.getpid()}x{next(_counter)}"


@pytest.fixture
def layout() -> CgroupLayout:
    return CgroupLayout.detect()


@pytest.fixture
def make_set(layout: CgroupLayout) -> Iterator[Callable[..., CgroupSet]]:
    """create() for the test; every set made is removed afterwards, slice directories included."""
    made: list[CgroupSet] = []

    def make(machine: str | None = None, slice_name: str | None = None) -> CgroupSet:
        cg = cgroups.create(machine or unique("hostel-test-"), slice_name or unique("hosteltest"),
                            layout)
        made.append(cg)
        return cg

    try:
        yield make
    finally:
        for cg in made:
            cg.remove(grace=0.2)
            slice_top = cgroups.slice_path(cg.slice).split("/")[0]
            leftovers = [h.path(slice_top) for h in layout.hierarchies
                         if os.path.exists(h.path(slice_top))]
            assert not leftovers, f"slice directories left behind: {leftovers}"


@pytest.fixture
def start_in() -> Iterator[Callable[[CgroupSet, str], Child]]:
    """Start `sh -c SCRIPT` in a cgroup set (joined before it runs); reap it afterwards."""
    children: list[Child] = []

    def start(cg: CgroupSet, script: str, stdout: int | None = None, flags: int = 0) -> Child:
        plan = Plan()
        join = cg.open_join()
        try:
            join.plan_steps(plan)
            if stdout is not None:
                plan.dup2(stdout, 1)
            plan.execve("/bin/sh", ["sh", "-c", script], ["PATH=/usr/bin:/bin"])
            child = spawn(plan, flags, join.born_in)
        finally:
            join.close()
        children.append(child)
        child.wait_started()
        return child

    try:
        yield start
    finally:
        for child in children:
            try:
                if native.pidfd_wait(child.pidfd) is None:
                    native.pidfd_send_signal(child.pidfd, signal.SIGKILL)
                    native.pidfd_wait(child.pidfd, block=True)
            except ChildProcessError:
                pass  # the test reaped it already
            child.close()


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_layout_matches_the_mount_table_and_our_own_cgroup(layout: CgroupLayout) -> None:
    mounts = [line.split() for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    fstype_at = {fields[4]: fields[fields.index("-") + 1] for fields in mounts}
    own = [line.split(":", 2) for line in Path("/proc/self/cgroup").read_text().splitlines()]
    assert layout.hierarchies
    for hierarchy in layout.hierarchies:
        assert fstype_at[hierarchy.mountpoint] == ("cgroup2" if hierarchy.version == 2 else "cgroup")
        assert [path for _, ctl, path in own if hierarchy.names(ctl)] == [hierarchy.base]
    v2_points = {point for point, fstype in fstype_at.items() if fstype == "cgroup2"}
    has_v1 = "cgroup" in fstype_at.values()
    if "/sys/fs/cgroup" in v2_points:
        assert layout.mode == "unified"
    else:
        assert layout.mode == ("hybrid" if v2_points and has_v1 else "legacy")


def _detect_in_private_mounts(setup: str) -> str:
    """Run `setup` in a private mount namespace, then detect the layout there."""
    script = textwrap.dedent(f"""\
        set -e
        mount --make-rprivate /
        {setup}
        {sys.executable} -c 'from hostel.machine.cgroups import CgroupLayout as L; d = L.detect(); print(d.mode, *sorted(h.mountpoint for h in d.hierarchies))'
    """)
    done = subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_pure_unified_layout_is_detected() -> None:
    out = _detect_in_private_mounts(
        "umount -R /sys/fs/cgroup; mount -t cgroup2 none /sys/fs/cgroup")
    assert out == "unified /sys/fs/cgroup"


def test_legacy_layout_is_detected() -> None:
    if not os.path.ismount("/sys/fs/cgroup/unified"):
        pytest.skip("no cgroup2 on /sys/fs/cgroup/unified to take away")
    out = _detect_in_private_mounts("umount /sys/fs/cgroup/unified")
    mode, *points = out.split()
    assert mode == "legacy"
    assert points and "/sys/fs/cgroup/unified" not in points


def test_scope_is_made_in_every_hierarchy_and_holds_the_child(
        make_set: Callable[..., CgroupSet], start_in: Callable[..., Child],
        layout: CgroupLayout) -> None:
    cg = make_set("web-1", unique("hosteltest"))
    assert cg.unit == "machine-web\\x2d1.scope"
    assert len(cg.paths) == len(layout.hierarchies)
    for hierarchy, path in zip(layout.hierarchies, cg.paths):
        assert path == hierarchy.path(f"{cg.slice}/{cg.unit}")
        assert os.path.isdir(path)
    child = start_in(cg, "sleep 1000 & sleep 1000")
    wait_for(lambda: len(cg.procs()) == 3)  # sh and its two sleeps
    for path in cg.payload_paths:
        assert child.pid in {int(p) for p in Path(path, "cgroup.procs").read_text().split()}
    membership = Path(f"/proc/{child.pid}/cgroup").read_text().splitlines()
    for hierarchy in layout.hierarchies:
        line = next(line for line in membership if hierarchy.names(line.split(":", 2)[1]))
        assert line.split(":", 2)[2] == os.path.join(hierarchy.base, cg.slice, cg.unit, "payload")
    assert cgroups.machine_of_pid(child.pid, layout) == "web-1"
    for pid in cg.procs():
        assert cgroups.machine_of_pid(pid, layout) == "web-1"

    assert cg.kill(signal.SIGKILL) == 3
    info = native.pidfd_wait(child.pidfd, block=True)
    assert not info.exited and info.status == signal.SIGKILL
    wait_for(lambda: not cg.procs())
    cg.remove()
    assert not any(os.path.exists(p) for p in cg.paths)
    assert not any(os.path.exists(os.path.dirname(p)) for p in cg.paths)  # the empty slice too
    cg.remove()  # idempotent


def _membership(pid: int, layout: CgroupLayout) -> list[str]:
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    return [next(line.split(":", 2)[2] for line in lines if h.names(line.split(":", 2)[1]))
            for h in layout.hierarchies]


@pytest.mark.parametrize("flags", [0, native.CLONE_NEWUSER | native.CLONE_NEWPID],
                         ids=["plain", "in-a-user-namespace"])
def test_child_is_born_in_the_v2_scope_and_joins_v1_itself(
        make_set: Callable[..., CgroupSet], layout: CgroupLayout, flags: int) -> None:
    """No migration by pid: clone3 puts the child straight into the v2 scope, and the child
    moves itself into each v1 scope through `tasks` files we opened (so it may, even from
    an unmapped user namespace). Stopped before its join steps, the child shows both."""
    cg = make_set()
    ours = _membership(os.getpid(), layout)
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    join = cg.open_join()
    plan = Plan()
    plan.wait_for_parent(go_r, "the test looks first")
    join.plan_steps(plan)
    plan.execve("/bin/sleep", ["sleep", "1000"], [])
    try:
        child = spawn(plan, flags, join.born_in)
    finally:
        join.close()
        os.close(go_r)
    try:
        wait_for(lambda: "pipe_read" in Path(f"/proc/{child.pid}/wchan").read_text())
        before = _membership(child.pid, layout)
        os.write(go_w, b"x")
        child.wait_started()
        after = _membership(child.pid, layout)
    finally:
        os.close(go_w)
        native.pidfd_send_signal(child.pidfd, signal.SIGKILL)
        native.pidfd_wait(child.pidfd, block=True)
        child.close()
    scope = [os.path.join(h.base, cg.slice, cg.unit, "payload") for h in layout.hierarchies]
    assert after == scope
    for hierarchy, was, own, target in zip(layout.hierarchies, before, ours, scope):
        assert was == (target if hierarchy.version == 2 else own), hierarchy


def test_a_scope_removed_under_a_start_is_a_step_failure(
        make_set: Callable[..., CgroupSet], layout: CgroupLayout) -> None:
    """The join fails as a named step, not silently, if its cgroup is gone by then."""
    if not any(h.version == 1 for h in layout.hierarchies):
        pytest.skip("no v1 hierarchy: nothing is joined by a step")
    cg = make_set()
    join = cg.open_join()
    plan = Plan()
    join.plan_steps(plan)
    plan.execve("/bin/true", ["true"], [])
    for path in cg.payload_paths:
        if not os.path.exists(os.path.join(path, "cgroup.controllers")):
            os.rmdir(path)
    try:
        child = spawn(plan, 0, -1)
    finally:
        join.close()
    try:
        with pytest.raises(StepFailed, match=r"step 0 \(join cgroup .*machine-.*\.scope/payload\)"):
            child.wait_started()
    finally:
        native.pidfd_wait(child.pidfd, block=True)
        child.close()


def test_kill_with_a_catchable_signal_reaches_every_process(
        make_set: Callable[..., CgroupSet], start_in: Callable[..., Child],
        tmp_path: Path) -> None:
    cg = make_set()
    marks = tmp_path / "marks"
    marks.mkdir()
    # The traps must not fork: a process forked during kill() is signalled too.
    script = (f"for i in 1 2; do (trap 'echo $i > {marks}/$i; exit 0' TERM; "
              "sleep 1000 & wait) & done; wait")
    child = start_in(cg, script)
    wait_for(lambda: len(cg.procs()) == 5)  # sh, two subshells, two sleeps
    assert cg.kill(signal.SIGTERM) == 5
    wait_for(lambda: sorted(os.listdir(marks)) == ["1", "2"])
    native.pidfd_wait(child.pidfd, block=True)


def test_remove_kills_what_ignores_sigterm_after_the_grace_period(
        make_set: Callable[..., CgroupSet], start_in: Callable[..., Child]) -> None:
    cg = make_set()
    child = start_in(cg, "trap '' TERM; sleep 1000 & sleep 1000")
    wait_for(lambda: len(cg.procs()) == 3)
    cg.kill(signal.SIGTERM)
    time.sleep(0.05)
    assert child.pid in cg.procs()  # the shell ignored it
    started = time.monotonic()
    cg.remove(grace=0.2)
    assert 0.2 <= time.monotonic() - started < 3
    assert native.pidfd_wait(child.pidfd, block=True).status == signal.SIGKILL
    assert not any(os.path.exists(p) for p in cg.paths)


def test_the_container_may_only_open_the_allowed_devices(
        make_set: Callable[..., CgroupSet], start_in: Callable[..., Child],
        layout: CgroupLayout) -> None:
    if not any("devices" in h.controllers for h in layout.hierarchies):
        pytest.skip("no v1 devices controller here (v2 device control needs BPF)")
    cg = make_set()
    devices = next(p for p, h in zip(cg.paths, layout.hierarchies) if "devices" in h.controllers)
    rules = Path(devices, "devices.list").read_text().split("\n")
    assert "c 1:3 rwm" in rules and "c 136:* rw" in rules and "a *:* rwm" not in rules
    with open("/dev/kmsg", "rb"):
        pass  # the host may open it: the denial below is the cgroup's doing
    out_r, out_w = os.pipe()
    child = start_in(cg, "head -c 3 /dev/zero | od -An -tx1; "
                         "if (: </dev/kmsg) 2>/dev/null; then echo kmsg-opened; else echo kmsg-denied; fi; "
                         "mknod /tmp/hostel-null-$$ c 1 3 && echo mknod-ok && rm /tmp/hostel-null-$$",
                     stdout=out_w)
    os.close(out_w)
    with os.fdopen(out_r) as out:
        lines = out.read().split("\n")
    assert lines[:3] == [" 00 00 00", "kmsg-denied", "mknod-ok"]
    assert native.pidfd_wait(child.pidfd, block=True).status == 0


def test_nested_slice_lives_inside_its_parents(
        make_set: Callable[..., CgroupSet], start_in: Callable[..., Child],
        layout: CgroupLayout) -> None:
    top = unique("hosteltest")
    cg = make_set("nested", f"{top}-inner-deep")
    assert cg.slice == f"{top}-inner-deep.slice"
    relative = f"{top}.slice/{top}-inner.slice/{top}-inner-deep.slice/machine-nested.scope"
    assert cg.paths[0] == layout.hierarchies[0].path(relative)
    child = start_in(cg, "sleep 1000")
    assert cgroups.machine_of_pid(child.pid, layout) == "nested"
    cg.remove(grace=0.2)
    assert not os.path.exists(layout.hierarchies[0].path(f"{top}.slice"))


def test_sibling_scope_keeps_the_slice(make_set: Callable[..., CgroupSet]) -> None:
    slice_name = unique("hosteltest")
    first, second = make_set("one", slice_name), make_set("two", slice_name)
    first.remove()
    assert all(os.path.isdir(p) for p in second.paths)
    second.remove()
    assert not any(os.path.exists(os.path.dirname(p)) for p in second.paths)


def test_occupied_scope_is_refused_and_a_stale_one_replaced(
        make_set: Callable[..., CgroupSet], start_in: Callable[..., Child],
        layout: CgroupLayout) -> None:
    slice_name = unique("hosteltest")
    cg = make_set("dup", slice_name)
    child = start_in(cg, "sleep 1000")
    with pytest.raises(AlreadyExists, match=r"machine-dup\.scope still has processes"):
        cgroups.create("dup", slice_name, layout)
    cg.kill(signal.SIGKILL)
    native.pidfd_wait(child.pidfd, block=True)
    wait_for(lambda: not cg.procs())
    os.mkdir(os.path.join(cg.paths[0], "leftover-child"))
    again = make_set("dup", slice_name)
    assert again.paths == cg.paths
    assert not os.path.exists(os.path.join(cg.paths[0], "leftover-child"))


def test_pids_outside_our_scopes_belong_to_no_machine(layout: CgroupLayout) -> None:
    assert cgroups.machine_of_pid(os.getpid(), layout) is None
    assert cgroups.machine_of_pid(1, layout) is None
    with pytest.raises(NoSuchObject, match="no process with PID 2147483647"):
        cgroups.machine_of_pid(2147483647, layout)


@pytest.mark.parametrize("given, unit, path", [
    (None, "machine.slice", "machine.slice"),
    ("foo", "foo.slice", "foo.slice"),
    ("foo.slice", "foo.slice", "foo.slice"),
    ("a-b-c", "a-b-c.slice", "a.slice/a-b.slice/a-b-c.slice"),
    ("-.slice", "-.slice", ""),
    ("cpu.slice", "cpu.slice", "_cpu.slice"),
    ("foo.bar", "foo.bar.slice", "foo.bar.slice"),
])
def test_slice_names(given: str | None, unit: str, path: str) -> None:
    assert cgroups.slice_unit(given) == unit
    assert cgroups.slice_path(unit) == path


@pytest.mark.parametrize("bad", [
    "foo.service", "web.scope", "-foo", "foo-", "a--b", "foo/bar", "sp ace", "x@y",
    "a" * 250, "-.slice-",
])
def test_bad_slice_names_are_rejected(bad: str) -> None:
    with pytest.raises(InvalidArgs, match=r"--slice|slice name"):
        cgroups.slice_unit(bad)


def test_bad_slice_name_is_rejected_before_anything_is_created(layout: CgroupLayout) -> None:
    name = unique("hostel-test-")
    with pytest.raises(InvalidArgs):
        cgroups.create(name, "bad--name", layout)
    assert not any(os.path.exists(h.path("bad.slice")) for h in layout.hierarchies)


@pytest.mark.parametrize("bad", ["", "a/b", "x" * 260])
def test_bad_machine_names_are_rejected(bad: str) -> None:
    with pytest.raises(InvalidArgs, match="machine name"):
        cgroups.scope_unit(bad)


def test_concurrent_starts_and_exits_in_one_slice_do_not_race() -> None:
    """One container's slice pruning must not remove the slice another is creating in."""
    import threading

    from hostel.machine.cgroups import CgroupError, create

    errors: list[Exception] = []

    def churn(i: int) -> None:
        for _ in range(15):
            try:
                create(f"race{i}", "hostelrace").remove(grace=0)
            except CgroupError as e:
                errors.append(e)

    threads = [threading.Thread(target=churn, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


# Device policy and the cgroup namespace ----------------------------------------------

def _v2_scope(cg: CgroupSet) -> str:
    path = next((p for p in cg.paths if os.path.exists(os.path.join(p, "cgroup.controllers"))), None)
    if path is None:
        pytest.skip("no cgroup2 hierarchy here")
    return path


def _output_of(start_in: Callable[..., Child], cg: CgroupSet, script: str) -> list[str]:
    out_r, out_w = os.pipe()
    child = start_in(cg, script, stdout=out_w)
    os.close(out_w)
    with os.fdopen(out_r) as out:
        lines = out.read().split("\n")
    native.pidfd_wait(child.pidfd, block=True)
    return lines


def test_the_v2_scope_holds_an_exclusive_device_program(make_set: Callable[..., CgroupSet]) -> None:
    """Attached without ALLOW_OVERRIDE/MULTI: the kernel refuses any program below it,
    so the payload (the container's own cgroup) cannot loosen the rules."""
    cg = make_set()
    scope = _v2_scope(cg)
    flags, programs = bpf_devices.attached_programs(scope)
    assert flags == 0 and len(programs) == 1
    with pytest.raises(bpf_devices.BpfError, match="Operation not permitted"):
        bpf_devices.attach(os.path.join(scope, "payload"), [bpf_devices.DeviceRule.parse("c *:* rwm")])
    cg.allow_devices(["/dev/kmsg"])  # replaces the program: still one, still exclusive
    flags, replaced = bpf_devices.attached_programs(scope)
    assert flags == 0 and len(replaced) == 1 and replaced != programs


def test_the_device_program_alone_enforces_the_allow_list(
        start_in: Callable[..., Child], layout: CgroupLayout) -> None:
    """A bare v2 cgroup with only the program (no v1 devices rules): what a v2-only host has."""
    v2 = next((h for h in layout.hierarchies if h.version == 2), None)
    if v2 is None:
        pytest.skip("no cgroup2 hierarchy here")
    path = v2.path(unique("hostel-bpf-"))
    os.mkdir(path)
    try:
        bpf_devices.attach(path, [bpf_devices.DeviceRule.parse(r) for r in cgroups.device_rules()])
        bare = CgroupSet("bare", "bare.scope", "-.slice", (path,))
        os.mkdir(bare.payload_paths[0])
        lines = _output_of(start_in, bare,
                           "head -c 1 /dev/zero | od -An -tx1; "
                           "(: </dev/kmsg) 2>/dev/null && echo kmsg-opened || echo kmsg-denied; "
                           "mknod /tmp/hostel-bpf-$$ b 7 0 2>/dev/null && echo mknod-ok || echo mknod-denied; "
                           "rm -f /tmp/hostel-bpf-$$")
    finally:
        for directory in (os.path.join(path, "payload"), path):
            if os.path.isdir(directory):
                os.rmdir(directory)
    assert lines[:3] == [" 00", "kmsg-denied", "mknod-denied"]


def test_root_in_the_payload_cannot_widen_its_devices(
        make_set: Callable[..., CgroupSet], start_in: Callable[..., Child],
        layout: CgroupLayout) -> None:
    """Its own devices.allow takes nothing its parent, the scope, does not allow."""
    if not any("devices" in h.controllers for h in layout.hierarchies):
        pytest.skip("no v1 devices controller here")
    cg = make_set()
    payload = next(p for p, h in zip(cg.payload_paths, layout.hierarchies)
                   if "devices" in h.controllers)
    assert "c 1:3 rwm" in Path(payload, "devices.list").read_text().split("\n")
    lines = _output_of(start_in, cg,
                       f"echo a > {payload}/devices.allow 2>/dev/null && echo all-granted || echo all-refused; "
                       f"echo 'c 1:11 rw' > {payload}/devices.allow 2>/dev/null && echo kmsg-granted || echo kmsg-refused; "
                       "(: </dev/kmsg) 2>/dev/null && echo kmsg-opened || echo kmsg-denied")
    assert lines[:3] == ["all-refused", "kmsg-refused", "kmsg-denied"]


def test_the_cgroup_namespace_is_rooted_at_the_payload(
        make_set: Callable[..., CgroupSet], start_in: Callable[..., Child],
        layout: CgroupLayout) -> None:
    cg = make_set()
    lines = _output_of(start_in, cg, "cat /proc/self/cgroup")
    own = [line.split(":", 2) for line in lines if line.count(":") >= 2]
    managed = [entry for entry in own if any(h.names(entry[1]) for h in layout.hierarchies)]
    assert len(managed) == len(layout.hierarchies)
    assert {entry[2] for entry in managed} == {"/"}
