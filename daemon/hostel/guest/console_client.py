"""`hostelctl guest console NAME`: a running guest's console on this terminal.

As `machinectl login` does for a machine: the console's output is relayed to
this terminal and what is typed reaches the console (a VM's hvc0, a
container's pty); ^]^]^] (Ctrl-] three times within a second) detaches and
leaves the guest running, where the same keys on the terminal of the client
that started the guest end it. The guest ending closes the console and ends
this client. Off a terminal, the end of standard input detaches (once what
was read has been sent), so a script that pipes a line in does not hang.

hostelctl makes a socket pair and passes one end to AttachConsole; hosteld's
relay writes the console's output to it and reads its input from it. Standard
library only, as everything hostelctl imports at start."""
from __future__ import annotations

import os
import select
import signal
import socket
import sys
import time

TYPE_CHECKING = False  # importing typing costs hostelctl a few ms at every start
if TYPE_CHECKING:
    import argparse
    from typing import Any

MANAGER_PATH = "/org/hostel1/guest"
MANAGER = "org.hostel1.GuestManager"
CHUNK = 65536


class _Detached(Exception):
    """SIGINT/SIGTERM off a terminal: leave the console, not the guest."""


def _detach_on_signal(_signum: int, _frame: object) -> None:
    raise _Detached


def cmd_console(args: "argparse.Namespace", client: "Any") -> int:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.call(MANAGER_PATH, MANAGER, "AttachConsole", "sh", args.name, theirs.fileno())
    finally:
        theirs.close()
    tty = os.isatty(0)
    if tty:
        print(f"Connected to the console of guest {args.name}. "
              "Press ^] three times within 1s to detach.", file=sys.stderr, flush=True)
    previous = {s: signal.signal(s, _detach_on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        last = relay(ours, tty)
    except _Detached:
        last = b"\n"
    finally:
        ours.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if tty:
        print(("" if last in (b"", b"\n") else "\n") +
              f"Connection to the console of guest {args.name} terminated.",
              file=sys.stderr, flush=True)
    return 0


def relay(sock: socket.socket, tty: bool) -> bytes:
    """Copy the console to stdout and stdin to the console until the console closes,
    ^]^]^] is typed (on a terminal) or stdin ends (off one). Returns the last byte
    written to stdout (b"" if none), so the closing line can start on a line of its own."""
    from hostel.machine.ptyrelay import EscapeDetector, write_all

    saved = None
    if tty:
        import termios
        import tty as ttymod

        saved = termios.tcgetattr(0)
        ttymod.setraw(0, termios.TCSADRAIN)
    escape = EscapeDetector() if tty else None
    last = b""
    console = sock.fileno()
    try:
        while True:
            readable, _, _ = select.select([console, 0], [], [])
            if console in readable:
                data = sock.recv(CHUNK)
                if not data:  # the guest ended: hosteld closed the console
                    return last
                try:
                    write_all(1, data)
                except BrokenPipeError:  # nobody reads our output any more
                    return last
                last = data[-1:]
            if 0 in readable:
                data = os.read(0, CHUNK)
                if escape is not None and escape.feed(data, time.monotonic()):
                    return last
                if not data:
                    return last
                sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):  # hosteld let go of the console
        return last
    finally:
        if saved is not None:
            import termios

            termios.tcsetattr(0, termios.TCSADRAIN, saved)
