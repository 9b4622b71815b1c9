"""Escaping helpers: round trips, and agreement with systemd-escape itself."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostel.cryptsetup.unitname import (
    UnitNameError, cescape, encode_devnode_name, fstab_node_to_udev_node, path_equal, path_join,
    path_simplify, path_startswith, siphash24, specifier_escape, unit_name_escape,
    unit_name_from_path, unit_name_path_escape, unit_name_unescape)

# Arbitrary bytes, as names read from a crypttab may be; NUL cannot occur in C strings.
raw = st.binary(min_size=1, max_size=40).filter(lambda b: b"\0" not in b)
names = raw.map(lambda b: b.decode("utf-8", "surrogateescape"))
path_parts = st.lists(st.sampled_from(["a", "b-c", ".", "", "x y", "é", "\\", ".hidden", "%"]),
                      min_size=1, max_size=5)
requires_escape = pytest.mark.skipif(shutil.which("systemd-escape") is None, reason="no systemd-escape")


def systemd_escape(*args: str) -> str:
    return subprocess.run(["systemd-escape", *args], capture_output=True, check=True,
                          text=True, errors="surrogateescape").stdout.rstrip("\n")


def assert_agrees(ours, text: str, *flags: str) -> None:
    """Same result as systemd-escape, or refused by both."""
    try:
        result = ours(text)
    except UnitNameError:
        with pytest.raises(subprocess.CalledProcessError):
            systemd_escape(*flags, "--", text)
        return
    assert result == systemd_escape(*flags, "--", text)


@given(names)
def test_escape_round_trips_when_no_slash(name: str) -> None:
    if "/" in name:
        return  # '/' and '-' both come back as '/', by design
    assert unit_name_unescape(unit_name_escape(name)) == name


@given(names)
def test_escape_output_is_a_valid_unit_name_part(name: str) -> None:
    out = unit_name_escape(name)
    assert out.isascii() and not out.startswith(".")
    assert all(c.isalnum() or c in ":_.-\\" for c in out)


@requires_escape
@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_characters="\0", max_codepoint=0x2FF), min_size=1, max_size=30))
def test_escape_agrees_with_systemd_escape(name: str) -> None:
    assert unit_name_escape(name) == systemd_escape("--", name)


@requires_escape
@settings(max_examples=60, deadline=None)
@given(path_parts, st.booleans())
def test_path_escape_agrees_with_systemd_escape(parts: list[str], absolute: bool) -> None:
    assert_agrees(unit_name_path_escape, ("/" if absolute else "") + "/".join(parts), "--path")


@requires_escape
@settings(max_examples=40, deadline=None)
@given(st.text(alphabet="ab-_.:\\x0123456789", min_size=1, max_size=20))
def test_unescape_agrees_with_systemd_escape(text: str) -> None:
    assert_agrees(unit_name_unescape, text, "--unescape")


def test_known_escapes() -> None:
    assert unit_name_escape("my-vol\\x20") == "my\\x2dvol\\x5cx20"
    assert unit_name_escape(".dot") == "\\x2edot"
    assert unit_name_escape("é") == "\\xc3\\xa9"
    assert unit_name_path_escape("//dev//./sda1/") == "dev-sda1"
    assert unit_name_path_escape("/") == "-"
    assert specifier_escape("50%") == "50%%"
    assert cescape("a b\t\\'\"\x01é") == "a b\\t\\\\\\'\\\"\\001\\303\\251"


def test_overlong_path_gets_systemds_hash() -> None:
    # Value taken from systemd v252's generator for the same device.
    name = unit_name_from_path("/dev/disk/by-id/" + "a" * 240, ".device")
    assert len(name) == 255 and name.endswith("_00dfc132ebaa4f0b.device")


def test_siphash_reference_vector() -> None:
    assert siphash24(bytes(range(15)), bytes(range(16))) == 0xA129CA6149BE45E5


@pytest.mark.parametrize("path", ["/a/../b", "/" + "x" * 256, "."])
def test_unnormalizable_paths_are_refused(path: str) -> None:
    with pytest.raises(UnitNameError):
        unit_name_path_escape(path)


def test_devnode_encoding_keeps_valid_utf8_only() -> None:
    assert encode_devnode_name("a b/é") == "a\\x20b\\x2fé"
    assert encode_devnode_name(b"\xff\xef\xbf\xbe".decode("utf-8", "surrogateescape")) == "\\xff\\xef\\xbf\\xbe"
    assert fstab_node_to_udev_node("LABEL='my disk'") == "/dev/disk/by-label/my\\x20disk"
    assert fstab_node_to_udev_node("/dev/sda") == "/dev/sda"


def test_path_helpers() -> None:
    assert path_startswith("/dev//disk/./by-uuid/x/", "/dev/disk/by-uuid") == "x/"
    assert path_startswith("/dev", "/dev/") == ""
    assert path_startswith("dev/sda", "/dev/") is None
    assert path_equal("//dev/./urandom/", "/dev/urandom")
    assert not path_equal("/dev/../dev/null", "/dev/null")
    assert path_join("/run/k", "/key") == "/run/k/key" and path_join("/run/k", "") == "/run/k"
    assert path_simplify("a//./b/") == "a/b" and path_simplify("./") == "."
