"""hostelctl start-up, side by side with machinectl and the bare interpreter (hyperfine)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from hostel.privatebus import PrivateBus, start_daemon

VENV_BIN = Path(sys.executable).parent


def hyperfine(commands: dict[str, str], env: dict[str, str], runs: int = 40) -> dict[str, float]:
    """Mean wall time in ms of each command."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        args = ["hyperfine", "-N", "--warmup", "3", "--runs", str(runs), "--export-json", out.name]
        for name, cmd in commands.items():
            args += ["-n", name, cmd]
        subprocess.run(args, env=env, check=True, stdout=subprocess.DEVNULL)
        results = json.load(open(out.name))["results"]
    return {r["command"]: r["mean"] * 1000 for r in results}


def run() -> list[dict[str, object]]:
    if not shutil.which("hyperfine"):
        raise SystemExit("hyperfine is missing: run 'make setup'")
    rows = []
    with tempfile.TemporaryDirectory(prefix="hostel-bench-") as tmp:
        bus = PrivateBus(Path(tmp) / "bus").start()
        daemon = start_daemon(bus, Path(tmp))
        env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=bus.address, SYSTEMD_COLORS="0")
        try:
            means = hyperfine({
                "python3 -I -c pass (floor)": f"{sys.executable} -I -c pass",
                "hostelctl --help": f"{VENV_BIN}/hostelctl --help",
                "machinectl --help (peer)": "machinectl --help --no-pager",
                "hostelctl status": f"{VENV_BIN}/hostelctl status",
                "busctl get-property (peer)": f"busctl --address={bus.address} get-property "
                                              "org.hostel1 /org/hostel1 org.hostel1.Daemon Version",
            }, env)
        finally:
            daemon.stop()
            bus.stop()
    for name, ms in means.items():
        rows.append({"benchmark": "CLI start-to-exit", "target": name, "mean_ms": round(ms, 1)})
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
