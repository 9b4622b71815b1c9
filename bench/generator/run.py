"""hostel-cryptsetup-generator vs systemd's C generator, at 3 and 1,000 crypttab entries.

Both run as installed at boot: systemd's binary, and our launcher
(bin/hostel-cryptsetup-generator.in, `python -IS` plus an explicit sys.path),
each into fresh output directories every run (hyperfine --prepare).  The
pip console-script wrapper is measured too, for comparison only.

Usage: run.py [--runs N]   (prints a table; writes bench/results/generator.json)
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SYSTEMD_GENERATOR = "/lib/systemd/system-generators/systemd-cryptsetup-generator"
LAUNCHER_TEMPLATE = REPO / "bin" / "hostel-cryptsetup-generator.in"
CONSOLE_SCRIPT = REPO / ".venv" / "bin" / "hostel-cryptsetup-generator"


def crypttab(entries: int) -> str:
    """A realistic mix: UUID and path devices, key files, key devices, common options."""
    forms = [
        "home{i} UUID=1111{i:04x}-2222-3333-4444-555555555555 /etc/keys/home{i}.key luks,discard",
        "data{i} /dev/disk/by-id/ata-disk{i}-part2 none luks,nofail",
        "swap{i} /dev/sdb{i} /dev/urandom swap,cipher=aes-xts-plain64,size=256",
        "vault{i} PARTUUID=0fc6{i:04x}-8483-4772-8e79-3d69d8477de4 /k{i}.bin:LABEL=usb{i} keyfile-timeout=10s",
        "net{i} /dev/disk/by-path/ip-10.0.0.1:3260-iscsi-lun-{i} - _netdev,x-systemd.device-timeout=30s",
    ]
    return "".join(forms[i % len(forms)].format(i=i) + "\n" for i in range(entries))


def make_launcher(directory: Path) -> Path:
    python = os.path.realpath(sys.executable)
    text = LAUNCHER_TEMPLATE.read_text().replace("@PYTHON@", python).replace("@PKGDIR@", str(REPO / "daemon"))
    launcher = directory / "hostel-cryptsetup-generator"
    launcher.write_text(text)
    launcher.chmod(0o755)
    return launcher


def command(generator: str, work: Path, tab: Path) -> tuple[str, str]:
    """(prepare, run) shell commands; the environment is that of a plain boot."""
    out = work / "out"
    # hyperfine -N runs --prepare without a shell too, hence sh -c.
    prepare = "sh -c " + shlex.quote(f"rm -rf {out} {work}/run && mkdir -p {out}/n {out}/e {out}/l")
    env = (f"env -i SYSTEMD_CRYPTTAB={tab} SYSTEMD_PROC_CMDLINE= SYSTEMD_EFI_OPTIONS= "
           f"SYSTEMD_IN_INITRD=0 RUNTIME_DIRECTORY={work}/run SYSTEMD_LOG_LEVEL=err")
    return prepare, f"{env} {shlex.quote(generator)} {out}/n {out}/e {out}/l"


def hyperfine(commands: dict[str, tuple[str, str]], runs: int, export: Path, warmup: int) -> dict[str, float]:
    args = ["hyperfine", "-N", "--warmup", str(warmup), "--runs", str(runs), "--export-json", str(export)]
    for name, (prepare, cmd) in commands.items():
        args += ["--prepare", prepare, "--command-name", name, cmd]
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    return {r["command"]: r["mean"] for r in json.loads(export.read_text())["results"]}


def python_loop(commands: dict[str, tuple[str, str]], runs: int) -> dict[str, float]:
    """Fallback without hyperfine: mean wall time of `runs` runs after warm-up."""
    import time
    means = {}
    for name, (prepare, cmd) in commands.items():
        total = 0.0
        for i in range(runs + 5):
            subprocess.run(shlex.split(prepare), check=True)
            start = time.perf_counter()
            subprocess.run(shlex.split(cmd), check=True)
            if i >= 5:
                total += time.perf_counter() - start
        means[name] = total / runs
    return means


def run(runs: int = 100) -> list[dict]:
    rows = []
    # tmpfs when there is one (like /run at boot): disk noise would swamp the comparison.
    scratch = "/dev/shm" if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(prefix="genbench.", dir=scratch) as tmp:
        tmpdir = Path(tmp)
        launcher = make_launcher(tmpdir)
        for entries in (3, 1000):
            tab = tmpdir / f"crypttab.{entries}"
            tab.write_text(crypttab(entries))
            gens = {"systemd": SYSTEMD_GENERATOR, "hostel": str(launcher)}
            if CONSOLE_SCRIPT.exists():
                gens["hostel (pip wrapper)"] = str(CONSOLE_SCRIPT)
            commands = {}
            for name, gen in gens.items():
                work = tmpdir / f"{name.split()[0]}-{len(commands)}-{entries}"
                work.mkdir()
                commands[name] = command(gen, work, tab)
            n = runs if entries == 3 else max(5, runs // 20)
            if shutil.which("hyperfine"):
                means = hyperfine(commands, n, tmpdir / "hf.json", 5 if entries == 3 else 1)
            else:
                means = python_loop(commands, n)
            base = means["systemd"]
            for name, mean in means.items():
                rows.append({"bench": "generator", "entries": entries, "generator": name,
                             "mean_ms": round(mean * 1000, 2), "ratio": round(mean / base, 2)})
    return rows


def main() -> int:
    runs = int(sys.argv[sys.argv.index("--runs") + 1]) if "--runs" in sys.argv else 100
    rows = run(runs)
    results = REPO / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / "generator.json").write_text(json.dumps(rows, indent=1))
    for row in rows:
        print(f"{row['entries']:>5} entries  {row['generator']:<22} {row['mean_ms']:>8.2f} ms  x{row['ratio']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
