"""hosteld: the asyncio main loop, its bus connection, managers and signals."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from dbus_fast.service import ServiceInterface, dbus_property, PropertyAccess

from hostel import __version__
from hostel.bus import Dispatcher, connect_system_bus, request_name
from hostel.cryptsetup.service import MANAGER_PATH as CRYPTSETUP_PATH, CryptsetupService
from hostel.guest.images_service import ImageService
from hostel.guest.service import MANAGER_PATH as GUEST_PATH, GuestService
from hostel.logsetup import setup_logging
from hostel.machine import machine1
from hostel.machine.registry import Registry
from hostel.machine.runner import MachineRunner
from hostel.machine.service import MANAGER_PATH as MACHINE_PATH, MachineService
from hostel.notify import sd_notify

log = logging.getLogger("hosteld")

BUS_NAME = "org.hostel1"
ROOT_PATH = "/org/hostel1"
MANAGER_PATHS = [MACHINE_PATH, CRYPTSETUP_PATH, GUEST_PATH]

EXIT_BUS_UNAVAILABLE = 69  # EX_UNAVAILABLE
EXIT_NAME_TAKEN = 75       # EX_TEMPFAIL: another instance runs; retry when it is gone


@dataclass(frozen=True)
class DaemonConfig:
    runtime_dir: Path
    state_dir: Path
    log_level: str


class DaemonInterface(ServiceInterface):
    """org.hostel1.Daemon at /org/hostel1: what this hosteld is and serves."""

    def __init__(self) -> None:
        super().__init__("org.hostel1.Daemon")

    @dbus_property(access=PropertyAccess.READ)
    def Version(self) -> "s":
        return __version__

    @dbus_property(access=PropertyAccess.READ)
    def Managers(self) -> "ao":
        return MANAGER_PATHS


def parse_args(argv: list[str] | None) -> DaemonConfig:
    parser = argparse.ArgumentParser(prog="hosteld", description=__doc__)
    parser.add_argument("--version", action="version", version=f"hosteld {__version__}")
    parser.add_argument("--runtime-dir", type=Path, default=Path("/run/hostel"),
                        help="runtime state (default: %(default)s)")
    parser.add_argument("--state-dir", type=Path, default=Path("/var/lib/hostel"),
                        help="persistent state: images, machines (default: %(default)s)")
    parser.add_argument("--log-level", default=os.environ.get("HOSTEL_LOG_LEVEL", "info"),
                        choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    return DaemonConfig(args.runtime_dir, args.state_dir, args.log_level)


def _bus_address() -> str:
    return os.environ.get("DBUS_SYSTEM_BUS_ADDRESS",
                          "unix:path=/run/dbus/system_bus_socket (the default)")


async def serve(config: DaemonConfig) -> int:
    config.runtime_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    try:
        bus = await connect_system_bus()
    except OSError as e:
        log.error("cannot connect to the system bus at %s: %s; start dbus-daemon "
                  "or point DBUS_SYSTEM_BUS_ADDRESS at a running bus", _bus_address(), e)
        return EXIT_BUS_UNAVAILABLE

    dispatcher = Dispatcher(bus)
    bus.export(ROOT_PATH, DaemonInterface())
    machines_dir = config.state_dir / "machines"
    registry = Registry()
    runner = MachineRunner(registry, config.runtime_dir, machines_dir)
    machine_service = MachineService(dispatcher, registry, runner, machines_dir)
    await runner.adopt()  # containers an earlier hosteld left running
    await CryptsetupService(dispatcher).start()
    images = ImageService(config.state_dir / "images", config.runtime_dir, runner)
    guests = GuestService(dispatcher, config.runtime_dir, images)
    guests.adopt()

    if not await request_name(bus, BUS_NAME):
        log.error("%s is already owned on %s: another hosteld is running; stop it first",
                  BUS_NAME, _bus_address())
        bus.disconnect()
        return EXIT_NAME_TAKEN
    await serve_machine1(bus, dispatcher, registry, machine_service)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    disconnected = asyncio.ensure_future(bus.wait_for_disconnect())
    disconnected.add_done_callback(lambda _: stop.set())

    sd_notify(f"READY=1\nSTATUS=Serving {BUS_NAME}")
    log.info("hosteld %s serving %s on %s", __version__, BUS_NAME, _bus_address())
    await stop.wait()

    if disconnected.done():
        log.error("lost the connection to the system bus: %s",
                  disconnected.exception() or "bus closed")
        return EXIT_BUS_UNAVAILABLE
    sd_notify("STOPPING=1")
    # Containers and guests do not depend on hosteld: they keep running, and the
    # next hosteld adopts them from /run/hostel (as machined leaves machines alone).
    log.info("stopping on signal; %d machines and %d guests keep running",
             len(registry.all()), len(guests.manager.guests))
    disconnected.cancel()
    bus.disconnect()
    return 0


async def serve_machine1(bus, dispatcher: Dispatcher, registry: Registry,
                         machine_service: MachineService) -> None:
    """machined's name when it is free (machinectl then talks to us); else register with it."""
    if await machine1.name_has_owner(bus, machine1.BUS_NAME):
        await machine1.register_with_machined(bus, registry)
        return
    compat = machine1.Machine1Service(dispatcher, registry, machine_service)
    compat.export()
    if await request_name(bus, machine1.BUS_NAME):
        log.info("serving %s for machinectl", machine1.BUS_NAME)
    else:
        log.warning("could not own %s; machinectl will not see hostel's machines",
                    machine1.BUS_NAME)


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    setup_logging(config.log_level)
    return asyncio.run(serve(config))


if __name__ == "__main__":
    sys.exit(main())
