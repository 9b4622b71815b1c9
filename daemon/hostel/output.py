"""hostelctl's output, with systemctl's and machinectl's conventions.

Scripts parse what hostelctl prints, so the layout follows what they already
know from machinectl: tables whose columns are sized to their content and
separated by one space, a header and an "N machines listed." footer (the
"legend", off with --no-legend), "No machines." when there are none; `-o json`
/ `json-pretty` for machines; `show` as Name=value lines with timestamps
formatted, `-p NAME` to pick properties and `--value` for the bare values.
Tables are cut to the terminal's width only on a terminal, as systemd does.

Imported by hostelctl's listing commands: standard library only, no `re`,
no `typing`, no `json` until it is asked for."""
from __future__ import annotations

import sys

TYPE_CHECKING = False  # importing typing costs hostelctl a few ms at every start
if TYPE_CHECKING:
    import argparse
    from typing import Any, Iterable

OUTPUT_MODES = ("short", "json", "json-pretty")
ELLIPSIS = "\u2026"
MIN_COLUMN = 6  # a column cut to fit the terminal keeps at least this many characters


def add_options(parser: "argparse.ArgumentParser", properties: bool = True) -> None:
    """The output options every listing or showing verb accepts (systemctl's names)."""
    parser.add_argument("-o", "--output", choices=OUTPUT_MODES, default="short",
                        help="output mode: short (the default), json or json-pretty")
    parser.add_argument("--no-legend", action="store_true",
                        help="print no column headers and no footer")
    parser.add_argument("--no-pager", action="store_true",
                        help="accepted for systemctl compatibility: hostelctl never pages")
    parser.add_argument("-l", "--full", action="store_true",
                        help="do not shorten columns to the terminal's width")
    parser.add_argument("-a", "--all", action="store_true",
                        help="also list inactive entries, and show empty properties")
    if properties:
        parser.add_argument("-p", "--property", action="append", default=[], metavar="NAME",
                            help="show only these properties (repeatable, or comma-separated)")
        parser.add_argument("--value", action="store_true",
                            help="with show or -p, print only the values, not NAME=")


def wanted_properties(args: "argparse.Namespace") -> list[str]:
    """-p values, split at commas as systemctl splits them."""
    return [name for item in getattr(args, "property", []) for name in item.split(",") if name]


def _width() -> int | None:
    """The terminal's width, or None (no limit) when stdout is not a terminal."""
    import os

    if not sys.stdout.isatty():
        return None
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    try:
        return os.get_terminal_size(1).columns
    except OSError:
        return None


def _fit(widths: list[int], limit: int) -> list[int]:
    """Shrink the widest columns, one character at a time, until the row fits `limit`."""
    widths = list(widths)
    while sum(widths) + len(widths) - 1 > limit:
        widest = max(range(len(widths)), key=lambda i: widths[i])
        if widths[widest] <= MIN_COLUMN:
            break
        widths[widest] -= 1
    return widths


def _cell(text: str, width: int, last: bool) -> str:
    if len(text) > width:
        text = text[:max(width - 1, 0)] + ELLIPSIS
    return text if last else text.ljust(width)


def json_name(column: str) -> str:
    """A column's JSON field name, as systemd's tables make them: lower case, '_' for ' '."""
    return column.lower().replace(" ", "_")


def print_table(args: "argparse.Namespace", columns: list[str], rows: "Iterable[list[Any]]",
                noun: str, nouns: str | None = None) -> None:
    """A sorted table of `rows` (sorted on the first column) in the mode args ask for."""
    rows = sorted(([("" if cell is None else cell) for cell in row] for row in rows),
                  key=lambda row: [str(cell) for cell in row])
    mode = getattr(args, "output", "short")
    if mode != "short":  # numbers stay numbers
        print_json([{json_name(c): cell for c, cell in zip(columns, row)} for row in rows], mode)
        return
    rows = [[str(cell) for cell in row] for row in rows]
    nouns = nouns or f"{noun}s"
    legend = not getattr(args, "no_legend", False)
    if not rows:
        if legend:
            print(f"No {nouns}.")
        return
    table = ([columns] if legend else []) + rows
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    limit = None if getattr(args, "full", False) else _width()
    if limit is not None:
        widths = _fit(widths, limit)
    last = len(columns) - 1
    for row in table:
        print(" ".join(_cell(cell, widths[i], i == last) for i, cell in enumerate(row)).rstrip())
    if legend:
        print(f"\n{len(rows)} {nouns} listed.")


def print_json(value: "Any", mode: str) -> None:
    """-o json (one line) or json-pretty; bytes become lists of numbers, as systemd's JSON has."""
    import json

    def jsonable(item: "Any") -> "Any":
        if isinstance(item, (bytes, bytearray)):
            return list(item)
        return str(item)

    if mode == "json-pretty":
        print(json.dumps(value, indent=8, default=jsonable))
    else:
        print(json.dumps(value, separators=(",", ":"), default=jsonable))


def format_timestamp(usec: int) -> str:
    """systemd's timestamp format: 'Wed 2026-12-02 01:23:45 UTC' (local time), '' for 0."""
    import time

    if not usec:
        return ""
    return time.strftime("%a %Y-%m-%d %H:%M:%S %Z", time.localtime(usec / 1e6))


def _quote(word: str) -> str:
    """A word of a space-separated list, double-quoted when it must be (as systemd shows
    Environment=)."""
    if word and not any(c in word for c in " \t\n\"'\\"):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def format_value(value: "Any") -> str:
    """A D-Bus value as systemctl show prints one: yes/no, lists space-separated, a{sv}
    as KEY=value words; (signature, value) variant pairs unwrapped."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    if isinstance(value, dict):
        return " ".join(_quote(f"{key}={format_value(_unwrap(item))}")
                        for key, item in sorted(value.items()))
    if isinstance(value, (list, tuple)):
        return " ".join(_quote(format_value(item)) for item in value)
    return str(value)


def _unwrap(item: "Any") -> "Any":
    """A variant as the client returns it, (signature, value), or a plain value."""
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
        return item[1]
    return item


def plain(props: dict[str, "Any"]) -> dict[str, "Any"]:
    """Properties with variants unwrapped all the way down, for JSON."""
    def walk(value: "Any") -> "Any":
        value = _unwrap(value)
        if isinstance(value, dict):
            return {key: walk(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(item) for item in value]
        return value
    return {key: walk(value) for key, value in props.items()}


def print_properties(args: "argparse.Namespace", props: dict[str, "Any"],
                     formatted: dict[str, str] | None = None) -> int:
    """systemctl show: NAME=value sorted by name; -p picks, --value drops the names,
    empty values only with --all. `formatted` overrides how some values read.
    Returns 1 when -p names a property there is not, as systemctl does not (it is
    silent) but a script asking for a misspelt name wants to know."""
    wanted = wanted_properties(args)
    unknown = [name for name in wanted if name not in props]
    if unknown:
        print(f"hostelctl: no property {', '.join(unknown)} (known: {' '.join(sorted(props))})",
              file=sys.stderr)
        return 1
    names = wanted or sorted(props)
    mode = getattr(args, "output", "short")
    if mode != "short":
        print_json(plain({name: props[name] for name in names}), mode)
        return 0
    formatted = formatted or {}
    for name in names:
        text = formatted[name] if name in formatted else format_value(props[name])
        if not text and not wanted and not getattr(args, "all", False):
            continue
        print(text if getattr(args, "value", False) else f"{name}={text}")
    return 0


def wants_properties(args: "argparse.Namespace") -> bool:
    """Whether a status verb should print properties (-p, --value or -o json) instead of
    its human layout."""
    return bool(wanted_properties(args)) or getattr(args, "value", False) or \
        getattr(args, "output", "short") != "short"
