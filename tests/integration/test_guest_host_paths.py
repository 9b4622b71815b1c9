"""A FIFO (or another file of the wrong type) given as a guest's disk, kernel or
console log is refused at once, in one line naming it, its type and what to
pass: before, `hostelctl guest launch --block FIFO` hung for ever in the
launcher's open(2), and a FIFO console log stopped hosteld itself (its event
loop blocked in open(2)), so no other client got an answer."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from conftest import hostelctl
from guests.build import build
from hostel.privatebus import DaemonProcess

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="no /dev/kvm on this host")

REFUSAL_TIMEOUT = 30  # seconds; a refusal takes well under one, a blocked open for ever


@pytest.fixture(scope="module")
def hello(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build("hello", tmp_path_factory.mktemp("guests"))


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "pipe"
    os.mkfifo(path)
    yield path
    # without the fix a launcher or hosteld is left blocked opening it: free it
    for flags in (os.O_WRONLY, os.O_RDONLY):
        try:
            os.close(os.open(path, flags | os.O_NONBLOCK))
        except OSError:
            pass  # ENXIO: nobody waits to read it


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    return lines[0]


def test_guest_launch_refuses_a_fifo_disk(hosteld: DaemonProcess, hello: Path,
                                          fifo: Path) -> None:
    proc = hostelctl(hosteld.address, "guest", "launch", "--name", "fifodisk", "--block",
                     str(fifo), "8", str(hello), timeout=REFUSAL_TIMEOUT)
    assert proc.returncode == 1
    assert one_line(proc) == (f"hostelctl guest launch: fifodisk: the disk image {fifo} is a "
                              "FIFO: pass a regular file (a disk image) or a block device")


def test_guest_launch_refuses_a_directory_as_disk(hosteld: DaemonProcess, hello: Path,
                                                  tmp_path: Path) -> None:
    proc = hostelctl(hosteld.address, "guest", "launch", "--name", "dirdisk", "--block",
                     str(tmp_path), "8", str(hello), timeout=REFUSAL_TIMEOUT)
    assert proc.returncode == 1
    assert one_line(proc).endswith(f"cannot open the disk image {tmp_path}: Is a directory; "
                                   "pass a regular file (a disk image) or a block device")


def test_guest_launch_refuses_a_fifo_kernel(hosteld: DaemonProcess, fifo: Path) -> None:
    proc = hostelctl(hosteld.address, "guest", "launch", "--name", "fifokernel", "8", str(fifo),
                     timeout=REFUSAL_TIMEOUT)
    assert proc.returncode == 1
    assert one_line(proc).endswith(f"the kernel {fifo} is a FIFO: pass the kernel as a "
                                   "regular file")


def start_guest(hosteld: DaemonProcess, name: str, kernel: Path,
                console_log: Path) -> subprocess.CompletedProcess[str]:
    """StartGuest with no console fd: the console goes to ConsoleLog, which
    hosteld itself opens."""
    return subprocess.run(
        ["busctl", f"--address={hosteld.address}", "call", "org.hostel1", "/org/hostel1/guest",
         "org.hostel1.GuestManager", "StartGuest", "sa{sv}", name, "3",
         "Kernel", "s", str(kernel), "MemoryMB", "u", "8", "ConsoleLog", "s", str(console_log)],
        capture_output=True, text=True, timeout=REFUSAL_TIMEOUT)


def test_a_fifo_console_log_is_refused_without_blocking_hosteld(hosteld: DaemonProcess,
                                                                hello: Path,
                                                                fifo: Path) -> None:
    proc = start_guest(hosteld, "fifolog", hello, fifo)
    assert proc.returncode != 0
    assert (f"cannot open the console log {fifo}: No such device or address (a FIFO with no "
            "reader?); pass a regular file's path") in proc.stderr
    # hosteld still answers, and still has no guest of that name
    listing = hostelctl(hosteld.address, "guest", "list", timeout=REFUSAL_TIMEOUT)
    assert listing.returncode == 0 and "fifolog" not in listing.stdout


def test_a_fifo_console_log_with_a_reader_is_refused_too(hosteld: DaemonProcess, hello: Path,
                                                         fifo: Path) -> None:
    """With a reader the open succeeds; the type check still refuses it: a reader
    that stops reading would block whoever writes the log."""
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        proc = start_guest(hosteld, "fifolog2", hello, fifo)
    finally:
        os.close(reader)
    assert proc.returncode != 0
    assert f"the console log {fifo} is a FIFO: pass a regular file's path" in proc.stderr
