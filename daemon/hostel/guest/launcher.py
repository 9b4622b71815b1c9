"""The launcher: lay out guest memory, load the kernel, wire the devices, run.

One Launcher is one guest. It runs in its own process (`python -m
hostel.guest.launcher SETTINGS-JSON`, started by hosteld through the spawn
trampoline) so that it can jail itself after setup (jail.py; --chroot and
--username choose the jail's root and user), and so that a guest can never
take hosteld down."""
from __future__ import annotations

import json
import struct
import sys
import threading
from dataclasses import asdict
from pathlib import Path

from hostel.guest import acpi, boot, devices, jail, launcher_failure, loader, smbios
from hostel.guest.backend import Backend, GuestExit
from hostel.guest.console import Port
from hostel.guest.errors import GuestError
from hostel.guest.memory import GuestMemory
from hostel.guest.mmio import WINDOW, MmioBus, MmioDevice
from hostel.guest.settings import BlockSpec, GuestSettings, NetSpec

MMIO_BASE = 0xD0000000
# ISA interrupt lines free on a PC without legacy devices (the 16550 polls).
MMIO_IRQS = (5, 6, 7, 9, 10, 11, 12, 14, 15)


def make_backend(settings: GuestSettings, serial_fd: int, kernel_kind: str = "elf") -> Backend:
    """The backend settings name. A Linux bzImage gets the interrupt wiring its
    ACPI tables describe (IOAPIC only); an ELF program (the project's
    freestanding test guests) the PC's legacy PIC beside it."""
    if settings.backend == "lguest":
        from hostel.guest.lguest import LguestBackend

        if settings.cpus != 1:
            raise GuestError(f"the lguest backend runs one vCPU, not {settings.cpus}; "
                             "drop --cpus or use the kvm backend")
        if settings.on_reboot != "exit":
            raise GuestError("the lguest backend cannot restart a guest; drop --on-reboot or "
                             "use the kvm backend")
        return LguestBackend()
    from hostel.guest.kvm import KvmBackend

    return KvmBackend(serial_fd, settings.cpus, legacy_pic=kernel_kind == "elf")


def kernel_command_line(settings: GuestSettings, bus: MmioBus) -> str:
    """The user's command line; with `acpi=off` also virtio_mmio.device= for each
    device (a kernel built with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES), which would
    otherwise register every device a second time beside its ACPI node."""
    extra = [d.cmdline for d in bus.devices] if "acpi=off" in settings.cmdline.split() else []
    return " ".join([settings.cmdline] + extra).strip()


class Launcher:
    """Builds the guest from settings; run() blocks until the guest ends."""

    def __init__(self, settings: GuestSettings, console_fd: int,
                 ports: list[Port] | None = None, input_fd: int = -1) -> None:
        """console_fd receives the serial port and virtio-console output; input_fd
        (if any) feeds the virtio-console; ports are console ports beyond the
        console itself (multiport), e.g. the host channel of a guest init."""
        self.settings = settings
        self.console_fd = console_fd
        self.input_fd = input_fd
        self.ports = ports or []
        self.mem = GuestMemory(settings.memory_mb << 20)
        self.backend: Backend | None = None
        self.bus = MmioBus()
        self._stopping = threading.Event()
        self.restarts: list[GuestExit] = []     # the reboots on_reboot="restart" turned over
        self._boot_image: list[tuple[int, bytes | int]] = []
        try:
            self.tables = boot.write_long_mode_tables(self.mem)
            boot.write_reset_vector(self.mem)
            self.kernel = loader.load_kernel(self.mem, settings.kernel)
            self.backend = make_backend(settings, console_fd, self.kernel.kind)
            self.backend.setup(self.mem)
            self._add_devices()
            rsdp = acpi.write_tables(self.mem, settings.cpus,
                                     [acpi.MmioDeviceInfo(d.base, WINDOW, d.irq)
                                      for d in self.bus.devices])
            smbios.write_tables(self.mem)
            loader.finish_boot_params(self.mem, self.kernel,
                                      kernel_command_line(settings, self.bus), settings.initrd,
                                      rsdp)
            if settings.on_reboot == "restart":
                self._snapshot_boot_image()
        except BaseException:
            self.close()
            raise

    def _add_devices(self) -> None:
        """Console first (always there, as in the seed), then block, network, rng."""
        wanted: list[devices.Device] = []
        try:
            wanted.append(devices.console_device(self.console_fd, self.input_fd, self.ports))
            for i, spec in enumerate(self.settings.block):
                wanted.append(devices.block_device(spec.path, spec.read_only, i))
            if self.settings.network:
                from hostel.guest import network  # pyroute2 is a heavy import: only when needed

                for i, net in enumerate(self.settings.network):
                    wanted.append(network.net_device_for(net, i))
            if self.settings.rng:
                wanted.append(devices.rng_device())
            if len(wanted) > len(MMIO_IRQS):
                raise GuestError(f"{len(wanted)} devices; the launcher has interrupt lines for "
                                 f"{len(MMIO_IRQS)}: use fewer block or network devices")
            assert self.backend is not None, "devices are added once the backend is set up"
            for slot, device in enumerate(wanted):
                self.bus.add(MmioDevice(device, MMIO_BASE + slot * WINDOW, MMIO_IRQS[slot],
                                        self.mem, self.backend))
        except BaseException:
            for device in wanted[len(self.bus.devices):]:  # the bus closes its own
                device.close()
            raise

    def run(self) -> GuestExit:
        """Run until the guest ends; with on_reboot="restart" a reboot boots it again."""
        if self.backend is None:
            raise GuestError("the launcher is closed: its guest cannot run again")
        while True:
            result = self.backend.run(self.kernel.entry, self.kernel.zero_page, self.tables,
                                      self.bus.handle)
            if result.reason != "reboot" or self.settings.on_reboot != "restart" \
                    or self._stopping.is_set():
                return result
            self.restarts.append(result)
            self._restart()
            if self._stopping.is_set():
                return GuestExit("stopped", 0, "the guest was stopped by the launcher")

    def _snapshot_boot_image(self) -> None:
        """What setup wrote, kept for a restart (after the jail the files may be
        out of reach): the low MiB (boot tables, zero page, command line, ACPI,
        the reset stub), the kernel (its memory beyond the file zeroed) and the initrd."""
        image: list[tuple[int, bytes | int]] = [(0, self.mem.read(0, boot.KERNEL_GPA))]
        for seg in self.kernel.segments:
            image.append((seg.gpa, self.mem.read(seg.gpa, seg.file_size)))
            image.append((seg.gpa + seg.file_size, seg.mem_size - seg.file_size))
        rd_gpa, rd_size = struct.unpack_from("<II", self.mem.read(self.kernel.zero_page + 0x218, 8))
        if rd_size:
            image.append((rd_gpa, self.mem.read(rd_gpa, rd_size)))
        self._boot_image = image

    def _restart(self) -> None:
        """A reboot: devices reset, a fresh VM (vCPUs, irqchip) on the same RAM, the
        boot image written back; the rest of RAM keeps what it had, as on a PC."""
        from hostel.guest.kvm import KvmBackend

        assert isinstance(self.backend, KvmBackend), "make_backend refuses restart elsewhere"
        for dev in self.bus.devices:
            dev.reset()
        self.backend.reset(self.mem)
        for gpa, content in self._boot_image:
            if isinstance(content, int):
                self.mem.zero(gpa, content)
            else:
                self.mem.write(gpa, content)

    def stop(self) -> None:
        self._stopping.set()
        if self.backend is not None:
            self.backend.stop()

    def close(self) -> None:
        self.bus.close()
        if self.backend is not None:
            self.backend.close()
            self.backend = None
        self.mem.close()  # idempotent, as close() is: a failed start closes, then the caller


# The launcher process ---------------------------------------------------------

def settings_to_json(settings: GuestSettings) -> str:
    return json.dumps(asdict(settings), default=str)


def settings_from_json(text: str) -> GuestSettings:
    raw = json.loads(text)
    paths = {k: Path(raw[k]) if raw[k] else None for k in ("kernel", "initrd", "chroot", "console_log")}
    return GuestSettings(**{**raw, **paths,
                            "block": tuple(BlockSpec(Path(b["path"]), b["read_only"]) for b in raw["block"]),
                            "network": tuple(NetSpec(**n) for n in raw["network"])})


def describe(launcher: Launcher) -> None:
    """--verbose: the memory layout and devices, as the lguest launcher reported them."""
    kernel = launcher.kernel
    print(f"guest: {launcher.mem.ram_size >> 20} MiB, {kernel.kind} kernel entry {kernel.entry:#x}, "
          f"backend {launcher.settings.backend}", file=sys.stderr)
    for dev in launcher.bus.devices:
        print(f"device {dev.device.name}: {dev.cmdline}", file=sys.stderr)


def run_guest(settings: GuestSettings, console_fd: int, input_fd: int,
              ports: list[Port] | None = None) -> GuestExit:
    """Set up, jail (see jail.py), run: every failure becomes the guest's exit reason,
    one line for the console; one that is no GuestError keeps its traceback in the
    exit record for hosteld's log (launcher_failure.py), so a bug is still seen."""
    try:
        return _set_up_and_run(settings, console_fd, input_fd, ports)
    except GuestError as e:
        return GuestExit("error", 1, str(e))
    except Exception as e:  # not a catch-all: reported as a failure, traceback kept
        return launcher_failure.failed_exit(e)


def _set_up_and_run(settings: GuestSettings, console_fd: int, input_fd: int,
                    ports: list[Port] | None) -> GuestExit:
    launcher = Launcher(settings, console_fd, ports=ports, input_fd=input_fd)
    try:
        if settings.verbose:
            describe(launcher)
        jail.enter(jail.settings_for(settings.username, settings.chroot))
        return launcher.run()
    finally:
        launcher.close()


def main(argv: list[str]) -> int:
    """argv: SETTINGS-JSON EXIT-FILE. The console is stdout (and stdin); why the guest ended
    goes to EXIT-FILE as JSON, opened before any chroot so it stays reachable. The exit
    status is the guest's after a poweroff, else 1: every failure, as hostelctl's."""
    settings = settings_from_json(argv[0])
    with open(argv[1], "w") as exit_file:
        result = run_guest(settings, sys.stdout.fileno(), sys.stdin.fileno())
        exit_file.write(json.dumps(asdict(result)))
    if settings.verbose:
        print(f"guest exit: {result.detail}", file=sys.stderr)
    return result.code if result.reason == "poweroff" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
