"""Loading the cgroup v2 device program retries on EAGAIN, a bounded number of times.

The verifier returns EAGAIN when a signal interrupts it, which a busy hosteld
once hit under 20 concurrent starts. The failure is injected here by strace
(its syscall tampering: the kernel never sees the injected calls), into a
real process that loads the real program; strace's own trace counts the
attempts."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

LOAD = ("from hostel.machine import bpf_devices as b; "
        "fd = b.load([b.DeviceRule.parse('c 1:3 rwm')]); print('loaded', fd >= 0)")


def load_under_injection(tmp_path: Path, error: str, when: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run the load with `error` injected into bpf() calls number `when` (strace syntax);
    returns the process and the result of every BPF_PROG_LOAD it made."""
    if shutil.which("strace") is None:
        pytest.fail("strace is not installed (make setup installs it)")
    trace = tmp_path / "trace"
    done = subprocess.run(["strace", "-f", "-qq", "-o", str(trace), "-e", "trace=bpf",
                           "-e", f"inject=bpf:error={error}:when={when}",
                           sys.executable, "-c", LOAD],
                          capture_output=True, text=True, timeout=60)
    results = [m.group(1) for line in trace.read_text().splitlines()
               if (m := re.search(r"bpf\(BPF_PROG_LOAD, .*\) = (.*)$", line))]
    return done, results


def test_a_load_interrupted_twice_succeeds_on_the_third_attempt(tmp_path: Path) -> None:
    done, results = load_under_injection(tmp_path, "EAGAIN", "1..2")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "loaded True\n"
    assert len(results) == 3 and all("EAGAIN" in r and "INJECTED" in r for r in results[:2])
    assert re.fullmatch(r"\d+", results[2]), results  # the kernel's own answer: a descriptor


def test_a_load_that_keeps_failing_with_eagain_gives_up_after_five_attempts(
        tmp_path: Path) -> None:
    done, results = load_under_injection(tmp_path, "EAGAIN", "1+")
    assert done.returncode == 1
    assert len(results) == 5, results
    assert "BpfError: loading the cgroup device program failed: Resource temporarily " \
           "unavailable 5 times in a row" in done.stderr


def test_other_errors_are_not_retried(tmp_path: Path) -> None:
    done, results = load_under_injection(tmp_path, "EPERM", "1+")
    assert done.returncode == 1
    assert len(results) == 1, results
    assert "failed: Operation not permitted" in done.stderr
