"""`hostelctl run`'s command line, parsed as systemd-nspawn parses its own.

nspawn uses getopt_long with "+" (stop at the first non-option), so that is
the behaviour users know: long options abbreviated to any unambiguous
prefix, "--opt value" and "--opt=value", optional values only after "=",
bundled short options ("-qbD/srv"), "--" to end the options. This module
does exactly that from the table in options.py, and is small enough that
hostelctl does not pay ~10 ms for argparse (with re, gettext and shutil) at
every start."""
from __future__ import annotations

from hostel.machine.options import BY_LONG, BY_SHORT, OPTIONS, Option

PROG = "hostelctl run"

# Options with no settings key: they act on the client.
HELP = Option("help", "Help", "b", "h", None, "show this help and exit")
VERSION = Option("version", "Version", "b", None, None, "show the version and exit")
LINK_JOURNAL_TRY_GUEST = Option("j", "LinkJournalTryGuest", "b", "j", None,
                                "same as --link-journal=try-guest")
PRIVATE_USERS_PICK = Option("U", "PrivateUsersPick", "b", "U", None,
                            "same as --private-users=pick --private-users-ownership=auto")
_LONG = {**BY_LONG, "help": HELP, "version": VERSION}
_SHORT = {**BY_SHORT, "h": HELP, "j": LINK_JOURNAL_TRY_GUEST, "U": PRIVATE_USERS_PICK}


class UsageError(Exception):
    """The command line is wrong; the message is getopt's wording for it."""


class ParsedRun:
    """What the command line asked for, option by option in order, and the command."""

    __slots__ = ("given", "command")

    def __init__(self) -> None:
        self.given: list[tuple[Option, str | None]] = []
        self.command: list[str] = []

    def values(self) -> dict[str, object]:
        """By settings key: the last value given, True for a flag, a list for "as" options."""
        values: dict[str, object] = {}
        lists: dict[str, list[str | None]] = {}
        for opt, value in self.given:
            if opt.signature == "as":
                lists.setdefault(opt.key, []).append(value)
            else:
                values[opt.key] = True if value is None else value
        values.update(lists)
        return values


def parse(argv: list[str]) -> ParsedRun:
    """Options up to the first non-option or "--"; everything after is the command."""
    parsed = ParsedRun()
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            i += 1
            break
        if not word.startswith("-") or word == "-":
            break
        if word.startswith("--"):
            i = _long_option(argv, i, parsed)
        else:
            i = _short_options(argv, i, parsed)
    parsed.command = argv[i:]
    return parsed


def _takes_value(opt: Option) -> bool:
    return opt.signature != "b" or opt.optional_value is not None


def _long_option(argv: list[str], i: int, parsed: ParsedRun) -> int:
    name, has_value, value = argv[i][2:].partition("=")
    opt = _match_long(name, argv[i])
    if not _takes_value(opt):
        if has_value:
            raise UsageError(f"option '--{opt.long}' doesn't allow an argument")
        parsed.given.append((opt, None))
        return i + 1
    if has_value:
        parsed.given.append((opt, value))
        return i + 1
    if opt.optional_value is not None:  # getopt: an optional value only after "="
        parsed.given.append((opt, opt.optional_value))
        return i + 1
    if i + 1 >= len(argv):
        raise UsageError(f"option '--{opt.long}' requires an argument")
    parsed.given.append((opt, argv[i + 1]))
    return i + 2


def _match_long(name: str, word: str) -> Option:
    """The option named `name` exactly, or the only one it abbreviates."""
    if name in _LONG:
        return _LONG[name]
    candidates = [opt for long, opt in _LONG.items() if long.startswith(name)]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise UsageError(f"unrecognized option '{word}'")
    listed = " ".join(f"'--{opt.long}'" for opt in candidates)
    raise UsageError(f"option '{word}' is ambiguous; possibilities: {listed}")


def _short_options(argv: list[str], i: int, parsed: ParsedRun) -> int:
    """One word of short options: flags may be bundled; a value ends the word or is the next."""
    word = argv[i]
    for pos in range(1, len(word)):
        opt = _SHORT.get(word[pos])
        if opt is None:
            raise UsageError(f"invalid option -- '{word[pos]}'")
        if not _takes_value(opt):
            parsed.given.append((opt, None))
            continue
        rest = word[pos + 1:]
        if rest:
            parsed.given.append((opt, rest))
            return i + 1
        if i + 1 >= len(argv):
            raise UsageError(f"option requires an argument -- '{opt.short}'")
        parsed.given.append((opt, argv[i + 1]))
        return i + 2
    return i + 1


# Every option `run` takes, the settings' and the client's own: for --help, the man page
# and the completion (hostel/docs.py).
CLIENT_OPTIONS = (HELP, VERSION, LINK_JOURNAL_TRY_GUEST, PRIVATE_USERS_PICK)


def usage() -> str:
    """--help, in nspawn's layout: one line per option, its short form first."""
    lines = [f"{PROG} [OPTIONS...] [COMMAND [ARGS...]]", "",
             "Run a command or OS in a new container, as systemd-nspawn does. Options have",
             "systemd-nspawn's names and meaning.", ""]
    for opt in CLIENT_OPTIONS[:2] + OPTIONS + CLIENT_OPTIONS[2:]:
        if opt.long == opt.short:  # a short option with no long form (-j, -U)
            names = f"-{opt.short}"
        else:
            names = (f"-{opt.short} " if opt.short else "   ") + f"--{opt.long}"
        if opt.optional_value is not None:
            names += f"[={opt.metavar}]"
        elif opt.metavar:
            names += f"={opt.metavar}"
        lines.append(f"  {names:<34} {opt.help}" if len(names) < 34
                     else f"  {names}\n  {'':<34} {opt.help}")
    return "\n".join(lines) + "\n"
