"""Coqui voices chosen per synthesis, on the real coqui-tts code with the tiny offline models of
test_tts_coqui: a VITS with two speakers, an XTTS with two built-in speakers, and a one-voice VITS
that has nothing to choose."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("TTS")
pytestmark = pytest.mark.native  # a torch crash fails one test (tests/native_isolation.py)

from tests.test_tts_coqui import EN, NEVER, build_tiny_vits, build_tiny_xtts, tiny_xtts  # noqa: E402
from voxpipe.stages.tts.engines.base import VoiceError  # noqa: E402
from voxpipe.stages.tts.engines.coqui import CoquiEngine  # noqa: E402


def spoken(engine: CoquiEngine, voice: str) -> bytes:
    """VITS samples its latent noise and XTTS its audio tokens: with the same seed, the same voice
    gives the same PCM, so a different PCM is a different voice."""
    import torch

    torch.manual_seed(3)
    return b"".join(frame.pcm for frame in engine.synthesize(EN, NEVER, voice))


def two_speaker_vits(directory: Path) -> CoquiEngine:
    """build_tiny_vits's model with a speaker embedding for `alice` and `bob` (Coqui names them in
    the config's `speakers`)."""
    import torch
    from TTS.tts.configs.vits_config import VitsConfig
    from TTS.tts.models.vits import Vits

    checkpoint, config_path = build_tiny_vits(directory)
    config = VitsConfig()
    config.load_json(str(config_path))
    config.model_args.use_speaker_embedding = True
    config.model_args.num_speakers = 2
    config.speakers = ["alice", "bob"]
    torch.manual_seed(0)
    torch.save({"model": Vits(config).state_dict()}, checkpoint)
    config.save_json(str(config_path))
    return CoquiEngine(model_path=str(checkpoint), config_path=str(config_path))


def test_a_multi_speaker_model_speaks_in_the_chosen_speaker(tmp_path):
    engine = two_speaker_vits(tmp_path)
    assert engine.voices == ["alice", "bob"] and engine.speaker == "alice"
    configured = spoken(engine, "")
    assert spoken(engine, "alice") == configured and spoken(engine, "bob") != configured
    with pytest.raises(VoiceError, match="no speaker 'carol'; its speakers: alice, bob"):
        next(engine.synthesize(EN, NEVER, "carol"))
    engine.close()


def test_xtts_speaks_in_the_chosen_built_in_speaker(tmp_path):
    import torch

    directory = build_tiny_xtts(tmp_path / "model")
    speakers = torch.load(directory / "speakers_xtts.pth")
    speakers["other"] = {"gpt_cond_latent": torch.randn(1, 4, 32), "speaker_embedding": torch.randn(1, 512, 1)}
    torch.save(speakers, directory / "speakers_xtts.pth")
    engine = tiny_xtts(directory)
    assert engine.voices == ["tiny", "other"] and engine.speaker == "tiny"
    configured = spoken(engine, "")
    assert spoken(engine, "tiny") == configured and spoken(engine, "other") != configured
    with pytest.raises(VoiceError, match="no speaker 'Claribel Dervla'; its speakers: tiny, other"):
        next(engine.synthesize(EN, NEVER, "Claribel Dervla"))
    engine.close()


def test_a_one_voice_model_says_no_voice_can_be_chosen(tmp_path):
    checkpoint, config_path = build_tiny_vits(tmp_path)
    engine = CoquiEngine(model_path=str(checkpoint), config_path=str(config_path))
    assert engine.voices == []
    with pytest.raises(VoiceError, match="speaks in one voice, so voice 'bob' cannot be chosen"):
        next(engine.synthesize(EN, NEVER, "bob"))
    assert spoken(engine, "")   # the configured voice still speaks
    engine.close()
