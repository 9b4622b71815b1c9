#!/usr/bin/env python3
"""Run two cryptsetup generators on the same case and compare what they leave behind.

    python3 tests/generator_compare.py REFERENCE CANDIDATE [CASE_DIR...]

(no CASE_DIR: every case in tests/cryptsetup-cases).  A case is a directory with
any of `crypttab` (absent: no crypttab exists), `cmdline` (the kernel command
line, absent: empty) and `env` (KEY=VALUE lines added to the environment).

Both generators run with the same work directory, because paths (SourcePath=,
key-device mount points under RUNTIME_DIRECTORY) end up in their output: only
then can the trees be compared byte for byte.  The test suite uses `run` and
`differences`; the command line exists for looking at a failing case by hand.
"""
from __future__ import annotations

import difflib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

CASES = Path(__file__).resolve().parent / "cryptsetup-cases"
OUTPUT_DIRS = ("normal", "early", "late")


@dataclass(frozen=True)
class Outcome:
    """What a generator produced: each output path mapped to a description of it."""

    tree: dict[str, str]
    status: int

    @property
    def succeeded(self) -> bool:
        return self.status == 0


def describe(root: Path) -> dict[str, str]:
    """Files by content, symlinks by target, empty directories as such: what systemd reads."""
    entries: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        if path.is_symlink():
            entries[name] = f"symlink -> {os.readlink(path)}"
        elif path.is_file():
            entries[name] = path.read_text(errors="replace")
        elif path.is_dir() and not any(path.iterdir()):
            entries[name] = "<empty directory>"
    return entries


def environment(case: Path, work: Path) -> dict[str, str]:
    """The variables systemd's generator honours for testing, pointed at the case.

    SYSTEMD_EFI_OPTIONS is set empty so the host's EFI variables never leak in."""
    cmdline = case / "cmdline"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "SYSTEMD_CRYPTTAB": str(case / "crypttab"),
           "SYSTEMD_PROC_CMDLINE": cmdline.read_text().strip() if cmdline.exists() else "",
           "SYSTEMD_IN_INITRD": "0",
           "SYSTEMD_EFI_OPTIONS": "",
           "SYSTEMD_LOG_LEVEL": "err",
           "RUNTIME_DIRECTORY": str(work / "run")}
    extra = case / "env"
    if extra.exists():
        for line in extra.read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep:
                env[key.strip()] = value.strip()
    return env


def run(generator: str, case: Path, work: Path) -> Outcome:
    """Run `generator` on `case` in a fresh `work` directory (removed first if present)."""
    shutil.rmtree(work, ignore_errors=True)
    outputs = [work / "out" / name for name in OUTPUT_DIRS]
    for directory in outputs:
        directory.mkdir(parents=True)
    proc = subprocess.run([generator, *map(str, outputs)], env=environment(case, work),
                          capture_output=True, timeout=60)
    tree = {f"{directory.name}/{name}": text
            for directory in outputs for name, text in describe(directory).items()}
    return Outcome(tree, proc.returncode)


def differences(reference: Outcome, candidate: Outcome) -> list[str]:
    """Human-readable differences, empty when the outcomes agree.

    Exit statuses agree when both succeed or both fail: systemd's codes for a
    failure are not part of the interface."""
    lines = []
    if reference.succeeded != candidate.succeeded:
        lines.append(f"exit status {reference.status} (reference) vs {candidate.status} (candidate)\n")
    for name in sorted(reference.tree.keys() | candidate.tree.keys()):
        want, got = reference.tree.get(name), candidate.tree.get(name)
        if want != got:
            lines += difflib.unified_diff((want or "<missing>\n").splitlines(True),
                                          (got or "<missing>\n").splitlines(True),
                                          f"reference/{name}", f"candidate/{name}")
    return [line if line.endswith("\n") else line + "\n" for line in lines]


def compare(reference: str, candidate: str, case: Path, work: Path) -> list[str]:
    return differences(run(reference, case, work), run(candidate, case, work))


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    reference, candidate = argv[:2]
    cases = [Path(a) for a in argv[2:]] or sorted(p for p in CASES.iterdir() if p.is_dir())
    failed = 0
    with tempfile.TemporaryDirectory(prefix="generator-compare-") as tmp:
        for case in cases:
            diff = compare(reference, candidate, case.resolve(), Path(tmp) / "work")
            print(f"{'DIFF' if diff else 'same'}  {case.name}")
            sys.stdout.writelines("    " + line for line in diff)
            failed += bool(diff)
    print(f"{len(cases) - failed} same, {failed} different")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
