"""MatchRule's arg0: the bus's rule text, and the same test on a received message (guest
run's client watches NameOwnerChanged for org.hostel1 only)."""
from __future__ import annotations

from hostel.dbuswire import SIGNAL, MatchRule, Message


def _owner_changed(name: str) -> Message:
    message = Message(SIGNAL, path="/org/freedesktop/DBus", interface="org.freedesktop.DBus",
                      member="NameOwnerChanged", sender="org.freedesktop.DBus")
    message.body = (name, ":1.4", "")
    return message


def test_arg0_is_in_the_rule_and_matches_the_first_argument_only() -> None:
    rule = MatchRule(type="signal", member="NameOwnerChanged", arg0="org.hostel1")
    assert str(rule) == "type='signal',member='NameOwnerChanged',arg0='org.hostel1'"
    assert rule.matches(_owner_changed("org.hostel1"))
    assert not rule.matches(_owner_changed("org.hostel1.other"))
    assert not rule.matches(_owner_changed(":1.4"))
    bodiless = _owner_changed("org.hostel1")
    bodiless.body = ()
    assert not rule.matches(bodiless)
    assert MatchRule(member="NameOwnerChanged").matches(bodiless)
