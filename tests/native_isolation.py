"""Run tests that load native models (llama.cpp, torch/Coqui) in a child pytest, so a crash is one failure.

A test module marked `pytestmark = pytest.mark.native` does not run in the main pytest process.
When the first of its tests comes up, its remaining tests run together in a child `python -m
pytest` (so module fixtures such as a tiny Coqui model are built once).  The child writes each
test's reports, one JSON line at a time, to a file the parent replays as if the tests had run
here.  If the child dies by a signal (SIGSEGV in llama.cpp, say), the test that was running
becomes one failure naming the signal with the child's last lines of stderr, the tests it had
finished keep their results, and the tests after it run in a new child.  The rest of the suite
and its summary are untouched.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

REPORT_ENV = "VOXPIPE_NATIVE_REPORT"
"""Set in the child: the file it appends its reports to (and what makes this plugin a recorder)."""
STDERR_TAIL_LINES = 25
RUNNER_FRAMES = ("/_pytest/", "/pluggy/", "/pytest/__main__.py", "<frozen runpy>")
"""Frames of faulthandler's dump that only show pytest running the test, dropped from the stderr tail."""


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "native: loads a native model; runs in a child process so a crash "
                                       "fails one test instead of killing the suite")
    if os.environ.get(REPORT_ENV):
        config.pluginmanager.register(Recorder(config, Path(os.environ[REPORT_ENV])), "native-recorder")
    elif not config.option.collectonly:
        config.pluginmanager.register(Isolator(config), "native-isolator")


class Recorder:
    """In the child: append every test's start and reports to the report file, flushed at once."""

    def __init__(self, config: pytest.Config, path: Path) -> None:
        self.config = config
        self.file = path.open("a", encoding="utf-8")

    def _write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def pytest_runtest_logstart(self, nodeid: str) -> None:
        self._write({"start": nodeid})

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        data = self.config.hook.pytest_report_to_serializable(config=self.config, report=report)
        self._write({"report": data})


class Isolator:
    """In the parent: run native tests in children and replay their reports."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.results: dict[str, list[pytest.TestReport]] = {}

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
        if item.get_closest_marker("native") is None:
            return None
        if item.nodeid not in self.results:
            module = item.nodeid.split("::", 1)[0]
            items = item.session.items
            pending = [other.nodeid for other in items[items.index(item):]
                       if other.nodeid.split("::", 1)[0] == module and other.nodeid not in self.results]
            self._run_child(item, pending)
        item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        for report in self.results.pop(item.nodeid):
            item.ihook.pytest_runtest_logreport(report=report)
        item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        return True

    def _run_child(self, item: pytest.Item, nodeids: list[str]) -> None:
        """Run `nodeids` in one child; record what it reported, and a crash failure for the test it died in."""
        with tempfile.TemporaryDirectory(prefix="voxpipe-native-") as scratch:
            report_path, stderr_path = Path(scratch) / "reports.jsonl", Path(scratch) / "stderr.txt"
            report_path.touch()
            env = {**os.environ, REPORT_ENV: str(report_path)}
            command = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                       f"--rootdir={self.config.rootpath}", *nodeids]
            with stderr_path.open("w") as stderr:
                code = subprocess.call(command, cwd=self.config.rootpath, env=env,
                                       stdout=subprocess.DEVNULL, stderr=stderr)
            started, finished = self._read(report_path)
            if code >= 0 and item.nodeid in finished:
                return
            crashed = next((nodeid for nodeid in started if nodeid not in finished), None)
            crashed = crashed or next((nodeid for nodeid in nodeids if nodeid not in started), item.nodeid)
            lines = stderr_path.read_text(errors="replace").splitlines()
            tail = [line for line in lines if not any(noise in line for noise in RUNNER_FRAMES)][-STDERR_TAIL_LINES:]
            self.results.setdefault(crashed, []).append(self._crash_report(item, crashed, code, tail))

    def _read(self, path: Path) -> tuple[list[str], set[str]]:
        """Store the child's reports; return the tests it started and those it finished (teardown reported)."""
        started: list[str] = []
        finished: set[str] = set()
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the child died mid-line
                continue
            if "start" in record:
                started.append(record["start"])
                self.results[record["start"]] = []
                continue
            report = self.config.hook.pytest_report_from_serializable(config=self.config, data=record["report"])
            self.results.setdefault(report.nodeid, []).append(report)
            if report.when == "teardown":
                finished.add(report.nodeid)
        return started, finished

    def _crash_report(self, item: pytest.Item, nodeid: str, code: int, tail: list[str]) -> pytest.TestReport:
        if code < 0:
            try:
                cause = f"killed by signal {signal.Signals(-code).name} ({code})"
            except ValueError:
                cause = f"killed by signal {-code}"
        else:
            cause = f"the child pytest exited with code {code} before finishing this test"
        when = "call" if any(report.when == "setup" for report in self.results.get(nodeid, [])) else "setup"
        text = (f"{nodeid}: the child process running this native test was {cause}.\n"
                f"Last {len(tail)} lines of its stderr:\n" + "\n".join(tail))
        location = item.location if nodeid == item.nodeid else (nodeid.split("::", 1)[0], None, nodeid)
        return pytest.TestReport(nodeid, location, {}, "failed", text, when)
