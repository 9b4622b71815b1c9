"""hostel.dbuswire's wire format: differential against dbus-fast, round trips, and
malformed input refused with MalformedMessage (never an IndexError from deep inside)."""
from __future__ import annotations

import io
import os
import socket
import struct

import pytest
from dbus_fast import Message as FastMessage
from dbus_fast import Variant
from dbus_fast._private.unmarshaller import Unmarshaller
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostel.dbuswire import (ERROR, MAX_ARRAY_BYTES, METHOD_CALL, METHOD_RETURN, SIGNAL,
                             AuthenticationFailed, Connection, MalformedMessage, MatchRule, Message, close_fds, decode_message,
                             frame_length, parse_address, split_signature)

BASIC = list("ybnqiuxtdsogh")
# 'h' values are descriptors; these are never opened, only carried (decoding closes
# descriptors a body does not refer to, and every one generated here is referred to).
FAKE_FDS = [1000, 1001, 1002]

# Signatures and values ---------------------------------------------------------------

def complete_types(max_leaves: int = 6) -> st.SearchStrategy[str]:
    return st.recursive(
        st.sampled_from(BASIC + ["v"]),
        lambda inner: st.one_of(
            inner.map(lambda t: "a" + t),
            st.lists(inner, min_size=1, max_size=4).map(lambda ts: "(" + "".join(ts) + ")"),
            st.tuples(st.sampled_from(BASIC), inner).map(lambda kv: "a{%s%s}" % kv)),
        max_leaves=max_leaves)


def signatures(max_types: int = 4) -> st.SearchStrategy[str]:
    return st.lists(complete_types(), max_size=max_types).map("".join).filter(
        lambda s: len(s) <= 255)


object_paths = st.lists(st.text("abcXYZ019_", min_size=1, max_size=5), max_size=4).map(
    lambda parts: "/" + "/".join(parts))
texts = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
                max_size=12)
FIXED = {"y": st.integers(0, 2**8 - 1), "b": st.booleans(), "n": st.integers(-2**15, 2**15 - 1),
         "q": st.integers(0, 2**16 - 1), "i": st.integers(-2**31, 2**31 - 1),
         "u": st.integers(0, 2**32 - 1), "x": st.integers(-2**63, 2**63 - 1),
         "t": st.integers(0, 2**64 - 1), "d": st.floats(allow_nan=False),
         "h": st.sampled_from(FAKE_FDS), "s": texts, "o": object_paths,
         "g": signatures(max_types=2)}


def values(type_: str, variants: int = 0) -> st.SearchStrategy:
    """Values of the complete type `type_`, in hostel's representation."""
    code = type_[0]
    if code in FIXED:
        return FIXED[code]
    if code == "v":
        inner = complete_types(max_leaves=3) if variants < 2 else st.sampled_from(BASIC)
        return inner.flatmap(lambda sig: values(sig, variants + 1).map(lambda v: (sig, v)))
    if code == "(":
        return st.tuples(*(values(t, variants) for t in split_signature(type_[1:-1])))
    if type_ == "ay":
        return st.binary(max_size=8)
    if type_.startswith("a{"):
        key, value = split_signature(type_[2:-1])
        return st.dictionaries(values(key, variants), values(value, variants), max_size=3)
    return st.lists(values(type_[1:], variants), max_size=3)


def bodies() -> st.SearchStrategy[tuple[str, tuple]]:
    return signatures().flatmap(lambda sig: st.tuples(
        st.just(sig), st.tuples(*(values(t) for t in split_signature(sig)))))


# Conversion to and from dbus-fast's representation -----------------------------------

def to_fast(type_: str, value: object, fds: list[int]) -> object:
    """dbus-fast's form of `value`; 'h' values become indexes into `fds`."""
    code = type_[0]
    if code == "v":
        signature, inner = value
        return Variant(signature, to_fast(signature, inner, fds))
    if code == "(":
        return [to_fast(t, v, fds) for t, v in zip(split_signature(type_[1:-1]), value)]
    if type_ == "ay":
        return bytes(value)
    if type_.startswith("a{"):
        key_type, value_type = split_signature(type_[2:-1])
        return {to_fast(key_type, k, fds): to_fast(value_type, v, fds) for k, v in value.items()}
    if code == "a":
        return [to_fast(type_[1:], v, fds) for v in value]
    if code == "h":
        fds.append(value)
        return len(fds) - 1
    return value


def from_fast(type_: str, value: object, fds: list[int]) -> object:
    code = type_[0]
    if code == "v":
        return value.signature, from_fast(value.signature, value.value, fds)
    if code == "(":
        return tuple(from_fast(t, v, fds) for t, v in zip(split_signature(type_[1:-1]), value))
    if type_ == "ay":
        return bytes(value)
    if type_.startswith("a{"):
        key_type, value_type = split_signature(type_[2:-1])
        return {from_fast(key_type, k, fds): from_fast(value_type, v, fds)
                for k, v in value.items()}
    if code == "a":
        return [from_fast(type_[1:], v, fds) for v in value]
    if code == "h":
        return fds[value]
    return value


def call(signature: str, body: tuple) -> Message:
    return Message(METHOD_CALL, path="/org/hostel1/test", interface="org.hostel1.Test",
                   member="Echo", destination="org.hostel1", signature=signature, body=body)


def fast_decode(data: bytes) -> FastMessage:
    return Unmarshaller(stream=io.BytesIO(data), negotiate_unix_fd=False).unmarshall()


# Differential tests ------------------------------------------------------------------

DIFFERENTIAL = settings(max_examples=300, deadline=None,
                        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@DIFFERENTIAL
@given(bodies(), st.sampled_from(["<", ">"]))
def test_dbus_fast_reads_what_we_write(signature_and_body: tuple[str, tuple],
                                       byte_order: str) -> None:
    signature, body = signature_and_body
    data, fds = call(signature, body).encode(7, byte_order)
    theirs = fast_decode(data)
    assert (theirs.serial, theirs.member, theirs.signature) == (7, "Echo", signature)
    types = split_signature(signature)
    assert tuple(from_fast(t, v, fds) for t, v in zip(types, theirs.body)) == body


@DIFFERENTIAL
@given(bodies())
def test_we_read_what_dbus_fast_writes(signature_and_body: tuple[str, tuple]) -> None:
    signature, body = signature_and_body
    fds: list[int] = []
    fast_body = [to_fast(t, v, fds) for t, v in zip(split_signature(signature), body)]
    data = FastMessage(destination="org.hostel1", path="/org/hostel1/test",
                       interface="org.hostel1.Test", member="Echo", signature=signature,
                       body=fast_body, unix_fds=fds, serial=9)._marshall(True)
    ours = decode_message(bytes(data), list(fds))
    assert (ours.serial, ours.member, ours.signature, ours.body) == (9, "Echo", signature, body)
    assert ours.unix_fds == fds


@DIFFERENTIAL
@given(bodies())
def test_we_read_big_endian(signature_and_body: tuple[str, tuple]) -> None:
    """dbus-fast writes only little-endian: our big-endian output, which the test above
    shows dbus-fast reads to the same values, stands in for a big-endian peer."""
    signature, body = signature_and_body
    data, fds = call(signature, body).encode(3, ">")
    assert data[:1] == b"B"
    assert decode_message(data, list(fds)).body == body


# Messages ----------------------------------------------------------------------------

@pytest.mark.parametrize("message", [
    Message(METHOD_CALL, path="/", member="Ping", flags=1),
    Message(METHOD_RETURN, reply_serial=4, destination=":1.7", sender="org.hostel1",
            signature="sa{sv}", body=("x", {"k": ("i", -1)})),
    Message(ERROR, error_name="org.hostel1.Error.NoSuchMachine", reply_serial=9,
            signature="s", body=("no machine named 'nope'",)),
    Message(SIGNAL, path="/org/hostel1/machine/x", interface="org.freedesktop.DBus.Properties",
            member="PropertiesChanged", sender=":1.3", signature="sa{sv}as",
            body=("org.hostel1.Machine", {"State": ("s", "exited")}, [])),
], ids=["call", "return", "error", "signal"])
def test_message_round_trip(message: Message) -> None:
    data, fds = message.encode(42)
    assert len(data) == frame_length(data[:16])
    decoded = decode_message(data, list(fds))
    assert decoded.serial == 42
    for name in Message.__slots__:
        if name != "serial":
            assert getattr(decoded, name) == getattr(message, name), name


def test_each_descriptor_value_gets_its_own_index() -> None:
    data, fds = call("hah(h)", (1000, [1001, 1000], (1002,))).encode(1)
    assert fds == [1000, 1001, 1000, 1002]
    assert decode_message(data, list(fds)).body == (1000, [1001, 1000], (1002,))


def test_descriptors_nobody_refers_to_are_closed() -> None:
    read_end, write_end = os.pipe()
    data = FastMessage(path="/", member="M", signature="h", body=[0],
                       unix_fds=[read_end, write_end], serial=1)._marshall(True)
    pending = [read_end, write_end, 1000]  # the last came with a later message
    message = decode_message(bytes(data), pending)
    assert (message.body, message.unix_fds, pending) == ((read_end,), [read_end], [1000])
    os.close(read_end)
    with pytest.raises(OSError):
        os.fstat(write_end)


def test_writing_refuses_bad_values() -> None:
    for signature, body in [("y", (256,)), ("b", (2,)), ("s", ("a\0b",)), ("o", ("/a/",)),
                            ("g", ("a",)), ("v", (("ii", 1),)), ("(ii)", ((1,),)),
                            ("i", ()), ("h", (-1,))]:
        with pytest.raises(ValueError):
            call(signature, body).encode(1)
    with pytest.raises(TypeError):
        call("s", (b"bytes",)).encode(1)
    nested: tuple = ("y", 1)
    for _ in range(64):
        nested = ("v", nested)
    with pytest.raises(ValueError, match="64"):
        call("v", (nested,)).encode(1)


@pytest.mark.parametrize("signature, why", [
    ("a", "ends inside"), ("(i", "ends inside"), ("()", "empty struct"), ("a{vs}", "basic"),
    ("a{sii}", "key and a value"), ("{ss}", "unexpected"), ("z", "unexpected"),
    ("a" * 33 + "i", "arrays nested"), ("(" * 33 + "i" + ")" * 33, "structs nested"),
    ("i" * 256, "longer than 255"),
])
def test_invalid_signatures(signature: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        split_signature(signature)


# Malformed input ---------------------------------------------------------------------

def body_offset(data: bytes | bytearray) -> int:
    return len(data) - struct.unpack_from("<I", data, 4)[0]


def patched(signature: str, body: tuple, offset: int, replacement: bytes) -> bytes:
    """A valid message with bytes of its body, from `offset`, replaced."""
    data = bytearray(call(signature, body).encode(1)[0])
    start = body_offset(data) + offset
    data[start:start + len(replacement)] = replacement
    return bytes(data)


def with_body(signature: str, body: bytes) -> bytes:
    """A message header for `signature` in front of arbitrary body bytes."""
    value = {"v": ("y", 0), "ay": b""}[signature]
    data = bytearray(call(signature, (value,)).encode(1)[0])
    header = data[:body_offset(data)]
    struct.pack_into("<I", header, 4, len(body))
    return bytes(header) + body


@pytest.mark.parametrize("data, why", [
    (patched("yt", (1, 2), 1, b"\x01"), "non-zero alignment padding"),
    (patched("s", ("abc",), 0, struct.pack("<I", 60)), "truncated"),
    (patched("s", ("abc",), 4, b"\xff"), "not valid"),
    (patched("s", ("abc",), 5, b"\0"), "nul byte"),
    (patched("s", ("abc",), 7, b"x"), "not nul-terminated"),
    (patched("b", (True,), 0, b"\x02"), "boolean of value 2"),
    (patched("g", ("i",), 1, b"("), "invalid D-Bus signature"),
    (patched("v", (("i", 1),), 1, b"a"), "invalid D-Bus signature"),
    (patched("o", ("/ab",), 5, b"/"), "object path"),
    (patched("ay", (b"abc",), 0, struct.pack("<I", MAX_ARRAY_BYTES + 1)), "more than"),
    (patched("ai", ([1, 2],), 0, struct.pack("<I", 6)), "overrun"),
    (patched("h", (1000,), 0, struct.pack("<I", 5)), "file descriptor index 5"),
    (with_body("v", b"\x01v\0" * 65 + b"\x01y\0\x07"), "nested more than 64"),
    (with_body("v", b"\x02ii\0" + bytes(8)), "not one complete type"),
], ids=["padding", "string-length", "utf8", "nul", "terminator", "boolean", "signature",
        "variant-signature", "path", "oversize-array", "array-overrun", "fd-index", "nesting",
        "variant-two-types"])
def test_malformed_bodies(data: bytes, why: str) -> None:
    """The descriptors a malformed message brought are closed with it."""
    descriptor = os.open("/dev/null", os.O_RDONLY)
    pending = [descriptor]
    try:
        with pytest.raises(MalformedMessage, match=why):
            decode_message(data, pending)
    finally:
        close_fds(pending)
    if why.startswith("file descriptor"):
        assert pending == []
        with pytest.raises(OSError):
            os.fstat(descriptor)


def test_malformed_headers() -> None:
    good = call("s", ("x",)).encode(1)[0]
    cases = [
        (good[:-1], "body of"),
        (good[:10], "truncated"),
        (b"X" + good[1:], "byte-order mark"),
        (good[:3] + b"\x02" + good[4:], "version 2"),
        (good[:8] + bytes(4) + good[12:], "serial 0"),
        (Message(METHOD_RETURN, signature="s", body=("x",)).encode(1)[0], "reply_serial"),
    ]
    for data, why in cases:
        with pytest.raises(MalformedMessage, match=why):
            decode_message(data, [])
    member_like_a_path = Message(METHOD_CALL, path="/", member="/m").encode(1)[0]
    retyped = member_like_a_path.replace(b"\x03\x01s\0", b"\x03\x01o\0", 1)
    with pytest.raises(MalformedMessage, match="header field 3"):
        decode_message(retyped, [])


def test_frame_length_limits() -> None:
    header = bytearray(call("", ()).encode(1)[0][:16])
    struct.pack_into("<I", header, 12, MAX_ARRAY_BYTES + 8)
    with pytest.raises(MalformedMessage, match="header fields"):
        frame_length(header)
    struct.pack_into("<I", header, 12, 64)
    struct.pack_into("<I", header, 4, 2**32 - 1)
    with pytest.raises(MalformedMessage, match="message of"):
        frame_length(header)


@settings(max_examples=500, deadline=None)
@given(bodies(), st.data())
def test_corrupted_messages_raise_only_malformed_message(
        signature_and_body: tuple[str, tuple], data: st.DataObject) -> None:
    signature, body = signature_and_body
    encoded = bytearray(call(signature, body).encode(1)[0])
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(encoded) - 1))
        encoded[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(encoded)))
    pending = [os.open("/dev/null", os.O_RDONLY) for _ in FAKE_FDS]
    try:
        close_fds(decode_message(bytes(encoded[:cut]), pending).unix_fds)
    except MalformedMessage:
        pass
    finally:
        close_fds(pending)


# Authentication ----------------------------------------------------------------------

def test_authentication_is_one_write_and_a_refusal_is_an_os_error() -> None:
    ours, bus = socket.socketpair()
    with ours, bus:
        bus.sendall(b"REJECTED EXTERNAL\r\n")
        with pytest.raises(AuthenticationFailed, match="refused EXTERNAL authentication"):
            Connection(ours).authenticate()
        sent = bus.recv(4096)
    uid = str(os.geteuid()).encode().hex().encode()
    greeting = b"\0AUTH EXTERNAL " + uid + b"\r\nNEGOTIATE_UNIX_FD\r\nBEGIN\r\n"
    assert sent.startswith(greeting)
    hello = decode_message(sent[len(greeting):], [])
    assert (hello.destination, hello.member, hello.serial) == ("org.freedesktop.DBus", "Hello", 1)


def test_bus_hanging_up_during_authentication() -> None:
    ours, bus = socket.socketpair()
    with ours:
        bus.close()
        with pytest.raises(ConnectionError):
            Connection(ours).authenticate()


# Match rules and addresses -----------------------------------------------------------

def test_match_rule_string_and_local_test() -> None:
    rule = MatchRule(type="signal", sender="org.hostel1", interface="org.freedesktop.DBus.Properties",
                     member="PropertiesChanged", path_namespace="/org/hostel1/machine")
    assert str(rule) == ("type='signal',sender='org.hostel1',"
                         "interface='org.freedesktop.DBus.Properties',"
                         "member='PropertiesChanged',path_namespace='/org/hostel1/machine'")
    assert str(MatchRule(member="it's")) == "member='it'\\''s'"
    local = MatchRule(type="signal", member="PropertiesChanged",
                      path_namespace="/org/hostel1/machine")
    signal = Message(SIGNAL, path="/org/hostel1/machine/x", interface="i", member="PropertiesChanged")
    assert local.matches(signal)
    signal.path = "/org/hostel1/machinery"
    assert not local.matches(signal)
    signal.path = "/org/hostel1/machine"
    assert local.matches(signal)
    assert not MatchRule(type="method_call").matches(signal)
    assert MatchRule(path_namespace="/").matches(signal)
    assert not MatchRule(path="/org").matches(signal)
    for bad in [dict(type="signals"), dict(path="/a", path_namespace="/a")]:
        with pytest.raises(ValueError):
            MatchRule(**bad)


@pytest.mark.parametrize("address, socket_address", [
    ("unix:path=/run/dbus/system_bus_socket", b"/run/dbus/system_bus_socket"),
    ("unix:path=/tmp/a%20b,guid=0123", b"/tmp/a b"),
    ("unix:abstract=/tmp/dbus-x", b"\0/tmp/dbus-x"),
    ("tcp:host=localhost,port=1;unix:path=/b;unix:path=/c", b"/b"),
    ("unix:tmpdir=/tmp;unix:abstract=x", b"\0x"),
])
def test_addresses(address: str, socket_address: bytes) -> None:
    assert parse_address(address) == socket_address


@pytest.mark.parametrize("address, why", [
    ("/run/dbus/system_bus_socket", "does not start with a transport"),
    ("unix:path", "not key=value"),
    ("unix:path=/a%zz", "bad %-escape"),
    ("unix:path=/a%4", "bad %-escape"),
    ("tcp:host=localhost,port=1", "no usable entry"),
    ("", "no usable entry"),
])
def test_malformed_addresses(address: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_address(address)
