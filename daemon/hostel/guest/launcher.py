"""The launcher: lay out guest memory, load the kernel, wire the devices, run.

One Launcher is one guest. It runs in its own process (`python -m
hostel.guest.launcher SETTINGS-JSON`, started by hosteld through the spawn
trampoline) so that --chroot and --username can drop privileges after setup,
as the lguest launcher did, and so that a guest can never take hosteld down."""
from __future__ import annotations

import json
import os
import pwd
import sys
from dataclasses import asdict
from pathlib import Path

from hostel.guest import boot, devices, loader
from hostel.guest.backend import Backend, GuestExit
from hostel.guest.console import Port
from hostel.guest.errors import GuestError
from hostel.guest.memory import GuestMemory
from hostel.guest.mmio import WINDOW, MmioBus, MmioDevice
from hostel.guest.settings import BlockSpec, GuestSettings, NetSpec

MMIO_BASE = 0xD0000000
# ISA interrupt lines free on a PC without legacy devices (the 16550 polls).
MMIO_IRQS = (5, 6, 7, 9, 10, 11, 12, 14, 15)


def make_backend(settings: GuestSettings, serial_fd: int) -> Backend:
    if settings.backend == "lguest":
        from hostel.guest.lguest import LguestBackend

        return LguestBackend()
    from hostel.guest.kvm import KvmBackend

    return KvmBackend(serial_fd)


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
        try:
            self.backend = make_backend(settings, console_fd)
            self.backend.setup(self.mem)
            self._add_devices()
            self.tables = boot.write_long_mode_tables(self.mem)
            self.kernel = loader.load_kernel(self.mem, settings.kernel)
            cmdline = " ".join([settings.cmdline] + [d.cmdline for d in self.bus.devices]).strip()
            loader.finish_boot_params(self.mem, self.kernel, cmdline, settings.initrd)
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
            for slot, device in enumerate(wanted):
                self.bus.add(MmioDevice(device, MMIO_BASE + slot * WINDOW, MMIO_IRQS[slot],
                                        self.mem, self.backend))
        except BaseException:
            for device in wanted[len(self.bus.devices):]:  # the bus closes its own
                device.close()
            raise

    def run(self) -> GuestExit:
        return self.backend.run(self.kernel.entry, self.kernel.zero_page, self.tables,
                                self.bus.handle)

    def stop(self) -> None:
        if self.backend is not None:
            self.backend.stop()

    def close(self) -> None:
        self.bus.close()
        if self.backend is not None:
            self.backend.close()
            self.backend = None
        if self.mem is not None:
            self.mem.close()
            self.mem = None


# The launcher process ---------------------------------------------------------

def settings_to_json(settings: GuestSettings) -> str:
    return json.dumps(asdict(settings), default=str)


def settings_from_json(text: str) -> GuestSettings:
    raw = json.loads(text)
    paths = {k: Path(raw[k]) if raw[k] else None for k in ("kernel", "initrd", "chroot", "console_log")}
    return GuestSettings(**{**raw, **paths,
                            "block": tuple(BlockSpec(Path(b["path"]), b["read_only"]) for b in raw["block"]),
                            "network": tuple(NetSpec(**n) for n in raw["network"])})


def drop_privileges(settings: GuestSettings) -> None:
    """After setup, as the seed does: chroot, then become the unprivileged user."""
    if settings.username:
        try:
            user = pwd.getpwnam(settings.username)
        except KeyError as e:
            raise GuestError(f"no user named {settings.username!r} for --username") from e
    if settings.chroot is not None:
        try:
            os.chroot(settings.chroot)
            os.chdir("/")
        except OSError as e:
            raise GuestError(f"cannot chroot into {settings.chroot}: {e.strerror}") from e
    if settings.username:
        os.setgroups([user.pw_gid])
        os.setresgid(user.pw_gid, user.pw_gid, user.pw_gid)
        os.setresuid(user.pw_uid, user.pw_uid, user.pw_uid)


def describe(launcher: Launcher) -> None:
    """--verbose: the memory layout and devices, as the lguest launcher reported them."""
    kernel = launcher.kernel
    print(f"guest: {launcher.mem.size >> 20} MiB, {kernel.kind} kernel entry {kernel.entry:#x}, "
          f"backend {launcher.settings.backend}", file=sys.stderr)
    for dev in launcher.bus.devices:
        print(f"device {dev.device.name}: {dev.cmdline}", file=sys.stderr)


def run_guest(settings: GuestSettings, console_fd: int, input_fd: int) -> GuestExit:
    """Set up, drop privileges, run: every failure becomes the guest's exit reason."""
    try:
        launcher = Launcher(settings, console_fd, input_fd=input_fd)
    except GuestError as e:
        return GuestExit("error", 1, str(e))
    if settings.verbose:
        describe(launcher)
    try:
        drop_privileges(settings)
        return launcher.run()
    except GuestError as e:
        return GuestExit("error", 1, str(e))
    finally:
        launcher.close()


def main(argv: list[str]) -> int:
    """argv: SETTINGS-JSON EXIT-FILE. The console is stdout (and stdin); why the guest ended
    goes to EXIT-FILE as JSON, opened before any chroot so it stays reachable."""
    settings = settings_from_json(argv[0])
    with open(argv[1], "w") as exit_file:
        result = run_guest(settings, sys.stdout.fileno(), sys.stdin.fileno())
        exit_file.write(json.dumps(asdict(result)))
    if settings.verbose:
        print(f"guest exit: {result.detail}", file=sys.stderr)
    return result.code if result.reason == "poweroff" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
