"""Debian's stock kernels in hostel's kernel cache (written by scripts/fetch-kernels
during `make setup`): `amd64` boots the lab VM, `cloud-amd64` is the guest kernel."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CACHE = "/var/cache/hostel/kernels"


class KernelMissing(RuntimeError):
    """The cache lacks a kernel: a test must fail saying how to get it, never skip."""


@dataclass(frozen=True)
class Kernel:
    flavour: str      # "amd64" or "cloud-amd64"
    vmlinuz: Path     # the bzImage
    modules: Path     # its lib/modules/VERSION
    config: Path
    version: str


def cache_dir() -> Path:
    return Path(os.environ.get("HOSTEL_KERNEL_CACHE", DEFAULT_CACHE))


def kernel(flavour: str) -> Kernel:
    """The cached kernel of that flavour; KernelMissing says how to fetch it."""
    root = cache_dir() / flavour
    found = Kernel(flavour, root / "vmlinuz", root / "modules", root / "config",
                   (root / "version").read_text().strip() if (root / "version").exists() else "")
    if not (found.vmlinuz.is_file() and found.modules.is_dir() and found.version):
        raise KernelMissing(f"Debian's {flavour} kernel is not in {root}: run 'make setup' "
                            "(scripts/fetch-kernels fetches it; it needs the network once)")
    return found
