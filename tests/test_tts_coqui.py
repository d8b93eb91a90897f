"""The Coqui engine on the real coqui-tts code, with tiny randomly initialised models built offline.

A tiny VITS (config.json + checkpoint, as `TTS(model_path=..., config_path=...)` loads them) runs
through the real `TTS` API, in-process and inside the real tts stage. A tiny XTTS (GPT + HiFi-GAN
decoder + speaker encoder, a BPE vocab.json built here, a speakers_xtts.pth) runs the streaming path
through the real `Xtts.inference_stream`. Nothing is downloaded.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from array import array
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

pytest.importorskip("TTS")
pytestmark = pytest.mark.native  # a torch crash fails one test (tests/native_isolation.py)

from tests.harness import connect, start_stage, stop_process  # noqa: E402
from voxpipe.protocol import Chunk  # noqa: E402
from voxpipe.stages.audio import AudioFormat  # noqa: E402
from voxpipe.stages.tts.engines import create_engine  # noqa: E402
from voxpipe.stages.tts.engines.coqui import CoquiEngine, _split  # noqa: E402

VITS_RATE = 16000
XTTS_RATE = 24000
XTTS_MAX_TOKENS = 20    # the GPT generates 17 audio tokens per sentence ...
XTTS_PIECE = 6          # ... streamed as 3 pieces (6, 6 and 5 tokens): 3 decoder passes
RU = "Привет! Сегодня хорошая погода."
EN = "Hello there! The weather is fine today."
LETTERS = "abcdefghijklmnopqrstuvwxyzабвгдеёжзийклмнопрстуфхцчшщъыьэюя"
NEVER = lambda: False  # noqa: E731


def build_tiny_vits(directory: Path) -> tuple[Path, Path]:
    """A VITS with random weights (~250k parameters) speaking ru and en letters; returns the paths of
    its checkpoint and config."""
    import torch
    from TTS.tts.configs.shared_configs import CharactersConfig
    from TTS.tts.configs.vits_config import VitsConfig
    from TTS.tts.models.vits import Vits, VitsArgs

    args = VitsArgs(
        hidden_channels=16, hidden_channels_ffn_text_encoder=32, num_heads_text_encoder=2,
        num_layers_text_encoder=1, num_layers_posterior_encoder=1, num_layers_flow=1, use_sdp=False,
        resblock_kernel_sizes_decoder=[3], resblock_dilation_sizes_decoder=[[1, 3, 5]],
        upsample_rates_decoder=[8, 8, 4], upsample_kernel_sizes_decoder=[16, 16, 8],
        upsample_initial_channel_decoder=16, init_discriminator=False)
    characters = CharactersConfig(
        characters_class="TTS.tts.models.vits.VitsCharacters", pad="<PAD>", eos=None, bos=None,
        blank="<BLNK>", characters=LETTERS + LETTERS.upper(), punctuations=" !,.?-'\"", phonemes=None,
        is_unique=False, is_sorted=True)
    config = VitsConfig(model_args=args, use_phonemes=False, text_cleaner="multilingual_cleaners",
                        characters=characters, add_blank=True)
    config.audio.sample_rate = VITS_RATE
    config.audio.fft_size = config.audio.win_length = config.audio.hop_length = 256  # = 8 * 8 * 4
    torch.manual_seed(0)
    model = Vits(config)
    checkpoint, config_path = directory / "model.pth", directory / "config.json"
    torch.save({"model": model.state_dict()}, checkpoint)
    config.save_json(str(config_path))
    return checkpoint, config_path


def build_tiny_xtts(directory: Path) -> Path:
    """An XTTS with a 1-layer 32-wide GPT over 66 audio tokens (the HiFi-GAN decoder and speaker
    encoder keep XTTS's fixed sizes, ~22M parameters), a character-level BPE vocab.json for ru and en,
    and one built-in speaker, "tiny". Its stop token is never sampled, so every sentence streams
    the same number of pieces. Returns the model directory."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from TTS.tts.configs.xtts_config import XttsArgs, XttsConfig
    from TTS.tts.layers.xtts.tokenizer import VoiceBpeTokenizer
    from TTS.tts.models.xtts import Xtts

    directory.mkdir(parents=True, exist_ok=True)
    special = ["[STOP]", "[UNK]", "[SPACE]", "[START]", "[en]", "[ru]"]
    symbols = sorted(set(LETTERS + "0123456789.,!?-'\"():;"))
    tokenizer = Tokenizer(models.BPE(vocab={token: index for index, token in enumerate(special + symbols)},
                                     merges=[], unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(special)
    tokenizer.save(str(directory / "vocab.json"))
    args = XttsArgs(gpt_layers=1, gpt_n_model_channels=32, gpt_n_heads=2, gpt_max_audio_tokens=XTTS_MAX_TOKENS,
                    gpt_max_text_tokens=200, gpt_max_prompt_tokens=8, gpt_num_audio_tokens=66,
                    gpt_start_audio_token=64, gpt_stop_audio_token=65, gpt_code_stride_len=256,
                    decoder_input_dim=32)
    config = XttsConfig(model_args=args, languages=["en", "ru"])
    torch.manual_seed(0)
    model = Xtts(config)
    model.tokenizer = VoiceBpeTokenizer(directory / "vocab.json")
    model.init_models()  # the GPT's text embedding is sized by the vocab
    with torch.no_grad():
        model.gpt.mel_head.bias[args.gpt_stop_audio_token] = -1e4
    torch.save({"model": model.state_dict()}, directory / "model.pth")
    config.save_json(str(directory / "config.json"))
    voice = {"gpt_cond_latent": torch.randn(1, 4, 32) * 0.1, "speaker_embedding": torch.randn(1, 512, 1) * 0.1}
    torch.save({"tiny": voice}, directory / "speakers_xtts.pth")
    return directory


def write_reference(path: Path, rate: int = 44100, seconds: float = 2.0) -> Path:
    """A voice-cloning reference recording: a gliding tone with a little noise."""
    import numpy as np
    import soundfile

    t = np.arange(int(rate * seconds)) / rate
    wave = 0.3 * np.sin(2 * np.pi * (150 + 100 * t) * t) + 0.01 * np.random.default_rng(0).standard_normal(t.size)
    soundfile.write(path, wave.astype("float32"), rate)
    return path


@pytest.fixture(scope="module")
def vits_files(tmp_path_factory) -> tuple[Path, Path]:
    return build_tiny_vits(tmp_path_factory.mktemp("vits"))


@pytest.fixture(scope="module")
def vits(vits_files) -> Iterator[CoquiEngine]:
    checkpoint, config = vits_files
    engine = create_engine("coqui", {"model_path": str(checkpoint), "config_path": str(config),
                                     "device": "cpu", "speaker": "", "language": "", "speaker_wav": "",
                                     "max_frame_ms": 200, "model_name": ""})
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def xtts_dir(tmp_path_factory) -> Path:
    return build_tiny_xtts(tmp_path_factory.mktemp("xtts") / "model")


def tiny_xtts(xtts_dir: Path, **options: str) -> CoquiEngine:
    engine = CoquiEngine(model_path=str(xtts_dir), **options)
    engine.stream_chunk_size = XTTS_PIECE
    return engine


@pytest.fixture(scope="module")
def xtts(xtts_dir) -> Iterator[CoquiEngine]:
    engine = tiny_xtts(xtts_dir)
    yield engine
    engine.close()


def decoder_runs(engine: CoquiEngine) -> list[int]:
    """Counts the XTTS HiFi-GAN decoder's forward passes (a real torch forward hook)."""
    runs = [0]

    def count(*_):
        runs[0] += 1

    engine.model.hifigan_decoder.register_forward_hook(count)
    return runs


# --- VITS through the real TTS API --------------------------------------------------------------

@pytest.mark.parametrize("text", [RU, EN, "Скажи hello по-английски."], ids=["ru", "en", "mixed"])
def test_vits_speaks_in_int16_frames_of_at_most_200_ms(vits, text):
    frames = list(vits.synthesize(text, NEVER))
    assert vits.format == AudioFormat(rate=VITS_RATE, channels=1, sample_width=2)
    assert {frame.format for frame in frames} == {vits.format}
    assert all(0 < frame.duration_ms <= 200 for frame in frames)
    assert len(frames) >= 3
    samples = array("h", b"".join(frame.pcm for frame in frames))
    assert max(abs(sample) for sample in samples) > 100    # not silence


def test_vits_uses_the_real_api_and_matches_its_output(vits):
    """The frames are TTS.tts()'s float samples as int16, in order, nothing lost."""
    import numpy as np
    import torch

    torch.manual_seed(7)        # VITS samples its latent noise
    expected = vits._tts.tts(EN)
    torch.manual_seed(7)
    pcm = b"".join(frame.pcm for frame in vits.synthesize(EN, NEVER))
    assert len(pcm) == 2 * len(expected)
    got = np.frombuffer(pcm, dtype="<i2").astype(np.float64) / 32767
    assert np.allclose(got, np.clip(expected, -1, 1), atol=1e-4)


def test_vits_stops_mid_chunk_at_the_next_frame(vits):
    full = list(vits.synthesize(RU, NEVER))
    asked = [0]

    def stop_after_two() -> bool:
        asked[0] += 1
        return asked[0] > 3     # once before synthesis, then before frames 1 and 2

    assert len(list(vits.synthesize(RU, stop_after_two))) == 2 < len(full)
    assert list(vits.synthesize(RU, lambda: True)) == []


def test_blank_text_yields_nothing(vits):
    assert list(vits.synthesize("  \n", NEVER)) == []


def test_smaller_frames(vits_files):
    checkpoint, config = vits_files
    engine = CoquiEngine(model_path=str(checkpoint), config_path=str(config), max_frame_ms=30)
    frames = list(engine.synthesize(EN, NEVER))
    assert all(frame.duration_ms <= 30 for frame in frames)
    assert sum(len(frame.pcm) for frame in frames) == sum(len(f.pcm) for f in engine.synthesize(EN, NEVER))


def test_config_defaults_the_config_path_beside_the_checkpoint(vits_files, tmp_path):
    checkpoint, _config = vits_files
    assert CoquiEngine(model_path=str(checkpoint)).format.rate == VITS_RATE   # config.json is beside it
    lonely = tmp_path / "model.pth"
    lonely.write_bytes(checkpoint.read_bytes())
    with pytest.raises(ValueError, match=r"tts\.coqui\.config_path"):
        CoquiEngine(model_path=str(lonely))


@pytest.mark.parametrize("options, key", [
    ({}, "tts.coqui.model_name and tts.coqui.model_path"),
    ({"model_name": "tts_models/en/ljspeech/vits", "model_path": "/x"}, "set exactly one"),
    ({"model_path": "/nonexistent/model.pth"}, "tts.coqui.model_path"),
    ({"model_path": "MODEL", "config_path": "/nonexistent/config.json"}, "tts.coqui.config_path"),
    ({"model_path": "MODEL", "speaker_wav": "/nonexistent.wav"}, "tts.coqui.speaker_wav"),
    ({"model_path": "MODEL", "device": "tpu"}, "tts.coqui.device"),
    ({"model_path": "MODEL", "speaker": "alice"}, "tts.coqui.speaker"),
    ({"model_path": "MODEL", "language": "ru"}, "tts.coqui.language"),
    ({"model_name": "tts_models/xx/nowhere/none"}, "not a Coqui model name"),
])
def test_bad_settings_name_the_key(vits_files, options, key):
    options = {name: str(vits_files[0]) if value == "MODEL" else value for name, value in options.items()}
    with pytest.raises(ValueError, match=key):
        CoquiEngine(**options)


def test_xtts_by_name_needs_the_licence_accepted_before_any_download(monkeypatch, tmp_path):
    monkeypatch.delenv("COQUI_TOS_AGREED", raising=False)
    monkeypatch.setenv("TTS_HOME", str(tmp_path))
    with pytest.raises(ValueError, match="COQUI_TOS_AGREED=1"):
        CoquiEngine(model_name="tts_models/multilingual/multi-dataset/xtts_v2")
    assert not list(tmp_path.rglob("*.pth"))


def test_missing_coqui_says_how_to_install(monkeypatch, vits_files):
    monkeypatch.setitem(sys.modules, "TTS.api", None)   # what an environment without coqui-tts sees
    with pytest.raises(ValueError, match=r"pip install 'voxpipe\[coqui\]'"):
        CoquiEngine(model_path=str(vits_files[0]))


def test_config_accepts_coqui_and_checks_its_keys(vits_files):
    from voxpipe.config import ConfigError, load

    env = {"VOXPIPE_TTS__ENGINE": "coqui", "VOXPIPE_TTS__COQUI__MODEL_PATH": str(vits_files[0]),
           "VOXPIPE_TTS__COQUI__MAX_FRAME_MS": "100", "XDG_CONFIG_HOME": "/nonexistent"}
    config = load(env=env)
    assert config["tts"]["coqui"]["model_path"] == str(vits_files[0])
    assert config["tts"]["coqui"]["max_frame_ms"] == 100 and config["tts"]["coqui"]["device"] == "cpu"
    with pytest.raises(ConfigError, match=r"tts\.coqui\.device"):
        load(env={**env, "VOXPIPE_TTS__COQUI__DEVICE": "gpu"})


# --- XTTS: streaming inside a chunk -------------------------------------------------------------

def test_xtts_streams_the_first_audio_before_the_chunk_is_synthesised(xtts):
    assert xtts.streaming and xtts.format == AudioFormat(rate=XTTS_RATE, channels=1, sample_width=2)
    assert xtts.speaker == "tiny" and xtts.languages == ["en", "ru"]
    runs = decoder_runs(xtts)
    with closing(xtts.synthesize(EN, NEVER)) as frames:
        first = next(frames)
        assert runs[0] == 1, "the first frame waited for more than the first streamed piece"
        rest = list(frames)
    assert runs[0] == 3   # the chunk took 3 streamed pieces
    everything = [first, *rest]
    assert {frame.format for frame in everything} == {xtts.format}
    assert all(0 < frame.duration_ms <= 200 for frame in everything)
    assert sum(frame.duration_ms for frame in everything) > 50


def test_xtts_stop_ends_generation_at_the_next_frame(xtts):
    runs = decoder_runs(xtts)
    stop, frames = [False], []
    for frame in xtts.synthesize(RU, lambda: stop[0]):
        frames.append(frame)
        stop[0] = True               # asked to stop while the first piece is being played
    assert len(frames) == 1 and runs[0] == 1   # no further frame, and no further piece was generated
    assert list(xtts.synthesize(EN, lambda: True)) == []


def test_xtts_language_is_chosen_per_chunk_or_fixed(xtts, xtts_dir):
    assert [xtts.language_for(text) for text in (RU, EN, "Скажи hello", "42")] == ["ru", "en", "ru", "en"]
    with pytest.raises(ValueError, match=r"tts\.coqui\.language = 'fr' is not one of .*en, ru"):
        CoquiEngine(model_path=str(xtts_dir), language="fr")


def test_xtts_clones_a_voice_from_speaker_wav_in_a_fixed_language(xtts_dir, tmp_path):
    reference = str(write_reference(tmp_path / "ref.wav"))
    with pytest.raises(ValueError, match=r"tts\.coqui\.speaker and tts\.coqui\.speaker_wav"):
        CoquiEngine(model_path=str(xtts_dir), speaker="tiny", speaker_wav=reference)
    engine = tiny_xtts(xtts_dir, config_path=str(xtts_dir / "config.json"), speaker_wav=reference,
                       language="en")
    assert engine.language_for(RU) == "en"
    runs = decoder_runs(engine)
    frames = list(engine.synthesize(RU, NEVER))
    assert frames and runs[0] == 3 and all(frame.duration_ms <= 200 for frame in frames)
    engine.close()


def test_xtts_long_text_is_split_under_the_length_limit(xtts):
    assert _split("One. Two! Three?", 250) == ["One. Two! Three?"]
    long = " ".join(f"Sentence number {n} is here." for n in range(20))
    parts = _split(long, 60)
    assert all(len(part) <= 60 for part in parts) and " ".join(parts) == long
    assert _split("x" * 130, 60) == ["x" * 60, "x" * 60, "x" * 10]
    runs = decoder_runs(xtts)
    text = "Привет. " * 30     # 240 characters: over XTTS's 182-character limit for ru
    assert len(_split(text, 182)) == 2
    xtts.stream_chunk_size = 1000    # one piece per part
    try:
        assert len(list(xtts.synthesize(text, NEVER))) > 0 and runs[0] == 2
    finally:
        xtts.stream_chunk_size = XTTS_PIECE


# --- the real tts stage -------------------------------------------------------------------------

@pytest.fixture()
def coqui_stage(vits_files) -> Iterator[Path]:
    checkpoint, config = vits_files
    runtime = Path(tempfile.mkdtemp(prefix="vp-cq-")) / "run"
    broker = start_stage("bus", runtime)
    connect(runtime, "probe").close()
    stage = start_stage("tts", runtime, VOXPIPE_TTS__ENGINE="coqui",
                        VOXPIPE_TTS__COQUI__MODEL_PATH=str(checkpoint),
                        VOXPIPE_TTS__COQUI__CONFIG_PATH=str(config))
    watcher = connect(runtime, "coqui-ready", "heartbeat")
    deadline = time.monotonic() + 60
    ready = False
    while time.monotonic() < deadline and not ready and stage.poll() is None:
        beat = watcher.receive(1)
        ready = beat is not None and beat.src == "tts"
    watcher.close()
    try:
        assert ready, f"tts stage with coqui did not come up: {stage.poll()}"
        yield runtime
    finally:
        code, err = stop_process(stage)
        stop_process(broker)
        shutil.rmtree(runtime.parent, ignore_errors=True)
        assert code == 0, err


def test_the_tts_stage_speaks_with_coqui(coqui_stage):
    client = connect(coqui_stage, "coqui-speaker", "audio", "error")
    replies = {"a": [RU, EN, ""], "b": ["Second session, one chunk."]}
    for session, texts in replies.items():
        for index, text in enumerate(texts):
            client.publish(session, "r1", Chunk(text=text, index=index, final=index == len(texts) - 1))
    messages = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and sum(1 for m in messages if m.kind == "audio" and m.body.final
                                              and m.body.last) < len(replies):
        message = client.receive(0.5)
        if message is not None:
            messages.append(message)
    client.close()
    assert not [m for m in messages if m.kind == "error"]
    for session, texts in replies.items():
        audio = [m for m in messages if m.kind == "audio" and m.session == session]
        assert [(m.body.chunk, m.body.frame) for m in audio] == sorted((m.body.chunk, m.body.frame) for m in audio)
        for index, text in enumerate(texts):
            frames = [m for m in audio if m.body.chunk == index]
            assert [f.body.frame for f in frames] == list(range(len(frames)))
            assert [f.body.last for f in frames] == [False] * (len(frames) - 1) + [True]   # exactly one last
            assert all(len(f.body.pcm) <= VITS_RATE * 2 * 0.2 for f in frames)
            spoken = [f for f in frames if f.body.pcm]
            assert {(f.body.rate, f.body.channels, f.body.width) for f in spoken} <= {(VITS_RATE, 1, 2)}
            if text:
                assert sum(len(f.body.pcm) for f in frames) > VITS_RATE * 2 * 0.3
            else:
                assert not spoken
