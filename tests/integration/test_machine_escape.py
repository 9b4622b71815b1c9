"""The escape probe (escape_probe.c) under systemd-nspawn 252 and under hostel, side by side.

Both run the same static probe as the payload, on copies of the same busybox
tree, each in a cgroup of its own with a canary cgroup beside it (outside the
container's subtree) and a canary key in the host root's user keyring. Every
action the probe tries that nspawn blocks, hostel must block too; and hostel
must block the actions issue 15 found open (keyring, bpf, perf, cgroup
writes outside the container, device widening, host devices, ...) whatever
nspawn does. The table of both results is printed (pytest -s shows it).

nspawn runs with --register=no --keep-unit in a private mount namespace with
its own /run, as in test_machine_nspawn_compare.py; without machined it sets
no device policy, which only makes its column more permissive."""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from hostel.machine.cgroups import CgroupLayout
from hostel.privatebus import DaemonProcess

from conftest import HOSTELCTL, hostelctl

PROBE_SOURCE = Path(__file__).with_name("escape_probe.c")
CANARY_TEXT = "hostel-canary-secret-0615"
CANARY_CGROUP = "hostel-probe-canary"
NSPAWN_CGROUP = "hostel-probe-nspawn"
KEY_NAMES = (b"hostel-probe-canary", b"hostel-probe-added")

# What hostel must block in every mode, from issue 15's findings and point 1's list.
MUST_BLOCK = (
    "keyring_read", "add_key", "bpf", "perf_event_open", "cgroup_sibling_write",
    "cgroup_v2_sibling_write", "devices_allow_widen", "bpf_device_detach", "mknod_open_kvm",
    "mknod_open_disk", "mknod_open_loop_control", "mknod_open_kmsg", "init_module",
    "finit_module", "delete_module", "clock_settime", "kexec_load", "swapon",
    "open_by_handle_at", "cgroupfs_write_in_place", "proc_sys_write_in_place",
    "sysfs_write_in_place",
)

pytestmark = pytest.mark.skipif(not shutil.which("systemd-nspawn") or not shutil.which("gcc"),
                                reason="needs systemd-nspawn and gcc")

_libc = ctypes.CDLL(None, use_errno=True)
_SYS_ADD_KEY, _SYS_KEYCTL = 248, 250          # x86_64
_KEY_SPEC_USER_KEYRING = -4
_KEYCTL_UNLINK, _KEYCTL_SEARCH = 9, 10


def _unlink_keys() -> None:
    for name in KEY_NAMES:
        while (key := _libc.syscall(_SYS_KEYCTL, _KEYCTL_SEARCH, _KEY_SPEC_USER_KEYRING,
                                    b"user", name, 0)) > 0:
            _libc.syscall(_SYS_KEYCTL, _KEYCTL_UNLINK, key, _KEY_SPEC_USER_KEYRING)


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    exe = tmp_path_factory.mktemp("escape") / "probe"
    subprocess.run(["gcc", "-static", "-O1", "-Wall", "-o", str(exe), str(PROBE_SOURCE)],
                   check=True)
    return exe


@pytest.fixture
def canaries() -> Iterator[list[str]]:
    """A key only host root should read, and cgroups beside the containers' own, in every
    hierarchy; the nspawn run gets a cgroup of its own there too (yields those paths)."""
    _unlink_keys()
    value = CANARY_TEXT.encode()
    key = _libc.syscall(_SYS_ADD_KEY, b"user", KEY_NAMES[0], value, len(value),
                        _KEY_SPEC_USER_KEYRING)
    assert key > 0, os.strerror(ctypes.get_errno())
    made: list[str] = []
    nspawn_cgroups = []
    try:
        for hierarchy in CgroupLayout.detect().hierarchies:
            for name in (CANARY_CGROUP, NSPAWN_CGROUP):
                path = hierarchy.path(name)
                os.makedirs(path, exist_ok=True)
                made.append(path)
                if "cpuset" in hierarchy.controllers:
                    for knob in ("cpuset.cpus", "cpuset.mems"):
                        Path(path, knob).write_text(Path(hierarchy.path(), knob).read_text())
            nspawn_cgroups.append(hierarchy.path(NSPAWN_CGROUP))
        yield nspawn_cgroups
    finally:
        _unlink_keys()
        for path in made:
            for _ in range(50):  # the nspawn payload may still be leaving its cgroup
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)


def _tree_with_probe(busybox_base: Path, where: Path, probe: Path) -> Path:
    subprocess.run(["cp", "-a", str(busybox_base), str(where)], check=True)
    shutil.copy(probe, where / "probe")
    return where


def _parse(output: str) -> dict[str, str]:
    results = {}
    for line in output.splitlines():
        name, _, verdict = line.strip().partition(" ")
        if verdict in ("ALLOWED",) or verdict.startswith("BLOCKED:"):
            results[name] = verdict
    assert "END" in output, output
    return results


def _disk() -> tuple[str, str]:
    dev = os.stat("/").st_dev
    return str(os.major(dev)), str(os.minor(dev))


def run_nspawn(tree: Path, cgroups: list[str], users: list[str]) -> dict[str, str]:
    join = "; ".join(f"echo $$ > {path}/cgroup.procs" for path in cgroups)
    nspawn = ["/usr/bin/systemd-nspawn", "--register=no", "--keep-unit", "-q", "--pipe",
              "-D", str(tree), "-M", "escape", *users, "/probe", CANARY_TEXT, *_disk()]
    script = f'{join}; mount -t tmpfs tmpfs /run && exec "$@"'
    done = subprocess.run(["/usr/bin/unshare", "-m", "--propagation=private", "/bin/sh", "-c",
                           script, "sh", *nspawn], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    return _parse(done.stdout + done.stderr)


def run_hostel(hosteld: DaemonProcess, tree: Path, users: list[str]) -> dict[str, str]:
    done = hostelctl(hosteld.address, "run", "-q", "-D", str(tree), "-M", "escape", *users,
                     "/probe", CANARY_TEXT, *_disk(), timeout=120)
    return _parse(done.stdout + done.stderr)


def table(nspawn: dict[str, str], hostel: dict[str, str]) -> str:
    rows = [f"{'action':28} {'systemd-nspawn 252':22} hostel"]
    rows += [f"{name:28} {nspawn.get(name, '-'):22} {hostel.get(name, '-')}"
             for name in sorted(set(nspawn) | set(hostel))]
    return "\n".join(rows)


@pytest.mark.parametrize("users", [[], ["--private-users=pick"]], ids=["default", "pick"])
def test_hostel_blocks_everything_nspawn_blocks(
        hosteld: DaemonProcess, busybox_base: Path, probe: Path, tmp_path: Path,
        canaries: list[str], users: list[str]) -> None:
    theirs = run_nspawn(_tree_with_probe(busybox_base, tmp_path / "nspawn", probe), canaries,
                        users)
    ours = run_hostel(hosteld, _tree_with_probe(busybox_base, tmp_path / "hostel", probe), users)
    report = table(theirs, ours)
    print(f"\nescape probe ({' '.join(users) or 'default'}):\n{report}")
    assert set(ours) == set(theirs), report
    looser = [name for name in theirs
              if theirs[name].startswith("BLOCKED") and not ours[name].startswith("BLOCKED")]
    assert not looser, f"nspawn blocks, hostel allows: {looser}\n{report}"
    open_ = [name for name in MUST_BLOCK if not ours[name].startswith("BLOCKED")]
    assert not open_, f"hostel allows: {open_}\n{report}"


def test_a_shell_runs_in_the_containers_cgroup_and_device_policy(
        hosteld: DaemonProcess, busybox_base: Path, probe: Path, tmp_path: Path,
        canaries: list[str]) -> None:
    """OpenShell (hostelctl shell) joins the payload cgroup and the cgroup namespace: from
    the host its process sits in the scope, and it meets the same walls as the payload."""
    tree = _tree_with_probe(busybox_base, tmp_path / "shell", probe)
    proc = subprocess.Popen([HOSTELCTL, "run", "-q", "-D", str(tree), "-M", "shelled",
                             "sleep", "300"], env=hosteld.environment(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        _wait_running(hosteld, "shelled")
        # The real machinectl (OpenShell on org.freedesktop.machine1), in a private mount
        # namespace whose /run says systemd runs, as test_machinectl.py does.
        script = ('mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/system && '
                  'exec machinectl "$@"')
        done = subprocess.run(
            ["unshare", "-m", "--propagation=private", "sh", "-c", script, "sh", "--no-pager",
             "-q", "shell", "shelled", "/bin/sh", "-c",
             "cat /proc/self/cgroup; echo PAYLOAD; cat /sys/fs/cgroup/pids/cgroup.procs; "
             f"echo PROBE; /probe {CANARY_TEXT} {' '.join(_disk())}"],
            env=hosteld.environment(), capture_output=True, text=True, timeout=120,
            stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stderr
        lines = done.stdout.replace("\r", "").splitlines()
        namespaced = [line.split(":", 2)[2] for line in lines[:lines.index("PAYLOAD")]
                      if ":" in line]
        assert namespaced and set(namespaced) == {"/"}  # the container's own cgroup namespace
        # In the payload cgroup itself (the leader's): its procs are listed beside the leader.
        inside = lines[lines.index("PAYLOAD") + 1:lines.index("PROBE")]
        assert "1" in inside and len(inside) >= 3, inside  # sleep, the shell's stub, sh, cat
        results = _parse(done.stdout.replace("\r", ""))
        open_ = [name for name in MUST_BLOCK if not results[name].startswith("BLOCKED")]
        assert not open_, results
    finally:
        hostelctl(hosteld.address, "kill", "shelled", "--signal=KILL")
        proc.wait(timeout=30)


def _wait_running(hosteld: DaemonProcess, name: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        listing = hostelctl(hosteld.address, "list").stdout
        if any(line.split()[:1] == [name] and "running" in line for line in listing.splitlines()):
            return
        time.sleep(0.1)
    raise TimeoutError(f"machine {name} not running")


# The seccomp filters themselves, system call by system call ----------------------------

PTRACE_SEIZE, PTRACE_INTERRUPT, PTRACE_DETACH = 0x4206, 0x4207, 17
PTRACE_SECCOMP_GET_FILTER = 0x420C
AUDIT_ARCH_X86_64, AUDIT_ARCH_I386 = 0xC000003E, 0x40000003
X32_BIT = 0x40000000
SECCOMP_RET_ACTION_FULL = 0xFFFF0000
SECCOMP_RET_ALLOW = 0x7FFF0000
# Higher wins when several filters are stacked (the kernel's precedence order).
_PRECEDENCE = {0x80000000: 7, 0x00000000: 6, 0x00030000: 5, 0x00050000: 4, 0x7FC00000: 3,
               0x7FF00000: 2, 0x7FFC0000: 1, SECCOMP_RET_ALLOW: 0}


def _dump_filters(pid: int) -> list[list[tuple[int, int, int, int]]]:
    """Every seccomp filter of `pid` (newest first) as (code, jt, jf, k) tuples, read with
    PTRACE_SECCOMP_GET_FILTER while the process is held in a ptrace stop."""
    import struct

    _libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    assert _libc.ptrace(PTRACE_SEIZE, pid, None, None) == 0, os.strerror(ctypes.get_errno())
    try:
        assert _libc.ptrace(PTRACE_INTERRUPT, pid, None, None) == 0
        os.waitpid(pid, 0x40000000)  # __WALL: the stop
        filters = []
        for index in range(16):
            count = _libc.ptrace(PTRACE_SECCOMP_GET_FILTER, pid, index, None)
            if count < 0:
                break
            buf = ctypes.create_string_buffer(count * 8)
            assert _libc.ptrace(PTRACE_SECCOMP_GET_FILTER, pid, index, buf) == count
            filters.append([struct.unpack_from("<HBBI", buf, i * 8) for i in range(count)])
        return filters
    finally:
        _libc.ptrace(PTRACE_DETACH, pid, None, None)


def _run_cbpf(program: list[tuple[int, int, int, int]], data: bytes) -> int:
    """A classic BPF interpreter for what seccomp filters use (libseccomp's output)."""
    import struct

    acc = x = 0
    mem = [0] * 16
    pc = 0
    while True:
        code, jt, jf, k = program[pc]
        pc += 1
        cls, op, src = code & 0x07, code & 0xF0, code & 0x08
        if code == 0x20:                               # ld [k]
            acc = struct.unpack_from("<I", data, k)[0]
        elif code == 0x00:                             # ld #k
            acc = k
        elif code == 0x01:                             # ldx #k
            x = k
        elif code == 0x60:                             # ld M[k]
            acc = mem[k]
        elif code == 0x61:                             # ldx M[k]
            x = mem[k]
        elif code == 0x02:                             # st M[k]
            mem[k] = acc
        elif code == 0x03:                             # stx M[k]
            mem[k] = x
        elif code == 0x06:                             # ret #k
            return k
        elif code == 0x16:                             # ret a
            return acc
        elif code == 0x05:                             # ja
            pc += k
        elif cls == 0x05:                              # jeq/jgt/jge/jset, k or x
            value = x if src else k
            taken = {0x10: acc == value, 0x20: acc > value, 0x30: acc >= value,
                     0x40: bool(acc & value)}[op]
            pc += jt if taken else jf
        elif cls == 0x04 and op == 0x50:               # and
            acc &= x if src else k
        elif cls == 0x04 and op == 0x40:               # or
            acc |= x if src else k
        elif code == 0x07:                             # tax
            x = acc
        elif code == 0x87:                             # txa
            acc = x
        else:
            raise AssertionError(f"cBPF opcode {code:#x} not interpreted")


def _action(filters: list[list[tuple[int, int, int, int]]], arch: int, nr: int) -> int:
    import struct

    data = struct.pack("<iIQ6Q", nr, arch, 0, 0, 0, 0, 0, 0, 0)
    results = [_run_cbpf(f, data) for f in filters]
    return max(results, key=lambda r: _PRECEDENCE.get(r & SECCOMP_RET_ACTION_FULL, 8))


def _payload_pid(marker: str) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                if argv[:2] == [b"sleep", marker.encode()] or argv[:2] == [b"/bin/sleep", marker.encode()]:
                    return int(entry)
        time.sleep(0.05)
    raise TimeoutError(f"no process 'sleep {marker}'")


def test_hostels_seccomp_filter_refuses_every_call_nspawns_refuses(
        hosteld: DaemonProcess, busybox_base: Path, tmp_path: Path) -> None:
    """Both payloads' filters, read from the kernel, evaluated for every system call number
    of the x86-64, i386 and x32 ABIs: nowhere does nspawn refuse and hostel allow."""
    if os.uname().machine != "x86_64":
        pytest.skip("the ABIs enumerated here are x86's")
    tree, our_tree = tmp_path / "tree", tmp_path / "our-tree"  # one each: trees are locked
    for copy in (tree, our_tree):
        subprocess.run(["cp", "-a", str(busybox_base), str(copy)], check=True)
    nspawn = subprocess.Popen(
        ["/usr/bin/unshare", "-m", "--propagation=private", "/bin/sh", "-c",
         'mount -t tmpfs tmpfs /run && exec "$@"', "sh", "/usr/bin/systemd-nspawn",
         "--register=no", "--keep-unit", "-q", "--pipe", "-D", str(tree), "-M", "filters",
         "/bin/sleep", "271.1"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    ours = subprocess.Popen([HOSTELCTL, "run", "-q", "-D", str(our_tree), "-M", "filters",
                             "/bin/sleep", "314.1"], env=hosteld.environment(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        theirs_filters = _dump_filters(_payload_pid("271.1"))
        our_filters = _dump_filters(_payload_pid("314.1"))
    finally:
        nspawn.kill()
        hostelctl(hosteld.address, "kill", "filters", "--signal=KILL")
        ours.wait(timeout=30)
        nspawn.wait(timeout=30)
    assert theirs_filters and our_filters
    looser, refused = [], 0
    for arch, base in ((AUDIT_ARCH_X86_64, 0), (AUDIT_ARCH_I386, 0), (AUDIT_ARCH_X86_64, X32_BIT)):
        for nr in range(base, base + 1024):
            theirs = _action(theirs_filters, arch, nr)
            if theirs & SECCOMP_RET_ACTION_FULL == SECCOMP_RET_ALLOW:
                continue
            refused += 1
            if _action(our_filters, arch, nr) & SECCOMP_RET_ACTION_FULL == SECCOMP_RET_ALLOW:
                looser.append((hex(arch), nr))
    assert refused > 1000  # nspawn's filter is an allow-list: most numbers are refused
    assert not looser, f"nspawn refuses, hostel allows: {looser}"
