"""The guest <-> host message channel: length-prefixed JSON frames.

A frame is a 4-byte big-endian unsigned length followed by that many bytes
of UTF-8 JSON, which must be an object with a string "type". The guest init
sends:
    {"type": "started", "pid": N}            the task was forked
    {"type": "log", "level": "info"|"warning"|"error", "message": "..."}
    {"type": "exit", "code": N}              the task's exit status (128+signal
                                             when it was killed), last frame
The transport is whatever carries bytes in order: a virtio-console port
(/dev/hvc1) in a VM, a FIFO or a socketpair under test. Frames larger than
MAX_FRAME are refused in both directions, so a confused peer cannot make
the other side allocate without bound."""
from __future__ import annotations

import json
import os
import struct

from hostel.errors import HostelError

MAX_FRAME = 1 << 20
_LENGTH = struct.Struct(">I")


class ChannelError(HostelError):
    """A frame could not be encoded, or what arrived is not a valid frame."""


def encode(message: dict) -> bytes:
    if not isinstance(message.get("type"), str):
        raise ChannelError(f"channel message {message!r} lacks a string 'type'")
    body = json.dumps(message, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise ChannelError(f"channel message of type {message['type']!r} is {len(body)} bytes, "
                           f"more than the {MAX_FRAME} a frame may carry")
    return _LENGTH.pack(len(body)) + body


def decode(body: bytes) -> dict:
    try:
        message = json.loads(body)
    except ValueError as e:
        raise ChannelError(f"channel frame is not valid JSON: {e}") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ChannelError("channel frame is not a JSON object with a string 'type'")
    return message


def write_frame(fd: int, message: dict) -> None:
    data = encode(message)
    while data:
        data = data[os.write(fd, data):]


def _read_exactly(fd: int, size: int) -> bytes | None:
    chunks = b""
    while len(chunks) < size:
        part = os.read(fd, size - len(chunks))
        if not part:
            if chunks:
                raise ChannelError(f"channel closed in the middle of a frame "
                                   f"({len(chunks)} of {size} bytes)")
            return None
        chunks += part
    return chunks


def read_frame(fd: int) -> dict | None:
    """The next message, or None at end of stream (between frames)."""
    head = _read_exactly(fd, _LENGTH.size)
    if head is None:
        return None
    (length,) = _LENGTH.unpack(head)
    if length > MAX_FRAME:
        raise ChannelError(f"channel frame announces {length} bytes, more than {MAX_FRAME}")
    body = _read_exactly(fd, length) if length else b""
    if body is None:
        raise ChannelError(f"channel closed before a frame of {length} bytes")
    return decode(body)
