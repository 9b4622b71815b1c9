"""Debian's stock cloud kernel on hostel's launcher, using every hostel device.

The kernel gets no device arguments: it must find the virtio-mmio devices
through the launcher's ACPI tables, load its own drivers from the initramfs
(tests/guests/linux.py builds it) and use them. One boot exercises blk,
console (hvc0 and a named port), rng and net together, because a nested
guest in the lab costs tens of seconds per boot; the other boots each end
the guest a different way (ACPI S5, ACPI reset, i8042 reset, panic) and
check SMP and memory above 4 GiB on the way.

Needs hardware KVM (kvm_intel or kvm_amd): where the host lacks it (PVM),
the `lab` marker runs these tests in the lab VM (tests/lab/README.md)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from conftest import hostelctl
from guests.linux import CLOUD_MODULES, MARKER, cloud_kernel, linux_initramfs
from hostel import native
from hostel.guest.backend import GuestExit
from hostel.guest.console import Port
from hostel.guest.launcher import Launcher
from hostel.guest.settings import BlockSpec, GuestSettings, NetSpec

pytestmark = [pytest.mark.lab("kvm"), pytest.mark.slow]
SCALE = float(os.environ.get("HOSTEL_TEST_TIME_SCALE", "1"))
BOOT_TIMEOUT = 12 * SCALE          # one boot to its end, everything included
HOST_IP, GUEST_IP = "10.77.0.1", "10.77.0.2"
GUEST_MAC = "02:00:5e:10:00:02"
PORT_NAME = "org.hostel.test"
GiB = 1 << 30
BULK = 1 << 20

# The guest's half of the device test: results and requests go over the named
# port (its own stream, apart from the consoles); each `ask` waits for the host.
DEVICES_SCRIPT = r"""
for i in $(seq 200); do   # the port's name arrives after the driver binds
    for d in /sys/class/virtio-ports/*; do
        [ "$(cat $d/name 2>/dev/null)" = "%(port)s" ] && P=/dev/${d##*/}
    done
    [ -n "$P" ] && break
    sleep 0.1
done
exec 3<>$P
say() { echo "$*" >&3; }
ask() { say "NEED $*"; read -r reply <&3; }
say "cpus $(grep -c ^processor /proc/cpuinfo)"
say "virtio $(cat /sys/bus/virtio/devices/*/device | sort | tr '\n' ' ')"
say "vda size $(blockdev --getsize64 /dev/vda) ro $(blockdev --getro /dev/vda)"
say "vda cache $(cat /sys/block/vda/queue/write_cache)"
say "vda head $(head -c 1048576 /dev/vda | sha256sum | cut -d' ' -f1)"
say "vda tail $(dd if=/dev/vda bs=1M skip=1023 count=1 2>/dev/null | sha256sum | cut -d' ' -f1)"
head -c 65536 /dev/urandom > /tmp/pattern
say "pattern $(sha256sum < /tmp/pattern | cut -d' ' -f1)"
dd if=/tmp/pattern of=/dev/vda bs=65536 seek=8000 oflag=direct conv=fsync 2>/dev/null
say "vda write $?"
ask check-write
echo 3 > /proc/sys/vm/drop_caches
say "vda readback $(dd if=/dev/vda bs=65536 skip=8000 count=1 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"
sync; say "sync $?"
say "vdb size $(blockdev --getsize64 /dev/vdb) ro $(blockdev --getro /dev/vdb)"
say "vdb sha $(sha256sum /dev/vdb | cut -d' ' -f1)"
echo x | dd of=/dev/vdb bs=512 seek=1 oflag=direct conv=fsync 2>/dev/null
say "vdb write $?"
say "hwrng $(head -c 256 /dev/hwrng | wc -c) $(cat /sys/class/misc/hw_random/rng_current)"
stty -F /dev/hvc0 raw -echo
echo "hvc0 out from the guest" > /dev/hvc0
ask hvc0-input
read -r line < /dev/hvc0
say "hvc0 in $line"
ip link set lo up
ip link set eth0 up
ip addr add %(guest)s/24 dev eth0
say "eth0 mac $(cat /sys/class/net/eth0/address)"
ping -c 2 -W 10 %(host)s > /dev/null
say "ping host $?"
ask ping-guest
head -c %(bulk)d /dev/urandom > /tmp/out
say "out sha $(sha256sum < /tmp/out | cut -d' ' -f1)"
nc %(host)s 5001 < /tmp/out
say "out sent $?"
nc -l -p 5002 > /tmp/in &
listener=$!
sleep 1
ask send-to-guest
wait $listener
say "in sha $(sha256sum < /tmp/in | cut -d' ' -f1)"
say "done"
poweroff -f
""" % {"port": PORT_NAME, "guest": GUEST_IP, "host": HOST_IP, "bulk": BULK}


@dataclass
class Boot:
    """What one guest boot did, seen from the host."""

    exit: GuestExit
    console: str
    seconds_to_marker: float | None      # first KVM_RUN to the init's marker
    seconds: float                       # first KVM_RUN to the guest's end
    results: dict[str, str] = field(default_factory=dict)


def read_console(fd: int, into: bytearray, marker_seen: list[float]) -> None:
    while chunk := os.read(fd, 65536):
        into += chunk
        if not marker_seen and MARKER.encode() in into:
            marker_seen.append(time.monotonic())


def boot(settings: GuestSettings, ports: list[Port] | None = None, input_fd: int = -1,
         in_netns: str | None = None, restarts: list[GuestExit] | None = None) -> Boot:
    """Launch, run to the end (bounded by BOOT_TIMEOUT), collect the console."""
    console_r, console_w = os.pipe()
    console = bytearray()
    marker: list[float] = []
    reader = threading.Thread(target=read_console, args=(console_r, console, marker), daemon=True)
    reader.start()
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            run_launcher()
        except BaseException as e:  # re-raised in the test's thread
            outcome["error"] = e

    def run_launcher() -> None:
        if in_netns:
            enter_netns(in_netns)
        launcher = Launcher(settings, console_w, ports, input_fd)
        watchdog = threading.Timer(BOOT_TIMEOUT, launcher.stop)
        watchdog.start()
        try:
            outcome["started"] = time.monotonic()
            outcome["exit"] = launcher.run()
            outcome["ended"] = time.monotonic()
            if restarts is not None:
                restarts.extend(launcher.restarts)
        finally:
            watchdog.cancel()
            launcher.close()

    try:
        thread = threading.Thread(target=run)
        thread.start()
        thread.join(BOOT_TIMEOUT + 60)
    finally:
        os.close(console_w)
        reader.join(10)
        os.close(console_r)
    text = console.decode(errors="replace")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    assert "exit" in outcome, f"the launcher failed; console:\n{text[-3000:]}"
    started = float(outcome["started"])  # type: ignore[arg-type]
    return Boot(outcome["exit"], text,  # type: ignore[arg-type]
                marker[0] - started if marker else None,
                float(outcome["ended"]) - started)  # type: ignore[arg-type]


def enter_netns(name: str) -> None:
    """Move the calling thread (only) into the namespace: setns is per thread."""
    with open(f"/run/netns/{name}") as ns:
        native.setns(ns.fileno(), native.CLONE_NEWNET)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def kernel_settings(tmp_path: Path, script: str, **overrides: object) -> GuestSettings:
    initrd = linux_initramfs(tmp_path / "initrd.cpio", script, CLOUD_MODULES)
    fields: dict[str, object] = {"memory_mb": 256, "kernel": cloud_kernel(), "initrd": initrd,
                                 "cmdline": "console=ttyS0 quiet panic=-1"}
    fields.update(overrides)
    return GuestSettings(**fields)  # type: ignore[arg-type]


# The device boot -----------------------------------------------------------------

@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    name = f"hostel-linux-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True)


@dataclass
class DeviceHost:
    """The host's half of the device test: answers the guest's requests on the
    named port and keeps what it saw."""

    netns: str
    big_disk: Path
    port_out: int            # the guest's port output arrives here
    port_in: int             # what we write here reaches the guest's port
    console_in: int          # the guest's hvc0 input
    results: dict[str, str] = field(default_factory=dict)
    checks: dict[str, object] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def serve(self) -> None:
        enter_netns(self.netns)
        listener = socket.create_server((HOST_IP, 5001)) if self._tap_ready() else None
        buffered = b""
        while True:
            chunk = os.read(self.port_out, 4096)
            if not chunk:
                break
            buffered += chunk
            while b"\n" in buffered:
                line, buffered = buffered.split(b"\n", 1)
                self._line(line.decode(errors="replace"), listener)
        if listener is not None:
            listener.close()

    def _tap_ready(self, timeout: float = 30.0) -> bool:
        """The launcher configures the tap before the guest runs; wait for the address."""
        deadline = time.monotonic() + timeout * SCALE
        while time.monotonic() < deadline:
            out = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
            if HOST_IP in out:
                return True
            time.sleep(0.2)
        self.errors.append(f"no tap with {HOST_IP} appeared")
        return False

    def _line(self, line: str, listener: socket.socket | None) -> None:
        if not line.startswith("NEED "):
            key, _, value = line.partition(" ")
            sub, _, rest = value.partition(" ")
            if key in ("vda", "vdb", "hvc0", "out", "in", "ping", "eth0"):
                self.results[f"{key} {sub}"] = rest
            else:
                self.results[key] = value
            return
        request = line[len("NEED "):]
        try:
            self._answer(request, listener)
        except OSError as e:
            self.errors.append(f"{request}: {e}")
        os.write(self.port_in, b"ok\n")

    def _answer(self, request: str, listener: socket.socket | None) -> None:
        if request == "check-write":
            with open(self.big_disk, "rb") as disk:
                disk.seek(8000 * 65536)
                self.checks["written"] = sha256(disk.read(65536))
        elif request == "hvc0-input":
            os.write(self.console_in, b"a line typed on the host\n")
        elif request == "ping-guest":
            if listener is not None:   # the guest's bulk transfer comes next
                self._receive(listener)
            done = subprocess.run(["busybox", "ping", "-c", "2", "-w", str(int(3 * SCALE)),
                                   GUEST_IP], capture_output=True, text=True)
            self.checks["ping guest"] = done.returncode
        elif request == "send-to-guest":
            payload = os.urandom(BULK)
            self.checks["sent"] = sha256(payload)
            with socket.create_connection((GUEST_IP, 5002), timeout=60 * SCALE) as conn:
                conn.sendall(payload)

    def _receive(self, listener: socket.socket) -> None:
        """The guest's bulk transfer, on a thread so the guest can ask meanwhile."""
        got: dict[str, str] = {}

        def accept() -> None:
            enter_netns(self.netns)
            listener.settimeout(120 * SCALE)
            conn, _ = listener.accept()
            data = bytearray()
            with conn:
                conn.settimeout(120 * SCALE)
                while len(data) < BULK and (chunk := conn.recv(1 << 16)):
                    data += chunk
            got["sha"] = sha256(bytes(data))

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        self.checks["receiver"] = thread
        self.checks["received box"] = got


@pytest.fixture(scope="module")
def device_boot(tmp_path_factory: pytest.TempPathFactory, netns: str) -> tuple[Boot, DeviceHost, dict[str, str]]:
    tmp = tmp_path_factory.mktemp("linux-devices")
    big = tmp / "big.img"
    with open(big, "wb") as disk:          # 1 GiB, sparse, with data at both ends
        disk.write(os.urandom(1 << 20))
        disk.seek(GiB - (1 << 20))
        disk.write(os.urandom(1 << 20))
    small = tmp / "small.img"
    small.write_bytes(os.urandom(2 << 20))
    with open(big, "rb") as disk:
        head = disk.read(1 << 20)
        disk.seek(GiB - (1 << 20))
        tail = disk.read()
    expected = {"big head": sha256(head), "big tail": sha256(tail),
                "small": sha256(small.read_bytes())}
    port_out_r, port_out_w = os.pipe()
    port_in_r, port_in_w = os.pipe()
    console_in_r, console_in_w = os.pipe()
    host = DeviceHost(netns, big, port_out_r, port_in_w, console_in_w)
    server = threading.Thread(target=host.serve, daemon=True)
    server.start()
    settings = kernel_settings(tmp, DEVICES_SCRIPT, rng=True,
                               block=(BlockSpec(big), BlockSpec(small, read_only=True)),
                               network=(NetSpec(address=HOST_IP, mac=GUEST_MAC),))
    try:
        result = boot(settings, [Port(PORT_NAME, port_out_w, port_in_r)], console_in_r, netns)
    finally:
        for fd in (port_out_w, port_in_r, console_in_r):
            os.close(fd)
        server.join(30)
        for fd in (port_out_r, port_in_w, console_in_w):
            os.close(fd)
    receiver = host.checks.get("receiver")
    if isinstance(receiver, threading.Thread):
        receiver.join(30)
    result.results = host.results
    print(json.dumps({"boot to marker s": result.seconds_to_marker, "boot s": result.seconds}))
    return result, host, expected


def test_stock_kernel_finds_every_device_and_powers_off(device_boot) -> None:
    result, host, _ = device_boot
    assert result.exit == GuestExit("poweroff", 0, "the guest powered off (ACPI S5)"), \
        f"{result.results}\n{host.checks}\n{result.console[-3000:]}"
    assert host.errors == []
    assert result.results.get("done") == "", result.results
    # console (3), block (2) x2, net (1), rng (4): found through ACPI alone
    assert result.results["virtio"].split() == sorted(["0x0003", "0x0002", "0x0002", "0x0001",
                                                       "0x0004"])
    assert "virtio_mmio.device" not in result.console
    assert result.results["cpus"] == "1"
    assert result.seconds_to_marker is not None


def test_blk_reads_writes_and_flushes_the_file(device_boot) -> None:
    result, host, expected = device_boot
    r = result.results
    assert r["vda size"] == f"{GiB} ro 0"
    assert r["vda head"] == expected["big head"] and r["vda tail"] == expected["big tail"]
    assert r["vda write"] == "0" and host.checks["written"] == r["pattern"], \
        "the guest's write reached the file"
    assert r["vda readback"] == r["pattern"]
    assert r["vda cache"] == "write back", "VIRTIO_BLK_F_FLUSH negotiated: the guest flushes"
    assert r["sync"] == "0"


def test_blk_read_only_disk_hashes_whole_and_refuses_writes(device_boot) -> None:
    r = device_boot[0].results
    assert r["vdb size"] == f"{2 << 20} ro 1"
    assert r["vdb sha"] == device_boot[2]["small"]
    assert r["vdb write"] != "0"


def test_console_both_ways_and_a_named_port(device_boot) -> None:
    result = device_boot[0]
    assert "hvc0 out from the guest" in result.console
    assert result.results["hvc0 in"] == "a line typed on the host"
    assert result.results["cpus"] == "1", "the named port carried the guest's results"


def test_rng_feeds_hwrng(device_boot) -> None:
    assert device_boot[0].results["hwrng"].startswith("256 virtio_rng")


def test_net_ping_and_bulk_both_ways(device_boot) -> None:
    result, host, _ = device_boot
    r = result.results
    assert r["eth0 mac"] == GUEST_MAC
    assert r["ping host"] == "0" and host.checks["ping guest"] == 0
    assert r["out sent"] == "0"
    assert host.checks["received box"] == {"sha": r["out sha"]}
    assert r["in sha"] == host.checks["sent"]


# The ends of a guest --------------------------------------------------------------

SMP_MEMORY_SCRIPT = r"""
echo "cpus $(grep -c ^processor /proc/cpuinfo) online $(cat /sys/devices/system/cpu/online)"
echo "memtotal $(grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2)"
reboot -f
"""


def _field(console: str, key: str) -> str:
    found = re.search(rf"^{key} (.*)$", console, re.M)
    assert found, f"no {key!r} line on the console:\n{console[-3000:]}"
    return found.group(1).strip()


def test_reboot_through_acpi_with_4_cpus_and_6_gib(tmp_path: Path) -> None:
    """RAM above the MMIO gap is all there; every vCPU comes up; `reboot` ends the
    guest as a reboot. (Without EFI, a hardware-reduced Linux reboots through the
    BIOS reset vector, where the launcher's stub writes the ACPI reset register.)
    Four vCPUs, not eight, in a boot that loads modules: the lab has two emulated
    CPUs, and eight nested vCPUs on them once left insmod waiting 70 s for its
    IPIs (a soft lockup). Eight come up in test_eight_vcpus_all_come_up_and_run."""
    result = boot(kernel_settings(tmp_path, SMP_MEMORY_SCRIPT, cpus=4, memory_mb=6 << 10))
    assert result.exit.reason == "reboot" and "ACPI reset register" in result.exit.detail, \
        result.console[-3000:]
    assert _field(result.console, "cpus") == "4 online 0-3"
    memtotal_kib = int(_field(result.console, "memtotal"))
    assert memtotal_kib > (6 << 20) - (256 << 10), "MemTotal within 256 MiB of 6 GiB"
    assert memtotal_kib <= 6 << 20


RESTART_SCRIPT = r"""
echo "memtotal $(grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2)"
if [ "$(head -c 5 /dev/vda)" = "boot1" ]; then
    echo "second boot"
    poweroff -f
fi
printf boot1 > /tmp/mark
dd if=/tmp/mark of=/dev/vda bs=5 count=1 conv=fsync 2>/dev/null
echo "first boot"
reboot -f
"""


def test_i8042_reboot_of_a_4_gib_guest_restarts_it(tmp_path: Path) -> None:
    """reboot=k makes Linux pulse the keyboard controller's reset line (port 0x64);
    with on_reboot="restart" the launcher boots the same kernel again on a fresh
    VM whose devices work (the second boot reads the first one's mark), and all
    4 GiB are there both times."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    settings = kernel_settings(tmp_path, RESTART_SCRIPT, memory_mb=4 << 10, on_reboot="restart",
                               block=(BlockSpec(disk),),
                               cmdline="console=ttyS0 quiet panic=-1 reboot=k")
    restarts: list[GuestExit] = []
    result = boot(settings, restarts=restarts)
    assert result.exit == GuestExit("poweroff", 0, "the guest powered off (ACPI S5)"), \
        result.console[-3000:]
    assert [r.reason for r in restarts] == ["reboot"] and "i8042" in restarts[0].detail
    assert result.console.count(MARKER) == 2
    assert result.console.index("first boot") < result.console.index("second boot")
    assert disk.read_bytes()[:5] == b"boot1"
    memtotals = [int(kib) for kib in re.findall(r"^memtotal (\d+)", result.console, re.M)]
    assert len(memtotals) == 2 and all((4 << 20) - (256 << 10) < m <= 4 << 20 for m in memtotals)


def test_a_panic_through_hostelctl_is_a_shutdown_in_one_line(hosteld, tmp_path: Path) -> None:
    """Through hosteld, as a user runs it, with --cpus: panic=-1 resets at once, but
    pvpanic told the launcher first, so the end is a shutdown, not a reboot: one
    line on stderr and exit status 1."""
    initrd = linux_initramfs(tmp_path / "panics.cpio", "echo c > /proc/sysrq-trigger\n",
                             CLOUD_MODULES)
    panicked = hostelctl(hosteld.address, "guest", "launch", "--name", "panics", "--cpus", "2",
                         "--initrd", str(initrd), "256", str(cloud_kernel()),
                         "console=ttyS0", "quiet", "panic=-1", timeout=BOOT_TIMEOUT + 30)
    assert panicked.returncode == 1, panicked.stderr
    assert panicked.stderr.splitlines() == [
        "hostelctl guest launch: panics: the guest kernel panicked (pvpanic)"], \
        panicked.stdout[-4000:]   # the console: how far the guest got
    assert "Kernel panic" in panicked.stdout


# Eight vCPUs, and PCI config space ----------------------------------------------------

# Each vCPU runs a process pinned to it, which reads the CPU it runs on from its
# own /proc/self/stat (field 39): only a vCPU that is up and scheduling says its number.
SMP8_SCRIPT = r"""
echo "nproc $(nproc) online $(cat /sys/devices/system/cpu/online)"
ran=""
for cpu in 0 1 2 3 4 5 6 7; do
    ran="$ran $(taskset $(printf %x $((1 << cpu))) cut -d' ' -f39 /proc/self/stat)"
done
echo "ran on$ran"
dmesg | grep 'PCI' | sed 's/^/dmesg: /'
poweroff -f
"""


@pytest.fixture(scope="module")
def smp8_boot(tmp_path_factory: pytest.TempPathFactory) -> Boot:
    """One boot with eight vCPUs and small memory, no modules (nothing to insmod:
    module loading is what once waited on IPIs under nested TCG)."""
    tmp = tmp_path_factory.mktemp("linux-smp8")
    initrd = linux_initramfs(tmp / "initrd.cpio", SMP8_SCRIPT, [])
    result = boot(GuestSettings(memory_mb=256, kernel=cloud_kernel(), initrd=initrd, cpus=8,
                                cmdline="console=ttyS0 quiet panic=-1"))
    print(json.dumps({"8 vCPUs: boot to marker s": result.seconds_to_marker,
                      "boot s": result.seconds}))
    return result


def test_eight_vcpus_all_come_up_and_run(smp8_boot: Boot) -> None:
    result = smp8_boot
    assert result.exit == GuestExit("poweroff", 0, "the guest powered off (ACPI S5)"), \
        result.console[-3000:]
    assert _field(result.console, "nproc") == "8 online 0-7"
    assert _field(result.console, "ran on").split() == [str(cpu) for cpu in range(8)]


def test_linux_finds_pci_conf1_and_no_fatal_error(smp8_boot: Boot) -> None:
    """The launcher answers PCI configuration mechanism 1 (0xCF8 latches the address,
    0xCFC reads all ones: no device) and its SMBIOS gives a BIOS date, so Linux
    trusts conf1 on a bus 0 with nothing on it (arch/x86/pci/direct.c) instead of
    finding no config space access at all."""
    console = smp8_boot.console
    assert "PCI: Fatal" not in console, console[-3000:]
    assert re.search(r"^dmesg: \[[ .0-9]+\] PCI: Using configuration type 1 for base access",
                     console, re.M), console[-3000:]


# A triple fault -----------------------------------------------------------------------

def test_a_triple_fault_through_hostelctl_is_a_shutdown_in_one_line(
        hosteld, private_bus, tmp_path: Path) -> None:
    """reboot=t makes Linux reboot by a triple fault (no IDT, then int3); KVM ends
    the vCPU with KVM_EXIT_SHUTDOWN, which is a shutdown, not a reboot: hosteld's
    ExitReason (seen on the bus) and one line on stderr say so, exit status 1."""
    initrd = linux_initramfs(tmp_path / "triple.cpio",
                             "echo 'init: rebooting through a triple fault'\nreboot -f\n", [])
    monitor = subprocess.Popen(
        ["dbus-monitor", "--address", private_bus.address,
         "type='signal',interface='org.freedesktop.DBus.Properties',member='PropertiesChanged'"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        faulted = hostelctl(hosteld.address, "guest", "launch", "--name", "triple-faults",
                            "--initrd", str(initrd), "256", str(cloud_kernel()),
                            "console=ttyS0", "quiet", "panic=-1", "reboot=t",
                            timeout=BOOT_TIMEOUT + 30)
    finally:
        monitor.terminate()
        signals = monitor.communicate(timeout=30)[0]
    assert "init: rebooting through a triple fault" in faulted.stdout, faulted.stdout[-3000:]
    assert faulted.returncode == 1, faulted.stderr
    assert faulted.stderr.splitlines() == [
        "hostelctl guest launch: triple-faults: the guest shut down (a triple fault)"]
    reasons = re.findall(r'string "ExitReason"\s+variant\s+string "([^"]*)"', signals)
    assert "shutdown" in reasons and "reboot" not in reasons, signals[-3000:]


# The LAPIC timer ----------------------------------------------------------------------

TIMER_SCRIPT = r"""
echo "tsc_deadline_timer $(grep -c -w tsc_deadline_timer /proc/cpuinfo)"
echo "clockevent $(cat /sys/devices/system/clockevents/clockevent0/current_device)"
loc() { awk '/LOC:/ { print $2 }' /proc/interrupts; }
first=$(loc); sleep 0.5; echo "local timer interrupts $first $(loc)"
dmesg | grep -i -e 'deadline' -e 'apic' -e 'timer' | sed 's/^/dmesg: /'
poweroff -f
"""


def test_the_lapic_timer_runs_in_tsc_deadline_mode(tmp_path: Path) -> None:
    """As under QEMU: the launcher offers CPUID.1:ECX bit 24 whenever
    KVM_CHECK_EXTENSION(KVM_CAP_TSC_DEADLINE_TIMER) says the in-kernel LAPIC
    emulates it, which KVM_GET_SUPPORTED_CPUID of the lab's 6.1 kernel does not
    report (it left the bit to userspace until 6.14). Without the bit the guest
    has no tsc_deadline_timer in /proc/cpuinfo and its clockevent is the
    one-shot `lapic`, calibrated against the PIT."""
    initrd = linux_initramfs(tmp_path / "initrd.cpio", TIMER_SCRIPT, [])
    result = boot(GuestSettings(memory_mb=256, kernel=cloud_kernel(), initrd=initrd,
                                cmdline="console=ttyS0 quiet panic=-1"))
    console = result.console
    assert result.exit == GuestExit("poweroff", 0, "the guest powered off (ACPI S5)"), \
        console[-3000:]
    assert _field(console, "tsc_deadline_timer") == "1", console[-3000:]
    assert _field(console, "clockevent") == "lapic-deadline", console[-3000:]
    before, after = (int(n) for n in _field(console, "local timer interrupts").split())
    assert after > before > 0, "the LAPIC timer interrupts, and keeps interrupting"
    assert not re.search(r"APIC timer disabled|lapic.*broken|timer.*not working", console,
                         re.I), console[-3000:]
