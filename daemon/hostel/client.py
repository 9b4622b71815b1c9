"""A small blocking D-Bus client for hostelctl.

hostelctl runs once per command, so its start-up is its speed: asyncio plus
dbus-fast cost ~130 ms to import and even jeepney's blocking I/O ~7.5 ms (it
pulls in `re`, `typing` and `selectors`). This speaks D-Bus through our own
hostel.dbuswire, which imports nothing heavier than os and struct."""
from __future__ import annotations

import os

from hostel.dbuswire import (BUS_INTERFACE, BUS_NAME as MESSAGE_BUS, BUS_PATH,
                             DEFAULT_SYSTEM_BUS, ERROR, NO_REPLY_EXPECTED, MatchRule, Message,
                             connect, method_call)

TYPE_CHECKING = False  # importing typing costs hostelctl a few ms at every start
if TYPE_CHECKING:
    from typing import Any

__all__ = ["BUS_NAME", "CallFailed", "Client", "DaemonUnavailable", "MatchRule", "bus_address"]

BUS_NAME = "org.hostel1"
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


def _body(reply: Message) -> tuple[Any, ...]:
    """A reply's values, or its error raised as the exception hostelctl reports."""
    if reply.type != ERROR:
        return reply.body
    name = reply.error_name or ""
    text = reply.body[0] if reply.body else name
    if name in _NO_DAEMON:
        raise DaemonUnavailable(
            f"hosteld is not running (nobody owns {BUS_NAME} on {bus_address()}). "
            "Start it with 'systemctl start hosteld', or run 'hosteld' as root.")
    raise CallFailed(name, text)


class Client:
    def __init__(self) -> None:
        try:
            self._conn = connect(bus_address())
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
        message = method_call(BUS_NAME, path, interface, member, signature, args)
        return _body(self._conn.call(message, timeout=timeout))

    def call_no_reply(self, path: str, interface: str, member: str, signature: str = "",
                      *args: Any) -> None:
        """Send a call without waiting: for methods that block until something finishes."""
        self._conn.send(method_call(BUS_NAME, path, interface, member, signature, args,
                                    flags=NO_REPLY_EXPECTED))

    def add_match(self, rule: MatchRule) -> None:
        """Ask the bus to route matching signals to us (org.freedesktop.DBus.AddMatch).

        A refused rule raises CallFailed: waiting for signals that cannot come would hang."""
        _body(self._conn.call(method_call(MESSAGE_BUS, BUS_PATH, BUS_INTERFACE, "AddMatch", "s",
                                          (str(rule),))))

    def filter(self, rule: MatchRule) -> Any:
        """Collect messages matching `rule` (unbounded) while other calls run: a
        context manager giving the deque they are appended to."""
        from collections import deque

        queue: deque[Message] = deque()
        return self._conn.filter(rule, queue)

    def receive_into(self, _queue: Any) -> None:
        """Block for the next message; filters put it where it belongs."""
        self._conn.receive_and_route()

    def get_property(self, path: str, interface: str, name: str) -> Any:
        (variant,) = self.call(path, "org.freedesktop.DBus.Properties", "Get", "ss",
                               interface, name)
        return variant[1]

    def get_all(self, path: str, interface: str) -> dict[str, Any]:
        (props,) = self.call(path, "org.freedesktop.DBus.Properties", "GetAll", "s", interface)
        return {key: value for key, (_sig, value) in props.items()}
