"""`voxpipe doctor`: check what a first run needs; print OK, or what to do, for each check.

Exit 0 when nothing needed failed, 1 otherwise (warnings do not fail).  Native code that can
crash (llama.cpp loading and decoding the configured model, espeak-ng speaking a word) runs in
a child process, so a crash is reported with its signal, the CPU features that matter and the
setting that avoids it, instead of killing the doctor.  Key values are never printed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError, load
from ..stages.llm import llama_runtime

OK, WARN, FAIL = "OK", "WARN", "FAIL"
PROBE_TIMEOUT_S = 180.0
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class Check:
    """One line of the report: status, what was checked, what was found, and the fix when not OK."""

    status: str
    name: str
    detail: str
    fix: str = ""


def run(config_path: str | None, out: Callable[[str], None] = print) -> int:
    """Run every check, print the report, and return the exit code."""
    failed = False
    for check in checks(config_path):
        out(f"{check.status:<5} {check.name:<14} {check.detail}")
        if check.fix:
            out(f"{'':<5} {'':<14} fix: {check.fix}")
        failed = failed or check.status == FAIL
    out("doctor: " + ("something needed is missing; see the fixes above" if failed else "ready"))
    return 1 if failed else 0


def checks(config_path: str | None) -> Iterator[Check]:
    try:
        config = load(config_path)
    except ConfigError as exc:
        yield Check(FAIL, "config", str(exc), "correct the file or key named above (deploy/voxpipe.example.toml "
                                              "documents every key)")
        yield from cpu()
        return
    yield Check(OK, "config", f"valid ({config.path or 'built-in defaults, no config file'})")
    yield from runtime(config)
    yield espeak(config)
    for name in sorted(config["llm"]["profiles"]):
        yield profile(config, name)
    yield audio(config)
    if config["game"]["enabled"]:
        yield from game(config)
    yield from extras(config)
    yield from cpu()


# --- the bus ---------------------------------------------------------------------------------

def runtime(config: Config) -> Iterator[Check]:
    from ..runtime.broker import private_dir_problem, runtime_dir
    if config["bus"]["transport"] == "tcp":
        yield Check(OK, "runtime dir", f"not used: the bus is on TCP port {config['bus']['tcp_port']}")
    else:
        directory = runtime_dir(config["bus"]["runtime_dir"])
        problem = private_dir_problem(directory) or _cannot_create(directory)
        if problem:
            yield Check(FAIL, "runtime dir", f"{directory}: {problem[0]}", problem[1])
            return
        if not directory.exists():
            yield Check(OK, "runtime dir", f"{directory} will be created with mode 700 by `voxpipe run`")
            yield Check(OK, "bus", "no daemon is running (start one with `voxpipe run`)")
            return
        yield Check(OK, "runtime dir", f"{directory} is yours and private (mode 700)")
    yield bus(config)


# --- the game link ----------------------------------------------------------------------------

def game(config: Config) -> Iterator[Check]:
    """Where `voxpipe game` will listen and write: the port must be free for it (the NeuroMita app
    holds the same one), and the voice directory private and where the game can read it."""
    import socket

    from ..frontends.game.link import game_path, voice_dir
    settings = config["game"]
    address = (settings["host"], settings["port"])
    with socket.socket() as probe:
        taken = probe.connect_ex(address) == 0
    if taken:
        yield Check(WARN, "game port", f"{address[0]}:{address[1]} is taken (by a running `voxpipe game`, or by the "
                                       f"NeuroMita app)", "if it is the NeuroMita app, close it: the mod connects to "
                                                          "12345 only, and voxpipe game cannot share it")
    else:
        yield Check(OK, "game port", f"{address[0]}:{address[1]} is free for `voxpipe game`")
    directory = voice_dir(settings["voice_dir"])
    problem = _cannot_create(directory)
    if problem:
        yield Check(FAIL, "game voices", f"{directory}: {problem[0]}", "set game.voice_dir to a directory you can "
                                                                      "create, which the game can read")
    else:
        yield Check(OK, "game voices", f"{directory} (mode 700); the game reads it as "
                                       f"{game_path(directory, settings['path_style'])}")


def _cannot_create(directory: Path) -> tuple[str, str] | None:
    """Why `voxpipe run` could not make a missing runtime dir, with the fix; None when it can."""
    if os.path.lexists(directory):
        return None
    parent = next((p for p in directory.parents if p.exists()), Path("/"))
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"does not exist and {parent} is not writable", "set bus.runtime_dir to a directory you can create"
    return None


def bus(config: Config) -> Check:
    from ..runtime import BusUnavailable, Connection, endpoints_for
    client = Connection("doctor", endpoints_for(config), [])
    try:
        client.require_bus()
    except BusUnavailable:
        return Check(OK, "bus", "no daemon is running (start one with `voxpipe run`)")
    try:
        client.open(timeout=3.0)
    except Exception as exc:  # a socket file with no broker behind it, or a refused CURVE handshake
        return Check(FAIL, "bus", f"a bus socket exists but the broker does not answer: {exc}",
                     "stop any old daemon and run `voxpipe run` again (it replaces stale sockets)")
    finally:
        client.close()
    return Check(OK, "bus", "a daemon is running and answers")


# --- native code, in child processes --------------------------------------------------------

def _probe(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m voxpipe.ops.doctor PROBE ARGS` in a child, where a crash cannot take us down.

    It starts in the folder that holds voxpipe, never the package folder, whose secrets.py would
    shadow the standard library's."""
    return subprocess.run([sys.executable, "-m", "voxpipe.ops.doctor", *args], capture_output=True, text=True,
                          timeout=PROBE_TIMEOUT_S, cwd=Path(__file__).resolve().parents[2])


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def espeak(config: Config) -> Check:
    try:
        result = _probe("--probe-espeak")
    except subprocess.TimeoutExpired:
        return Check(FAIL, "espeak-ng", f"speaking one word took over {PROBE_TIMEOUT_S:.0f} s",
                     "reinstall espeakng-loader: pip install --force-reinstall espeakng-loader")
    if result.returncode < 0:
        return Check(FAIL, "espeak-ng", f"crashed with {_signal_name(result.returncode)} speaking one word",
                     "reinstall espeakng-loader, or set tts.engine to another engine")
    if result.returncode:
        return Check(FAIL, "espeak-ng", _last_line(result.stderr), "pip install espeakng-loader (make install does)")
    needed = config["tts"]["engine"] == "espeak"
    return Check(OK, "espeak-ng", result.stdout.strip() + ("" if needed else " (not the configured engine)"))


def profile(config: Config, name: str) -> Check:
    settings = config.profile(name)
    default = name == config["llm"]["profile"]
    if settings["provider"] == "local":
        return local_model(name, settings)
    return remote_key(name, settings, default)


def remote_key(name: str, settings: dict[str, Any], default: bool) -> Check:
    """A remote profile's key variables are set (values are never printed)."""
    from ..secrets import read_key
    label = f"llm {name}"
    where = f"provider {settings['provider']}, {settings['base_url'] or settings['url'] or 'default endpoint'}"
    variables = [v for v in [settings["api_key_env"], *settings["reserve_key_envs"]] if v]
    if not variables and not settings["api_key_file"]:
        return Check(OK, label, f"{where}; no key configured")
    try:
        keys = read_key(settings)
    except ConfigError as exc:
        return Check(FAIL if default else WARN, label, str(exc), "fix the key file named above")
    if keys:
        return Check(OK, label, f"{where}; {len(keys)} key(s) found in {settings['api_key_file'] or variables[0]}")
    status = FAIL if default else WARN
    use = "the default profile" if default else f"`voxpipe say --profile {name}`"
    return Check(status, label, f"{where}; ${variables[0]} is not set, so {use} will fail",
                 f"export {variables[0]}=... (or set llm.profiles.{name}.api_key_file to a mode-600 file)")


def local_model(name: str, settings: dict[str, Any]) -> Check:
    """The model loads and decodes a few tokens in a child; a crash names its signal and the way out."""
    label = f"llm {name}"
    if find_spec("llama_cpp") is None:
        return Check(FAIL, label, "llama-cpp-python is not installed",
                     "pip install 'voxpipe[local]' (make install does)")
    path = settings["model_path"]
    if path:
        problem = _gguf_problem(Path(path).expanduser())
        if problem:
            return Check(FAIL, label, f"model_path {path}: {problem}",
                         f"point llm.profiles.{name}.model_path at a .gguf model file (empty: the bundled Gemma)")
    flags = llama_runtime.machine_flags()
    try:
        result = _probe("--probe-model", path, settings["repack"], str(settings["n_threads"]))
    except subprocess.TimeoutExpired:
        return Check(FAIL, label, f"loading and decoding took over {PROBE_TIMEOUT_S:.0f} s",
                     f"use a smaller model, or raise llm.profiles.{name}.n_threads")
    if result.returncode < 0:
        amx = " ".join(sorted(flags & llama_runtime.AMX_FLAGS)) or "no AMX"
        repack = llama_runtime.repack_weights(settings["repack"], flags)
        fix = (f"set llm.profiles.{name}.repack = \"off\" (weight repacking is {'on' if repack else 'off'} now)"
               if repack else "run with log.level = \"debug\" and report the crash with the CPU flags above")
        return Check(FAIL, label, f"llama.cpp crashed with {_signal_name(result.returncode)} loading or decoding "
                                  f"the model; CPU: {amx}; {llama_runtime.repack_reason(settings['repack'], flags)}",
                     fix)
    if result.returncode:
        return Check(FAIL, label, _last_line(result.stderr),
                     f"check llm.profiles.{name}.model_path and that the file is a complete GGUF model")
    return Check(OK, label, result.stdout.strip())


def _gguf_problem(path: Path) -> str | None:
    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
    except FileNotFoundError:
        return "does not exist"
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    return None if magic == GGUF_MAGIC else "is not a GGUF file (it does not start with 'GGUF')"


# --- the rest --------------------------------------------------------------------------------

def audio(config: Config) -> Check:
    """Which player backend plays; probed in a child, because sound libraries are native and noisy."""
    backend = config["player"]["backend"]
    if backend in ("wav", "null"):
        return Check(OK, "audio", f"player.backend = {backend!r}: no sound card needed")
    try:
        result = _probe("--probe-audio", backend)
    except subprocess.TimeoutExpired:
        result = subprocess.CompletedProcess([], 1, "", "the sound device did not finish 20 ms of silence")
    if result.returncode < 0:
        return Check(FAIL, "audio", f"the {backend} backend crashed with {_signal_name(result.returncode)} "
                                    f"playing 20 ms of silence", "set player.backend = \"wav\" (or another backend)")
    chosen = result.stdout.strip()
    if backend == "auto" and chosen == "wav":
        where = config["player"]["wav_dir"] or "a new private temporary directory per run"
        return Check(WARN, "audio", f"no sound card plays here: replies are written as WAV files (in {where})",
                     "connect a sound device (or set player.backend = \"wav\" to silence this)")
    if result.returncode:
        return Check(FAIL, "audio", f"player.backend = {backend!r}: {_last_line(result.stderr)}",
                     "connect a sound device, or set player.backend = \"auto\" (falls back to WAV files)")
    return Check(OK, "audio", f"a sound device plays through {chosen}")


def extras(config: Config) -> Iterator[Check]:
    wanted = {"coqui": config["tts"]["engine"] == "coqui",
              "g4f": any(p.get("provider") == "g4f" for p in config["llm"]["profiles"].values())}
    for extra, module in (("coqui", "TTS"), ("g4f", "g4f")):
        if find_spec(module) is not None:
            yield Check(OK, f"extra {extra}", "installed")
        elif wanted[extra]:
            yield Check(FAIL, f"extra {extra}", "the config uses it but it is not installed",
                        f"pip install 'voxpipe[{extra}]'" + (" (see `make coqui`)" if extra == "coqui" else ""))
        else:
            yield Check(OK, f"extra {extra}", f"not installed (optional: pip install 'voxpipe[{extra}]')")


def cpu() -> Iterator[Check]:
    flags = llama_runtime.machine_flags()
    present = [flag for flag in llama_runtime.LLAMA_FLAGS if flag in flags]
    yield Check(OK, "cpu", "flags llama.cpp uses: " + (" ".join(present) or "none (not x86-64, or unreadable)"))
    if find_spec("llama_cpp") is not None:
        variants = llama_runtime.cpu_variants()
        build = (f"portable build, CPU variants: {' '.join(variants)}" if variants
                 else "native build (compiled for the CPU that built it)")
        yield Check(OK, "llama.cpp", f"{build}; with repack = 'auto': {llama_runtime.repack_reason('auto', flags)}")


# --- the probes (run as `python -m voxpipe.ops.doctor --probe-...` in a child) ------------------

def _probe_espeak() -> None:
    from ..stages.tts.engines.espeak import EspeakEngine
    frames = list(EspeakEngine().synthesize("hello", lambda: False))
    samples = sum(len(frame.pcm) for frame in frames) // frames[0].format.block_align if frames else 0
    if not samples:
        sys.exit("espeak-ng produced no audio for 'hello'")
    print(f"speaks: 'hello' is {samples / frames[0].format.rate:.2f} s of audio at {frames[0].format.rate} Hz")


def _probe_model(path: str, repack: str, threads: str) -> None:
    import time

    from llama_cpp import Llama

    from ..stages.llm.providers.local import bundled_model_path
    model = path or bundled_model_path()
    flags = llama_runtime.machine_flags()
    started = time.monotonic()
    with llama_runtime.model_params(repack=llama_runtime.repack_weights(repack, flags)):
        llama = Llama(model_path=model, n_ctx=256, n_threads=int(threads) or os.cpu_count() or 1, verbose=False)
    result = llama.create_completion("The capital of France is", max_tokens=4, temperature=0.0)
    assert isinstance(result, dict), "a completion without stream=True is one response"
    text = result["choices"][0]["text"]
    print(f"{Path(model).name} loads and decodes ({len(text.split())} words in {time.monotonic() - started:.1f} s); "
          f"{llama_runtime.repack_reason(repack, flags)}")


def _probe_audio(backend: str) -> None:
    import importlib

    from ..stages.player.backends import BACKENDS, best_backend
    if backend == "auto":
        print(best_backend())
        return
    try:
        plays = importlib.import_module(BACKENDS[backend].partition(":")[0]).plays_silence()
    except (ImportError, OSError) as exc:
        sys.exit(f"cannot load ({exc}); pip install 'voxpipe[audio]', or use player.backend = \"auto\"")
    if not plays:
        sys.exit("finds no sound device that plays")
    print(backend)


if __name__ == "__main__":
    if sys.argv[1] == "--probe-espeak":
        _probe_espeak()
    elif sys.argv[1] == "--probe-audio":
        _probe_audio(sys.argv[2])
    elif sys.argv[1] == "--probe-model":
        _probe_model(*sys.argv[2:5])
