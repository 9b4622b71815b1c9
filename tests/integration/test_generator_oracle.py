"""hostel-cryptsetup-generator against systemd's own generator, the oracle.

Every case in tests/cryptsetup-cases must produce the same tree and the same
success or failure; hypothesis then generates plausible crypttabs and command
lines and compares again.  Generated units must also pass
`systemd-analyze verify`.  The oracle comes with Debian's `systemd` package,
which `make setup` installs: its absence is a failure, not a skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from generator_compare import CASES, compare

ORACLE = Path("/usr/lib/systemd/system-generators/systemd-cryptsetup-generator")


@pytest.fixture(scope="module", autouse=True)
def oracle_present() -> None:
    assert ORACLE.is_file(), f"{ORACLE} is missing: run `make setup` (Debian's systemd package ships it)"


@pytest.fixture(scope="module")
def candidate() -> str:
    """The checkout's generator (the venv's console script), never one installed on PATH."""
    script = Path(sys.executable).parent / "hostel-cryptsetup-generator"
    assert script.is_file(), f"{script} is missing: run `make setup`"
    return str(script)


def _compare(candidate: str, case: Path, work: Path) -> None:
    diff = compare(str(ORACLE), candidate, case, work / "w")
    assert not diff, "".join(diff)


@pytest.mark.parametrize("case", sorted(p for p in CASES.iterdir() if p.is_dir()),
                         ids=lambda p: p.name)
def test_case_matches_oracle(case: Path, candidate: str, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a relative RUNTIME_DIRECTORY must land here
    _compare(candidate, case, tmp_path)


# --- differential testing with generated inputs ---------------------------------------

UUIDS = ["deadbeef-0000-1111-2222-333344445555", "11111111222233334444555555555555",
         "CAFEBABE-0000-1111-2222-333344445555"]
name_text = st.text(alphabet=st.sampled_from("ab-_.\\%:@xé\x7f#'"), min_size=1, max_size=12)
device = st.one_of(
    st.sampled_from(["/dev/sda1", "/dev//mapper/../x", "/var/lib/img.raw", "disk.img", "/dev/null",
                     "PARTLABEL=p q", "LABEL='quoted'", "/dev/disk/by-uuid/" + UUIDS[0]]),
    st.sampled_from(UUIDS).map(lambda u: "UUID=" + u),
    name_text.map(lambda s: "/dev/disk/by-label/" + s.replace(" ", "")))
key = st.sampled_from(["-", "none", "/dev/urandom", "/dev/null", "/etc/k.key", "rel.key",
                       "/k:LABEL=usb", "/a:b", "/k%i:/dev/sdk", ":/dev/sdk", "/dev/sdk"])
option = st.one_of(
    st.sampled_from(["luks", "discard", "noauto", "auto", "nofail", "fail", "swap", "tmp", "tmp=xfs",
                     "_netdev", "x-initrd.attach", "keyfile-timeout=5s", "keyfile-timeout=bad",
                     "x-systemd.device-timeout=10", "x-systemd.device-timeout=0",
                     "header=/h.img", "header=/h.img:LABEL=hd", "tries=3", "a\\,b", "", "%s"]),
    st.text(alphabet="abc=\\,%", max_size=6))
options = st.lists(option, max_size=5).map(",".join)


@st.composite
def crypttab_line(draw) -> str:
    fields = [draw(name_text), draw(device), draw(key), draw(options)]
    count = draw(st.integers(min_value=1, max_value=4))
    sep = draw(st.sampled_from([" ", "\t", "  "]))
    line = sep.join(f for f in fields[:count] if f)
    return draw(st.sampled_from(["", "# ", "  "])) + line


@st.composite
def cmdline(draw) -> str:
    """At most one UUID creates a volume: systemd walks command-line volumes in hash
    order, so several failing ones would make the oracle itself non-deterministic."""
    created = draw(st.sampled_from(UUIDS))
    words = draw(st.lists(st.one_of(
        st.just(f"luks.uuid={created}"),
        name_text.map(lambda n: f'luks.name={created}="{n}"'),
        st.sampled_from(UUIDS).map(lambda u: f"luks.key={u}=/k.bin:LABEL=usb"),
        st.sampled_from(UUIDS).map(lambda u: f"luks.data={u}=/dev/sdz"),
        st.sampled_from(UUIDS).flatmap(lambda u: options.map(lambda o: f"luks.options={u}={o}")),
        options.map(lambda o: f"luks.options={o}"),
        st.sampled_from(["luks=no", "luks.crypttab=no", "luks.crypttab=1", "luks.key=/default.key",
                         "rd.luks.options=discard", f"rd.luks.uuid={created}", "luks.key"])),
        max_size=5))
    return " ".join(words)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(crypttab_line(), max_size=4), line=cmdline(), initrd=st.booleans())
def test_generated_inputs_match_oracle(lines: list[str], line: str, initrd: bool,
                                       candidate: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    work = tmp_path_factory.mktemp("hyp")
    case = work / "case"
    case.mkdir()
    (case / "crypttab").write_bytes("\n".join(lines).encode() + b"\n")
    (case / "cmdline").write_text(line)
    (case / "env").write_text(f"SYSTEMD_IN_INITRD={int(initrd)}\n")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        _compare(candidate, case, work)
    finally:
        os.chdir(cwd)
        shutil.rmtree(work)


# --- systemd-analyze verify ------------------------------------------------------------

VERIFY_CASES = ["03-basic-uuid", "07-swap-urandom", "09-tmp-ext4", "11-netdev", "12-keydev",
                "13-keydev-timeout", "15-header-dev", "25-luks-data", "29-device-timeout",
                "30-special-names", "31-file-backed"]
SYSTEM_UNIT_DIRS = ["/etc/systemd/system", "/lib/systemd/system", "/usr/lib/systemd/system"]


def _generate(candidate: str, case: Path, out: Path) -> None:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "SYSTEMD_CRYPTTAB": str(case / "crypttab"),
           "SYSTEMD_PROC_CMDLINE": (case / "cmdline").read_text().strip() if (case / "cmdline").exists() else "",
           "SYSTEMD_IN_INITRD": "0", "SYSTEMD_EFI_OPTIONS": "", "RUNTIME_DIRECTORY": str(out / "run")}
    out.mkdir()
    subprocess.run([candidate, str(out), str(out), str(out)], env=env, check=True, timeout=60)


def verify(units: list[Path], unit_dir: Path) -> subprocess.CompletedProcess:
    """systemd-analyze verify without a running systemd.

    --man=no: no man pages to look up here.  --generators=no: our units are the
    generator output; other generators must not run.  SYSTEMD_UNIT_PATH puts the
    generated directory ahead of the system unit directories, so dependencies
    such as cryptsetup.target resolve.  What cannot be checked without a running
    manager (device units appearing, mounts really happening) is not checked by
    the tool either: it loads and validates unit files and their dependencies.
    """
    env = dict(os.environ, SYSTEMD_UNIT_PATH=":".join([str(unit_dir), *SYSTEM_UNIT_DIRS]),
               SYSTEMD_LOG_LEVEL="warning")
    return subprocess.run(["systemd-analyze", "verify", "--man=no", "--generators=no",
                           *map(str, units)], env=env, capture_output=True, text=True, timeout=120)


def _units(out: Path) -> list[Path]:
    return sorted(p for p in out.glob("*") if p.is_file() and p.suffix in (".service", ".mount"))


requires_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")


@requires_analyze
@pytest.mark.parametrize("name", VERIFY_CASES)
def test_units_pass_systemd_analyze_verify(name: str, candidate: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _generate(candidate, CASES / name, out)
    units = _units(out)
    assert units
    result = verify(units, out)
    assert result.returncode == 0, result.stdout + result.stderr


@requires_analyze
def test_verify_catches_a_broken_unit(candidate: str, tmp_path: Path) -> None:
    """The check above is only worth something if a broken unit makes it fail."""
    out = tmp_path / "out"
    _generate(candidate, CASES / "12-keydev", out)
    service = next(p for p in _units(out) if p.name.startswith("systemd-cryptsetup@"))
    service.write_text(service.read_text().replace("ExecStart=/lib/systemd/systemd-cryptsetup",
                                                   "ExecStart=relative/systemd-cryptsetup"))
    result = verify(_units(out), out)
    assert result.returncode != 0
