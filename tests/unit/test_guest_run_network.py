"""run_network's choice of a run's /30, its pool, its resolvers; the tap's host address."""
from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from hostel.errors import InvalidArgs
from hostel.guest import run_network
from hostel.guest.network import host_address
from hostel.guest.run_network import (AddressPoolExhausted, Addressing, Taken, choose,
                                      first_slot, host_nameservers, parse_pool, resolv_conf,
                                      slot_network)
from hostel.guest.settings import NetSpec

POOL = ipaddress.IPv4Network("10.231.0.0/28")    # four /30s


def _taken(text: str, why: str = "route") -> Taken:
    return Taken(ipaddress.IPv4Network(text), why)


def test_a_name_gets_the_same_slot_every_time_and_names_spread() -> None:
    wide = parse_pool("10.231.0.0/16")
    first = choose("alpha", wide, [])
    assert choose("alpha", wide, []) == first
    assert first.prefixlen == 30 and first.subnet_of(wide)
    assert len({choose(f"m{i}", wide, []) for i in range(50)}) > 40


def test_a_slot_overlapping_a_route_or_address_is_skipped_to_the_next() -> None:
    start = first_slot("alpha", POOL)
    mine = slot_network(POOL, start)
    following = slot_network(POOL, (start + 1) % 4)
    assert choose("alpha", POOL, [_taken(str(mine))]) == following
    # a host address inside it counts as much as a route does
    assert choose("alpha", POOL, [_taken(f"{mine.network_address + 1}/32")]) == following
    # something outside the pool takes nothing
    assert choose("alpha", POOL, [_taken("192.168.7.0/24")]) == mine


def test_an_exhausted_pool_says_what_took_it() -> None:
    with pytest.raises(AddressPoolExhausted) as caught:
        choose("alpha", POOL, [_taken("10.0.0.0/8", "route 10.0.0.0/8 dev tun0 table 254"),
                               _taken("172.16.0.0/12", "route elsewhere")])
    message = str(caught.value)
    assert "no free /30 left for 'alpha' in the guest network pool 10.231.0.0/28" in message
    assert "route 10.0.0.0/8 dev tun0" in message and "elsewhere" not in message
    assert run_network.POOL_ENV in message


@pytest.mark.parametrize("text, problem", [
    ("8.8.8.0/24", "private range"), ("127.0.0.0/8", "private range"),
    ("10.0.0.1/32", "too small"), ("10.0.0.1/24", "not an IPv4 network"),
    ("fd00::/64", "not an IPv4 network"), ("nonsense", "not an IPv4 network")])
def test_a_bad_pool_is_refused_by_name(text: str, problem: str) -> None:
    with pytest.raises(InvalidArgs, match=problem) as caught:
        parse_pool(text)
    assert run_network.POOL_ENV in str(caught.value)


def test_the_addressing_of_a_slot() -> None:
    addressing = Addressing(ipaddress.IPv4Network("10.231.0.4/30"))
    config = addressing.guest_config(("192.0.2.53",))
    assert (config.link, config.ipv4_address, config.ipv4_gateway, config.nameservers) == \
        ("eth0", "10.231.0.6/30", "10.231.0.5", ("192.0.2.53",))
    assert resolv_conf(config) == b"# hostel resolver configuration\nnameserver 192.0.2.53\n"
    assert host_address(NetSpec(address=str(addressing.host))) == ("10.231.0.5", 30)
    assert host_address(NetSpec(address="10.0.0.1")) == ("10.0.0.1", 24)   # --tunnet's


def test_the_guests_resolvers_are_the_hosts_reachable_ones(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("# comment\nnameserver 127.0.0.53\nnameserver 192.0.2.53\n"
                    "search example\nnameserver 2001:db8::53\nnameserver ::1\n"
                    "nameserver bogus\nnameserver 192.0.2.53\n")
    assert host_nameservers(conf) == ("192.0.2.53", "2001:db8::53")
    assert host_nameservers(tmp_path / "missing") == ()


def test_an_unknown_mode_is_refused() -> None:
    assert run_network.check_mode("veth") == "veth"
    with pytest.raises(InvalidArgs, match="unknown network mode 'bridge': expected none or veth"):
        run_network.check_mode("bridge")
