"""Virtqueue data path: 4 KiB block reads through the C worker, side by side
with a tight pread loop on the same file (the limit a device can approach).

A host-side driver (hostel.guest.ringdriver) fills a 1024-entry ring once
with 256 three-descriptor read requests (one per 4 KiB block of the file)
and then only moves the available index, a batch of 256 at a time, so the
driver costs O(1) per batch and the measurement is the worker's: pop, bounds
checks, preadv, status, push. Two worker rows: served on the calling thread
(hostel_worker_process), and the real arrangement, a worker thread woken by
its kick eventfd that signals its call eventfd. On this 2-vCPU VM the two
cross-thread wake-ups per batch cost about a third of the rate (measured:
more batches in flight or larger batches did not help)."""
from __future__ import annotations

import os
import select
import struct
import subprocess
import tempfile
import time

from hostel._vmm import lib

from hostel.guest.memory import GuestMemory
from hostel.guest.ringdriver import F_WRITE, Desc, RingDriver
from hostel.guest.virtqueue import RingLayout, Virtqueue, Worker

BLOCK = 4096
REQUESTS = 256            # per batch
NUM = 1024
SECONDS = 1.5
LAYOUT = RingLayout(NUM, 0x10000, 0x20000, 0x30000)
HEADERS, STATUS, DATA = 0x80000, 0x90000, 0x100000


def _build_ring(mem: GuestMemory) -> RingDriver:
    driver = RingDriver(mem, LAYOUT)
    for i in range(REQUESTS):
        mem.write(HEADERS + 16 * i, struct.pack("<IIQ", 0, 0, i * BLOCK // 512))
        driver.chain(3 * i, [Desc(HEADERS + 16 * i, 16), Desc(DATA + i * BLOCK, BLOCK, F_WRITE),
                             Desc(STATUS + i, 1, F_WRITE)])
    for slot in range(NUM):
        mem.write(LAYOUT.avail + 4 + 2 * slot, struct.pack("<H", 3 * (slot % REQUESTS)))
    return driver


def _worker_rate(path: str, threaded: bool) -> float:
    with GuestMemory(4 << 20) as mem:
        driver = _build_ring(mem)
        vq = Virtqueue(mem, LAYOUT)
        fd = os.open(path, os.O_RDONLY)
        kick, call = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
        worker = Worker(vq, lib.HOSTEL_WORK_BLK, kick, call, fd, readonly=True,
                        capacity=os.fstat(fd).st_size // 512)
        if threaded:
            worker.start("bench-vq")
        try:
            done, start = 0, time.perf_counter()
            offered = 0
            while time.perf_counter() - start < SECONDS:
                offered += REQUESTS
                driver.set_avail_idx(offered)
                if threaded:
                    os.eventfd_write(kick, 1)
                    while worker.served < done + REQUESTS:
                        select.select([call], [], [], 1.0)
                        os.eventfd_read(call)
                else:
                    assert worker.process() == REQUESTS, vq.error
                done += REQUESTS
            elapsed = time.perf_counter() - start
            assert not vq.broken and mem.read(STATUS, REQUESTS) == bytes(REQUESTS)
            return done / elapsed
        finally:
            worker.stop()
            for f in (fd, kick, call):
                os.close(f)


PREAD_LOOP_C = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv)
{
        int fd = open(argv[1], O_RDONLY);
        long blocks = atol(argv[2]), block = atol(argv[3]);
        double seconds = atof(argv[4]);
        static char buf[1 << 16];
        struct timespec t0, t;
        long done = 0;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        do {
                for (long i = 0; i < blocks; i++)
                        if (pread(fd, buf, block, i * block) != block)
                                return 1;
                done += blocks;
                clock_gettime(CLOCK_MONOTONIC, &t);
        } while ((t.tv_sec - t0.tv_sec) + (t.tv_nsec - t0.tv_nsec) / 1e9 < seconds);
        printf("%f\n", done / ((t.tv_sec - t0.tv_sec) + (t.tv_nsec - t0.tv_nsec) / 1e9));
        return 0;
}
"""


def _pread_rate_c(path: str) -> float:
    """The limit: pread in a C loop, compiled here so no interpreter cost is counted."""
    with tempfile.TemporaryDirectory(prefix="hostel-bench-") as tmp:
        source, binary = os.path.join(tmp, "pread.c"), os.path.join(tmp, "pread")
        with open(source, "w") as f:
            f.write(PREAD_LOOP_C)
        subprocess.run(["gcc", "-O2", "-o", binary, source], check=True)
        out = subprocess.run([binary, path, str(REQUESTS), str(BLOCK), str(SECONDS)],
                             check=True, capture_output=True, text=True).stdout
    return float(out)


def _pread_rate_python(path: str) -> float:
    fd = os.open(path, os.O_RDONLY)
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    try:
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < SECONDS:
            for i in range(REQUESTS):
                os.preadv(fd, [view], i * BLOCK)
            done += REQUESTS
        return done / (time.perf_counter() - start)
    finally:
        os.close(fd)


def run() -> list[dict[str, object]]:
    with tempfile.NamedTemporaryFile(prefix="hostel-bench-disk-") as disk:
        disk.write(os.urandom(REQUESTS * BLOCK))
        disk.flush()
        limit = _pread_rate_c(disk.name)
        rows = [{"benchmark": "virtqueue 4 KiB reads", "path": "tight pread loop in C (limit)",
                 "requests_per_s": round(limit), "ratio": 1.0}]
        python = _pread_rate_python(disk.name)
        rows.append({"benchmark": "virtqueue 4 KiB reads", "path": "pread loop in Python",
                     "requests_per_s": round(python), "ratio": round(python / limit, 2)})
        for label, threaded in [("C worker, same thread", False),
                                ("C worker thread, kick/call eventfds", True)]:
            rate = _worker_rate(disk.name, threaded)
            rows.append({"benchmark": "virtqueue 4 KiB reads", "path": label,
                         "requests_per_s": round(rate), "ratio": round(rate / limit, 2)})
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
