"""--port parsing and address choice, zone names, and rtnl's message packing: the parts of
the zone and port code that need no links (tests/integration/test_network_zone_ports.py
runs them on real ones, side by side with systemd-nspawn 252)."""
from __future__ import annotations

import socket
import struct

import pytest

from hostel.bus import InvalidArgs
from hostel.machine import network_zone, rtnl
from hostel.machine.port_forward import PortSpec, parse_port, parse_ports, pick_address, rules


@pytest.mark.parametrize("spec,expected", [
    ("80", PortSpec("tcp", 80, 80)),
    ("udp:53", PortSpec("udp", 53, 53)),
    ("tcp:8080:80", PortSpec("tcp", 8080, 80)),
    ("8080:80", PortSpec("tcp", 8080, 80)),
    ("0x50", PortSpec("tcp", 80, 80)),       # strtoul base 0, as 252's parse_ip_port
    ("0120", PortSpec("tcp", 80, 80)),       # octal
    ("+80:0xFFFF", PortSpec("tcp", 80, 65535)),
])
def test_port_specs(spec: str, expected: PortSpec) -> None:
    assert parse_port(spec) == expected


@pytest.mark.parametrize("spec,reason", [
    ("", "Invalid argument"), ("0", "Invalid argument"), ("-0", "Invalid argument"),
    ("080", "Invalid argument"), ("0x", "Invalid argument"), (" 80", "Invalid argument"),
    ("80 ", "Invalid argument"), ("TCP:80", "Invalid argument"), ("udp:", "Invalid argument"),
    ("sctp:80", "Invalid argument"), ("1:2:3", "Invalid argument"), ("8_0", "Invalid argument"),
    ("65536", "Numerical result out of range"), ("-5", "Numerical result out of range"),
    ("0x10000", "Numerical result out of range"),
    ("99999999999999999999", "Numerical result out of range"),
])
def test_bad_port_specs_name_the_spec_and_the_errno(spec: str, reason: str) -> None:
    with pytest.raises(InvalidArgs) as failure:
        parse_port(spec)
    assert str(failure.value) == f"Failed to parse host port {spec}: {reason}"


def test_a_host_port_twice_for_one_protocol_is_refused() -> None:
    assert len(parse_ports(["80", "udp:80"])) == 2
    with pytest.raises(InvalidArgs, match="^Duplicate port specification: 80:81$"):
        parse_ports(["80", "80:81"])


def test_rules_dnat_local_destinations_but_not_loopback() -> None:
    prerouting, output = rules("m1", PortSpec("udp", 53, 5353), "198.51.100.2")
    assert prerouting[:1] == ["PREROUTING"] and output[:4] == ["OUTPUT", "!", "-d", "127.0.0.0/8"]
    for rule in (prerouting, output):
        assert rule[-2:] == ["--to-destination", "198.51.100.2:5353"]
        assert "--dport" in rule and "53" in rule and "LOCAL" in rule and "hostel:m1" in rule


def address(text: str, scope: int = 0, index: int = 2, flags: int = 0) -> rtnl.Address:
    family = socket.AF_INET6 if ":" in text else socket.AF_INET
    return rtnl.Address(family, text, 24, scope, flags, index)


def test_the_address_252_would_forward_to() -> None:
    assert pick_address([]) is None
    assert pick_address([address("127.0.0.1", scope=254, index=1)]) is None
    assert pick_address([address("169.254.1.1", scope=253)]) is None  # link scope only
    assert pick_address([address("2001:db8::1"), address("10.0.0.9", index=3),
                         address("10.0.0.7", index=3), address("10.0.0.8", index=4)]) == "10.0.0.7"
    assert pick_address([address("10.0.0.1", flags=0x20), address("10.0.0.2")]) == "10.0.0.2"


@pytest.mark.parametrize("zone", ["a", "abcdefghijkl", "x.y", "-", ""])
def test_zone_names_252_takes(zone: str) -> None:
    assert network_zone.bridge_name(zone) == f"vz-{zone}"


@pytest.mark.parametrize("zone", ["abcdefghijklm", "a/b", "a:b", "a%b", "a b", "é", "a\tb"])
def test_zone_names_252_refuses(zone: str) -> None:
    with pytest.raises(InvalidArgs, match="^Network zone name not valid: vz-"):
        network_zone.bridge_name(zone)


def test_attributes_are_padded_and_nested() -> None:
    assert rtnl.string(rtnl.IFLA_IFNAME, "ab") == struct.pack("=HH", 7, 3) + b"ab\0\0"
    outer = rtnl.nested(rtnl.IFLA_LINKINFO, rtnl.string(rtnl.IFLA_INFO_KIND, "veth"))
    length, kind = struct.unpack_from("=HH", outer)
    assert kind == rtnl.IFLA_LINKINFO | rtnl.NLA_F_NESTED and length == len(outer) == 4 + 12


def test_an_address_message_is_read_back() -> None:
    body = (struct.pack("=BBBBI", socket.AF_INET, 30, 0, 0, 5)
            + rtnl.attr(rtnl.IFA_ADDRESS, socket.inet_aton("198.51.100.1"))
            + rtnl.attr(rtnl.IFA_LOCAL, socket.inet_aton("198.51.100.2"))
            + rtnl.u32(rtnl.IFA_FLAGS, 0x80))
    assert rtnl.parse_address(body) == rtnl.Address(socket.AF_INET, "198.51.100.2", 30, 0, 0x80, 5)


def test_a_settings_files_repeated_port_is_a_warning_as_in_252() -> None:
    """252's config_parse_expose_port: a repeat, or what it cannot parse (an empty Port=
    too: it resets nothing), is warned about with the file's line and ignored."""
    from hostel.machine import nspawn_settings, settings

    found = nspawn_settings.parse("[Network]\nPort=\nPort=80\nPort=80:81\nPort=udp:80\nPort=foo\n",
                                  "/f.nspawn", True, settings.check_value)
    assert found.values == {"Port": ["80", "udp:80"]}
    assert found.warnings == ["/f.nspawn:2: Failed to parse host port : Invalid argument",
                              "/f.nspawn:4: Duplicate port specification, ignoring: 80:81",
                              "/f.nspawn:6: Failed to parse host port foo: Invalid argument"]
