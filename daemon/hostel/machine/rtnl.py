"""A small, synchronous rtnetlink client for the container start-up path.

pyroute2 (0.9) runs an asyncio loop of its own for every socket and every
request: 1-2 ms each, several per container, on the path between clone and
the payload's exec. The handful of requests a container's links need (create
a veth pair or a bridge, bring a link up, enslave it, delete it, list
addresses) are a few dozen bytes each, so they are packed here with struct
and sent on a plain socket; a request returns when the kernel has acked it.

A socket opened in another network namespace (open_in_netns) is made by a
helper thread that enters the namespace, opens the socket and goes back, so
that no thread the daemon uses for anything else ever changes namespace."""
from __future__ import annotations

import errno
import os
import socket
import struct
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from queue import SimpleQueue
from typing import Callable, Iterator

from hostel import native

# linux/netlink.h, linux/rtnetlink.h, linux/if_link.h, linux/veth.h, linux/if_addr.h
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
NLM_F_DUMP, NLM_F_EXCL, NLM_F_CREATE = 0x300, 0x200, 0x400
NLM_F_ACK_TLVS = 0x200  # in an NLMSG_ERROR: extended-ack attributes follow
NLMSGERR_ATTR_MSG = 1
SOL_NETLINK, NETLINK_CAP_ACK, NETLINK_EXT_ACK = 270, 10, 11
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK, RTM_SETLINK = 16, 17, 18, 19
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTMGRP_IPV4_IFADDR = 0x10
IFLA_ADDRESS, IFLA_IFNAME, IFLA_LINK, IFLA_MASTER = 1, 3, 5, 10
IFLA_LINKINFO, IFLA_NET_NS_FD = 18, 28
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
VETH_INFO_PEER = 1
IFLA_MACVLAN_MODE, MACVLAN_MODE_BRIDGE = 1, 4
IFA_ADDRESS, IFA_LOCAL, IFA_FLAGS = 1, 2, 8
IFF_UP = 0x1
NLA_F_NESTED = 0x8000

_HEADER = struct.Struct("=IHHII")     # nlmsghdr
_IFINFO = struct.Struct("=BxHiII")    # ifinfomsg
_IFADDR = struct.Struct("=BBBBI")     # ifaddrmsg
_ATTR = struct.Struct("=HH")          # rtattr / nlattr
RECV_SIZE = 65536


class RtnlError(OSError):
    """The kernel refused a request: errno, and the kernel's own words when it gave any."""

    def __init__(self, code: int, detail: str = "") -> None:
        super().__init__(code, os.strerror(code) + (f" ({detail})" if detail else ""))
        self.detail = detail


@dataclass(frozen=True)
class Address:
    """One address of a namespace, as RTM_NEWADDR describes it."""

    family: int
    address: str
    prefixlen: int
    scope: int
    flags: int
    index: int


# Encoding ------------------------------------------------------------------


def _align(n: int) -> int:
    return (n + 3) & ~3


def attr(kind: int, payload: bytes) -> bytes:
    """One attribute, padded to 4 bytes (the length field counts no padding)."""
    head = _ATTR.pack(_ATTR.size + len(payload), kind)
    return head + payload + b"\0" * (_align(len(payload)) - len(payload))


def nested(kind: int, *attrs: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, b"".join(attrs))


def string(kind: int, value: str) -> bytes:
    return attr(kind, value.encode() + b"\0")


def u32(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack("=I", value))


def mac(kind: int, address: str) -> bytes:
    return attr(kind, bytes.fromhex(address.replace(":", "")))


def ifinfo(index: int = 0, flags: int = 0, change: int = 0) -> bytes:
    return _IFINFO.pack(socket.AF_UNSPEC, 0, index, flags, change)


def _attrs(data: bytes) -> Iterator[tuple[int, bytes]]:
    offset = 0
    while offset + _ATTR.size <= len(data):
        length, kind = _ATTR.unpack_from(data, offset)
        if length < _ATTR.size:
            return
        yield kind & ~NLA_F_NESTED, data[offset + _ATTR.size:offset + length]
        offset += _align(length)


# The socket ----------------------------------------------------------------


class Rtnl:
    """One NETLINK_ROUTE socket; requests are answered in order (one at a time)."""

    def __init__(self, fd: int | None = None, groups: int = 0) -> None:
        if fd is None:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                 socket.NETLINK_ROUTE)
        else:
            sock = socket.socket(fileno=fd)
        self.sock = sock
        self._seq = 0
        try:
            sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
        except OSError:
            pass  # an old kernel: errors come without the kernel's message
        sock.bind((0, groups))

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Rtnl":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fileno(self) -> int:
        return self.sock.fileno()

    def _send(self, kind: int, flags: int, body: bytes) -> int:
        self._seq += 1
        self.sock.send(_HEADER.pack(_HEADER.size + len(body), kind, flags, self._seq, 0) + body)
        return self._seq

    def request(self, kind: int, body: bytes, flags: int = 0) -> None:
        """Send one request and wait for its ack; a refusal raises RtnlError."""
        seq = self._send(kind, NLM_F_REQUEST | NLM_F_ACK | flags, body)
        for _kind, _payload in self._replies(seq):
            pass

    def dump(self, kind: int, body: bytes) -> list[tuple[int, bytes]]:
        seq = self._send(kind, NLM_F_REQUEST | NLM_F_DUMP, body)
        return list(self._replies(seq))

    def _replies(self, seq: int) -> Iterator[tuple[int, bytes]]:
        """The messages answering `seq`, up to its ack or NLMSG_DONE; others are dropped."""
        while True:
            data = self.sock.recv(RECV_SIZE)
            offset = 0
            while offset + _HEADER.size <= len(data):
                length, kind, flags, got_seq, _pid = _HEADER.unpack_from(data, offset)
                if length < _HEADER.size:
                    raise RtnlError(errno.EPROTO, "truncated netlink message")
                payload = data[offset + _HEADER.size:offset + length]
                offset += _align(length)
                if got_seq != seq:
                    continue  # a notification, or an answer to an abandoned request
                if kind == NLMSG_DONE:
                    return
                if kind == NLMSG_ERROR:
                    _raise_for(payload, flags)
                    return
                yield kind, payload

    # Requests --------------------------------------------------------------

    def add_veth(self, name: str, address: str, peer: str, peer_address: str,
                 peer_netns_fd: int) -> None:
        """A veth pair: `name` here, `peer` created straight in the namespace `peer_netns_fd`."""
        peer_info = (ifinfo() + string(IFLA_IFNAME, peer) + mac(IFLA_ADDRESS, peer_address)
                     + u32(IFLA_NET_NS_FD, peer_netns_fd))
        self.request(RTM_NEWLINK, ifinfo() + string(IFLA_IFNAME, name) + mac(IFLA_ADDRESS, address)
                     + nested(IFLA_LINKINFO, string(IFLA_INFO_KIND, "veth"),
                              nested(IFLA_INFO_DATA, attr(VETH_INFO_PEER, peer_info))),
                     NLM_F_CREATE | NLM_F_EXCL)

    def add_bridge(self, name: str) -> None:
        self.request(RTM_NEWLINK, ifinfo() + string(IFLA_IFNAME, name)
                     + nested(IFLA_LINKINFO, string(IFLA_INFO_KIND, "bridge")),
                     NLM_F_CREATE | NLM_F_EXCL)

    def set_link(self, index: int, *, up: bool | None = None, master: int | None = None,
                 netns_fd: int | None = None) -> None:
        flags = IFF_UP if up else 0
        change = IFF_UP if up is not None else 0
        attrs = b""
        if master is not None:
            attrs += u32(IFLA_MASTER, master)
        if netns_fd is not None:
            attrs += u32(IFLA_NET_NS_FD, netns_fd)
        self.request(RTM_SETLINK, ifinfo(index, flags, change) + attrs)

    def add_macvlan(self, name: str, parent: int, address: str, netns_fd: int) -> None:
        """A bridge-mode macvlan on host link `parent`, created in the namespace `netns_fd`."""
        self.request(RTM_NEWLINK, ifinfo() + string(IFLA_IFNAME, name) + mac(IFLA_ADDRESS, address)
                     + u32(IFLA_LINK, parent) + u32(IFLA_NET_NS_FD, netns_fd)
                     + nested(IFLA_LINKINFO, string(IFLA_INFO_KIND, "macvlan"),
                              nested(IFLA_INFO_DATA, u32(IFLA_MACVLAN_MODE, MACVLAN_MODE_BRIDGE))),
                     NLM_F_CREATE | NLM_F_EXCL)

    def index_of(self, name: str) -> int:
        """The index of link `name` in this socket's namespace (ENODEV if there is none)."""
        seq = self._send(RTM_GETLINK, NLM_F_REQUEST | NLM_F_ACK, ifinfo() + string(IFLA_IFNAME, name))
        index = 0
        for kind, payload in self._replies(seq):
            if kind == RTM_NEWLINK:
                index = _IFINFO.unpack_from(payload)[2]
        if not index:
            raise RtnlError(errno.ENODEV)
        return index

    def delete_link(self, index: int) -> None:
        self.request(RTM_DELLINK, ifinfo(index))

    def addresses(self, family: int = socket.AF_UNSPEC) -> list[Address]:
        return [a for kind, payload in self.dump(RTM_GETADDR, _IFADDR.pack(family, 0, 0, 0, 0))
                if kind == RTM_NEWADDR and (a := parse_address(payload)) is not None]

    def drain(self) -> list[tuple[int, bytes]]:
        """The notifications waiting on a socket bound to groups (it must be non-blocking)."""
        found: list[tuple[int, bytes]] = []
        while True:
            try:
                data = self.sock.recv(RECV_SIZE)
            except BlockingIOError:
                return found
            offset = 0
            while offset + _HEADER.size <= len(data):
                length, kind, _flags, _seq, _pid = _HEADER.unpack_from(data, offset)
                if length < _HEADER.size:
                    break
                found.append((kind, data[offset + _HEADER.size:offset + length]))
                offset += _align(length)


def _raise_for(payload: bytes, flags: int) -> None:
    """An NLMSG_ERROR: error 0 is the ack; otherwise raise with the kernel's message."""
    (code,) = struct.unpack_from("=i", payload)
    if code == 0:
        return
    detail = ""
    if flags & NLM_F_ACK_TLVS:
        (inner_length,) = struct.unpack_from("=I", payload, 4)
        # With NETLINK_CAP_ACK only the request's header is echoed, not its payload.
        echoed = _HEADER.size if inner_length > _HEADER.size else inner_length
        for kind, value in _attrs(payload[4 + _align(echoed):]):
            if kind == NLMSGERR_ATTR_MSG:
                detail = value.rstrip(b"\0").decode(errors="replace")
    raise RtnlError(-code, detail)


def parse_address(payload: bytes) -> Address | None:
    """An RTM_NEWADDR/RTM_DELADDR body; IFA_LOCAL wins (our end of a point-to-point link)."""
    if len(payload) < _IFADDR.size:
        return None
    family, prefixlen, flags, scope, index = _IFADDR.unpack_from(payload)
    found: dict[int, bytes] = dict(_attrs(payload[_IFADDR.size:]))
    raw = found.get(IFA_LOCAL) or found.get(IFA_ADDRESS)
    if raw is None or family not in (socket.AF_INET, socket.AF_INET6):
        return None
    if IFA_FLAGS in found:
        (flags,) = struct.unpack("=I", found[IFA_FLAGS])
    return Address(family, socket.inet_ntop(family, raw), prefixlen, scope, flags, index)


# Sockets in other namespaces -----------------------------------------------


class _NetnsWorker:
    """One long-lived thread that opens sockets in other network namespaces.

    It enters a namespace only for the socket() call and goes straight back to
    the host's; if it ever cannot go back, it ends rather than serve from the
    wrong namespace, and the next call starts a new one. Reusing it saves a
    thread start (0.1-5 ms on a loaded host) per container."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: SimpleQueue[tuple[Callable[[], int], Future[int]] | None] | None = None

    def run(self, job: Callable[[], int]) -> int:
        future: Future[int] = Future()
        with self._lock:
            if self._jobs is None:
                self._jobs = SimpleQueue()
                threading.Thread(target=self._serve, args=(self._jobs,), daemon=True,
                                 name="hostel-netns").start()
            self._jobs.put((job, future))
        return future.result()

    def _serve(self, jobs: SimpleQueue[tuple[Callable[[], int], Future[int]] | None]) -> None:
        while (item := jobs.get()) is not None:
            job, future = item
            # Opened per job, so that an idle daemon holds no descriptor for it.
            home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                try:
                    future.set_result(job())
                except OSError as err:
                    future.set_exception(err)
                native.setns(home, native.CLONE_NEWNET)
            except OSError:
                with self._lock:
                    self._jobs = None  # the next call starts a fresh thread
                self._fail_pending(jobs)
                return
            finally:
                os.close(home)

    @staticmethod
    def _fail_pending(jobs: SimpleQueue[tuple[Callable[[], int], Future[int]] | None]) -> None:
        while not jobs.empty():
            item = jobs.get()
            if item is not None:
                item[1].set_exception(OSError(errno.EAGAIN, "the namespace helper thread ended; "
                                                            "try again"))


_WORKER = _NetnsWorker()


def open_in_netns(nsfd: int, groups: int = 0, *, nonblocking: bool = False) -> Rtnl:
    """An Rtnl whose socket lives in the network namespace `nsfd`."""
    def create() -> int:
        native.setns(nsfd, native.CLONE_NEWNET)
        kind = socket.SOCK_RAW | socket.SOCK_CLOEXEC | (socket.SOCK_NONBLOCK if nonblocking else 0)
        return socket.socket(socket.AF_NETLINK, kind, socket.NETLINK_ROUTE).detach()

    return Rtnl(_WORKER.run(create), groups)
