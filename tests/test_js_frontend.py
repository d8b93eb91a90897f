"""The JavaScript front-end of docs/protocol.md §7.3 (docs/examples/js) against a live daemon.

It needs node (>= 18) and npm; the test installs the pinned npm packages into a temporary copy of
docs/examples/js with `npm ci` (the npm cache in ~/.npm makes later runs offline).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.fakes.openai_server import reply_for
from tests.harness import ROOT, Daemon, fake_openai, heartbeat_pids, openai_settings

EXAMPLE = ROOT / "docs" / "examples" / "js"
NODE, NPM = shutil.which("node"), shutil.which("npm")


def doc_block() -> str:
    """The ```js block of §7.3 in docs/protocol.md."""
    text = (ROOT / "docs" / "protocol.md").read_text()
    section = text[text.index("### 7.3 The same in JavaScript"):]
    section = section[:section.index("\n## ")]
    blocks = re.findall(r"^```js\n(.*?)^```$", section, re.S | re.M)
    assert len(blocks) == 1, f"§7.3 should show exactly one js block, found {len(blocks)}"
    return blocks[0]


def test_the_doc_shows_the_example_file_verbatim() -> None:
    assert doc_block() == (EXAMPLE / "frontend.mjs").read_text()


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A temporary copy of docs/examples/js with its npm packages installed."""
    if NODE is None or NPM is None:
        pytest.skip("node and npm are not installed: they run the JavaScript example of docs/protocol.md §7.3")
    version = subprocess.run([NODE, "--version"], capture_output=True, text=True).stdout.strip()
    if int(version.lstrip("v").split(".")[0]) < 18:
        pytest.skip(f"the JavaScript example needs node >= 18, this is {version}")
    work = tmp_path_factory.mktemp("js-frontend")
    for name in ("package.json", "package-lock.json", "frontend.mjs"):
        shutil.copy(EXAMPLE / name, work / name)
    # --ignore-scripts: zeromq ships its binding prebuilt; its install script would only check it loads.
    install = subprocess.run([NPM, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--prefer-offline"],
                             cwd=work, capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, f"npm ci failed:\n{install.stdout}\n{install.stderr}"
    return work


@pytest.fixture(scope="module")
def server() -> str:
    with fake_openai() as url:
        yield url


def run_frontend(example: Path, daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("VOXPIPE_")}
    env["VOXPIPE_BUS__RUNTIME_DIR"] = str(daemon.runtime_dir)
    return subprocess.run([NODE, "frontend.mjs", *args], cwd=example, env=env, capture_output=True,
                          text=True, timeout=45)


def test_the_js_frontend_streams_a_reply_and_its_command(example: Path, server: str) -> None:
    with Daemon(openai_settings(server), env={"FAKE_OPENAI_KEY": "test-key"}) as daemon:
        result = run_frontend(example, daemon, "Hello from JS", "js1", "20")
        log = "".join(daemon.log)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    display = reply_for("Hello from JS").replace("<e>smile</e>", "")
    assert display == "Echo: Hello from JS. Done  here."
    assert result.stdout.splitlines() == [display, "[command e smile]"]
    assert "[handshake done in" in result.stderr and "[playback finished]" in result.stderr
    assert "rejected message" not in log, "a voxpipe stage rejected a frame the JS front-end sent"


def test_the_js_frontend_exits_1_with_the_reason_when_the_reply_fails(example: Path, server: str) -> None:
    with Daemon(openai_settings(server), env={"FAKE_OPENAI_KEY": "wrong-key"}) as daemon:
        result = run_frontend(example, daemon, "Hello from JS", "js2", "20")
    assert result.returncode == 1, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.stdout == ""
    assert "[llm.done error after 0 tokens:" in result.stderr and "401" in result.stderr


def test_the_js_frontend_ends_at_once_when_the_bus_dies(example: Path) -> None:
    """§3: the socket monitor tells the front-end the broker died; it ends the reply within a second
    (not at its 30 s timeout) with the reason."""
    with fake_openai(delay=0.05) as slow, Daemon(openai_settings(slow), env={"FAKE_OPENAI_KEY": "test-key"}) as daemon:
        env = {key: value for key, value in os.environ.items() if not key.startswith("VOXPIPE_")}
        env["VOXPIPE_BUS__RUNTIME_DIR"] = str(daemon.runtime_dir)
        frontend = subprocess.Popen([NODE, "frontend.mjs", "Tell me a long story " * 20, "js3", "30"], cwd=example,
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert frontend.stdout is not None
        frontend.stdout.read(10)  # the reply is streaming
        os.kill(heartbeat_pids(daemon.runtime_dir, "bus")["bus"], signal.SIGKILL)
        killed = time.monotonic()
        _, err = frontend.communicate(timeout=20)
        assert time.monotonic() - killed < 2.0, err
    assert frontend.returncode == 1 and "the voxpipe bus went away" in err, err

