"""How `hostelctl run` ends, side by side with systemd-nspawn 252 on the same busybox tree.

Exit statuses and the closing "Container NAME ..." line, usage errors,
SIGTERM to the client, the terminal's mode at start-up, --as-pid2's stub
init, the lock on a running tree, -M NAME from the pool and the payload's
resource limits: what a sysadmin who knows nspawn sees, checked against the
real nspawn (run with --keep-unit and a private /run: there is no systemd
here to give it a scope, and its state must not land in the host's /run)."""
from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from hostel.machine.pool import POOL_ENV
from hostel.privatebus import DaemonProcess, PrivateBus

from conftest import HOSTELCTL, hostelctl, read_pty, terminate_all_machines

NSPAWN = "/usr/bin/systemd-nspawn"
pytestmark = pytest.mark.skipif(not os.path.exists(NSPAWN), reason="systemd-nspawn not installed")
PRIVATE_RUN = ["/usr/bin/unshare", "-m", "--propagation=private", "/bin/sh", "-c",
               'mount -t tmpfs tmpfs /run && exec "$@"', "sh"]


def nspawn_argv(tree: Path, *args: str) -> list[str]:
    return [*PRIVATE_RUN, NSPAWN, "--register=no", "--keep-unit", "-D", str(tree), *args]


def hostel_argv(tree: Path, *args: str) -> list[str]:
    return [HOSTELCTL, "run", "-D", str(tree), *args]


def run_both(hosteld: DaemonProcess, tree: Path, *args: str,
             hostel_args: tuple[str, ...] = ()) -> tuple[subprocess.CompletedProcess[str], ...]:
    """The same options and command under both, one after the other."""
    results = []
    for argv in (nspawn_argv(tree, *args), hostel_argv(tree, *hostel_args, *args)):
        results.append(subprocess.run(argv, env=hosteld.environment(), stdin=subprocess.DEVNULL,
                                      capture_output=True, text=True, timeout=60))
    return tuple(results)


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


@pytest.mark.parametrize("options, command, status, line", [
    ((), "exit 7", 7, "failed with error code 7."),
    ((), "exit 0", 0, "exited successfully."),
    (("--keep-unit",), "reboot -f; sleep 10", 133, "is being rebooted."),
    ((), "poweroff -f; sleep 10", 0, "has been shut down."),
    ((), "halt -f; sleep 10", 0, "has been shut down."),
    (("--as-pid2",), "kill -KILL $$", 255, "failed with error code 255."),
], ids=["exit-7", "exit-0", "reboot", "poweroff", "halt", "as-pid2-killed"])
def test_exit_status_and_last_line_as_nspawn(hosteld: DaemonProcess, tree: Path,
                                             options: tuple[str, ...], command: str,
                                             status: int, line: str) -> None:
    theirs, ours = run_both(hosteld, tree, "-M", "nb-exit", *options, "/bin/sh", "-c", command)
    assert theirs.returncode == ours.returncode == status, (theirs.stderr, ours.stderr)
    assert last_line(theirs.stderr) == last_line(ours.stderr) == f"Container nb-exit {line}"


def test_quiet_drops_the_last_line_but_not_a_signal(hosteld: DaemonProcess, tree: Path) -> None:
    theirs, ours = run_both(hosteld, tree, "-q", "-M", "nb-quiet", "/bin/sh", "-c", "exit 3")
    assert (theirs.returncode, theirs.stderr) == (ours.returncode, ours.stderr) == (3, "")


def _wait_for_line(proc: subprocess.Popen[str], wanted: str, timeout: float = 30) -> None:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        readable, _, _ = select.select([proc.stdout], [], [], 0.5)
        if readable and proc.stdout.readline().strip() == wanted:
            return
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
    raise TimeoutError(f"no {wanted!r} from {proc.args}")


def _ended_by(hosteld: DaemonProcess, argv: list[str], act) -> tuple[int, str, str]:
    """Start argv, wait for its payload's "ready", act on it, and collect how it ended."""
    proc = subprocess.Popen(argv, env=hosteld.environment(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_line(proc, "ready")
        act(proc)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, err


TRAPS = ('for s in TERM USR1 INT HUP; do trap "echo got $s; exit 4" $s; done; echo ready; '
         'while :; do sleep 0.1; done')


def _pid1_of(marker: str) -> int:
    found = subprocess.run(["pgrep", "-f", f"^sleep {marker}$"], capture_output=True, text=True)
    return int(found.stdout.split()[0])


def test_pid1_killed_by_a_signal_exits_1(hosteld: DaemonProcess, tree: Path) -> None:
    def kill_pid1(_proc: subprocess.Popen[str]) -> None:
        os.kill(_pid1_of("4711"), signal.SIGKILL)

    command = ("/bin/sh", "-c", "echo ready; exec sleep 4711")
    theirs = _ended_by(hosteld, nspawn_argv(tree, "-M", "nb-sig", *command), kill_pid1)
    ours = _ended_by(hosteld, hostel_argv(tree, "-M", "nb-sig", *command), kill_pid1)
    assert theirs[0] == ours[0] == 1
    assert last_line(theirs[2]) == last_line(ours[2]) == "Container nb-sig terminated by signal KILL."


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_a_signal_to_the_client_kills_a_payload_without_kill_signal(
        hosteld: DaemonProcess, tree: Path, sig: signal.Signals) -> None:
    """nspawn's default for a non-boot payload: no kill signal, SIGKILL at once (the
    payload's SIGTERM trap never runs)."""
    def interrupt(proc: subprocess.Popen[str]) -> None:
        proc.send_signal(sig)

    theirs = _ended_by(hosteld, nspawn_argv(tree, "-M", "nb-term", "/bin/sh", "-c", TRAPS),
                       interrupt)
    ours = _ended_by(hosteld, hostel_argv(tree, "-M", "nb-term", "/bin/sh", "-c", TRAPS),
                     interrupt)
    assert theirs[0] == ours[0] == 1
    assert theirs[1] == ours[1] == ""  # no "got TERM"
    assert last_line(theirs[2]) == last_line(ours[2]) == "Container nb-term terminated by signal KILL."


def test_a_signal_to_the_client_sends_the_kill_signal(hosteld: DaemonProcess, tree: Path) -> None:
    def interrupt(proc: subprocess.Popen[str]) -> None:
        proc.send_signal(signal.SIGTERM)

    args = ("-q", "-M", "nb-killsig", "--kill-signal=SIGUSR1", "/bin/sh", "-c", TRAPS)
    theirs = _ended_by(hosteld, nspawn_argv(tree, *args), interrupt)
    ours = _ended_by(hosteld, hostel_argv(tree, *args), interrupt)
    assert theirs == ours == (4, "got USR1\n", "Trying to halt container. Send SIGTERM again "
                                               "to trigger immediate termination.\n")


def test_second_signal_kills_what_ignores_the_kill_signal(hosteld: DaemonProcess,
                                                           tree: Path) -> None:
    def twice(proc: subprocess.Popen[str]) -> None:
        proc.send_signal(signal.SIGTERM)
        time.sleep(1)
        proc.send_signal(signal.SIGTERM)

    command = ("/bin/sh", "-c", 'trap "" USR1; echo ready; while :; do sleep 0.1; done')
    args = ("-M", "nb-twice", "--kill-signal=USR1", *command)
    theirs = _ended_by(hosteld, nspawn_argv(tree, *args), twice)
    ours = _ended_by(hosteld, hostel_argv(tree, *args), twice)
    assert theirs[0] == ours[0] == 1
    assert last_line(theirs[2]) == last_line(ours[2]) == \
        "Container nb-twice terminated by signal KILL."


def test_run_usage_errors_exit_1_as_nspawn(hosteld: DaemonProcess) -> None:
    theirs = subprocess.run([NSPAWN, "--bogus"], capture_output=True, text=True)
    ours = hostelctl(hosteld.address, "run", "--bogus")
    assert theirs.returncode == ours.returncode == 1
    assert theirs.stderr.splitlines()[0] == f"{NSPAWN}: unrecognized option '--bogus'"
    assert ours.stderr.splitlines()[0] == "hostelctl run: unrecognized option '--bogus'"
    # The machinectl-like verbs keep systemctl's 2.
    assert hostelctl(hosteld.address, "kill", "x", "--kill-whom=nobody").returncode == 2


def test_early_output_on_a_terminal_has_plain_line_ends(hosteld: DaemonProcess,
                                                        tree: Path) -> None:
    """The terminal is raw before the container starts: its first lines are not \\r\\r\\n."""
    out = read_pty(hostel_argv(tree, "-q", "-M", "nb-raw", "/bin/sh", "-c", "echo one; echo two"),
                   hosteld.environment())
    assert b"one\r\ntwo\r\n" in out and b"\r\r\n" not in out, out


def _running(hosteld: DaemonProcess, argv: list[str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(argv, env=hosteld.environment(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_line(proc, "ready")
    except BaseException:
        _stop(proc)
        raise
    return proc


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()  # both kill a payload without a kill signal at once
    try:
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


READY = ("/bin/sh", "-c", "echo ready; exec sleep 600")


@pytest.mark.parametrize("first", ["hostel", "nspawn"])
def test_a_running_tree_is_busy_for_both(hosteld: DaemonProcess, tree: Path, first: str) -> None:
    busy = f"Directory tree {tree} is currently busy."
    argv = {"hostel": hostel_argv(tree, "-M", "nb-lock1", *READY),
            "nspawn": nspawn_argv(tree, "-M", "nb-lock1", *READY)}
    holder = _running(hosteld, argv[first])
    try:
        assert (tree.parent / ".#bbox.lck").exists()
        theirs, ours = run_both(hosteld, tree, "-M", "nb-lock2", "/bin/true")
        assert theirs.returncode == ours.returncode == 1, (theirs.stderr, ours.stderr)
        assert last_line(theirs.stderr) == busy
        assert last_line(ours.stderr).endswith(busy), ours.stderr
        # A shared lock (--read-only) does not get past an exclusive one either.
        read_only = hostelctl(hosteld.address, "run", "-q", "-D", str(tree), "--read-only",
                              "-M", "nb-lock3", "/bin/true")
        assert read_only.returncode == 1 and busy in read_only.stderr
        # An ephemeral container runs on a snapshot: the tree's lock does not concern it.
        snapshot = hostelctl(hosteld.address, "run", "-q", "-x", "-D", str(tree),
                             "-M", "nb-lock4", "/bin/true")
        assert snapshot.returncode == 0, snapshot.stderr
    finally:
        _stop(holder)
    assert not (tree.parent / ".#bbox.lck").exists()  # released, and removed, at the end
    after = hostelctl(hosteld.address, "run", "-q", "-D", str(tree), "-M", "nb-lock5", "/bin/true")
    assert after.returncode == 0, after.stderr


def test_read_only_containers_share_a_tree(hosteld: DaemonProcess, tree: Path) -> None:
    holder = _running(hosteld, nspawn_argv(tree, "--read-only", "-M", "nb-ro1", *READY))
    try:
        ours = hostelctl(hosteld.address, "run", "-q", "-D", str(tree), "--read-only",
                         "-M", "nb-ro2", "/bin/true")
        assert ours.returncode == 0, ours.stderr
        writable = hostelctl(hosteld.address, "run", "-q", "-D", str(tree), "-M", "nb-ro3",
                             "/bin/true")
        assert writable.returncode == 1 and "is currently busy." in writable.stderr
    finally:
        _stop(holder)


@pytest.fixture
def machine_pool(tmp_path: Path) -> Path:
    pool = tmp_path / "pool"
    pool.mkdir(mode=0o700)
    return pool


@pytest.fixture
def pool_hosteld(private_bus: PrivateBus, tmp_path: Path,
                 machine_pool: Path) -> Iterator[DaemonProcess]:
    """A hosteld whose pool is a throwaway directory (HOSTEL_MACHINE_POOL), never the
    host's /var/lib/machines."""
    runtime = Path(tempfile.mkdtemp(prefix="hostel-run-"))
    daemon = DaemonProcess(private_bus.address, runtime, tmp_path / "state", bus=private_bus,
                           extra_env={POOL_ENV: str(machine_pool)})
    daemon.log_path = tmp_path / "hosteld.log"
    try:
        daemon.start()
        yield daemon
    finally:
        terminate_all_machines(daemon)
        daemon.stop()
        shutil.rmtree(runtime, ignore_errors=True)


def nspawn_on_pool(pool: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """nspawn with the throwaway pool bound over /var/lib/machines in a private mount
    namespace: the host's pool is neither read nor touched."""
    script = ('mount -t tmpfs tmpfs /run && mount --bind "$0" /var/lib/machines && exec "$@"')
    argv = ["/usr/bin/unshare", "-m", "--propagation=private", "/bin/sh", "-c", script,
            str(pool), NSPAWN, "--register=no", "--keep-unit", *args]
    return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.skipif(not os.path.isdir("/var/lib/machines"), reason="no /var/lib/machines to cover")
def test_machine_name_alone_finds_the_tree_in_the_pool(pool_hosteld: DaemonProcess,
                                                       machine_pool: Path, tree: Path) -> None:
    shutil.move(str(tree), machine_pool / "nb-pool")
    (machine_pool / "nb-pool/etc/marker").write_text("from the pool\n")
    command = ("-q", "-M", "nb-pool", "/bin/cat", "/etc/marker")
    theirs = nspawn_on_pool(machine_pool, *command)
    ours = hostelctl(pool_hosteld.address, "run", *command)
    assert (theirs.returncode, theirs.stdout) == (ours.returncode, ours.stdout) == \
        (0, "from the pool\n"), (theirs.stderr, ours.stderr)
    theirs = nspawn_on_pool(machine_pool, "-q", "-M", "nb-nowhere", "/bin/true")
    ours = hostelctl(pool_hosteld.address, "run", "-q", "-M", "nb-nowhere", "/bin/true")
    assert theirs.returncode == ours.returncode == 1
    assert theirs.stderr.strip() == "No image for machine 'nb-nowhere'."
    assert "No image for machine 'nb-nowhere'." in ours.stderr and str(machine_pool) in ours.stderr


def test_as_pid2_stub_init_is_named_as_nspawns(hosteld: DaemonProcess, tree: Path) -> None:
    """/proc/1/comm and /proc/1/cmdline: the stub's name, not hosteld's command line."""
    probe = "cat /proc/1/comm; tr '\\0' '\\n' < /proc/1/cmdline | grep -c .; tr -d '\\0' < /proc/1/cmdline"
    theirs, ours = run_both(hosteld, tree, "-q", "-M", "nb-stub", "--as-pid2", "/bin/sh", "-c",
                            probe)
    assert theirs.stdout == ours.stdout == "(sd-stubinit)\n1\n(sd-stubinit)", (theirs, ours)


LIMITS_PROBE = "ulimit -n; ulimit -Hn; cat /proc/self/limits"


@pytest.mark.parametrize("caller", ["ulimit -n 1234", "ulimit -Sn 500; ulimit -Hc 100",
                                    "ulimit -n 800; ulimit -Ss 4096"],
                         ids=["nofile-1234", "low-soft-and-core-hard", "nofile-800-stack"])
def test_payload_limits_derive_from_the_callers_as_in_nspawn(hosteld: DaemonProcess, tree: Path,
                                                             caller: str) -> None:
    """Kernel defaults for PID 1, NOFILE's hard limit the caller's, nothing above the
    caller's hard limits: the same /proc/self/limits under both."""
    outputs = []
    for argv in (nspawn_argv(tree, "-q", "/bin/sh", "-c", LIMITS_PROBE),
                 hostel_argv(tree, "-q", "-M", "nb-limits", "/bin/sh", "-c", LIMITS_PROBE)):
        quoted = " ".join("'" + word.replace("'", "'\\''") + "'" for word in argv)
        result = subprocess.run(["/bin/bash", "-c", f"{caller} && exec {quoted}"],
                                env=hosteld.environment(), stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout)
    assert outputs[0] == outputs[1]
    assert outputs[1] != subprocess.run(["/bin/bash", "-c", f"{caller} && cat /proc/self/limits"],
                                        capture_output=True, text=True).stdout


def test_a_signal_to_the_client_asks_a_booted_init_to_halt(hosteld: DaemonProcess,
                                                          tree: Path) -> None:
    """-b: SIGRTMIN+3 (systemd's "halt") to the init by default, as nspawn 252 sends it."""
    init = tree / "sbin/init"
    init.unlink()
    rtmin3 = signal.SIGRTMIN + 3
    init.write_text(f"#!/bin/sh\ntrap 'echo halting; exit 0' {rtmin3}\necho ready\n"
                    "while :; do sleep 0.1; done\n")
    init.chmod(0o755)

    def interrupt(proc: subprocess.Popen[str]) -> None:
        proc.send_signal(signal.SIGTERM)

    theirs = _ended_by(hosteld, nspawn_argv(tree, "-q", "-b", "-M", "nb-boot"), interrupt)
    ours = _ended_by(hosteld, hostel_argv(tree, "-q", "-b", "-M", "nb-boot"), interrupt)
    assert theirs == ours == (0, "halting\n", "Trying to halt container. Send SIGTERM again "
                                             "to trigger immediate termination.\n")


def _wait_listed_running(daemon: DaemonProcess, name: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        lines = hostelctl(daemon.address, "list", "--no-legend").stdout.splitlines()
        if any(line.split()[:1] == [name] and "running" in line.split() for line in lines):
            return
        assert time.monotonic() < deadline, f"{name} not running: {lines}"
        time.sleep(0.2)


def test_an_adopted_machine_keeps_its_tree_busy(private_bus: PrivateBus, tree: Path,
                                                tmp_path: Path) -> None:
    """The lock dies with the hosteld that took it; the hosteld that adopts the machine
    takes it again, so nspawn still finds the tree busy."""
    runtime = Path(tempfile.mkdtemp(prefix="hostel-run-"))
    log = tmp_path / "hosteld.log"
    daemons = [DaemonProcess(private_bus.address, runtime, tmp_path / "state", bus=private_bus,
                             log_path=log)]
    client = None
    try:
        daemons[0].start()
        client = subprocess.Popen(hostel_argv(tree, "-q", "-M", "nb-adopt", *READY),
                                  env=daemons[0].environment(), stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_for_line(client, "ready")
        _wait_listed_running(daemons[0], "nb-adopt")  # on record: adopted, not killed
        daemons[0].stop(signal.SIGKILL)
        daemons.append(DaemonProcess(private_bus.address, runtime, tmp_path / "state",
                                     bus=private_bus, log_path=log).start())
        _wait_listed_running(daemons[1], "nb-adopt")
        theirs = subprocess.run(nspawn_argv(tree, "-q", "-M", "nb-adopt2", "/bin/true"),
                                stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=60)
        assert (theirs.returncode, theirs.stderr.strip()) == (
            1, f"Directory tree {tree} is currently busy.")
    finally:
        if len(daemons) > 1:
            terminate_all_machines(daemons[1])
        for daemon in daemons:
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.stop()
        if client is not None:
            client.kill()
            client.communicate()
        shutil.rmtree(runtime, ignore_errors=True)
    assert not (tree.parent / ".#bbox.lck").exists()
