"""The man pages and the bash completion cover every option the code parses, render with
man-db, and complete in a real bash."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hostel import docs


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("docs")
    subprocess.run([sys.executable, "-m", "hostel.docs", str(out)], check=True, timeout=60)
    return out


def _source(page: Path) -> str:
    """A page's roff with its hyphen escapes undone, to look options up in."""
    return page.read_text().replace("\\-", "-")


def _rendered(page: Path) -> str:
    result = subprocess.run(["man", "--warnings", "-l", str(page)], capture_output=True,
                            text=True, env={"MANWIDTH": "200", "PATH": "/usr/bin:/bin",
                                            "MANPAGER": "cat", "LANG": "C.UTF-8"}, timeout=60)
    assert result.returncode == 0 and not result.stderr, result.stderr
    return result.stdout


def test_every_hostelctl_option_is_in_the_man_page(built: Path) -> None:
    page = _source(built / "hostelctl.1")
    verbs = docs.hostelctl_verbs()
    assert len(verbs) > 20
    names = [name for verb in verbs for flag in verb.flags for name in flag.names]
    for name in ["--no-legend", "--value", "--property", "--uid", "--setenv", "--network-veth",
                 "--private-users", "--kill-whom", "--key-file", "--version"]:
        assert name in names, name  # the tables hold what the code takes
    for verb in verbs[1:]:
        assert f"hostelctl {verb.path}" in page or f'"{verb.path} ' in page, verb.path
        for flag in verb.flags:
            for name in flag.names:
                assert name in page, (verb.path, name)
    text = _rendered(built / "hostelctl.1")
    assert "HOSTELCTL(1)" in text and "EXIT STATUS" in text and "requires root" in text


def test_hosteld_and_generator_pages(built: Path) -> None:
    from hostel import daemon

    page = _source(built / "hosteld.8")
    for action in daemon.build_parser()._actions:
        for name in action.option_strings:
            assert name in page, name
    assert "HOSTELD(8)" in _rendered(built / "hosteld.8")
    text = _rendered(built / "hostel-cryptsetup-generator.8")
    assert "HOSTEL-CRYPTSETUP-GENERATOR(8)" in text and "crypttab" in text


def test_help_texts_are_expanded_as_help_prints_them(built: Path) -> None:
    """argparse fills in %(default)s only when it prints --help; a page built from
    the raw text showed the placeholder to readers."""
    for page in ("hostelctl.1", "hosteld.8"):
        assert "%(" not in _source(built / page), page
    assert "virtual CPUs (default: 1)" in _source(built / "hostelctl.1")


def _complete(script: Path, *words: str) -> list[str]:
    """What the completion offers for the last word, in a real bash."""
    code = ('source "$0"; COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); _hostelctl; '
            'printf "%s\\n" "${COMPREPLY[@]}"')
    result = subprocess.run(["/bin/bash", "-c", code, str(script), "hostelctl", *words],
                            capture_output=True, text=True, timeout=30,
                            env={"PATH": "/nonexistent", "DBUS_SYSTEM_BUS_ADDRESS":
                                 "unix:path=/nonexistent"})
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if line]


def test_completion_completes_verbs_and_every_option(built: Path) -> None:
    script = built / "hostelctl.bash"
    registered = subprocess.run(["bash", "-c", f'source "{script}"; complete -p hostelctl'],
                                capture_output=True, text=True, check=True).stdout
    assert registered.strip() == "complete -F _hostelctl hostelctl"
    assert _complete(script, "cry") == ["cryptsetup"]
    assert set(_complete(script, "")) >= {"run", "list", "shell", "image", "guest"}
    assert _complete(script, "image", "") == ["import", "pull", "inspect", "list", "remove"]
    assert _complete(script, "list", "-o", "") == ["short", "json", "json-pretty"]
    for verb in docs.hostelctl_verbs():
        offered = set(_complete(script, *verb.words, "-"))
        assert offered == {name for flag in verb.flags for name in flag.names}, verb.path


def test_checked_in_nothing_generated() -> None:
    """The pages exist only as generated: nobody can edit a copy that drifts."""
    repo = Path(__file__).resolve().parents[2]
    tracked = subprocess.run(["git", "-C", str(repo), "ls-files"], capture_output=True,
                             text=True, check=True).stdout.split()
    assert not [path for path in tracked if path.endswith((".1", ".8", ".bash"))]
