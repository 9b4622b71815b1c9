"""An OCI image booted in a VM to its entrypoint: hostel's launcher beside
`qemu-system-x86_64 -M microvm -accel kvm`, inside the lab VM (nested KVM), in
the same run, with the same kernel (Debian's cloud kernel, find_kernel's), the
same initramfs (hostel's, built for that kernel: the static init and its
modules), the same disks (the image's squashfs and the config squashfs that
vmrun.prepare makes), the same command line and the same memory and vCPUs as
hosteld gives a `guest run --isolation=vm` (images_service.vm_guest_settings).
The entrypoint is /bin/true.

Boot to the entrypoint is timed as Firecracker times it: the static init,
asked by launch.json's boot_marker, writes 123 to I/O port 0x3f0 right before
it executes the task (guest-init/bootmarker.h). What each row includes:

- hostel, first KVM_RUN to marker: KvmBackend.first_run_ns, taken in Python
  right before the vCPUs start (the boot vCPU's first KVM_RUN follows within
  microseconds), to the vCPU loop's CLOCK_MONOTONIC at the guest's write
  (bindings/kvm.c): the kernel's boot, the init's module loading, mounts,
  configuration and fork, all inside the guest. Nothing of the launcher's set-up.
- hostel, process start to marker: from just before the bench starts the
  launcher process (python -m hostel.guest.vmlauncher, as hosteld runs it, with
  its channel relay and jail) to the same timestamp: adds the interpreter's
  start, imports, guest memory, kernel and initrd loading, ACPI tables, devices.
- qemu, cont to marker, twice: `-M microvm` as it comes, and `-M
  microvm,rtc=off`, hostel's device set (hostel's FADT says there is no CMOS
  RTC; see QEMU_MACHINES). QEMU starts paused (-S); when its QMP monitor
  answers (board, kernel and initrd loaded), the bench sends `cont` and takes the time
  just before; the marker reaches an isa-debugcon on port 0x3f0 whose output
  (QEMU's stdout, a pipe) the bench reads and timestamps. QEMU's own first
  KVM_RUN is not visible from outside: `cont` is the closest moment, so this
  is the peer of hostel's first-KVM_RUN row (plus a pipe write and a read).
- qemu, process start to marker: from just before the bench starts QEMU to
  the marker: QEMU's set-up (board, devices, kernel and initrd loading), the
  bench's QMP handshake (connect, greeting, qmp_capabilities, answered once the
  main loop runs, i.e. the board is ready: at most one round trip of QEMU
  sitting paused), cont, the boot. A slight overestimate of QEMU's, then.
- process start to exit (both): as above, to the process's end after the
  guest powered off (/bin/true ran, the init sent its exit frame, synced,
  powered off).
- hostelctl guest run --isolation=vm -- /bin/true: the whole command as a user
  runs it, against a hosteld on a private bus, with the image imported before:
  the client's start, StartGuest, the config disk (mksquashfs), the launcher
  started through the spawn trampoline, the boot, the payload, the exit frame
  on the channel, the end of the guest and the client's exit. The initramfs is
  already in the cache (the same key as the direct runs'). No marker (hosteld
  never asks for one). Beside it --isolation=container for reference.

Nested under TCG, absolute times are 10-100x a real host's; the ratios are
the numbers to read (issue 14: hostel's boot to entrypoint <= 0.8x QEMU's)."""
from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from io import BufferedIOBase
from pathlib import Path

from guest_boot import REPO, TIMEOUT, in_lab

sys.path.insert(0, str(REPO / "tests"))

RUNS = 3
HOST_RUNS = 5
MARKER = bytes([123])
MARKER_PORT = "0x3f0"
IMAGE_NAME = "bench-image-boot"
QEMU_CPU = "host"
# QEMU's microvm as it comes (an RTC at 0x70, which Linux's rtc_cmos probes: in a
# diagnostic lab boot with the kernel's log on ttyS0 that probe took ~41 s, a soft
# lockup, then "broken or not accessible"), and with hostel's device set: no RTC
# (hostel's FADT says none). Quiet, as here, the two took about as long.
QEMU_MACHINES = {"qemu -M microvm": "microvm", "qemu -M microvm,rtc=off": "microvm,rtc=off"}
# This host's PVM refuses the MSR QEMU sets for -cpu host's ARCH_CAPABILITIES.
QEMU_CPU_HERE = "host,-arch-capabilities"
# The launcher as hosteld starts it (vmlauncher: relay, jail), wrapped to print
# when its vCPUs started and when the guest wrote the boot marker (read from
# KvmBackend before the launcher closes it)...
BOOT_PROBE = """import sys
from hostel.guest import launcher, vmlauncher
real_run = launcher.Launcher.run
def run(self):
    try:
        return real_run(self)
    finally:
        print(f"boot-times {self.backend.first_run_ns} {self.backend.boot_marker_ns}",
              file=sys.stderr, flush=True)
launcher.Launcher.run = run
sys.exit(vmlauncher.main(sys.argv[1:]))
"""
# ... or to print the moment it would start the vCPUs, and end there.
SETUP_PROBE = """import os, sys, time
from hostel.guest import kvm, vmlauncher
def run(self, *args):
    print(f"setup-done {time.monotonic_ns()}", file=sys.stderr, flush=True)
    os._exit(0)
kvm.KvmBackend.run = run
sys.exit(vmlauncher.main(sys.argv[1:]))
"""


@dataclass(frozen=True)
class Plan:
    """One VM, for both VMMs: the launcher's settings and what QEMU needs of them."""

    settings_json: str
    kernel: Path
    initrd: Path
    cmdline: str
    disks: tuple[Path, ...]
    memory_mb: int
    cpus: int


def ms(ns: int) -> float:
    return ns / 1e6


def _image_archive(work: Path) -> Path:
    from unit.test_guest_images import busybox_layer, docker_archive, image_config

    layers = [busybox_layer(("sh", "true")).tar()]
    return docker_archive(work / "image.tar", layers, image_config(layers))


def make_plan(work: Path, archive: Path) -> Plan:
    """vmrun.prepare for /bin/true with the marker asked for, and hosteld's settings."""
    from hostel.guest import vmrun
    from hostel.guest.images import ImageStore
    from hostel.guest.images_service import VmOptions, vm_guest_settings
    from hostel.guest.launcher import settings_to_json
    from hostel.guest.launchconfig import LaunchRequest

    image = ImageStore(work / "images").import_archive(str(archive), IMAGE_NAME)
    request = LaunchRequest(command=["/bin/true"], isolation="vm", boot_marker=True)
    vm = vmrun.prepare(image, request, work / "run")   # the initramfs cache hosteld uses
    settings = vm_guest_settings(vm, VmOptions())
    return Plan(settings_to_json(settings), settings.kernel, vm.initrd, settings.cmdline,
                vm.disks, settings.memory_mb, settings.cpus)


@dataclass
class Launched:
    started: int       # monotonic ns, just before the process started
    ended: int         # ... and once it was gone
    status: int
    stderr: str

    def times(self, tag: str) -> list[int]:
        """The numbers on the probe's line `tag N...` ("None" when there is none)."""
        for line in self.stderr.splitlines():
            if line.startswith(tag + " "):
                return [int(v) if v.isdigit() else 0 for v in line.split()[1:]]
        return []


def launch(plan: Plan, work: Path, probe: str) -> Launched:
    """The launcher with its two named ports (channel, stderr) on files, as hosteld's pipes."""
    from hostel.guest import vmrun
    from hostel.guest.vmlauncher import ports_to_json

    channel = os.open(work / "hostel-channel.out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    errors = os.open(work / "hostel-stderr.out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    ports = ports_to_json([(vmrun.CHANNEL_PORT, channel), (vmrun.STDERR_PORT, errors)])
    started = time.monotonic_ns()
    child = subprocess.Popen([sys.executable, "-c", probe, plan.settings_json,
                              str(work / "hostel.exit"), ports, vmrun.CHANNEL_PORT],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, pass_fds=(channel, errors))
    os.close(channel)
    os.close(errors)
    try:
        _out, err = child.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        child.kill()
        _out, err = child.communicate()
    return Launched(started, time.monotonic_ns(), child.returncode, err.decode(errors="replace"))


def hostel_boot(plan: Plan, work: Path) -> dict[str, float]:
    run = launch(plan, work, BOOT_PROBE)
    times = run.times("boot-times")
    if run.status != 0 or len(times) != 2 or not times[1]:
        exit_file = work / "hostel.exit"
        raise RuntimeError(f"hostel's guest did not reach its marker and end (status "
                           f"{run.status}); launcher's stderr:\n{run.stderr[-2000:]}\nexit: "
                           f"{exit_file.read_text() if exit_file.exists() else ''}")
    first_run, marker = times
    return {"first KVM_RUN to marker": ms(marker - first_run),
            "process start to marker": ms(marker - run.started),
            "process start to exit": ms(run.ended - run.started)}


def hostel_setup(plan: Plan, work: Path) -> float:
    """Process start to the moment the vCPUs would start (no boot: this host's PVM
    cannot boot the cloud kernel), in ms."""
    run = launch(plan, work, SETUP_PROBE)
    times = run.times("setup-done")
    if not times:
        raise RuntimeError(f"hostel's launcher did not get to its vCPUs (status {run.status}):\n"
                           f"{run.stderr[-2000:]}")
    return ms(times[0] - run.started)


def qemu_command(plan: Plan, work: Path, qmp: Path, cpu: str = QEMU_CPU,
                 machine: str = "microvm") -> list[str]:
    """microvm with its virtio-mmio devices described by ACPI (its default), started
    paused: the disks as hostel attaches them (read-only, in order, the host page
    cache, a thread pool), one virtio-serial device with the console and the two
    named ports the init opens (on files), and the marker port as an isa-debugcon
    on stdout."""
    from hostel.guest import vmrun

    command = ["qemu-system-x86_64", "-M", machine, "-accel", "kvm", "-cpu", cpu,
               "-m", str(plan.memory_mb), "-smp", str(plan.cpus), "-nodefaults",
               "-no-user-config", "-display", "none", "-no-reboot", "-S",
               "-qmp", f"unix:{qmp},server=on,wait=on",
               "-kernel", str(plan.kernel), "-initrd", str(plan.initrd),
               "-append", plan.cmdline]
    for number, disk in enumerate(plan.disks):
        command += ["-drive", f"id=disk{number},file={disk},format=raw,if=none,readonly=on,"
                              "cache=writeback,aio=threads",
                    "-device", f"virtio-blk-device,drive=disk{number}"]
    command += ["-device", "virtio-serial-device,max_ports=3"]
    for number, (name, port) in enumerate((("console", None), ("channel", vmrun.CHANNEL_PORT),
                                            ("errors", vmrun.STDERR_PORT))):
        command += ["-chardev", f"file,id={name},path={work / f'qemu-{name}.out'}",
                    "-device", f"virtconsole,chardev={name},nr=0" if port is None else
                    f"virtserialport,chardev={name},name={port},nr={number}"]
    return command + ["-chardev", "stdio,id=marker,signal=off",
                      "-device", f"isa-debugcon,iobase={MARKER_PORT},chardev=marker"]


def _connect(path: Path, child: subprocess.Popen[bytes], deadline: float) -> socket.socket:
    """QEMU's QMP socket, as soon as it listens (wait=on: QEMU waits for us there)."""
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
        if child.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"QEMU never listened on {path} (status {child.poll()})")
        time.sleep(0.001)


def _qmp(stream: BufferedIOBase, command: str) -> None:
    """Send one command and read up to its answer (events before it are skipped)."""
    stream.write(json.dumps({"execute": command}).encode() + b"\n")
    stream.flush()
    for line in iter(stream.readline, b""):
        reply = json.loads(line)
        if "return" in reply:
            return
        if "error" in reply:
            raise RuntimeError(f"QMP {command}: {reply['error']}")
    raise RuntimeError(f"QEMU closed QMP before answering {command}")


def _read_marker(fd: int, deadline: float) -> bytes:
    """The debugcon's first byte; b"" when QEMU ended without one or the deadline passed."""
    if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
        return b""
    return os.read(fd, 1)


@contextlib.contextmanager
def paused_qemu(plan: Plan, work: Path, cpu: str, machine: str = "microvm"
                ) -> Iterator[tuple[subprocess.Popen[bytes], BufferedIOBase, int]]:
    """QEMU started paused, its QMP past qmp_capabilities (answered from the main loop,
    so the board, kernel and initrd are ready): the process, its QMP, its start (ns)."""
    qmp = work / "qmp.sock"
    qmp.unlink(missing_ok=True)
    started = time.monotonic_ns()
    child = subprocess.Popen(qemu_command(plan, work, qmp, cpu, machine), stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        with _connect(qmp, child, time.monotonic() + TIMEOUT) as sock, \
                sock.makefile("rwb") as stream:
            stream.readline()                 # the greeting
            _qmp(stream, "qmp_capabilities")
            yield child, stream, started
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def qemu_boot(plan: Plan, work: Path, machine: str) -> dict[str, float]:
    with paused_qemu(plan, work, QEMU_CPU, machine) as (child, stream, started):
        cont = time.monotonic_ns()
        _qmp(stream, "cont")
        assert child.stdout is not None and child.stderr is not None
        seen = _read_marker(child.stdout.fileno(), time.monotonic() + TIMEOUT)
        marker = time.monotonic_ns()
        status = child.wait(TIMEOUT)
        ended = time.monotonic_ns()
        if seen != MARKER or status != 0:
            raise RuntimeError(f"QEMU's guest did not reach its marker ({seen!r}) and power "
                               f"off (status {status}): {child.stderr.read().decode()[-2000:]}")
    return {"cont to marker": ms(marker - cont),
            "process start to marker": ms(marker - started),
            "process start to exit": ms(ended - started)}


def qemu_setup(plan: Plan, work: Path) -> float:
    """Process start to QMP's answer, paused and ready to run, in ms; then quit."""
    with paused_qemu(plan, work, QEMU_CPU_HERE) as (child, stream, started):
        ready = time.monotonic_ns()
        _qmp(stream, "quit")
        child.wait(TIMEOUT)
    return ms(ready - started)


@contextlib.contextmanager
def hosteld_with_image(archive: Path, work: Path) -> Iterator[dict[str, str]]:
    """A hosteld on a private bus with the image imported: the clients' environment."""
    from hostel.privatebus import PrivateBus, start_daemon

    bus = PrivateBus(work / "bus").start()
    daemon = start_daemon(bus, work / "hosteld")
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=bus.address)
    try:
        subprocess.run([str(REPO / ".venv/bin/hostelctl"), "image", "import", str(archive),
                        "--name", IMAGE_NAME], env=env, check=True, capture_output=True,
                       timeout=TIMEOUT)
        yield env
    except (subprocess.SubprocessError, RuntimeError) as e:
        raise RuntimeError(f"{e}\nhosteld's log:\n{daemon.log()[-2000:]}") from e
    finally:
        daemon.stop()
        bus.stop()


def hostelctl_run(env: dict[str, str], isolation: str) -> float:
    """`hostelctl guest run --isolation=ISOLATION --image IMG -- /bin/true`, wall ms."""
    started = time.monotonic_ns()
    done = subprocess.run([str(REPO / ".venv/bin/hostelctl"), "guest", "run", "--quiet",
                           f"--isolation={isolation}", "--image", IMAGE_NAME, "--", "/bin/true"],
                          env=env, capture_output=True, stdin=subprocess.DEVNULL, timeout=TIMEOUT)
    wall = ms(time.monotonic_ns() - started)
    if done.returncode != 0:
        raise RuntimeError(f"guest run --isolation={isolation} failed: "
                           f"{done.stderr.decode()[-1000:]}")
    return wall


def _row(what: str, runs: list[float]) -> dict[str, object]:
    return {"bench": "image_boot", "what": what, "median_ms": round(statistics.median(runs), 1),
            "runs_ms": [round(r, 1) for r in runs]}


def _ratio(what: str, ours: list[float], theirs: list[float]) -> dict[str, object]:
    return {"bench": "image_boot", "what": what,
            "median": round(statistics.median(ours) / statistics.median(theirs), 2)}


def _column(runs: list[dict[str, float]], key: str) -> list[float]:
    return [r[key] for r in runs]


def inside() -> list[dict[str, object]]:
    """Runs in the lab: RUNS rounds of hostel, each QEMU, then hostelctl's VM and
    container runs, interleaved so that each round meets the same load on the host."""
    work = Path(tempfile.mkdtemp(prefix="image-boot-"))
    work.chmod(0o755)   # as /run/hostel: the jailed launcher and containers' users pass through
    archive = _image_archive(work)
    plan = make_plan(work, archive)   # builds the initramfs hosteld's runs find in the cache
    hostel_runs: list[dict[str, float]] = []
    qemu_runs: dict[str, list[dict[str, float]]] = {name: [] for name in QEMU_MACHINES}
    walls: dict[str, list[float]] = {"vm": [], "container": []}
    with hosteld_with_image(archive, work) as env:
        for _ in range(RUNS):
            hostel_runs.append(hostel_boot(plan, work))
            for name, machine in QEMU_MACHINES.items():
                qemu_runs[name].append(qemu_boot(plan, work, machine))
            for isolation, runs in walls.items():
                runs.append(hostelctl_run(env, isolation))
    keys = (("first KVM_RUN to marker", "cont to marker", "boot to entrypoint"),
            ("process start to marker", "process start to marker", "process start to marker"),
            ("process start to exit", "process start to exit", "process start to exit"))
    rows = []
    for ours_key, theirs_key, what in keys:
        ours = _column(hostel_runs, ours_key)
        rows.append(_row(f"hostel launcher, {ours_key}", ours))
        for name, boots in qemu_runs.items():
            theirs = _column(boots, theirs_key)
            rows += [_row(f"{name}, {theirs_key}", theirs),
                     _ratio(f"ratio hostel/{name}, {what}", ours, theirs)]
    return rows + [
        _row("hostelctl guest run --isolation=vm -- /bin/true, wall", walls["vm"]),
        _row("hostelctl guest run --isolation=container -- /bin/true, wall (reference)",
             walls["container"]),
        *(_ratio(f"ratio hostelctl guest run vm / {name} process start to exit", walls["vm"],
                 _column(boots, "process start to exit")) for name, boots in qemu_runs.items()),
    ]


def on_this_host() -> list[dict[str, object]]:
    """What this host's real CPU says of each VMM's own set-up (its PVM cannot boot the
    cloud kernel, but both VMMs get as far as their first KVM_RUN): the launcher's
    process start to its vCPUs' start, QEMU's process start to paused and ready."""
    work = Path(tempfile.mkdtemp(prefix="image-boot-host-"))
    work.chmod(0o755)
    plan = make_plan(work, _image_archive(work))
    hostel, qemu = [], []
    for _ in range(HOST_RUNS):
        hostel.append(hostel_setup(plan, work))
        qemu.append(qemu_setup(plan, work))
    return [_row("this host (no nesting): hostel launcher, process start to first KVM_RUN",
                 hostel),
            _row("this host (no nesting): qemu -M microvm, process start to ready "
                 "(paused, QMP answered)", qemu),
            _ratio("this host: ratio hostel/qemu, VMM set-up", hostel, qemu)]


def run() -> list[dict[str, object]]:
    """From `bench/run.py image_boot`: this host's set-up rows, then one lab boot running
    inside(), with this host's load around it (other labs share its two cores)."""
    rows = on_this_host()
    before = os.getloadavg()[0]
    rows += in_lab("image_boot.py")
    return rows + [{"bench": "image_boot", "what": "this host's 1-minute load average, "
                    "before and after the lab run", "before": round(before, 1),
                    "after": round(os.getloadavg()[0], 1)}]


if __name__ == "__main__":
    if sys.argv[1:] == ["--inside"]:
        print(json.dumps(inside()))
    else:
        print(json.dumps(run(), indent=1))
