"""launcher_failure.describe: one line per kind of failure, naming what to do."""
from __future__ import annotations

import errno

import pytest

from hostel._native import lib
from hostel.guest import launcher_failure


def raised(action) -> BaseException:
    with pytest.raises(Exception) as info:
        action()
    return info.value


def test_a_name_missing_from_the_compiled_extension_says_rebuild() -> None:
    error = raised(lambda: lib.hostel_no_such_function)  # a real cffi lib's AttributeError
    line = launcher_failure.describe(error)
    assert "compiled extension does not match" in line and "make venv" in line
    assert "hostel_no_such_function" in line


def test_an_extension_that_does_not_load_says_rebuild() -> None:
    error = ImportError("undefined symbol: hostel_x", name="hostel._vmm")
    assert "make venv" in launcher_failure.describe(error)


def test_an_os_error_names_its_file_in_one_line() -> None:
    error = OSError(errno.EACCES, "Permission\ndenied", "/dev/kvm")
    line = launcher_failure.describe(error)
    assert line.startswith("the launcher failed on /dev/kvm: Permission denied; check that file")
    assert "\n" not in line


def test_anything_else_is_called_a_bug_and_keeps_its_traceback() -> None:
    error = raised(lambda: {}["key"])
    result = launcher_failure.failed_exit(error)
    assert result.reason == "error" and result.code == 1
    assert result.detail == ("the launcher failed on a bug (KeyError: 'key'): please report it; "
                             "the traceback is in hosteld's log")
    assert result.traceback.startswith("Traceback") and "KeyError" in result.traceback


def test_an_unrelated_attribute_error_is_a_bug_not_the_extension() -> None:
    error = raised(lambda: object().missing)  # type: ignore[attr-defined]
    assert "a bug" in launcher_failure.describe(error)
