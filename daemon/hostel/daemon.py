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

from dbus_fast.aio import MessageBus
from dbus_fast.errors import DBusError
from dbus_fast.service import ServiceInterface, dbus_property, PropertyAccess

from hostel import __version__
from hostel.bus import Dispatcher, connect_system_bus, request_name
from hostel.cryptsetup.service import MANAGER_PATH as CRYPTSETUP_PATH, CryptsetupService
from hostel.guest.images_service import ImageService
from hostel.guest.service import MANAGER_PATH as GUEST_PATH, GuestService
from hostel.logsetup import setup_logging
from hostel.machine import machine1, services_bus, systemd1_units
from hostel.machine.registry import Registry
from hostel.machine.runner import MachineRunner
from hostel.machine.service import MANAGER_PATH as MACHINE_PATH, MachineService
from hostel.machine.services import MachineServices
from hostel.notify import sd_notify

log = logging.getLogger("hosteld")

BUS_NAME = "org.hostel1"
ROOT_PATH = "/org/hostel1"
MANAGER_PATHS = [MACHINE_PATH, CRYPTSETUP_PATH, GUEST_PATH]

EXIT_BUS_UNAVAILABLE = 69  # EX_UNAVAILABLE
EXIT_NAME_TAKEN = 75       # EX_TEMPFAIL: another instance runs; retry when it is gone
EXIT_NOT_ROOT = 77         # EX_NOPERM: namespaces, mounts, cgroups and links need root
EXIT_BUS_POLICY = 78       # EX_CONFIG: the bus's policy does not let hosteld own its name
EXIT_STATUS = ("Exit status: 0 stopped by SIGTERM or SIGINT, 69 the system bus cannot be "
               "reached, 75 another hosteld owns org.hostel1, 77 not started as root, "
               "78 the bus's policy does not let hosteld own org.hostel1 (install "
               "org.hostel1.conf in the bus's system.d, as make install does).")
POLICY_FILE = "org.hostel1.conf"
RECONNECT_FIRST_DELAY = 0.05  # seconds; doubled after each failed attempt
RECONNECT_MAX_DELAY = 2.0


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


def build_parser() -> argparse.ArgumentParser:
    """hosteld's options: parsed here, and documented from here (hostel/docs.py)."""
    parser = argparse.ArgumentParser(prog="hosteld", description=__doc__, epilog=EXIT_STATUS)
    parser.add_argument("--version", action="version", version=f"hosteld {__version__}")
    parser.add_argument("--runtime-dir", type=Path, default=Path("/run/hostel"),
                        help="runtime state (default: %(default)s)")
    parser.add_argument("--state-dir", type=Path, default=Path("/var/lib/hostel"),
                        help="persistent state: images, machines (default: %(default)s)")
    parser.add_argument("--log-level", default=os.environ.get("HOSTEL_LOG_LEVEL", "info"),
                        choices=["debug", "info", "warning", "error"],
                        help="the least severe messages logged (default: $HOSTEL_LOG_LEVEL, "
                        "else info)")
    return parser


def parse_args(argv: list[str] | None) -> DaemonConfig:
    args = build_parser().parse_args(argv)
    return DaemonConfig(args.runtime_dir, args.state_dir, args.log_level)


def _bus_address() -> str:
    return os.environ.get("DBUS_SYSTEM_BUS_ADDRESS",
                          "unix:path=/run/dbus/system_bus_socket (the default)")


class NameRefused(Exception):
    """The bus's policy does not let this process own a name (AccessDenied)."""


async def own_name(bus: MessageBus, name: str) -> bool:
    """request_name, with a policy refusal said as NameRefused (not a DBusError traceback)."""
    try:
        return await request_name(bus, name)
    except DBusError as e:
        if e.type != "org.freedesktop.DBus.Error.AccessDenied":
            raise
        raise NameRefused(f"the bus at {_bus_address()} does not let hosteld (uid "
                          f"{os.geteuid()}) own {name}: {e.text}; install {POLICY_FILE} in its "
                          "system.d (make install does) and reload the bus") from None


async def serve(config: DaemonConfig) -> int:
    if os.geteuid() != 0:  # before it makes a directory or touches the bus
        log.error("hosteld must run as root (uid %d here): it creates namespaces, mounts, "
                  "cgroups and network links, and only root may own %s on the system bus; "
                  "start it as root (systemctl start hosteld)", os.geteuid(), BUS_NAME)
        return EXIT_NOT_ROOT
    try:
        return await _serve(config)
    except NameRefused as e:
        log.error("%s", e)
        return EXIT_BUS_POLICY


async def _serve(config: DaemonConfig) -> int:
    config.runtime_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    try:
        bus = await connect_system_bus()
    except OSError as e:
        log.error("cannot connect to the system bus at %s: %s; start dbus-daemon "
                  "or point DBUS_SYSTEM_BUS_ADDRESS at a running bus", _bus_address(), e)
        return EXIT_BUS_UNAVAILABLE

    dispatcher = Dispatcher(bus)
    dispatcher.export(ROOT_PATH, DaemonInterface())
    machines_dir = config.state_dir / "machines"
    registry = Registry()
    runner = MachineRunner(registry, config.runtime_dir, machines_dir)
    machine_service = MachineService(dispatcher, registry, runner, machines_dir)
    services = MachineServices(registry, runner, config.state_dir)
    services_bus.export(dispatcher, services)
    await runner.adopt()  # containers an earlier hosteld left running
    await CryptsetupService(dispatcher).start()
    images = ImageService(config.state_dir / "images", config.runtime_dir, runner)
    guests = GuestService(dispatcher, config.runtime_dir, images)
    guests.adopt()
    machine_service.running_vms = guests.manager.running_machines

    if not await own_name(bus, BUS_NAME):
        log.error("%s is already owned on %s: another hosteld is running; stop it first",
                  BUS_NAME, _bus_address())
        bus.disconnect()
        return EXIT_NAME_TAKEN
    compat = await serve_machine1(bus, dispatcher, registry, machine_service, guests)
    # machinectl start/enable ask systemd; with no systemd on the bus, hosteld answers.
    units = compat and await systemd1_units.serve(bus, dispatcher, services)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    sd_notify(f"READY=1\nSTATUS=Serving {BUS_NAME}")
    log.info("hosteld %s serving %s on %s", __version__, BUS_NAME, _bus_address())
    enabled = loop.create_task(services.start_enabled())  # in the background, as machines.target
    while await _until_stop_or_disconnect(bus, stop):
        # The bus went away (dbus-daemon restarted): machines and guests keep running;
        # serve them again on the next bus, under the same names.
        sd_notify("STATUS=Reconnecting to the system bus")
        reconnected = await _reconnect(stop)
        if reconnected is None:
            break
        bus = reconnected
        dispatcher.rebind(bus)
        if not await own_name(bus, BUS_NAME):
            log.error("%s was taken on %s while hosteld was disconnected: another hosteld "
                      "runs; this one stops (its machines keep running)", BUS_NAME,
                      _bus_address())
            bus.disconnect()
            return EXIT_NAME_TAKEN
        if compat and not await request_name(bus, machine1.BUS_NAME):
            log.warning("could not own %s again; machinectl will not see hostel's machines",
                        machine1.BUS_NAME)
        if units and not await request_name(bus, systemd1_units.BUS_NAME):
            log.warning("could not own %s again; machinectl start/enable will not reach "
                        "hosteld", systemd1_units.BUS_NAME)
        sd_notify(f"STATUS=Serving {BUS_NAME}")
        log.info("reconnected to the system bus at %s; serving %s again", _bus_address(),
                 BUS_NAME)

    sd_notify("STOPPING=1")
    enabled.cancel()
    # Containers and guests do not depend on hosteld: they keep running, and the
    # next hosteld adopts them from /run/hostel (as machined leaves machines alone).
    log.info("stopping on signal; %d machines and %d guests keep running",
             len(registry.all()), len(guests.manager.guests))
    bus.disconnect()
    return 0


async def _until_stop_or_disconnect(bus: MessageBus, stop: asyncio.Event) -> bool:
    """Serve until a signal (False) or until the bus connection is lost (True)."""
    disconnected = asyncio.ensure_future(bus.wait_for_disconnect())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({disconnected, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if not disconnected.done():
        disconnected.cancel()
        return False
    error = None if disconnected.cancelled() else disconnected.exception()
    log.error("lost the connection to the system bus at %s (%s); machines keep running, "
              "reconnecting", _bus_address(), error or "bus closed")
    return not stop.is_set()


async def _reconnect(stop: asyncio.Event) -> MessageBus | None:
    """Connect again, retrying while the bus is down; None when told to stop meanwhile."""
    delay, attempts = RECONNECT_FIRST_DELAY, 0
    while not stop.is_set():
        try:
            return await connect_system_bus()
        except OSError as e:  # no socket yet, or refused: dbus-daemon is still starting
            attempts += 1
            if attempts % 50 == 1:
                log.warning("the system bus at %s is not back yet (%s); retrying",
                            _bus_address(), e)
        try:
            await asyncio.wait_for(stop.wait(), delay)
        except asyncio.TimeoutError:
            pass
        delay = min(delay * 2, RECONNECT_MAX_DELAY)
    return None


async def serve_machine1(bus: MessageBus, dispatcher: Dispatcher, registry: Registry,
                         machine_service: MachineService,
                         guests: GuestService) -> bool:
    """machined's name when it is free (machinectl then talks to us); else register with it.

    True when hosteld serves the name itself (to be requested again after a reconnect)."""
    if await machine1.name_has_owner(bus, machine1.BUS_NAME):
        await machine1.register_with_machined(bus, registry)
        return False
    compat = machine1.Machine1Service(dispatcher, registry, machine_service, guests)
    compat.export()
    if await request_name(bus, machine1.BUS_NAME):
        log.info("serving %s for machinectl", machine1.BUS_NAME)
    else:
        log.warning("could not own %s; machinectl will not see hostel's machines",
                    machine1.BUS_NAME)
    return True


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    setup_logging(config.log_level)
    return asyncio.run(serve(config))


if __name__ == "__main__":
    sys.exit(main())
