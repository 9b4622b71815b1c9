"""The same probe in systemd-nspawn 252 and in `hostelctl run`, on the same tree, over many
option sets.

A container must look from the inside the way an nspawn container does. For each option
set below both run tests/integration/nspawn_probe.sh on a pty (nspawn's interactive
console), and the probe reports identity, environment, capabilities, mounts with their
flags, /dev, network, cgroups, rlimits, what blocked operations do and what
systemd-detect-virt decides. The two outputs must be identical line for line, apart from
the lines INTENDED_DIFFERENCES names, each with its reason; any other difference fails.
OPEN_DIVERGENCES lists, separately, the differences that are hostel bugs not fixed yet:
they are not intended, and each entry says what 252 does, so that the entry can go when
the bug is fixed (the test then still passes; a new difference fails it)."""
from __future__ import annotations

import difflib
import errno
import os
import re
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest

from hostel.privatebus import DaemonProcess, PrivateBus

from conftest import HOSTELCTL, REPO, read_pty, terminate_all_machines

PROBE_SOURCE = Path(__file__).with_name("nspawn_probe.sh")
PROBE = "/usr/bin/hostel-probe"
END = "@@ END"
NAME = "nspcmp"  # machine names are global (cgroup scopes): this file's own
BIND_SOURCE = "/var/tmp/hostel-nspcmp-bind"  # --bind source (not in /run: nspawn gets its own)
UUID = "0123456789abcdef0123456789abcdef"


@dataclass(frozen=True)
class Difference:
    """Lines of one probe section that differ on purpose (or by a known bug): the lines
    matching `hostel` are dropped from hostel's output, those matching `nspawn` from
    nspawn's, before the two are compared; only in the sets whose options `applies` to."""

    section: str
    hostel: str | None
    nspawn: str | None
    reason: str
    applies: Callable[[tuple[str, ...]], bool] = lambda args: True


def _private_net(args: tuple[str, ...]) -> bool:
    return any(a in ("--private-network", "--network-veth") for a in args)


# What hostel does differently from systemd-nspawn 252 on purpose.
INTENDED_DIFFERENCES = {
    "container=": Difference(
        "ENVIRONMENT", r"container=hostel", r"container=systemd-nspawn",
        "$container names the container manager (systemd's container interface); hostel is "
        "not systemd-nspawn, and says so as the seed's v219 says systemd-nspawn."),
    "systemd-detect-virt": Difference(
        "DETECT", r"systemd-detect-virt=container-other", r"systemd-detect-virt=systemd-nspawn",
        "follows from container=hostel: systemd-detect-virt maps unknown $container values "
        "to container-other, so a systemd inside treats the tree as a container "
        "(ConditionVirtualization=container holds) but not as an nspawn one."),
    "/run/host": Difference(
        "*", r"run/host/container-manager=cat: .*No such file or directory|"
             r"NOTIFY_SOCKET=/run/host/notify",
        r"(/run/host(/\S*)? .*)|run/host/container-manager=systemd-nspawn|"
        r"NOTIFY_SOCKET=/run/host/notify",
        "v246's host interface (/run/host with os-release, incoming/, container-manager, the "
        "notify socket): the seed (v219) has none and hostel follows the seed; readiness comes "
        "from the machine's state, not from sd_notify."),
    "container_host_*": Difference(
        "ENVIRONMENT", None, r"container_host_\w+=.*",
        "v249's host os-release fields in the environment: part of the same host interface."),
    "/etc/machine-id": Difference(
        "*", r"/etc/machine-id .*|machine-id=<32 hex digits>", r"machine-id=",
        "the tree's empty /etc/machine-id gets the machine's id bound over it read-only, as "
        "systemd does on boot, so a payload that is not systemd sees the id machined reports; "
        "252 leaves the file empty."),
    "/dev/console": Difference(
        "*", r"/dev/console .*|tty=/dev/console|  -> /dev/console",
        r"/dev/console symbolic link .*|  -> pts/0|tty=/dev/pts/\d+",
        "the seed's console: the host pty is bound over /dev/console and is the payload's "
        "tty; 252 opens a pty on the container's own devpts and links /dev/console to it."),
    "boot_id": Difference(
        "MOUNTS", r"/proc/sys/kernel/random/boot_id .*", r"/proc/sys/kernel/random/boot_id .*",
        "the seed's setup_boot_id binds a fresh id read-only; 252 stacks a read-only and a "
        "writable bind: the id is fresh in both, only the stack differs."),
    "--ephemeral overlay": Difference(
        "MOUNTS", r"/ rw,relatime overlay rw", r"/ rw,relatime ext4 rw",
        "an ephemeral run of a plain directory is an overlay (the tree as its lower layer, "
        "the upper one removed at exit) where 252 copies the whole tree first: the start "
        "does not grow with the tree; the tree is left unchanged either way.",
        lambda args: "--ephemeral" in args),
}

# hostel bugs found by this comparison, not fixed yet: each entry says what 252 does, and
# goes when the bug is fixed.
OPEN_DIVERGENCES: dict[str, Difference] = {}


@dataclass(frozen=True)
class OptionSet:
    """One comparison: the same options to both; `tree` says which tree they run on:
    'shared' (the module's), 'fresh' (a copy of its own: -U chowns it), 'boot' (a copy
    whose /sbin/init is the probe, for -b) or 'merged' (a merged-/usr copy)."""

    id: str
    args: tuple[str, ...]
    tree: str = "shared"
    private_net: bool = False  # without, the probe's NETWORK is the host's, which changes


def _set(id: str, *args: str, tree: str = "shared", net: bool = False) -> OptionSet:
    return OptionSet(id, args, tree, net)


OPTION_SETS = [
    _set("plain"),
    _set("private-network", "--private-network", net=True),
    _set("network-veth", "--network-veth", net=True),
    _set("veth-read-only", "--network-veth", "--read-only", net=True),
    _set("read-only", "--read-only"),
    _set("read-only-private-network", "--read-only", "--private-network", net=True),
    _set("volatile-yes", "--volatile=yes", "--timezone=off", tree="merged"),
    _set("volatile-yes-timezone-auto", "--volatile=yes", tree="merged"),
    _set("volatile-state", "--volatile=state", tree="merged"),
    _set("volatile-overlay", "--volatile=overlay", tree="merged"),
    _set("volatile-yes-private-network", "--volatile=yes", "--timezone=off",
         "--private-network", tree="merged", net=True),
    _set("tmpfs", "--tmpfs=/mnt"),
    _set("tmpfs-options", "--tmpfs=/mnt:mode=0700,size=1m"),
    _set("tmpfs-over-tmp", "--tmpfs=/tmp"),
    _set("bind", "--bind={bind}:/mnt"),
    _set("bind-ro", "--bind-ro={bind}:/mnt"),
    _set("bind-same-path", "--bind={bind}"),
    _set("bind-and-tmpfs-read-only", "--bind-ro={bind}:/home", "--tmpfs=/mnt",
         "--read-only"),
    _set("bind-ro-private-network", "--bind-ro={bind}:/mnt", "--private-network",
         net=True),
    _set("read-only-tmpfs-var", "--read-only", "--tmpfs=/var"),
    _set("capability-net-admin", "--capability=CAP_NET_ADMIN", "--private-network", net=True),
    _set("capability-all", "--capability=all", "--private-network", net=True),
    _set("drop-chown", "--drop-capability=CAP_CHOWN"),
    _set("drop-all", "--drop-capability=all"),
    _set("drop-mknod-keep-sys-admin", "--drop-capability=CAP_MKNOD,CAP_SYS_CHROOT"),
    _set("setenv", "--setenv=FOO=bar", "--setenv=HOME=/srv", "--setenv=EMPTY="),
    _set("user-root", "--user=root"),
    _set("user-0", "--user=0"),
    _set("setenv-chdir-hostname", "--setenv=PS1=x", "--chdir=/root", "--hostname=h2"),
    _set("chdir-tmp", "--chdir=/tmp"),
    _set("chdir-home", "--chdir=/home/user"),
    _set("ephemeral", "--ephemeral"),
    _set("ephemeral-private-network", "--ephemeral", "--private-network", net=True),
    _set("hostname", "--hostname=other-name"),
    _set("machine", "--machine=nspcmp2"),
    _set("uuid", f"--uuid={UUID}"),
    _set("no-new-privileges", "--no-new-privileges=yes"),
    _set("rlimit-nofile", "--rlimit=NOFILE=4096:8192"),
    _set("rlimits", "--rlimit=CORE=infinity", "--rlimit=NPROC=500", "--rlimit=STACK=1M",
         "--rlimit=NICE=+5"),
    _set("rlimit-soft-below-hard", "--rlimit=MEMLOCK=64K:128K"),
    _set("oom-score-adjust", "--oom-score-adjust=100"),
    _set("cpu-affinity", "--cpu-affinity=0"),
    _set("personality-x86", "--personality=x86"),
    _set("as-pid2", "--as-pid2"),
    _set("as-pid2-private-network", "--as-pid2", "--private-network", net=True),
    _set("drop-all-private-network", "--drop-capability=all", "--private-network", net=True),
    _set("kill-signal", "--kill-signal=SIGINT"),
    _set("link-journal-no", "--link-journal=no"),
    _set("link-journal-auto", "--link-journal=auto"),
    _set("timezone-off", "--timezone=off"),
    _set("resolv-conf-off", "--resolv-conf=off"),
    _set("boot", "-b", tree="boot"),
    _set("boot-kill-signal", "-b", "--kill-signal=SIGTERM", tree="boot"),
    _set("boot-private-network", "-b", "--private-network", tree="boot", net=True),
    _set("boot-read-only", "-b", "--read-only", tree="boot"),
    _set("boot-veth-volatile-state", "-b", "--network-veth", "--volatile=state", tree="boot",
         net=True),
    _set("network-zone", "--network-zone=nspcmp", net=True),
    _set("veth-port", "--network-veth", "--port=tcp:18080:80", "-p", "udp:18053:53", net=True),
    _set("private-users-pick", "--private-users=pick", tree="fresh"),
    _set("private-users-pick-private-network", "--private-users=pick", "--private-network",
         tree="fresh", net=True),
    _set("private-users-base-private-network", "--private-users=1879048192:65536",
         "--private-network", tree="fresh", net=True),
]


def _merge_usr(tree: Path) -> None:
    """Turn the busybox tree into a merged-/usr one (/bin, /sbin links into /usr), as every
    current distribution is: --volatile=yes keeps only the tree's /usr."""
    (tree / "bin/busybox").rename(tree / "usr/bin/busybox")
    for top in ("bin", "sbin", "usr/bin", "usr/sbin"):
        for entry in (tree / top).iterdir():
            if entry.is_symlink() and os.readlink(entry) == "/bin/busybox":
                entry.unlink()
                (tree / "usr" / top.removeprefix("usr/") / entry.name).symlink_to(
                    "/usr/bin/busybox")
    for top in ("bin", "sbin"):
        os.rmdir(tree / top)
        (tree / top).symlink_to(f"usr/{top}")


def _copy_detect_virt(tree: Path) -> None:
    """systemd-detect-virt and its libraries into the tree's /usr, run by the probe through
    the loader (the busybox tree has no /lib64): it decides as a systemd inside would."""
    libs = subprocess.run(["ldd", "/usr/bin/systemd-detect-virt"], capture_output=True,
                          text=True, check=True).stdout
    for line in libs.splitlines():
        parts = line.split()
        if "=>" in parts and parts[2].startswith("/"):
            where = "systemd" if "/systemd/" in parts[2] else ""
            target = tree / "usr/lib/x86_64-linux-gnu" / where / os.path.basename(parts[2])
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(os.path.realpath(parts[2]), target)
    (tree / "usr/lib64").mkdir(exist_ok=True)
    shutil.copy(os.path.realpath("/lib64/ld-linux-x86-64.so.2"),
                tree / "usr/lib64/ld-linux-x86-64.so.2")
    shutil.copy("/usr/bin/systemd-detect-virt", tree / "usr/bin/systemd-detect-virt")


@pytest.fixture(scope="module")
def probe_trees() -> Iterator[dict[str, Path]]:
    work = Path(tempfile.mkdtemp(prefix="hostel-nspcmp-"))
    base = work / "nspcmp-tree"
    try:
        subprocess.run([str(REPO / "scripts/make-busybox-tree"), str(base)], check=True,
                       capture_output=True)
        _copy_detect_virt(base)
        shutil.copy(PROBE_SOURCE, base / PROBE.lstrip("/"))
        (base / PROBE.lstrip("/")).chmod(0o755)
        boot = work / "nspcmp-boot"
        subprocess.run(["cp", "-a", str(base), str(boot)], check=True)
        (boot / "sbin/init").unlink()
        (boot / "sbin/init").write_text(f"#!/bin/sh\nexec {PROBE}\n")
        (boot / "sbin/init").chmod(0o755)
        merged = work / "nspcmp-merged"
        subprocess.run(["cp", "-a", str(base), str(merged)], check=True)
        _merge_usr(merged)
        yield {"shared": base, "boot": boot, "merged": merged}
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    """One hosteld for every set (a daemon per set would double the file's run time)."""
    work = Path(tempfile.mkdtemp(prefix="hostel-nspcmp-d-"))
    runtime = Path(tempfile.mkdtemp(prefix="hostel-run-"))
    runtime.chmod(0o755)  # --private-users children must reach it, as /run/hostel
    bus = PrivateBus(work / "bus").start()
    process = DaemonProcess(bus.address, runtime, work / "state", bus=bus)
    process.log_path = work / "hosteld.log"
    try:
        process.start()
        yield process
    finally:
        terminate_all_machines(process)
        status = process.stop()
        log = process.log()
        bus.stop()
        shutil.rmtree(runtime, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    assert status == 0, f"hosteld exited with {status} on SIGTERM:\n{log}"


@pytest.fixture(scope="module")
def bind_source() -> Iterator[str]:
    os.makedirs(BIND_SOURCE, exist_ok=True)
    Path(BIND_SOURCE, "file").write_text("bound\n")
    try:
        yield BIND_SOURCE
    finally:
        shutil.rmtree(BIND_SOURCE, ignore_errors=True)


def run_on_pty(argv: list[str], env: dict[str, str], timeout: float = 120) -> str:
    """The command's output on a pty of its own, up to the probe's end marker."""
    output = read_pty(argv, env, timeout, until=END.encode())
    return output.decode(errors="replace").replace("\r\n", "\n")


def sections(output: str, private_net: bool, picked: bool) -> dict[str, list[str]]:
    """The probe's sections; mount lines sorted (the two stack the same mounts in a
    different order), the host's network left out where the container shares it."""
    found: dict[str, list[str]] = {}
    current = None
    for line in output.splitlines():
        if line.startswith("@@ "):
            current = line[3:].split()[0]
            found[current] = []
        elif current is not None:
            found[current].append(line.rstrip())
    assert "END" in found, f"the probe did not finish:\n{output}"
    found["MOUNTS"].sort()
    if picked:  # a range of its own in each run (0 BASE 65536): host ids in it as BASE+N
        base = next(int(m.group(1)) for line in found["ID"]
                    if (m := re.fullmatch(r"uid_map=0 (\d+) 65536", line)))

        def relative(m: re.Match[str]) -> str:
            n = int(m.group(0))
            return f"<picked+{n - base}>" if base <= n < base + 65536 else m.group(0)

        found = {name: [re.sub(r"\b\d{6,}\b", relative, line) for line in lines]
                 for name, lines in found.items()}
    if not private_net:
        del found["NETWORK"]
    return found


def without(found: dict[str, list[str]], side: str,
            args: tuple[str, ...]) -> dict[str, list[str]]:
    """The sections less the lines INTENDED_DIFFERENCES and OPEN_DIVERGENCES name."""
    differences = [d for d in [*INTENDED_DIFFERENCES.values(), *OPEN_DIVERGENCES.values()]
                   if d.applies(args)]
    kept = {}
    for section, lines in found.items():
        patterns = [getattr(d, side) for d in differences
                    if d.section in ("*", section) and getattr(d, side)]
        kept[section] = [line for line in lines
                         if not any(re.fullmatch(p, line) for p in patterns)]
    return kept


def hostel_probe(daemon: DaemonProcess, tree: Path, args: tuple[str, ...]) -> str:
    return run_on_pty([HOSTELCTL, "run", "-q", "-D", str(tree), *_named(args), PROBE],
                      daemon.environment())


def nspawn_probe(daemon: DaemonProcess, tree: Path, args: tuple[str, ...]) -> str:
    # nspawn keeps state under /run/systemd: give it a private /run, not the host's.
    argv = ["/usr/bin/systemd-nspawn", "--register=no", "--keep-unit", "-q", "-D", str(tree),
            *_named(args), PROBE]
    with nspawn_device_policy() as procs:
        return run_on_pty(["/usr/bin/unshare", "-m", "--propagation=private", "/bin/sh", "-c",
                           # /run/systemd: where 252 takes its network zone lock
                           'echo $$ > "$0" && mount -t tmpfs tmpfs /run && mkdir /run/systemd '
                           '&& exec "$@"', procs,
                           *argv], daemon.environment())


DEVICES_V1 = Path("/sys/fs/cgroup/devices")
# systemd 252's DevicePolicy=closed (its static list: bpf_devices_allow_list_static) and the
# DeviceAllow= nspawn 252 adds to the scope it registers (nspawn-register.c); ptys are
# "char-pts", every minor of the pts major.
NSPAWN_DEVICE_ALLOW = (("/dev/null", "rwm"), ("/dev/zero", "rwm"), ("/dev/full", "rwm"),
                       ("/dev/random", "rwm"), ("/dev/urandom", "rwm"), ("/dev/tty", "rwm"),
                       ("/dev/ptmx", "rwm"), ("/dev/net/tun", "rwm"))


def _pts_majors() -> list[int]:
    text = Path("/proc/devices").read_text().split("Block devices:")[0]
    return [int(line.split()[0]) for line in text.splitlines()[1:] if line.split()[1:] == ["pts"]]


@contextmanager
def nspawn_device_policy() -> Iterator[str]:
    """A v1 devices cgroup holding 252's device policy, for the nspawn run to join.

    nspawn 252 gets its device policy from systemd: the scope it registers has
    DevicePolicy=closed. Here no systemd runs (and the run is --register=no), so
    without this nspawn's container could create and open any device node, and the
    comparison would hold hostel's policy (the same one) against none. Yields the
    cgroup.procs file to write the run's pid to; /dev/null when the host has no v1
    devices hierarchy (then the comparison's nspawn has no device policy)."""
    if not (DEVICES_V1 / "devices.allow").exists():
        yield "/dev/null"
        return
    group = Path(tempfile.mkdtemp(prefix="hostel-nspcmp-", dir=DEVICES_V1))
    try:
        (group / "devices.deny").write_text("a\n")
        for node, access in NSPAWN_DEVICE_ALLOW:
            if os.path.exists(node):
                rdev = os.stat(node).st_rdev
                (group / "devices.allow").write_text(
                    f"c {os.major(rdev)}:{os.minor(rdev)} {access}\n")
        for major in _pts_majors():
            (group / "devices.allow").write_text(f"c {major}:* rw\n")
        yield str(group / "cgroup.procs")
    finally:
        for _ in range(50):  # the run's last processes may still be leaving it
            try:
                group.rmdir()
                break
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise
                time.sleep(0.1)


def _named(args: tuple[str, ...]) -> list[str]:
    named = any(a.startswith("--machine") for a in args)
    return [*([] if named else ["-M", NAME]), *args]


def _tree(kind: str, trees: dict[str, Path], tmp_path: Path) -> Path:
    if kind != "fresh":
        return trees[kind]
    copy = tmp_path / "nspcmp-fresh"
    subprocess.run(["cp", "-a", str(trees["shared"]), str(copy)], check=True)
    return copy


def test_intended_differences_are_documented() -> None:
    assert len(INTENDED_DIFFERENCES) <= 8
    for difference in [*INTENDED_DIFFERENCES.values(), *OPEN_DIVERGENCES.values()]:
        assert len(difference.reason) > 40 and (difference.hostel or difference.nspawn)
    assert len(OPTION_SETS) >= 40 and len({s.id for s in OPTION_SETS}) == len(OPTION_SETS)


def compare(option_set: OptionSet, daemon: DaemonProcess, trees: dict[str, Path],
            bind_source: str, tmp_path: Path) -> dict[str, str]:
    """Run the probe under both with the set's options: {section: diff} of what differs
    beyond the documented differences."""
    args = tuple(a.replace("{bind}", bind_source) for a in option_set.args)
    picked = "--private-users=pick" in args
    tree = _tree(option_set.tree, trees, tmp_path)
    ours = sections(hostel_probe(daemon, tree, args), option_set.private_net, picked)
    if option_set.tree == "fresh":  # -U leaves the tree owned by its range: start afresh
        shutil.rmtree(tree)
        tree = _tree("fresh", trees, tmp_path)
    theirs = sections(nspawn_probe(daemon, tree, args), option_set.private_net, picked)
    # The probe's own check: systemd-detect-virt ran in both (an error in both would match).
    assert "systemd-detect-virt=systemd-nspawn" in theirs["DETECT"], theirs["DETECT"]
    assert "systemd-detect-virt=container-other" in ours["DETECT"], ours["DETECT"]
    ours, theirs = without(ours, "hostel", args), without(theirs, "nspawn", args)
    return {section: "\n".join(difflib.unified_diff(ours.get(section, []),
                                                    theirs.get(section, []), n=1,
                                                    lineterm=""))
            for section in ours.keys() | theirs.keys()
            if ours.get(section) != theirs.get(section)}


needs_nspawn = pytest.mark.skipif(not shutil.which("systemd-nspawn"),
                                  reason="systemd-nspawn not installed")


@needs_nspawn
@pytest.mark.parametrize("option_set", OPTION_SETS, ids=[s.id for s in OPTION_SETS])
def test_probe_matches_nspawn(option_set: OptionSet, daemon: DaemonProcess,
                              probe_trees: dict[str, Path], bind_source: str,
                              tmp_path: Path) -> None:
    differing = compare(option_set, daemon, probe_trees, bind_source, tmp_path)
    assert not differing, f"{option_set.args} (- hostel, + nspawn):\n" + "\n".join(
        f"section {section}:\n{diff}" for section, diff in sorted(differing.items()))

