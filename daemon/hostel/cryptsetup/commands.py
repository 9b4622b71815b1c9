"""hostelctl cryptsetup list | status NAME | check-key NAME | attach NAME | detach NAME.

Imported by hostelctl at every start: standard library only, and nothing heavy
(no dbus_fast, no asyncio); the client arrives as an argument."""
from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # importing typing costs hostelctl a few ms at every start
if TYPE_CHECKING:
    import argparse
    from typing import Any, Callable

MANAGER_PATH = "/org/hostel1/cryptsetup"
MANAGER = "org.hostel1.CryptsetupManager"
VOLUME = "org.hostel1.Volume"
NO_KEY_FILE = ("", "-", "none")
EXIT_FAILED = 1
# check-key exits as `cryptsetup open --test-passphrase` does, so scripts that
# test keys with one work with the other.
EXIT_WRONG_KEY = 2
EXIT_NO_SUCH_VOLUME = 4


class _NoPassphrase(Exception):
    pass


def _volume_path(client: "Any", name: str) -> str | None:
    (volumes,) = client.call(MANAGER_PATH, MANAGER, "ListVolumes")
    for volume_name, _device, _state, path in volumes:
        if volume_name == name:
            return path
    print(f"hostelctl cryptsetup: no volume named {name!r} "
          "('hostelctl cryptsetup list' shows the volumes)", file=sys.stderr)
    return None


def read_passphrase(name: str) -> str:
    """Prompt on the terminal without echo; from a pipe, take the first line (for scripts)."""
    if sys.stdin.isatty():
        import getpass

        return getpass.getpass(f"Passphrase for {name}: ")
    line = sys.stdin.readline()
    if not line:
        raise _NoPassphrase(f"no passphrase for {name} on standard input")
    return line[:-1] if line.endswith("\n") else line


def _key_options(args: "argparse.Namespace", ask: bool) -> dict[str, tuple[str, str]]:
    """The a{sv} key options: --key-file, else a passphrase when ask, else none
    (the daemon then uses the key file crypttab names)."""
    if args.key_file:
        return {"KeyFile": ("s", os.path.abspath(args.key_file))}
    if ask:
        return {"Passphrase": ("s", read_passphrase(args.name))}
    return {}


def cmd_list(args: "argparse.Namespace", client: "Any") -> int:
    from hostel.output import print_table

    (volumes,) = client.call(MANAGER_PATH, MANAGER, "ListVolumes")
    print_table(args, ["VOLUME", "STATE", "DEVICE"],
                [[name, state, device] for name, device, state, _path in volumes], "volume")
    for warning in client.get_property(MANAGER_PATH, MANAGER, "Warnings"):
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def _luks_summary(props: dict[str, "Any"]) -> str:
    if not props["LuksVersion"]:
        return f"none ({props['HeaderError']})" if props["HeaderError"] else "none"
    slots = " ".join(str(slot) for slot in props["LuksKeySlots"]) or "none"
    label = f", label {props['LuksLabel']!r}" if props["LuksLabel"] else ""
    return (f"LUKS{props['LuksVersion']}, {props['LuksCipher']}, UUID {props['LuksUUID']}"
            f"{label}, key slots {slots}")


def cmd_status(args: "argparse.Namespace", client: "Any") -> int:
    path = _volume_path(client, args.name)
    if path is None:
        return EXIT_FAILED
    props = client.get_all(path, VOLUME)
    from hostel.output import print_properties, wants_properties

    if wants_properties(args):
        return print_properties(args, props)
    key = props["KeyFile"] or "(none: a passphrase is asked for)"
    if props["KeyDevice"]:
        key += f" on {props['KeyDevice']}"
    header = props["Header"] + (f" on {props['HeaderDevice']}" if props["HeaderDevice"] else "")
    rows = [("Device", props["Device"]), ("Resolved", props["ResolvedDevice"] or "(not present)"),
            ("Key file", key), ("Options", ",".join(props["Options"]) or "(none)"),
            ("Header", header or "(on the device)"), ("From", props["Source"]),
            ("LUKS", _luks_summary(props))]
    print(f"{props['Name']} ({props['State']})")
    for label, value in rows:
        print(f"  {label:>9}: {value}")
    return 0


def cmd_check_key(args: "argparse.Namespace", client: "Any") -> int:
    """The name is checked before anything is asked for, and crypttab's key file
    is used unless --key-file names another: a passphrase is asked for only
    when the volume has no key file, as systemd-cryptsetup would."""
    path = _volume_path(client, args.name)
    if path is None:
        return EXIT_NO_SUCH_VOLUME
    key_file = client.get_property(path, VOLUME, "KeyFile")
    try:
        options = _key_options(args, ask=key_file in NO_KEY_FILE)
    except _NoPassphrase as e:
        print(f"hostelctl cryptsetup check-key: {e}", file=sys.stderr)
        return EXIT_FAILED
    (accepted,) = client.call(MANAGER_PATH, MANAGER, "CheckKey", "sa{sv}", args.name, options)
    print(f"{args.name}: the key {'opens' if accepted else 'does not open'} the volume")
    return 0 if accepted else EXIT_WRONG_KEY


def cmd_attach(args: "argparse.Namespace", client: "Any") -> int:
    path = _volume_path(client, args.name)
    if path is None:
        return EXIT_FAILED
    key_file = client.get_property(path, VOLUME, "KeyFile")
    try:
        options = _key_options(args, ask=key_file in NO_KEY_FILE)
    except _NoPassphrase as e:
        print(f"hostelctl cryptsetup attach: {e}", file=sys.stderr)
        return EXIT_FAILED
    client.call(MANAGER_PATH, MANAGER, "Attach", "sa{sv}", args.name, options)
    print(f"{args.name}: attached as /dev/mapper/{args.name}")
    return 0


def cmd_detach(args: "argparse.Namespace", client: "Any") -> int:
    client.call(MANAGER_PATH, MANAGER, "Detach", "s", args.name)
    print(f"{args.name}: detached")
    return 0


def add_commands(sub: "argparse._SubParsersAction", verb: "Callable[..., argparse.ArgumentParser]") -> None:
    """Add the cryptsetup verbs to hostelctl's 'cryptsetup' sub-parser."""
    verb(sub, "list", "list the volumes of crypttab and the kernel command line", cmd_list)
    status = verb(sub, "status", "show a volume: its source, key, options and LUKS header",
                  cmd_status)
    status.add_argument("name")
    for name, text, handler in [
            ("check-key", "check that crypttab's key file, --key-file, or a passphrase (asked "
                          "for, or read from a pipe, when the volume has no key file) opens a "
                          "volume; exit status 0 if it does, 2 if it does not, 4 if there is "
                          "no such volume, as cryptsetup open --test-passphrase", cmd_check_key),
            ("attach", "attach a volume as /dev/mapper/NAME, with crypttab's key file or a "
                       "passphrase", cmd_attach)]:
        parser = verb(sub, name, text, handler)
        parser.add_argument("name")
        parser.add_argument("--key-file", metavar="FILE", help="use this key file")
    detach = verb(sub, "detach", "detach an attached volume", cmd_detach)
    detach.add_argument("name")
