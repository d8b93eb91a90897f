"""The source folder services/ installs as the import name voxpipe, every subpackage included."""

from __future__ import annotations

import shutil
import subprocess
import tomllib
import zipfile

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


def test_the_wheel_ships_the_files_the_package_reads(tmp_path) -> None:
    """package-data: the browser page of `voxpipe web` and the llm's built-in personas are files, not
    modules, so only pyproject.toml's package-data puts them in a wheel. Built offline from a copy of
    the sources (the build writes next to them)."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "launcher.py"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "services", source / "services", ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run([PYTHON, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(tmp_path / "wheel"), str(source)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "wheel").glob("voxpipe-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("frontends/web/static", "stages/llm/personas"):
        files = {f"voxpipe/{folder}/{file.name}" for file in (ROOT / "services" / folder).iterdir() if file.is_file()}
        assert files and files <= names, folder
