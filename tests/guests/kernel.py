"""Debian's stock kernel for the bzImage tests: /boot/vmlinuz-* when installed,
else the linux-image package in apt's cache, unpacked into `out`."""
from __future__ import annotations

import glob
import subprocess
from pathlib import Path

HOW_TO_GET_ONE = ("no Debian kernel here: install linux-image-amd64 (or leave its .deb in "
                  "/var/cache/apt/archives) to test with a stock bzImage")


def debian_kernel(out: Path) -> Path | None:
    installed = sorted(glob.glob("/boot/vmlinuz-*"))
    if installed:
        return Path(installed[-1])
    debs = sorted(glob.glob("/var/cache/apt/archives/linux-image-[0-9]*-amd64_*.deb"))
    if not debs:
        return None
    tar = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", debs[-1]], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(out), "--wildcards", "./boot/vmlinuz-*"],
                   stdin=tar.stdout, check=True)
    if tar.wait() != 0:
        raise RuntimeError(f"dpkg-deb could not read {debs[-1]}")
    return next(out.glob("boot/vmlinuz-*"))
