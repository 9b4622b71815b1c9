"""Run a launcher to the guest's end in a test, bounded in time."""
from __future__ import annotations

import threading

from hostel.guest.backend import GuestExit
from hostel.guest.launcher import Launcher


def run_to_end(launcher: Launcher, timeout: float) -> GuestExit:
    """Run the guest, stopping it after `timeout` seconds (a hang then fails the
    test as "stopped" rather than blocking the suite); always closes the launcher."""
    watchdog = threading.Timer(timeout, launcher.stop)
    watchdog.start()
    try:
        return launcher.run()
    finally:
        watchdog.cancel()
        launcher.close()
