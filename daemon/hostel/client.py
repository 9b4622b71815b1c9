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

__all__ = ["BUS_NAME", "CallFailed", "Client", "DaemonUnavailable", "MatchRule",
           "NeedsRoot", "bus_address"]

BUS_NAME = "org.hostel1"
_NO_DAEMON = {"org.freedesktop.DBus.Error.ServiceUnknown",
              "org.freedesktop.DBus.Error.NameHasNoOwner"}
# Refusals for lack of privilege: the bus policy's (dbus-daemon's AccessDenied, whose text
# is its rule dump) and hosteld's own (the same name, for callers other than root).
_DENIED = {"org.freedesktop.DBus.Error.AccessDenied",
           "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired"}


class DaemonUnavailable(Exception):
    """The bus or hosteld cannot be reached; the message says how to fix it."""


class CallFailed(Exception):
    """hosteld (or the bus) answered with a D-Bus error."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


class NeedsRoot(CallFailed):
    """The bus or hosteld refused the call to a caller without privilege. The bus's own
    text is a policy dump no user should have to read: the message is what to do."""

    def __init__(self, name: str, detail: str, member: str) -> None:
        super().__init__(name, f"{member} requires root (run it as root, e.g. with sudo)")
        self.detail = detail


def bus_address() -> str:
    return os.environ.get("DBUS_SYSTEM_BUS_ADDRESS", DEFAULT_SYSTEM_BUS)


def _body(reply: Message, member: str = "this operation") -> tuple[Any, ...]:
    """A reply's values, or its error raised as the exception hostelctl reports."""
    if reply.type != ERROR:
        return reply.body
    name = reply.error_name or ""
    text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else name
    if name in _DENIED:
        raise NeedsRoot(name, text, member)
    if name in _NO_DAEMON:
        raise DaemonUnavailable(
            f"hosteld is not running (nobody owns {BUS_NAME} on {bus_address()}). "
            "Start it with 'systemctl start hosteld', or run 'hosteld' as root.")
    raise CallFailed(name, text)


def _what(path: str, interface: str, member: str) -> str:
    """How a refused call is named to the user: the method, and the object it was for."""
    if interface == "org.freedesktop.DBus.Properties":
        return f"reading the properties of {path}"
    return f"{interface.rsplit('.', 1)[-1]}.{member}"


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
        return _body(self._conn.call(message, timeout=timeout), _what(path, interface, member))

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
        if TYPE_CHECKING:
            from collections import deque
        else:  # the C type itself: the `collections` package costs every hostelctl run ~1.5 ms
            from _collections import deque

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
