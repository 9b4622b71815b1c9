"""The launcher jails itself once the guest is set up (daemon/hostel/guest/jail.py),
proven from outside while a real KVM guest runs: /proc/PID/status and the
namespace links of the launcher hosteld's GuestManager started, and the guest
still doing I/O through its devices afterwards."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from guests.build import build
from hostel.guest.manager import EXITED, GuestManager
from hostel.guest.settings import BlockSpec, GuestSettings

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="no /dev/kvm on this host")

NOBODY = 65534
NAMESPACES = ("mnt", "pid", "ipc", "net")


def status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


async def jailed(pid: int, timeout: float = 20) -> dict[str, str]:
    """The launcher's status once its seccomp filter is on (the jail's last step)."""
    async with asyncio.timeout(timeout):
        while (fields := status(pid)).get("Seccomp") != "2":
            await asyncio.sleep(0.02)
    return fields


@pytest.fixture
def manager(tmp_path: Path) -> GuestManager:
    return GuestManager(tmp_path / "run", lambda guest: None)


async def test_the_launcher_runs_jailed_and_its_guest_still_does_io(manager: GuestManager,
                                                                   tmp_path: Path) -> None:
    kernel = build("devices", tmp_path)
    console_r, console_w = os.pipe2(os.O_CLOEXEC)
    input_r, input_w = os.pipe2(os.O_CLOEXEC)
    try:
        guest = await manager.start("jailed", GuestSettings(memory_mb=8, kernel=kernel,
                                                            cmdline="echo"), console_w, input_r)
        try:
            fields = await jailed(guest.pid)
            assert fields["Uid"].split() == [str(NOBODY)] * 4
            assert fields["Gid"].split() == [str(NOBODY)] * 4
            assert fields["Groups"] == ""
            for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
                assert int(fields[caps], 16) == 0, caps
            assert fields["NoNewPrivs"] == "1"
            for ns in NAMESPACES:
                assert os.readlink(f"/proc/{guest.pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
            assert fields["NSpid"].split()[-1] == "1", "pid 1 of its own pid namespace"
            assert os.listdir(f"/proc/{guest.pid}/root") == [], "an empty root"
            os.write(input_w, b"after the jail\n")   # virtio-console in, serial out
            async with asyncio.timeout(20):
                await guest.exited.wait()
        finally:
            if guest.state != EXITED:
                await manager.terminate("jailed")
        assert (guest.exit_reason, guest.exit_status) == ("poweroff", 0), guest.exit_detail
        os.close(console_w)
        console_w = -1
        assert os.read(console_r, 4096).decode() == "echo after the jail\n"
    finally:
        for fd in (console_r, console_w, input_r, input_w):
            if fd >= 0:
                os.close(fd)


async def run_jailed(manager: GuestManager, name: str, settings: GuestSettings) -> str:
    """Run a guest under the jail to its end; its console (serial and virtio)."""
    console_r, console_w = os.pipe2(os.O_CLOEXEC)
    try:
        guest = await manager.start(name, settings, console_w)
        os.close(console_w)
        console_w = -1
        async with asyncio.timeout(20):
            await guest.exited.wait()
        assert (guest.exit_reason, guest.exit_status) == ("poweroff", 0), guest.exit_detail
        return os.read(console_r, 65536).decode()
    finally:
        for fd in (console_r, console_w):
            if fd >= 0:
                os.close(fd)


async def test_jailed_block_and_rng_devices_still_work(manager: GuestManager, tmp_path: Path) -> None:
    """Every data path the seccomp filter must let through: preadv, pwritev and
    fdatasync on the disk file, getrandom for the rng, writes to the console."""
    kernel = build("devices", tmp_path)
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(8 * 512))
    console = await run_jailed(manager, "jailed-blk", GuestSettings(
        memory_mb=8, kernel=kernel, cmdline="blk", block=(BlockSpec(disk),)))
    fields = {line.split(" ")[0]: line.split(" ")[1:] for line in console.splitlines()}
    for request in ("read", "write", "flush", "getid"):
        assert fields[request][:2] == ["status", "00"], console
    assert disk.read_bytes()[512:1024].startswith(b"written by the guest")
    console = await run_jailed(manager, "jailed-rng", GuestSettings(
        memory_mb=8, kernel=kernel, cmdline="rng", rng=True))
    assert console.startswith("rng 00000010 "), console


JAILED_PROGRAM = """
import os, socket, sys
from hostel.guest import jail
jail.enter(jail.settings_for(None, None))
os.write(1, b"jailed\\n")
if sys.argv[1] == "socket":
    socket.socket(socket.AF_INET, socket.SOCK_STREAM)   # not on the allow-list
elif sys.argv[1] == "kill":
    os.kill(os.getpid(), 0)   # harmless if it were let through
"""


@pytest.mark.parametrize("forbidden", ["socket", "kill"])
def test_a_system_call_off_the_allow_list_kills_the_jailed_process(forbidden: str) -> None:
    ok = subprocess.run([sys.executable, "-c", JAILED_PROGRAM, "nothing"], capture_output=True,
                        timeout=30)
    assert (ok.returncode, ok.stdout) == (0, b"jailed\n"), ok.stderr
    bad = subprocess.run([sys.executable, "-c", JAILED_PROGRAM, forbidden], capture_output=True,
                         timeout=30)
    assert bad.stdout == b"jailed\n" and bad.returncode == -signal.SIGSYS, bad.stderr


NET_PROGRAM = """
import asyncio, json, os, socket, struct, sys
from pathlib import Path
from hostel.guest.manager import GuestManager
from hostel.guest.settings import GuestSettings, NetSpec

MAC = bytes.fromhex("02005e100001")
STATS = Path("/sys/class/net/hosteltap0/statistics/rx_packets")  # the only tap in this netns


async def main() -> None:
    manager = GuestManager(Path(sys.argv[2]), lambda guest: None)
    console_r, console_w = os.pipe2(os.O_CLOEXEC)
    guest = await manager.start("jailed-net", GuestSettings(
        memory_mb=8, kernel=Path(sys.argv[1]), cmdline="net",
        network=(NetSpec(address="10.99.0.1", mac=MAC.hex(":")),)), console_w)
    os.close(console_w)
    async with asyncio.timeout(20):
        while not STATS.exists() or int(STATS.read_text()) < 1:  # the guest's frame, sent jailed
            await asyncio.sleep(0.02)
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
        sock.bind(("hosteltap0", 0))
        sock.send(MAC + bytes.fromhex("020000000002") + struct.pack("!H", 0x88B5)
                  + b"hello from the host\\0".ljust(46, b"\\0"))
        await guest.exited.wait()
    print(json.dumps({"reason": guest.exit_reason, "detail": guest.exit_detail,
                      "console": os.read(console_r, 4096).decode()}))


asyncio.run(main())
"""


@pytest.mark.skipif(not os.path.exists("/dev/net/tun"), reason="needs /dev/net/tun")
def test_a_jailed_launcher_keeps_its_tap(tmp_path: Path) -> None:
    """The tap is opened and configured in hosteld's network namespace before the
    launcher leaves it: frames still cross both ways (in a throwaway namespace)."""
    kernel = build("devices", tmp_path)
    netns = f"hostel-test-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        out = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", NET_PROGRAM,
                              str(kernel), str(tmp_path / "run")],
                             capture_output=True, text=True, timeout=60)
    finally:
        subprocess.run(["ip", "netns", "delete", netns], check=True)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["reason"] == "poweroff", result["detail"]
    assert result["console"] == "net sent\nnet received hello from the host\n"
