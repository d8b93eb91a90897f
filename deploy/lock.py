"""`make lock`: resolve every extra afresh and write requirements.lock, the constraints `make` installs from.

    python deploy/lock.py EXTRAS TORCH_SPEC [pip options...]

pip resolves the project with all its extras (and the CPU torch that `make coqui` installs first)
without installing or building anything (`--dry-run --report`), and the lock lists each resolved
distribution as `name==version`, plus the pip that resolved them.  Run it on purpose, test, and
commit the lock; `make` never refreshes it by itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
HEADER = """\
# Constraints for `make` (pip install -c requirements.lock): every dependency of every extra, exact.
# Regenerate on purpose with `make lock`, run `make test`, and commit. Do not edit by hand.
# Resolved on Python {python} by pip {pip}.
"""


def main(argv: list[str]) -> int:
    extras, torch_spec, *pip_options = argv
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--report", "-", *pip_options, f"{ROOT}[{extras}]", torch_spec]
    report = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    pins = {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in report["install"]}
    pins.pop("voxpipe", None)
    pins["pip"] = version("pip")
    python = ".".join(map(str, sys.version_info[:3]))
    lines = [f"{name}=={pins[name]}" for name in sorted(pins)]
    LOCK.write_text(HEADER.format(python=python, pip=pins["pip"]) + "\n".join(lines) + "\n")
    print(f"wrote {LOCK.name}: {len(lines)} pinned distributions")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
