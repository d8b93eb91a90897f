"""Engine-independent TTS behaviour: number normalisation per language."""

from __future__ import annotations

from voxpipe.config import load
from voxpipe.stages.tts.normalize import language_of, spell_numbers


def test_numbers_are_spelled_in_the_chunks_language_only_when_configured() -> None:
    assert spell_numbers("У меня 42 кошки и 2,5 собаки.", ["ru"]) == \
        "У меня сорок два кошки и две целых пять десятых собаки."
    assert spell_numbers("I have 7 apples and pi is 3.14.", ["en"]) == \
        "I have seven apples and pi is three point one four."
    assert spell_numbers("I have 7 apples.", ["ru"]) == "I have 7 apples."
    assert language_of("Hello, мир") == "ru" and language_of("Hello") == "en"


def test_times_dates_versions_and_glued_numbers_are_left_to_the_engine() -> None:
    text = "At 12:30 on 30.11.2026 install 1.2.3 or the mp3 build."
    assert spell_numbers(text, ["en"]) == text


def test_defaults_leave_numbers_to_engines_that_read_them_themselves(tmp_path) -> None:
    tts = load(env={"XDG_CONFIG_HOME": str(tmp_path)})["tts"]
    assert tts["espeak"]["normalize_numbers"] == [] and tts["openai-speech"]["normalize_numbers"] == []
    assert tts["coqui"]["normalize_numbers"] == ["ru", "en"]
