"""One validator for every a{sv} settings dictionary: machines and guests refuse alike."""
from __future__ import annotations

from pathlib import Path

import pytest
from dbus_fast import Variant

from hostel.bus import InvalidArgs
from hostel.guest.service import settings_from_dbus
from hostel.machine.settings import from_dbus
from hostel.settingsdict import unwrap


def test_unwrap_gives_values_of_known_keys_of_the_right_type() -> None:
    assert unwrap({"A": Variant("s", "x"), "B": Variant("as", ["y"])},
                  {"A": "s", "B": "as", "C": "b"}, "setting") == {"A": "x", "B": ["y"]}


def test_unwrap_names_the_unknown_key_and_the_known_ones() -> None:
    with pytest.raises(InvalidArgs, match=r"unknown setting 'Z'; known settings: A, B$"):
        unwrap({"Z": Variant("s", "x")}, {"B": "s", "A": "s"}, "setting")


def test_unwrap_names_the_key_the_expected_and_the_given_type() -> None:
    with pytest.raises(InvalidArgs, match=r"^setting 'A' must be of type 's', got 'u'$"):
        unwrap({"A": Variant("u", 1)}, {"A": "s"}, "setting")


def _refusal(call) -> str:
    with pytest.raises(InvalidArgs) as refused:
        call()
    return str(refused.value)


@pytest.mark.parametrize("bad, machine_error, guest_error", [
    ({"Bogus": Variant("b", True)}, "unknown setting 'Bogus'; known settings: ",
     "unknown guest setting 'Bogus'; known guest settings: "),
    ({"User": Variant("u", 0)}, "setting 'User' must be of type 's', got 'u'",
     "guest setting 'User' must be of type 's', got 'u'"),
])
def test_machines_and_guests_share_the_check(bad: dict, machine_error: str,
                                             guest_error: str, tmp_path: Path) -> None:
    machine = _refusal(lambda: from_dbus("m", bad, tmp_path))
    guest = _refusal(lambda: settings_from_dbus({"Kernel": Variant("s", "/k"),
                                                 "MemoryMB": Variant("u", 8), **bad}))
    assert machine.startswith(machine_error), machine
    assert guest.startswith(guest_error), guest


def test_the_machine_name_is_not_a_setting(tmp_path: Path) -> None:
    assert "unknown setting 'Machine'" in _refusal(
        lambda: from_dbus("m", {"Machine": Variant("s", "x")}, tmp_path))
