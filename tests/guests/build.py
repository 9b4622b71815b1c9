"""Build the freestanding test guests with gcc: static, no libc, linked at 1 MiB."""
from __future__ import annotations

import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
CFLAGS = ["-O2", "-ffreestanding", "-nostdlib", "-static", "-fno-pic", "-no-pie",
          "-fno-stack-protector", "-mno-red-zone", "-mgeneral-regs-only",
          "-fno-asynchronous-unwind-tables", "-Wall", "-Werror"]


def build(name: str, out_dir: Path) -> Path:
    """Compile tests/guests/NAME.c into out_dir/NAME (an ELF64 executable)."""
    out = out_dir / name
    subprocess.run(["gcc", *CFLAGS, f"-T{HERE / 'guest.ld'}", f"-I{HERE}", "-o", str(out),
                    str(HERE / f"{name}.c")], check=True, capture_output=True, text=True)
    return out
