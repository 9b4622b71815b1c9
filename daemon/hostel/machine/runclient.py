"""`hostelctl run`: systemd-nspawn's command line, carried out by hosteld.

The options become StartMachine's settings (options.py); the terminal's
descriptors travel with the call, so the container writes to this terminal
directly (or through hosteld's pty relay on a tty). hostelctl then waits for
the machine's State to become "exited" and exits with its ExitStatus.
SIGINT/SIGTERM are forwarded as nspawn does: a booted container is asked to
shut down (SIGRTMIN+3 through TerminateMachine), another gets the signal;
a second signal kills it."""
from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any

from hostel.machine.options import OPTIONS, Option

MACHINE_MANAGER = "org.hostel1.MachineManager"
MACHINE_PATH = "/org/hostel1/machine"


class _Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        self.signum = signum


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hostelctl run", description="Run a command or OS in a new container, as "
        "systemd-nspawn does. Options have systemd-nspawn's names and meaning.")
    for opt in OPTIONS:
        names = [f"--{opt.long}"] + ([f"-{opt.short}"] if opt.short else [])
        if opt.signature == "b":
            parser.add_argument(*names, dest=opt.key, action="store_true", default=None,
                                help=opt.help)
        elif opt.signature == "as":
            parser.add_argument(*names, dest=opt.key, action="append", metavar=opt.metavar,
                                help=opt.help)
        else:
            parser.add_argument(*names, dest=opt.key, metavar=opt.metavar, help=opt.help)
    parser.add_argument("-j", dest="LinkJournalTryGuest", action="store_true",
                        help="same as --link-journal=try-guest")
    parser.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND [ARGS...]")
    return parser


def _value(opt: Option, raw: Any) -> tuple[str, Any]:
    if opt.signature == "as":
        items = [part for item in raw for part in
                 (item.split(",") if opt.key in ("Capability", "DropCapability") else [item])]
        return "as", items
    if opt.signature == "b" and opt.optional_value is None:
        return "b", True
    return "s", os.path.abspath(raw) if opt.path else raw


def settings_from_args(args: argparse.Namespace) -> tuple[str, dict[str, tuple[str, Any]]]:
    """Turn parsed options into (name, a{sv} settings as (signature, value) pairs)."""
    settings: dict[str, tuple[str, Any]] = {}
    name = ""
    for opt in OPTIONS:
        raw = getattr(args, opt.key)
        if raw is None:
            continue
        if opt.key == "Machine":
            name = raw
            continue
        settings[opt.key] = _value(opt, raw)
    if args.LinkJournalTryGuest:
        settings["LinkJournal"] = ("s", "try-guest")
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if command:
        settings["Command"] = ("as", command)
    settings["CallerDirectory"] = ("s", os.getcwd())
    if os.environ.get("TERM"):
        settings["Terminal"] = ("s", os.environ["TERM"])
    return name, settings


def normalize_optional_values(argv: list[str]) -> list[str]:
    """Give bare --volatile / --private-users their implied value, as getopt does.

    getopt only takes an optional value in the "--opt=value" form, so
    "--volatile /bin/sh" means --volatile=yes and a command; argparse would take
    /bin/sh as the value. Scanning stops at the first non-option, as nspawn's
    option parsing does, so the command's own arguments are left alone."""
    from hostel.machine.options import BY_LONG, BY_SHORT

    out = list(argv)
    i = 0
    while i < len(out):
        token = out[i]
        if token == "--" or not token.startswith("-") or token == "-":
            break
        if token.startswith("--"):
            name, has_value = token[2:].partition("=")[0], "=" in token
            opt = BY_LONG.get(name)
            if opt is not None and opt.optional_value is not None and not has_value:
                out[i] = f"--{name}={opt.optional_value}"
            elif opt is not None and opt.signature != "b" and not has_value:
                i += 1  # its value is the next word
        elif len(token) == 2 and token[1] in BY_SHORT and BY_SHORT[token[1]].signature != "b":
            i += 1
        i += 1
    return out


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(normalize_optional_values(argv))
    name, settings = settings_from_args(args)
    from hostel.client import Client

    with Client() as client:
        return RunSession(client, name, settings, quiet=bool(args.Quiet)).run()


class RunSession:
    def __init__(self, client: Any, name: str, settings: dict[str, tuple[str, Any]],
                 quiet: bool) -> None:
        self.client = client
        self.name = name
        self.settings = settings
        self.quiet = quiet
        self.boot = bool(settings.get("Boot"))
        self.signals_seen = 0

    def with_stdio(self) -> dict[str, tuple[str, Any]]:
        """The settings plus this terminal's open standard descriptors."""
        settings = dict(self.settings)
        for key, fd in (("StandardInput", 0), ("StandardOutput", 1), ("StandardError", 2)):
            try:
                os.fstat(fd)
            except OSError:
                continue  # closed: the payload gets /dev/null
            # A plain int: jeepney's FileDescriptor wrapper would close our stdio.
            settings[key] = ("h", fd)
        return settings

    def _start(self) -> str:
        (path,) = self.client.call(MACHINE_PATH, MACHINE_MANAGER, "StartMachine", "sa{sv}",
                                   self.name, self.with_stdio())
        return path

    def _banner(self) -> None:
        """What systemd-nspawn says before it starts a container (unless --quiet)."""
        given = self.settings.get("Image") or self.settings.get("Directory")
        where = given[1] if given else None
        name = self.name or (os.path.basename(where.rstrip("/")) if where else "")
        text = f"Spawning container {name}" + (f" on {where}." if where else ".")
        print(text, file=sys.stderr, flush=True)

    def run(self) -> int:
        from hostel.client import MatchRule

        if not self.quiet:
            self._banner()

        fields = dict(type="signal", interface="org.freedesktop.DBus.Properties",
                      member="PropertiesChanged", path_namespace=MACHINE_PATH)
        self.client.add_match(MatchRule(sender="org.hostel1", **fields))
        # Locally, signals carry hosteld's unique name, not org.hostel1: filter without it.
        with self.client.filter(MatchRule(**fields)) as queue:
            raw_tty = _RawTerminal() if sys.stdin.isatty() and \
                self.settings.get("Console", ("s", "interactive"))[1] == "interactive" else None
            previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                path = self._start()
                if raw_tty is not None:
                    raw_tty.enter()
                return self._wait(queue, path)
            finally:
                if raw_tty is not None:
                    raw_tty.leave()
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    def _on_signal(self, signum: int, _frame: object) -> None:
        raise _Interrupted(signum)

    def _wait(self, queue: Any, path: str) -> int:
        while True:
            try:
                status = _exit_status(queue, path)
                if status is not None:
                    return status
                self.client.receive_into(queue)
            except _Interrupted as e:
                self._forward(path, e.signum)

    def _forward(self, path: str, signum: int) -> None:
        self.signals_seen += 1
        machine = self.client.get_property(path, "org.hostel1.Machine", "Name")
        if self.signals_seen > 1:
            self.client.call(MACHINE_PATH, MACHINE_MANAGER, "KillMachine", "ssi", machine, "all",
                             int(signal.SIGKILL))
        elif self.boot:
            self.client.call_no_reply(MACHINE_PATH, MACHINE_MANAGER, "TerminateMachine", "s",
                                      machine)
        else:
            self.client.call(MACHINE_PATH, MACHINE_MANAGER, "KillMachine", "ssi", machine,
                             "leader", signum)


def _exit_status(queue: Any, path: str) -> int | None:
    while queue:
        msg = queue.popleft()
        if msg.path != path:
            continue
        _interface, changed, _invalidated = msg.body
        if changed.get("State", ("s", ""))[1] == "exited":
            return changed.get("ExitStatus", ("i", 1))[1]
    return None


class _RawTerminal:
    """The user's terminal in raw mode while a container owns it, restored afterwards."""

    def __init__(self) -> None:
        import termios

        self.saved = termios.tcgetattr(0)

    def enter(self) -> None:
        import tty

        tty.setraw(0)

    def leave(self) -> None:
        import termios

        termios.tcsetattr(0, termios.TCSADRAIN, self.saved)
