"""Machines on disk: one JSON file per machine in /run/hostel/machines/, written atomically.

hosteld may be restarted, upgraded or killed while containers run; the
containers do not depend on it. What a new hosteld needs to take them back is
here: who the leader is (pid and its start time, so a recycled pid is not
mistaken for it), the settings, and what to release when the machine is gone
(cgroups, network links, the runtime directory)."""
from __future__ import annotations

import enum
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dbus_fast import Variant

log = logging.getLogger(__name__)
FORMAT_VERSION = 1


def process_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks since boot): a pid's identity with its number.

    None for a process that is gone, or dead and waiting to be reaped (a zombie)."""
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


def settings_to_json(settings: dict[str, Variant]) -> dict[str, list]:
    return {key: [v.signature, v.value] for key, v in settings.items()}


def settings_from_json(data: dict[str, list]) -> dict[str, Variant]:
    return {key: Variant(signature, value) for key, (signature, value) in data.items()}


class SavedState(str, enum.Enum):
    """How far the machine got: a start on record before its child exists is "opening";
    a restarted hosteld kills and cleans up such a start rather than adopting it."""

    OPENING = "opening"
    RUNNING = "running"


@dataclass
class SavedMachine:
    name: str
    id: str                    # hex
    klass: str
    service: str
    unit: str
    leader: int
    leader_start: int | None
    root_directory: str
    timestamp_us: int
    timestamp_monotonic_us: int
    network_interfaces: list[int]
    settings: dict[str, list]  # a{sv} as {key: [signature, value]}
    cgroup: dict[str, Any] | None = None    # CgroupSet fields
    network: dict[str, Any] | None = None   # NetworkSetup fields
    runtime_dir: str = ""
    registered_only: bool = False
    state: str = SavedState.RUNNING.value   # files written before this field are running ones
    version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)


class StateStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, name: str) -> Path:
        return self.directory / f"{name}.json"

    def save(self, saved: SavedMachine) -> None:
        """Write atomically: a reader (or a crash of hosteld) sees the old file or the new one.

        Not fsync'd: the file is for the hosteld that adopts the machine after this one
        ended, and the page cache outlives a process. What a sync would add is survival of
        the host's own crash, after which the machine the file describes is dead anyway
        (and /run is gone); on a disk it cost every start two syncs, ~5 ms of its ~30."""
        self.directory.mkdir(parents=True, exist_ok=True)
        target = self.path(saved.name)
        tmp = target.with_name(f".{target.name}.tmp")
        try:
            with open(tmp, "w") as f:
                json.dump(asdict(saved), f)
            os.replace(tmp, target)
        except OSError:
            tmp.unlink(missing_ok=True)  # a half-written file (ENOSPC) must not hold the space
            raise

    def delete(self, name: str) -> None:
        self.path(name).unlink(missing_ok=True)

    def load(self) -> list[SavedMachine]:
        """Every machine saved by an earlier hosteld; unreadable files are logged and skipped."""
        machines = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                data = json.loads(path.read_text())
                if data.get("version") != FORMAT_VERSION:
                    raise ValueError(f"format version {data.get('version')}")
                machines.append(SavedMachine(**data))
            except (OSError, ValueError, TypeError) as e:
                log.error("ignoring machine state %s: %s", path, e)
        return machines
