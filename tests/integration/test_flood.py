"""A burst of calls that fills hosteld's socket must not cost it the bus connection.

dbus-fast (like dbus-next, dbus-next issue 153) treats EAGAIN on a full socket
as fatal and disconnects; hostel.bus replaces that writer. Replies here are
Introspect XML (several KiB) and ListMachines, from several connections at
once, so the daemon writes far faster than the bus reads."""
from __future__ import annotations

import asyncio
from pathlib import Path

from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

from hostel.bus import make_patient
from hostel.privatebus import DaemonProcess, PrivateBus

from conftest import busctl

CONNECTIONS = 6
CALLS_PER_CONNECTION = 1500


async def flood(address: str) -> list[str]:
    # The clients send in bursts too, so they need the same fix as the daemon.
    buses = [make_patient(await MessageBus(bus_address=address, bus_type=BusType.SYSTEM).connect())
             for _ in range(CONNECTIONS)]
    try:
        calls = []
        for bus in buses:
            for i in range(CALLS_PER_CONNECTION):
                if i % 2:
                    msg = Message(destination="org.hostel1", path="/org/hostel1/machine",
                                  interface="org.freedesktop.DBus.Introspectable",
                                  member="Introspect")
                else:
                    msg = Message(destination="org.hostel1", path="/org/hostel1/machine",
                                  interface="org.hostel1.MachineManager", member="ListMachines")
                calls.append(bus.call(msg))
        replies = await asyncio.wait_for(asyncio.gather(*calls), 240)
        return [r.error_name if r.message_type == MessageType.ERROR else "ok" for r in replies]
    finally:
        for bus in buses:
            bus.disconnect()


def test_flood_of_concurrent_calls_is_answered(tmp_path: Path) -> None:
    # The stock system bus caps each client at 128 pending replies; lift that
    # so the whole burst reaches hosteld instead of being refused by the bus.
    bus = PrivateBus(tmp_path / "bus", limits={"max_replies_per_connection": 100000}).start()
    daemon = DaemonProcess(bus.address, tmp_path / "run", tmp_path / "state", bus=bus)
    try:
        daemon.start()
        results = asyncio.run(flood(bus.address))
        assert len(results) == CONNECTIONS * CALLS_PER_CONNECTION
        assert set(results) == {"ok"}, {r: results.count(r) for r in set(results)}
        assert daemon.proc.poll() is None, daemon.log()
        ok = busctl(bus, "call", "org.hostel1", "/org/hostel1/machine",
                    "org.hostel1.MachineManager", "ListMachines")
        assert ok.stdout.strip() == "a(ssso) 0"
        assert "lost the connection" not in daemon.log()
        assert daemon.stop() == 0, daemon.log()
    finally:
        daemon.stop()
        bus.stop()
