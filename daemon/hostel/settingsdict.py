"""The one check of an a{sv} settings dictionary (StartMachine's, StartGuest's).

Each caller names the keys it takes and their D-Bus signatures; an unknown
key or a value of the wrong type is refused by name, with the keys that are
known, in the same words for machines and guests. What the values mean is
each caller's own business (machine.settings, guest.service)."""
from __future__ import annotations

from typing import Any, Mapping

from hostel.errors import InvalidArgs


def unwrap(raw: Mapping[str, Any], signatures: Mapping[str, str], what: str) -> dict[str, Any]:
    """The variants' values by key, once every key is known and every type right.

    `what` names the dictionary's entries in errors ("setting", "guest setting")."""
    values = {}
    for key, variant in raw.items():
        expected = signatures.get(key)
        if expected is None:
            raise InvalidArgs(f"unknown {what} '{key}'; known {what}s: "
                              f"{', '.join(sorted(signatures))}")
        if variant.signature != expected:
            raise InvalidArgs(f"{what} '{key}' must be of type '{expected}', "
                              f"got '{variant.signature}'")
        values[key] = variant.value
    return values
