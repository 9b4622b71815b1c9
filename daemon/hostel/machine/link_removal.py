"""Deleting a host link so that it is gone when the caller goes on, without waiting for
the kernel to finish with it.

systemd-nspawn 252 deletes its veth (and an emptied zone bridge) before it exits,
so a script running `ip link show ve-NAME` right after it finds nothing. The
kernel answers RTM_DELLINK only after an RCU barrier (10-30 ms here for a veth,
15-20 ms more for a bridge), but the link leaves the host's view well before:
it is unlisted (netlink lookups by name fail), its /sys/class/net entry is
removed, and then the kernel sends the uevent "remove" for it (1-3 ms after
the request for a veth). So the request goes to a background thread, and the
caller waits only for the link to be out of view, woken by that uevent (or by
the thread's answer, or by an error); the barrier is the thread's wait.

A link the kernel is deleting already (a veth whose peer's namespace died) is
waited for the same way: its uevent comes too."""
from __future__ import annotations

import errno
import logging
import os
import select
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from hostel.machine import rtnl

log = logging.getLogger(__name__)

NETLINK_KOBJECT_UEVENT = 15
UEVENT_KERNEL_GROUP = 1
GONE_TIMEOUT = 10.0  # a kernel whose rtnl lock is held that long: go on, and say so
SYS_CLASS_NET = Path("/sys/class/net")


def out_of_view(index: int, name: str) -> bool:
    """Whether link `index`, once called `name`, is gone from every view a script has of
    it: no link of that index carries the name, and /sys/class/net has no such entry
    (or one of another link, with another index)."""
    try:
        if socket.if_indextoname(index) == name:
            return False
    except OSError:
        pass
    try:
        return int((SYS_CLASS_NET / name / "ifindex").read_text()) != index
    except (OSError, ValueError):
        return True


def _delete(index: int, name: str, wake_fd: int) -> None:
    """RTM_DELLINK and the kernel's answer (in a pool thread); then wake the waiter through
    `wake_fd`, which this closes: the caller handed it over."""
    try:
        if not out_of_view(index, name):  # never an unrelated link of that index
            with rtnl.Rtnl() as host:
                host.delete_link(index)
    except OSError as err:
        if err.errno not in (errno.ENODEV, errno.ENXIO):  # not gone meanwhile
            raise
    finally:
        try:
            os.write(wake_fd, b"x")
        except BrokenPipeError:
            pass  # the waiter saw the link go and stopped waiting
        finally:
            os.close(wake_fd)


# Several at once: a bridge's deletion must not queue behind the RCU barrier of the veth
# deleted just before it (threads are made only when all are busy, and reused).
_DELETERS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="hostel-link-removal")


def remove(index: int, name: str, timeout: float = GONE_TIMEOUT) -> None:
    """Delete link `index` (if it is still `name`) and return once it is out of view
    (out_of_view); the kernel's acknowledgement is left to the background thread.
    A refusal raises the kernel's OSError; a link still in view after `timeout`
    seconds is logged and left to the thread."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                       | socket.SOCK_NONBLOCK, NETLINK_KOBJECT_UEVENT) as events:
        events.bind((0, UEVENT_KERNEL_GROUP))  # first, so that no uevent is missed
        if out_of_view(index, name):
            return
        wake_r, wake_w = os.pipe2(os.O_CLOEXEC)
        try:
            try:
                future = _DELETERS.submit(_delete, index, name, wake_w)
            except RuntimeError:  # the interpreter is exiting: no more pool threads
                os.close(wake_w)
                raise
            _wait(index, name, future, events, wake_r, timeout)
        finally:
            os.close(wake_r)


def _wait(index: int, name: str, future: Future[None], events: socket.socket, wake: int,
          timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not out_of_view(index, name):
        if future.done():
            future.result()  # raises a refusal; an answer means it is gone
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            log.warning("link %s is still there %.0f s after its deletion was asked for",
                        name, timeout)
            return
        select.select([events.fileno(), wake], [], [], remaining)
        _drain(events)


def _drain(events: socket.socket) -> None:
    """Read away the uevents (any of them is reason to look again; ENOBUFS too)."""
    while True:
        try:
            events.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            if err.errno != errno.ENOBUFS:
                raise
