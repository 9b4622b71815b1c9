"""hostel.guest.init as PID 1 in a throwaway set of namespaces standing in for the VM.

Real squashfs images on loop devices as the image and config devices, a real
veth pair for the network, a FIFO as the channel, a pty as the console."""
from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path
from typing import Iterator

import pytest
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from hostel import native
from hostel.guest import channel
from hostel.guest.images import ImageStore, make_squashfs
from hostel.guest.init import TASK_CGROUP
from hostel.guest.launchconfig import LaunchRequest, NetworkConfig
from hostel.machine.loop import LoopDevice
from hostel.spawn import Plan, spawn
from unit.test_guest_images import busybox_layer, docker_archive, mounted_squashfs

NAMESPACES = native.CLONE_NEWPID | native.CLONE_NEWNS | native.CLONE_NEWNET | native.CLONE_NEWUTS
HOST_LINK, GUEST_LINK = "hgi-host0", "hgi-guest0"
SCRIPT = """
echo "out:$GREETING"
echo "host:$(hostname)"
echo "home:$HOME cwd:$(pwd)"
echo "ctty:$(cut -d' ' -f7 /proc/self/stat)"
ip -4 addr show {link}; ip -6 addr show {link}; ip route; ip -6 route
cat /etc/resolv.conf
echo data > /written; echo "read:$(cat /written)"
grep " / " /proc/mounts
(sleep 0.2 &)
sleep 0.8
echo "zombies:$(cat /proc/[0-9]*/status | grep -c '^State:.*Z')"
ping -c1 -W3 10.77.0.1 >/dev/null && echo ping:ok
setsid sleep 100 &
exit 7
""".format(link=GUEST_LINK)


@pytest.fixture
def veth() -> Iterator[IPRoute]:
    ipr = IPRoute()
    ipr.link("add", ifname=HOST_LINK, kind="veth", peer=GUEST_LINK)
    try:
        index = ipr.link_lookup(ifname=HOST_LINK)[0]
        ipr.addr("add", index=index, address="10.77.0.1", prefixlen=24)
        ipr.addr("add", index=index, address="fd77::1", prefixlen=64)
        ipr.link("set", index=index, state="up")
        yield ipr
    finally:
        try:
            ipr.link("del", ifname=HOST_LINK)
        except NetlinkError as e:
            if e.code != errno.ENODEV:   # the guest's end died with its namespace
                raise
        ipr.close()


@pytest.fixture(scope="module")
def busybox_image(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("guest-init")
    archive = docker_archive(base / "busybox.tar", [busybox_layer().tar()])
    return ImageStore(base / "images").import_archive(str(archive), "busybox")


def _config_squashfs(where: Path, image_config: Path, launch: LaunchRequest) -> Path:
    tree = where / "config-tree"
    (tree / "image").mkdir(parents=True)
    (tree / "image/config.json").write_bytes(image_config.read_bytes())
    (tree / "launch.json").write_text(launch.to_json())
    make_squashfs(str(tree), str(where / "config.squashfs"))
    return where / "config.squashfs"


def _read_all(fd: int) -> bytes:
    data = b""
    while True:
        try:
            part = os.read(fd, 65536)
        except OSError as e:
            if e.errno in (errno.EIO, errno.EAGAIN):   # pty closed / FIFO drained
                return data
            raise
        if not part:
            return data
        data += part


def _frames(fd: int) -> list[dict]:
    os.set_blocking(fd, True)
    frames = []
    while (frame := channel.read_frame(fd)) is not None:
        frames.append(frame)
    return frames


def test_guest_init_runs_the_image_as_pid1(busybox_image, veth: IPRoute, tmp_path: Path) -> None:
    launch = LaunchRequest(
        command=["sh", "-c", SCRIPT], env={"GREETING": "hello guest"}, hostname="guest-one",
        network=NetworkConfig(GUEST_LINK, "10.77.0.2/24", "10.77.0.1", "fd77::2/64", "fd77::1",
                              ("10.77.0.1",)), isolation="vm")
    config = _config_squashfs(tmp_path, busybox_image.config_path, launch)
    fifo = tmp_path / "channel"
    os.mkfifo(fifo)
    work = tmp_path / "work"
    work.mkdir()
    frames_fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    master, slave = os.openpty()
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    child = None
    try:
        with LoopDevice(str(busybox_image.squashfs), read_only=True) as image_loop, \
                LoopDevice(str(config), read_only=True) as config_loop:
            plan = Plan()
            plan.wait_for_parent(go_r, "the veth is moved in")
            for target in (0, 1, 2):
                plan.dup2(slave, target)
            plan.execve(sys.executable, [
                sys.executable, "-m", "hostel.guest.init", "--image-device", image_loop.device,
                "--config-device", config_loop.device, "--channel", str(fifo), "--console", "-",
                "--work-dir", str(work)], ["PATH=/usr/bin:/bin"])
            child = spawn(plan, NAMESPACES)
            os.close(slave)
            slave = -1
            veth.link("set", index=veth.link_lookup(ifname=GUEST_LINK)[0], net_ns_pid=child.pid)
            os.write(go_w, b"x")
            child.wait_started()
            info = native.pidfd_wait(child.pidfd, block=True)
            output = _read_all(master).decode(errors="replace").replace("\r\n", "\n")
            frames = _frames(frames_fd)
    finally:
        for fd in (frames_fd, master, go_r, go_w, slave):
            if fd >= 0:
                os.close(fd)
        if child is not None:
            child.close()

    assert frames and frames[0]["type"] == "started" and frames[-1] == {"type": "exit", "code": 7}, \
        (frames, output)
    assert not [f for f in frames if f["type"] == "log"], frames
    assert not info.exited and info.status == 2, f"init {info.describe()}, not powered off (SIGINT)"
    assert "out:hello guest" in output and "host:guest-one" in output, output
    assert "home:/root cwd:/" in output
    assert "ctty:" in output and "ctty:0\n" not in output, "the console is not the controlling tty"
    assert "inet 10.77.0.2/24" in output and "inet6 fd77::2/64" in output, output
    assert "default via 10.77.0.1 dev " + GUEST_LINK in output
    assert "default via fd77::1 dev " + GUEST_LINK in output
    assert "nameserver 10.77.0.1" in output
    assert "read:data" in output and "overlay / overlay ro" not in output
    assert any(line.startswith("overlayfs:") and " / overlay rw" in line
               for line in output.splitlines()), output
    assert "zombies:0" in output and "ping:ok" in output, output
    with mounted_squashfs(busybox_image.squashfs, tmp_path / "check") as root:
        assert not (root / "written").exists()   # the write went to the tmpfs upper
    assert not os.path.exists(f"/sys/fs/cgroup/unified/{TASK_CGROUP}")
    assert not any(m.startswith(str(work)) for m in _mount_points())


def _mount_points() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f]


def test_guest_init_reports_a_missing_command(busybox_image, tmp_path: Path) -> None:
    launch = LaunchRequest(command=["no-such-command"])
    config = _config_squashfs(tmp_path, busybox_image.config_path, launch)
    fifo = tmp_path / "channel"
    os.mkfifo(fifo)
    (tmp_path / "work").mkdir()
    frames_fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    out_r, out_w = os.pipe()
    try:
        with LoopDevice(str(busybox_image.squashfs), read_only=True) as image_loop, \
                LoopDevice(str(config), read_only=True) as config_loop:
            plan = Plan()
            for target in (1, 2):
                plan.dup2(out_w, target)
            plan.execve(sys.executable, [
                sys.executable, "-m", "hostel.guest.init", "--image-device", image_loop.device,
                "--config-device", config_loop.device, "--channel", str(fifo), "--console", "-",
                "--work-dir", str(tmp_path / "work")], ["PATH=/usr/bin:/bin"])
            child = spawn(plan, NAMESPACES)
            os.close(out_w)
            out_w = -1
            try:
                child.wait_started()
                native.pidfd_wait(child.pidfd, block=True)
            finally:
                child.close()
            output = _read_all(out_r).decode()
            frames = _frames(frames_fd)
    finally:
        for fd in (frames_fd, out_r, out_w):
            if fd >= 0:
                os.close(fd)
    assert frames[-1] == {"type": "exit", "code": 127}, frames
    assert "cannot run no-such-command" in output, output
    assert json.loads(json.dumps(frames))  # every frame is plain JSON
