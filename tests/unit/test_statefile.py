"""Machine state files: what a restarted hosteld reads back, including an older one's."""
from __future__ import annotations

import json
import os
import subprocess
from dataclasses import asdict
from pathlib import Path

import pytest

from hostel.machine.statefile import SavedMachine, SavedState, StateStore


def _saved(name: str, state: SavedState) -> SavedMachine:
    return SavedMachine(name=name, id="00" * 16, klass="container", service="hostel", unit="",
                        leader=0, leader_start=None, root_directory="/", timestamp_us=1,
                        timestamp_monotonic_us=1, network_interfaces=[], settings={},
                        state=state.value)


def test_the_state_of_a_start_round_trips(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save(_saved("a", SavedState.OPENING))
    store.save(_saved("b", SavedState.RUNNING))
    assert [(m.name, m.state) for m in store.load()] == [("a", "opening"), ("b", "running")]
    assert sorted(os.listdir(tmp_path)) == ["a.json", "b.json"]  # no temporary file left


def test_a_file_from_before_the_state_field_is_a_running_machine(tmp_path: Path) -> None:
    data = asdict(_saved("old", SavedState.RUNNING))
    del data["state"]
    (tmp_path / "old.json").write_text(json.dumps(data))
    (machine,) = StateStore(tmp_path).load()
    assert machine.state == SavedState.RUNNING.value


@pytest.fixture
def full_directory(tmp_path: Path):
    target = tmp_path / "tiny"
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(target)], check=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)


def test_a_save_that_finds_no_space_fails_and_leaves_nothing(full_directory: Path) -> None:
    (full_directory / "filler").write_bytes(b"\0" * 4096)
    store = StateStore(full_directory)
    with pytest.raises(OSError) as failed:
        store.save(_saved("x", SavedState.OPENING))
    assert failed.value.errno == 28  # ENOSPC
    assert sorted(os.listdir(full_directory)) == ["filler"]
