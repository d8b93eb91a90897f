"""Config resolution (defaults, file, environment) and errors that name file, key and what is allowed."""

from __future__ import annotations

import subprocess
from dataclasses import fields
from pathlib import Path

import pytest

from tests.harness import PYTHON, ROOT, base_env
from voxpipe.config import ConfigError, full_schema, load


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "voxpipe.toml"
    path.write_text(text)
    return path


def test_defaults_work_offline(tmp_path: Path) -> None:
    config = load(env={"XDG_CONFIG_HOME": str(tmp_path)})
    assert config.path is None
    assert config.profile()["provider"] == "local" and config.profile()["stream"] is True
    assert config["tts"]["engine"] == "espeak"
    assert config["player"]["backend"] == "auto"


def test_file_then_environment_override(tmp_path: Path) -> None:
    path = write(tmp_path, '[llm.profiles.openai]\nmodel = "from-file"\nstream = true\n[player]\nbackend = "wav"\n')
    config = load(path, env={"VOXPIPE_LLM__PROFILES__OPENAI__STREAM": "false",
                             "VOXPIPE_LLM__PROFILES__OPENAI__BASE_URL": "http://127.0.0.1:9/v1",
                             "VOXPIPE_LLM__HISTORY_LIMIT": "7"})
    openai = config.profile("openai")
    assert openai["model"] == "from-file" and openai["stream"] is False
    assert openai["base_url"] == "http://127.0.0.1:9/v1"
    assert config["llm"]["history_limit"] == 7 and config["player"]["backend"] == "wav"


def test_first_token_total_s_bounds_the_silence_before_the_first_token_by_default(tmp_path: Path) -> None:
    config = load(env={"XDG_CONFIG_HOME": str(tmp_path)})
    assert all(config.profile(name)["first_token_total_s"] == 30.0 for name in ("local", "openai", "gemini"))
    path = write(tmp_path, '[llm.profiles.openai]\nfirst_token_total_s = 12.5\n')
    config = load(path, env={"VOXPIPE_LLM__PROFILES__GEMINI__FIRST_TOKEN_TOTAL_S": "8"})
    assert (config.profile("openai")["first_token_total_s"], config.profile("gemini")["first_token_total_s"]) == (
        12.5, 8.0)


def test_voxpipe_config_variable_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[player]\nbackend = "null"\n')
    assert load(env={"VOXPIPE_CONFIG": str(path)})["player"]["backend"] == "null"


def test_environment_can_define_a_new_profile(tmp_path: Path) -> None:
    config = load(env={"XDG_CONFIG_HOME": str(tmp_path), "VOXPIPE_LLM__PROFILES__MINE__PROVIDER": "openai",
                       "VOXPIPE_LLM__PROFILES__MINE__MODEL": "m", "VOXPIPE_LLM__PROFILE": "mine"})
    assert config.profile()["name"] == "mine" and config.profile()["max_tokens"] == 200


@pytest.mark.parametrize("text, expected", [
    ('[player]\nbackend = "speakers"\n', r"voxpipe.toml: key player.backend = 'speakers' is not allowed; "
                                         r"expected one of: auto, simpleaudio, sounddevice, wav, null"),
    ('[llm.profiles.local]\nstream = "yes"\n', r"key llm.profiles.local.stream = 'yes' is not allowed; "
                                                r"expected true or false"),
    ('[tts]\nengnie = "espeak"\n', r"unknown key tts.engnie; allowed: coqui, engine, espeak, null, openai-speech"),
    ('[llm]\nprofile = "nope"\n', r"llm.profile = 'nope' names no profile"),
    ('[llm.profiles.x]\nmodel = "m"\n', r"profile llm.profiles.x needs provider"),
    ('[bus\n', r"is not valid TOML"),
    ('[run]\nstages = ["llm", "brain"]\n', r"expected a list drawn from"),
    ('[chunker]\nmax_chars = 5\n', r"key chunker.max_chars: expected an integer >= 20, got 5"),
    ('[llm.profiles.local]\nrepack = "maybe"\n', r"key llm.profiles.local.repack = 'maybe' is not allowed; "
                                                   r"expected one of: auto, on, off"),
    ('[llm.profiles.openai]\nfirst_token_total_s = 0\n', r"key llm.profiles.openai.first_token_total_s = 0 is not "
                                                        r"allowed; expected a number from 0.1 to 3600.0"),
    ('[llm.profiles.local]\nprompt_style = "story"\n', r"key llm.profiles.local.prompt_style = 'story'"),
    ('[llm.profiles.openai]\nprompt_style = "dialogue"\n', r"llm.profiles.openai.prompt_style = 'dialogue' "
                                                            r"needs a raw-completion provider \(local\)"),
])
def test_invalid_file_names_file_key_and_allowed(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=expected) as error:
        load(path, env={})
    assert str(path) in str(error.value)


def test_invalid_environment_value_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"environment variable VOXPIPE_LLM__HISTORY_LIMIT: key "
                                          r"llm.history_limit = 'many' is not allowed; expected an integer"):
        load(env={"XDG_CONFIG_HOME": str(tmp_path), "VOXPIPE_LLM__HISTORY_LIMIT": "many"})


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "absent.toml", env={})


def test_cli_exits_2_with_one_clear_line_on_bad_config(tmp_path: Path) -> None:
    path = write(tmp_path, '[player]\nbackend = "speakers"\n')
    result = subprocess.run([PYTHON, "-m", "launcher", "--config", str(path), "status"], cwd=ROOT,
                            env=base_env(), text=True, capture_output=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "player.backend" in result.stderr


def test_example_config_is_valid_and_documents_every_key() -> None:
    from voxpipe.stages.chunker.core import ChunkerPolicy
    example = ROOT / "deploy" / "voxpipe.example.toml"
    config = load(example, env={})
    text = example.read_text()
    assert ChunkerPolicy.from_mapping(config["chunker"]) == ChunkerPolicy()
    assert set(config["chunker"]) == {field.name for field in fields(ChunkerPolicy)}
    for key in full_schema().profile:
        assert f"{key} =" in text, f"profile key {key} is not documented"
    for section, keys in config.data.items():
        if section == "llm":
            keys = {key: value for key, value in keys.items() if key != "profiles"}
        for key in keys:
            assert f"{key} =" in text or f"[{section}.{key}]" in text, f"{section}.{key} is not documented"


def test_env_names_reach_hyphenated_tables_with_underscores() -> None:
    """Shells and systemd cannot export '-' in a name, so OPENAI_SPEECH stands for openai-speech."""
    config = load(env={"VOXPIPE_TTS__OPENAI_SPEECH__SPEED": "1.5", "VOXPIPE_TTS__OPENAI-SPEECH__VOICE": "nova"})
    assert (config["tts"]["openai-speech"]["speed"], config["tts"]["openai-speech"]["voice"]) == (1.5, "nova")
    with pytest.raises(ConfigError, match="environment variable VOXPIPE_TTS__OPENAI_SPEECH__SPEED"):
        load(env={"VOXPIPE_TTS__OPENAI_SPEECH__SPEED": "fast"})
