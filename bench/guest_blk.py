"""Sequential 4 KiB reads inside a Linux guest from hostel's virtio-blk and from
QEMU's (`-M microvm`, virtio-mmio), in the lab VM (nested KVM), same kernel
and initramfs (guest_boot.py's boots, with a disk).

The guest's init runs busybox dd on /dev/vda with bs=4k: through the page
cache (the device sees readahead-sized requests, as many segments as the
device allows per request), twice: "buffered" is the first, whose page-cache
pages are guest memory touched for the first time (each page a nested
page fault the hypervisor serves: its memory backing shows), and
"buffered-warm" the second after drop_caches (the same pages again, mostly:
the device path alone); then with O_DIRECT (one 4 KiB request at a time,
waited for: the per-request path, kick to interrupt). Each is timed by the
guest's clock.
Both devices read the same file from the lab's page cache (tmpfs). The
ratio hostel/QEMU is the number to read (DESIGN.md: >= 0.8)."""
from __future__ import annotations

import json
import os
import re
import statistics
import sys
import tempfile
from pathlib import Path

import guest_boot
from guest_boot import Boot

RUNS = 3
DISK_MB = 64                  # read whole through the page cache
DIRECT_READS = 4096           # 16 MiB in 4 KiB O_DIRECT reads
MODES = ("buffered", "buffered-warm", "direct")
# Debian's busybox dd prints no "bytes copied" line: the guest's uptime
# (10 ms steps, over reads of seconds) brackets each dd instead.
SCRIPT = """now() { read -r up _ < /proc/uptime; echo "$up"; }
bytes=$(( $(cat /sys/block/vda/size) * 512 ))
start=$(now); dd if=/dev/vda of=/dev/null bs=4k 2>/dev/null; end=$(now)
echo "blk-buffered $bytes $start $end"
echo 3 > /proc/sys/vm/drop_caches
start=$(now); dd if=/dev/vda of=/dev/null bs=4k 2>/dev/null; end=$(now)
echo "blk-buffered-warm $bytes $start $end"
start=$(now); dd if=/dev/vda of=/dev/null bs=4k count=%(direct)d iflag=direct 2>/dev/null; end=$(now)
echo "blk-direct $(( %(direct)d * 4096 )) $start $end"
echo blk-done
"""
_RESULT = re.compile(r"blk-([\w-]+) (\d+) ([\d.]+) ([\d.]+)")


def rates(console: str) -> dict[str, float]:
    """MB/s (10^6 bytes) per mode, from the script's result lines on the console."""
    found = {m.group(1): int(m.group(2)) / (float(m.group(4)) - float(m.group(3))) / 1e6
             for m in _RESULT.finditer(console)}
    missing = [mode for mode in MODES if mode not in found]
    if missing:
        raise RuntimeError(f"no dd result for {', '.join(missing)}; console:\n{console[-2000:]}")
    return found


def write_disk(path: Path) -> Path:
    """DISK_MB of random data: every block real, none a hole."""
    with open(path, "wb") as disk:
        for _ in range(DISK_MB):
            disk.write(os.urandom(1 << 20))
    return path


def inside() -> list[dict[str, object]]:
    """Runs in the lab: RUNS boots each, alternating, each reading both ways."""
    sys.path.insert(0, str(guest_boot.REPO / "tests"))
    from guests.linux import CLOUD_MODULES, MARKER, cloud_kernel, linux_initramfs

    work = Path(tempfile.mkdtemp())
    initrd = linux_initramfs(work / "initrd.cpio", SCRIPT % {"direct": DIRECT_READS}, CLOUD_MODULES)
    boot = Boot(cloud_kernel(), initrd, MARKER.encode(), disk=write_disk(work / "disk.img"),
                end=b"blk-done")
    runs: dict[str, list[dict[str, float]]] = {"hostel": [], "qemu": []}
    for _ in range(RUNS):
        runs["hostel"].append(rates(guest_boot.hostel_boot(boot)[1].text))
        runs["qemu"].append(rates(guest_boot.qemu_boot(boot)[1].text))
    rows: list[dict[str, object]] = []
    for mode in MODES:
        median = {who: statistics.median(r[mode] for r in runs[who]) for who in runs}
        for who, label in (("hostel", "hostel"), ("qemu", "qemu -M microvm")):
            rows.append({"bench": "guest_blk", "what": f"{label}, 4 KiB {mode} reads (MB/s)",
                         "median": round(median[who], 2),
                         "runs": [round(r[mode], 2) for r in runs[who]]})
        rows.append({"bench": "guest_blk", "what": f"ratio hostel/qemu, {mode}",
                     "median": round(median["hostel"] / median["qemu"], 2)})
    return rows


def run() -> list[dict[str, object]]:
    """From `bench/run.py guest_blk`: one lab boot running inside()."""
    return guest_boot.in_lab("guest_blk.py")


if __name__ == "__main__":
    if sys.argv[1:] == ["--inside"]:
        print(json.dumps(inside()))
    else:
        print(json.dumps(run(), indent=1))
