"""Man pages and bash completion, generated from the option tables the programs parse with.

hostelctl's argparse tree (cli.build_parser), `hostelctl run`'s nspawn table
(machine/options.py with the client's own options in machine/cmdline.py) and
hosteld's parser (daemon.build_parser) are the only description of the
options there is: the pages and the completion are written from them at build
time, so an option added to the code is documented and completed with nothing
else to edit, and none can be documented that the code does not take.

    python -m hostel.docs OUTDIR   writes hostelctl.1, hosteld.8,
                                   hostel-cryptsetup-generator.8 and
                                   hostelctl.bash (bash-completion's file)"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from hostel import __version__


@dataclass
class Flag:
    """One option as the documents show it."""

    names: list[str]           # ["-o", "--output"]
    metavar: str | None        # "MODE", or None for a flag
    help: str
    choices: list[str] = field(default_factory=list)
    optional: bool = False     # nspawn's --opt[=VALUE]


@dataclass
class Verb:
    """A command path ("cryptsetup status") with its options and positionals."""

    words: list[str]
    help: str
    flags: list[Flag]
    positionals: list[tuple[str, str]]  # (dest, metavar)
    subverbs: list[str]

    @property
    def path(self) -> str:
        return " ".join(self.words)


def _expanded_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The help text as `--help` prints it: argparse fills in %(default)s and the like
    only when it formats help, so a man page built from the raw text would show them."""
    text = action.help or ""
    return text % dict(vars(action), prog=parser.prog) if "%" in text else text


def _flags_of(parser: argparse.ArgumentParser) -> list[Flag]:
    flags = []
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        takes = action.nargs != 0
        metavar: str | None = None
        if takes:
            named = action.metavar
            if isinstance(named, tuple):  # nargs > 1: argparse's one name per value
                named = " ".join(named)
            metavar = named or (action.dest.upper() if not action.choices else "MODE")
        flags.append(Flag(list(action.option_strings), metavar, _expanded_help(parser, action),
                          [str(c) for c in action.choices or []]))
    return flags


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _helps(parser: argparse.ArgumentParser) -> dict[str, str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {choice.dest: choice.help or "" for choice in action._choices_actions}
    return {}


def walk(parser: argparse.ArgumentParser, words: list[str] | None = None,
         help_text: str = "") -> Iterator[Verb]:
    """Every command path of an argparse tree, the root first."""
    words = words or []
    subs = _subparsers(parser)
    positionals = [(a.dest, str(a.metavar or a.dest)) for a in parser._actions
                   if not a.option_strings and not isinstance(a, argparse._SubParsersAction)]
    yield Verb(words, help_text or parser.description or "", _flags_of(parser), positionals,
               list(subs))
    helps = _helps(parser)
    for name, sub in subs.items():
        yield from walk(sub, words + [name], helps.get(name, ""))


def run_flags() -> list[Flag]:
    """`hostelctl run`'s options: systemd-nspawn's table and the client's own."""
    from hostel.machine import cmdline
    from hostel.machine.options import OPTIONS

    flags = []
    for opt in cmdline.CLIENT_OPTIONS[:2] + OPTIONS + cmdline.CLIENT_OPTIONS[2:]:
        names = [f"-{opt.short}"] if opt.short else []
        if opt.long != opt.short:  # -j and -U have no long form
            names.append(f"--{opt.long}")
        takes = opt.signature != "b" or opt.optional_value is not None
        flags.append(Flag(names, (opt.metavar or "VALUE") if takes else None, opt.help,
                          optional=opt.optional_value is not None))
    return flags


def hostelctl_verbs() -> list[Verb]:
    from hostel import cli

    verbs = list(walk(cli.build_parser()))
    for verb in verbs:
        if verb.words == ["run"]:
            verb.flags = run_flags()
            verb.positionals = [("command", "COMMAND [ARGS...]")]
    return verbs


# Man pages -----------------------------------------------------------------------

def roff(text: str) -> str:
    """Text safe in a roff line: backslashes escaped, no line starting with a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + line) if line[:1] in (".", "'") else line
                     for line in text.splitlines())


def _flag_line(flag: Flag) -> str:
    names = ", ".join(f"\\fB{roff(name)}\\fR" for name in flag.names)
    if flag.metavar:
        value = f"\\fI{roff(flag.metavar)}\\fR"
        names += f"[={value}]" if flag.optional else f"={value}" if any(
            n.startswith("--") for n in flag.names) else f" {value}"
    return names


def _flags_section(flags: list[Flag]) -> list[str]:
    lines = []
    for flag in flags:
        text = flag.help + (f" ({', '.join(flag.choices)})" if flag.choices else "")
        lines += [".TP", _flag_line(flag), roff(text)]
    return lines


def _header(name: str, section: int, summary: str) -> list[str]:
    return [f'.TH "{name.upper()}" "{section}" "" "hostel {__version__}" "hostel"',
            ".SH NAME", f"{roff(name)} \\- {roff(summary)}"]


def hostelctl_page() -> str:
    from hostel import cli

    verbs = hostelctl_verbs()
    root = verbs[0]
    lines = _header("hostelctl", 1, "control hosteld: namespace containers, guests and "
                    "encrypted volumes")
    lines += [".SH SYNOPSIS", "\\fBhostelctl\\fR [\\fIOPTIONS\\fR...] \\fICOMMAND\\fR "
              "[\\fIARGS\\fR...]", ".SH DESCRIPTION", roff(root.help),
              roff("Commands and options follow machinectl(1) and systemctl(1): the listing "
                   "and showing commands take -o json, --no-legend, -p and --value; "
                   "hostelctl run takes systemd-nspawn(1)'s options."),
              ".SH OPTIONS", *_flags_section(root.flags), ".SH COMMANDS"]
    for verb in verbs[1:]:
        if verb.subverbs and not verb.flags[1:]:
            lines += [f'.SS "{roff(verb.path)} \\fICOMMAND\\fR"', roff(verb.help)]
            continue
        args = " ".join(f"\\fI{roff(meta)}\\fR" for _dest, meta in verb.positionals)
        lines += [f'.SS "hostelctl {roff(verb.path)} [OPTIONS...] {args}"', roff(verb.help)]
        lines += _flags_section(verb.flags)
    lines += [".SH \"EXIT STATUS\"", roff(cli.EPILOG),
              ".SH ENVIRONMENT", ".TP", "\\fB$DBUS_SYSTEM_BUS_ADDRESS\\fR",
              roff("the system bus to reach hosteld on (default "
                   "unix:path=/run/dbus/system_bus_socket)"),
              ".SH \"SEE ALSO\"", "hosteld(8), hostel\\-cryptsetup\\-generator(8), "
              "machinectl(1), systemd\\-nspawn(1), systemctl(1)"]
    return "\n".join(lines) + "\n"


def hosteld_page() -> str:
    from hostel import daemon
    from hostel.guest import run_network
    from hostel.machine import pool

    root = next(walk(daemon.build_parser()))
    lines = _header("hosteld", 8, "the hostel daemon: containers, guests and encrypted "
                    "volumes over D\\-Bus")
    lines += [".SH SYNOPSIS", "\\fBhosteld\\fR [\\fIOPTIONS\\fR...]", ".SH DESCRIPTION",
              roff("hosteld owns org.hostel1 on the system bus (and org.freedesktop.machine1 "
                   "when machined does not run), and serves hostelctl(1) and machinectl(1)."),
              roff("Where no systemd owns org.freedesktop.systemd1 either, hosteld answers "
                   "the calls machinectl start, enable and disable make for "
                   "systemd-nspawn@NAME.service units (and no others), so that they start "
                   "and enable machines from its pool."),
              ".SH OPTIONS", *_flags_section(root.flags),
              ".SH ENVIRONMENT", ".TP", "\\fB$DBUS_SYSTEM_BUS_ADDRESS\\fR",
              roff("the bus to serve on"), ".TP", "\\fB$HOSTEL_LOG_LEVEL\\fR",
              roff("the default of --log-level"),
              ".TP", f"\\fB${pool.POOL_ENV}\\fR",
              roff("colon-separated directories searched for a machine NAME (a tree NAME or "
                   f"an image NAME{pool.RAW_SUFFIX}) by hostelctl start and machinectl start, "
                   f"replacing the default {pool.SYSTEM_POOL} and STATE_DIR/machines"),
              ".TP", f"\\fB${run_network.POOL_ENV}\\fR",
              roff("the private IPv4 range from which each hostelctl guest run --network=veth "
                   f"gets a /{run_network.SLOT_PREFIX} (default {run_network.DEFAULT_POOL}): "
                   "the one its name hashes to, else the next that overlaps no route or "
                   "address of the host and no other run"),
              ".SH FILES", ".TP", "\\fISTATE_DIR/enabled/NAME\\fR",
              roff("a symlink to the image of a machine hosteld starts when it starts "
                   "(hostelctl enable)"), ".TP", "\\fISTATE_DIR/logs/NAME.log\\fR",
              roff("the console output of machine NAME started from the pool "
                   "(hostelctl logs)"),
              ".SH \"EXIT STATUS\"", roff(daemon.EXIT_STATUS),
              ".SH \"SEE ALSO\"", "hostelctl(1), hostel\\-cryptsetup\\-generator(8)"]
    return "\n".join(lines) + "\n"


def generator_page() -> str:
    from hostel.cryptsetup import generator

    summary, _, body = (generator.__doc__ or "").partition("\n")
    lines = _header("hostel-cryptsetup-generator", 8,
                    "a drop-in for systemd-cryptsetup-generator")
    lines += [".SH SYNOPSIS", "\\fBhostel\\-cryptsetup\\-generator\\fR \\fINORMAL\\-DIR\\fR "
              "[\\fIEARLY\\-DIR\\fR \\fILATE\\-DIR\\fR]", ".SH DESCRIPTION",
              roff(summary.split(":", 1)[-1].strip()), ".PP", roff(" ".join(body.split())),
              roff("It takes no options: systemd runs generators with one or three output "
                   "directories."),
              ".SH FILES", ".TP", "\\fI/etc/crypttab\\fR", roff("the volumes (crypttab(5))"),
              ".SH \"SEE ALSO\"", "systemd\\-cryptsetup\\-generator(8), crypttab(5), "
              "hostelctl(1)"]
    return "\n".join(lines) + "\n"


# Bash completion -----------------------------------------------------------------

# The positional `name`/`names` of a verb names something its group's `list` shows.
_NAMED = ("name", "names")


def _bash_words(words: list[str]) -> str:
    return " ".join(words).replace("'", "")


def completion() -> str:
    """bash-completion's file for hostelctl: verbs, options and their choices per command
    path, and machine, guest, volume or image names from the group's `list --no-legend`."""
    verbs = hostelctl_verbs()
    entries: dict[str, list[str]] = {"verbs": [], "opts": [], "valued": [], "choices": [], "names": []}
    for verb in verbs:
        key = ":" + verb.path  # bash has no empty subscript: the root is ":"
        if verb.subverbs:
            entries["verbs"].append(f"['{key}']='{_bash_words(verb.subverbs)}'")
        entries["opts"].append(f"['{key}']='{_bash_words([n for f in verb.flags for n in f.names])}'")
        valued = [n for f in verb.flags if f.metavar and not f.optional for n in f.names]
        entries["valued"].append(f"['{key}']=' {_bash_words(valued)} '")
        for flag in verb.flags:
            for name in flag.names if flag.choices else []:
                entries["choices"].append(f"['{key} {name}']='{_bash_words(flag.choices)}'")
        if any(dest in _NAMED for dest, _meta in verb.positionals):
            group = verb.words[:-1]
            entries["names"].append(f"['{key}']='{_bash_words(group + ['list'])}'")
    declare = "\n".join(f"    local -A {kind}=({' '.join(items)})" for kind, items in entries.items())
    return f"""# bash completion for hostelctl(1); generated by hostel/docs.py from hostelctl's
# option tables (python -m hostel.docs): do not edit.
_hostelctl() {{
{declare}
    local cur=${{COMP_WORDS[COMP_CWORD]}} prev=${{COMP_WORDS[COMP_CWORD-1]}}
    local path=: word i positional=0
    for ((i = 1; i < COMP_CWORD; i++)); do
        word=${{COMP_WORDS[i]}}
        if [[ $word == -* ]]; then
            [[ $word != *=* && ${{valued[$path]}} == *" $word "* ]] && ((i++))
            continue
        fi
        if ((positional == 0)) && [[ " ${{verbs[$path]}} " == *" $word "* ]]; then
            [[ $path == : ]] && path=:$word || path="$path $word"
        else
            positional=$((positional + 1))
        fi
    done
    if [[ -n ${{choices[$path $prev]+set}} ]]; then
        COMPREPLY=($(compgen -W "${{choices[$path $prev]}}" -- "$cur"))
    elif [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "${{opts[$path]}}" -- "$cur"))
    elif [[ -n ${{verbs[$path]+set}} ]] && ((positional == 0)); then
        COMPREPLY=($(compgen -W "${{verbs[$path]}}" -- "$cur"))
    elif [[ -n ${{names[$path]+set}} ]]; then
        COMPREPLY=($(compgen -W "$(hostelctl ${{names[$path]}} --no-legend 2>/dev/null | \\
            while read -r first _; do echo "$first"; done)" -- "$cur"))
    fi
}}
complete -F _hostelctl hostelctl
"""


PAGES = {"hostelctl.1": hostelctl_page, "hosteld.8": hosteld_page,
         "hostel-cryptsetup-generator.8": generator_page, "hostelctl.bash": completion}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m hostel.docs OUTDIR", file=sys.stderr)
        return 2
    out = Path(args[0])
    out.mkdir(parents=True, exist_ok=True)
    for name, make in PAGES.items():
        (out / name).write_text(make())
    return 0


if __name__ == "__main__":
    sys.exit(main())
