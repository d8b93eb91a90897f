"""The source folder services/ installs as the import name voxpipe, every subpackage included."""

from __future__ import annotations

import subprocess
import tomllib

from tests.harness import PYTHON, ROOT


def test_every_folder_of_services_is_a_listed_voxpipe_package() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"voxpipe": "services"}
    folders = {".".join(("voxpipe", *init.parent.relative_to(ROOT / "services").parts))
               for init in (ROOT / "services").rglob("__init__.py")}
    assert set(setuptools["packages"]) == folders


def test_import_voxpipe_and_connect_from_anywhere(tmp_path) -> None:
    """Outside the checkout, as a user's program runs: the public names, and no `services` package."""
    code = ("import importlib.util, voxpipe\n"
            "from voxpipe import connect, Text\n"
            "assert Text is voxpipe.protocol.Text\n"
            "assert callable(connect) and voxpipe.Client.__module__ == 'voxpipe.frontends.client'\n"
            "assert importlib.util.find_spec('services') is None\n")
    result = subprocess.run([PYTHON, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
