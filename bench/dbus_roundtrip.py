"""D-Bus round trips per second against hosteld: a cheap property Get.

Side by side with the same Get served by dbus-daemon itself (its Features
property), which is the ceiling any service behind that bus can reach."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

from hostel.privatebus import PrivateBus, start_daemon

CALLS = 4000
CLIENTS = 4

TARGETS = {
    "hosteld": ("org.hostel1", "/org/hostel1", "org.hostel1.Daemon", "Version"),
    "dbus-daemon (ceiling)": ("org.freedesktop.DBus", "/org/freedesktop/DBus",
                              "org.freedesktop.DBus", "Features"),
}


async def _round_trips(address: str, target: str, calls: int, barrier: bool = False) -> float:
    dest, path, interface, prop = TARGETS[target]
    bus = await MessageBus(bus_address=address, bus_type=BusType.SYSTEM).connect()
    msg = dict(destination=dest, path=path, interface="org.freedesktop.DBus.Properties",
               member="Get", signature="ss", body=[interface, prop])
    try:
        if barrier:  # connected: tell the parent, then wait for everyone's go
            print("ready", flush=True)
            sys.stdin.readline()
        start = time.perf_counter()
        for _ in range(calls):
            reply = await bus.call(Message(**msg))
            assert reply.message_type == MessageType.METHOD_RETURN, reply.body
        return time.perf_counter() - start
    finally:
        bus.disconnect()


def client_main(address: str, target: str, calls: int) -> None:
    print(asyncio.run(_round_trips(address, target, calls, barrier=True)))


def concurrent_rate(address: str, target: str) -> float:
    """CLIENTS processes, each doing sequential round trips; total calls per second.

    The clock starts once every client is connected, so interpreter start-up
    is not counted."""
    procs = [subprocess.Popen([sys.executable, __file__, address, target, str(CALLS)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(CLIENTS)]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready"
    start = time.perf_counter()
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    for proc in procs:
        proc.communicate()
    return CLIENTS * CALLS / (time.perf_counter() - start)


def run() -> list[dict[str, object]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="hostel-bench-") as tmp:
        bus = PrivateBus(Path(tmp) / "bus").start()
        daemon = start_daemon(bus, Path(tmp))
        try:
            for target in TARGETS:
                single = CALLS / asyncio.run(_round_trips(bus.address, target, CALLS))
                rows.append({"benchmark": "property Get round trips", "target": target,
                             "clients": 1, "calls_per_s": round(single)})
                rows.append({"benchmark": "property Get round trips", "target": target,
                             "clients": CLIENTS, "calls_per_s": round(concurrent_rate(bus.address, target))})
        finally:
            daemon.stop()
            bus.stop()
    return rows


if __name__ == "__main__":
    if len(sys.argv) == 4:
        client_main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
    else:
        for row in run():
            print(row)
