"""hostelctl run's option parser against glibc's getopt_long, which systemd-nspawn uses.

The oracle is util-linux getopt(1), a thin shell over glibc's getopt_long: the
same option table goes to both, and both must agree on every command line,
errors included (glibc's own wording)."""
from __future__ import annotations

import shlex
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostel.machine import cmdline
from hostel.machine.options import BY_KEY

SHORT_SPEC = "+" + "".join(opt.short + (":" if cmdline._takes_value(opt) else "")
                           for opt in cmdline._SHORT.values())
LONG_SPEC = ",".join(name + ("::" if opt.optional_value is not None
                             else ":" if cmdline._takes_value(opt) else "")
                     for name, opt in cmdline._LONG.items())


def oracle(argv: list[str]) -> tuple[list[tuple[str, str | None]], list[str]] | str:
    """getopt(1)'s reading: (options by key with values, command), or its first error."""
    result = subprocess.run(["getopt", "-o", SHORT_SPEC, "-l", LONG_SPEC, "-n", cmdline.PROG,
                             "--", *argv], capture_output=True, text=True)
    if result.returncode != 0:
        return result.stderr.splitlines()[0].removeprefix(f"{cmdline.PROG}: ")
    words = shlex.split(result.stdout)
    options: list[tuple[str, str | None]] = []
    i = 0
    while words[i] != "--":
        opt = (cmdline._LONG[words[i][2:]] if words[i].startswith("--")
               else cmdline._SHORT[words[i][1:]])
        if cmdline._takes_value(opt):
            value = words[i + 1] or opt.optional_value  # getopt shows a bare optional as ''
            options.append((opt.key, value))
            i += 2
        else:
            options.append((opt.key, None))
            i += 1
    return options, words[i + 1:]


def ours(argv: list[str]) -> tuple[list[tuple[str, str | None]], list[str]] | str:
    try:
        parsed = cmdline.parse(argv)
    except cmdline.UsageError as e:
        return str(e)
    return [(opt.key, value) for opt, value in parsed.given], parsed.command


WORDS = ["-D", "/srv/a", "-qb", "-Dx", "-xqbi", "-M", "name", "--dir", "--dir=/x", "--directory",
         "--net", "--network-veth", "--network-veth=1", "--volatile", "--volatile=state",
         "--private", "--private-users", "--private-users=pick", "--bind", "--bind-ro=/a:/b",
         "--b", "--bi", "--keep", "--read-only", "-j", "-h", "--help", "--he", "--", "-", "cmd",
         "--quiet=1", "-k", "--bogus", "with space", "it's", "--setenv", "A=1", "-u", "-q",
         "--capability=CAP_A,CAP_B", "--=x", "--tmpfs=/t:mode=1777", "--bogus=1", "--priv=x",
         "-qj", "-bq-"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(WORDS), max_size=8))
def test_agrees_with_getopt_long(argv: list[str]) -> None:
    assert ours(argv) == oracle(argv)


@pytest.mark.parametrize("argv, message", [
    (["--bogus"], "unrecognized option '--bogus'"),
    (["-k"], "invalid option -- 'k'"),
    (["-D"], "option requires an argument -- 'D'"),
    (["--directory"], "option '--directory' requires an argument"),
    (["--quiet=yes"], "option '--quiet' doesn't allow an argument"),
    (["--private"], "option '--private' is ambiguous; possibilities: "
                    "'--private-network' '--private-users' '--private-users-ownership'"),
])
def test_errors_use_getopts_words(argv: list[str], message: str) -> None:
    with pytest.raises(cmdline.UsageError) as error:
        cmdline.parse(argv)
    assert str(error.value) == message
    assert oracle(argv) == message


def test_values_by_settings_key() -> None:
    parsed = cmdline.parse(["-qD", "/srv", "--bind=/a", "--bind", "/b:/c", "--volatile",
                            "--machine=m1", "-M", "m2", "/bin/sh", "-c", "echo -q"])
    assert parsed.values() == {"Quiet": True, "Directory": "/srv", "Bind": ["/a", "/b:/c"],
                               "Volatile": "yes", "Machine": "m2"}
    assert parsed.command == ["/bin/sh", "-c", "echo -q"]


def test_help_lists_every_option() -> None:
    text = cmdline.usage()
    for key, opt in BY_KEY.items():
        assert f"--{opt.long}" in text, key
        if opt.short:
            assert f"-{opt.short} --{opt.long}" in text, key
    assert "\n  -j " in text
