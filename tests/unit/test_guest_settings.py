"""Guest settings: the launcher's command line (hostelctl guest launch), its
--tunnet syntax, validation, and the JSON hand-over to the launcher process."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from hostel.bus import InvalidArgs
from hostel.guest import commands
from hostel.guest.launcher import settings_from_json, settings_to_json
from hostel.guest.settings import BlockSpec, GuestSettings, NetSpec, parse_tunnet, validate_name


@pytest.mark.parametrize("arg, spec", [
    ("192.168.19.1", NetSpec(address="192.168.19.1")),
    ("192.168.19.1:02:00:00:00:00:07", NetSpec(address="192.168.19.1", mac="02:00:00:00:00:07")),
    ("bridge:br0", NetSpec(bridge="br0")),
    ("bridge:br0:52:54:00:12:34:56", NetSpec(bridge="br0", mac="52:54:00:12:34:56")),
])
def test_tunnet_forms_of_the_seed(arg: str, spec: NetSpec) -> None:
    assert parse_tunnet(arg) == spec


@pytest.mark.parametrize("arg, message", [
    ("192.168.19", "not an IPv4 address"),
    ("bridge:", "not a valid bridge name"),
    ("bridge:a-name-far-too-long-for-linux", "not a valid bridge name"),
    ("10.0.0.1:zz:00:00:00:00:00", "not a MAC address"),
])
def test_bad_tunnet_is_refused(arg: str, message: str) -> None:
    with pytest.raises(InvalidArgs, match=message):
        parse_tunnet(arg)


@pytest.mark.parametrize("name", ["", "-x", "a/b", "x" * 65, "sp ace"])
def test_bad_guest_names(name: str) -> None:
    with pytest.raises(InvalidArgs, match="guest name"):
        validate_name(name)


def test_settings_validation() -> None:
    with pytest.raises(InvalidArgs, match="memory 1 MB is out of range"):
        GuestSettings(memory_mb=1, kernel=Path("/k"))
    with pytest.raises(InvalidArgs, match="initrd path 'i' must be absolute"):
        GuestSettings(memory_mb=8, kernel=Path("/k"), initrd=Path("i"))
    with pytest.raises(InvalidArgs, match="block path 'disk' must be absolute"):
        GuestSettings(memory_mb=8, kernel=Path("/k"), block=(BlockSpec(Path("disk")),))
    with pytest.raises(InvalidArgs, match="NUL"):
        GuestSettings(memory_mb=8, kernel=Path("/k"), cmdline="a\0")


def test_settings_survive_the_trip_to_the_launcher_process() -> None:
    settings = GuestSettings(memory_mb=64, kernel=Path("/k"), cmdline="console=ttyS0",
                             initrd=Path("/i"), block=(BlockSpec(Path("/d"), True),),
                             network=(NetSpec(bridge="br0", mac="02:00:00:00:00:01"),), rng=True,
                             chroot=Path("/var/empty"), username="nobody", verbose=True)
    assert settings_from_json(settings_to_json(settings)) == settings


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    commands.add_launch_arguments(parser)
    return parser.parse_args(argv)


def test_launch_command_line_becomes_start_guest_settings(tmp_path: Path) -> None:
    args = parse(["--verbose", "--tunnet=10.0.0.1", "--block=disk.img", "--rng",
                  "--initrd=initrd.img", "--username=nobody", "--chroot=/var/empty",
                  "64", "vmlinux", "console=ttyS0", "root=/dev/vda"])
    settings = commands.launch_settings(args)
    assert settings["MemoryMB"] == ("u", 64)
    assert settings["Kernel"] == ("s", str(Path("vmlinux").resolve()))
    assert settings["CommandLine"] == ("s", "console=ttyS0 root=/dev/vda")
    assert settings["Block"] == ("a(sb)", [(str(Path("disk.img").resolve()), False)])
    assert settings["Network"] == ("as", ["10.0.0.1"])
    assert settings["Rng"] == ("b", True) and settings["User"] == ("s", "nobody")
    assert settings["Chroot"] == ("s", "/var/empty") and settings["Backend"] == ("s", "kvm")


def test_launch_needs_memory_and_kernel() -> None:
    with pytest.raises(SystemExit):
        parse(["64"])
    with pytest.raises(SystemExit):
        parse(["lots", "vmlinux"])
