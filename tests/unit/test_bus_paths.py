"""Object path labels encode as systemd's sd_bus_path_encode does."""
from __future__ import annotations

from hypothesis import given, strategies as st

from hostel.bus import escape_path_label, unescape_path_label


def test_known_encodings_match_machined() -> None:
    # machined publishes machine "foo-bar" at .../machine/foo_2dbar
    assert escape_path_label("foo-bar") == "foo_2dbar"
    assert escape_path_label("") == "_"
    assert escape_path_label("9lives") == "_39lives"  # no leading digit
    assert escape_path_label("a.b_c") == "a_2eb_5fc"
    assert escape_path_label("ü") == "_c3_bc"


@given(st.text())
def test_round_trip_and_valid_element(label: str) -> None:
    encoded = escape_path_label(label)
    assert encoded and all(c.isascii() and (c.isalnum() or c == "_") for c in encoded)
    assert unescape_path_label(encoded) == label
