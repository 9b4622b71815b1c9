"""How the launcher process reports a failure that is no GuestError.

A GuestError already names its file or device and what to do. Anything else
(an OSError nobody wrapped, a kernel image larger than memory, a compiled
extension out of step with its Python code, or a plain bug) would otherwise
end the launcher with a traceback on the guest's console, which is the
terminal of `hostelctl guest launch`. Here it becomes one line saying what
failed and what to do, with exit code 1 (hostelctl's "failure"); the
traceback is kept in the exit record for developers (hosteld logs it), so
that a bug is reported, not hidden."""
from __future__ import annotations

import traceback
from dataclasses import dataclass

from hostel.guest.backend import GuestExit

EXIT_CODE = 1
TRACEBACK_HINT = "the traceback is in hosteld's log"


@dataclass(frozen=True)
class FailedExit(GuestExit):
    """A GuestExit that carries the traceback of the failure (the exit record's
    "traceback" key), for hosteld's log rather than the user's console."""

    traceback: str = ""


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _from_extension(error: BaseException) -> bool:
    """Whether the error comes from hostel's compiled extension missing a name or
    failing to load: the extension was built from other sources than the Python."""
    if isinstance(error, AttributeError):
        lib = getattr(error, "obj", None)
        return type(lib).__module__ == "_cffi_backend"
    if isinstance(error, ImportError):
        return (error.name or "").startswith("hostel._")
    return False


def describe(error: BaseException) -> str:
    """The line the user reads: what failed, and what to do about it."""
    what = _one_line(f"{type(error).__name__}: {error}")
    if isinstance(error, MemoryError):
        return ("the launcher ran out of memory setting up the guest (is the kernel or initrd "
                "larger than this host's memory?): give it smaller files")
    if _from_extension(error):
        return (f"hostel's compiled extension does not match its Python code ({what}): "
                "rebuild and reinstall hostel (make venv), then launch again")
    if isinstance(error, OSError):
        subject = f" on {error.filename}" if error.filename else ""
        reason = _one_line(error.strerror or str(error))
        return (f"the launcher failed{subject}: {reason}; check that file or device and "
                f"launch again ({TRACEBACK_HINT})")
    return f"the launcher failed on a bug ({what}): please report it; {TRACEBACK_HINT}"


def failed_exit(error: BaseException) -> FailedExit:
    """The exit record of a launcher that failed on `error` (not a GuestError)."""
    text = "".join(traceback.format_exception(error))
    return FailedExit("error", EXIT_CODE, describe(error), text)
