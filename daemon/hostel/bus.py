"""D-Bus glue: errors, object paths, caller credentials, authorization, dispatch.

dbus-fast's service API calls methods synchronously and never tells them who
called. hostel needs both: methods that wait (spawning, mounting, asking the
bus for the caller's uid) and a root-only rule for every mutating method. So
the interfaces here are ordinary dbus-fast ServiceInterfaces (introspection,
properties and signals stay dbus-fast's), but calls to their methods are
taken by Dispatcher first, which authorizes, runs the method as a task and
translates errors. Everything that touches dbus-fast internals is in this
file, so a library upgrade has one place to check."""
from __future__ import annotations

import array
import asyncio
import contextvars
import copy
import logging
import os
import socket
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

from dbus_fast import DBusError, Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.aio.message_bus import _MessageWriter
from dbus_fast._private.util import replace_idx_with_fds
from dbus_fast.send_reply import SendReply
from dbus_fast.service import ServiceInterface

# The errors live in hostel.errors (importable without dbus_fast); re-exported here.
from hostel.errors import (  # noqa: F401
    ACCESS_DENIED, ERROR_PREFIX, INVALID_ARGS, AccessDenied, AlreadyExists, HostelError,
    InvalidArgs, NoSuchObject, NotImplementedYet, NotSupported)

log = logging.getLogger(__name__)

# Object paths ------------------------------------------------------------------

_PATH_LETTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_PATH_DIGITS = frozenset("0123456789")


def escape_path_label(label: str) -> str:
    """Encode any string as one object path element, as sd_bus_path_encode does.

    Matching systemd's encoding means machinectl users and busctl users see the
    same paths they know from machined ("foo-bar" -> "foo_2dbar")."""
    if not label:
        return "_"
    out = []
    for i, byte in enumerate(label.encode()):
        if chr(byte) in _PATH_LETTERS or (chr(byte) in _PATH_DIGITS and i > 0):
            out.append(chr(byte))
        else:
            out.append(f"_{byte:02x}")
    return "".join(out)


def unescape_path_label(element: str) -> str:
    if element == "_":
        return ""
    raw = bytearray()
    i = 0
    while i < len(element):
        if element[i] == "_":
            raw.append(int(element[i + 1:i + 3], 16))
            i += 3
        else:
            raw.append(ord(element[i]))
            i += 1
    return raw.decode(errors="surrogateescape")


# Method metadata -----------------------------------------------------------------

def mutating(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a D-Bus method as changing state: only root may call it.

    Apply it below @dbus_method so the mark sits on the function dbus-fast keeps."""
    setattr(fn, "__hostel_mutating__", True)  # a mark on the function, read back by name
    return fn


@dataclass(frozen=True)
class Caller:
    """Who is calling the method being served (set for the duration of the call)."""

    sender: str
    bus: "MessageBus"


current_caller: contextvars.ContextVar[Caller] = contextvars.ContextVar("hostel_caller")

# Whether property values being read may include secrets (a machine's
# environment and console output, volumes' key files and options). Only while
# a root caller's Properties.Get/GetAll or GetManagedObjects is served; never
# for signals (InterfacesAdded carries every property to every listener).
_secrets_visible: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "hostel_secrets_visible", default=False)


def secrets_visible() -> bool:
    """For property getters: show secrets, or their redacted form."""
    return _secrets_visible.get()


_PROPERTY_READS = frozenset({("org.freedesktop.DBus.Properties", "Get"),
                             ("org.freedesktop.DBus.Properties", "GetAll"),
                             ("org.freedesktop.DBus.ObjectManager", "GetManagedObjects")})


# Credentials ---------------------------------------------------------------------

class Credentials:
    """Looks up callers' uids with the bus, caching by unique name.

    Unique names are never reused while the bus runs, so a cached answer
    cannot go stale; the cache is bounded so a churn of clients cannot grow it."""

    def __init__(self, bus: MessageBus, size: int = 4096) -> None:
        self._bus = bus
        self._size = size
        self._uids: OrderedDict[str, int] = OrderedDict()

    async def uid(self, sender: str) -> int:
        if sender in self._uids:
            self._uids.move_to_end(sender)
            return self._uids[sender]
        reply = await self._bus.call(Message(
            destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus", member="GetConnectionUnixUser",
            signature="s", body=[sender]))
        if reply.message_type == MessageType.ERROR:
            raise AccessDenied(f"cannot determine the uid of caller {sender}: {reply.body}")
        uid = reply.body[0]
        self._uids[sender] = uid
        if len(self._uids) > self._size:
            self._uids.popitem(last=False)
        return uid


# Dispatch ------------------------------------------------------------------------

class Dispatcher:
    """Serves calls to hostel's interfaces: authorize, run as a task, reply."""

    def __init__(self, bus: MessageBus) -> None:
        self._bus = bus
        self._credentials = Credentials(bus)
        self._interfaces: dict[str, dict[str, ServiceInterface]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        bus.add_message_handler(self._on_message)

    def export(self, path: str, interface: ServiceInterface) -> None:
        if self._bus.connected:  # else rebind() exports it on the next connection
            self._bus.export(path, interface)
        self._interfaces.setdefault(path, {})[interface.name] = interface

    def unexport(self, path: str, interface: ServiceInterface) -> None:
        if self._bus.connected:
            self._bus.unexport(path, interface)
        exported = self._interfaces.get(path, {})
        exported.pop(interface.name, None)
        if not exported:
            self._interfaces.pop(path, None)

    def rebind(self, bus: MessageBus) -> None:
        """Serve on a new connection (the bus restarted): every object exported so far is
        exported there, and callers' uids are looked up afresh (unique names are per bus)."""
        self._bus = bus
        self._credentials = Credentials(bus)
        bus.add_message_handler(self._on_message)
        for path, interfaces in self._interfaces.items():
            for interface in interfaces.values():
                bus.export(path, interface)

    def _find(self, msg: Message) -> tuple[ServiceInterface, Any] | None:
        for name, interface in self._interfaces.get(msg.path or "", {}).items():
            if msg.interface not in (None, name):
                continue
            for method in ServiceInterface._get_methods(interface):
                if method.name == msg.member and method.in_signature == msg.signature:
                    return interface, method
        return None

    def _all_properties(self, msg: Message) -> Message:
        """Properties.GetAll("") (every interface at once), which sd-bus clients such as
        machinectl send and dbus-fast does not support."""
        values: dict[str, Variant] = {}
        assert msg.path is not None, "a method call always names its object"
        for interface in self._interfaces[msg.path].values():
            for prop in ServiceInterface._get_properties(interface):
                if not prop.disabled and prop.access.readable():
                    values[prop.name] = Variant(prop.signature, prop.prop_getter(interface))
        return Message.new_method_return(msg, "a{sv}", [values])

    def _on_message(self, msg: Message) -> bool:
        if msg.message_type != MessageType.METHOD_CALL:
            return False
        if (msg.interface, msg.member) in _PROPERTY_READS:
            self._start(self._read_properties(msg))
            return True
        found = self._find(msg)
        if found is None:
            return False  # dbus-fast answers: Introspect, Properties, unknown method
        # dbus-fast hands consecutive messages without descriptors the same (empty)
        # list object and later appends the next message's descriptors to it, so a
        # message's unix_fds can grow after the fact. Take this message's own now,
        # while it is the last one read.
        fds = list(msg.unix_fds)
        self._start(self._serve(msg, fds, *found))
        return True

    def _start(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _caller_is_root(self, sender: str | None) -> bool:
        try:
            return sender is not None and await self._credentials.uid(sender) == 0
        except AccessDenied:
            return False

    async def _read_properties(self, msg: Message) -> None:
        """Property reads, answered by dbus-fast's own handlers (or GetAll("") here) once
        the caller's uid is known, so that getters can tell whether to show secrets."""
        visible = await self._caller_is_root(msg.sender)
        token = _secrets_visible.set(visible)
        try:
            if msg.member == "GetAll" and msg.body == [""] and msg.path in self._interfaces:
                self._bus.send(self._all_properties(msg))
                return
            handler = (self._bus._default_get_managed_objects_handler
                       if msg.member == "GetManagedObjects"
                       else self._bus._default_properties_handler)
            with SendReply(self._bus, msg) as send_reply:
                handler(msg, send_reply)
        finally:
            _secrets_visible.reset(token)

    async def _authorize(self, msg: Message, method: Any) -> None:
        if not getattr(method.fn, "__hostel_mutating__", False):
            return
        uid = await self._credentials.uid(msg.sender)
        if uid != 0:
            raise AccessDenied(f"{msg.interface or 'method'}.{msg.member} changes state and "
                               f"needs root; caller {msg.sender} has uid {uid}")

    async def _serve(self, msg: Message, fds: list[int], interface: ServiceInterface,
                     method: Any) -> None:
        current_caller.set(Caller(msg.sender, self._bus))
        try:
            reply = await self._call(msg, fds, interface, method)
        finally:
            for fd in fds:
                os.close(fd)  # methods dup() any descriptor they keep
        if reply is not None and not msg.flags & 0x1:  # NO_REPLY_EXPECTED
            self._bus.send(reply)

    async def _call(self, msg: Message, fds: list[int], interface: ServiceInterface,
                    method: Any) -> Message | None:
        try:
            await self._authorize(msg, method)
            args = replace_idx_with_fds(msg.signature, copy.deepcopy(msg.body), fds) \
                if fds else msg.body
            result = method.fn(interface, *args)
            if asyncio.iscoroutine(result):
                result = await result
            body, fds = ServiceInterface._fn_result_to_body(
                result, method.out_signature_tree, True)
            return Message(message_type=MessageType.METHOD_RETURN, reply_serial=msg.serial,
                           destination=msg.sender, signature=method.out_signature,
                           body=body, unix_fds=fds)
        except HostelError as e:
            return DBusError(e.dbus_name, str(e))._as_message(msg)
        except DBusError as e:
            return e._as_message(msg)
        except Exception as e:  # the one boundary where anything must become a reply
            log.exception("%s.%s on %s failed unexpectedly", msg.interface, msg.member, msg.path)
            return DBusError(f"{ERROR_PREFIX}.Internal",
                             f"internal error in hosteld ({type(e).__name__}: {e}); "
                             "see the daemon's log")._as_message(msg)


# Connection ----------------------------------------------------------------------

class _PatientWriter(_MessageWriter):
    """dbus-fast's writer, minus its habit of dropping the connection on EAGAIN.

    The library writes to a non-blocking socket and treats BlockingIOError as
    fatal (the bug inherited from dbus-next, issue 153): a burst of replies that
    fills the socket buffer disconnects the daemon from the bus. Here a full
    buffer means what it should: keep the rest queued and wait for the socket
    to become writable."""

    def write_callback(self, remove_writer: bool = True) -> None:
        try:
            self._try_write(remove_writer)
        except (BlockingIOError, InterruptedError):
            self.loop.add_writer(self._fd(), self.write_callback)
        except Exception as e:  # same contract as the library: fail the pending send
            if self.fut is not None and not self.fut.done():
                self.fut.set_exception(e)
            self.bus._finalize(e)

    def _fd(self) -> int:
        assert self.fd is not None, "dbus-fast makes its writer once the socket is connected"
        return self.fd

    def _try_write(self, remove_writer: bool) -> None:
        sock = self.sock
        assert sock is not None, "dbus-fast makes its writer once the socket is connected"
        while True:
            if self.buf is None:
                if not self.messages:
                    if remove_writer:
                        self.loop.remove_writer(self._fd())
                    return
                buf, self.unix_fds, self.fut = self.messages.popleft()
                self.buf = memoryview(buf)
                self.offset = 0
            if self.unix_fds and self.negotiate_unix_fd:
                ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", self.unix_fds))]
                self.offset += sock.sendmsg([self.buf[self.offset:]], ancdata)
                self.unix_fds = None
            else:
                self.offset += sock.send(self.buf[self.offset:])
            if self.offset < len(self.buf):
                self.loop.add_writer(self._fd(), self.write_callback)
                return
            self.buf = None
            if self.fut is not None and not self.fut.done():
                self.fut.set_result(None)


def make_patient(bus: MessageBus) -> MessageBus:
    """Give a connected bus the writer that survives a full socket."""
    bus._writer.__class__ = _PatientWriter
    return bus


async def connect_system_bus(negotiate_unix_fd: bool = True) -> MessageBus:
    """Connect to the system bus (DBUS_SYSTEM_BUS_ADDRESS is honoured by dbus-fast)."""
    from dbus_fast import BusType

    bus = MessageBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=negotiate_unix_fd)
    return make_patient(await bus.connect())


async def request_name(bus: MessageBus, name: str) -> bool:
    """Own `name` without queueing; False when another connection holds it."""
    from dbus_fast import NameFlag, RequestNameReply

    reply = await bus.request_name(name, NameFlag.DO_NOT_QUEUE)
    return reply in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER)
