"""`hostelctl run`: systemd-nspawn's command line, carried out by hosteld.

The options become StartMachine's settings (options.py); the terminal's
descriptors travel with the call, so the container writes to this terminal
directly (or through hosteld's pty relay on a tty). hostelctl then waits for
the machine's State to become "exited" and exits with its ExitStatus.
SIGINT/SIGTERM are forwarded as nspawn does: a booted container is asked to
shut down (SIGRTMIN+3 through TerminateMachine), another gets the signal;
a second signal kills it."""
from __future__ import annotations

import os
import signal
import sys

from hostel.machine import cmdline
from hostel.machine.options import BY_KEY, Option

TYPE_CHECKING = False  # importing typing costs hostelctl 3 ms at every start
if TYPE_CHECKING:
    from typing import Any

MACHINE_MANAGER = "org.hostel1.MachineManager"
MACHINE_PATH = "/org/hostel1/machine"
EXIT_USAGE = 2


class _Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        self.signum = signum


def _value(opt: Option, raw: Any) -> tuple[str, Any]:
    if opt.signature == "as":
        items = [part for item in raw for part in
                 (item.split(",") if opt.key in ("Capability", "DropCapability") else [item])]
        return "as", items
    if opt.signature == "b" and opt.optional_value is None:
        return "b", True
    return "s", os.path.abspath(raw) if opt.path else raw


def settings_from_args(parsed: cmdline.ParsedRun) -> tuple[str, dict[str, tuple[str, Any]]]:
    """Turn parsed options into (name, a{sv} settings as (signature, value) pairs)."""
    values = parsed.values()
    name = str(values.pop("Machine", ""))
    try_guest = values.pop(cmdline.LINK_JOURNAL_TRY_GUEST.key, False)
    settings = {key: _value(BY_KEY[key], raw) for key, raw in values.items()}
    if try_guest:
        settings["LinkJournal"] = ("s", "try-guest")
    if parsed.command:
        settings["Command"] = ("as", list(parsed.command))
    settings["CallerDirectory"] = ("s", os.getcwd())
    if os.environ.get("TERM"):
        settings["Terminal"] = ("s", os.environ["TERM"])
    return name, settings


def run(argv: list[str]) -> int:
    try:
        parsed = cmdline.parse(argv)
    except cmdline.UsageError as e:
        print(f"{cmdline.PROG}: {e}\nTry '{cmdline.PROG} --help' for more information.",
              file=sys.stderr)
        return EXIT_USAGE
    if any(opt is cmdline.HELP for opt, _value in parsed.given):
        sys.stdout.write(cmdline.usage())
        return 0
    name, settings = settings_from_args(parsed)
    from hostel.client import Client

    with Client() as client:
        return RunSession(client, name, settings, quiet="Quiet" in settings).run()


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
