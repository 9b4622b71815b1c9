"""A minimal blocking D-Bus client: the wire format, authentication, calls and signals.

hostelctl runs once per command, so what it imports is its start-up time:
jeepney's blocking client costs ~7.5 ms to import (it pulls in `re`, `typing`,
`selectors`), dbus-fast plus asyncio ~130 ms. This module needs only os,
struct, time and the socket module's C core, `_socket`: the `socket` wrapper
imports `selectors` and `enum` (~7 ms here) and `array` imports `collections`
(~1.8 ms), for nothing a client needs. The reference is the D-Bus
specification (https://dbus.freedesktop.org/doc/dbus-specification.html):
messages go out little-endian and come in in either byte order; every type is
supported, and unix file descriptors travel both ways.

Values are plain Python, as jeepney represents them (hostel's callers already
build them that way): a variant is a (signature, value) tuple, a struct a
tuple, an array a list, `a{..}` a dict, `ay` bytes (a list of ints is accepted
going out), `h` a plain int file descriptor. Outgoing descriptors stay the
caller's; incoming ones become the receiver's to close.

Everything the peer sends is checked before it is used: a malformed message
raises MalformedMessage (a ValueError) saying what is wrong and where."""
from __future__ import annotations

import _socket
import os
import struct
import time

TYPE_CHECKING = False  # importing typing costs hostelctl a few ms at every start
if TYPE_CHECKING:
    from collections import deque
    from typing import Any

METHOD_CALL, METHOD_RETURN, ERROR, SIGNAL = 1, 2, 3, 4
NO_REPLY_EXPECTED = 0x1

BUS_NAME = "org.freedesktop.DBus"
BUS_PATH = "/org/freedesktop/DBus"
BUS_INTERFACE = "org.freedesktop.DBus"
DEFAULT_SYSTEM_BUS = "unix:path=/run/dbus/system_bus_socket"

MAX_ARRAY_BYTES = 64 << 20
MAX_MESSAGE_BYTES = 128 << 20
MAX_SIGNATURE_LENGTH = 255
MAX_TYPE_NESTING = 32  # arrays, and separately structs, within one signature
MAX_VALUE_NESTING = 64  # containers around a value, across variants
_FIXED_HEADER_BYTES = 16  # up to and including the header fields' array length
_MAX_AUTH_LINE = 16 << 10
_RECEIVE_BYTES = 64 << 10
_MAX_FDS_PER_RECEIVE = 253  # the kernel's SCM_MAX_FD
_FD_BYTES = 4  # a descriptor in SCM_RIGHTS data is a C int

# Fixed-size types: struct format (size and alignment are the same).
_FIXED = {"y": "B", "b": "I", "n": "h", "q": "H", "i": "i", "u": "I", "x": "q", "t": "Q",
          "d": "d", "h": "I"}
_ALIGNMENT = {"y": 1, "b": 4, "n": 2, "q": 2, "i": 4, "u": 4, "x": 8, "t": 8, "d": 8, "h": 4,
              "s": 4, "o": 4, "g": 1, "a": 4, "(": 8, "{": 8, "v": 1}
_BASIC = "ybnqiuxtdhsog"
_PATH_CHARACTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
_BYTE_ORDERS = {ord("l"): "<", ord("B"): ">"}

# Header field code -> (Message attribute, the signature its variant must have).
_HEADER_FIELDS = {1: ("path", "o"), 2: ("interface", "s"), 3: ("member", "s"),
                  4: ("error_name", "s"), 5: ("reply_serial", "u"), 6: ("destination", "s"),
                  7: ("sender", "s"), 8: ("signature", "g")}
_UNIX_FDS_FIELD = 9
_REQUIRED_FIELDS = {METHOD_CALL: ("path", "member"), METHOD_RETURN: ("reply_serial",),
                    ERROR: ("error_name", "reply_serial"),
                    SIGNAL: ("path", "interface", "member")}
_TYPE_NAMES = {"method_call": METHOD_CALL, "method_return": METHOD_RETURN, "error": ERROR,
               "signal": SIGNAL}


class MalformedMessage(ValueError):
    """The peer sent bytes that break the D-Bus wire format."""


class AuthenticationFailed(OSError):
    """The bus refused us before any message was exchanged."""


# Signatures ----------------------------------------------------------------------

_split_cache: dict[str, tuple[str, ...]] = {}


def split_signature(signature: str) -> tuple[str, ...]:
    """The complete types in `signature`, checked against the specification's rules.

    Every struct, array and variant is read and written by splitting its
    signature, so the answers are cached (a bounded cache: peers choose them)."""
    types = _split_cache.get(signature)
    if types is not None:
        return types
    if len(signature) > MAX_SIGNATURE_LENGTH:
        raise ValueError(f"D-Bus signature longer than {MAX_SIGNATURE_LENGTH}: {signature!r}")
    found = []
    start = 0
    while start < len(signature):
        end = _type_end(signature, start, 0, 0)
        found.append(signature[start:end])
        start = end
    types = tuple(found)
    if len(_split_cache) < 512:
        _split_cache[signature] = types
    return types


def _type_end(signature: str, start: int, arrays: int, structs: int) -> int:
    """Where the complete type beginning at `start` ends; ValueError if it is not one."""
    if start >= len(signature):
        raise ValueError(f"invalid D-Bus signature {signature!r}: it ends inside a type")
    code = signature[start]
    if code in _BASIC or code == "v":
        return start + 1
    if code == "a":
        if arrays == MAX_TYPE_NESTING:
            raise ValueError(f"invalid D-Bus signature {signature!r}: arrays nested more than "
                             f"{MAX_TYPE_NESTING} deep")
        if signature.startswith("{", start + 1):
            return _dict_entry_end(signature, start + 1, arrays + 1, structs)
        return _type_end(signature, start + 1, arrays + 1, structs)
    if code == "(":
        if structs == MAX_TYPE_NESTING:
            raise ValueError(f"invalid D-Bus signature {signature!r}: structs nested more than "
                             f"{MAX_TYPE_NESTING} deep")
        if signature.startswith(")", start + 1):
            raise ValueError(f"invalid D-Bus signature {signature!r}: empty struct")
        position = start + 1
        while not signature.startswith(")", position):
            position = _type_end(signature, position, arrays, structs + 1)
        return position + 1
    raise ValueError(f"invalid D-Bus signature {signature!r}: unexpected {code!r} at {start}")


def _dict_entry_end(signature: str, start: int, arrays: int, structs: int) -> int:
    """A dict entry ({key value}, only ever an array's element) beginning at `start`."""
    if structs == MAX_TYPE_NESTING:
        raise ValueError(f"invalid D-Bus signature {signature!r}: structs nested more than "
                         f"{MAX_TYPE_NESTING} deep")
    key = signature[start + 1:start + 2]
    if not key or key not in _BASIC:
        raise ValueError(f"invalid D-Bus signature {signature!r}: a dict key must be a basic "
                         f"type, not {key!r}")
    end = _type_end(signature, start + 2, arrays, structs + 1)
    if not signature.startswith("}", end):
        raise ValueError(f"invalid D-Bus signature {signature!r}: a dict entry holds exactly "
                         "a key and a value")
    return end + 1


def is_object_path(path: str) -> bool:
    """'/' or '/'-separated non-empty elements of [A-Za-z0-9_], without a trailing '/'."""
    if path == "/":
        return True
    if not path.startswith("/") or path.endswith("/"):
        return False
    return all(element and _PATH_CHARACTERS.issuperset(element)
               for element in path[1:].split("/"))


# Marshalling ---------------------------------------------------------------------

class _Writer:
    """Marshals values by signature; 'h' values are collected into `fds`.

    Offsets are relative to the start of the buffer, so a body must start on
    an 8-byte boundary of its message (it does: the header is padded)."""

    def __init__(self, byte_order: str) -> None:
        self.order = byte_order
        self.buffer = bytearray()
        self.fds: list[int] = []
        self.depth = 0

    def align(self, boundary: int) -> None:
        self.buffer += bytes(-len(self.buffer) % boundary)

    def write(self, type_: str, value: Any) -> None:
        code = type_[0]
        self.align(_ALIGNMENT[code])
        if code in _FIXED:
            self._fixed(code, value)
        elif code in "so":
            self._string(code, value)
        elif code == "g":
            self._signature(value)
        elif code == "a":
            self._nested(self._array, type_[1:], value)
        elif code == "(":
            self._nested(self._struct, type_, value)
        else:
            self._nested(self._variant, type_, value)

    def _nested(self, write: Any, type_: str, value: Any) -> None:
        """Containers nest at most 64 deep in all, as the bus enforces (a value can
        nest variants without end, or be a cycle)."""
        self.depth += 1
        if self.depth > MAX_VALUE_NESTING:
            raise ValueError(f"D-Bus values nest at most {MAX_VALUE_NESTING} containers deep")
        write(type_, value)
        self.depth -= 1

    def _fixed(self, code: str, value: Any) -> None:
        if code == "b" and value not in (True, False):
            raise ValueError(f"D-Bus boolean must be True or False, not {value!r}")
        if code == "h":
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"D-Bus 'h' value must be a file descriptor (int), not {value!r}")
            self.fds.append(value)
            value = len(self.fds) - 1
        try:
            self.buffer += struct.pack(self.order + _FIXED[code], value)
        except struct.error as e:
            raise ValueError(f"{value!r} is not a D-Bus {code!r} value: {e}") from None

    def _string(self, code: str, value: Any) -> None:
        if not isinstance(value, str):
            raise TypeError(f"D-Bus {code!r} value must be a str, not {type(value).__name__}")
        if "\0" in value:
            raise ValueError(f"D-Bus strings cannot contain a nul character: {value!r}")
        if code == "o" and not is_object_path(value):
            raise ValueError(f"not a D-Bus object path: {value!r}")
        data = value.encode()
        self.buffer += struct.pack(self.order + "I", len(data)) + data + b"\0"

    def _signature(self, value: Any) -> None:
        if not isinstance(value, str):
            raise TypeError(f"D-Bus signature must be a str, not {type(value).__name__}")
        split_signature(value)
        self.buffer += bytes((len(value),)) + value.encode("ascii") + b"\0"

    def _array(self, element: str, value: Any) -> None:
        length_at = len(self.buffer)
        self.buffer += bytes(4)
        self.align(_ALIGNMENT[element[0]])
        start = len(self.buffer)
        if element == "y":
            self.buffer += bytes(value)
        elif element[0] == "{":
            key_type, value_type = split_signature(element[1:-1])
            for key, item in value.items():
                self.align(8)
                self.write(key_type, key)
                self.write(value_type, item)
        else:
            for item in value:
                self.write(element, item)
        length = len(self.buffer) - start
        if length > MAX_ARRAY_BYTES:
            raise ValueError(f"D-Bus array of {length} bytes, more than {MAX_ARRAY_BYTES}")
        struct.pack_into(self.order + "I", self.buffer, length_at, length)

    def _struct(self, type_: str, value: Any) -> None:
        fields = split_signature(type_[1:-1])
        if not isinstance(value, (tuple, list)) or len(value) != len(fields):
            raise ValueError(f"D-Bus struct {type_} needs {len(fields)} fields, got {value!r}")
        for field_type, item in zip(fields, value):
            self.write(field_type, item)

    def _variant(self, _type: str, value: Any) -> None:
        if not isinstance(value, tuple) or len(value) != 2:
            raise ValueError(f"a D-Bus variant is a (signature, value) tuple, not {value!r}")
        signature, inner = value
        types = split_signature(signature)
        if len(types) != 1:
            raise ValueError(f"a variant's signature is one complete type, not {signature!r}")
        self._signature(signature)
        self.write(types[0], inner)


# Unmarshalling -------------------------------------------------------------------

class _Reader:
    """Unmarshals values by signature, checking every length, padding byte and limit.

    `fds` are the descriptors that came with the message ('h' values index
    them); `fds_used` records which the values refer to."""

    def __init__(self, data: bytes, byte_order: str) -> None:
        self.data = data
        self.order = byte_order
        self.pos = 0
        self.depth = 0
        self.fds: list[int] = []
        self.fds_used: set[int] = set()

    def take(self, count: int) -> int:
        """Advance over `count` bytes; where they start."""
        start = self.pos
        if start + count > len(self.data):
            raise MalformedMessage(f"truncated: {count} bytes needed at offset {start}, "
                                   f"{len(self.data) - start} left")
        self.pos = start + count
        return start

    def align(self, boundary: int) -> None:
        start = self.take(-self.pos % boundary)
        if any(self.data[start:self.pos]):
            raise MalformedMessage(f"non-zero alignment padding at offset {start}")

    def read(self, type_: str) -> Any:
        code = type_[0]
        self.align(_ALIGNMENT[code])
        if code in _FIXED:
            return self._fixed(code)
        if code in "so":
            return self._string(code)
        if code == "g":
            return self._signature()
        if code == "a":
            return self._nested(self._array, type_[1:])
        if code == "(":
            return self._nested(self._struct, type_)
        return self._nested(self._variant, type_)

    def _nested(self, read: Any, type_: str) -> Any:
        self.depth += 1
        if self.depth > MAX_VALUE_NESTING:
            raise MalformedMessage(f"containers nested more than {MAX_VALUE_NESTING} deep at "
                                   f"offset {self.pos}")
        value = read(type_)
        self.depth -= 1
        return value

    def uint32(self) -> int:
        return struct.unpack_from(self.order + "I", self.data, self.take(4))[0]

    def _fixed(self, code: str) -> Any:
        start = self.take(_ALIGNMENT[code])
        (value,) = struct.unpack_from(self.order + _FIXED[code], self.data, start)
        if code == "b":
            if value > 1:
                raise MalformedMessage(f"boolean of value {value} at offset {start}")
            return bool(value)
        if code == "h":
            if value >= len(self.fds):
                raise MalformedMessage(f"file descriptor index {value} at offset {start}, but "
                                       f"{len(self.fds)} descriptors came with the message")
            self.fds_used.add(value)
            return self.fds[value]
        return value

    def _text(self, length: int, what: str, encoding: str) -> str:
        """`length` bytes and a nul terminator, as text without nul characters."""
        start = self.take(length + 1)
        raw = self.data[start:start + length]
        if self.data[start + length] != 0:
            raise MalformedMessage(f"{what} at offset {start} is not nul-terminated")
        if 0 in raw:
            raise MalformedMessage(f"{what} at offset {start} contains a nul byte")
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError as e:
            raise MalformedMessage(f"{what} at offset {start} is not valid: {e}") from None

    def _string(self, code: str) -> str:
        text = self._text(self.uint32(), "string", "utf-8")
        if code == "o" and not is_object_path(text):
            raise MalformedMessage(f"invalid object path {text!r} before offset {self.pos}")
        return text

    def _signature(self) -> str:
        text = self._text(self.data[self.take(1)], "signature", "ascii")
        try:
            split_signature(text)
        except ValueError as e:
            raise MalformedMessage(str(e)) from None
        return text

    def _array(self, element: str) -> Any:
        length = self.uint32()
        if length > MAX_ARRAY_BYTES:
            raise MalformedMessage(f"array of {length} bytes at offset {self.pos}, more than "
                                   f"{MAX_ARRAY_BYTES}")
        self.align(_ALIGNMENT[element[0]])
        start = self.take(length)  # checks the array fits, before reading into it
        end = self.pos
        self.pos = start
        if element == "y":
            self.pos = end
            return self.data[start:end]
        if element[0] == "{":
            key_type, value_type = split_signature(element[1:-1])
            entries = {}
            while self.pos < end:
                self.align(8)
                key = self.read(key_type)
                entries[key] = self.read(value_type)
            value: Any = entries
        else:
            value = []
            while self.pos < end:
                value.append(self.read(element))
        if self.pos != end:
            raise MalformedMessage(f"array elements overrun its length, ending at offset {end}")
        return value

    def _struct(self, type_: str) -> tuple[Any, ...]:
        return tuple(self.read(field_type) for field_type in split_signature(type_[1:-1]))

    def _variant(self, _type: str) -> tuple[str, Any]:
        signature = self._signature()
        types = split_signature(signature)
        if len(types) != 1:
            raise MalformedMessage(f"variant signature {signature!r} before offset {self.pos} "
                                   "is not one complete type")
        return signature, self.read(types[0])


# Messages ------------------------------------------------------------------------

class Message:
    """One D-Bus message; `type` is METHOD_CALL, METHOD_RETURN, ERROR or SIGNAL.

    `unix_fds` are the descriptors a received message brought that its body
    refers to: the receiver's to close. Outgoing descriptors are the 'h'
    values in `body`."""

    __slots__ = ("type", "flags", "serial", "path", "interface", "member", "error_name",
                 "reply_serial", "destination", "sender", "signature", "body", "unix_fds")

    def __init__(self, message_type: int, *, flags: int = 0, serial: int = 0,
                 path: str | None = None, interface: str | None = None,
                 member: str | None = None, error_name: str | None = None,
                 reply_serial: int | None = None, destination: str | None = None,
                 sender: str | None = None, signature: str = "",
                 body: tuple[Any, ...] = ()) -> None:
        self.type = message_type
        self.flags = flags
        self.serial = serial
        self.path = path
        self.interface = interface
        self.member = member
        self.error_name = error_name
        self.reply_serial = reply_serial
        self.destination = destination
        self.sender = sender
        self.signature = signature
        self.body = tuple(body)
        self.unix_fds: list[int] = []

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__
                           if getattr(self, name) not in (None, "", (), []))
        return f"Message({fields})"

    def encode(self, serial: int, byte_order: str = "<") -> tuple[bytes, list[int]]:
        """The message's bytes with `serial`, and the descriptors to send with them.

        Little-endian unless `byte_order` is ">" (tests use that to check reading)."""
        types = split_signature(self.signature)
        if len(types) != len(self.body):
            raise ValueError(f"signature {self.signature!r} has {len(types)} types for "
                             f"{len(self.body)} values")
        body = _Writer(byte_order)
        for type_, value in zip(types, self.body):
            body.write(type_, value)
        fields = [(code, (signature, getattr(self, name)))
                  for code, (name, signature) in _HEADER_FIELDS.items()
                  if getattr(self, name) not in (None, "")]
        if body.fds:
            fields.append((_UNIX_FDS_FIELD, ("u", len(body.fds))))
        header = _Writer(byte_order)
        for type_, value in zip("yyyyuu", (ord("l" if byte_order == "<" else "B"), self.type,
                                           self.flags, 1, len(body.buffer), serial)):
            header.write(type_, value)
        header.write("a(yv)", fields)
        header.align(8)
        if len(header.buffer) + len(body.buffer) > MAX_MESSAGE_BYTES:
            raise ValueError(f"D-Bus message larger than {MAX_MESSAGE_BYTES} bytes")
        return bytes(header.buffer + body.buffer), body.fds


def method_call(destination: str | None, path: str, interface: str | None, member: str,
                signature: str = "", body: tuple[Any, ...] = (), flags: int = 0) -> Message:
    return Message(METHOD_CALL, destination=destination, path=path, interface=interface,
                   member=member, signature=signature, body=body, flags=flags)


def frame_length(data: bytes | bytearray) -> int:
    """A whole message's length, from its first 16 bytes; checked against the limits
    before anything that large is buffered."""
    order = _byte_order(data[0])
    body_length, _serial, fields_length = struct.unpack_from(order + "III", data, 4)
    if fields_length > MAX_ARRAY_BYTES:
        raise MalformedMessage(f"header fields of {fields_length} bytes, more than "
                               f"{MAX_ARRAY_BYTES}")
    total = _FIXED_HEADER_BYTES + fields_length + (-fields_length % 8) + body_length
    if total > MAX_MESSAGE_BYTES:
        raise MalformedMessage(f"message of {total} bytes, more than {MAX_MESSAGE_BYTES}")
    return total


def _byte_order(mark: int) -> str:
    order = _BYTE_ORDERS.get(mark)
    if order is None:
        raise MalformedMessage(f"not a D-Bus message: byte-order mark {bytes((mark,))!r}")
    return order


def decode_message(data: bytes, fds: list[int]) -> Message:
    """The message in `data`, which holds exactly one.

    Its descriptors are taken off the front of `fds` (those received on the
    connection and not yet claimed); any its body does not refer to are
    closed, and all of them are if the message is malformed."""
    if len(data) < _FIXED_HEADER_BYTES:
        raise MalformedMessage(f"truncated: a message header is {_FIXED_HEADER_BYTES} bytes, "
                               f"got {len(data)}")
    reader = _Reader(data, _byte_order(data[0]))
    _mark, message_type, flags, version, body_length, serial = map(reader.read, "yyyyuu")
    if version != 1:
        raise MalformedMessage(f"D-Bus protocol version {version}, expected 1")
    if serial == 0:
        raise MalformedMessage("message serial 0")
    message = Message(message_type, flags=flags, serial=serial)
    fd_count = _apply_header_fields(message, reader.read("a(yv)"))
    reader.align(8)
    if len(data) - reader.pos != body_length:
        raise MalformedMessage(f"body of {len(data) - reader.pos} bytes, the header says "
                               f"{body_length}")
    if fd_count > len(fds):
        raise MalformedMessage(f"message declares {fd_count} file descriptors, "
                               f"{len(fds)} arrived")
    reader.fds = fds[:fd_count]
    del fds[:fd_count]
    try:
        message.body = tuple(map(reader.read, split_signature(message.signature)))
        if reader.pos != len(data):
            raise MalformedMessage(f"{len(data) - reader.pos} bytes after the body's values")
    except MalformedMessage:
        close_fds(reader.fds)
        raise
    message.unix_fds = [fd for index, fd in enumerate(reader.fds) if index in reader.fds_used]
    close_fds([fd for index, fd in enumerate(reader.fds) if index not in reader.fds_used])
    return message


def _apply_header_fields(message: Message, fields: list[tuple[int, tuple[str, Any]]]) -> int:
    """Set the message's header attributes; the number of descriptors it declares."""
    fd_count = 0
    for code, (signature, value) in fields:
        if code == _UNIX_FDS_FIELD:
            expected = "u"
        elif code in _HEADER_FIELDS:
            expected = _HEADER_FIELDS[code][1]
        else:
            continue  # the specification says unknown fields are ignored
        if signature != expected:
            raise MalformedMessage(f"header field {code} has type {signature!r}, "
                                   f"expected {expected!r}")
        if code == _UNIX_FDS_FIELD:
            fd_count = value
        else:
            setattr(message, _HEADER_FIELDS[code][0], value)
    for name in _REQUIRED_FIELDS.get(message.type, ()):
        if getattr(message, name) is None:
            raise MalformedMessage(f"message of type {message.type} without its {name}")
    return fd_count


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


# Match rules ---------------------------------------------------------------------

class MatchRule:
    """Which messages to receive: str() is the bus's AddMatch rule, `matches` the
    same test on a received message.

    Locally a signal's sender is its unique name (":1.42"), not the well-known
    name it was asked for by, so rules given to `Connection.filter` usually
    leave out `sender`."""

    __slots__ = ("type", "sender", "interface", "member", "path", "path_namespace", "arg0")

    def __init__(self, *, type: str | None = None, sender: str | None = None,
                 interface: str | None = None, member: str | None = None,
                 path: str | None = None, path_namespace: str | None = None,
                 arg0: str | None = None) -> None:
        if type is not None and type not in _TYPE_NAMES:
            raise ValueError(f"match rule type must be one of {', '.join(_TYPE_NAMES)}, "
                             f"not {type!r}")
        if path is not None and path_namespace is not None:
            raise ValueError("a match rule takes path or path_namespace, not both")
        self.type = type
        self.sender = sender
        self.interface = interface
        self.member = member
        self.path = path
        self.path_namespace = path_namespace
        self.arg0 = arg0   # the first argument, a string (NameOwnerChanged's name)

    def __str__(self) -> str:
        return ",".join(f"{key}={_quote(getattr(self, key))}" for key in self.__slots__
                        if getattr(self, key) is not None)

    def __repr__(self) -> str:
        return f"MatchRule({str(self)!r})"

    def matches(self, message: Message) -> bool:
        if self.type is not None and message.type != _TYPE_NAMES[self.type]:
            return False
        for key in ("sender", "interface", "member", "path"):
            expected = getattr(self, key)
            if expected is not None and getattr(message, key) != expected:
                return False
        if self.arg0 is not None and (not message.body or message.body[0] != self.arg0):
            return False
        return self.path_namespace is None or _in_namespace(message.path, self.path_namespace)


def _quote(value: str) -> str:
    """A match rule value: in apostrophes, an apostrophe itself escaped outside them."""
    return "'" + value.replace("'", "'\\''") + "'"


def _in_namespace(path: str | None, namespace: str) -> bool:
    if path is None:
        return False
    return namespace == "/" or path == namespace or path.startswith(namespace + "/")


# Addresses -----------------------------------------------------------------------

def parse_address(address: str) -> bytes:
    """The socket address of the first usable (unix:path= or unix:abstract=) entry of
    a D-Bus server address list, as bytes: a path, or a nul and an abstract name."""
    for entry in address.split(";"):
        if not entry:
            continue
        transport, colon, parameters = entry.partition(":")
        if not colon or not transport:
            raise ValueError(f"malformed D-Bus address {address!r}: {entry!r} does not start "
                             "with a transport (such as unix:path=/run/dbus/system_bus_socket)")
        values = _address_parameters(address, parameters)
        if transport != "unix":
            continue
        if "path" in values:
            return values["path"]
        if "abstract" in values:
            return b"\0" + values["abstract"]
    raise ValueError(f"no usable entry in D-Bus address {address!r}: hostel connects to "
                     "unix:path=... or unix:abstract=... only")


def _address_parameters(address: str, parameters: str) -> dict[str, bytes]:
    values = {}
    for pair in parameters.split(","):
        if not pair:
            continue
        key, equals, value = pair.partition("=")
        if not equals or not key:
            raise ValueError(f"malformed D-Bus address {address!r}: {pair!r} is not key=value")
        values[key] = _unescape(address, value)
    return values


def _unescape(address: str, value: str) -> bytes:
    """Undo the address syntax's %xx escapes."""
    head, *escaped = value.split("%")
    out = bytearray(head.encode())
    for part in escaped:
        digits = part[:2]
        if len(digits) != 2 or not _HEX_DIGITS.issuperset(digits):
            raise ValueError(f"malformed D-Bus address {address!r}: bad %-escape in {value!r}")
        out.append(int(digits, 16))
        out += part[2:].encode()
    return bytes(out)


# Connections ---------------------------------------------------------------------

class Connection:
    """An authenticated connection to a message bus, for one thread.

    Messages that arrive while waiting for a reply are offered to the filters
    (`filter`); those no filter wants are dropped, their descriptors closed."""

    def __init__(self, sock: _socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray()
        self._fds: list[int] = []  # received, not yet claimed by a message
        self._serial = 0
        self._filters: list[tuple[MatchRule, deque[Message]]] = []
        self.unique_name = ""
        self.passes_fds = False

    def close(self) -> None:
        self._sock.close()
        close_fds(self._fds)
        self._fds.clear()

    # Sending

    def send(self, message: Message) -> int:
        """Send `message`; its serial."""
        self._serial += 1
        data, fds = message.encode(self._serial)
        if fds and not self.passes_fds:
            raise ValueError("the bus did not agree to pass file descriptors")
        self._send(data, fds)
        return self._serial

    def _send(self, data: bytes, fds: list[int]) -> None:
        ancillary = ([(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
                     if fds else [])
        sent = self._sock.sendmsg([data], ancillary)
        if sent < len(data):
            self._sock.sendall(memoryview(data)[sent:])

    # Receiving

    def receive(self, timeout: float | None = None) -> Message:
        """The next message; TimeoutError if none comes within `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            message = self._buffered_message()
            if message is not None:
                return message
            self._fill(deadline)

    def call(self, message: Message, timeout: float | None = None) -> Message:
        """Send a method call and return its reply (a METHOD_RETURN or an ERROR)."""
        serial = self.send(message)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            return self._reply_to(serial, deadline)
        except TimeoutError:
            if deadline is None:
                raise  # the kernel's, not ours
            raise TimeoutError(f"no reply to {message.member} within {timeout} s") from None

    def _reply_to(self, serial: int, deadline: float | None) -> Message:
        while True:
            received = self._buffered_message()
            if received is None:
                self._fill(deadline)
            elif received.reply_serial == serial and received.type in (METHOD_RETURN, ERROR):
                return received
            else:
                self.route(received)

    def route(self, message: Message) -> None:
        """Queue `message` for every filter that matches it, or drop it."""
        wanted = False
        for rule, queue in self._filters:
            if rule.matches(message):
                queue.append(message)
                wanted = True
        if not wanted:
            close_fds(message.unix_fds)

    def filter(self, rule: MatchRule, queue: deque[Message]) -> _Filter:
        """A context manager: while it is entered, messages matching `rule` that
        arrive during `call` or `receive_and_route` are appended to `queue`."""
        return _Filter(self._filters, (rule, queue))

    def receive_and_route(self, timeout: float | None = None) -> None:
        self.route(self.receive(timeout))

    def _buffered_message(self) -> Message | None:
        if len(self._buffer) < _FIXED_HEADER_BYTES:
            return None
        try:
            length = frame_length(self._buffer)
        except MalformedMessage:
            self.close()  # the stream cannot be split into messages any more
            raise
        if len(self._buffer) < length:
            return None
        frame = bytes(self._buffer[:length])
        del self._buffer[:length]
        return decode_message(frame, self._fds)

    def _fill(self, deadline: float | None) -> None:
        """Read what the socket has (waiting until `deadline`, or for ever)."""
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("timed out")
            self._sock.settimeout(remaining)
        try:
            data, ancillary, flags, _address = self._sock.recvmsg(
                _RECEIVE_BYTES, _socket.CMSG_SPACE(_MAX_FDS_PER_RECEIVE * _FD_BYTES),
                _socket.MSG_CMSG_CLOEXEC)
        finally:
            if deadline is not None:
                self._sock.settimeout(None)
        for level, kind, payload in ancillary:
            if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
                count = len(payload) // _FD_BYTES
                self._fds.extend(struct.unpack(f"{count}i", payload[:count * _FD_BYTES]))
        if flags & _socket.MSG_CTRUNC:
            raise OSError("the bus sent more file descriptors than one read can receive")
        if not data:
            raise ConnectionResetError("the bus closed the connection")
        self._buffer += data

    # Authentication

    def authenticate(self) -> None:
        """SASL EXTERNAL as our uid, ask for descriptor passing, then Hello.

        All of it goes in one write, as sd-bus does (the specification allows
        the pipelining): a connection costs one round trip, not four."""
        uid = str(os.geteuid()).encode().hex().encode()
        self._serial += 1
        hello, _fds = method_call(BUS_NAME, BUS_PATH, BUS_INTERFACE, "Hello").encode(
            self._serial)
        self._sock.sendall(b"\0AUTH EXTERNAL " + uid + b"\r\nNEGOTIATE_UNIX_FD\r\nBEGIN\r\n"
                           + hello)
        answer = self._auth_line()
        if answer.split(b" ")[0] != b"OK":
            raise AuthenticationFailed(f"the bus refused EXTERNAL authentication as uid "
                                       f"{os.geteuid()}: {answer.decode(errors='replace')}")
        self.passes_fds = self._auth_line() == b"AGREE_UNIX_FD"
        reply = self._reply_to(self._serial, None)
        if reply.type == ERROR:
            raise AuthenticationFailed(f"the bus refused Hello: {reply.error_name}")
        (self.unique_name,) = reply.body

    def _auth_line(self) -> bytes:
        while b"\r\n" not in self._buffer:
            if len(self._buffer) > _MAX_AUTH_LINE:
                raise AuthenticationFailed("the bus sent an overlong authentication line")
            self._fill(None)
        line, _crlf, rest = self._buffer.partition(b"\r\n")
        self._buffer = bytearray(rest)
        return bytes(line)


class _Filter:
    """Connection.filter's context manager."""

    def __init__(self, filters: list[tuple[MatchRule, deque[Message]]],
                 entry: tuple[MatchRule, deque[Message]]) -> None:
        self.filters = filters
        self.entry = entry

    def __enter__(self) -> deque[Message]:
        self.filters.append(self.entry)
        return self.entry[1]

    def __exit__(self, *exc: object) -> None:
        self.filters.remove(self.entry)


def connect(address: str) -> Connection:
    """An authenticated connection to the bus at `address` (a D-Bus address string)."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    connection = Connection(sock)
    try:
        sock.connect(parse_address(address))
        connection.authenticate()
    except (OSError, ValueError):
        connection.close()
        raise
    return connection
