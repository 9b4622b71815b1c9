"""The vring fuzz target (fuzz/vring_fuzz.c), built with AddressSanitizer and
UBSan and run on random inputs: any out-of-bounds access aborts it."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is needed to build the fuzz target")
@pytest.mark.parametrize("seed", [1, 2])
def test_vring_fuzz_target_survives_random_guest_memory(tmp_path: Path, seed: int) -> None:
    binary = tmp_path / "vring_fuzz"
    subprocess.run(["gcc", "-g", "-O1", "-DSTANDALONE", "-fsanitize=address,undefined",
                    "-fno-sanitize-recover=all", f"-I{REPO / 'bindings'}",
                    str(REPO / "fuzz/vring_fuzz.c"), str(REPO / "bindings/vring.c"),
                    "-o", str(binary)], check=True, capture_output=True)
    result = subprocess.run([str(binary), "--random", str(seed), "20000"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "20000 inputs"


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is needed to build the race harness")
def test_vring_has_no_data_race_with_a_concurrent_guest_and_transport(tmp_path: Path) -> None:
    """fuzz/vring_race.c under ThreadSanitizer: the device side reads descriptors
    a hostile guest keeps rewriting, and its error flag is read by the transport;
    any plain (non-atomic) access to shared memory is reported as a race."""
    binary = tmp_path / "vring_race"
    subprocess.run(["gcc", "-g", "-O1", "-fsanitize=thread", "-Wno-tsan",
                    f"-I{REPO / 'bindings'}", str(REPO / "fuzz/vring_race.c"),
                    str(REPO / "bindings/vring.c"), "-o", str(binary)],
                   check=True, capture_output=True)
    result = subprocess.run([str(binary), "20000"], capture_output=True, text=True, timeout=120)
    assert "ThreadSanitizer" not in result.stderr, result.stderr[-4000:]
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "error 4"   # HOSTEL_VQ_BAD_NEXT: the last chain, and only it
