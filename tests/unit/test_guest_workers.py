"""Device workers on real pipes: an input at its end leaves the receive worker
asleep, and a transmit worker whose reader stopped reading can still be stopped
(a guest reset joins its workers on the vCPU thread)."""
from __future__ import annotations

import fcntl
import os
import resource
import threading
import time

import pytest

from hostel._vmm import lib
from hostel.guest import devices
from hostel.guest.memory import GuestMemory
from hostel.guest.ringdriver import F_WRITE, Desc, RingDriver
from hostel.guest.virtqueue import RingLayout, Virtqueue, Worker

LAYOUT = RingLayout(8, 0x1000, 0x2000, 0x3000)
DATA = 0x10000
CHUNK = 4096


@pytest.fixture
def mem():
    with GuestMemory(1 << 20) as m:
        yield m


@pytest.fixture
def pipe():
    r, w = os.pipe2(os.O_CLOEXEC)
    yield r, w
    for fd in (r, w):
        try:
            os.close(fd)
        except OSError:
            pass  # the test closed it


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def started(vq: Virtqueue, kind: int, io_fd: int) -> tuple[Worker, int]:
    kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    worker = Worker(vq, kind, kick, -1, io_fd)
    worker.start("test-worker")
    os.eventfd_write(kick, 1)         # the driver's notify
    return worker, kick


def stop_within(worker: Worker, seconds: float) -> bool:
    stopper = threading.Thread(target=worker.stop, daemon=True)
    stopper.start()
    stopper.join(seconds)
    return not stopper.is_alive()


def test_a_receive_worker_sleeps_once_its_input_ended(mem: GuestMemory, pipe) -> None:
    r, w = pipe
    driver = RingDriver(mem, LAYOUT)
    vq = Virtqueue(mem, LAYOUT)
    for i in range(4):
        driver.offer(driver.chain(i, [Desc(DATA + i * CHUNK, CHUNK, F_WRITE)]))
    os.write(w, b"hello")
    os.close(w)                      # the input ends: `echo hello | hostelctl guest launch`
    worker, kick = started(vq, lib.HOSTEL_WORK_CONSOLE_RX, r)
    try:
        time.sleep(0.2)
        before = cpu_seconds()
        time.sleep(1.0)
        spent = cpu_seconds() - before
    finally:
        assert stop_within(worker, 5)
        os.close(kick)
    assert spent < 0.2, f"the receive worker spun: {spent:.2f} s of CPU in 1 s"
    assert driver.used() == [(0, 5)]  # the data came through; the end took no buffer
    assert mem.read(DATA, 5) == b"hello"


def test_a_transmit_worker_waits_for_a_slow_reader_without_losing_bytes(mem: GuestMemory, pipe) -> None:
    r, w = pipe
    fcntl.fcntl(w, fcntl.F_SETFL, os.O_NONBLOCK)
    os.set_blocking(r, False)
    size = 1 << 17                    # twice a pipe's 64 KiB
    driver = RingDriver(mem, LAYOUT)
    vq = Virtqueue(mem, LAYOUT)
    payload = os.urandom(size)
    mem.write(DATA, payload)
    driver.offer(driver.chain(0, [Desc(DATA, size)]))
    worker, kick = started(vq, lib.HOSTEL_WORK_CONSOLE_TX, w)
    try:
        got = b""
        deadline = time.monotonic() + 10
        while len(got) < size and time.monotonic() < deadline:
            time.sleep(0.05)          # a slow reader
            try:
                got += os.read(r, size)
            except BlockingIOError:
                pass
    finally:
        assert stop_within(worker, 5)
        os.close(kick)
    assert got == payload
    assert driver.used() == [(0, 0)]


def test_a_transmit_worker_on_a_full_console_pipe_can_be_stopped(mem: GuestMemory, pipe) -> None:
    """The console fd the launcher is given is blocking (a terminal, a pipe):
    console_device hands its worker a nonblocking description of its own."""
    r, w = pipe
    device = devices.console_device(w)
    try:
        (_rx, _rx_fd), (_tx, tx_fd) = device.queues
        assert fcntl.fcntl(tx_fd, fcntl.F_GETFL) & os.O_NONBLOCK
        assert not fcntl.fcntl(w, fcntl.F_GETFL) & os.O_NONBLOCK, "the caller's fd is untouched"
        driver = RingDriver(mem, LAYOUT)
        vq = Virtqueue(mem, LAYOUT)
        driver.offer(driver.chain(0, [Desc(DATA, 1 << 17)]))  # more than the pipe holds
        worker, kick = started(vq, lib.HOSTEL_WORK_CONSOLE_TX, tx_fd)
        time.sleep(0.3)               # the worker is now waiting on the full pipe
        try:
            assert stop_within(worker, 5), "the transmit worker could not be stopped"
        finally:
            os.close(kick)
    finally:
        device.close()
