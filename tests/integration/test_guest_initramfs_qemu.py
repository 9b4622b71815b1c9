"""hostel's initramfs and static init boot Debian's cloud kernel for real, under QEMU.

QEMU's microvm (TCG: this host's KVM cannot run stock kernels) gives the
guest what hostel.guest.vmrun tells a launcher to give it: ACPI-announced virtio-mmio devices, the
image and config squashfs as virtio-blk disks, a virtio-console whose port 0
is the console and whose port named hostel.channel carries the frames. The
kernel loads nothing itself: every driver the guest uses comes from the
initramfs's modules, loaded by the init, so a wrong module set or order shows
up as a guest that never reaches its task."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hostel.guest import channel, initramfs, vmrun
from hostel.guest.images import ImageStore
from hostel.guest.launchconfig import LaunchRequest, NetworkConfig
from unit.test_guest_images import PATH, busybox_layer, docker_archive, image_config

REPO = Path(__file__).resolve().parents[2]
TAP = "hgqtap0"
# microvm has no HPET or ACPI PM timer, and under TCG on a loaded host the
# TSC's calibration against the PIT can fail, after which the kernel hangs:
# give it a frequency instead (how precise does not matter here).
NO_CALIBRATION = "tsc_early_khz=2000000"
BOOT_TIMEOUT = 240   # TCG on two shared cores: ~10 s when the machine is idle
SCRIPT = "; ".join((
    "echo task:hello", "echo task:to-stderr >&2", "id", "hostname", "echo env:$FROM_IMAGE:$FROM_REQUEST",
    "grep ' / ' /proc/mounts", "echo links:$(ls /sys/class/net | tr '\\n' ,)",
    "echo loaded:$(cut -d' ' -f1 /proc/modules | sort | tr '\\n' ,)", "exit 42"))


def _frames(data: bytes) -> list[dict]:
    frames = []
    while data:
        length = int.from_bytes(data[:4], "big")
        frames.append(channel.decode(data[4:4 + length]))
        data = data[4 + length:]
    return frames


@dataclass(frozen=True)
class Boot:
    frames: list[dict]
    output: str        # the console: the task's stdout
    kernel_log: str
    errors: str = ""   # the port named vmrun.STDERR_PORT: the task's stderr


def boot(tmp_path: Path, launch: LaunchRequest, extra: tuple[str, ...] = (),
         prefix: tuple[str, ...] = (), initrd: Path | None = None,
         stdin: str | None = None) -> Boot:
    """One VM from hostel.guest.vmrun's plan, run to its power-off.

    The console goes to a file, or with `stdin` to QEMU's stdio, which feeds
    the guest's hvc0 that text."""
    subprocess.run(["make", "-s", "-C", str(REPO / "guest-init")], check=True)
    layers = [busybox_layer().tar()]
    config = image_config(layers, Env=[f"PATH={PATH}", "FROM_IMAGE=image"])
    archive = docker_archive(tmp_path / "image.tar", layers, config)
    image = ImageStore(tmp_path / "images").import_archive(str(archive), "busybox")
    run = vmrun.prepare(image, launch, tmp_path / "run", cache=tmp_path / "initramfs",
                        extra=("console=ttyS0", NO_CALIBRATION))
    image_disk, config_disk = run.disks

    console, chan, log = tmp_path / "console.out", tmp_path / "channel.out", tmp_path / "kernel.log"
    errors = tmp_path / "stderr.out"
    argv = [
        *prefix, "qemu-system-x86_64", "-M", "microvm,acpi=on,accel=tcg,pit=on,pic=on,rtc=on",
        "-cpu", "max", "-m", "256", "-smp", "1", "-nodefaults", "-no-user-config",
        "-display", "none", "-no-reboot",
        "-kernel", str(run.kernel), "-initrd", str(initrd or run.initrd), "-append", run.cmdline,
        "-serial", f"file:{log}",
        "-drive", f"id=image,file={image_disk},format=raw,if=none,readonly=on",
        "-device", "virtio-blk-device,drive=image",
        "-drive", f"id=config,file={config_disk},format=raw,if=none,readonly=on",
        "-device", "virtio-blk-device,drive=config",
        "-device", "virtio-serial-device,max_ports=3",
        "-chardev", f"file,id=console,path={console}" if stdin is None else
        "stdio,id=console,signal=off",
        "-device", "virtconsole,chardev=console,nr=0",
        "-chardev", f"file,id=channel,path={chan}",
        "-device", f"virtserialport,chardev=channel,name={run.channel_port},nr=1",
        "-chardev", f"file,id=errors,path={errors}",
        "-device", f"virtserialport,chardev=errors,name={vmrun.STDERR_PORT},nr=2", *extra,
    ]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=BOOT_TIMEOUT,
                                input=stdin)
    except subprocess.TimeoutExpired:   # run() has killed QEMU
        result = None
    kernel_log = log.read_text(errors="replace") if log.exists() else ""
    if result is None:
        pytest.fail(f"the guest did not power off in {BOOT_TIMEOUT} s; kernel log ends:\n"
                    f"{kernel_log[-3000:]}")
    output = result.stdout if stdin is not None else \
        console.read_text(errors="replace") if console.exists() else ""
    output = output.replace("\r\n", "\n")
    assert result.returncode == 0, (result.stderr, kernel_log[-3000:])
    assert "reboot: Power down" in kernel_log, kernel_log[-3000:]
    return Boot(_frames(chan.read_bytes()) if chan.exists() else [], output, kernel_log,
                errors.read_text(errors="replace") if errors.exists() else "")


@pytest.mark.slow
def test_cloud_kernel_boots_the_initramfs_and_runs_the_task(tmp_path: Path) -> None:
    run = boot(tmp_path, LaunchRequest(command=["sh", "-c", SCRIPT],
                                       env={"FROM_REQUEST": "request"}, hostname="qemu-guest",
                                       isolation="vm"))
    output = run.output
    assert [f["type"] for f in run.frames] == ["started", "exit"], (run.frames, output,
                                                                   run.kernel_log[-3000:])
    assert run.frames[-1] == {"type": "exit", "code": 42}
    assert output.startswith("task:hello\n"), "the console carries more than the task: " + output
    assert run.errors == "task:to-stderr\n" and "to-stderr" not in output, (run.errors, output)
    assert "uid=0(root) gid=0(root)" in output, output
    assert "qemu-guest" in output and "env:image:request" in output, output
    assert "overlayfs:/overlay / overlay rw" in output, output
    assert "links:lo,\n" in output, "without a network only loopback: " + output
    loaded = next(line for line in output.splitlines() if line.startswith("loaded:"))
    assert set(loaded[len("loaded:"):].rstrip(",").split(",")) == {
        "virtio_mmio", "virtio_blk", "virtio_console", "squashfs", "overlay", "virtio_net",
        "virtio_rng", "virtio", "virtio_ring", "net_failover", "failover"}, loaded


@contextlib.contextmanager
def tap_namespace() -> Iterator[str]:
    """A throwaway network namespace holding a tap device with the host's end of the link."""
    name = f"hgq-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for command in (["ip", "tuntap", "add", "dev", TAP, "mode", "tap"],
                        ["ip", "addr", "add", "10.79.0.1/24", "dev", TAP],
                        ["ip", "link", "set", TAP, "up"]):
            subprocess.run(["ip", "netns", "exec", name, *command], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


@pytest.mark.slow
def test_the_guest_network_reaches_the_host_end(tmp_path: Path) -> None:
    network = NetworkConfig("eth0", "10.79.0.2/24", "10.79.0.1", nameservers=("10.79.0.1",))
    script = ("ip -o -4 addr show eth0; ip route; cat /etc/resolv.conf; "
              "ping -c1 -W10 10.79.0.1 >/dev/null && echo ping:ok")
    with tap_namespace() as namespace:
        run = boot(tmp_path, LaunchRequest(command=["sh", "-c", script], network=network,
                                           isolation="vm"),
                   extra=("-netdev", f"tap,id=net,ifname={TAP},script=no,downscript=no",
                          "-device", "virtio-net-device,netdev=net"),
                   prefix=("ip", "netns", "exec", namespace))
    assert run.frames[-1] == {"type": "exit", "code": 0}, (run.frames, run.output)
    assert [f for f in run.frames if f["type"] == "log"] == [], run.frames   # GSO/TSO off worked
    assert "inet 10.79.0.2/24" in run.output and "default via 10.79.0.1 dev eth0" in run.output
    assert "nameserver 10.79.0.1" in run.output and "ping:ok" in run.output, run.output


@pytest.mark.slow
def test_a_module_that_fails_to_load_is_reported_on_the_channel(tmp_path: Path) -> None:
    """The other modules still load, so the failure reaches the host as an error frame."""
    subprocess.run(["make", "-s", "-C", str(REPO / "guest-init")], check=True)
    kernel = initramfs.find_kernel()
    modules = initramfs.resolve_modules(kernel, initramfs.check_kernel(kernel))
    broken = [dataclasses.replace(m, data=b"\x7fELF not a module") if m.name == "overlay" else m
              for m in modules]
    initrd = tmp_path / "broken.cpio"
    initrd.write_bytes(initramfs.cpio_newc(initramfs.initramfs_entries(
        initramfs.DEFAULT_INIT.read_bytes(), broken)))
    run = boot(tmp_path, LaunchRequest(command=["true"], isolation="vm"), initrd=initrd)
    assert [f["type"] for f in run.frames] == ["log", "exit"], (run.frames, run.kernel_log[-3000:])
    assert run.frames[0]["level"] == "error", run.frames
    assert "loading module /lib/modules/hostel/" in run.frames[0]["message"], run.frames
    assert "-overlay.ko" in run.frames[0]["message"], run.frames
    assert run.frames[1] == {"type": "exit", "code": 126}


@pytest.mark.slow
def test_stdin_reaches_the_task(tmp_path: Path) -> None:
    run = boot(tmp_path, LaunchRequest(command=["sh", "-c", "read line; echo got:$line"],
                                       isolation="vm"), stdin="hello from the host\n")
    assert run.frames[-1] == {"type": "exit", "code": 0}, (run.frames, run.output)
    assert "got:hello from the host\n" in run.output, run.output
