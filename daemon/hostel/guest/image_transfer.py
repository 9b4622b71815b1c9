"""hostelctl's side of an image import or pull: the progress line, and Ctrl-C.

hosteld does the work; the client waits in one D-Bus call. Two things happen
meanwhile:
- on a terminal, a status line on stderr shows the stage, bytes done of bytes
  in all, the rate and the time left, from hosteld's ImportProgress(s key,
  s stage, t done, t total) signals (nothing is drawn when stderr is a pipe);
- the call carries the read end of a pipe only this process writes
  ("ClientAlive"). Ctrl-C closes the write end: hosteld sees the hang-up,
  cancels the transfer (skopeo killed, staging removed) and answers
  org.hostel1.Error.Cancelled; the client exits 130. A second Ctrl-C leaves
  at once (cli.main turns it into "interrupted", exit 130). If the client
  dies, the pipe closes all the same, so nothing is left behind either way.

Standard library only, imported lazily by the image verbs."""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections import deque

TYPE_CHECKING = False  # importing typing costs hostelctl a few ms at every start
if TYPE_CHECKING:
    from typing import Any

GUEST_PATH = "/org/hostel1/guest"
MANAGER = "org.hostel1.GuestManager"
CANCELLED = "org.hostel1.Error.Cancelled"
PROGRESS_INTERVAL = 0.2   # seconds between two redraws
RATE_WINDOW = 3.0         # seconds of samples the rate is averaged over
EXIT_INTERRUPTED = 130


class Interrupted(Exception):
    """Ctrl-C cancelled the transfer: hosteld kept nothing. The message says so."""


def human_bytes(size: float) -> str:
    for unit in ("B", "K", "M", "G", "T"):
        if size < 1024 or unit == "T":
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return f"{size:.1f}T"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
    return f"{seconds // 60}:{seconds % 60:02d}"


class Rate:
    """Bytes per second over the last RATE_WINDOW seconds of samples."""

    def __init__(self) -> None:
        self.samples: deque[tuple[float, int]] = deque()

    def add(self, now: float, done: int) -> float:
        self.samples.append((now, done))
        while len(self.samples) > 2 and now - self.samples[0][0] > RATE_WINDOW:
            self.samples.popleft()
        first_time, first_done = self.samples[0]
        return (done - first_done) / (now - first_time) if now > first_time else 0.0


def progress_line(what: str, stage: str, done: int, total: int, rate: float,
                  elapsed: float) -> str:
    """`pulling X: downloading 12.0M/40.0M 30% 4.0M/s ETA 0:07` (no total: no %, no ETA)."""
    parts = [f"{what}:", stage] if stage else [f"{what}:"]
    if total:
        shown = min(done, total)
        parts += [f"{human_bytes(shown)}/{human_bytes(total)}", f"{100 * shown // total}%"]
    elif done:
        parts.append(human_bytes(done))
    if rate > 0:
        parts.append(f"{human_bytes(rate)}/s")
        if total and done < total:
            parts.append(f"ETA {_duration((total - done) / rate)}")
    parts.append(_duration(elapsed))
    return " ".join(parts)


class ProgressLine:
    """Draws the newest report for `key` from `queue` (filled by the main thread's
    client while it waits for the call) until the call returns. Every stage is drawn
    at least once, even one that began and ended between two redraws (a small image's
    squashfs takes less than PROGRESS_INTERVAL), so the line never skips a step."""

    def __init__(self, what: str, key: str, queue: "Any") -> None:
        self.what = what
        self.key = key
        self.queue = queue
        self.stage, self.done, self.total = "", 0, 0
        self.rate = Rate()
        self.speed = 0.0
        self.start = time.monotonic()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _draw(self) -> None:
        line = progress_line(self.what, self.stage, self.done, self.total, self.speed,
                             time.monotonic() - self.start)
        print(f"\r\033[K{line}", end="", file=sys.stderr, flush=True)

    def _take_reports(self) -> None:
        """The queued reports in order; a new stage is drawn as it comes."""
        while self.queue:
            key, stage, done, total = self.queue.popleft().body
            if key != self.key:
                continue
            new_stage = stage != self.stage
            if new_stage:
                self.rate = Rate()   # each stage has its own pace
                self.speed = 0.0
            self.stage, self.done, self.total = stage, done, total
            if new_stage:
                self._draw()

    def _run(self) -> None:
        while not self.stop.wait(PROGRESS_INTERVAL):
            self._take_reports()
            self.speed = self.rate.add(time.monotonic(), self.done)
            self._draw()

    def __enter__(self) -> "ProgressLine":
        self.start = time.monotonic()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self._take_reports()   # stages that came after the last redraw
        print("\r\033[K", end="", file=sys.stderr, flush=True)


class _Canceller:
    """SIGINT closes the ClientAlive pipe's write end (once); a second SIGINT raises
    KeyboardInterrupt, which hostelctl reports as "interrupted" (exit 130)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.read_end, self.write_end = os.pipe()
        self.interrupted = False

    def __call__(self, _signum: int, _frame: object) -> None:
        if self.interrupted:
            raise KeyboardInterrupt
        self.interrupted = True
        os.close(self.write_end)
        print(f"\r\033[K{self.what}: cancelling (Ctrl-C again to leave at once)",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        os.close(self.read_end)
        if not self.interrupted:
            os.close(self.write_end)


def run_transfer(client: "Any", what: str, key: str, member: str, signature: str,
                 args: tuple["Any", ...], options: dict[str, tuple[str, "Any"]]) -> "Any":
    """Call `member` with `args` and `options` (to which ClientAlive is added), with a
    progress line on a terminal; the call's single result, or Interrupted."""
    from hostel.client import CallFailed, MatchRule

    canceller = _Canceller(what)
    options = dict(options, ClientAlive=("h", canceller.read_end))
    previous = signal.signal(signal.SIGINT, canceller)
    try:
        try:
            if not sys.stderr.isatty():
                (result,) = client.call(GUEST_PATH, MANAGER, member, signature, *args, options)
            else:
                fields = dict(type="signal", interface=MANAGER, member="ImportProgress",
                              path=GUEST_PATH)
                client.add_match(MatchRule(sender="org.hostel1", **fields))
                # Locally, signals carry hosteld's unique name, not org.hostel1.
                with client.filter(MatchRule(**fields)) as queue, \
                        ProgressLine(what, key, queue):
                    (result,) = client.call(GUEST_PATH, MANAGER, member, signature, *args,
                                            options)
        except CallFailed as e:
            if canceller.interrupted and e.name == CANCELLED:
                raise Interrupted("interrupted; hosteld cancelled it and kept nothing") \
                    from None
            raise
    finally:
        signal.signal(signal.SIGINT, previous)
        canceller.close()
    if canceller.interrupted:
        raise Interrupted(f"interrupted, but hosteld had finished already: it kept {result}")
    return result
