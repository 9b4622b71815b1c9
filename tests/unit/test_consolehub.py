"""consolehub on real pipes and socket pairs: the owner and every attached client see
the output, everyone's input reaches the guest, the input ends with the owner's when it
must, a client that stops reading never stalls the others, and closing detaches."""
from __future__ import annotations

import os
import select
import socket
import time

import pytest

from hostel.consolehub import ConsoleEnds, ConsoleHub, ConsoleUnavailable, MAX_ATTACHED


def read_until(fd: int, wanted: bytes, timeout: float = 5) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while wanted not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"{wanted!r} never came: {seen!r}"
        if select.select([fd], [], [], left)[0]:
            data = os.read(fd, 65536)
            if not data:
                break
            seen += data
    return seen


class Console:
    """A hub between pipes standing for the guest and for its owner."""

    def __init__(self, input_ends_with_owner: bool = False, owner_input: bool = True) -> None:
        self.guest_out_r, self.guest_out_w = os.pipe()   # the guest prints into _w
        self.guest_in_r, self.guest_in_w = os.pipe()     # the guest reads _r
        self.owner_out_r, self.owner_out_w = os.pipe()   # the owner's terminal shows _r
        self.owner_in_r, self.owner_in_w = os.pipe() if owner_input else (None, None)
        self.hub = ConsoleHub("test", ConsoleEnds(self.guest_out_r, self.guest_in_w,
                                                  self.owner_out_w, self.owner_in_r,
                                                  input_ends_with_owner))
        self.hub.start()

    def attach(self) -> socket.socket:
        ours, theirs = socket.socketpair()
        self.hub.attach(theirs.detach())
        return ours

    def close(self) -> None:
        self.hub.stop()
        for fd in (self.guest_out_w, self.guest_in_r, self.owner_out_r, self.owner_in_w):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass


@pytest.fixture
def console():
    made: list[Console] = []

    def make(**kwargs: bool) -> Console:
        made.append(Console(**kwargs))
        return made[-1]

    yield make
    for c in made:
        c.close()


def test_output_reaches_the_owner_and_every_attached_client(console) -> None:
    c = console()
    first, second = c.attach(), c.attach()
    os.write(c.guest_out_w, b"boot message\n")
    for fd in (c.owner_out_r, first.fileno(), second.fileno()):
        assert b"boot message" in read_until(fd, b"boot message")


def test_input_from_the_owner_and_attached_clients_reaches_the_guest(console) -> None:
    c = console()
    viewer = c.attach()
    os.write(c.owner_in_w, b"from-owner ")
    read_until(c.guest_in_r, b"from-owner")
    viewer.sendall(b"from-viewer")
    read_until(c.guest_in_r, b"from-viewer")


def test_a_runs_input_ends_with_its_owners(console) -> None:
    c = console(input_ends_with_owner=True)
    os.write(c.owner_in_w, b"last line\n")
    os.close(c.owner_in_w)
    c.owner_in_w = None
    seen = read_until(c.guest_in_r, b"last line\n")
    assert seen == b"last line\n"
    assert os.read(c.guest_in_r, 100) == b""  # then end of file, as `echo x | cat` needs


def test_a_launched_guests_input_stays_open_for_attached_clients(console) -> None:
    c = console(owner_input=False)
    viewer = c.attach()
    viewer.sendall(b"typed")
    read_until(c.guest_in_r, b"typed")


def test_without_owner_input_a_runs_input_ends_at_once(console) -> None:
    c = console(input_ends_with_owner=True, owner_input=False)
    assert select.select([c.guest_in_r], [], [], 5)[0]
    assert os.read(c.guest_in_r, 100) == b""


def test_a_client_that_stops_reading_does_not_stall_the_others(console) -> None:
    c = console()
    stalled, live = c.attach(), c.attach()
    os.set_blocking(c.guest_out_w, False)  # a stalled hub fails the test, not hangs it
    chunk = b"x" * 65536
    for _ in range(64):  # 4 MiB: far more than a socket buffer holds
        deadline, left = time.monotonic() + 5, memoryview(chunk)
        while left:
            assert time.monotonic() < deadline, "the guest's output stalled"
            try:
                left = left[os.write(c.guest_out_w, left):]
            except BlockingIOError:
                time.sleep(0.01)
            while select.select([live], [], [], 0)[0]:
                live.recv(1 << 20)
            while select.select([c.owner_out_r], [], [], 0)[0]:
                os.read(c.owner_out_r, 1 << 20)
    while select.select([live, c.owner_out_r], [], [], 0.5)[0]:  # until the hub is done
        if select.select([live], [], [], 0)[0]:
            live.recv(1 << 20)
        if select.select([c.owner_out_r], [], [], 0)[0]:
            os.read(c.owner_out_r, 1 << 20)
    os.set_blocking(c.guest_out_w, True)
    os.write(c.guest_out_w, b"still flowing")
    read_until(live.fileno(), b"still flowing")
    read_until(c.owner_out_r, b"still flowing")
    stalled.close()


def test_closing_detaches_and_the_guests_end_closes_the_attached(console) -> None:
    c = console()
    gone, staying = c.attach(), c.attach()
    gone.close()
    deadline = time.monotonic() + 5
    while c.hub.attached() != 1:
        assert time.monotonic() < deadline, "closing the socket did not detach it"
        time.sleep(0.01)
    os.close(c.guest_out_w)  # the guest ended: its output's last writer is gone
    c.guest_out_w = None
    assert c.hub.wait_ended(5)
    assert staying.recv(100) == b""  # its client sees the end
    with pytest.raises(ConsoleUnavailable, match="has closed"):
        c.attach()


def test_attached_clients_are_bounded(console) -> None:
    c = console()
    clients = [c.attach() for _ in range(MAX_ATTACHED)]
    with pytest.raises(ConsoleUnavailable, match=f"{MAX_ATTACHED} clients"):
        c.attach()
    for client in clients:
        client.close()
