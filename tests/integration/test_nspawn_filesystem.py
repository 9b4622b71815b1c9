"""The container's file system, console and moved interfaces, side by side with systemd-nspawn 252.

Each test runs the same command on the same tree under systemd-nspawn and
under `hostelctl run` and compares what the payload sees: the volatile
roots' base file system, /tmp, the flags of the read-only /proc binds, the
console a booted init gets, and where a --network-interface link is after
the container exits. nspawn runs with a private /run (its state stays out
of the host's) and --register=no --keep-unit (no machined needed)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from hostel.privatebus import DaemonProcess, PrivateBus

from conftest import HOSTELCTL

pytestmark = pytest.mark.skipif(not shutil.which("systemd-nspawn"),
                                reason="systemd-nspawn not installed")

NSPAWN = "/usr/bin/systemd-nspawn"
APPLETS = ("sh", "ls", "cat", "grep", "awk", "cut", "touch", "echo", "test", "readlink",
           "sleep", "tty", "stat", "mkdir", "init")
TIMEOUT = 60


def merged_usr_tree(root: Path) -> Path:
    """A current distribution's layout: everything in /usr, /bin /sbin /lib linking into it,
    a dynamic loader found through /lib64 (usr/lib64 holds it; usr/lib/x86_64-linux-gnu
    exists without it, so only the second of 252's candidates qualifies)."""
    for sub in ("usr/bin", "usr/sbin", "usr/lib/x86_64-linux-gnu", "usr/lib64", "etc"):
        (root / sub).mkdir(parents=True)
    shutil.copy("/bin/busybox", root / "usr/bin/busybox")
    for applet in APPLETS:
        (root / "usr/bin" / applet).symlink_to("busybox")
    (root / "usr/lib64/ld-linux-x86-64.so.2").write_bytes(b"")
    for name, target in (("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib")):
        (root / name).symlink_to(target)
    (root / "usr/lib/os-release").write_text("ID=nf-merged\nNAME=merged\n")
    script = root / "usr/bin/hello"
    script.write_text("#!/bin/sh\necho hello from a script\n")
    script.chmod(0o755)
    return root


def run_nspawn(tree: Path, name: str, *args: str, stdin: int | None = subprocess.DEVNULL,
               timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    command = [NSPAWN, "--register=no", "--keep-unit", "-q", "-D", str(tree), "-M", name, *args]
    return subprocess.run(["/usr/bin/unshare", "-m", "--propagation=private", "/bin/sh", "-c",
                           'mount -t tmpfs tmpfs /run && exec "$@"', "sh", *command],
                          stdin=stdin, capture_output=True, text=True, timeout=timeout)


def run_hostel(daemon: DaemonProcess, tree: Path, name: str, *args: str,
               stdin: int | None = subprocess.DEVNULL,
               timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HOSTELCTL, "run", "-q", "-D", str(tree), "-M", name, *args],
                          env=daemon.environment(), stdin=stdin, capture_output=True, text=True,
                          timeout=timeout)


def both(daemon: DaemonProcess, tree: Path, name: str, *args: str) -> tuple[str, str]:
    """The payload's output under hostel and under nspawn; each must succeed."""
    ours = run_hostel(daemon, tree, name, *args)
    assert ours.returncode == 0, f"hostel: {ours.returncode}: {ours.stdout}{ours.stderr}"
    theirs = run_nspawn(tree, name, *args)
    assert theirs.returncode == 0, f"nspawn: {theirs.returncode}: {theirs.stdout}{theirs.stderr}"
    return ours.stdout.replace("\r\n", "\n"), theirs.stdout.replace("\r\n", "\n")


def listing(output: str) -> dict[str, str]:
    """`ls -la /` as {name: "mode -> target"}: what a payload finds at the top."""
    entries = {}
    for line in output.splitlines():
        fields = line.split()
        if len(fields) < 9 or fields[0] == "total":
            continue
        name = fields[8]
        if name in (".", ".."):
            continue
        target = fields[10] if len(fields) > 10 and fields[9] == "->" else ""
        entries[name] = f"{fields[0]} {target}".strip()
    return entries


def mountinfo(output: str) -> dict[str, tuple[str, str, str]]:
    """{mount point: (mount options, fstype, size/nr_inodes/mode)}, the last mount at a point
    being the one in effect."""
    mounts = {}
    for line in output.splitlines():
        if " - " not in line:
            continue
        before, after = line.split(" - ", 1)
        fields, rest = before.split(), after.split()
        if len(fields) < 6 or len(rest) < 3:
            continue
        limits = ",".join(o for o in rest[2].split(",") if o.split("=")[0] in
                          ("size", "nr_inodes", "mode"))
        mounts[fields[4]] = (fields[5], rest[0], limits)
    return mounts


# 1. --volatile= ---------------------------------------------------------------------------

def test_volatile_yes_on_a_merged_usr_tree_has_nspawns_base_filesystem(
        hosteld: DaemonProcess, tmp_path: Path) -> None:
    tree = merged_usr_tree(tmp_path / "merged")
    ours, theirs = both(hosteld, tree, "nf-volyes", "--volatile=yes", "/bin/sh", "-c",
                        "hello; ls -la /; echo MOUNTS; cat /proc/self/mountinfo")
    assert ours.startswith("hello from a script\n")  # #!/bin/sh resolves through /bin
    assert theirs.startswith("hello from a script\n")
    our_top = listing(ours.split("MOUNTS")[0])
    their_top = listing(theirs.split("MOUNTS")[0])
    assert their_top["lib64"] == "lrwxrwxrwx usr/lib64"
    assert their_top["root"].startswith("drwxr-x---") and their_top["tmp"] == "drwxrwxrwt"
    assert our_top == their_top
    our_mounts, their_mounts = (mountinfo(o.split("MOUNTS")[1]) for o in (ours, theirs))
    for point in ("/", "/usr", "/tmp"):
        assert our_mounts[point][1:] == their_mounts[point][1:], point
        assert our_mounts[point][0].split(",")[0] == their_mounts[point][0].split(",")[0], point
    assert not (tree / "root").exists() and not (tree / "var").exists()  # the tree is untouched


def test_volatile_overlay_writes_to_a_tmpfs_over_the_whole_tree(
        hosteld: DaemonProcess, tmp_path: Path, tree: Path) -> None:
    script = ("echo changed > /etc/os-release; mkdir -p /srv/new && echo x > /srv/new/file;"
              " cat /etc/os-release /srv/new/file; grep ' / / ' /proc/self/mountinfo |"
              " sed 's/.* - //' | cut -d' ' -f1")
    before = (tree / "etc/os-release").read_bytes()
    ours, theirs = both(hosteld, tree, "nf-volov", "--volatile=overlay", "/bin/sh", "-c", script)
    assert ours == theirs == "changed\nx\noverlay\n"
    assert (tree / "etc/os-release").read_bytes() == before
    assert not (tree / "srv/new").exists()
    ours, theirs = both(hosteld, tree, "nf-volov", "--volatile=overlay", "/bin/ls", "-la", "/")
    assert listing(ours) == listing(theirs)


def test_volatile_state_keeps_the_tree_read_only_and_var_writable(
        hosteld: DaemonProcess, tree: Path) -> None:
    script = ("touch /var/ok && echo var-writable; touch /usr/no 2>/dev/null || echo usr-ro;"
              " touch /tmp/ok && echo tmp-writable")
    ours, theirs = both(hosteld, tree, "nf-volst", "--volatile=state", "/bin/sh", "-c", script)
    assert ours == theirs == "var-writable\nusr-ro\ntmp-writable\n"
    assert not (tree / "var/ok").exists()


def test_volatile_overlay_is_accepted_and_bad_modes_are_named(hosteld: DaemonProcess,
                                                              tree: Path) -> None:
    bad = run_hostel(hosteld, tree, "nf-volbad", "--volatile=sometimes", "/bin/true")
    assert bad.returncode != 0
    assert "--volatile= argument: sometimes (expected yes, no, state or overlay)" in bad.stderr
    assert "Traceback" not in bad.stderr



@pytest.mark.parametrize("mode", ["yes", "overlay"])
def test_volatile_roots_in_a_user_namespace(hosteld: DaemonProcess, tmp_path: Path,
                                            mode: str) -> None:
    """The container's root is an unprivileged host uid: the volatile tmpfs must still be
    put together (its staging point is made by hosteld, not by the child)."""
    tree = merged_usr_tree(tmp_path / "merged")
    # --link-journal=no: journal.py prepares /var/log/journal in the tree itself
    result = run_hostel(hosteld, tree, f"nf-volu{mode[0]}", f"--volatile={mode}",
                        "--private-users=pick", "--link-journal=no", "/bin/sh", "-c",
                        "hello; readlink /bin; mkdir /var/new && echo var-ok")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello from a script\nusr/bin\nvar-ok\n"
    assert not (tree / "var").exists()



def minimal_usr_tree(root: Path) -> Path:
    """Only /usr: what is left of a merged-/usr tree by a careless copy."""
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/lib").mkdir()
    shutil.copy("/bin/busybox", root / "usr/bin/busybox")
    for applet in APPLETS:
        (root / "usr/bin" / applet).symlink_to("busybox")
    (root / "usr/lib/os-release").write_text("ID=nf-minimal\n")
    return root


def host_view(tree: Path) -> dict[str, str]:
    """The tree's top level as the host sees it: {name: "mode [-> target]"}."""
    return {p.name: f"{oct(p.lstat().st_mode)}" + (f" -> {os.readlink(p)}" if p.is_symlink()
                                                   else "") for p in tree.iterdir()}


def test_plain_tree_is_completed_as_nspawn_completes_it(hosteld: DaemonProcess,
                                                        tmp_path: Path) -> None:
    ours_tree = minimal_usr_tree(tmp_path / "ours")
    theirs_tree = minimal_usr_tree(tmp_path / "theirs")
    ours = run_hostel(hosteld, ours_tree, "nf-basefs", "/usr/bin/ls", "-la", "/")
    theirs = run_nspawn(theirs_tree, "nf-basefs", "/usr/bin/ls", "-la", "/")
    assert ours.returncode == 0 and theirs.returncode == 0, ours.stderr + theirs.stderr
    assert listing(ours.stdout) == listing(theirs.stdout)
    assert host_view(ours_tree) == host_view(theirs_tree)
    assert host_view(ours_tree)["bin"].endswith("-> usr/bin")


# 2. /tmp -------------------------------------------------------------------------------------

TMP_PROBE = "touch /tmp/probe && echo tmp-writable; grep ' /tmp ' /proc/self/mountinfo"


def test_tmp_is_a_tmpfs_so_read_only_containers_can_write_it(hosteld: DaemonProcess,
                                                             tree: Path) -> None:
    ours, theirs = both(hosteld, tree, "nf-tmpro", "--read-only", "/bin/sh", "-c", TMP_PROBE)
    assert ours.splitlines()[0] == theirs.splitlines()[0] == "tmp-writable"
    assert mountinfo(ours)["/tmp"] == mountinfo(theirs)["/tmp"]
    assert mountinfo(ours)["/tmp"][1] == "tmpfs"
    assert not (tree / "tmp/probe").exists()


def test_a_bind_on_tmp_wins_over_the_tmpfs(hosteld: DaemonProcess, tree: Path,
                                           tmp_path: Path) -> None:
    host_tmp = tmp_path / "hosttmp"
    host_tmp.mkdir()
    (host_tmp / "from-host").write_text("seen\n")
    script = "cat /tmp/from-host; echo written > /tmp/from-container"
    ours, theirs = both(hosteld, tree, "nf-tmpbind", f"--bind={host_tmp}:/tmp",
                        "/bin/sh", "-c", script)
    assert ours == theirs == "seen\n"
    assert (host_tmp / "from-container").read_text() == "written\n"


# 3. read-only /proc binds --------------------------------------------------------------------

def test_read_only_proc_binds_are_nosuid_nodev_noexec(hosteld: DaemonProcess, tree: Path) -> None:
    ours, theirs = both(hosteld, tree, "nf-procro", "/bin/cat", "/proc/self/mountinfo")
    our_mounts, their_mounts = mountinfo(ours), mountinfo(theirs)
    compared = [p for p in ("/proc/sys", "/proc/acpi", "/proc/bus", "/proc/fs", "/proc/irq",
                            "/proc/apm", "/proc/asound", "/proc/scsi") if p in their_mounts]
    assert "/proc/sys" in compared and len(compared) >= 2
    for point in compared:
        assert our_mounts[point][0] == their_mounts[point][0], point
        assert set(our_mounts[point][0].split(",")) >= {"ro", "nosuid", "nodev", "noexec"}, point
    # nspawn 252 hides /proc/sysrq-trigger behind an inaccessible file from the host's /run;
    # hostel binds it read-only, with the same flags as the others (where the kernel has it).
    if os.path.exists("/proc/sysrq-trigger"):
        assert set(our_mounts["/proc/sysrq-trigger"][0].split(",")) >= {
            "ro", "nosuid", "nodev", "noexec"}



# 4. the console of a booted init off a terminal ------------------------------------------------

INIT_PROBE = """#!/bin/sh
echo "PID=$$"
[ -e /dev/console ] && echo console-exists || echo no-console
[ -t 0 ] && echo stdin-tty || echo stdin-not-tty
[ -t 1 ] && echo stdout-tty || echo stdout-not-tty
read -t 2 line && echo "GOT=$line" || echo no-input
echo DONE
"""


def with_probe_init(tree: Path) -> Path:
    init = tree / "sbin/init"
    init.unlink()
    init.write_text(INIT_PROBE)
    init.chmod(0o755)
    return tree


@pytest.mark.parametrize("options, expected", [
    # 252's default off a terminal: a read-only console, a pty whose output is relayed
    ((), "console-exists stdin-tty stdout-tty no-input"),
    (("--console=read-only",), "console-exists stdin-tty stdout-tty no-input"),
    (("--console=passive",), "console-exists stdin-tty stdout-tty no-input"),
    (("--console=pipe",), "no-console stdin-not-tty stdout-not-tty GOT=hello"),
    (("-P",), "no-console stdin-not-tty stdout-not-tty GOT=hello"),
], ids=["default", "read-only", "passive", "pipe", "P"])
def test_booted_init_console_off_a_terminal(hosteld: DaemonProcess, tree: Path,
                                            options: tuple[str, ...], expected: str) -> None:
    with_probe_init(tree)
    name = "nf-console"
    # bytes, not text: text mode would turn the pty's "\r\n" into "\n"
    ours = subprocess.run([HOSTELCTL, "run", "-q", "-D", str(tree), "-M", name, "-b", *options],
                          env=hosteld.environment(), input=b"hello\n", capture_output=True,
                          timeout=TIMEOUT)
    command = [NSPAWN, "--register=no", "--keep-unit", "-q", "-D", str(tree), "-M", name, "-b",
               *options]
    theirs = subprocess.run(["/usr/bin/unshare", "-m", "--propagation=private", "/bin/sh", "-c",
                             'mount -t tmpfs tmpfs /run && exec "$@"', "sh", *command],
                            input=b"hello\n", capture_output=True, timeout=TIMEOUT)
    assert theirs.returncode == 0, theirs.stderr.decode()
    assert ours.returncode == 0, (ours.stdout + ours.stderr).decode()
    our_out, their_out = ours.stdout.decode(), theirs.stdout.decode()
    their_lines = their_out.replace("\r\n", "\n").splitlines()
    assert their_lines == ["PID=1", *expected.split(), "DONE"]
    assert our_out.replace("\r\n", "\n").splitlines() == their_lines
    # a pty turns "\n" into "\r\n" on the way out: the output went through the console
    assert ("\r\n" in our_out) == ("\r\n" in their_out) == (expected.split()[1] == "stdin-tty")


def test_console_modes_are_checked(hosteld: DaemonProcess, tree: Path) -> None:
    for options, message in (
            (("--console=loud",), "Unknown console mode: loud (expected interactive, read-only, "
                                  "passive, pipe)"),
            (("--pipe", "--console=read-only"), "--pipe and --console=read-only may not be "
                                                "combined")):
        result = run_hostel(hosteld, tree, "nf-conbad", *options, "/bin/true")
        assert result.returncode != 0 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


# 5. --network-interface= ---------------------------------------------------------------------

LINK_TAG = f"{os.getpid() % 100000:05d}"


def host_link(name: str) -> dict | None:
    """iproute2's view of a link in the host's namespace (None: not there)."""
    shown = subprocess.run(["ip", "-j", "link", "show", "dev", name], capture_output=True,
                           text=True, timeout=30)
    return json.loads(shown.stdout)[0] if shown.returncode == 0 else None


@pytest.fixture
def veth_pair() -> Iterator[tuple[str, str]]:
    """A throwaway veth pair on the host: a virtual link dies with a namespace it is left in."""
    name, peer = f"nf-v{LINK_TAG}", f"nf-p{LINK_TAG}"
    subprocess.run(["ip", "link", "add", name, "type", "veth", "peer", "name", peer],
                   check=True, timeout=30)
    try:
        yield name, peer
    finally:
        subprocess.run(["ip", "link", "del", name], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", peer], capture_output=True, timeout=30)


def run_nspawn_with_udev_db(tree: Path, name: str, link: str,
                            *args: str) -> subprocess.CompletedProcess[str]:
    """nspawn 252 refuses a link udev has not initialized; this host runs no udev, so its
    private /run gets the database entry udev would have written."""
    index = Path(f"/sys/class/net/{link}/ifindex").read_text().strip()
    command = [NSPAWN, "--register=no", "--keep-unit", "-q", "-D", str(tree), "-M", name, *args]
    return subprocess.run(
        ["/usr/bin/unshare", "-m", "--propagation=private", "/bin/sh", "-c",
         f'mount -t tmpfs tmpfs /run && mkdir -p /run/udev/data && echo I:1 > '
         f'/run/udev/data/n{index} && exec "$@"', "sh", *command],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TIMEOUT)


def test_network_interface_goes_back_to_the_host_at_exit(hosteld: DaemonProcess, tree: Path,
                                                         veth_pair: tuple[str, str]) -> None:
    name, peer = veth_pair
    before = host_link(name)
    assert before is not None
    probe = "ls /sys/class/net"
    theirs = run_nspawn_with_udev_db(tree, "nf-netif", name, f"--network-interface={name}",
                                     "/bin/sh", "-c", probe)
    assert theirs.returncode == 0, theirs.stderr
    after_nspawn = host_link(name)
    assert after_nspawn is not None and after_nspawn["ifindex"] == before["ifindex"]
    ours = run_hostel(hosteld, tree, "nf-netif", f"--network-interface={name}",
                      "/bin/sh", "-c", probe)
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout.split() == theirs.stdout.split() == sorted(["lo", name])
    after = host_link(name)
    assert after is not None, f"{name} did not come back to the host:\n{hosteld.log()}"
    assert after["ifname"] == name and after["ifindex"] == before["ifindex"]
    assert host_link(peer) is not None  # the pair is whole


def test_network_interface_back_after_terminate(hosteld: DaemonProcess, tree: Path,
                                                veth_pair: tuple[str, str]) -> None:
    """Stopped from outside (TerminateMachine), the container still hands its link back."""
    name, _ = veth_pair
    client = subprocess.Popen([HOSTELCTL, "run", "-q", "-D", str(tree), "-M", "nf-netterm",
                               f"--network-interface={name}", "/bin/sleep", "1000"],
                              env=hosteld.environment(), stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for _ in range(200):
            if host_link(name) is None:
                break
            time.sleep(0.05)
        assert host_link(name) is None, "the link never moved into the container"
        wait_running(hosteld, "nf-netterm")
        stopped = subprocess.run([HOSTELCTL, "terminate", "nf-netterm"],
                                 env=hosteld.environment(), capture_output=True, text=True,
                                 timeout=TIMEOUT)
        assert stopped.returncode == 0, stopped.stderr
        client.wait(timeout=TIMEOUT)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert host_link(name) is not None, f"{name} was lost:\n{hosteld.log()}"


def wait_running(daemon: DaemonProcess, name: str) -> None:
    for _ in range(200):
        status = subprocess.run([HOSTELCTL, "status", name], env=daemon.environment(),
                                capture_output=True, text=True, timeout=TIMEOUT)
        if re.search(r"^\s*State:\s*running$", status.stdout, re.M):
            return
        time.sleep(0.05)
    raise AssertionError(f"{name} never reached the running state:\n{daemon.log()}")


def test_network_interface_back_from_a_machine_adopted_after_a_restart(
        private_bus: PrivateBus, tree: Path, tmp_path: Path, veth_pair: tuple[str, str]) -> None:
    """hosteld killed while the container holds the link: the next hosteld adopts the
    machine and still hands the link back when it ends."""
    name, _ = veth_pair
    runtime = tmp_path / "run"
    daemons = [DaemonProcess(private_bus.address, runtime, tmp_path / "state",
                             bus=private_bus).start()]
    client = subprocess.Popen([HOSTELCTL, "run", "-q", "-D", str(tree), "-M", "nf-netadopt",
                               f"--network-interface={name}", "/bin/sleep", "1000"],
                              env=daemons[0].environment(), stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(200):
            if host_link(name) is None:
                break
            time.sleep(0.05)
        assert host_link(name) is None, "the link never moved into the container"
        wait_running(daemons[0], "nf-netadopt")  # recorded: a start cut short is killed instead
        daemons[0].stop(signal.SIGKILL)
        client.kill()
        daemons.append(DaemonProcess(private_bus.address, runtime, tmp_path / "state",
                                     bus=private_bus).start())
        stopped = subprocess.run([HOSTELCTL, "terminate", "nf-netadopt"],
                                 env=daemons[1].environment(), capture_output=True, text=True,
                                 timeout=TIMEOUT)
        assert stopped.returncode == 0, stopped.stderr
        for _ in range(200):
            if host_link(name) is not None:
                break
            time.sleep(0.05)
        assert host_link(name) is not None, f"{name} was lost:\n{daemons[1].log()}"
    finally:
        for daemon in reversed(daemons):
            if daemon.proc is not None and daemon.proc.poll() is None:
                subprocess.run([HOSTELCTL, "kill", "nf-netadopt", "--signal=KILL"],
                               env=daemon.environment(), capture_output=True, timeout=TIMEOUT)
                daemon.stop()
        client.kill()
        client.wait()
