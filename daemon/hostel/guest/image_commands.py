"""hostelctl image import | list | remove, and hostelctl guest run --image.

Imported by hostelctl at every start: standard library only, nothing heavy
(no dbus_fast, no asyncio); the client arrives as an argument."""
from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # importing typing costs hostelctl a few ms at every start
if TYPE_CHECKING:
    import argparse
    from typing import Any, Callable

GUEST_PATH = "/org/hostel1/guest"
MANAGER = "org.hostel1.GuestManager"
PROGRESS_INTERVAL = 0.1


def _human(size: int) -> str:
    for unit in ("B", "K", "M", "G"):
        if size < 1024 or unit == "G":
            return f"{size:.1f}{unit}" if unit != "B" else f"{size}B"
        size /= 1024
    return f"{size}B"


class _Progress:
    """A status line on the terminal while hosteld imports (nothing on a pipe).

    hosteld reports stages with the ImportProgress(s key, s stage, u done,
    u total) signal; the main thread, blocked in the call, files them into
    `queue`, and this thread draws the newest one with the elapsed time."""

    def __init__(self, what: str, key: str, queue: "Any") -> None:
        import threading

        self.what = what
        self.key = key
        self.queue = queue
        self.stage = ""
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import time

        start = time.monotonic()
        while not self.stop.wait(PROGRESS_INTERVAL):
            while self.queue:
                key, stage, done, total = self.queue.popleft().body
                if key == self.key:
                    self.stage = f" [{done}/{total}] {stage}"
            print(f"\r\033[K{self.what}:{self.stage} {time.monotonic() - start:.1f} s", end="",
                  file=sys.stderr, flush=True)

    def __enter__(self) -> "_Progress":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        print("\r\033[K", end="", file=sys.stderr, flush=True)


def _import(client: "Any", path: str, name: str) -> str:
    (imported,) = client.call(GUEST_PATH, MANAGER, "ImportImage", "ss", path, name)
    return imported


def cmd_import(args: "argparse.Namespace", client: "Any") -> int:
    path = os.path.abspath(args.path)
    name = args.name or ""
    if not sys.stderr.isatty():
        imported = _import(client, path, name)
    else:
        from hostel.client import MatchRule

        fields = dict(type="signal", interface=MANAGER, member="ImportProgress", path=GUEST_PATH)
        client.add_match(MatchRule(sender="org.hostel1", **fields))
        # Locally, signals carry hosteld's unique name, not org.hostel1: filter without it.
        with client.filter(MatchRule(**fields)) as queue, \
                _Progress(f"importing {path}", name or path, queue):
            imported = _import(client, path, name)
    print(f"imported {path} as image {imported}")
    return 0


def cmd_list(args: "argparse.Namespace", client: "Any") -> int:
    (images,) = client.call(GUEST_PATH, MANAGER, "ListImages")
    if images:
        print(f"{'IMAGE':<24} {'DIGEST':<19} {'SIZE':>8}")
        for name, digest, size in images:
            print(f"{name:<24} {digest[:19]:<19} {_human(size):>8}")
    print(f"\n{len(images)} images listed.")
    return 0


def cmd_remove(args: "argparse.Namespace", client: "Any") -> int:
    for name in args.names:
        client.call(GUEST_PATH, MANAGER, "RemoveImage", "s", name)
    return 0


def guest_settings(args: "argparse.Namespace") -> dict[str, tuple[str, "Any"]]:
    """StartGuest's a{sv} for an image, as (signature, value) pairs."""
    settings: dict[str, tuple[str, Any]] = {"Image": ("s", args.image),
                                            "Isolation": ("s", args.isolation)}
    command = list(args.rest)
    if command[:1] == ["--"]:
        command = command[1:]
    if command:
        settings["Command"] = ("as", command)
    if args.env:
        settings["Environment"] = ("as", list(args.env))
    if args.hostname:
        settings["Hostname"] = ("s", args.hostname)
    if os.environ.get("TERM"):
        settings["Terminal"] = ("s", os.environ["TERM"])
    return settings


def cmd_guest_run(args: "argparse.Namespace", client: "Any") -> int:
    from hostel.machine.runclient import RunSession

    class GuestRunSession(RunSession):
        """hostelctl run's waiting and signal forwarding, started through StartGuest."""

        def _start(self) -> str:
            (path,) = self.client.call(GUEST_PATH, MANAGER, "StartGuest", "sa{sv}", self.name,
                                       self.with_stdio())
            return path

        def _banner(self) -> None:
            print(f"Running image {args.image} in a {args.isolation}.", file=sys.stderr,
                  flush=True)

    return GuestRunSession(client, args.name or "", guest_settings(args), args.quiet).run()


def add_image_commands(sub: "argparse._SubParsersAction",
                       verb: "Callable[..., argparse.ArgumentParser]") -> None:
    """Add the image verbs to hostelctl's 'image' sub-parser."""
    imp = verb(sub, "import", "import a 'docker save' archive or an OCI image layout "
               "(directory or tar) as a squashfs image", cmd_import)
    imp.add_argument("path")
    imp.add_argument("--name", help="the image's name (default: from its tag)")
    verb(sub, "list", "list imported images", cmd_list)
    remove = verb(sub, "remove", "remove imported images", cmd_remove)
    remove.add_argument("names", nargs="+", metavar="NAME")


def add_guest_run(sub: "argparse._SubParsersAction",
                  verb: "Callable[..., argparse.ArgumentParser]") -> None:
    """Add 'run' to hostelctl's 'guest' sub-parser; it exits with the guest's status."""
    import argparse

    run = verb(sub, "run", "run an imported image with its command, or CMD", cmd_guest_run)
    run.add_argument("--image", required=True, metavar="NAME")
    run.add_argument("--env", "-E", action="append", metavar="K=V",
                     help="set an environment variable (repeatable)")
    run.add_argument("--hostname", metavar="H")
    run.add_argument("--name", "-M", metavar="NAME", help="the guest's name (default: hostname, "
                     "else the image's name)")
    run.add_argument("--isolation", choices=["container", "vm"], default="container")
    run.add_argument("--quiet", "-q", action="store_true")
    run.add_argument("rest", nargs=argparse.REMAINDER, metavar="CMD")
