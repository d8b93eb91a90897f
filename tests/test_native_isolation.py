"""A native crash is one failed test, not a dead suite (tests/native_isolation.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.harness import PYTHON, ROOT, base_env

CRASHING_MODULE = '''
import os
import signal

import pytest

pytestmark = pytest.mark.native


@pytest.fixture(scope="module")
def model():
    return "loaded once per child"


def test_before(model):
    assert model


def test_crashes_like_llama_cpp_on_amx(model):
    import sys
    print("decoding the first batch", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGSEGV)


def test_after_the_crash_runs_in_a_new_child(model):
    assert model


def test_a_plain_failure_is_reported_as_usual():
    assert 1 + 1 == 3
'''

PLAIN_MODULE = '''
def test_the_rest_of_the_suite_runs():
    assert True
'''


def test_a_segfault_in_a_native_test_fails_only_that_test(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["tests.native_isolation"]\n')
    (tmp_path / "test_native_model.py").write_text(CRASHING_MODULE)
    (tmp_path / "test_plain.py").write_text(PLAIN_MODULE)
    result = subprocess.run([PYTHON, "-m", "pytest", "-p", "no:cacheprovider", "-rA", str(tmp_path)],
                            cwd=tmp_path, env=base_env({"PYTHONPATH": str(ROOT)}), capture_output=True,
                            text=True, timeout=120)
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert "2 failed, 3 passed" in out, out
    assert "FAILED test_native_model.py::test_crashes_like_llama_cpp_on_amx" in out
    assert "killed by signal SIGSEGV (-11)" in out
    assert "decoding the first batch" in out  # the child's last stderr lines
    assert "PASSED test_native_model.py::test_after_the_crash_runs_in_a_new_child" in out
    assert "FAILED test_native_model.py::test_a_plain_failure_is_reported_as_usual" in out
    assert "assert (1 + 1) == 3" in out
    assert "PASSED test_plain.py::test_the_rest_of_the_suite_runs" in out
