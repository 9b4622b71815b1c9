"""`make lab-shell`: boot the lab VM by hand, with a root shell on its serial console
in the checkout, for debugging lab tests and guests (run pytest there: lab tests
run directly inside). Leave with `exit` (the VM powers off) or Ctrl-A X (QEMU quits)."""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from lab import vm
from lab.job import preamble


def main() -> int:
    size = shutil.get_terminal_size()
    job_dir = Path(tempfile.mkdtemp(prefix="hostel-lab-shell-"))
    script = (preamble(str(vm.REPO)) + f"stty rows {size.lines} cols {size.columns} "
              "</dev/ttyS0 2>/dev/null\n"
              "exec setsid -c /bin/bash -l </dev/ttyS0 >/dev/ttyS0 2>&1\n")
    print("lab-shell: booting the lab VM (root shell in the checkout; 'exit' powers it off, "
          "Ctrl-A X quits QEMU)", file=sys.stderr)
    try:
        run = vm.run(script, job_dir, interactive=True)
    except (vm.LabError, RuntimeError) as e:
        print(f"lab-shell: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(job_dir, ignore_errors=True)
    boot = f"{run.boot_seconds:.1f} s" if run.boot_seconds is not None else "unknown"
    print(f"lab-shell: the lab VM powered off (boot {boot}, {run.seconds:.0f} s in all)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
