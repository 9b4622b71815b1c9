"""Device-side virtqueues and their workers: Python owns them, C runs them.

A Virtqueue is the C struct hostel_vring plus the iovec array a chain is
popped into; a Worker binds one to a device kind and its eventfds and runs
hostel_worker_run on its own thread (cffi releases the GIL for the call)."""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from hostel._vmm import ffi, lib

from hostel.guest.memory import GuestMemory

ERRORS = {
    lib.HOSTEL_VQ_BAD_LAYOUT: "ring areas outside guest RAM or misaligned",
    lib.HOSTEL_VQ_BAD_AVAIL_IDX: "available index ran more than a queue ahead",
    lib.HOSTEL_VQ_BAD_HEAD: "a chain head beyond the queue",
    lib.HOSTEL_VQ_BAD_NEXT: "a next index beyond the queue",
    lib.HOSTEL_VQ_CHAIN_TOO_LONG: "a chain longer than the queue (a descriptor loop)",
    lib.HOSTEL_VQ_BAD_ADDRESS: "a buffer outside guest RAM (beyond it, or in or across the MMIO gap)",
    lib.HOSTEL_VQ_INDIRECT: "an indirect descriptor, which was not negotiated",
    lib.HOSTEL_VQ_READ_AFTER_WRITE: "a device-readable buffer after a writable one",
    lib.HOSTEL_VQ_READONLY_WRITE: "a reply buffer the driver marked read-only",
    lib.HOSTEL_VQ_BAD_REQUEST: "a request malformed for the device",
    lib.HOSTEL_VQ_CHAIN_TOO_BIG: "a chain of more than 2^32 bytes",
}


@dataclass(frozen=True)
class RingLayout:
    num: int
    desc: int
    avail: int
    used: int


def legacy_layout(num: int, base: int, align: int = 4096) -> RingLayout:
    """The virtio 0.9 / lguest layout: one area, the used ring aligned to `align`."""
    out = ffi.new("uint64_t[3]")
    lib.hostel_vring_legacy_layout(num, base, align, out, out + 1, out + 2)
    return RingLayout(num, out[0], out[1], out[2])


class Virtqueue:
    """The device side of one split virtqueue over guest memory."""

    def __init__(self, mem: GuestMemory, layout: RingLayout, event_idx: bool = False) -> None:
        self.mem = mem
        self.layout = layout
        self.c = ffi.new("struct hostel_vring *")
        self.iov = ffi.new("struct iovec[]", max(layout.num, 1))
        self.chain = ffi.new("struct hostel_chain *")
        self.chain.iov = self.iov
        self.chain.cap = max(layout.num, 1)
        regions = ffi.new("struct hostel_mem_region[]", [(r.gpa, r.size) for r in mem.regions])
        lib.hostel_vring_init(self.c, mem.host, regions, len(mem.regions), layout.num,
                              layout.desc, layout.avail, layout.used, int(event_idx))

    @property
    def broken(self) -> bool:
        return self.error_code != 0

    @property
    def error_code(self) -> int:
        """The C error, read atomically: a worker thread may be setting it."""
        return lib.hostel_vring_error(self.c)

    @property
    def error(self) -> str:
        code = self.error_code
        return ERRORS.get(code, "") if code else ""

    def pop(self) -> tuple[int, list[bytes], list[tuple[int, int]]] | None:
        """(head, readable buffers' bytes, writable buffers as (gpa, len)); None if empty or broken.

        With VIRTIO_F_EVENT_IDX the guest kicks again only once avail_event says
        so: publish it before each look, as the C workers do (else a driver that
        waits for its buffer, like virtio_console's control path, spins forever)."""
        lib.hostel_vring_enable_kicks(self.c)
        if lib.hostel_vring_pop(self.c, self.chain) != 1:
            return None
        out = [bytes(ffi.buffer(self.iov[i].iov_base, self.iov[i].iov_len))
               for i in range(self.chain.n_out)]
        ins = [(self.mem.to_guest(self.iov[i].iov_base), self.iov[i].iov_len)
               for i in range(self.chain.n_out, self.chain.n_out + self.chain.n_in)]
        return self.chain.head, out, ins

    def push(self, head: int, written: int) -> bool:
        return lib.hostel_vring_push(self.c, head, written) == 0

    def should_notify(self) -> bool:
        return bool(lib.hostel_vring_should_notify(self.c))


class Worker:
    """One device worker: a thread blocked on the queue's kick eventfd, in C."""

    def __init__(self, vq: Virtqueue, kind: int, kick_fd: int, call_fd: int,
                 io_fd: int = -1, *, readonly: bool = False, capacity: int = 0,
                 serial: bytes = b"", isr: object = ffi.NULL) -> None:
        self.vq = vq
        self.stop_fd = os.eventfd(0, os.EFD_CLOEXEC)
        self.c = ffi.new("struct hostel_worker *")
        self.c.vq = vq.c
        self.c.kind = kind
        self.c.kick_fd, self.c.call_fd, self.c.stop_fd, self.c.io_fd = kick_fd, call_fd, self.stop_fd, io_fd
        self.c.readonly = int(readonly)
        self.c.capacity = capacity
        self.c.serial = serial[:20]
        self.c.isr = isr
        self.c.chain = vq.chain[0]
        self.result: int | None = None
        self._thread: threading.Thread | None = None

    def process(self) -> int:
        """Serve what is available now, on this thread; -1 if the queue broke."""
        return lib.hostel_worker_process(self.c)

    def start(self, name: str) -> None:
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.result = lib.hostel_worker_run(self.c)

    def stop(self) -> None:
        if self._thread is not None:
            os.eventfd_write(self.stop_fd, 1)
            self._thread.join()
            self._thread = None
        os.close(self.stop_fd)
        self.stop_fd = -1

    @property
    def served(self) -> int:
        return self.c.served

