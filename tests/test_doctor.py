"""`voxpipe doctor` on real parts: each check's OK and failure branch, through the real CLI in a real process."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.harness import PYTHON, ROOT, Daemon, base_env, write_toml
from voxpipe.stages.llm.llama_runtime import AMX_FLAGS, machine_flags

pytestmark = pytest.mark.native  # it loads llama.cpp (in its own child); a crash fails one test

NO_SOUND_CARD = 'pcm.!default { type hw card 97 }\nctl.!default { type hw card 97 }\n'


def doctor(tmp_path: Path, settings: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
           config_text: str | None = None) -> tuple[int, dict[str, str], str]:
    """Run `voxpipe doctor`; return its exit code, {check name: its line and fix}, and the whole output."""
    config = tmp_path / "voxpipe.toml"
    if config_text is not None:
        config.write_text(config_text)
    else:
        base: dict[str, Any] = {"bus": {"runtime_dir": str(tmp_path / "run")}}
        for section, values in (settings or {}).items():
            base.setdefault(section, {}).update(values)
        write_toml(config, base)
    result = subprocess.run([PYTHON, "-m", "launcher", "doctor", "--config", str(config)], cwd=ROOT,
                            env=base_env(env), capture_output=True, text=True, timeout=600)
    lines: dict[str, str] = {}
    name = ""
    for line in result.stdout.splitlines():
        if line[:5].strip() in ("OK", "WARN", "FAIL"):
            name = line[6:20].strip()
            lines[name] = line
        elif line.strip().startswith("fix:") and name:
            lines[name] += "\n" + line.strip()
    return result.returncode, lines, result.stdout + result.stderr


def test_a_working_first_run_passes(tmp_path: Path) -> None:
    code, checks, out = doctor(tmp_path)
    assert code == 0, out
    assert checks["config"].startswith("OK") and checks["runtime dir"].startswith("OK")
    assert "no daemon is running" in checks["bus"]
    assert checks["espeak-ng"].startswith("OK") and "speaks" in checks["espeak-ng"]
    assert checks["llm local"].startswith("OK") and "loads and decodes" in checks["llm local"], out
    assert checks["llm openai"].startswith(("OK", "WARN"))  # not the default profile: never a failure
    assert checks["audio"].startswith("OK")  # the ALSA null device plays
    assert "flags llama.cpp uses" in checks["cpu"]
    assert out.rstrip().endswith("doctor: ready")


def test_a_broken_config_names_the_file_and_key(tmp_path: Path) -> None:
    code, checks, _ = doctor(tmp_path, config_text='[player]\nbackend = "speakers"\n')
    assert code == 1
    assert checks["config"].startswith("FAIL") and "voxpipe.toml" in checks["config"]
    assert "player.backend = 'speakers'" in checks["config"] and "fix:" in checks["config"]
    assert "cpu" in checks  # the checks that need no config still run


def test_a_runtime_dir_open_to_others_is_refused_with_the_chmod(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o755)
    run.chmod(0o755)
    code, checks, _ = doctor(tmp_path)
    assert code == 1
    assert checks["runtime dir"].startswith("FAIL") and "mode 755" in checks["runtime dir"]
    assert f"fix: chmod 700 {run}" in checks["runtime dir"]


def test_a_running_daemon_is_reached(tmp_path: Path) -> None:
    with Daemon({"run": {"stages": ["history"]}}) as daemon:
        _, checks, out = doctor(tmp_path, {"bus": {"runtime_dir": str(daemon.runtime_dir)}})
    assert checks["bus"] == "OK    bus            a daemon is running and answers", out


def test_a_model_file_that_is_not_a_gguf(tmp_path: Path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"<html>404 Not Found</html>")
    code, checks, _ = doctor(tmp_path, {"llm": {"profiles": {"local": {"provider": "local",
                                                                       "model_path": str(fake)}}}})
    assert code == 1
    assert checks["llm local"].startswith("FAIL") and "is not a GGUF file" in checks["llm local"]
    assert "fix: point llm.profiles.local.model_path at a .gguf model file" in checks["llm local"]


def test_a_missing_key_variable_fails_the_default_profile_and_never_prints_a_key(tmp_path: Path) -> None:
    settings = {"llm": {"profile": "openai"}}
    code, checks, _ = doctor(tmp_path, settings, env={"OPENAI_API_KEY": ""})
    assert code == 1
    assert checks["llm openai"].startswith("FAIL") and "$OPENAI_API_KEY is not set" in checks["llm openai"]
    assert "fix: export OPENAI_API_KEY=..." in checks["llm openai"]
    secret = "sk-doctor-test-0123456789abcdef"
    code, checks, out = doctor(tmp_path, settings, env={"OPENAI_API_KEY": secret})
    assert checks["llm openai"].startswith("OK") and "1 key(s) found in OPENAI_API_KEY" in checks["llm openai"]
    assert secret not in out and secret[:8] not in out


def test_no_sound_card(tmp_path: Path) -> None:
    card = tmp_path / "no-card.conf"
    card.write_text(NO_SOUND_CARD)
    env = {"ALSA_CONFIG_PATH": str(card)}
    code, checks, _ = doctor(tmp_path, {"player": {"backend": "auto"}}, env=env)
    assert checks["audio"].startswith("WARN") and "written as WAV files" in checks["audio"]
    code, checks, _ = doctor(tmp_path, {"player": {"backend": "simpleaudio"}}, env=env)
    assert code == 1
    assert checks["audio"].startswith("FAIL") and "finds no sound device" in checks["audio"]
    assert 'player.backend = "auto"' in checks["audio"]


def test_forced_repacking_on_this_cpu_is_reported_right(tmp_path: Path) -> None:
    """With repack = "on", an AMX CPU crashes in llama.cpp: doctor names the signal, the CPU and the fix.
    Elsewhere the same setting works. Both outcomes are asserted; which one applies is this machine's."""
    code, checks, out = doctor(tmp_path, {"llm": {"profiles": {"local": {"provider": "local", "repack": "on"}}}})
    if machine_flags() & AMX_FLAGS:
        assert code == 1
        line = checks["llm local"]
        assert line.startswith("FAIL") and "crashed with SIG" in line and "amx_tile" in line, out  # SEGV or ILL
        assert 'fix: set llm.profiles.local.repack = "off"' in line
    else:
        assert checks["llm local"].startswith("OK"), out


def test_the_game_link_port_taken_by_another_program_is_named(tmp_path: Path) -> None:
    import socket
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        settings = {"game": {"enabled": True, "port": port, "voice_dir": str(tmp_path / "voices")}}
        _, checks, out = doctor(tmp_path, settings)
    assert checks["game port"].startswith("WARN") and "NeuroMita" in checks["game port"], out
    assert checks["game voices"].startswith("OK") and "Z:" in checks["game voices"]
