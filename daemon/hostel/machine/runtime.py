"""What a running machine holds on the host: the registry's typed handle to it.

Kept apart from the runner so that the registry, the adoption code and the
D-Bus layer can name the type without importing how a start is driven."""
from __future__ import annotations

import asyncio
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from hostel.machine import cgroups
from hostel.machine import network as machine_network
from hostel.machine.console import Console
from hostel.machine.settings import MachineSettings
from hostel.spawn import Child


@dataclass
class Runtime:
    """What a running machine holds on the host, released when it is gone."""

    settings: MachineSettings
    child: Child | None = None
    console: Console | None = None
    cgroup: cgroups.CgroupSet | None = None
    network_settings: machine_network.NetworkSettings | None = None
    network_setup: machine_network.NetworkSetup | None = None
    cleanup: ExitStack = field(default_factory=ExitStack)
    runtime_dir: Path | None = None
    watcher: asyncio.Task | None = None
    terminating: bool = False
    adopted: bool = False  # started by an earlier hosteld: not our child, status unknowable
