"""hostel.dbuswire and hostel.client against a real dbus-daemon, and a dbus-fast
service as the independent peer (fd passing, errors, signals, a call that never
returns)."""
from __future__ import annotations

import os
import select
import subprocess
import sys
import threading
import time
from typing import Iterator

import pytest

from hostel.client import CallFailed, Client, DaemonUnavailable, MatchRule
from hostel.dbuswire import (BUS_INTERFACE, BUS_NAME, BUS_PATH, ERROR, METHOD_RETURN,
                             Connection, connect, method_call)
from hostel.privatebus import PrivateBus

TEST_PATH = "/org/hostel1/test"
TEST_INTERFACE = "org.hostel1.Test"

# Owns org.hostel1 (root may, by the project's bus policy) and serves TEST_INTERFACE.
SERVICE = r"""
import asyncio, os
from dbus_fast import BusType
from dbus_fast.aio import MessageBus
from dbus_fast.errors import DBusError
from dbus_fast.service import ServiceInterface, dbus_method, dbus_signal


class Test(ServiceInterface):
    def __init__(self):
        super().__init__("org.hostel1.Test")

    @dbus_method()
    def Dup(self, fd: "h") -> "h":
        os.write(fd, b"service:")
        copy = os.dup(fd)
        os.close(fd)
        return copy

    @dbus_method()
    def Fail(self) -> None:
        raise DBusError("org.hostel1.Test.Error.Deliberate", "failed on purpose")

    @dbus_method()
    def Emit(self, count: "u") -> "u":
        for i in range(count):
            self.Tick(i)
        return count

    @dbus_signal()
    def Tick(self, i) -> "u":
        return i

    @dbus_method()
    async def Hang(self) -> None:
        await asyncio.Event().wait()


async def main():
    bus = await MessageBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=True).connect()
    bus.export("/org/hostel1/test", Test())
    await bus.request_name("org.hostel1")
    print("ready", flush=True)
    await bus.wait_for_disconnect()

asyncio.run(main())
"""


@pytest.fixture
def bus_env(private_bus: PrivateBus, monkeypatch: pytest.MonkeyPatch) -> PrivateBus:
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", private_bus.address)
    return private_bus


@pytest.fixture
def service(bus_env: PrivateBus) -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen([sys.executable, "-c", SERVICE], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=dict(os.environ))
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        line = proc.stdout.readline() if ready else b""
        assert line == b"ready\n", proc.stderr.read1() if proc.poll() is not None else line
        yield proc
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


@pytest.fixture
def connection(bus_env: PrivateBus) -> Iterator[Connection]:
    conn = connect(bus_env.address)
    try:
        yield conn
    finally:
        conn.close()


def bus_call(conn: Connection, member: str, signature: str = "", *args: object):
    return conn.call(method_call(BUS_NAME, BUS_PATH, BUS_INTERFACE, member, signature, args))


def test_hello_gives_a_unique_name(connection: Connection) -> None:
    assert connection.unique_name.startswith(":")
    assert connection.passes_fds


def test_list_names_and_our_own_uid(connection: Connection) -> None:
    reply = bus_call(connection, "ListNames")
    assert reply.type == METHOD_RETURN and reply.signature == "as"
    assert {BUS_NAME, connection.unique_name} <= set(reply.body[0])
    assert bus_call(connection, "GetConnectionUnixUser", "s",
                    connection.unique_name).body == (os.geteuid(),)


def test_error_reply(connection: Connection) -> None:
    reply = bus_call(connection, "GetNameOwner", "s", "org.hostel1.nobody")
    assert reply.type == ERROR
    assert reply.error_name == "org.freedesktop.DBus.Error.NameHasNoOwner"
    assert "org.hostel1.nobody" in reply.body[0]


def test_client_without_a_daemon(bus_env: PrivateBus) -> None:
    with Client() as client, pytest.raises(DaemonUnavailable, match="hosteld is not running"):
        client.call("/org/hostel1", "org.freedesktop.DBus.Peer", "Ping")


def test_client_without_a_bus(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    for address, why in [(f"unix:path={tmp_path}/missing", "No such file"),
                         ("tcp:host=localhost,port=1", "no usable entry")]:
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", address)
        with pytest.raises(DaemonUnavailable, match=f"cannot reach the system bus at .*{why}"):
            Client()


def test_error_from_a_service_is_call_failed(service: subprocess.Popen) -> None:
    with Client() as client, pytest.raises(CallFailed, match="failed on purpose") as failure:
        client.call(TEST_PATH, TEST_INTERFACE, "Fail")
    assert failure.value.name == "org.hostel1.Test.Error.Deliberate"


def test_descriptors_both_ways(service: subprocess.Popen) -> None:
    """We send a pipe's write end; the service writes through it and sends back a
    duplicate, which we write through; both writes arrive, and ours stays open."""
    read_end, write_end = os.pipe()
    returned = None
    try:
        with Client() as client:
            (returned,) = client.call(TEST_PATH, TEST_INTERFACE, "Dup", "h", write_end)
        assert isinstance(returned, int) and returned not in (read_end, write_end)
        os.fstat(write_end)  # still ours
        os.write(returned, b"client")
        assert os.read(read_end, 100) == b"service:client"
    finally:
        for fd in (read_end, write_end, returned):
            if fd is not None:
                os.close(fd)


def test_signals_reach_a_filter_while_a_call_is_in_flight(service: subprocess.Popen) -> None:
    fields = dict(type="signal", interface=TEST_INTERFACE, member="Tick")
    with Client() as client:
        client.add_match(MatchRule(sender="org.hostel1", **fields))
        with client.filter(MatchRule(**fields)) as queue:
            assert client.call(TEST_PATH, TEST_INTERFACE, "Emit", "u", 3) == (3,)
            assert [message.body for message in queue] == [(0,), (1,), (2,)]
            queue.clear()
            client.call_no_reply(TEST_PATH, TEST_INTERFACE, "Emit", "u", 2)
            while len(queue) < 2:
                client.receive_into(queue)
            assert [message.body for message in queue] == [(0,), (1,)]
        assert all(message.path == TEST_PATH for message in queue)


def test_reply_timeout(service: subprocess.Popen) -> None:
    with Client() as client:
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="no reply to Hang within 0.3 s"):
            client.call(TEST_PATH, TEST_INTERFACE, "Hang", timeout=0.3)
        assert time.monotonic() - started < 5
        assert client.call(TEST_PATH, TEST_INTERFACE, "Emit", "u", 0) == (0,)  # still usable


def test_bus_stopping_mid_call_is_a_connection_error(bus_env: PrivateBus,
                                                     service: subprocess.Popen) -> None:
    stopper = threading.Timer(0.3, bus_env.stop)
    with Client() as client:
        stopper.start()
        try:
            with pytest.raises((ConnectionError, EOFError)):
                client.call(TEST_PATH, TEST_INTERFACE, "Hang", timeout=30)
        finally:
            stopper.join()
