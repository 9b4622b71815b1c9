"""What lets a restarted hosteld take back a VM run (the VM itself: tests/lab/test_guest_run_vm.py).

vmlauncher's relay (a jailed process of its own) passes stdin to the console,
says where it ends once the guest holds the channel open, reads the init's
frames on their way to hosteld and keeps the exit frame's code for the exit
file, even when hosteld's end of the channel is gone; the guest manager keeps a VM run's directory in its state file and
removes it when the run ends, here for a run that ended while no hosteld ran."""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from pathlib import Path

from hostel.guest import channel, jail
from hostel.guest.launcher import settings_to_json
from hostel.guest.manager import EXITED, GuestManager
from hostel.guest.settings import GuestSettings
from hostel.guest.vmlauncher import ChannelRelay


def _readable(fd: int, seconds: float) -> bool:
    return bool(select.select([fd], [], [], seconds)[0])


def test_the_relay_ends_stdin_after_the_guest_spoke_and_keeps_the_exit_code(
        tmp_path: Path) -> None:
    """The forked, jailed relay with the test as the guest's devices and as hosteld. (stdin
    is a file: the forked relay would hold a pipe's write end of the test's too.)"""
    (tmp_path / "stdin").write_bytes(b"abc")
    stdin = os.open(tmp_path / "stdin", os.O_RDONLY)
    to_hosteld_r, to_hosteld_w = os.pipe()
    relay = ChannelRelay(stdin, to_hosteld_w)
    relay.start(jail.settings_for(None, None))
    os.close(stdin)
    try:
        # before the init's "started" it may not hold the channel open (a frame would be
        # lost) nor have the console in the payload's mode (bytes would be echoed)
        channel.write_frame(relay.from_guest_w, {"type": "log", "level": "info", "message": "m"})
        assert channel.read_frame(to_hosteld_r)["type"] == "log"
        assert not _readable(relay.console_r, 0.5) and not _readable(relay.into_guest_r, 0)
        channel.write_frame(relay.from_guest_w, {"type": "started", "pid": 12})
        assert channel.read_frame(to_hosteld_r) == {"type": "started", "pid": 12}
        assert os.read(relay.console_r, 10) == b"abc"
        assert channel.read_frame(relay.into_guest_r) == {"type": "stdin-eof", "bytes": 3}
        assert os.read(relay.console_r, 10) == b""
        os.close(to_hosteld_r)   # hosteld died
        channel.write_frame(relay.from_guest_w, {"type": "exit", "code": 7})
        assert relay.finish() == 7
    finally:
        for fd in (relay.console_r, relay.into_guest_r):
            os.close(fd)


def test_a_vm_run_that_ended_meanwhile_is_recorded_and_its_directory_removed(
        tmp_path: Path) -> None:
    guests = tmp_path / "run/guests"
    guests.mkdir(parents=True)
    work_dir = tmp_path / "run/vm/gone.x1"
    work_dir.mkdir(parents=True)
    (work_dir / "config.squashfs").write_bytes(b"x")
    settings = GuestSettings(memory_mb=64, kernel=Path("/vmlinuz"))
    (guests / "gone.json").write_text(json.dumps({
        "name": "gone", "settings": settings_to_json(settings), "pid": 2 ** 22 + 1,
        "start": 1, "console_log": None, "started_usec": 1, "work_dir": str(work_dir)}))
    (guests / "gone.exit").write_text(json.dumps({"reason": "poweroff", "code": 7,
                                                  "detail": "the guest powered off"}))
    manager = GuestManager(tmp_path / "run", lambda guest: None)
    (guest,) = manager.adopt()
    assert (guest.state, guest.exit_status, guest.exit_reason) == (EXITED, 7, "poweroff")
    assert not work_dir.exists() and not list(guests.iterdir())


def test_the_jailed_launcher_with_a_relay_reports_how_the_guest_ended(tmp_path: Path) -> None:
    """vmlauncher with a channel relay, to its end: the exit file is written (the launcher,
    jailed, once died there of a system call its jail forbids, and reported nothing)."""
    from guests.build import build

    settings = GuestSettings(memory_mb=8, kernel=build("hello", tmp_path))
    channel_r, channel_w = os.pipe()
    stderr_r, stderr_w = os.pipe()
    exit_file = tmp_path / "exit"
    ports = json.dumps([["hostel.channel", channel_w], ["hostel.stderr", stderr_w]])
    launcher = subprocess.run(
        [sys.executable, "-m", "hostel.guest.vmlauncher", settings_to_json(settings),
         str(exit_file), ports, "hostel.channel"], pass_fds=(channel_w, stderr_w),
        stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    for fd in (channel_r, channel_w, stderr_r, stderr_w):
        os.close(fd)
    assert (launcher.returncode, launcher.stdout) == (0, b"hello from the guest\n"), launcher
    assert json.loads(exit_file.read_text())["reason"] == "poweroff"
