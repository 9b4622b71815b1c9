"""hostelctl's output conventions (systemctl's and machinectl's) against a real hosteld
with a real container: tables, -o json, --no-legend, -p/--value, show and status."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from hostel.privatebus import DaemonProcess

from conftest import HOSTELCTL, hostelctl

ADDRESS = "10.231.7.2"
NAME = "outputbox"


@pytest.fixture
def running(hosteld: DaemonProcess, tree: Path) -> Iterator[str]:
    """A container with a veth and an address inside, until the test ends."""
    script = (f"ip link set host0 up; ip addr add {ADDRESS}/24 dev host0; "
              "echo ready > /ready; exec sleep 300")
    proc = subprocess.Popen([HOSTELCTL, "run", "-q", "-D", str(tree), "-M", NAME,
                             "--network-veth", "--as-pid2", "sh", "-c", script],
                            env=dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=hosteld.address),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not (tree / "ready").exists():
            assert proc.poll() is None and time.monotonic() < deadline, hosteld.log()
            time.sleep(0.1)
        yield NAME
    finally:
        hostelctl(hosteld.address, "kill", NAME, "--signal=KILL")
        proc.wait(timeout=30)


def test_empty_list_says_no_machines(hosteld: DaemonProcess) -> None:
    result = hostelctl(hosteld.address, "list")
    assert (result.returncode, result.stdout) == (0, "No machines.\n")
    assert hostelctl(hosteld.address, "list", "--no-legend").stdout == ""
    assert hostelctl(hosteld.address, "list", "-o", "json").stdout == "[]\n"


def test_list_table_json_and_legend(hosteld: DaemonProcess, running: str) -> None:
    table = hostelctl(hosteld.address, "list", "--no-pager").stdout.splitlines()
    header, row = table[0].split(), table[1].split()
    assert header == ["MACHINE", "CLASS", "SERVICE", "STATE", "OS", "VERSION", "ADDRESSES"]
    assert row[:4] == [NAME, "container", "hostel", "running"]
    assert row[-1] in (ADDRESS, ADDRESS + "\u2026")  # the first; "…" for the link-local one
    assert table[2:] == ["", "1 machines listed."]
    # Columns are sized to their content: every row's cells start where the header's do.
    assert table[1].index("container") == table[0].index("CLASS")
    assert table[1].index(ADDRESS) == table[0].index("ADDRESSES")
    assert table[0].index("CLASS") == len(NAME) + 1  # one space after the widest cell
    bare = hostelctl(hosteld.address, "list", "--no-legend").stdout.splitlines()
    assert [line.split() for line in bare] == [row]  # no header, no footer
    listed = json.loads(hostelctl(hosteld.address, "list", "-o", "json").stdout)
    assert listed == [{"machine": NAME, "class": "container", "service": "hostel",
                       "state": "running", "os": listed[0]["os"],
                       "version": listed[0]["version"], "addresses": listed[0]["addresses"]}]
    assert listed[0]["addresses"][0] == ADDRESS
    pretty = hostelctl(hosteld.address, "list", "-o", "json-pretty").stdout
    assert json.loads(pretty) == listed and pretty.count("\n") > 3


def test_show_formats_timestamps_settings_and_properties(hosteld: DaemonProcess,
                                                         running: str) -> None:
    shown = hostelctl(hosteld.address, "show", NAME).stdout.splitlines()
    props = dict(line.split("=", 1) for line in shown)
    stamp = props["Timestamp"]  # machinectl's: Wed 2026-12-02 01:23:45 UTC
    time.strptime(stamp.rsplit(" ", 1)[0], "%a %Y-%m-%d %H:%M:%S")
    assert props["TimestampMonotonic"].isdigit()
    assert "Directory=" in props["Settings"] and "('s'" not in props["Settings"]
    assert props["Name"] == NAME and len(props["Id"]) == 32
    assert hostelctl(hosteld.address, "show", NAME, "-p", "Name", "--value").stdout == f"{NAME}\n"
    picked = hostelctl(hosteld.address, "show", NAME, "-p", "Name,Class", "-p", "State").stdout
    assert picked == f"Class=container\nName={NAME}\nState=running\n" or \
        picked.splitlines() == [f"Name={NAME}", "Class=container", "State=running"]
    as_json = json.loads(hostelctl(hosteld.address, "show", NAME, "-o", "json").stdout)
    assert as_json["Name"] == NAME and isinstance(as_json["Settings"], dict)
    missing = hostelctl(hosteld.address, "show", NAME, "-p", "NoSuchThing")
    assert missing.returncode == 1 and "NoSuchThing" in missing.stderr


def test_status_names_leader_interface_and_address(hosteld: DaemonProcess,
                                                   running: str) -> None:
    result = hostelctl(hosteld.address, "status", NAME)
    assert result.returncode == 0, result.stderr
    rows = {line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip()
            for line in result.stdout.splitlines()[1:] if ":" in line}
    leader = int(rows["Leader"].split()[0])
    comm = Path(f"/proc/{leader}/comm").read_text().strip()
    assert rows["Leader"] == f"{leader} ({comm})"
    assert rows["Iface"] == f"ve-{NAME}"
    assert rows["Address"] == ADDRESS
    assert hostelctl(hosteld.address, "status", NAME, "-p", "Leader", "--value").stdout \
        == f"{leader}\n"


def test_output_options_everywhere(hosteld: DaemonProcess) -> None:
    """Every listing verb takes the same options; an empty list is "No ...s."."""
    for argv, empty in [(["cryptsetup", "list"], None), (["image", "list"], "No images.\n"),
                        (["guest", "list"], "No guests.\n")]:
        for options in (["-o", "json"], ["--no-legend"], ["--no-pager"], ["--all"]):
            result = hostelctl(hosteld.address, *argv, *options)
            assert result.returncode == 0, (argv, options, result.stderr)
        assert isinstance(json.loads(hostelctl(hosteld.address, *argv, "-o", "json").stdout), list)
        if empty is not None:
            assert hostelctl(hosteld.address, *argv).stdout == empty, argv
    daemon = json.loads(hostelctl(hosteld.address, "status", "-o", "json").stdout)
    assert "Version" in daemon


def test_list_verbs_ignore_p_and_value_as_machinectl_does(hosteld: DaemonProcess,
                                                          running: str) -> None:
    """machinectl 252's list (and list-images) take -p and --value and print their table
    all the same (checked side by side below); hostelctl's listing verbs do as well."""
    from integration.test_machinectl import machinectl

    for argv in (["list"], ["guest", "list"], ["image", "list"], ["cryptsetup", "list"]):
        plain = hostelctl(hosteld.address, *argv)
        for options in (["-p", "Name"], ["-p", "Name", "--value"], ["--value"]):
            picked = hostelctl(hosteld.address, *argv, *options)
            assert (picked.returncode, picked.stdout) == (0, plain.stdout), (argv, options)
    assert NAME in hostelctl(hosteld.address, "list", "-p", "Name", "--value").stdout
    table = machinectl(hosteld, "list").stdout
    assert table == machinectl(hosteld, "list", "-p", "Name", "--value").stdout
    assert NAME in table


def test_show_and_status_pick_properties_for_every_subject(hosteld: DaemonProcess,
                                                           running: str) -> None:
    """-p NAME and --value on every showing verb: a machine, hosteld itself, and what
    machinectl show -p PoolPath --value prints for machined's manager."""
    from integration.test_machinectl import machinectl

    ctl = lambda *argv: hostelctl(hosteld.address, *argv)  # noqa: E731
    assert ctl("show", NAME, "-p", "Class", "--value").stdout == "container\n"
    assert ctl("status", NAME, "-p", "Name", "-p", "Class").stdout == \
        f"Name={NAME}\nClass=container\n"  # in the order asked
    version = ctl("show", "-p", "Version", "--value").stdout
    assert version.strip() and version == ctl("status", "-p", "Version", "--value").stdout
    assert machinectl(hosteld, "show", "-p", "PoolPath", "--value").stdout.strip()
    assert json.loads(ctl("show", NAME, "-p", "Name", "-o", "json").stdout) == {"Name": NAME}
