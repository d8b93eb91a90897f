"""Suite-wide plugins: native-model tests in child processes, and the unit/integration split.

Every test is marked `unit` or `integration` here, so that `pytest -m unit` is a set that runs in
seconds inside one process and `pytest -m integration` is the rest, without a marker to keep up
by hand in each of forty modules.  The rule is per module, because a module's fixtures are what
start its daemons and servers: a module is integration when

- it is marked `native` (tests/native_isolation.py runs it in a child pytest), or
- its namespace holds something that starts a process: tests.harness's Daemon, start_stage or
  fake_openai, tests.terminal's Terminal, tests.screenshot's screenshot (xwd), or the subprocess,
  multiprocessing or pty modules or their process starters (`from subprocess import run`).

A module may say it itself, `pytestmark = pytest.mark.unit` or `pytest.mark.integration`, and
that wins.  The rule is enforced as the tests run: a unit test that starts a process all the same
(through a helper the rule does not know, os.system, a fork) fails and names what it started, so
the split cannot rot silently.  Checking happens through an audit hook (PEP 578), which sees every
process start in this interpreter whatever code makes it.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import pytest

pytest_plugins = ["tests.native_isolation"]

STARTER_MODULES = frozenset({"subprocess", "multiprocessing", "pty"})
"""Modules whose import alone makes a test module integration: they exist to start processes."""
STARTERS = frozenset({
    ("tests.harness", "Daemon"), ("tests.harness", "start_stage"), ("tests.harness", "fake_openai"),
    ("tests.terminal", "Terminal"), ("tests.screenshot", "screenshot"),
    ("subprocess", "Popen"), ("subprocess", "run"), ("subprocess", "call"), ("subprocess", "check_call"),
    ("subprocess", "check_output"), ("subprocess", "getoutput"), ("subprocess", "getstatusoutput"),
})
"""(module, qualname) of the objects that start a process, matched by name so nothing is imported here."""
SPAWN_EVENTS = frozenset({"subprocess.Popen", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.system",
                          "os.exec"})
"""Audit events (PEP 578) raised when this interpreter starts or becomes another process."""
RUNNER_FRAMES = ("/_pytest/", "/pluggy/", "/pytest/__main__.py", "<frozen runpy>")
"""Frames left out of the stack shown for a process start: they only show pytest running the test."""


def pytest_configure(config: pytest.Config) -> None:
    """The markers themselves are registered in pyproject.toml; here the guard is installed."""
    sys.addaudithook(_audit)


def starts_processes(module: ModuleType) -> bool:
    """Whether a test module's namespace holds a process starter (see the module docstring)."""
    for value in vars(module).values():
        if isinstance(value, ModuleType):
            if value.__name__ in STARTER_MODULES:
                return True
        else:
            name = (getattr(value, "__module__", None), getattr(value, "__qualname__", None))
            if all(isinstance(part, str) for part in name) and name in STARTERS:
                return True
    return False


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    decided: dict[str, pytest.MarkDecorator] = {}
    for item in items:
        if item.get_closest_marker("unit") or item.get_closest_marker("integration"):
            continue
        module = getattr(item, "module", None)
        if module is None:  # not a Python test function: nothing to inspect, assume the worst
            item.add_marker(pytest.mark.integration)
            continue
        if module.__name__ not in decided:
            integration = item.get_closest_marker("native") is not None or starts_processes(module)
            decided[module.__name__] = pytest.mark.integration if integration else pytest.mark.unit
        item.add_marker(decided[module.__name__])


# --- the guard: a unit test must not start a process ------------------------------------------

_watched: list[str] | None = None
"""While a unit test runs: the process starts seen so far; None the rest of the time."""


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _watched is not None and event in SPAWN_EVENTS:
        frames = [frame for frame in traceback.extract_stack()[:-1]
                  if not any(runner in frame.filename for runner in RUNNER_FRAMES)]
        _watched.append(f"{event} {args[:2]!r}\n" + "".join(traceback.format_list(frames[-6:])))


@contextmanager
def _no_processes(item: pytest.Item, when: str) -> Iterator[None]:
    """Record the processes a unit test's `when` phase starts; fail the phase if there were any."""
    global _watched
    if item.get_closest_marker("unit") is None:
        yield
        return
    seen: list[str] = []
    _watched = seen
    try:
        yield
    finally:
        _watched = None
    if seen:
        pytest.fail(f"a unit test started {len(seen)} process(es) in {when}; mark its module "
                    f"`pytestmark = pytest.mark.integration` or teach tests/conftest.py the starter:\n\n"
                    + "\n".join(seen), pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    with _no_processes(item, "setup"):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    with _no_processes(item, "call"):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    with _no_processes(item, "teardown"):
        return (yield)
