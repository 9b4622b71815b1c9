"""The static init's boot marker (guest-init/bootmarker.h): asked for by launch.json's
"boot_marker", it writes 123 to I/O port 0x3f0 once, right before it executes the
task, which a VMM timestamps (hostel's launcher; here QEMU's isa-debugcon on that
port, into a file). Not asked for, the port stays silent. A boot_marker that is
not true or false is refused like any other bad launch configuration."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from hostel.guest.launchconfig import LaunchRequest
from integration.test_guest_init_oracle import (  # noqa: F401 (fixtures)
    GOOD_LAUNCH, Image, _assert_clean_refusal, image, static_init)
from integration.test_guest_initramfs_qemu import boot

MARKER = bytes([123])


def _debugcon(path: Path) -> tuple[str, ...]:
    return ("-chardev", f"file,id=marker,path={path}",
            "-device", "isa-debugcon,iobase=0x3f0,chardev=marker")


@pytest.mark.slow
@pytest.mark.parametrize("asked", [True, False])
def test_the_init_writes_the_marker_once_only_when_asked(asked: bool, tmp_path: Path) -> None:
    """A QEMU boot (TCG) each; the task runs either way."""
    marked = tmp_path / "marked.out"
    run = boot(tmp_path, LaunchRequest(command=["sh", "-c", "echo task:ran"], isolation="vm",
                                       boot_marker=asked), extra=_debugcon(marked))
    assert run.output == "task:ran\n", (run.output, run.errors, run.kernel_log[-2000:])
    assert run.frames[-1] == {"type": "exit", "code": 0}, run.frames
    assert marked.read_bytes() == (MARKER if asked else b""), "one marker, and only when asked"


@pytest.mark.parametrize("value", ['"yes"', "1", "null", "[]"])
def test_a_boot_marker_that_is_not_true_or_false_is_refused(
        value: str, image: Image, static_init: str, tmp_path: Path) -> None:  # noqa: F811
    launch = GOOD_LAUNCH.replace('"boot_marker": false', f'"boot_marker": {value}')
    assert launch != GOOD_LAUNCH
    _assert_clean_refusal(static_init, image, json.dumps(image.config).encode(), launch.encode(),
                          "boot_marker must be true or false", tmp_path)
