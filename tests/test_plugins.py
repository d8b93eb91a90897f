"""Plugins declare their own settings in their registries; config reads them there and agrees with them.

A plugin is one module and one registry entry: these tests keep every other place that could
name a plugin or one of its keys (the config's allowed names, the example config, a plugin's
own tables) in step with the registries.
"""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests.harness import PYTHON, ROOT
from voxpipe.config import STAGES, ConfigError, full_schema, load
from voxpipe.plugins import load_class
from voxpipe.stages.llm.providers import PROVIDERS
from voxpipe.stages.player.backends import BACKENDS, create_backend
from voxpipe.stages.tts.engines import ENGINES, create_engine

EXAMPLE = ROOT / "deploy" / "voxpipe.example.toml"
REGISTRIES = {"provider": PROVIDERS, "tts engine": ENGINES, "player backend": BACKENDS}
HEAVY = ("openai", "requests", "torch", "TTS", "llama_cpp", "sounddevice", "simpleaudio", "g4f", "espeakng_loader")


DECLARED = [(kind, name, key, setting) for kind, registry in REGISTRIES.items()
            for name, entry in registry.items() for key, setting in entry.settings.items()]
"""(kind, plugin, key, setting) for every setting every plugin declares."""
EACH_SETTING = pytest.mark.parametrize("kind, name, key, setting", DECLARED,
                                       ids=[f"{name}.{key}" for _, name, key, _ in DECLARED])


# --- the names ----------------------------------------------------------------------------------------

def test_config_allows_exactly_the_registered_names() -> None:
    schema = full_schema()
    assert schema.schema["tts"]["engine"].describe == f"one of: {', '.join(ENGINES)}"
    assert set(schema.schema["tts"]) == {"engine", *ENGINES}
    assert schema.schema["player"]["backend"].describe == f"one of: {', '.join(['auto', *BACKENDS])}"
    assert schema.profile["provider"].describe == f"one of: {', '.join(PROVIDERS)}"


def test_config_stages_are_the_registered_stages() -> None:
    """services/runtime/registry.py imports the bus runtime, so config keeps its own list; it must not drift."""
    from voxpipe.runtime.registry import STAGES as REGISTERED
    assert set(STAGES) == set(REGISTERED) - {"bus"}


@pytest.mark.parametrize("kind, name", [(kind, name) for kind, registry in REGISTRIES.items() for name in registry])
def test_every_registered_class_carries_its_registry_name(kind: str, name: str) -> None:
    assert load_class(REGISTRIES[kind], name, kind).name == name


def test_the_http_wires_are_the_declared_ones() -> None:
    from voxpipe.stages.llm.providers.http import WIRES
    assert PROVIDERS["http"].settings["wire"].rule.describe == f"one of: {', '.join(WIRES)}"


# --- the settings -------------------------------------------------------------------------------------

@EACH_SETTING
def test_every_setting_has_a_doc_and_a_default_its_rule_accepts(kind: str, name: str, key: str, setting: Any) -> None:
    assert setting.doc and setting.rule.accepts(setting.default)


def test_a_key_plugins_of_one_kind_share_is_declared_once() -> None:
    """A profile (and [player]) holds every provider's (backend's) keys, so a shared key must mean one thing."""
    for kind in ("provider", "player backend"):
        seen: dict[str, Any] = {}
        for key, setting in ((k, s) for entry in REGISTRIES[kind].values() for k, s in entry.settings.items()):
            assert seen.setdefault(key, setting) is setting, f"{kind} key {key} is declared twice"


def table_of(kind: str, name: str) -> str:
    return {"provider": "llm.profiles.mine", "tts engine": f"tts.{name}", "player backend": "player"}[kind]


def toml_of(kind: str, name: str, key: str, value: str) -> str:
    if kind == "provider":
        return f'[llm.profiles.mine]\nprovider = "{name}"\n{key} = {value}\n'
    return f"[{table_of(kind, name)}]\n{key} = {value}\n"


@EACH_SETTING
def test_every_declared_setting_is_validated_by_load(tmp_path: Path, kind: str, name: str, key: str,
                                                     setting: Any) -> None:
    """A value of the wrong type is refused at load, naming the file and the key, as for config's own keys."""
    wrong = "3" if setting.rule.kind in (str, list, dict) else '"three"'
    path = tmp_path / "voxpipe.toml"
    path.write_text(toml_of(kind, name, key, wrong))
    with pytest.raises(ConfigError, match=rf"config error in {path}: key {table_of(kind, name)}\.{key}"):
        load(path, env={})


def test_a_plugin_setting_is_set_by_environment_too() -> None:
    config = load(env={"VOXPIPE_TTS__ESPEAK__MAX_FRAME_MS": "40", "VOXPIPE_PLAYER__WAV_DIR": "/tmp/x",
                       "VOXPIPE_LLM__PROFILES__LOCAL__N_CTX": "4096"})
    assert config["tts"]["espeak"]["max_frame_ms"] == 40 and config["player"]["wav_dir"] == "/tmp/x"
    assert config.profile("local")["n_ctx"] == 4096


def test_the_example_config_documents_every_declared_setting_with_its_default() -> None:
    example = tomllib.loads(EXAMPLE.read_text())
    text = EXAMPLE.read_text()
    for name, entry in ENGINES.items():
        assert example["tts"][name] == {key: setting.default for key, setting in entry.settings.items()}, name
    for entry in BACKENDS.values():
        for key, setting in entry.settings.items():
            assert example["player"][key] == setting.default, key
    for kind, name, key, _ in DECLARED:
        if kind == "provider":
            assert f"{key} =" in text, f"profile key {key} ({name}) is not documented"


# --- building -----------------------------------------------------------------------------------------

def test_a_plugin_takes_its_keys_from_its_table_and_checks_what_it_is_given(tmp_path: Path) -> None:
    """Every plugin is built from the table it is configured by; keys given one by one go over it."""
    backend = create_backend("wav", {"backend": "wav", "wav_dir": str(tmp_path), "volume": "others' key"})
    assert backend.wav_dir == tmp_path
    engine = create_engine("null", {"frame_ms": 20})
    assert [frame.duration_ms for frame in engine.synthesize("Hi.", lambda: False)] == [20]
    with pytest.raises(ValueError, match=r"^key tts.null.frame_ms = 0 is not allowed; expected an integer from 1"):
        create_engine("null", {"frame_ms": 0})
    engine_class = load_class(ENGINES, "null", "tts engine")
    with pytest.raises(ValueError, match=r"^unknown key tts.null.frames; allowed: frame_ms, normalize_numbers"):
        engine_class(frames=20)
    overridden = engine_class({"frame_ms": 20}, frame_ms=40)
    assert [frame.duration_ms for frame in overridden.synthesize("Hi.", lambda: False)] == [40]


def test_loading_the_config_imports_no_plugin_and_no_heavy_library() -> None:
    """Every process loads the config, `voxpipe say` included: the registries are read, never a plugin module."""
    script = (f"import sys; from voxpipe.config import load; load({str(EXAMPLE)!r}, env={{}}); "
              f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r} "
              f"or m.startswith(('voxpipe.stages.llm.providers.', 'voxpipe.stages.tts.engines.', "
              f"'voxpipe.stages.player.backends.'))))")
    result = subprocess.run([PYTHON, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
