"""Linux guest boot: Debian's cloud kernel and one initramfs booted to its /init's
marker by hostel's launcher and by `qemu-system-x86_64 -M microvm -accel kvm`,
side by side, inside the lab VM (nested KVM: this host's PVM cannot boot a
stock kernel).

Rows: hostel from the first KVM_RUN to the marker (how Firecracker measures
boot), hostel from the launcher's process start to the marker, and QEMU from
its process start to the marker (QEMU's first KVM_RUN is not visible from
outside). Each guest powers off right after the marker; QEMU is killed if it
does not. Nested under TCG, absolute times are ~10x a real host's; the ratio
is the number to read (DESIGN.md: hostel <= 0.8x QEMU)."""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))

RUNS = 3
CMDLINE = "console=ttyS0 quiet panic=-1"
TIMEOUT = 180.0
# The whole lab run: six nested boots and their reads took 600-840 s on this
# 2-core host shared with other labs (the tests' 540 s default is too short).
LAB_TIMEOUT = 1500.0


@dataclass(frozen=True)
class Boot:
    """One guest to boot: what it runs, and what on its console ends the watch."""

    kernel: Path
    initrd: Path
    marker: bytes
    disk: Path | None = None          # a read-only virtio-blk disk
    cmdline: str = CMDLINE
    end: bytes | None = None          # read the console until this (None: the marker)


@dataclass
class Console:
    text: str
    marker_at: float | None           # monotonic time the marker showed


def _read_console(stream: int, boot: Boot, deadline: float) -> Console:
    """Read `stream` until boot.end (or the marker) shows, or it ends, or the deadline."""
    seen, marker_at = b"", None
    stop = boot.end or boot.marker
    while time.monotonic() < deadline:
        chunk = os.read(stream, 65536)
        if not chunk:
            break
        seen += chunk
        if marker_at is None and boot.marker in seen:
            marker_at = time.monotonic()
        if stop in seen:
            break
    return Console(seen.decode(errors="replace"), marker_at)


def hostel_boot(boot: Boot) -> tuple[dict[str, float], Console]:
    """The launcher in its own process, as hosteld runs it; the first KVM_RUN is
    the moment Launcher.run starts, which the child reports on stderr."""
    from hostel.guest.settings import BlockSpec, GuestSettings
    from hostel.guest.launcher import settings_to_json

    disks = (BlockSpec(boot.disk, read_only=True),) if boot.disk else ()
    settings = GuestSettings(memory_mb=256, kernel=boot.kernel, initrd=boot.initrd,
                             cmdline=boot.cmdline, block=disks)
    probe = ("import sys, time\n"
             "from hostel.guest import launcher\n"
             "real_run = launcher.Launcher.run\n"
             "def run(self):\n"
             "    print(f'first-kvm-run {time.monotonic()}', file=sys.stderr, flush=True)\n"
             "    return real_run(self)\n"
             "launcher.Launcher.run = run\n"
             "sys.exit(launcher.main(sys.argv[1:]))\n")
    exit_file = Path(tempfile.mkdtemp()) / "exit"
    started = time.monotonic()
    child = subprocess.Popen([sys.executable, "-c", probe, settings_to_json(settings), str(exit_file)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        console = _read_console(child.stdout.fileno(), boot, started + TIMEOUT)
        child.wait(TIMEOUT)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    first_run = next(float(line.split()[1]) for line in child.stderr.read().decode().splitlines()
                     if line.startswith("first-kvm-run"))
    shutil.rmtree(exit_file.parent)
    at = console.marker_at
    if at is None:
        raise RuntimeError(f"hostel's guest never reached its marker:\n{console.text[-2000:]}")
    return {"first KVM_RUN to marker": at - first_run, "process start to marker": at - started}, console


def qemu_command(boot: Boot) -> list[str]:
    """QEMU's microvm with its virtio-mmio devices described by ACPI (its default),
    a disk as virtio-blk on the host page cache as hostel's is (writeback, thread pool)."""
    command = ["qemu-system-x86_64", "-M", "microvm", "-accel", "kvm", "-cpu", "host",
               "-m", "256", "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none",
               "-serial", "stdio", "-no-reboot", "-kernel", str(boot.kernel),
               "-initrd", str(boot.initrd), "-append", boot.cmdline]
    if boot.disk:
        command += ["-drive", f"file={boot.disk},format=raw,if=none,id=vda,readonly=on,"
                              "cache=writeback,aio=threads",
                    "-device", "virtio-blk-device,drive=vda"]
    return command


def qemu_boot(boot: Boot) -> tuple[dict[str, float], Console]:
    started = time.monotonic()
    child = subprocess.Popen(qemu_command(boot), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             stdin=subprocess.DEVNULL)
    try:
        console = _read_console(child.stdout.fileno(), boot, started + TIMEOUT)
    finally:
        child.kill()
        child.wait()
    if console.marker_at is None:
        raise RuntimeError(f"QEMU's guest never reached its marker:\n{console.text[-2000:]}")
    return {"process start to marker": console.marker_at - started}, console


def inside() -> list[dict[str, object]]:
    """Runs in the lab: both boots RUNS times, alternating."""
    from guests.linux import CLOUD_MODULES, MARKER, cloud_kernel, linux_initramfs

    work = Path(tempfile.mkdtemp())
    initrd = linux_initramfs(work / "initrd.cpio", "poweroff -f\n", CLOUD_MODULES)
    kernel = cloud_kernel()
    hostel_runs, qemu_runs = [], []
    boot = Boot(kernel, initrd, MARKER.encode())
    for _ in range(RUNS):
        hostel_runs.append(hostel_boot(boot)[0])
        qemu_runs.append(qemu_boot(boot)[0])
    hostel_kvm = statistics.median(r["first KVM_RUN to marker"] for r in hostel_runs)
    hostel_wall = statistics.median(r["process start to marker"] for r in hostel_runs)
    qemu_wall = statistics.median(r["process start to marker"] for r in qemu_runs)
    return [
        {"bench": "guest_boot", "what": "hostel, first KVM_RUN to /init marker (s)",
         "median": round(hostel_kvm, 2), "runs": [round(r["first KVM_RUN to marker"], 2) for r in hostel_runs]},
        {"bench": "guest_boot", "what": "hostel, process start to /init marker (s)",
         "median": round(hostel_wall, 2), "runs": [round(r["process start to marker"], 2) for r in hostel_runs]},
        {"bench": "guest_boot", "what": "qemu -M microvm, process start to /init marker (s)",
         "median": round(qemu_wall, 2), "runs": [round(r["process start to marker"], 2) for r in qemu_runs]},
        {"bench": "guest_boot", "what": "ratio hostel/qemu (process start to marker)",
         "median": round(hostel_wall / qemu_wall, 2)},
    ]


def in_lab(script_name: str) -> list[dict[str, object]]:
    """One lab boot running `bench/SCRIPT_NAME --inside`; its JSON rows. The job starts
    as a lab test's does (tests/lab/job.py: this host's cgroup mounts mirrored, its
    environment in part), so that hosteld can run containers there too."""
    from lab import job as lab_job, vm

    job = Path(tempfile.mkdtemp(prefix="hostel-bench-"))
    script = (lab_job.preamble(str(REPO)) + f".venv/bin/python bench/{script_name} --inside "
              "> /run/lab/rows.json 2> /run/lab/bench.log\n")
    result = vm.run(script, job, vm.LabSettings(timeout=LAB_TIMEOUT))
    rows_file = job / "rows.json"
    if result.exit_status != 0 or not rows_file.exists():
        log = (job / "bench.log").read_text() if (job / "bench.log").exists() else ""
        raise RuntimeError(f"the boot benchmark failed in the lab:\n{log[-2000:]}\n"
                           f"{result.console_tail()}")
    rows = json.loads(rows_file.read_text())
    shutil.rmtree(job)
    return rows


def run() -> list[dict[str, object]]:
    """From `make bench`: one lab boot running inside()."""
    return in_lab("guest_boot.py")


if __name__ == "__main__":
    if sys.argv[1:] == ["--inside"]:
        print(json.dumps(inside()))
    else:
        print(json.dumps(run(), indent=1))
