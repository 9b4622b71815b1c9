"""The guest launcher is a process of its own: it must not drag in the D-Bus
stack (dbus_fast, and asyncio under it) it never uses."""
from __future__ import annotations

import subprocess
import sys

HEAVY = ("asyncio", "dbus_fast")
# Everything the launcher process imports, the lazily imported backend included.
LAUNCHER_MODULES = ("hostel.guest.launcher", "hostel.guest.kvm", "hostel.guest.errors")


def loaded_after_import(modules: tuple[str, ...]) -> set[str]:
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules) +
            "print('\\n'.join(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout
    return set(out.split())


def test_launcher_imports_neither_asyncio_nor_dbus_fast() -> None:
    loaded = loaded_after_import(LAUNCHER_MODULES)
    assert not {m for m in loaded if m.split(".")[0] in HEAVY}


def test_bus_still_reexports_the_errors() -> None:
    from hostel import bus, errors

    assert bus.HostelError is errors.HostelError
    assert bus.InvalidArgs is errors.InvalidArgs
    from hostel.guest.errors import GuestError
    assert issubclass(GuestError, bus.HostelError)
