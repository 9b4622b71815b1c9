"""hosteld's side of `guest run --isolation=vm --network=veth` (the VM itself boots in the
lab: lab/test_guest_run_network_vm.py): the launcher gets a tap carrying the host's end of
the run's /30, the init's launch configuration the guest's end; the /30 stays reserved in
the run's directory until it goes; the tap the launcher makes has that address."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Iterator

import pytest
from dbus_fast import Variant

from hostel.guest import run_network, vmrun
from hostel.guest.images import ImageInfo, ImageStore
from hostel.guest.images_service import GuestRunSettings, vm_launch
from hostel.guest.launchconfig import LaunchRequest, NetworkConfig
from hostel.guest.settings import NetSpec
from unit.test_guest_images import busybox_layer, docker_archive, image_config

POOL = "10.231.253.0/30"


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> ImageInfo:
    base = tmp_path_factory.mktemp("vmnet")
    layers = [busybox_layer(("sh",)).tar()]
    archive = docker_archive(base / "image.tar", layers, image_config(layers))
    return ImageStore(base / "images").import_archive(str(archive), "small")


def _run(network: str) -> GuestRunSettings:
    return GuestRunSettings.from_dbus({"Image": Variant("s", "small"),
                                       "Isolation": Variant("s", "vm"),
                                       "Network": Variant("s", network)})


def _launch_json(config_disk: Path, where: Path) -> LaunchRequest:
    subprocess.run(["unsquashfs", "-no-progress", "-d", str(where), str(config_disk)],
                   check=True, capture_output=True)
    return LaunchRequest.from_json((where / "launch.json").read_text())


def test_a_vm_run_with_veth_gets_a_tap_and_its_guest_the_other_end(
        image: ImageInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(run_network.POOL_ENV, POOL)
    vm_dir = tmp_path / "vm"
    first = vm_launch("vm-net", _run("veth"), image, vm_dir / "vm-net.1",
                      cache=tmp_path / "cache")
    try:
        assert first.settings.network == (NetSpec(address="10.231.253.1/30"),)
        request = _launch_json(vm_dir / "vm-net.1" / vmrun.CONFIG_DISK, tmp_path / "tree")
        assert request.network == NetworkConfig(
            link="eth0", ipv4_address="10.231.253.2/30", ipv4_gateway="10.231.253.1",
            nameservers=run_network.host_nameservers())
        assert json.loads((vm_dir / "vm-net.1" / run_network.RESERVATION_FILE).read_text()) \
            == {"network": "10.231.253.0/30"}
        # the pool's only /30 is the first run's while its directory exists
        with pytest.raises(run_network.AddressPoolExhausted, match="run vm-net.1"):
            vm_launch("vm-other", _run("veth"), image, vm_dir / "vm-other.1",
                      cache=tmp_path / "cache")
    finally:
        first.close()
    shutil.rmtree(vm_dir / "vm-net.1")   # what the guest manager does when the guest ends
    second = vm_launch("vm-other", _run("veth"), image, vm_dir / "vm-other.2",
                       cache=tmp_path / "cache")
    second.close()
    assert second.settings.network == (NetSpec(address="10.231.253.1/30"),)


def test_without_network_the_vm_has_no_network_device(image: ImageInfo, tmp_path: Path) -> None:
    launch = vm_launch("vm-none", _run("none"), image, tmp_path / "run", cache=tmp_path / "cache")
    launch.close()
    assert launch.settings.network == ()
    assert _launch_json(tmp_path / "run" / vmrun.CONFIG_DISK, tmp_path / "t").network is None
    assert not (tmp_path / "run" / run_network.RESERVATION_FILE).exists()


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"hostel-runnet-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


@pytest.mark.skipif(not os.path.exists("/dev/net/tun"), reason="needs /dev/net/tun")
def test_the_launchers_tap_carries_the_hosts_end(netns: str) -> None:
    """network.net_device_for as the launcher calls it, in a throwaway namespace: the tap has
    the /30 (not --tunnet's /24) and goes with its descriptor."""
    script = ("import subprocess, sys\n"
              "from hostel.guest.network import net_device_for\n"
              "from hostel.guest.settings import NetSpec\n"
              "device = net_device_for(NetSpec(address='10.231.253.1/30'), 0)\n"
              "print(subprocess.run(['ip', '-4', '-o', 'addr'], capture_output=True,"
              " text=True).stdout)\n"
              "device.close()\n"
              "print('after:', subprocess.run(['ip', '-o', 'link'], capture_output=True,"
              " text=True).stdout)\n")
    out = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", script],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    during, _, after = out.stdout.partition("after:")
    assert "inet 10.231.253.1/30" in during and "hosteltap" in during, out.stdout
    assert "hosteltap" not in after, out.stdout


def test_routes_of_any_table_and_addresses_take_their_slots(netns: str) -> None:
    """host_networks in a throwaway namespace with a route in another table and an
    address: a pool of four /30s keeps only the one neither touches, and the default
    route takes none."""
    commands = [["ip", "link", "add", "probe0", "type", "veth", "peer", "name", "probe1"],
                ["ip", "link", "set", "probe0", "up"], ["ip", "link", "set", "probe1", "up"],
                ["ip", "addr", "add", "10.231.252.9/30", "dev", "probe0"],   # slot 2
                ["ip", "route", "add", "10.231.252.0/29", "dev", "probe0", "table", "100"],
                ["ip", "route", "add", "default", "dev", "probe0"]]
    for command in commands:
        subprocess.run(["ip", "netns", "exec", netns, *command], check=True)
    script = ("import ipaddress\n"
              "from pyroute2 import IPRoute\n"
              "from hostel.guest import run_network as rn\n"
              "pool = ipaddress.IPv4Network('10.231.252.0/28')\n"
              "with IPRoute() as ipr:\n"
              "    taken = rn.host_networks(ipr)\n"
              "print(rn.choose('any', pool, taken))\n"
              "try:\n"
              "    rn.choose('any', pool, taken + [rn.Taken(ipaddress.IPv4Network("
              "'10.231.252.12/30'), 'run x')])\n"
              "except rn.AddressPoolExhausted as e:\n"
              "    print(e)\n")
    out = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", script],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    chosen, message = out.stdout.splitlines()
    assert chosen == "10.231.252.12/30"
    assert "route 10.231.252.0/29 dev probe0 table 100" in message, message
    assert "10.231.252.9 on probe0" in message and "run x" in message, message
