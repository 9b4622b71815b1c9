"""`make bench`: run every benchmark, print one table, keep the raw rows in bench/results/."""
from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ["dbus_roundtrip", "cli_startup", "generator.run", "containers", "virtqueue"]


def main(names: list[str]) -> int:
    sys.path.insert(0, str(HERE))
    results_dir = HERE / "results"
    results_dir.mkdir(exist_ok=True)
    all_rows = []
    for name in names or BENCHMARKS:
        print(f"==> {name}", file=sys.stderr, flush=True)
        rows = importlib.import_module(name).run()
        all_rows += rows
        (results_dir / f"{name}.json").write_text(json.dumps(rows, indent=1))
    stamp = time.strftime("%Y-%m-%d %H:%M")
    print(f"\nhostel benchmarks, {stamp}\n")
    for row in all_rows:
        print(" | ".join(f"{k}={v}" for k, v in row.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
