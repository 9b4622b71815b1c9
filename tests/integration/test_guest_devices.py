"""The launcher's devices through real KVM exits: freestanding guest programs
(tests/guests/) drive virtio-mmio, virtio-console, virtio-blk and virtio-rng
by interrupt and report on the 16550; the host side is the C workers."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from guests.build import build
from guests.run import run_to_end
from hostel.guest.backend import GuestExit
from hostel.guest.console import Port
from hostel.guest.errors import GuestError
from hostel.guest.launcher import Launcher
from hostel.guest.settings import BlockSpec, GuestSettings

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="no /dev/kvm on this host")

TIMEOUT = 20  # seconds; these guests take milliseconds, so this only catches hangs
SECTOR = 512


@dataclass
class Run:
    exit: GuestExit
    console: str


@pytest.fixture(scope="module")
def programs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("guests")
    return {name: build(name, out) for name in ("hello", "devices", "crash", "spin")}


def run_guest(kernel: Path, cmdline: str = "", ports: list[Port] | None = None,
              input_fd: int = -1, **options: object) -> Run:
    """Run a guest to its end (stopping it after TIMEOUT); collect its console."""
    read_end, write_end = os.pipe()
    try:
        launcher = Launcher(GuestSettings(memory_mb=8, kernel=kernel, cmdline=cmdline, **options),
                            write_end, ports, input_fd)
        result = run_to_end(launcher, TIMEOUT)
        os.close(write_end)
        write_end = -1
        with os.fdopen(read_end, "rb") as f:
            read_end = -1
            return Run(result, f.read().decode())
    finally:
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * 2 + os.urandom(7 * SECTOR))
    return path


def fields(console: str) -> dict[str, list[str]]:
    """'read status 00 used 00000201' -> {'read': ['status', '00', 'used', '00000201']}."""
    out = {}
    for line in console.splitlines():
        key, *rest = line.split(" ")
        out[key] = rest
    return out


def test_hello_over_the_serial_port(programs: dict[str, Path]) -> None:
    run = run_guest(programs["hello"])
    assert run.exit == GuestExit("poweroff", 0, "the guest powered off with code 0")
    assert run.console == "hello from the guest\n"


def test_a_triple_fault_ends_the_guest_as_a_shutdown(programs: dict[str, Path]) -> None:
    run = run_guest(programs["crash"])
    assert run.exit.reason == "shutdown" and "triple fault" in run.exit.detail
    assert run.console == "about to crash\n"


def test_stop_ends_a_guest_sleeping_in_hlt(programs: dict[str, Path]) -> None:
    read_end, write_end = os.pipe()
    try:
        launcher = Launcher(GuestSettings(memory_mb=8, kernel=programs["spin"]), write_end)
        assert run_to_end(launcher, 0.2).reason == "stopped"
    finally:
        os.close(read_end)
        os.close(write_end)


def test_virtio_console_output_arrives(programs: dict[str, Path]) -> None:
    run = run_guest(programs["devices"], "console")
    assert run.exit.reason == "poweroff" and run.exit.code == 0
    assert run.console == "virtio console says hi\nconsole sent\n"


def test_virtio_console_input_reaches_the_guest(programs: dict[str, Path]) -> None:
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, b"typed on the host\n")
        run = run_guest(programs["devices"], "echo", input_fd=read_end)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert run.exit.code == 0
    assert run.console == "echo typed on the host\n"


def test_virtio_blk_reads_writes_flushes_and_names_itself(programs: dict[str, Path], disk: Path) -> None:
    before = disk.read_bytes()
    run = run_guest(programs["devices"], "blk", block=(BlockSpec(disk),))
    assert run.exit.code == 0, run.console
    got = fields(run.console)
    assert got["capacity"] == ["00000008"]
    assert got["read"] == ["status", "00", "used", f"{SECTOR + 1:08x}"]
    assert got["data"] == [before[:16].hex()]
    assert got["write"] == ["status", "00", "used", "00000001"]
    after = disk.read_bytes()
    assert after[SECTOR:2 * SECTOR] == b"written by the guest".ljust(SECTOR, b"\0")
    assert after[:SECTOR] == before[:SECTOR] and after[2 * SECTOR:] == before[2 * SECTOR:]
    assert got["flush"][:2] == ["status", "00"]
    assert got["getid"][:2] == ["status", "00"] and got["id"] == ["hostel-blk0"]
    assert got["beyond"][:2] == ["status", "01"], "a read past the end is an I/O error"


def test_read_only_virtio_blk_rejects_writes(programs: dict[str, Path], disk: Path) -> None:
    before = disk.read_bytes()
    run = run_guest(programs["devices"], "blk", block=(BlockSpec(disk, read_only=True),))
    got = fields(run.console)
    assert got["read"][:2] == ["status", "00"] and got["data"] == [before[:16].hex()]
    assert got["write"][:2] == ["status", "01"]
    assert disk.read_bytes() == before


def test_virtio_rng_fills_the_buffer_by_interrupt(programs: dict[str, Path]) -> None:
    first = fields(run_guest(programs["devices"], "rng", rng=True).console)["rng"]
    second = fields(run_guest(programs["devices"], "rng", rng=True).console)["rng"]
    assert first[0] == "00000010" and len(first[1]) == 32
    assert first[2:] == ["irqs", "00000001"], "the completion came as one interrupt"
    assert first[1] != second[1]


def test_a_malicious_chain_breaks_only_its_own_device(programs: dict[str, Path], disk: Path) -> None:
    run = run_guest(programs["devices"], "evil", rng=True, block=(BlockSpec(disk),))
    assert run.exit.code == 0, run.console
    lines = run.console.splitlines()
    assert lines[:2] == ["blk needs reset", "rng still works"]
    assert lines[2] == f"after reset read status 00 used {SECTOR + 1:08x}"


def test_multiport_console_names_and_opens_a_second_port(programs: dict[str, Path]) -> None:
    port_r, port_w = os.pipe()
    try:
        run = run_guest(programs["devices"], "multiport", ports=[Port("org.hostel.guest.0", port_w)])
        os.close(port_w)
        port_w = -1
        assert run.exit.code == 0, run.console
        assert run.console == "port name org.hostel.guest.0\nport 1 written\n"
        with os.fdopen(port_r, "rb") as f:
            port_r = -1
            assert f.read() == b"hello on port 1\n"
    finally:
        for fd in (port_r, port_w):
            if fd >= 0:
                os.close(fd)


def test_too_many_devices_are_refused_and_release_their_files(programs: dict[str, Path],
                                                               disk: Path) -> None:
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(GuestError, match="10 devices; the launcher has interrupt lines for 9"):
        Launcher(GuestSettings(memory_mb=8, kernel=programs["hello"],
                               block=tuple(BlockSpec(disk) for _ in range(9))), -1)
    assert set(os.listdir("/proc/self/fd")) == before
