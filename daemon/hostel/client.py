"""A small blocking D-Bus client for hostelctl.

hostelctl runs once per command, so its start-up is its speed: jeepney's
blocking I/O costs ~25 ms to import where asyncio plus dbus-fast cost
~130 ms. Nothing here imports asyncio."""
from __future__ import annotations

import os
from typing import Any

from jeepney import DBusAddress, HeaderFields, MessageType, new_method_call
from jeepney.io.blocking import open_dbus_connection

BUS_NAME = "org.hostel1"
DEFAULT_SYSTEM_BUS = "unix:path=/run/dbus/system_bus_socket"
_NO_DAEMON = {"org.freedesktop.DBus.Error.ServiceUnknown",
              "org.freedesktop.DBus.Error.NameHasNoOwner"}


class DaemonUnavailable(Exception):
    """The bus or hosteld cannot be reached; the message says how to fix it."""


class CallFailed(Exception):
    """hosteld (or the bus) answered with a D-Bus error."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


def bus_address() -> str:
    return os.environ.get("DBUS_SYSTEM_BUS_ADDRESS", DEFAULT_SYSTEM_BUS)


class Client:
    def __init__(self) -> None:
        try:
            self._conn = open_dbus_connection(bus="SYSTEM", enable_fds=True)
        except (OSError, ValueError) as e:
            raise DaemonUnavailable(
                f"cannot reach the system bus at {bus_address()}: {e}. Is dbus-daemon running? "
                "(set DBUS_SYSTEM_BUS_ADDRESS to use another bus)") from e

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, path: str, interface: str, member: str, signature: str = "",
             *args: Any, timeout: float | None = None) -> tuple[Any, ...]:
        address = DBusAddress(path, bus_name=BUS_NAME, interface=interface)
        msg = new_method_call(address, member, signature or None, args)
        reply = self._conn.send_and_get_reply(msg, timeout=timeout)
        if reply.header.message_type == MessageType.error:
            name = reply.header.fields.get(HeaderFields.error_name, "")
            text = reply.body[0] if reply.body else name
            if name in _NO_DAEMON:
                raise DaemonUnavailable(
                    f"hosteld is not running (nobody owns {BUS_NAME} on {bus_address()}). "
                    "Start it with 'systemctl start hosteld', or run 'hosteld' as root.")
            raise CallFailed(name, text)
        return reply.body

    def call_no_reply(self, path: str, interface: str, member: str, signature: str = "",
                      *args: Any) -> None:
        """Send a call without waiting: for methods that block until something finishes."""
        address = DBusAddress(path, bus_name=BUS_NAME, interface=interface)
        self._conn.send(new_method_call(address, member, signature or None, args))

    def add_match(self, rule: Any) -> None:
        """Ask the bus to route matching signals to us (org.freedesktop.DBus.AddMatch)."""
        from jeepney.bus_messages import message_bus

        self._conn.send_and_get_reply(message_bus.AddMatch(rule))

    def filter(self, rule: Any) -> Any:
        """Collect messages matching `rule` (unbounded) while other calls run."""
        from collections import deque

        return self._conn.filter(rule, queue=deque())

    def receive_into(self, _queue: Any) -> None:
        """Block for the next message; filters put it where it belongs."""
        self._conn.recv_messages()

    def get_property(self, path: str, interface: str, name: str) -> Any:
        (variant,) = self.call(path, "org.freedesktop.DBus.Properties", "Get", "ss",
                               interface, name)
        return variant[1]

    def get_all(self, path: str, interface: str) -> dict[str, Any]:
        (props,) = self.call(path, "org.freedesktop.DBus.Properties", "GetAll", "s", interface)
        return {key: value for key, (_sig, value) in props.items()}
