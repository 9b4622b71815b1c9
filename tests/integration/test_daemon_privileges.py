"""hosteld without the rights it needs ends with a message and its documented exit
status, never a traceback (issue 17 point 3): started as an unprivileged uid, and
started as root on a bus whose policy does not let it own org.hostel1."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from hostel import daemon
from hostel.privatebus import PrivateBus

NOBODY = 65534


@pytest.fixture
def policy_less_bus(tmp_path: Path) -> Iterator[PrivateBus]:
    """A system bus without hostel's policy file: nobody may own org.hostel1 on it."""
    (tmp_path / "no-policy").mkdir()
    bus = PrivateBus(tmp_path / "bus", policy_dir=tmp_path / "no-policy").start()
    try:
        yield bus
    finally:
        bus.stop()


def _hosteld(bus: PrivateBus, state: Path, *privileges: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*privileges, sys.executable, "-m", "hostel.daemon",
                           "--runtime-dir", str(state / "run"), "--state-dir",
                           str(state / "state")],
                          env=dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=bus.address),
                          capture_output=True, text=True, timeout=60, cwd="/")


def test_an_unprivileged_hosteld_says_it_must_run_as_root(private_bus: PrivateBus) -> None:
    # a directory the unprivileged uid could write: the refusal, not a permission, stops it
    state = Path(tempfile.mkdtemp(prefix="hostel-nonroot-"))
    try:
        state.chmod(0o777)
        result = _hosteld(private_bus, state, "setpriv", f"--reuid={NOBODY}",
                          f"--regid={NOBODY}", "--clear-groups")
        assert result.returncode == daemon.EXIT_NOT_ROOT == 77, result.stderr
        assert "Traceback" not in result.stderr
        assert f"hosteld must run as root (uid {NOBODY} here)" in result.stderr
        assert os.listdir(state) == []  # it stopped before making anything
    finally:
        os.rmdir(state)


def test_a_bus_policy_that_refuses_the_name_is_named(policy_less_bus: PrivateBus,
                                                     tmp_path: Path) -> None:
    result = _hosteld(policy_less_bus, tmp_path)
    assert result.returncode == daemon.EXIT_BUS_POLICY == 78, result.stderr
    assert "Traceback" not in result.stderr
    assert "does not let hosteld (uid 0) own org.hostel1" in result.stderr
    assert "install org.hostel1.conf in its system.d" in result.stderr


def test_the_exit_statuses_are_documented() -> None:
    from hostel.docs import hosteld_page

    for text in (daemon.build_parser().format_help(), hosteld_page()):
        for status in ("69", "75", "77 not started as root", "78 the bus's policy"):
            assert status in " ".join(text.split()), text
