"""The espeak-ng engine on the real library that espeakng-loader ships."""

from __future__ import annotations

import itertools
import threading
from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voxpipe.stages.audio import AudioFormat
from voxpipe.stages.tts.engines import create_engine
from voxpipe.stages.tts.engines.base import VoiceError
from voxpipe.stages.tts.engines.espeak import EspeakEngine

RU = "Привет! Сегодня хорошая погода, и мы идём гулять в парк."
EN = "Hello there! The weather is fine today, so we are going for a walk."
LONG_EN = "This sentence is repeated to make a long text. " * 60
NEVER = lambda: False  # noqa: E731


@pytest.fixture(scope="module")
def engine() -> EspeakEngine:
    return create_engine("espeak", {"voice": "auto"})


def pcm_of(engine: EspeakEngine, text: str, voice: str = "") -> bytes:
    return b"".join(frame.pcm for frame in engine.synthesize(text, NEVER, voice))


def same_speech(a: bytes, b: bytes) -> bool:
    """espeak-ng is not bit-reproducible (its wave generator carries state and noise from one
    synthesis to the next), so the same speech is recognised by its length, within 1%."""
    return abs(len(a) - len(b)) <= 0.01 * len(b)


def crossings(pcm: bytes) -> float:
    """Sign changes per sample: a higher voice (a female variant such as +f3) changes sign more often,
    which the length alone does not show (+f3 says the same words in about the same time)."""
    samples = array("h", pcm)
    return sum(1 for a, b in itertools.pairwise(samples) if (a < 0) != (b < 0)) / max(len(samples), 1)


@pytest.mark.parametrize("text", [RU, EN, "Скажи hello по-английски, пожалуйста."], ids=["ru", "en", "mixed"])
def test_speech_is_audible_and_framed(engine, text):
    frames = list(engine.synthesize(text, NEVER))
    assert {frame.format for frame in frames} == {AudioFormat(rate=22050, channels=1, sample_width=2)}
    assert all(0 < frame.duration_ms <= 200 for frame in frames)
    assert sum(frame.duration_ms for frame in frames) > 1000
    assert max(abs(sample) for sample in array("h", b"".join(f.pcm for f in frames))) > 1000


def test_auto_voice_is_ru_for_cyrillic_else_en(engine):
    assert [engine.voice_for(text) for text in (RU, EN, "Скажи hello", "123")] == ["ru", "en", "ru", "en"]
    ru_speech = pcm_of(EspeakEngine(voice="ru"), RU)
    assert same_speech(pcm_of(engine, RU), ru_speech)
    assert not same_speech(pcm_of(EspeakEngine(voice="en"), RU), ru_speech)  # en spells Cyrillic out


def test_fixed_voice_is_used_for_any_text():
    assert EspeakEngine(voice="en-us").voice_for(RU) == "en-us"


def test_a_synthesis_can_choose_its_own_voice(engine):
    fixed = EspeakEngine(voice="en")
    assert [fixed.voice_for(RU, voice) for voice in ("", "ru", "auto")] == ["en", "ru", "ru"]
    ru_speech = pcm_of(EspeakEngine(voice="ru"), RU)
    assert same_speech(pcm_of(fixed, RU, "ru"), ru_speech)
    assert not same_speech(pcm_of(fixed, RU), ru_speech)  # the next synthesis is in the configured voice again
    assert crossings(pcm_of(engine, EN, "en+f3")) > 1.2 * crossings(pcm_of(engine, EN))


@pytest.mark.parametrize("spelling", ["en+F3", "EN+female3", "gmw/en+f3", "English (Great Britain)+f3"])
def test_voices_are_found_by_any_of_espeaks_names_in_any_case(engine, spelling):
    assert crossings(pcm_of(engine, EN, spelling)) > 1.2 * crossings(pcm_of(engine, EN))


@pytest.mark.parametrize("voice", ["xx-nope", "en+zzz", "f3", "+f3", "en+", "../../etc/passwd", "en\x00x"])
def test_an_unknown_voice_is_refused_before_any_audio_and_the_choices_are_listed(engine, voice):
    """espeak itself would take most of these: it drops an unknown variant silently, loads a bare
    variant with no language, and cuts a name at NUL."""
    frames = engine.synthesize(EN, NEVER, voice)
    with pytest.raises(VoiceError) as refused:
        next(frames)
    text = str(refused.value)
    assert repr(voice) in text and "Languages: af, " in text and ", en, " in text and ", ru, " in text
    assert "Variants: adam, " in text and ", f3, " in text
    assert len(text) < 1900   # fits an error event (2000) with the stage's own words
    assert same_speech(pcm_of(engine, EN), pcm_of(EspeakEngine(), EN))  # the library is unharmed


def test_smaller_frames_carry_the_same_audio(engine):
    frames = list(EspeakEngine(max_frame_ms=30).synthesize(EN, NEVER))
    assert all(frame.duration_ms <= 30 for frame in frames)
    assert same_speech(b"".join(frame.pcm for frame in frames), pcm_of(engine, EN))


def test_prosody_options_change_the_audio(engine):
    normal = pcm_of(engine, EN)
    assert len(pcm_of(EspeakEngine(rate=350), EN)) < 0.7 * len(normal)
    assert max(array("h", pcm_of(EspeakEngine(volume=20), EN))) < 0.5 * max(array("h", normal))
    assert same_speech(pcm_of(engine, EN), normal)  # another engine's settings do not leak


def test_stop_ends_at_the_next_frame_and_the_library_recovers(engine):
    frames = []
    for frame in engine.synthesize(LONG_EN, lambda: len(frames) >= 2):
        frames.append(frame)
    assert len(frames) == 2
    assert same_speech(pcm_of(engine, EN), pcm_of(EspeakEngine(), EN))


def test_frames_stream_while_espeak_is_still_synthesising(engine):
    frames = engine.synthesize(LONG_EN * 3, NEVER)
    next(frames)
    assert any(thread.name == "espeak" for thread in threading.enumerate())
    frames.close()


def test_abandoned_stream_frees_the_library_for_other_threads(engine):
    frames = engine.synthesize(LONG_EN, NEVER)
    next(frames)
    frames.close()
    done = []
    worker = threading.Thread(target=lambda: done.append(pcm_of(engine, EN)))
    worker.start()
    worker.join(timeout=10)
    assert done, "synthesis after a closed stream hung: the process-wide lock was not released"


def test_concurrent_syntheses_are_serialised_not_mixed(engine):
    expected = {RU: pcm_of(engine, RU), EN: pcm_of(engine, EN)}
    results: dict[int, bytes] = {}
    texts = [RU, EN] * 4
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, pcm_of(engine, texts[i])))
               for i in range(len(texts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert all(same_speech(results[i], expected[text]) for i, text in enumerate(texts))


@pytest.mark.parametrize("text", ["", "   ", "\n\t "])
def test_blank_text_yields_nothing(engine, text):
    assert list(engine.synthesize(text, NEVER)) == []


@settings(max_examples=25, deadline=None)
@given(st.text(max_size=40))
def test_any_text_gives_whole_bounded_frames(engine, text):
    frames = list(engine.synthesize(text, NEVER))
    assert all(0 < frame.duration_ms <= 200 and frame.format.rate == 22050 for frame in frames)
    if not text.strip():
        assert frames == []


def test_invalid_voice_is_named():
    with pytest.raises(ValueError, match="xx-nope"):
        create_engine("espeak", {"voice": "xx-nope"})


@pytest.mark.parametrize("option", [{"rate": 10}, {"pitch": 101}, {"volume": -1}, {"max_frame_ms": 0}])
def test_out_of_range_options_are_refused(option):
    with pytest.raises(ValueError, match=next(iter(option))):
        create_engine("espeak", option)


def test_unknown_engine_lists_the_allowed_names():
    with pytest.raises(ValueError, match=r"allowed: .*espeak"):
        create_engine("festival", {})
