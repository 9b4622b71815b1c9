"""Container networking without links: SipHash, MAC derivation, names, settings checks."""
from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hostel.bus import InvalidArgs
from hostel.machine import network
from hostel.machine.network import (CONTAINER_HASH_KEY, HOST_HASH_KEY, MACVLAN_HASH_KEY,
                                    NetworkError, NetworkSettings, check_ifname, generate_mac,
                                    macvlan_name, read_machine_id, veth_name)
from hostel.machine.siphash import siphash24

# SipHash-2-4 reference vectors (vectors.h of the reference implementation):
# key 00 01 .. 0f, message 00 01 .. (n-1) for n = 0..63, tag as little-endian bytes.
SIPHASH_VECTORS = [
    "310e0edd47db6f72", "fd67dc93c539f874", "5a4fa9d909806c0d", "2d7efbd796666785",
    "b7877127e09427cf", "8da699cd64557618", "cee3fe586e46c9cb", "37d1018bf50002ab",
    "6224939a79f5f593", "b0e4a90bdf82009e", "f3b9dd94c5bb5d7a", "a7ad6b22462fb3f4",
    "fbe50e86bc8f1e75", "903d84c02756ea14", "eef27a8e90ca23f7", "e545be4961ca29a1",
    "db9bc2577fcc2a3f", "9447be2cf5e99a69", "9cd38d96f0b3c14b", "bd6179a71dc96dbb",
    "98eea21af25cd6be", "c7673b2eb0cbf2d0", "883ea3e395675393", "c8ce5ccd8c030ca8",
    "94af49f6c650adb8", "eab8858ade92e1bc", "f315bb5bb835d817", "adcf6b0763612e2f",
    "a5c91da7acaa4dde", "716595876650a2a6", "28ef495c53a387ad", "42c341d8fa92d832",
    "ce7cf2722f512771", "e37859f94623f3a7", "381205bb1ab0e012", "ae97a10fd434e015",
    "b4a31508beff4d31", "81396229f0907902", "4d0cf49ee5d4dcca", "5c73336a76d8bf9a",
    "d0a704536ba93e0e", "925958fcd6420cad", "a915c29bc8067318", "952b79f3bc0aa6d4",
    "f21df2e41d4535f9", "87577519048f53a9", "10a56cf5dfcd9adb", "eb75095ccd986cd0",
    "51a9cb9ecba312e6", "96afadfc2ce666c7", "72fe52975a4364ee", "5a1645b276d592a1",
    "b274cb8ebf87870a", "6f9bb4203de7b381", "eaecb2a30b22a87f", "9924a43cc1315724",
    "bd838d3aafbf8db7", "0b1a2a3265d51aea", "135079a3231ce660", "932b2846e4d70666",
    "e1915f5cb1eca46c", "f325965ca16d629f", "575ff28e60381be5", "724506eb4c328a95",
]
MACHINE_ID = bytes.fromhex("3d1219c7c4c5404aaa1f6d2a48adfda4")
MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


@pytest.mark.parametrize("length", range(64))
def test_siphash24_matches_the_reference_vectors(length: int) -> None:
    assert siphash24(bytes(range(16)), bytes(range(length))).hex() == SIPHASH_VECTORS[length]


def test_siphash24_paper_example_as_a_64_bit_number() -> None:
    # Appendix A of the paper: the 15-byte message gives 0xa129ca6149be45e5.
    tag = siphash24(bytes(range(16)), bytes(range(15)))
    assert int.from_bytes(tag, "little") == 0xA129CA6149BE45E5


def test_siphash24_rejects_a_short_key() -> None:
    with pytest.raises(ValueError, match="16 bytes, not 8"):
        siphash24(bytes(8), b"")


@given(name=st.text(min_size=1, max_size=64), index=st.integers(0, 2**64 - 1),
       key=st.sampled_from([HOST_HASH_KEY, CONTAINER_HASH_KEY, MACVLAN_HASH_KEY]))
def test_generated_macs_are_unicast_and_locally_administered(name: str, index: int, key: bytes) -> None:
    mac = generate_mac(name, key, index, MACHINE_ID)
    assert MAC.match(mac)
    first = int(mac[:2], 16)
    assert first & 0x01 == 0  # not multicast
    assert first & 0x02 == 0x02  # locally administered
    assert generate_mac(name, key, index, MACHINE_ID) == mac


def test_generated_macs_depend_on_name_key_index_and_host() -> None:
    macs = {
        generate_mac("web", HOST_HASH_KEY, 0, MACHINE_ID),
        generate_mac("web", CONTAINER_HASH_KEY, 0, MACHINE_ID),
        generate_mac("web", MACVLAN_HASH_KEY, 0, MACHINE_ID),
        generate_mac("web", MACVLAN_HASH_KEY, 1, MACHINE_ID),
        generate_mac("db", HOST_HASH_KEY, 0, MACHINE_ID),
        generate_mac("web", HOST_HASH_KEY, 0, bytes(15) + b"\x01"),
    }
    assert len(macs) == 6


def test_index_zero_is_left_out_of_the_hash_like_nspawn() -> None:
    # systemd-nspawn hashes host ID + name alone for the first link of each kind.
    digest = siphash24(MACVLAN_HASH_KEY, MACHINE_ID + b"web")
    expected = bytearray(digest[:6])
    expected[0] = (expected[0] & 0xFE) | 0x02
    assert generate_mac("web", MACVLAN_HASH_KEY, 0, MACHINE_ID) == expected.hex(":")
    digest = siphash24(MACVLAN_HASH_KEY, MACHINE_ID + b"web" + (3).to_bytes(8, "little"))
    assert generate_mac("web", MACVLAN_HASH_KEY, 3, MACHINE_ID)[3:] == digest[1:6].hex(":")


def test_generate_mac_wants_a_16_byte_machine_id() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        generate_mac("web", HOST_HASH_KEY, 0, b"short")


def test_machine_id_is_read_as_16_bytes(tmp_path: Path) -> None:
    path = tmp_path / "machine-id"
    path.write_text(MACHINE_ID.hex() + "\n")
    assert read_machine_id(path) == MACHINE_ID
    path.write_text(MACHINE_ID.hex().upper())
    assert read_machine_id(path) == MACHINE_ID


def test_missing_machine_id_says_how_to_create_one(tmp_path: Path) -> None:
    path = tmp_path / "machine-id"
    with pytest.raises(NetworkError, match=f"{path} is missing.*systemd-machine-id-setup"):
        read_machine_id(path)


@pytest.mark.parametrize("content", ["", "uninitialized\n", "0" * 32, "3d1219c7" * 3, "g" * 32,
                                     MACHINE_ID.hex() + "00"])
def test_invalid_machine_id_is_refused(tmp_path: Path, content: str) -> None:
    path = tmp_path / "machine-id"
    path.write_text(content)
    with pytest.raises(NetworkError, match=f"{path} does not hold a machine ID"):
        read_machine_id(path)


def test_veth_names_follow_nspawn_including_its_14_character_cut() -> None:
    assert veth_name("web", bridged=False) == "ve-web"
    assert veth_name("web", bridged=True) == "vb-web"
    assert veth_name("averyverylongmachinename", bridged=False) == "ve-averyverylo"
    assert len(veth_name("x" * 40, bridged=True)) == 14


def test_macvlan_names_are_cut_to_fifteen_characters() -> None:
    assert macvlan_name("eth0") == "mv-eth0"
    assert macvlan_name("enp0s31f6abcdef") == "mv-enp0s31f6abc"


@pytest.mark.parametrize(("name", "message"), [
    ("", "--network-interface=: empty interface name"),
    ("a" * 16, f"--network-interface={'a' * 16}: interface names are at most 15 bytes long"),
    ("éééééééé", "--network-interface=éééééééé: interface names are at most 15 bytes long"),
    ("eth0/1", "--network-interface=eth0/1: not a valid interface name"),
    ("eth0:1", "--network-interface=eth0:1: not a valid interface name"),
    ("eth 0", "--network-interface=eth 0: not a valid interface name"),
    ("..", "--network-interface=..: not a valid interface name"),
])
def test_bad_interface_names_are_refused_with_the_option(name: str, message: str) -> None:
    with pytest.raises(InvalidArgs) as failure:
        check_ifname(name, "--network-interface")
    assert str(failure.value).startswith(message)


def test_every_network_option_implies_a_private_network() -> None:
    assert not NetworkSettings().private
    assert NetworkSettings(private_network=True).private
    assert NetworkSettings(veth=True).private
    assert NetworkSettings(interfaces=["x"]).private
    assert NetworkSettings(macvlan=["x"]).private
    bridged = NetworkSettings(bridge="br0")
    assert bridged.private and bridged.uses_veth
    assert not NetworkSettings(private_network=True).uses_veth


@pytest.mark.parametrize(("settings", "message"), [
    (NetworkSettings(bridge="hsttst-nobr"), "--network-bridge=hsttst-nobr: no such interface"),
    (NetworkSettings(interfaces=["hsttst-none"]), "--network-interface=hsttst-none: no such interface"),
    (NetworkSettings(macvlan=["hsttst-none"]), "--network-macvlan=hsttst-none: no such interface"),
    (NetworkSettings(macvlan=["x" * 20]), f"--network-macvlan={'x' * 20}: interface names are at most"),
    (NetworkSettings(interfaces=["lo"]), "--network-interface=lo: the loopback interface cannot"),
    (NetworkSettings(macvlan=["lo"]), "--network-macvlan=lo: the loopback interface cannot"),
    (NetworkSettings(bridge="lo"), "--network-bridge=lo: this interface is not a bridge"),
])
def test_validate_names_the_option_and_the_interface(settings: NetworkSettings, message: str) -> None:
    with pytest.raises(InvalidArgs) as failure:
        settings.validate()
    assert str(failure.value).startswith(message)


def test_plain_private_network_validates() -> None:
    NetworkSettings(private_network=True).validate()


def test_setup_refuses_to_run_on_the_event_loop() -> None:
    async def scenario() -> None:
        with pytest.raises(RuntimeError, match="asyncio.to_thread"):
            network.teardown_network(network.NetworkSetup("x", 1, host_veth="ve-x", host_veth_index=10**6))

    asyncio.run(scenario())
