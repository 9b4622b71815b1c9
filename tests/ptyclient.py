"""A hostelctl command on a pty of its own, as on a user's terminal (the console tests)."""
from __future__ import annotations

import os
import select
import subprocess
import termios
import time

from conftest import HOSTELCTL

ESCAPE = b"\x1d\x1d\x1d"  # ^]^]^], systemd-nspawn's and machinectl's


class OnPty:
    """A hostelctl command on a pty of its own, as on a user's terminal."""

    def __init__(self, address: str, *args: str, env: dict[str, str] | None = None) -> None:
        self.master, self.slave = os.openpty()
        self.before = termios.tcgetattr(self.slave)
        self.output = b""
        self.proc = subprocess.Popen([HOSTELCTL, *args], stdin=self.slave, stdout=self.slave,
                                     stderr=self.slave, start_new_session=True,
                                     env={**os.environ, **(env or {}),
                                          "DBUS_SYSTEM_BUS_ADDRESS": address})

    def read_until(self, wanted: bytes, timeout: float = 30) -> bytes:
        deadline = time.monotonic() + timeout
        while wanted not in self.output:
            left = deadline - time.monotonic()
            assert left > 0, f"{wanted!r} never came; the terminal shows {self.output!r}"
            if select.select([self.master], [], [], min(left, 0.5))[0]:
                try:
                    self.output += os.read(self.master, 4096)
                except OSError:  # EIO: no process has the terminal open any more
                    assert wanted in self.output, (wanted, self.output)
        return self.output

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def wait(self, timeout: float = 15) -> int:
        code = self.proc.wait(timeout=timeout)
        while select.select([self.master], [], [], 0.2)[0]:
            try:
                data = os.read(self.master, 4096)
            except OSError:
                break
            if not data:
                break
            self.output += data
        return code

    def terminal_restored(self) -> bool:
        return termios.tcgetattr(self.slave) == self.before

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)
        os.close(self.slave)
