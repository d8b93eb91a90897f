"""API keys from the environment or a 0600 file; never in logs, on the bus or in `voxpipe status`."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import PYTHON, ROOT, Daemon, base_env, fake_openai, write_toml
from voxpipe import protocol
from voxpipe.config import ConfigError
from voxpipe.runtime import Connection, endpoints_for
from voxpipe.secrets import CUT_KEY_MIN, read_key, scrub
from voxpipe.stages.llm.providers.base import ERROR_TEXT_LIMIT, quote

PRIMARY = "sk-voxpipe-file-primary-5f2c9e0d71ab4438"
"""Refused by the fake server (it takes only `test-key`), so the reply rotates to the reserve."""
RESERVE = "test-key"


@pytest.fixture()
def home() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="vp-secret-"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def key_file(home: Path, text: str, mode: int = 0o600) -> Path:
    path = home / "openai.key"
    path.write_text(text)
    os.chmod(path, mode)
    return path


def test_keys_come_from_the_file_then_the_environment(home: Path) -> None:
    path = key_file(home, f"# my keys\n{PRIMARY}\n\n  second-key  \n")
    profile = {"name": "p", "api_key_file": str(path), "api_key_env": "K1", "reserve_key_envs": ["K2", "K3"]}
    assert read_key(profile, env={"K1": "env-key", "K2": "second-key", "K3": ""}) == \
        [PRIMARY, "second-key", "env-key"]
    assert read_key({"name": "p", "api_key_env": "K1", "reserve_key_envs": ["K2"]},
                    env={"K1": "a", "K2": "b"}) == ["a", "b"]
    assert read_key({"name": "p", "api_key_env": "", "reserve_key_envs": []}, env={}) == []


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_key_file_looser_than_0600_is_refused(home: Path, mode: int) -> None:
    path = key_file(home, PRIMARY, mode)
    with pytest.raises(ConfigError) as caught:
        read_key({"name": "openai", "api_key_file": str(path)})
    message = str(caught.value)
    assert "llm.profiles.openai.api_key_file" in message and f"mode {mode:o}" in message
    assert f"chmod 600 {path}" in message and PRIMARY not in message
    os.chmod(path, 0o400)
    assert read_key({"name": "openai", "api_key_file": str(path)}) == [PRIMARY]
    with pytest.raises(ConfigError, match="does not exist"):
        read_key({"name": "openai", "api_key_file": str(home / "missing")})


def test_messages_name_the_table_the_keys_are_configured_in(home: Path) -> None:
    """read_key serves a profile and tts.openai-speech alike; what it refuses names the right key."""
    path = key_file(home, PRIMARY, 0o644)
    with pytest.raises(ConfigError, match=r"key tts.openai-speech.api_key_file: .* has mode 644"):
        read_key({"api_key_file": str(path)}, table="tts.openai-speech")


def test_scrub_takes_the_key_and_its_echoed_prefix_out() -> None:
    assert scrub(f"key {PRIMARY} and {PRIMARY[:8]}...", PRIMARY) == "key *** and ***..."
    assert scrub("nothing", "") == "nothing"


@pytest.mark.parametrize("kept", range(CUT_KEY_MIN, len(PRIMARY)))
def test_scrub_takes_out_a_key_cut_off_at_the_end(kept: int) -> None:
    """A body read only in part ends in the key's first characters, which no longer match the key."""
    assert scrub(f"echo: {PRIMARY[:kept]}", PRIMARY) == "echo: ***"


def test_quote_scrubs_before_it_clips() -> None:
    """Clipping first would cut the key, and leave its secret part to be shown."""
    key = "sk-proj-" + "abcdefghijklmnopqrstuvwxyz0123456789"
    for before in range(ERROR_TEXT_LIMIT + 1):
        text = quote("~" * before + key + "~" * ERROR_TEXT_LIMIT, key)
        assert not any(key[start:start + 6] in text for start in range(8, len(key) - 5)), before


def test_the_llm_stage_refuses_a_readable_key_file_at_start(home: Path) -> None:
    path = key_file(home, PRIMARY, 0o644)
    config = home / "voxpipe.toml"
    write_toml(config, {"bus": {"runtime_dir": str(home / "run")},
                        "llm": {"profile": "file", "profiles": {"file": {
                            "provider": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m",
                            "api_key_file": str(path)}}}})
    result = subprocess.run([PYTHON, "-m", "launcher", "--config", str(config), "stage", "llm"], cwd=ROOT,
                            env=base_env({"XDG_CONFIG_HOME": str(home)}), text=True, capture_output=True,
                            timeout=60)
    assert result.returncode == 2
    assert f"chmod 600 {path}" in result.stderr and PRIMARY not in result.stderr


def test_file_keys_never_reach_logs_the_bus_or_status(home: Path) -> None:
    path = key_file(home, f"{PRIMARY}\n{RESERVE}\n")
    with fake_openai() as url:
        settings = {"log": {"level": "debug"},
                    "llm": {"profile": "file", "profiles": {"file": {
                        "provider": "openai", "base_url": url, "model": "fake-model", "api_key_file": str(path)}}}}
        with Daemon(settings) as daemon:
            tap = Connection("secret-tap", endpoints_for(daemon.config()), [b""])
            tap.open()
            frames: list[bytes] = []
            stop = threading.Event()

            def collect() -> None:
                while not stop.is_set():
                    if (message := tap.receive(0.1)) is not None:
                        frames.append(protocol.encode(message))

            collector = threading.Thread(target=collect)
            collector.start()
            try:
                # the primary key is refused (401): the reply rotates to the file's reserve key and completes
                reply = daemon.say("keep it secret")
                status = daemon.run_cli("status")
                tapped = subprocess.Popen(daemon.cli("tap"), cwd=ROOT, env=daemon.env, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                time.sleep(0.3)
                again = daemon.say("and again", "--session", "second")
                time.sleep(0.5)
                tapped.kill()
                tap_output = tapped.communicate()[0]
            finally:
                stop.set()
                collector.join()
                tap.close()
            log = "".join(daemon.log)
    assert reply.returncode == 0 and "Echo: keep it secret." in reply.stdout, reply.stderr
    assert again.returncode == 0, again.stderr
    assert status.returncode == 0 and "llm" in status.stdout
    assert "key 1 of profile file refused" in log  # the file's primary really was tried, then rotated
    assert frames and "request" in tap_output
    for secret in (PRIMARY, RESERVE, PRIMARY[:16]):
        assert not any(secret.encode() in frame for frame in frames), secret
        assert secret not in log
        assert secret not in reply.stdout + reply.stderr + again.stdout + again.stderr
        assert secret not in status.stdout + status.stderr
        assert secret not in tap_output
