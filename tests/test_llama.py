"""Real llama.cpp: its OpenAI-compatible server, and the embedded local provider (the default)."""

from __future__ import annotations

import sqlite3
import subprocess
import time
import urllib.request
import wave
from pathlib import Path

import pytest

from tests.harness import PYTHON, ROOT, Daemon, base_env, free_port

pytest.importorskip("llama_cpp", reason="the `local` extra is not installed: make test installs it")
pytestmark = pytest.mark.native  # a llama.cpp crash fails one test (tests/native_isolation.py)


@pytest.fixture(scope="module")
def gguf() -> str:
    from voxpipe.stages.llm.providers.local import bundled_model_path
    return bundled_model_path()


@pytest.fixture(scope="module")
def llama_server_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("llama") / "server.log"


@pytest.fixture(scope="module")
def llama_server(gguf: str, llama_server_log: Path):
    port = free_port()
    log = llama_server_log
    process = subprocess.Popen(
        [PYTHON, "-m", "voxpipe.stages.llm.llama_server", "--model", gguf, "--chat_format", "gemma", "--n_threads", "2",
         "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, env=base_env(), stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/models", timeout=1).read()
            break
        except OSError:
            if process.poll() is not None:
                pytest.fail(f"llama.cpp server exited: {log.read_text()[-2000:]}")
            time.sleep(0.3)
    else:
        pytest.fail("llama.cpp server did not come up within 120 s")
    yield url
    process.terminate()
    process.wait(10)


GREEDY = {"max_tokens": 32, "temperature": 0.0}


def assert_modes_agree(daemon: Daemon) -> None:
    """Streaming on and off store the same final text and both produce audio."""
    outputs = {}
    for session, flags in (("on", []), ("off", ["--no-stream"])):
        result = daemon.say("Name three colours.", "--session", session, *flags, timeout=180)
        assert result.returncode == 0, result.stderr
        outputs[session] = result.stdout
        path = result.stderr.strip().splitlines()[-1].removeprefix("audio written to ")
        with wave.open(path) as wav:
            assert wav.getnframes() > 0
    with sqlite3.connect(daemon.db_path) as db:
        rows = dict(db.execute("SELECT session, content FROM messages WHERE role='assistant'").fetchall())
    assert rows["on"] == rows["off"] and rows["on"].strip()
    assert outputs["on"] == outputs["off"]


def test_llama_cpp_server_streaming_and_not(llama_server: str) -> None:
    settings = {"llm": {"profile": "llamacpp", "profiles": {"llamacpp": {
        "provider": "openai", "base_url": llama_server, "model": "gemma", "api_key_env": "", **GREEDY}}},
        "player": {"backend": "wav"}}
    with Daemon(settings) as daemon:
        # llama_cpp.server reuses the previous request's prompt prefix, and a cached prefix changes
        # llama.cpp's numerics: the first request after a cold start can differ from every later one.
        # One untimed request first, so both modes compared below meet the same server state.
        assert daemon.say("Name three colours.", "--session", "warm", timeout=180).returncode == 0
        assert_modes_agree(daemon)


@pytest.mark.parametrize("style", ["dialogue", "chat"])
def test_embedded_local_model_streaming_and_not(gguf: str, style: str) -> None:
    settings = {"llm": {"profiles": {"local": {"provider": "local", "prompt_style": style, **GREEDY}}},
                "player": {"backend": "wav"}}
    with Daemon(settings) as daemon:
        assert_modes_agree(daemon)


def test_cancel_closes_the_llama_cpp_stream(llama_server: str) -> None:
    from voxpipe import protocol
    from voxpipe.protocol import Cancel, Request
    from voxpipe.runtime import Connection, endpoints_for
    settings = {"llm": {"profile": "llamacpp", "profiles": {"llamacpp": {
        "provider": "openai", "base_url": llama_server, "model": "gemma", "api_key_env": "",
        "max_tokens": 2000, "temperature": 0.0}}}}
    with Daemon(settings) as daemon:
        client = Connection("canceller", endpoints_for(daemon.config()),
                            [protocol.subscription(kind, "c") for kind in ("token", "llm.done")])
        client.open()
        client.publish("c", "r1", Request(text="Write a very long story about the sea."))
        first = client.receive(60)
        assert first is not None and first.kind == "token"
        client.publish("c", "r1", Cancel(reason="test"))
        started = time.monotonic()
        while True:
            message = client.receive(10)
            assert message is not None, "no llm.done after cancel"
            if message.kind == "llm.done":
                break
        assert message.body.status == "interrupted"
        assert time.monotonic() - started < 5
        assert message.body.text.startswith(first.body.text)
        client.close()


def test_repetition_guard_stops_the_looping_base_model(gguf: str) -> None:
    from voxpipe import protocol
    from voxpipe.protocol import Request
    from voxpipe.runtime import Connection, endpoints_for
    settings = {"llm": {"profiles": {"local": {"provider": "local", "max_tokens": 400, "temperature": 0.0,
                                               "prompt_style": "chat", "repeat_ngram": 6, "repeat_count": 3}}}}
    with Daemon(settings) as daemon:
        client = Connection("looper", endpoints_for(daemon.config()), [protocol.subscription("llm.done", "loop")])
        client.open()
        client.publish("loop", "r1", Request(text="Tell me a short fact about the Moon."))
        message = client.receive(120)
        client.close()
    assert message is not None
    done = message.body
    assert done.status == "ok"
    assert done.guard == "repetition" and done.finish_reason == "guard"
    assert done.tokens < 400


def test_the_local_model_answers_a_request_the_same_way_every_time(gguf: str) -> None:
    """No state leaks between calls (llama.cpp's prompt cache would change the numerics)."""
    from voxpipe.config import load
    from voxpipe.stages.llm.providers.base import ChatRequest, Params
    from voxpipe.stages.llm.providers.local import LocalProvider
    provider = LocalProvider(load(env={}).profile("local"))
    provider.load()
    messages = [{"role": "user", "content": "How do I boil an egg?"}]
    texts = ["".join(delta.text for delta in provider.open(ChatRequest(messages, stream=stream,
                                                                       params=Params(40, 0.0))))
             for stream in (True, False, True, False)]
    assert len(set(texts)) == 1 and texts[0]


def test_the_bundled_model_answers_on_topic_in_one_turn_with_history(gguf: str) -> None:
    """The dialogue style (the default for the bundled base model): a sensible answer, no turn markers,
    and the next question in the same session answered on its own, not a copy of the last reply."""
    settings = {"llm": {"profiles": {"local": {"provider": "local", "temperature": 0.0}}},
                "player": {"backend": "wav"}}
    with Daemon(settings) as daemon:
        first = daemon.say("What is the capital of France?", "--session", "s", timeout=180)
        second = daemon.say("Какая столица России?", "--session", "s", timeout=180)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert "Paris" in first.stdout, first.stdout
    assert "Москв" in second.stdout or "Moscow" in second.stdout, second.stdout  # 270M: Russian is weak
    assert second.stdout != first.stdout
    for reply in (first.stdout, second.stdout):
        assert not reply.startswith(" ")
        assert "User" not in reply and "Assistant:" not in reply and "model" not in reply


def test_the_server_wrapper_turns_repacking_off_on_amx_and_loads_the_best_cpu_backend(
        llama_server: str, llama_server_log: Path) -> None:
    """The server the README tells users to run: it answered the tests above, so it did not crash here."""
    from voxpipe.stages.llm.llama_runtime import AMX_FLAGS, cpu_variants, machine_flags
    text = llama_server_log.read_text()
    assert f"weight repacking {'off' if machine_flags() & AMX_FLAGS else 'on'}" in text
    if cpu_variants():
        assert "loaded CPU backend from" in text


def test_repacking_forced_on_is_the_only_way_to_the_amx_crash() -> None:
    """On an AMX CPU, repack = "on" dies in llama.cpp (in a child here); "auto" and "off" answer.
    Elsewhere all three answer. Which case applies is this machine's."""
    from voxpipe.stages.llm.llama_runtime import AMX_FLAGS, machine_flags
    code = ("import sys\nfrom voxpipe.stages.llm import llama_runtime\nfrom llama_cpp import Llama\n"
            "from voxpipe.stages.llm.providers.local import bundled_model_path\n"
            "flags = llama_runtime.machine_flags()\n"
            "with llama_runtime.model_params(repack=llama_runtime.repack_weights(sys.argv[1], flags)):\n"
            "    llm = Llama(model_path=bundled_model_path(), n_ctx=256, n_threads=2, verbose=False)\n"
            "print(llm.create_completion('The Moon is', max_tokens=8, temperature=0.0)['choices'][0]['text'])\n")
    results = {repack: subprocess.run([PYTHON, "-c", code, repack], cwd=ROOT, env=base_env(),
                                      capture_output=True, text=True, timeout=180)
               for repack in ("auto", "off", "on")}
    assert results["auto"].returncode == 0 and results["auto"].stdout.strip(), results["auto"].stderr[-2000:]
    assert results["off"].returncode == 0 and results["off"].stdout.strip()
    if machine_flags() & AMX_FLAGS:
        assert results["on"].returncode < 0, "AMX repacking no longer crashes: revisit repack = 'auto'"
    else:
        assert results["on"].returncode == 0
