"""The static init's `--stdio relay` (a VM's payload stdio), as PID 1 of throwaway namespaces.

Without a terminal the payload gets pipes, relayed by the init: the console
(here a pipe pair standing in for hvc0) to its stdin, its stdout back to the
console, its stderr to the stderr stream. A console has no end of input:
the host's {"type": "stdin-eof", "bytes": N} frame on the channel (here a
pty, bidirectional as a virtio-console port is) says where stdin ends. The
console's write end stays open all along, so only the frame can end `cat`."""
from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import termios
import threading
import tty
from dataclasses import dataclass
from pathlib import Path

import pytest

from hostel import native
from hostel.guest import channel
from hostel.guest.images import ImageStore, make_squashfs
from hostel.guest.launchconfig import LaunchRequest
from hostel.machine.loop import LoopDevice
from hostel.spawn import Plan, spawn
from unit.test_guest_images import Layer, busybox_layer, docker_archive, image_config

REPO = Path(__file__).resolve().parents[2]
NAMESPACES = native.CLONE_NEWPID | native.CLONE_NEWNS | native.CLONE_NEWNET | native.CLONE_NEWUTS
STDIN = b"first line\nsecond, without newline"
RUN_SECONDS = 60


@dataclass
class Result:
    stdout: bytes
    stderr: bytes
    frames: list[dict]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("relay")
    subprocess.run(["make", "-s", "-C", str(REPO / "guest-init")], check=True)
    layers = [busybox_layer().tar(), Layer().file("not-exec", b"#!/bin/sh\n", 0o644).tar()]
    archive = docker_archive(base / "image.tar", layers,
                             image_config(layers, Env=["PATH=/bin"], User="user"))
    return ImageStore(base / "images").import_archive(str(archive), "relay")


def _reader(fd: int, sink: list[bytes]) -> threading.Thread:
    def run() -> None:
        while True:
            try:
                part = os.read(fd, 65536)
            except OSError:   # EIO: the pty's every slave end is closed
                return
            if not part:
                return
            sink.append(part)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _split_frames(data: bytes) -> list[dict]:
    frames = []
    while len(data) >= 4:
        length = int.from_bytes(data[:4], "big")
        frames.append(channel.decode(data[4:4 + length]))
        data = data[4 + length:]
    assert not data, f"a partial frame: {data!r}"
    return frames


def run_relayed(image, tmp_path: Path, command: list[str], stdin: bytes) -> Result:
    """The static init with --stdio relay; `stdin` on its console, then the eof frame."""
    tree = tmp_path / "config-tree"
    (tree / "image").mkdir(parents=True)
    (tree / "image/config.json").write_bytes(image.config_path.read_bytes())
    (tree / "launch.json").write_text(LaunchRequest(command=command, isolation="vm",
                                                    hostname="relayed").to_json())
    make_squashfs(str(tree), str(tmp_path / "config.squashfs"))
    work = tmp_path / "work"
    work.mkdir()
    console_in_r, console_in_w = os.pipe()
    console_out_r, console_out_w = os.pipe()
    err_r, err_w = os.pipe()
    master, slave = os.openpty()
    tty.setraw(slave, termios.TCSANOW)   # frames pass as bytes from the first one
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    out: list[bytes] = []
    err: list[bytes] = []
    host: list[bytes] = []
    child = None
    try:
        with contextlib.ExitStack() as stack:
            image_loop = stack.enter_context(LoopDevice(str(image.squashfs), read_only=True))
            config_loop = stack.enter_context(LoopDevice(str(tmp_path / "config.squashfs"),
                                                         read_only=True))
            plan = Plan()
            plan.wait_for_parent(go_r, "the test is ready")
            plan.dup2(console_in_r, 0)
            plan.dup2(console_out_w, 1)
            plan.dup2(err_w, 4)
            plan.dup2(slave, 3)
            plan.execve(str(REPO / "build/guest-init/init"), [
                "init", "--image-device", image_loop.device, "--config-device",
                config_loop.device, "--channel", "/proc/self/fd/3", "--console", "-",
                "--stderr", "/proc/self/fd/4", "--work-dir", str(work), "--stdio", "relay"],
                ["PATH=/usr/bin:/bin"])
            child = spawn(plan, NAMESPACES)
            for fd in (console_in_r, console_out_w, err_w, slave):
                os.close(fd)
            console_in_r = console_out_w = err_w = slave = -1
            readers = [_reader(console_out_r, out), _reader(err_r, err), _reader(master, host)]
            os.write(go_w, b"x")
            child.wait_started()
            os.write(console_in_w, stdin)
            os.write(master, channel.encode({"type": "stdin-eof", "bytes": len(stdin)}))
            if not select.select([child.pidfd], [], [], RUN_SECONDS)[0]:
                native.pidfd_send_signal(child.pidfd, signal.SIGKILL)
                native.pidfd_wait(child.pidfd, block=True)
                pytest.fail(f"the init did not end in {RUN_SECONDS} s (stdin never ended?): "
                            f"{b''.join(out)!r}")
            info = native.pidfd_wait(child.pidfd, block=True)
            assert info is not None
            for reader in readers[:2]:
                reader.join(timeout=RUN_SECONDS)
    finally:
        for fd in (console_in_r, console_in_w, console_out_w, err_w, slave, go_r, go_w):
            if fd >= 0:
                os.close(fd)
        if child is not None:
            child.close()
        os.close(master)
        os.close(console_out_r)
        os.close(err_r)
    return Result(b"".join(out), b"".join(err), _split_frames(b"".join(host)))


def test_stdin_ends_where_the_host_says_and_stdio_are_pipes(image, tmp_path: Path) -> None:
    script = ("cat; echo; echo after-eof; for fd in 0 1 2; do [ -t $fd ] || echo pipe:$fd; "
              "done; env | sort; echo to-stderr >&2; exit 5")
    result = run_relayed(image, tmp_path, ["sh", "-c", script], STDIN)
    env = ["HOME=/home/user", "HOSTNAME=relayed", "PATH=/bin", "PWD=/", "SHLVL=1"]
    assert result.stdout.decode() == STDIN.decode() + "\nafter-eof\npipe:0\npipe:1\npipe:2\n" + \
        "".join(f"{line}\n" for line in env), result
    assert result.stderr == b"to-stderr\n"
    # (a log frame may come too: the task cgroup is the host's, shared with other tests)
    assert [f["type"] for f in result.frames if f["type"] != "log"] == ["started", "exit"], \
        result.frames
    assert result.frames[-1]["code"] == 5


@pytest.mark.parametrize("command,code,message", [
    (["no-such-command"], 127, "no-such-command: No such file or directory"),
    (["/not-exec"], 126, "/not-exec: Permission denied"),
])
def test_missing_and_not_executable(image, tmp_path: Path, command: list[str], code: int,
                                    message: str) -> None:
    result = run_relayed(image, tmp_path, command, b"")
    assert result.stderr.decode() == f"hostel: cannot run {message}\n"
    assert result.stdout == b"" and result.frames[-1] == {"type": "exit", "code": code}
