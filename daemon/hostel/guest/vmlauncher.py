"""The launcher process of a guest with named console ports (`guest run --isolation=vm`).

`python -m hostel.guest.vmlauncher SETTINGS-JSON EXIT-FILE PORTS-JSON [CHANNEL]` is
hostel's launcher (launcher.py) with the multiport console a guest init
needs: PORTS-JSON lists [name, fd] pairs, descriptors hosteld left open
across exec, each the host end of one named virtio-console port (the
init's frame channel, the payload's stderr). The console (port 0) is
stdout and reads stdin, as for `guest launch`. It is a module of its own
because the plain launcher's command line has no ports to name.

CHANNEL names the port of the init's frames. A console has no end of input,
so stdin reaches the console through a pipe that counts the bytes, from the
init's "started" frame on: by then the init holds the channel open (Linux
drops what reaches a named port before) and has put the console in the mode
the payload gets (bytes arriving earlier would meet a cooked console, and be
echoed). At stdin's end {"type": "stdin-eof", "bytes": N} goes to the init
on that port's input, and the init closes the payload's stdin once N bytes
came through (guest-init/relay.h): `echo x | guest run ... -- cat` ends. The init's frames pass through on their way to
hosteld, and the exit frame's code, the payload's status, goes into EXIT-FILE
too: a hosteld that restarted meanwhile, and so lost the channel, still
learns how the run ended.

That relaying is a process of its own (ChannelRelay), forked before the
launcher starts a thread and jailed as the launcher is: the jail must be
entered by a single-threaded process, and the launcher's own threads start
only inside run_guest."""
from __future__ import annotations

import dataclasses
import json
import os
import select
import sys
from dataclasses import asdict

from hostel.guest import channel, jail
from hostel.guest.backend import GuestExit
from hostel.guest.console import Port
from hostel.guest.errors import GuestError
from hostel.guest.launcher import run_guest, settings_from_json
from hostel.guest.settings import GuestSettings


def ports_to_json(ports: list[tuple[str, int]]) -> str:
    return json.dumps([[name, fd] for name, fd in ports])


def ports_from_json(text: str) -> list[Port]:
    """The ports hosteld passed; anything else is a bug in hosteld, said plainly."""
    raw = json.loads(text)
    if not isinstance(raw, list) or not all(
            isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) and
            isinstance(p[1], int) for p in raw):
        raise GuestError(f"the launcher's ports must be [name, fd] pairs, not {text!r}")
    return [Port(name, fd) for name, fd in raw]


class ChannelRelay:
    """The forked relay: stdin -> the console (counted), the guest's frames -> hosteld
    (the exit code kept), and stdin-eof -> the guest. Its descriptors, by role:"""

    def __init__(self, stdin: int, to_hosteld: int) -> None:
        self.stdin, self.to_hosteld = stdin, to_hosteld
        self.console_r, self.console_w = os.pipe2(os.O_CLOEXEC)     # console's input
        self.into_guest_r, self.into_guest_w = os.pipe2(os.O_CLOEXEC)   # channel's input
        self.from_guest_r, self.from_guest_w = os.pipe2(os.O_CLOEXEC)   # channel's output
        self.result_r, self.result_w = os.pipe2(os.O_CLOEXEC)       # the exit code, at the end
        self.pid = 0

    def ports(self, ports: list[Port], channel_port: str) -> list[Port]:
        return [dataclasses.replace(p, output_fd=self.from_guest_w, input_fd=self.into_guest_r)
                if p.name == channel_port else p for p in ports]

    def start(self, jail_settings: jail.JailSettings) -> None:
        self.pid = os.fork()
        if self.pid == 0:
            code = 1
            try:
                for fd in (self.console_r, self.into_guest_r, self.from_guest_w, self.result_r):
                    os.close(fd)
                jail.enter(jail_settings)
                self._serve()
                code = 0
            finally:
                os._exit(code)
        for fd in (self.console_w, self.into_guest_w, self.from_guest_r, self.to_hosteld,
                   self.result_w):
            os.close(fd)

    def finish(self) -> int | None:
        """After the guest ended (the devices' copies closed): the exit frame's code. The
        relay is not waited for (wait4 is not in the jail's system calls): the result pipe
        ends when it does, and it dies with this pid namespace's init, the launcher."""
        os.close(self.from_guest_w)
        text = b""
        while part := os.read(self.result_r, 64):
            text += part
        os.close(self.result_r)
        return int(text) if text.strip().lstrip(b"-").isdigit() else None

    # In the forked process -------------------------------------------------------------

    def _serve(self) -> None:
        os.set_blocking(self.console_w, False)
        pending, frames, total = b"", b"", 0
        started = eof_sent = False
        exit_code: int | None = None
        while self.from_guest_r >= 0:
            reading = started and self.stdin >= 0 and not pending
            readers = [self.from_guest_r] + ([self.stdin] if reading else [])
            writers = [self.console_w] if pending else []
            readable, writable, _ = select.select(readers, writers, [])
            if self.stdin in readable:
                pending = self._read(self.stdin)
                total += len(pending)
                if not pending:
                    self.stdin = -1
            if writable:
                pending = pending[self._write_some(self.console_w, pending):]
            if self.from_guest_r in readable:
                data = self._read(self.from_guest_r)
                if not data:
                    os.close(self.from_guest_r)
                    self.from_guest_r = -1
                frames, types = self._pass_frames(frames + data)
                started = started or "started" in types
                exit_code = types.get("exit", exit_code)
            if self.stdin < 0 and not pending and started and not eof_sent:
                os.close(self.console_w)
                self._send_eof(total)
                eof_sent = True
        os.write(self.result_w, b"" if exit_code is None else str(exit_code).encode())

    @staticmethod
    def _read(fd: int) -> bytes:
        try:
            return os.read(fd, 65536)
        except OSError:
            return b""   # a broken input ends like a finished one

    @staticmethod
    def _write_some(fd: int, data: bytes) -> int:
        try:
            return os.write(fd, data)
        except BlockingIOError:
            return 0
        except OSError:
            return len(data)   # the guest is gone: nobody reads stdin any more

    def _pass_frames(self, data: bytes) -> tuple[bytes, dict[str, int | None]]:
        """Whole frames go on to hosteld (while it is there); the rest of `data`, and the
        types of the frames passed with the exit frame's code (None for the others)."""
        types: dict[str, int | None] = {}
        while len(data) >= 4:
            length = int.from_bytes(data[:4], "big")
            if length > channel.MAX_FRAME or len(data) < 4 + length:
                break
            frame, data = data[:4 + length], data[4 + length:]
            try:
                message = channel.decode(frame[4:])
            except channel.ChannelError:
                message = {}
            kind = message.get("type")
            if isinstance(kind, str):
                code = message.get("code")
                types[kind] = code if kind == "exit" and isinstance(code, int) else None
            self._forward(frame)
        return data, types

    def _forward(self, frame: bytes) -> None:
        if self.to_hosteld < 0:
            return
        try:
            while frame:
                frame = frame[os.write(self.to_hosteld, frame):]
        except OSError:   # hosteld is gone (restarting): the exit file keeps the end
            os.close(self.to_hosteld)
            self.to_hosteld = -1

    def _send_eof(self, total: int) -> None:
        try:
            channel.write_frame(self.into_guest_w, {"type": "stdin-eof", "bytes": total})
        except OSError:
            pass  # the guest ended first: nobody waits for the frame


def run_vm(settings: GuestSettings, ports: list[Port], channel_port: str | None) -> GuestExit:
    """run_guest, with the channel relayed (ChannelRelay) when there is a channel."""
    stdin, relay = sys.stdin.fileno(), None
    channel_fd = next((p.output_fd for p in ports if p.name == channel_port), None)
    if channel_port is not None and channel_fd is not None:
        relay = ChannelRelay(stdin, channel_fd)
        ports = relay.ports(ports, channel_port)
        try:
            relay.start(jail.settings_for(settings.username, settings.chroot))
        except GuestError as e:
            return GuestExit("error", 1, str(e))
        stdin = relay.console_r
    result = run_guest(settings, sys.stdout.fileno(), stdin, ports)
    code = relay.finish() if relay is not None else None
    if result.reason == "poweroff" and code is not None:
        result = dataclasses.replace(result, code=code)
    return result


def main(argv: list[str]) -> int:
    settings = settings_from_json(argv[0])
    with open(argv[1], "w") as exit_file:
        try:
            ports = ports_from_json(argv[2])
        except (GuestError, ValueError) as e:
            result = GuestExit("error", 1, str(e))
        else:
            result = run_vm(settings, ports, argv[3] if len(argv) > 3 else None)
        exit_file.write(json.dumps(asdict(result)))
    return result.code if result.reason == "poweroff" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
