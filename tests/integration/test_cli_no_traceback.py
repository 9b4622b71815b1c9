"""No input and no signal makes hostelctl print a traceback: every verb of the tree is run
with bad arguments, without and with a real hosteld, as root and as nobody; and
`hostelctl shell` / `run` are interrupted while they wait."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from hostel import docs
from hostel.privatebus import DaemonProcess

from conftest import HOSTELCTL, NOBODY, unprivileged_python

MEANINGFUL = {0, 1, 2, 4, 69, 130}
NON_UTF8 = b"bad\xff\xfename"
HUGE = "x" * 100_000
BAD_INPUTS: list[list[str | bytes]] = [
    [], ["--bogus"], ["bad/name"], [NON_UTF8], [HUGE], ["-p"], ["--", "-x"],
    ["-o", "yaml"], ["name", "extra", "--value", "--no-legend"],
]
# Arguments that would start something real: run's and launch's are only options here.
STARTS_THINGS = {"run", "guest launch", "guest run"}
BOX = "tracebox"


def _hostelctl(address: str, argv: list[str | bytes], uid: int | None = None,
               **kwargs: object) -> subprocess.CompletedProcess[bytes]:
    cmd: list[str | bytes] = [HOSTELCTL, *argv]
    if uid is not None:
        cmd = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
               unprivileged_python(), "-m", "hostel.cli", *argv]
    if "input" not in kwargs:
        kwargs.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.run(cmd, capture_output=True, timeout=60,
                          env=dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=address), **kwargs)


def _check(result: subprocess.CompletedProcess[bytes], what: object) -> None:
    output = result.stdout + result.stderr
    assert b"Traceback" not in output, (what, output.decode(errors="replace")[-2000:])
    assert result.returncode in MEANINGFUL, (what, result.returncode, result.stderr[-500:])
    if result.returncode not in (0, 130):
        assert result.stderr.strip(), (what, "a failure must say why")


def _leaf_verbs() -> list[list[str]]:
    return [verb.words for verb in docs.hostelctl_verbs()[1:] if not verb.subverbs]


def _bad_invocations() -> Iterator[list[str | bytes]]:
    for words in _leaf_verbs():
        if " ".join(words) in STARTS_THINGS:
            for options in (["--bogus"], ["-D"], ["--quiet=no"], ["-M", NON_UTF8, "--help"],
                            ["--image"], ["--network-veth=x"]):
                yield [*words, *options]
            continue
        for bad in BAD_INPUTS:
            yield [*words, *bad]
    for signal_name in ("SIGRTMIN+3", "RTMIN+3", "rtmax-1", "RTMIN+99", "SIGNOPE", "0",
                        "99999999999", "-9", "RTMIN+", "KILL"):
        yield ["kill", "-s", signal_name, "nosuchmachine"]
    for group in ("cryptsetup", "guest", "image"):
        yield [group]
        yield [group, "--bogus"]
    yield ["shell", "nosuchmachine", "--uid"]
    yield ["shell", "nosuchmachine", "--bogus", "/bin/true"]
    yield ["shell", "nosuchmachine", "-E", "novalue", "/bin/true"]


def test_bad_input_without_a_daemon(tmp_path: Path) -> None:
    address = f"unix:path={tmp_path}/no-bus"
    for argv in _bad_invocations():
        _check(_hostelctl(address, argv), argv)


def test_bad_input_with_a_daemon(hosteld: DaemonProcess) -> None:
    for argv in _bad_invocations():
        _check(_hostelctl(hosteld.address, argv), argv)
    assert hosteld.proc is not None and hosteld.proc.poll() is None, "hosteld went down"


def test_group_without_a_verb_prints_its_own_help(hosteld: DaemonProcess) -> None:
    result = _hostelctl(hosteld.address, ["image"])
    assert result.returncode == 2
    assert result.stderr.startswith(b"usage: hostelctl image")
    assert b"import" in result.stderr and b"cryptsetup" not in result.stderr


def test_signals_are_parsed_as_systemd_parses_them() -> None:
    from hostel.cli import UsageError, parse_signal

    assert parse_signal("SIGRTMIN+3") == parse_signal("RTMIN+3") == signal.SIGRTMIN + 3
    assert parse_signal("rtmax-1") == signal.SIGRTMAX - 1
    assert parse_signal("term") == parse_signal("SIGTERM") == parse_signal("15") == 15
    for bad in ("RTMIN+99", "SIGNOPE", "0", "99999999999", "RTMIN+", "RTMIN3"):
        with pytest.raises(UsageError):
            parse_signal(bad)


def test_unprivileged_callers_are_told_it_requires_root(hosteld: DaemonProcess) -> None:
    """The bus policy refuses before hosteld sees the call: its rule dump is not shown."""
    for argv in (["terminate", "x"], ["kill", "x"], ["image", "remove", "x"],
                 ["cryptsetup", "detach", "x"]):
        result = _hostelctl(hosteld.address, argv, uid=NOBODY)
        assert result.returncode == 4, (argv, result.stderr)
        assert b"requires root" in result.stderr, (argv, result.stderr)
        assert b"Rejected send message" not in result.stderr and b"Traceback" not in result.stderr
    listed = _hostelctl(hosteld.address, ["list"], uid=NOBODY)
    assert listed.returncode == 0 and listed.stdout == b"No machines.\n"


@pytest.fixture
def box(hosteld: DaemonProcess, tree: Path) -> Iterator[str]:
    proc = subprocess.Popen([HOSTELCTL, "run", "-q", "-D", str(tree), "-M", BOX, "--as-pid2",
                             "sh", "-c", "echo ready > /ready; exec sleep 300"],
                            env=dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=hosteld.address),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not (tree / "ready").exists():
            assert proc.poll() is None and time.monotonic() < deadline, hosteld.log()
            time.sleep(0.1)
        yield BOX
    finally:
        _hostelctl(hosteld.address, ["kill", BOX, "--signal=KILL"])
        proc.wait(timeout=30)


def test_shell_with_piped_stdin_ends_at_eof(hosteld: DaemonProcess, box: str) -> None:
    result = _hostelctl(hosteld.address, ["shell", box, "/bin/cat"], input=b"x\ny")
    assert (result.returncode, result.stdout.replace(b"\r", b"")) == (0, b"x\ny"), result.stderr


def test_shell_options_before_and_after_the_name(hosteld: DaemonProcess, box: str) -> None:
    result = _hostelctl(hosteld.address, ["shell", "-E", "A=1", box, "--uid=root",
                                          "--setenv=B=2", "/bin/sh", "-c", "echo $A$B; id -u"])
    assert result.stdout.replace(b"\r", b"").split() == [b"12", b"0"], result.stderr
    refused = _hostelctl(hosteld.address, ["shell", box, "--uid=root", "--bogus", "/bin/true"])
    assert refused.returncode == 2 and b"unrecognized option '--bogus'" in refused.stderr
    # The command's own options are its own.
    own = _hostelctl(hosteld.address, ["shell", box, "/bin/ls", "-d", "/"])
    assert own.stdout.strip() == b"/", own.stderr


def _read_until(fd: int, wanted: bytes, timeout: float = 20) -> bytes:
    import select

    seen = b""
    deadline = time.monotonic() + timeout
    while wanted not in seen:
        left = deadline - time.monotonic()
        assert left > 0, seen
        if select.select([fd], [], [], left)[0]:
            try:
                seen += os.read(fd, 4096)
            except OSError:
                break
    return seen


def test_triple_ctrl_bracket_leaves_the_shell_on_a_terminal(hosteld: DaemonProcess,
                                                            box: str) -> None:
    import termios

    master, slave = os.openpty()
    before = termios.tcgetattr(slave)
    proc = subprocess.Popen([HOSTELCTL, "shell", box, "/bin/sh"], stdin=slave, stdout=slave,
                            stderr=slave, start_new_session=True,
                            env=dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=hosteld.address))
    try:
        if b"\x1b[6n" in _read_until(master, b"# "):  # ash asks where the cursor is
            os.write(master, b"\x1b[1;1R")
        os.write(master, b"echo in-the-$((6*7))\r")
        _read_until(master, b"in-the-42")
        os.write(master, b"\x1d\x1d\x1d")
        assert proc.wait(timeout=10) == 0
        assert termios.tcgetattr(slave) == before, "the terminal was left in raw mode"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
        os.close(slave)


def test_interrupts_while_waiting_are_not_tracebacks(hosteld: DaemonProcess, box: str,
                                                     tree: Path) -> None:
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=hosteld.address)
    for argv in (["shell", box, "/bin/sleep", "30"],
                 ["run", "-q", "-D", str(tree), "-M", "interrupted", "--as-pid2", "sleep", "30"]):
        for signals in ([signal.SIGINT], [signal.SIGINT, signal.SIGINT], [signal.SIGTERM]):
            proc = subprocess.Popen([HOSTELCTL, *argv], env=env, stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                time.sleep(1.5)  # waiting: on the pty, or for the container to end
                for sig in signals:
                    proc.send_signal(sig)
                    time.sleep(0.02)
                _out, err = proc.communicate(timeout=30)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            assert b"Traceback" not in err, (argv, signals, err.decode(errors="replace"))
            assert proc.returncode != 0, (argv, signals)


def test_triple_ctrl_bracket_kills_a_run_container_on_a_terminal(hosteld: DaemonProcess,
                                                                 tree: Path) -> None:
    """systemd-nspawn's escape in `hostelctl run`: typed input still reaches the container."""
    import termios

    master, slave = os.openpty()
    before = termios.tcgetattr(slave)
    proc = subprocess.Popen([HOSTELCTL, "run", "-q", "-D", str(tree), "-M", "escaped",
                             "/bin/sh", "-c", "read line; echo got-$line; exec sleep 300"],
                            stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                            env=dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=hosteld.address))
    try:
        deadline = time.monotonic() + 30
        while b"escaped" not in _hostelctl(hosteld.address, ["list", "--no-legend"]).stdout:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        time.sleep(0.5)
        os.write(master, b"typed\r")
        _read_until(master, b"got-typed")
        os.write(master, b"\x1d\x1d\x1d")
        assert proc.wait(timeout=10) != 0  # killed
        assert termios.tcgetattr(slave) == before, "the terminal was left in raw mode"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
        os.close(slave)
