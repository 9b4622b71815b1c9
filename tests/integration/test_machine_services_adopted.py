"""A pool machine adopted by a restarted hosteld reboots as before the restart (issue 17
point 4): its PID 1 exiting 133 starts it again with a new leader, instead of ending it.
The status of a leader that is not hosteld's child comes from pidfs
(machine/foreign_exit.py, Linux 6.15).

Not covered, because pidfs cannot tell it: reboot(2) inside an adopted machine. Its
parent's waitid() sees PID 1 killed by SIGHUP (the pid namespace's reboot code), but
pidfs records the SIGKILL the kernel killed it with (tested below), the same as a kill -9."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from hostel.machine import foreign_exit
from hostel.privatebus import DaemonProcess

from integration.test_machine_services import (ctl, daemon, log_of, ok, pool, props,  # noqa: F401
                                               wait_for)

NAME = "svc-adopted"


def _kill_and_restart(server: DaemonProcess) -> int:
    """kill -9 hosteld, start it again; the leader it adopted (the same as before)."""
    leader = props(server, NAME)["Leader"]  # type: ignore[index]
    server.stop(signal.SIGKILL)
    server.start()
    adopted = props(server, NAME)
    assert adopted is not None and adopted["Leader"] == leader, adopted
    return leader


def _booted(server: DaemonProcess, boot: int) -> int:
    """Wait for boot number `boot` and for the machine to run; its leader."""
    wait_for(lambda: f"boot {boot} as pid 1" in log_of(server, NAME), f"boot {boot}")
    wait_for(lambda: (p := props(server, NAME)) is not None and p["State"] == "running",
             f"running after boot {boot}")
    return props(server, NAME)["Leader"]  # type: ignore[index]


def test_an_adopted_pool_machine_reboots(daemon: DaemonProcess,  # noqa: F811
                                         pool: Callable[[str], Path]) -> None:  # noqa: F811
    pool(NAME)
    ok(ctl(daemon, "start", NAME))
    _booted(daemon, 1)

    # its init exits 133 (machinectl reboot's SIGINT, trapped by the test's init)
    first = _kill_and_restart(daemon)
    ok(ctl(daemon, "reboot", NAME))
    second = _booted(daemon, 2)
    assert second != first

    # and again, once more adopted: the machine started anew is adopted like the first
    assert _kill_and_restart(daemon) == second
    ok(ctl(daemon, "reboot", NAME))
    assert _booted(daemon, 3) != second

    # a poweroff of an adopted machine still ends it
    _kill_and_restart(daemon)
    ok(ctl(daemon, "poweroff", NAME))
    wait_for(lambda: props(daemon, NAME) is None, f"{NAME} gone after poweroff")
    assert "boot 4" not in log_of(daemon, NAME)
    assert log_of(daemon, NAME).splitlines()[-1] == "svc-init: poweroff"


def _default_sighup() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def test_pidfs_reports_how_a_process_that_is_not_our_child_ended() -> None:
    """The status a reaper other than hosteld saw: here our own child, reaped by us."""
    for command, exited, status in ((["sh", "-c", "exit 133"], True, 133),
                                    (["sh", "-c", "kill -HUP $$"], False, signal.SIGHUP)):
        # SIGHUP as it comes: under nohup (or a CI runner that ignores it) sh inherits
        # SIG_IGN and `kill -HUP $$` would not end it
        child = subprocess.Popen(command, preexec_fn=_default_sighup)
        pidfd = os.pidfd_open(child.pid)
        try:
            child.wait()
            raw = foreign_exit.reaped_status(pidfd)
            assert raw is not None
            info = foreign_exit.exit_info(child.pid, raw)
            assert (info.exited, info.status) == (exited, status)
        finally:
            os.close(pidfd)


def test_a_running_process_has_no_exit_status_yet() -> None:
    child = subprocess.Popen(["sleep", "100"])
    pidfd = os.pidfd_open(child.pid)
    try:
        assert foreign_exit.reaped_status(pidfd) is None
    finally:
        child.kill()
        child.wait()
        os.close(pidfd)


def _kernel() -> tuple[int, int]:
    major, minor = os.uname().release.split(".")[:2]
    return int(major), int(minor)


pytestmark = pytest.mark.skipif(_kernel() < (6, 15), reason="pidfs has exit information "
                                "from Linux 6.15 on; before, an adopted leader's status is unknown")


REBOOT_IN_A_PID_NAMESPACE = """
import ctypes, os, sys
from hostel.machine import foreign_exit
assert ctypes.CDLL(None, use_errno=True).unshare(0x20000000) == 0  # CLONE_NEWPID
pid = os.fork()
if pid == 0:
    os.execv("/bin/busybox", ["sh", "-c", "/bin/busybox reboot -f; sleep 5"])
pidfd = os.pidfd_open(pid)
_, status = os.waitpid(pid, 0)
print(os.WTERMSIG(status), os.WTERMSIG(foreign_exit.reaped_status(pidfd)))
"""


def test_pidfs_says_sigkill_where_the_parent_sees_a_reboots_sighup() -> None:
    """Why an adopted machine's reboot(2) cannot be told from a kill -9: if this fails, a
    kernel's pidfs now reports SIGHUP, and _adopted_reboot can start such a machine again."""
    result = subprocess.run([sys.executable, "-c", REBOOT_IN_A_PID_NAMESPACE],
                            capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == [str(int(signal.SIGHUP)), str(int(signal.SIGKILL))], \
        result.stderr
