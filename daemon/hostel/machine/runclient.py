"""`hostelctl run`: systemd-nspawn's command line, carried out by hosteld.

The options become StartMachine's settings (options.py); the terminal's
descriptors travel with the call, so the container writes to this terminal
directly (or through hosteld's pty relay on a tty). hostelctl then waits for
the machine's State to become "exited" and exits with its ExitStatus.
SIGINT/SIGTERM act as in systemd-nspawn 252: the container's kill signal
(SIGRTMIN+3 with --boot, or --kill-signal's) asks it to stop, and a second
signal kills it; without a kill signal the first one kills it at once. The
exit status and the closing "Container NAME ..." line are nspawn's too. On a
terminal (put in raw mode before the start, so the first lines are not
"\\r\\r\\n"), ^]^]^] (Ctrl-] three times within a second) kills it, as in
systemd-nspawn: the typed input then reaches hosteld through a pty of
hostelctl's, which watches for the escape."""
from __future__ import annotations

import os
import sys

from hostel.machine import cmdline
from hostel.machine.options import BY_KEY, Option

TYPE_CHECKING = False  # importing typing costs hostelctl 3 ms at every start
if TYPE_CHECKING:
    import signal
    from typing import Any
else:
    import _signal as signal  # the C module: `signal` imports enum, 3 ms of every run

MACHINE_MANAGER = "org.hostel1.MachineManager"
MACHINE_PATH = "/org/hostel1/machine"
EXIT_USAGE = 1  # systemd-nspawn's for a bad command line (the other verbs keep systemctl's 2)
RLIMIT_COUNT = 16  # Linux's RLIM_NLIMITS (the resource module does not export it)
HALTING = "Trying to halt container. Send SIGTERM again to trigger immediate termination."
ESCAPE_HINT = "Press ^] three times within 1s to kill container."  # systemd-nspawn 252's


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
    if values.pop(cmdline.PRIVATE_USERS_PICK.key, False):  # -U, as nspawn 252
        values.setdefault("PrivateUsers", "pick")
        values.setdefault("PrivateUsersOwnership", "auto")
    settings = {key: _value(BY_KEY[key], raw) for key, raw in values.items()}
    if try_guest:
        settings["LinkJournal"] = ("s", "try-guest")
    if parsed.command:
        settings["Command"] = ("as", list(parsed.command))
    settings["CallerDirectory"] = ("s", os.getcwd())
    settings["CallerLimits"] = ("as", _caller_limits())
    if os.environ.get("TERM"):
        settings["Terminal"] = ("s", os.environ["TERM"])
    return name, settings


def _caller_limits() -> list[str]:
    """Our resource limits, which the payload's derive from as under nspawn (hosteld's
    payload_limits): RESOURCE=SOFT:HARD, -1 for infinity."""
    import resource

    return [f"{number}={soft}:{hard}" for number in range(RLIMIT_COUNT)
            for soft, hard in (resource.getrlimit(number),)]


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
    if any(opt is cmdline.VERSION for opt, _value in parsed.given):
        from hostel import __version__

        print(f"hostel {__version__}")  # as systemd-nspawn --version's first line
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
        self.signals_seen = 0
        self.early_signal: int | None = None  # came during StartMachine: acted on after it
        self.started = False
        self.escape: _EscapeRelay | None = None

    def with_stdio(self) -> dict[str, tuple[str, Any]]:
        """The settings plus this terminal's open standard descriptors."""
        settings = dict(self.settings)
        for key, fd in (("StandardInput", 0), ("StandardOutput", 1), ("StandardError", 2)):
            try:
                os.fstat(fd)
            except OSError:
                continue  # closed: the payload gets /dev/null
            settings[key] = ("h", fd)
        if self.escape is not None:
            settings["StandardInput"] = ("h", self.escape.slave)
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
            if raw_tty is not None and not self.quiet:  # only where the keys work: a terminal
                print(ESCAPE_HINT, file=sys.stderr, flush=True)
            previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
            self.escape = _EscapeRelay() if raw_tty is not None else None
            try:
                if raw_tty is not None:  # before the start: the payload may write at once
                    raw_tty.enter()
                path = self._start()
                if self.escape is not None:
                    self.escape.start()
                status, signum = self._wait(queue, path)
            finally:
                if self.escape is not None:
                    self.escape.close()
                if raw_tty is not None:
                    raw_tty.leave()
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
        return self._report(_name_of(path), status, signum)

    def _report(self, name: str, status: int, signum: int) -> int:
        """systemd-nspawn 252's last line about the container, and its exit status."""
        if signum not in (0, signal.SIGINT, signal.SIGHUP):
            print(f"Container {name} terminated by signal {_signal_name(signum)}.",
                  file=sys.stderr)
            return status
        if not self.quiet:
            text = {signal.SIGINT: "has been shut down", signal.SIGHUP: "is being rebooted",
                    0: "exited successfully" if status == 0 else f"failed with error code {status}"}
            print(f"Container {name} {text[signum]}.", file=sys.stderr)
        return status

    def _on_signal(self, signum: int, _frame: object) -> None:
        """Interrupt the wait; during StartMachine only note it (the machine has no path
        to act on yet, and the call must not be cut off half-way)."""
        if self.started:
            raise _Interrupted(signum)
        self.early_signal = signum

    def _wait(self, queue: Any, path: str) -> tuple[int, int]:
        pending, self.started = self.early_signal, True
        while True:
            try:
                if pending is not None:  # a signal that came while the last was forwarded
                    signum, pending = pending, None
                    self._forward(path, signum)
                status = _exit_status(queue, path)
                if status is not None:
                    return status
                self._check_served()
                self.client.receive_into(queue)
            except _Interrupted as e:
                pending = e.signum

    def _check_served(self) -> None:
        """Before each wait for the next message. hostelctl run waits for its machine's
        end whatever becomes of hosteld meanwhile; a subclass may end the wait by raising
        (guest run's client, when the hosteld that started its guest is gone)."""

    def _forward(self, path: str, signum: int) -> None:
        """SIGINT/SIGTERM (or the escape): the kill signal to PID 1 the first time, if the
        container has one; SIGKILL to all of it otherwise, as systemd-nspawn does."""
        self.signals_seen += 1
        machine = _name_of(path)
        kill_signal = 0
        if self.signals_seen == 1 and not (self.escape is not None and self.escape.escaped):
            kill_signal = self.client.get_property(path, "org.hostel1.Machine", "KillSignal")
        if kill_signal:
            print(HALTING, file=sys.stderr, flush=True)
            self.client.call(MACHINE_PATH, MACHINE_MANAGER, "KillMachine", "ssi", machine,
                             "leader", kill_signal)
        else:
            self.client.call(MACHINE_PATH, MACHINE_MANAGER, "KillMachine", "ssi", machine, "all",
                             int(signal.SIGKILL))


def _exit_status(queue: Any, path: str) -> tuple[int, int] | None:
    """(ExitStatus, ExitSignal) once the machine at `path` is reported exited."""
    while queue:
        msg = queue.popleft()
        if msg.path != path:
            continue
        _interface, changed, _invalidated = msg.body
        if changed.get("State", ("s", ""))[1] == "exited":
            return changed.get("ExitStatus", ("i", 1))[1], changed.get("ExitSignal", ("i", 0))[1]
    return None


def _name_of(path: str) -> str:
    """The machine's name from its object path (bus.escape_path_label, undone)."""
    label = path.rsplit("/", 1)[-1]
    out = bytearray()
    i = 0
    while i < len(label):
        if label[i] == "_" and i + 3 <= len(label):
            out.append(int(label[i + 1:i + 3], 16))
            i += 3
        else:
            out.append(ord(label[i]))
            i += 1
    return out.decode()


def _signal_name(signum: int) -> str:
    """systemd's signal_to_string: "KILL", "RTMIN+3", or the number."""
    if signal.SIGRTMIN <= signum <= signal.SIGRTMAX:
        return f"RTMIN+{signum - signal.SIGRTMIN}"
    import signal as signals  # only for this last line: its enum costs every run 3 ms

    try:
        return signals.Signals(signum).name.removeprefix("SIG")
    except ValueError:
        return str(signum)


class _EscapeRelay:
    """The terminal's input, relayed to a pty of ours whose slave hosteld reads as the
    caller's stdin (a terminal still: the console stays interactive, the window size is
    copied from it), watched for ^]^]^]; the output goes to the terminal directly."""

    def __init__(self) -> None:
        import fcntl
        import termios
        import threading
        import tty

        self.master, self.slave = os.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ,
                    fcntl.ioctl(0, termios.TIOCGWINSZ, b"\0" * 8))
        tty.setraw(self.slave)  # bytes pass as typed: the container's pty does the rest
        self.stop_r, self.stop_w = os.pipe2(os.O_CLOEXEC)
        self.escaped = False
        self.main_thread = threading.get_ident()  # made on the thread the signal must reach
        self.thread = threading.Thread(target=self._relay, name="escape-relay", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _relay(self) -> None:
        import select
        import time

        from hostel.machine.ptyrelay import EscapeDetector, write_all

        detector = EscapeDetector()
        while True:
            readable, _, _ = select.select([0, self.stop_r], [], [])
            if self.stop_r in readable:
                return
            data = os.read(0, 65536)
            if not data:
                return
            if detector.feed(data, time.monotonic()):
                self.escaped = True  # the main thread, interrupted, kills the container
                signal.pthread_kill(self.main_thread, signal.SIGINT)
                return
            write_all(self.master, data)

    def close(self) -> None:
        os.write(self.stop_w, b"x")
        if self.thread.is_alive():
            self.thread.join(timeout=5)
        for fd in (self.master, self.slave, self.stop_r, self.stop_w):
            os.close(fd)


class _RawTerminal:
    """The user's terminal in raw mode while a container owns it, restored afterwards."""

    def __init__(self) -> None:
        import termios

        self.saved = termios.tcgetattr(0)

    def enter(self) -> None:
        import termios
        import tty

        # TCSADRAIN, not setraw's default TCSAFLUSH: what was typed while the container
        # started is kept for it (hostelctl relays it now, after this switch).
        tty.setraw(0, termios.TCSADRAIN)

    def leave(self) -> None:
        import termios

        termios.tcsetattr(0, termios.TCSADRAIN, self.saved)
