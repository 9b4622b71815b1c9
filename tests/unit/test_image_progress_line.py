"""hostelctl's progress line for image pulls and imports: every stage hosteld reports is
drawn, even one that began and ended between two redraws (CI once saw a 4 MiB image's
squashfs stage vanish that way)."""
from __future__ import annotations

import io
import sys
from collections import deque
from dataclasses import dataclass

import pytest

from hostel.guest.image_transfer import ProgressLine


@dataclass
class Report:
    body: tuple[str, str, int, int]


def test_stages_reported_within_one_redraw_are_all_drawn(
        monkeypatch: pytest.MonkeyPatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    queue: deque[Report] = deque()
    with ProgressLine("pulling x", "x", queue):
        # All within the first interval: the call returns before the thread redraws.
        for stage, done in (("downloading", 4096), ("applying layer sha256:ab", 0),
                            ("building the squashfs image", 4096), ("imported", 4096)):
            queue.append(Report(("x", stage, done, 4096)))
        queue.append(Report(("other", "downloading", 1, 2)))
    text = err.getvalue()
    for stage in ("downloading 4.0K/4.0K 100%", "applying layer sha256:ab 0B/4.0K 0%",
                  "building the squashfs image 4.0K/4.0K 100%", "imported 4.0K/4.0K 100%"):
        assert f"pulling x: {stage}" in text, text
    assert "1B/2B" not in text   # another transfer's reports are not ours
    assert text.endswith("\r\x1b[K")
