"""What keeps a container's start cheap (issue 16 point 4: bench/containers.py's ratios).

Each test names a cost that start-up once paid and no longer does: hostelctl run
importing the enum machinery or the collections package, and the kernel's verifier
running over the same device program at every start."""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hostel.machine import bpf_devices, cgroups
from hostel.privatebus import PrivateBus

from conftest import HOSTELCTL

_counter = itertools.count()


def test_hostelctl_run_imports_neither_enum_nor_collections(private_bus: PrivateBus) -> None:
    """`signal` (and so `enum`, ~3 ms) and the `collections` package (~1.5 ms) are not
    needed to start a container: with hostelctl's own search path, the modules of
    `hostelctl run` and a connection filtering signals, as a run's wait does, pull in
    neither."""
    launcher = Path(HOSTELCTL).read_text()
    search_path = next(line for line in launcher.splitlines() if line.startswith("sys.path +="))
    probe = (f"import sys; {search_path}; import hostel.cli, hostel.machine.runclient; "
             "from hostel.client import Client, MatchRule; client = Client(); "
             "entered = client.filter(MatchRule(type='signal')).__enter__(); "
             "print(sorted({'enum', 'signal', 'collections'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-IS", "-c", probe], capture_output=True, text=True,
                          env=dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=private_bus.address),
                          check=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def test_scopes_with_the_same_rules_share_one_loaded_device_program() -> None:
    """The program is loaded (and verified) once and attached to every scope."""
    layout = cgroups.CgroupLayout.detect()
    if not any(h.version == 2 for h in layout.hierarchies):
        pytest.skip("no cgroup2 hierarchy on this host: no device program to load")
    made = []
    try:
        for _ in range(2):
            made.append(cgroups.create(f"hostel-cost-{os.getpid()}-{next(_counter)}",
                                       f"hostelcost{os.getpid()}", layout))
        programs = []
        for cg in made:
            v2 = next(p for p in cg.paths if os.path.exists(os.path.join(p, "cgroup.controllers")))
            flags, ids = bpf_devices.attached_programs(v2)
            assert flags == 0 and len(ids) == 1
            programs.append(ids[0])
        assert programs[0] == programs[1]
    finally:
        for cg in made:
            cg.remove(grace=0.2)
