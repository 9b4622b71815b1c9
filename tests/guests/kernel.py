"""Debian's stock kernels, as `make kernels` (part of `make setup`) leaves them.

scripts/fetch-kernels downloads linux-image-cloud-amd64 and linux-image-amd64
and unpacks them into CACHE/FLAVOUR/{vmlinuz,config,version,modules/}; nothing
is installed into /boot, so the tests see the same kernel on every machine."""
from __future__ import annotations

import os
from pathlib import Path

CACHE = Path(os.environ.get("HOSTEL_KERNEL_CACHE", "/var/cache/hostel/kernels"))
HOW_TO_GET_ONE = f"no Debian kernel in {CACHE}: run `make kernels` (part of `make setup`)"


def debian_kernel(flavour: str = "cloud-amd64") -> Path | None:
    """The cached bzImage of `flavour` ("cloud-amd64" for guests, "amd64" for the
    generic one), or None when the cache lacks it."""
    vmlinuz = CACHE / flavour / "vmlinuz"
    return vmlinuz if vmlinuz.is_file() else None
