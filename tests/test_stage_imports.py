"""What each stage process has imported once it is ready: only what it needs, so an import added later
cannot silently put megabytes back into every process (docs/bench.md §7, idle memory per stage; issue 15:
bus + llm + chunker + history within 120 MB).

Each stage runs as `voxpipe stage NAME` runs it (voxpipe.cli.main) in a process that prints its
sys.modules on SIGUSR1; the test asks once the stage's `ready` heartbeat came, so whatever prepare()
and started() load counts.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import PYTHON, ROOT, base_env, heartbeat_pids, openai_settings, wait_ready, write_toml
from voxpipe.plugins import Plugin
from voxpipe.stages.llm.providers import PROVIDERS
from voxpipe.stages.player.backends import BACKENDS
from voxpipe.stages.tts.engines import ENGINES

STAGES = ("llm", "chunker", "history", "tts", "player")
END = "-- end of sys.modules --"
WITH_DUMP = ("import signal, sys\n"
             "def dump(*_):\n"
             f"    print(*sorted(sys.modules), {END!r}, sep='\\n', flush=True)\n"
             "signal.signal(signal.SIGUSR1, dump)\n"
             "from voxpipe.cli import main\n"
             "sys.exit(main(sys.argv[1:]))\n")
"""`python -m launcher` (what the supervisor starts), plus the SIGUSR1 handler."""

NOT_IN_ANY = ("voxpipe.frontends.client", "voxpipe.frontends.chat", "voxpipe.frontends.gui", "voxpipe.ops",
              "tkinter", "zmq.asyncio", "zmq.utils.monitor", "llama_cpp", "g4f")
"""The client library, front-ends and the supervisor's tools; zmq's monitor helper imports asyncio and
ssl (9 MB), only to parse the event of a lost bus."""
NOT_IN_LEAN = ("asyncio", "ssl", "_hashlib", "openai", "requests", "pydantic", "http.client", "email")
"""Not in a stage that talks to nothing but the bus: asyncio and ssl 9 MB; hashlib loads OpenSSL
(3.5 MB), which only a sharded stage needs; the SDKs and HTTP stacks are the llm's."""
OWN = {"sqlite3": "history", "voxpipe.stages.history.store": "history"}
"""A module only one stage may import."""


def modules_of(registry: dict[str, Plugin], *keep: str) -> tuple[str, ...]:
    """The plugin modules of a registry, but those named in `keep`."""
    return tuple(entry.partition(":")[0] for name, entry in registry.items() if name not in keep)


UNCHOSEN = {
    # openai_compat reads its stream with openai_wire: neither the http provider's transport nor requests
    "llm": (*modules_of(PROVIDERS, "openai"), "voxpipe.stages.llm.providers.http_transport", "requests"),
    "tts": modules_of(ENGINES, "null"),
    "player": modules_of(BACKENDS, "null"),
}
"""Plugins the config does not choose (the profile's provider, the engine, the backend) stay unimported."""


def present(modules: set[str], names: tuple[str, ...]) -> list[str]:
    """The modules of `modules` that are one of `names` or inside one of them."""
    return sorted(module for module in modules if any(module == name or module.startswith(name + ".")
                                                      for name in names))


def start(name: str, config: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([PYTHON, "-c", WITH_DUMP, "--config", str(config), "stage", name], cwd=ROOT,
                            env=base_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)


def dump(process: subprocess.Popen[str]) -> set[str]:
    """The process's sys.modules (it keeps running)."""
    assert process.stdout is not None
    process.send_signal(signal.SIGUSR1)
    modules: set[str] = set()
    for line in process.stdout:
        if line.strip() == END:
            return modules
        modules.add(line.strip())
    raise AssertionError(f"the stage ended (exit {process.wait()}) before it printed its modules")


@pytest.fixture(scope="module")
def imported() -> Iterator[dict[str, set[str]]]:
    """Stage name -> the modules its ready process holds: a bus and every stage, the llm with a remote
    `openai` profile (as §7 measures it; the server is never asked), tts engine and player backend null."""
    folder = Path(tempfile.mkdtemp(prefix="vp-imports-"))
    runtime = folder / "run"
    config = folder / "voxpipe.toml"
    write_toml(config, {**openai_settings("http://127.0.0.1:9/v1"), "bus": {"runtime_dir": str(runtime)},
                        "history": {"db_path": str(folder / "history.db")}, "tts": {"engine": "null"},
                        "player": {"backend": "null", "wav_dir": str(folder / "wav")}})
    processes = {"bus": start("bus", config)}
    try:
        wait_ready(runtime, "bus", timeout=30)
        processes |= {name: start(name, config) for name in STAGES}
        heartbeat_pids(runtime, *STAGES, timeout=60)
        yield {name: dump(process) for name, process in processes.items()}
    finally:
        for process in processes.values():
            process.kill()
            process.communicate()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("name", ["bus", *STAGES])
def test_a_stage_imports_no_other_stage(imported: dict[str, set[str]], name: str) -> None:
    modules = imported[name]
    others = tuple(f"voxpipe.stages.{other}.stage" for other in STAGES if other != name)
    others += tuple(module for module, owner in OWN.items() if owner != name)
    found = present(modules, others + NOT_IN_ANY + UNCHOSEN.get(name, ()))
    assert not found, f"the {name} stage imports {found}"


@pytest.mark.parametrize("name", ["bus", "chunker", "history", "tts", "player"])
def test_a_stage_off_the_network_imports_no_network_stack(imported: dict[str, set[str]], name: str) -> None:
    found = present(imported[name], NOT_IN_LEAN)
    assert not found, f"the {name} stage imports {found}"


def test_the_llm_has_its_provider_sdk_and_client_before_the_first_request(imported: dict[str, set[str]]) -> None:
    """Imported in prepare(), before ready: the first request does not wait for it (a second or more),
    nor for the client, built by the provider's warm() with the HTTP stack it imports (about 50 ms)."""
    assert {"openai", "voxpipe.stages.llm.providers.openai_compat", "httpcore2", "h11"} <= imported["llm"]
