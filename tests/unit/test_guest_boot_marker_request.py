"""LaunchRequest's boot_marker (a benchmark's, read by the static init): off unless
asked, carried through launch.json, and only ever a boolean."""
from __future__ import annotations

import pytest

from hostel.errors import InvalidArgs
from hostel.guest.launchconfig import LaunchRequest


def test_the_marker_is_off_unless_asked_and_travels_through_launch_json() -> None:
    assert LaunchRequest().boot_marker is False
    asked = LaunchRequest(command=["/bin/true"], isolation="vm", boot_marker=True)
    assert LaunchRequest.from_json(asked.to_json()) == asked
    assert '"boot_marker": true' in asked.to_json()


@pytest.mark.parametrize("text", ['{"boot_marker": "yes"}', '{"boot_marker": 1}'])
def test_a_boot_marker_that_is_not_a_boolean_is_refused(text: str) -> None:
    with pytest.raises(InvalidArgs, match="boot_marker must be true or false"):
        LaunchRequest.from_json(text)
