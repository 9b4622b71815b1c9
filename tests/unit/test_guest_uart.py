"""The guest's 16550A (bindings/uart.c), driven as Linux's 8250 driver does:
output reaches the host descriptor, and "transmitter empty" interrupts arrive
on the IRQ eventfd when enabled (without them Linux sends a few bytes a second)."""
from __future__ import annotations

import os
from typing import Iterator

import pytest

from hostel._vmm import ffi, lib

THR, IER, IIR, FCR, LCR, MCR, LSR, MSR, SCR = 0, 1, 2, 2, 3, 4, 5, 6, 7


@pytest.fixture
def uart() -> Iterator[tuple[object, int, int]]:
    out_r, out_w = os.pipe()
    irq = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    u = ffi.new("struct hostel_uart *")
    assert lib.hostel_uart_init(u, out_w, irq) == 0
    yield u, out_r, irq
    lib.hostel_uart_destroy(u)
    for fd in (out_r, out_w, irq):
        os.close(fd)


def interrupts(irq: int) -> int:
    try:
        return os.eventfd_read(irq)
    except BlockingIOError:
        return 0


def test_bytes_written_reach_the_host(uart) -> None:
    u, out_r, _irq = uart
    for byte in b"hi\n":
        lib.hostel_uart_write(u, THR, byte)
    assert os.read(out_r, 16) == b"hi\n" and u.written == 3
    assert lib.hostel_uart_read(u, LSR) & 0x60 == 0x60, "transmitter always empty"


def test_transmitter_empty_interrupts_when_enabled(uart) -> None:
    u, out_r, irq = uart
    lib.hostel_uart_write(u, THR, ord("a"))
    assert interrupts(irq) == 0, "no interrupt while IER is 0"
    assert lib.hostel_uart_read(u, IIR) & 0x0F == 0x01
    lib.hostel_uart_write(u, IER, 0x02)          # enabling THRI with the THR empty fires at once
    assert interrupts(irq) == 1
    assert lib.hostel_uart_read(u, IIR) & 0x0F == 0x02
    assert lib.hostel_uart_read(u, IIR) & 0x0F == 0x01, "reading IIR acknowledged it"
    lib.hostel_uart_write(u, THR, ord("b"))      # each byte sent empties the THR again
    assert interrupts(irq) == 1 and lib.hostel_uart_read(u, IIR) & 0x0F == 0x02
    lib.hostel_uart_write(u, IER, 0)
    lib.hostel_uart_write(u, THR, ord("c"))
    assert interrupts(irq) == 0
    assert os.read(out_r, 16) == b"abc"


def test_probe_sees_a_16550a_with_fifos_and_loopback(uart) -> None:
    u, _out_r, _irq = uart
    lib.hostel_uart_write(u, FCR, 0x01)
    assert lib.hostel_uart_read(u, IIR) >> 6 == 3, "FIFOs enabled: a 16550A"
    lib.hostel_uart_write(u, MCR, 0x10 | 0x0A)   # loopback, OUT2 and RTS
    assert lib.hostel_uart_read(u, MSR) & 0xF0 == 0x90, "looped back as DCD and CTS"
    lib.hostel_uart_write(u, MCR, 0)
    lib.hostel_uart_write(u, SCR, 0x5A)
    assert lib.hostel_uart_read(u, SCR) == 0x5A
    lib.hostel_uart_write(u, LCR, 0x80)           # divisor latch
    lib.hostel_uart_write(u, THR, 0x01)
    lib.hostel_uart_write(u, IER, 0x00)
    assert (lib.hostel_uart_read(u, THR), lib.hostel_uart_read(u, IER)) == (0x01, 0x00)
    assert u.written == 0, "divisor writes are not output"
