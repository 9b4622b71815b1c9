"""The lab VM: QEMU (TCG, `-cpu max`, so SVM is emulated and KVM nests inside)
booting Debian's generic kernel with the lab initramfs, the host's root shared
read-only over 9p, and a job directory shared read-write for the job's script
and results.

One boot runs one job: the host writes job.sh into the job directory, the VM
runs it as root in a close copy of the host (see init.sh) and powers off;
whatever the job wrote to /run/lab is then in the job directory."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from lab.initramfs import Initramfs
from lab.kernels import Kernel, kernel
from lab.modules import index

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
QEMU = "qemu-system-x86_64"
DEFAULT_CACHE = "/var/cache/hostel/lab"
# What the initramfs loads itself: virtio-pci for the 9p shares, then 9p and overlay.
BOOT_MODULES = ["virtio_pci", "9pnet_virtio", "9p", "overlay"]
# Files whose content makes the initramfs: a change to any of them rebuilds it.
IMAGE_SOURCES = [HERE / "init.sh", HERE / "initramfs.py", HERE / "modules.py", Path(__file__)]
CONSOLE_TAIL = 4000
STALE_SECONDS = 3600   # older initramfs builds are removed from the cache after this


class LabError(RuntimeError):
    """The lab could not run its job: QEMU missing or failing, no kernel, a timeout."""


@dataclass(frozen=True)
class LabSettings:
    memory_mb: int = 8192
    cpus: int = 2
    # TCG's "max" emulates AMD SVM (with nested paging): KVM nests. Without LA57:
    # with 5-level paging in the lab (its own and its nested guests'), QEMU 7.2's
    # TCG let a 4-vCPU 6 GiB nested Linux triple-fault during boot now and then
    # (an AP fetching from an unmapped kernel address: 2 boots in 17); 0 in 14
    # without it. No guest of hostel's needs 5-level paging to be tested.
    cpu: str = "max,-la57"
    timeout: float = 900.0   # the whole boot and job (~250-400 s unloaded); `make test` must end in time


@dataclass
class LabRun:
    """What one boot did."""

    exit_status: int | None   # job.sh's, None when it did not finish
    boot_seconds: float | None  # QEMU started to job.sh started
    seconds: float
    console: str              # the serial console (kernel, init, job.sh's stdout)
    job_dir: Path

    def console_tail(self) -> str:
        return _tail(self.console)


def cache_dir() -> Path:
    return Path(os.environ.get("HOSTEL_LAB_CACHE", DEFAULT_CACHE))


def lab_initramfs(lab_kernel: Kernel) -> Path:
    """The lab's initramfs for lab_kernel, from the cache or built into it (~3 s)."""
    busybox = shutil.which("busybox")
    if busybox is None:
        raise LabError("no busybox on PATH: install busybox-static ('make setup' does)")
    digest = hashlib.sha256(lab_kernel.version.encode())
    for source in [*IMAGE_SOURCES, Path(busybox)]:
        digest.update(source.read_bytes())
    path = cache_dir() / f"initramfs-{lab_kernel.version}-{digest.hexdigest()[:16]}.cpio"
    if path.exists():
        return path
    image = Initramfs()
    image.add_console()
    image.add_busybox()
    image.add_file("/init", (HERE / "init.sh").read_text(), 0o755)
    image.add_file("/lab.conf", f"LAB_KERNEL_VERSION={lab_kernel.version}\n"
                                f"LAB_MODULES={lab_kernel.modules}\n")
    for directory in ("/proc", "/sys", "/dev", "/tmp"):
        image.add_dir(directory)
    image.add_modules(lab_kernel, BOOT_MODULES)
    modules = index(lab_kernel.modules)
    image.add_file("/lib/modules/modules.dep", modules.modules_dep())
    image.add_file("/lib/modules/modules.alias", modules.modules_alias())
    image.add_file("/lib/modules/modules.builtin", (lab_kernel.modules / "modules.builtin").read_bytes())
    path.parent.mkdir(parents=True, exist_ok=True)
    for old in path.parent.glob("initramfs-*.cpio"):
        if time.time() - old.stat().st_mtime > STALE_SECONDS:   # not one a session is booting
            old.unlink(missing_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")   # two sessions may build at once
    image.write(partial)
    partial.rename(path)
    return path


def qemu_command(lab_kernel: Kernel, initrd: Path, job_dir: Path, settings: LabSettings,
                 interactive: bool) -> list[str]:
    serial = "mon:stdio" if interactive else f"file:{job_dir / 'console.log'}"
    return [QEMU, "-machine", "pc,accel=tcg", "-cpu", settings.cpu, "-smp", str(settings.cpus),
            "-m", str(settings.memory_mb), "-nodefaults", "-no-user-config", "-display", "none",
            "-no-reboot", "-serial", serial,
            "-kernel", str(lab_kernel.vmlinuz), "-initrd", str(initrd),
            "-append", "console=ttyS0 panic=-1 quiet loglevel=4",
            "-virtfs", "local,path=/,readonly=on,security_model=none,multidevs=remap,"
                       "mount_tag=hostroot",
            "-virtfs", f"local,path={job_dir},security_model=none,mount_tag=labjob"]


def run(job_script: str, job_dir: Path, settings: LabSettings = LabSettings(),
        interactive: bool = False) -> LabRun:
    """Boot the lab, run job_script (sh) inside as root, return when it powered off.

    job_dir must be empty and is the job's /run/lab; LabError when the lab could
    not be started or did not end within settings.timeout."""
    lab_kernel = kernel("amd64")
    initrd = lab_initramfs(lab_kernel)
    (job_dir / "job.sh").write_text(
        "touch /run/lab/started\n" + job_script)
    (job_dir / "repo").write_text(str(REPO))
    command = qemu_command(lab_kernel, initrd, job_dir, settings, interactive)
    started = time.monotonic()
    try:
        qemu = subprocess.Popen(command, stdin=None if interactive else subprocess.DEVNULL,
                                stderr=None if interactive else subprocess.PIPE)
    except OSError as e:
        raise LabError(f"cannot start {QEMU}: {e.strerror} (install qemu-system-x86; "
                       "'make setup' does)") from e
    boot_seconds = None
    try:
        while qemu.poll() is None:
            if boot_seconds is None and (job_dir / "started").exists():
                boot_seconds = time.monotonic() - started
            if not interactive and time.monotonic() - started > settings.timeout:
                qemu.kill()
                qemu.wait()
                raise LabError(f"the lab VM did not finish within {settings.timeout:.0f} s "
                               f"(HOSTEL_LAB_TIMEOUT); console:\n{_tail(_console(job_dir))}")
            time.sleep(0.2)
    finally:
        if qemu.poll() is None:
            qemu.kill()
            qemu.wait()
    stderr = qemu.stderr.read().decode(errors="replace") if qemu.stderr else ""
    if qemu.returncode != 0:
        raise LabError(f"{QEMU} failed with status {qemu.returncode}: {stderr.strip()}\n"
                       f"console:\n{_tail(_console(job_dir))}")
    status_file = job_dir / "exit-status"
    status = int(status_file.read_text()) if status_file.exists() else None
    return LabRun(status, boot_seconds, time.monotonic() - started, _console(job_dir), job_dir)


def _console(job_dir: Path) -> str:
    path = job_dir / "console.log"
    return path.read_text(errors="replace") if path.exists() else ""


def _tail(console: str) -> str:
    return console[-CONSOLE_TAIL:] if console.strip() else "(nothing on the console yet)"
