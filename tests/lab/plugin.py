"""The `lab` marker: tests that need hardware KVM or device-mapper run where they can.

    @pytest.mark.lab("kvm")         # needs a /dev/kvm that boots stock kernels
    @pytest.mark.lab("dm")          # needs device-mapper
    @pytest.mark.lab("kvm", "dm")   # both; a bare @pytest.mark.lab means the same

On a host that has what a test needs, the test runs here like any other. On
one that lacks it (this one: PVM's KVM, a kernel without device-mapper) every
such test of the session runs in ONE boot of the lab VM (vm.py): pytest runs
inside on exactly those node ids, and each test's reports (outcome, traceback,
captured output, duration) come back as that test's reports here. When the lab
cannot run (no QEMU, no kernel, a timeout), each of its tests fails with the
reason; none is skipped.

HOSTEL_LAB=always sends lab tests to the lab even where the host could run them
(to test the lab itself); HOSTEL_LAB=never runs them here whatever happens.
Inside, HOSTEL_LAB_INSIDE=1 (so nothing recurses) and HOSTEL_TEST_TIME_SCALE
says how much slower everything is (tests multiply their timeouts by it)."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import pytest
from _pytest.reports import TestReport

from lab import vm
from lab.job import INSIDE, TIME_SCALE, preamble

REPORT = "HOSTEL_LAB_REPORT"
RESULTS = "results.jsonl"


def hardware_kvm() -> bool:
    """A /dev/kvm that runs stock kernels: PVM (kvm_pvm) runs purpose-built guests only."""
    return os.path.exists("/dev/kvm") and any(
        os.path.exists(f"/sys/module/{module}") for module in ("kvm_intel", "kvm_amd"))


def device_mapper() -> bool:
    try:
        os.close(os.open("/dev/mapper/control", os.O_RDWR))
    except OSError:
        return False
    return True


NEEDS: dict[str, Callable[[], bool]] = {"kvm": hardware_kvm, "dm": device_mapper}


def inside_lab() -> bool:
    return os.environ.get(INSIDE) == "1"


def time_scale() -> float:
    """How much longer than on a real host things take here (1 outside the lab)."""
    return float(os.environ.get(TIME_SCALE, "1"))


def needs_of(item: pytest.Item) -> tuple[str, ...]:
    marker = item.get_closest_marker("lab")
    assert marker is not None
    return tuple(marker.args) or tuple(NEEDS)


def goes_to_lab(item: pytest.Item) -> bool:
    if item.get_closest_marker("lab") is None or inside_lab():
        return False
    mode = os.environ.get("HOSTEL_LAB", "auto")
    if mode == "never":
        return False
    if unknown_needs(item):
        return False   # it fails here, naming them
    return mode == "always" or not all(NEEDS[need]() for need in needs_of(item))


def unknown_needs(item: pytest.Item) -> list[str]:
    return [need for need in needs_of(item) if need not in NEEDS]


# Inside: write every report where the host reads it -----------------------------------

class ReportWriter:
    """One JSON line per report, flushed at once: a lab that dies mid-run keeps
    the results of the tests that finished."""

    def __init__(self, config: pytest.Config, path: str) -> None:
        self.config = config
        self.out = open(path, "a", buffering=1)

    def pytest_runtest_logreport(self, report: TestReport) -> None:
        data = self.config.hook.pytest_report_to_serializable(config=self.config, report=report)
        self.out.write(json.dumps(data) + "\n")

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self.out.write(json.dumps({"collect_error": report.nodeid,
                                       "text": str(report.longrepr)}) + "\n")

    def pytest_unconfigure(self) -> None:
        self.out.close()


# Outside: one boot for all the session's lab tests --------------------------------------

@dataclass
class LabSession:
    config: pytest.Config
    reports: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    collect_errors: list[str] = field(default_factory=list)
    failure: str | None = None     # why the lab gave no results, when it did not
    log_tail: str = ""
    run: vm.LabRun | None = None
    nodeids: list[str] = field(default_factory=list)
    started: bool = False

    def ensure_ran(self, session: pytest.Session) -> None:
        if self.started:
            return
        self.started = True
        self.nodeids = [item.nodeid for item in session.items if goes_to_lab(item)]
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"lab: booting the lab VM for {len(self.nodeids)} tests")
        job_dir = Path(tempfile.mkdtemp(prefix="hostel-lab-"))
        timeout = os.environ.get("HOSTEL_LAB_TIMEOUT")
        settings = vm.LabSettings(timeout=float(timeout)) if timeout else vm.LabSettings()
        try:
            self.run = vm.run(self.job_script(), job_dir, settings)
        except (vm.LabError, OSError, RuntimeError) as e:  # KernelMissing is a RuntimeError
            self.failure = f"the lab VM could not run the test: {e}"
        self.read_results(job_dir)
        shutil.rmtree(job_dir, ignore_errors=True)
        if self.failure is None and self.run is not None and self.run.exit_status is None:
            self.failure = ("the lab VM powered off before pytest inside ended; console:\n"
                            + self.run.console_tail())

    def job_script(self) -> str:
        # No hypothesis plugin: its import costs seconds under TCG, and @given works without it.
        pytest_args = ["-m", "pytest", "-p", "no:cacheprovider", "-p", "no:hypothesispytest",
                       "-q", "-rfE", *self.nodeids]
        command = shlex.join([sys.executable, *pytest_args])
        return (preamble(str(self.config.rootpath), {REPORT: f"/run/lab/{RESULTS}"})
                + f"{{ {command}; echo $? > /run/lab/pytest-status; }} 2>&1 | tee /run/lab/pytest.log\n")

    def read_results(self, job_dir: Path) -> None:
        results = job_dir / RESULTS
        if results.exists():
            for line in results.read_text().splitlines():
                data = json.loads(line)
                if "collect_error" in data:
                    self.collect_errors.append(f"{data['collect_error']}:\n{data['text']}")
                else:
                    self.reports.setdefault(data["nodeid"], []).append(data)
        log = job_dir / "pytest.log"
        if log.exists():
            self.log_tail = log.read_text(errors="replace")[-vm.CONSOLE_TAIL:]

    def missing(self) -> str:
        """Why a lab test has no result, for its failure."""
        if self.failure is not None:
            return self.failure
        said = "\n".join(self.collect_errors) or self.log_tail
        return f"pytest in the lab VM gave no result for this test; it said:\n{said}"


_SESSION = pytest.StashKey[LabSession]()


def pytest_configure(config: pytest.Config) -> None:
    if inside_lab() and os.environ.get(REPORT):
        config.pluginmanager.register(ReportWriter(config, os.environ[REPORT]), "lab-report")
    config.stash[_SESSION] = LabSession(config)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    if item.get_closest_marker("lab") is not None and unknown_needs(item):
        reports = [_report(item, "setup", "failed",
                           f"@pytest.mark.lab names {', '.join(map(repr, unknown_needs(item)))}; "
                           f"the lab knows {', '.join(map(repr, NEEDS))}")]
    elif goes_to_lab(item):
        lab = item.config.stash[_SESSION]
        lab.ensure_ran(item.session)
        reports = reports_for(item, lab)
    else:
        return None
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    for report in reports:
        item.ihook.pytest_runtest_logreport(report=report)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


def reports_for(item: pytest.Item, lab: LabSession) -> list[TestReport]:
    """The inside run's reports for item, or a failure saying why there are none."""
    config = item.config
    reports = [config.hook.pytest_report_from_serializable(config=config, data=data)
               for data in lab.reports.get(item.nodeid, [])]
    for report in reports:
        report.sections.append(("lab", "ran in the lab VM (QEMU TCG, nested KVM, device-mapper)"))
    phases = {report.when for report in reports}
    if "setup" not in phases:
        reports.append(_report(item, "setup", "passed"))
    if "call" not in phases and all(r.passed for r in reports):
        reports.append(_report(item, "call", "failed", lab.missing()))
    if "teardown" not in phases:
        reports.append(_report(item, "teardown", "passed"))
    return reports


def _report(item: pytest.Item, when: Literal["setup", "call", "teardown"],
            outcome: Literal["passed", "failed"], text: str | None = None) -> TestReport:
    return TestReport(item.nodeid, item.location, {k: 1 for k in item.keywords}, outcome,
                      text, when, [], 0.0)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """Boot time and each lab test's time: the lab's budget is watched here."""
    lab = config.stash.get(_SESSION, None)
    if lab is None or not lab.started:
        return
    terminalreporter.write_sep("-", "lab")
    run = lab.run
    if run is not None:
        boot = f"{run.boot_seconds:.1f} s" if run.boot_seconds is not None else "unknown"
        terminalreporter.write_line(f"lab VM: boot {boot}, whole run {run.seconds:.1f} s, "
                                    f"{len(lab.nodeids)} tests")
    if lab.failure:
        terminalreporter.write_line(f"lab VM failed: {lab.failure.splitlines()[0]}")
    for nodeid in lab.nodeids:
        reports = lab.reports.get(nodeid, [])
        seconds = sum(data.get("duration", 0.0) for data in reports)
        phases = ", ".join(f"{d['when']} {d.get('duration', 0.0):.1f}" for d in reports)
        terminalreporter.write_line(f"{seconds:7.1f} s  {_outcome(reports):9} {nodeid}"
                                    + (f"  ({phases})" if phases else ""))


def _outcome(reports: list[dict[str, Any]]) -> str:
    """A test's outcome as the summary line says it: "error" for a failed set-up or tear-down."""
    if any(d["outcome"] == "failed" and d["when"] != "call" for d in reports):
        return "error"
    return next((d["outcome"] for d in reports if d["when"] == "call"), "no result")


def pytest_report_header(config: pytest.Config) -> str | None:
    return "lab: inside the lab VM" if inside_lab() else None

