"""Pool machines as services: hostelctl and the real machinectl start, enable, reboot,
power off and read the console log of machines kept in a throwaway pool.

The pool is a directory given to hosteld through HOSTEL_MACHINE_POOL; its
machines are busybox trees whose /sbin/init is a shell script that says on
its console which boot it is, and ends on the signals machinectl sends a
booted init (SIGRTMIN+4 poweroff: exit 0; SIGINT reboot: exit 133, which
hosteld answers by starting it again, as nspawn@.service's
RestartForceExitStatus=133). machinectl talks to hosteld's
org.freedesktop.machine1 and, for start/enable/disable, to the minimal
org.freedesktop.systemd1 hosteld serves on a bus with no systemd."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from hostel.privatebus import DaemonProcess, PrivateBus

from conftest import HOSTELCTL, busctl, hostelctl, serve_with_pool

INIT = """#!/bin/sh
n=$(cat /var/boots 2>/dev/null || echo 0); n=$((n+1)); echo $n > /var/boots
echo "svc-init: args [$*] env [${SVC_FROM_FILE:-}]"
echo "svc-init: boot $n as pid $$"
trap 'echo "svc-init: poweroff"; exit 0' 38
trap 'echo "svc-init: reboot"; exit 133' INT
trap 'echo "svc-init: halt"; exit 0' 37 TERM
while :; do sleep 1000 & wait $!; done
"""


@pytest.fixture
def pool(busybox_base: Path, tmp_path: Path) -> Callable[[str], Path]:
    """Make NAME in a throwaway pool: a busybox tree booting the script above."""
    directory = tmp_path / "pool"
    directory.mkdir()

    def make(name: str) -> Path:
        root = directory / name
        subprocess.run(["cp", "-a", str(busybox_base), str(root)], check=True)
        init = root / "sbin/init"
        init.unlink()
        init.write_text(INIT)
        init.chmod(0o755)
        return root

    make.directory = directory  # type: ignore[attr-defined]
    return make


@pytest.fixture
def daemon(private_bus: PrivateBus, pool: Callable[[str], Path],
           tmp_path: Path) -> Iterator[DaemonProcess]:
    yield from serve_with_pool(private_bus, pool.directory, tmp_path)  # type: ignore[attr-defined]


@pytest.fixture
def open_daemon(open_bus: PrivateBus, pool: Callable[[str], Path],
                tmp_path: Path) -> Iterator[DaemonProcess]:
    """On a bus whose policy lets anyone call anything: only hosteld's own checks remain."""
    yield from serve_with_pool(open_bus, pool.directory, tmp_path)  # type: ignore[attr-defined]


def ctl(daemon: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    result = hostelctl(daemon.address, *args)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def machinectl(daemon: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """The real machinectl on the private bus (it needs /run/systemd/system: a private
    mount namespace gives it one)."""
    script = 'mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/system && exec machinectl "$@"'
    return subprocess.run(["unshare", "-m", "--propagation=private", "sh", "-c", script, "sh",
                           "--no-pager", *args],
                          env={**daemon.environment(), "SYSTEMD_COLORS": "0"},
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def wait_for(condition: Callable[[], object], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(0.1)


def props(daemon: DaemonProcess, name: str) -> dict | None:
    got = busctl(daemon.bus, "--json=short", "call", "org.hostel1",
                 f"/org/hostel1/machine/{name.replace('-', '_2d')}",
                 "org.freedesktop.DBus.Properties", "GetAll", "s", "org.hostel1.Machine",
                 check=False)
    if got.returncode != 0:
        return None
    return {k: v["data"] for k, v in json.loads(got.stdout)["data"][0].items()}


def running(daemon: DaemonProcess, name: str) -> bool:
    found = props(daemon, name)
    return found is not None and found["State"] == "running"


def log_of(daemon: DaemonProcess, name: str) -> str:
    return ok(ctl(daemon, "logs", name))


def test_start_runs_in_background_with_nspawn_service_defaults(
        daemon: DaemonProcess, pool: Callable[[str], Path]) -> None:
    pool("svc-one")
    started = time.monotonic()
    ok(ctl(daemon, "start", "svc-one"))  # returns: the machine is hosteld's, not this client's
    assert running(daemon, "svc-one")
    assert time.monotonic() - started < 20
    found = props(daemon, "svc-one")
    assert found is not None
    leader = found["Leader"]
    # owned by hosteld: its leader is hosteld's child
    status = Path(f"/proc/{leader}/status").read_text()
    assert re.search(rf"^PPid:\s+{daemon.proc.pid}$", status, re.M), status  # type: ignore[union-attr]
    # --boot: the tree's /sbin/init is PID 1 inside
    wait_for(lambda: "svc-init: boot 1 as pid 1" in log_of(daemon, "svc-one"), "boot line")
    # -U (--private-users=pick): container root is an unprivileged host uid
    inside, outside, count = Path(f"/proc/{leader}/uid_map").read_text().split()[:3]
    assert inside == "0" and int(outside) >= 0x10000 and int(count) == 0x10000
    # --network-veth: ve-NAME on the host, host0 inside, nothing else
    assert found["NetworkInterfaces"], found
    assert Path("/sys/class/net/ve-svc-one").exists()
    links = subprocess.run(["nsenter", "-t", str(leader), "-n", "ip", "-o", "link"],
                           capture_output=True, text=True, check=True).stdout
    assert re.findall(r"^\d+: (\S+?)[@:]", links, re.M) == ["lo", "host0"], links
    assert "svc-one" in ok(ctl(daemon, "list"))

    ok(ctl(daemon, "poweroff", "svc-one"))
    wait_for(lambda: props(daemon, "svc-one") is None, "svc-one gone after poweroff")
    text = log_of(daemon, "svc-one")
    assert text.index("svc-init: boot 1") < text.index("svc-init: poweroff"), text
    assert not Path("/sys/class/net/ve-svc-one").exists()


def test_start_of_a_raw_image(daemon: DaemonProcess, pool: Callable[[str], Path]) -> None:
    """NAME.raw (here a bare ext4 file system) when the pool has no tree NAME."""
    tree = pool("svc-raw-tree")
    image = tree.parent / "svc-raw.raw"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image), "16M"], check=True,
                   capture_output=True)
    shutil.rmtree(tree)
    ok(ctl(daemon, "start", "svc-raw"))
    wait_for(lambda: "svc-init: boot 1 as pid 1" in log_of(daemon, "svc-raw"), "boot line")
    assert props(daemon, "svc-raw")["RootDirectory"] == str(image)  # type: ignore[index]
    ok(ctl(daemon, "poweroff", "svc-raw"))
    wait_for(lambda: props(daemon, "svc-raw") is None, "svc-raw gone after poweroff")
    attached = subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True)
    assert attached.stdout == "", attached.stdout  # its loop device released


def test_nspawn_file_beside_the_tree_overrides(daemon: DaemonProcess,
                                              pool: Callable[[str], Path]) -> None:
    """--settings=override: NAME.nspawn's [Exec] wins; being beside the image it is
    untrusted, so its network settings are dropped with 252's warning (in the log)."""
    root = pool("svc-nsp")
    settings = root.parent / "svc-nsp.nspawn"
    settings.write_text("[Exec]\nBoot=yes\nParameters=--from-file two\nEnvironment=SVC_FROM_FILE=yes\n"
                        "[Network]\nVirtualEthernet=no\n")
    ok(ctl(daemon, "start", "svc-nsp"))
    wait_for(lambda: "boot 1" in log_of(daemon, "svc-nsp"), "boot line")
    text = log_of(daemon, "svc-nsp")
    assert "svc-init: args [--from-file two] env [yes]" in text, text
    assert f"Ignoring network settings, file {settings} is not trusted." in text, text
    assert Path("/sys/class/net/ve-svc-nsp").exists()  # the service's --network-veth stays
    ok(ctl(daemon, "poweroff", "svc-nsp"))
    wait_for(lambda: props(daemon, "svc-nsp") is None, "svc-nsp gone after poweroff")


def test_logs_lines_and_follow(daemon: DaemonProcess, pool: Callable[[str], Path]) -> None:
    pool("svc-two")
    ok(ctl(daemon, "start", "svc-two"))
    wait_for(lambda: "boot 1" in log_of(daemon, "svc-two"), "boot line")
    assert ok(ctl(daemon, "logs", "-n", "1", "svc-two")) == "svc-init: boot 1 as pid 1\n"
    assert ok(ctl(daemon, "logs", "-n", "0", "svc-two")) == ""
    follower = subprocess.Popen([HOSTELCTL, "logs", "-f", "svc-two"], env=daemon.environment(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1)
        assert follower.poll() is None, "logs -f ended while the machine runs"
        ok(ctl(daemon, "reboot", "svc-two"))
        wait_for(lambda: "boot 2" in log_of(daemon, "svc-two"), "second boot")
        ok(ctl(daemon, "poweroff", "svc-two"))
        out, err = follower.communicate(timeout=30)  # ends by itself with the machine
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    assert follower.returncode == 0, err
    lines = [line for line in out.splitlines()
             if line.startswith("svc-init") and "args" not in line]
    assert lines == ["svc-init: boot 1 as pid 1", "svc-init: reboot", "svc-init: boot 2 as pid 1",
                     "svc-init: poweroff"], out


def test_logs_follow_ends_on_ctrl_c(daemon: DaemonProcess, pool: Callable[[str], Path]) -> None:
    pool("svc-three")
    ok(ctl(daemon, "start", "svc-three"))
    follower = subprocess.Popen([HOSTELCTL, "logs", "--follow", "svc-three"],
                                env=daemon.environment(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: "boot 1" in log_of(daemon, "svc-three"), "boot line")
        time.sleep(0.5)
        follower.send_signal(signal.SIGINT)
        out, err = follower.communicate(timeout=10)
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    assert follower.returncode == 0 and "Traceback" not in err, err
    assert "svc-init: boot 1" in out
    assert running(daemon, "svc-three")  # Ctrl-C ends the reader, not the machine


def test_machinectl_start_list_reboot_poweroff(daemon: DaemonProcess,
                                                pool: Callable[[str], Path]) -> None:
    pool("svc-mc")
    result = machinectl(daemon, "start", "svc-mc")
    assert result.returncode == 0, result.stderr
    assert running(daemon, "svc-mc")
    listing = machinectl(daemon, "list")
    assert re.search(r"^svc-mc\s+container\s+hostel", listing.stdout, re.M), listing.stdout
    assert machinectl(daemon, "start", "svc-mc").returncode == 0  # an active unit: a no-op
    first = props(daemon, "svc-mc")["Leader"]  # type: ignore[index]

    assert machinectl(daemon, "reboot", "svc-mc").returncode == 0
    wait_for(lambda: "svc-init: boot 2" in log_of(daemon, "svc-mc"), "second boot")
    wait_for(lambda: running(daemon, "svc-mc"), "running again")
    assert props(daemon, "svc-mc")["Leader"] != first  # type: ignore[index]

    assert machinectl(daemon, "poweroff", "svc-mc").returncode == 0
    wait_for(lambda: props(daemon, "svc-mc") is None, "gone after poweroff")
    assert "svc-init: poweroff" in log_of(daemon, "svc-mc")


def test_enable_starts_with_hosteld_and_disable_stops_that(
        daemon: DaemonProcess, pool: Callable[[str], Path], tmp_path: Path) -> None:
    pool("svc-en1")
    pool("svc-en2")
    enabled = tmp_path / "state/enabled"
    out = machinectl(daemon, "enable", "svc-en1")
    assert out.returncode == 0, out.stderr
    assert f"Created symlink {enabled}/svc-en1" in out.stdout + out.stderr
    assert ok(ctl(daemon, "enable", "svc-en2")).startswith(f"Created symlink {enabled}/svc-en2")
    assert ok(ctl(daemon, "enable", "svc-en2")) == ""  # already: nothing changes
    assert not running(daemon, "svc-en1") and not running(daemon, "svc-en2")

    assert daemon.stop() == 0
    daemon.start()
    wait_for(lambda: running(daemon, "svc-en1") and running(daemon, "svc-en2"),
             "enabled machines started by hosteld")
    assert machinectl(daemon, "terminate", "svc-en1").returncode == 0  # terminate works too
    wait_for(lambda: props(daemon, "svc-en1") is None, "svc-en1 terminated")
    assert "svc-init: halt" in log_of(daemon, "svc-en1")

    out = machinectl(daemon, "disable", "svc-en1")
    assert out.returncode == 0 and f'Removed "{enabled}/svc-en1"' in out.stdout + out.stderr
    assert ok(ctl(daemon, "disable", "svc-en2")) == f'Removed "{enabled}/svc-en2".\n'
    assert running(daemon, "svc-en2")  # disable leaves a running machine alone
    ok(ctl(daemon, "poweroff", "svc-en2"))
    wait_for(lambda: props(daemon, "svc-en2") is None, "svc-en2 powered off")

    assert daemon.stop() == 0
    daemon.start()
    time.sleep(2)
    assert props(daemon, "svc-en1") is None and props(daemon, "svc-en2") is None
    assert not list(enabled.iterdir())


def test_a_machine_rebooting_in_a_loop_is_stopped(daemon: DaemonProcess,
                                                 pool: Callable[[str], Path]) -> None:
    """An init that exits 133 at once: restarted up to systemd's start limit, then stopped
    with the reason in its log (not restarted for ever)."""
    from hostel.machine.services import START_LIMIT_BURST

    init = pool("svc-loop") / "sbin/init"
    init.write_text("#!/bin/sh\necho svc-init: looping\nexit 133\n")
    ok(ctl(daemon, "start", "svc-loop"))
    wait_for(lambda: props(daemon, "svc-loop") is None, "svc-loop stopped", timeout=60)
    text = log_of(daemon, "svc-loop")
    assert f"rebooted more than {START_LIMIT_BURST} times within 10 s: stopped" in text, text
    # the first boot, then one per reboot up to the limit (the last may be cut short)
    assert START_LIMIT_BURST + 1 <= text.count("svc-init: looping") <= START_LIMIT_BURST + 2
    time.sleep(1)
    assert props(daemon, "svc-loop") is None  # and not started again


def test_console_log_survives_a_hosteld_restart(daemon: DaemonProcess,
                                                pool: Callable[[str], Path]) -> None:
    """The payload writes its log itself: a machine adopted by the next hosteld keeps
    logging, and its poweroff there still ends it."""
    pool("svc-keep")
    ok(ctl(daemon, "start", "svc-keep"))
    wait_for(lambda: "boot 1" in log_of(daemon, "svc-keep"), "boot line")
    leader = props(daemon, "svc-keep")["Leader"]  # type: ignore[index]
    assert daemon.stop() == 0
    daemon.start()
    assert props(daemon, "svc-keep")["Leader"] == leader  # type: ignore[index]
    ok(ctl(daemon, "poweroff", "svc-keep"))
    wait_for(lambda: props(daemon, "svc-keep") is None, "svc-keep gone after poweroff")
    assert log_of(daemon, "svc-keep").splitlines()[-1] == "svc-init: poweroff"


def test_bad_inputs(daemon: DaemonProcess, pool: Callable[[str], Path]) -> None:
    pool_dir = pool.directory  # type: ignore[attr-defined]
    missing = ctl(daemon, "start", "svc-missing")
    assert missing.returncode == 1
    assert "svc-missing" in missing.stderr and str(pool_dir) in missing.stderr, missing.stderr
    enable = ctl(daemon, "enable", "svc-missing")
    assert enable.returncode == 1 and str(pool_dir) in enable.stderr, enable.stderr
    mc_missing = machinectl(daemon, "start", "svc-missing")
    assert mc_missing.returncode == 1
    assert "Machine image 'svc-missing' does not exist" in mc_missing.stderr
    mc_enable = machinectl(daemon, "enable", "svc-missing")
    assert mc_enable.returncode == 1 and "does not exist" in mc_enable.stderr

    for bad in ("../svc-x", ".svc-x", "svc x"):
        result = ctl(daemon, "start", bad)
        assert result.returncode == 1 and "Invalid machine name" in result.stderr, result.stderr

    no_log = ctl(daemon, "logs", "svc-missing")
    assert no_log.returncode == 1 and "no console log" in no_log.stderr
    usage = ctl(daemon, "logs", "-n", "-1", "svc-missing")
    assert usage.returncode == 2 and "invalid number of lines" in usage.stderr

    (pool("svc-noinit") / "sbin/init").unlink()
    failed = ctl(daemon, "start", "svc-noinit")
    assert failed.returncode == 1 and "find an init system" in failed.stderr, failed.stderr
    mc_failed = machinectl(daemon, "start", "svc-noinit")
    assert mc_failed.returncode == 1
    assert "Failed to start unit: " in mc_failed.stderr and "find an init system" in mc_failed.stderr
    assert log_of(daemon, "svc-noinit").count("start failed: ") == 2
    assert props(daemon, "svc-noinit") is None

    pool("svc-twice")
    ok(ctl(daemon, "start", "svc-twice"))
    again = ctl(daemon, "start", "svc-twice")
    assert again.returncode == 1 and "svc-twice is already running" in again.stderr
    assert running(daemon, "svc-twice")
    assert ctl(daemon, "poweroff", "svc-missing").returncode == 1


def test_systemd1_answers_for_nspawn_units_only(daemon: DaemonProcess) -> None:
    refused = busctl(daemon.bus, "call", "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
                     "org.freedesktop.systemd1.Manager", "StartUnit", "ss", "sshd.service",
                     "replace", check=False)
    assert refused.returncode != 0 and "sshd.service not found" in refused.stderr
    bad_mode = busctl(daemon.bus, "call", "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
                      "org.freedesktop.systemd1.Manager", "StartUnit", "ss",
                      "systemd-nspawn@svc-x.service", "whenever", check=False)
    assert bad_mode.returncode != 0 and "Job mode whenever invalid" in bad_mode.stderr
    other = busctl(daemon.bus, "call", "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
                   "org.freedesktop.systemd1.Manager", "EnableUnitFiles", "asbb", "1",
                   "getty@tty1.service", "false", "false", check=False)
    assert other.returncode != 0 and "getty@tty1.service not found" in other.stderr


# Every mutating method of the two interfaces this feature adds, as uid 65534 calls it
# (dbus-send: it shows the error's name and hosteld's own text, which busctl does not).
_SERVICES = ("org.hostel1", "/org/hostel1/machine", "org.hostel1.MachineServices")
_SYSTEMD = ("org.freedesktop.systemd1", "/org/freedesktop/systemd1",
            "org.freedesktop.systemd1.Manager")
_UNIT = "systemd-nspawn@svc-priv.service"
UNPRIVILEGED_CALLS = [
    (*_SERVICES, "StartFromPool", "string:svc-priv"),
    (*_SERVICES, "Enable", "string:svc-priv"),
    (*_SERVICES, "Disable", "string:svc-priv"),
    (*_SERVICES, "OpenConsoleLog", "string:svc-priv"),
    (*_SYSTEMD, "StartUnit", f"string:{_UNIT}", "string:fail"),
    (*_SYSTEMD, "EnableUnitFiles", f"array:string:{_UNIT}", "boolean:false", "boolean:false"),
    (*_SYSTEMD, "DisableUnitFiles", f"array:string:{_UNIT}", "boolean:false"),
    (*_SYSTEMD, "Reload"),
]


def test_the_unprivileged_table_covers_every_mutating_method() -> None:
    from hostel.machine.services_bus import MachineServicesInterface
    from hostel.machine.systemd1_units import Systemd1Manager

    declared = set()
    for cls in (MachineServicesInterface, Systemd1Manager):
        for member in vars(cls).values():
            method = getattr(member, "__dict__", {}).get("__DBUS_METHOD")
            if method is not None and getattr(method.fn, "__hostel_mutating__", False):
                declared.add(method.name)
    assert declared == {call[3] for call in UNPRIVILEGED_CALLS}


@pytest.mark.parametrize("bus_kind", ["daemon", "open_daemon"])
@pytest.mark.parametrize("call", UNPRIVILEGED_CALLS, ids=lambda call: call[3])  # the member
def test_unprivileged_callers_change_nothing(request: pytest.FixtureRequest, bus_kind: str,
                                            pool: Callable[[str], Path], call: tuple[str, ...],
                                            tmp_path: Path) -> None:
    """Refused by the bus policy, and by hosteld itself on a bus that lets anyone call."""
    from conftest import NOBODY

    daemon: DaemonProcess = request.getfixturevalue(bus_kind)
    pool("svc-priv")
    destination, path, interface, member, *args = call
    refused = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "dbus-send",
         "--system", "--print-reply", f"--dest={destination}", path, f"{interface}.{member}",
         *args], env=daemon.environment(), capture_output=True, text=True, timeout=30)
    assert refused.returncode != 0
    assert "org.freedesktop.DBus.Error.AccessDenied" in refused.stderr, refused.stderr
    refusal = f"{member} changes state and needs root" if bus_kind == "open_daemon" else \
        "Rejected send message"  # the bus's policy, before hosteld sees it
    assert refusal in refused.stderr, refused.stderr
    assert props(daemon, "svc-priv") is None
    assert not (tmp_path / "state/enabled/svc-priv").exists()


def test_unprivileged_callers_may_list_the_enabled(daemon: DaemonProcess) -> None:
    from conftest import NOBODY

    listed = busctl(daemon.bus, "call", "org.hostel1", "/org/hostel1/machine",
                    "org.hostel1.MachineServices", "ListEnabled", uid=NOBODY, check=False)
    assert listed.returncode == 0, listed.stderr


@pytest.fixture(autouse=True)
def _no_leftover_veth() -> Iterator[None]:
    yield
    for name in os.listdir("/sys/class/net"):
        if name.startswith("ve-svc-"):
            subprocess.run(["ip", "link", "del", name], check=False)


def test_pool_lookup_order(tmp_path: Path) -> None:
    """Unit-level: a tree wins over NAME.raw, the first directory over the second."""
    from hostel.machine import pool

    first, second = tmp_path / "a", tmp_path / "b"
    (first / "svc-t").mkdir(parents=True)
    second.mkdir()
    (second / "svc-t.raw").write_bytes(b"")
    (second / "svc-r.raw").write_bytes(b"")
    assert pool.find("svc-t", [str(first), str(second)]).directory == str(first / "svc-t")
    assert pool.find("svc-t", [str(second), str(first)]).image == str(second / "svc-t.raw")
    assert pool.find("svc-r", [str(first), str(second)]).image == str(second / "svc-r.raw")
    with pytest.raises(pool.NotInPool, match=re.escape(f"{first}, {second}")):
        pool.find("svc-none", [str(first), str(second)])
    with pytest.raises(pool.NotInPool):
        pool.find("..", [str(first)])
