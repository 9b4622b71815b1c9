"""Relay a pty master to this process's terminal (hostelctl shell), as machinectl does."""
from __future__ import annotations

import os
import select
import sys


def relay(master: int) -> None:
    """Copy between stdin/stdout and `master` until the far side hangs up (EIO/EOF)."""
    tty = sys.stdin.isatty()
    saved = None
    if tty:
        import termios
        import tty as ttymod

        saved = termios.tcgetattr(0)
        ttymod.setraw(0)
    sources = [master, 0]
    try:
        while True:
            readable, _, _ = select.select(sources, [], [])
            if master in readable:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every slave closed, the session is over
                    return
                if not data:
                    return
                os.write(1, data)
            if 0 in readable:
                data = os.read(0, 65536)
                if data:
                    os.write(master, data)
                else:
                    sources.remove(0)
    finally:
        os.close(master)
        if saved is not None:
            import termios

            termios.tcsetattr(0, termios.TCSADRAIN, saved)
