"""The Gemini provider against a real local server speaking Gemini's REST wire (SSE and JSON).

Checks the request (paths, header auth, roles, systemInstruction, inline_data,
generationConfig) and the reply (text, thought parts as reasoning, usage, model,
safety blocks before and during the reply, with the partial text kept).
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import pytest

from tests.fakes.wire_server import Reader, Script, WireServer, json_script, sse_script
from voxpipe.stages.llm.providers import create_provider
from voxpipe.stages.llm.providers.base import ChatRequest, Delta, Image, Params, ProviderError
from voxpipe.stages.llm.providers.gemini import GeminiProvider

KEY = "AIzaSy-test-0123456789"
MODEL = "gemini-test"
STREAM_PATH = f"/v1beta/models/{MODEL}:streamGenerateContent?alt=sse"
WHOLE_PATH = f"/v1beta/models/{MODEL}:generateContent"


@pytest.fixture
def server() -> Iterator[WireServer]:
    with WireServer() as running:
        yield running


def provider(server: WireServer, **settings: Any) -> GeminiProvider:
    return GeminiProvider(**{"base_url": server.url("/v1beta"), "model": MODEL, **settings})


def ask(stream: bool = True, **options: Any) -> ChatRequest:
    return ChatRequest([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello"},
                        {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Tell me more"}],
                       stream=stream, **options)


def reply(*parts: dict[str, Any], finish: str | None = None, **fields: Any) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"role": "model", "parts": list(parts)}, "index": 0}
    if finish:
        candidate["finishReason"] = finish
    return {"candidates": [candidate], "modelVersion": "gemini-test-001", **fields}


USAGE = {"usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 4, "thoughtsTokenCount": 5,
                           "totalTokenCount": 18, "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 9}]}}


def read(server: WireServer, script: Script, request: ChatRequest | None = None, **settings: Any) -> Reader:
    server.enqueue(script)
    reader = Reader(provider(server, **settings).open(request or ask(), KEY))
    assert reader.done.wait(5)
    return reader


def test_sse_text_usage_and_model(server: WireServer) -> None:
    events = [reply({"text": "Once "}), reply({"text": "upon a time."}), reply({"text": ""}, finish="STOP", **USAGE)]
    reader = read(server, sse_script(events, delay=0.005, newline="\r\n"))
    assert reader.error is None
    assert reader.deltas == [Delta("Once "), Delta("upon a time.")]
    outcome = reader.generation.outcome
    assert outcome.finish_reason == "stop" and outcome.model == "gemini-test-001"
    assert outcome.usage == {"prompt_tokens": 9, "completion_tokens": 4, "reasoning_tokens": 5, "total_tokens": 18}


def test_thought_parts_are_reasoning(server: WireServer) -> None:
    events = [reply({"text": "Let me think.", "thought": True}),
              reply({"text": "More thought. ", "thought": True}, {"text": "Answer"}),
              reply({"text": "!"}, finish="STOP")]
    reader = read(server, sse_script(events))
    assert reader.deltas == [Delta(reasoning="Let me think."), Delta("Answer", "More thought. "), Delta("!")]


def test_prompt_blocked_by_safety(server: WireServer) -> None:
    blocked = {"promptFeedback": {"blockReason": "SAFETY", "safetyRatings": [
        {"category": "HARM_CATEGORY_HARASSMENT", "probability": "HIGH", "blocked": True},
        {"category": "HARM_CATEGORY_HATE_SPEECH", "probability": "NEGLIGIBLE"}]}, **USAGE}
    reader = read(server, sse_script([blocked]))
    assert reader.deltas == []
    error = reader.error
    assert isinstance(error, ProviderError) and error.code == "blocked" and not error.retryable
    assert "blockReason SAFETY" in str(error) and "HARM_CATEGORY_HARASSMENT HIGH" in str(error)
    assert "HATE_SPEECH" not in str(error)
    assert reader.generation.outcome.finish_reason == "blocked"


def test_safety_stop_mid_stream_keeps_the_text_before_it(server: WireServer) -> None:
    stop = {"candidates": [{"index": 0, "finishReason": "SAFETY", "safetyRatings": [
        {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "MEDIUM", "blocked": True}]}]}
    reader = read(server, sse_script([reply({"text": "Step one is "}), stop]))
    assert reader.deltas == [Delta("Step one is ")]
    assert reader.error.code == "blocked" and "finishReason SAFETY" in str(reader.error)
    assert "HARM_CATEGORY_DANGEROUS_CONTENT MEDIUM" in str(reader.error)
    assert reader.generation.outcome.finish_reason == "safety"


def test_text_in_the_blocking_chunk_comes_before_the_error(server: WireServer) -> None:
    reader = read(server, sse_script([reply({"text": "Quoted verse"}, finish="RECITATION")]))
    assert reader.deltas == [Delta("Quoted verse")] and reader.error.code == "blocked"


def test_whole_json_when_not_streaming(server: WireServer) -> None:
    body = reply({"text": "Thinking...", "thought": True}, {"text": "Full "}, {"text": "answer."}, finish="MAX_TOKENS",
                 **USAGE)
    reader = read(server, json_script(body), ask(stream=False))
    assert reader.error is None and reader.deltas == [Delta("Full answer.", "Thinking...")]
    assert reader.generation.outcome.finish_reason == "max_tokens"
    assert server.records[0].path == WHOLE_PATH


def test_whole_json_prompt_blocked(server: WireServer) -> None:
    reader = read(server, json_script({"promptFeedback": {"blockReason": "PROHIBITED_CONTENT",
                                                          "blockReasonMessage": "Prompt was blocked."}}),
                  ask(stream=False))
    assert reader.error.code == "blocked" and "Prompt was blocked." in str(reader.error)


def test_request_path_header_auth_roles_and_system_instruction(server: WireServer) -> None:
    read(server, sse_script([reply({"text": "ok"}, finish="STOP")]))
    sent = server.records[0]
    assert sent.method == "POST" and sent.path == STREAM_PATH
    assert sent.headers["x-goog-api-key"] == KEY and KEY not in sent.path
    assert "Authorization" not in sent.headers and sent.headers["Accept"] == "text/event-stream"
    body = sent.json
    assert body["systemInstruction"] == {"parts": [{"text": "You are terse."}]}
    assert body["contents"] == [{"role": "user", "parts": [{"text": "Hello"}]},
                                {"role": "model", "parts": [{"text": "Hi."}]},
                                {"role": "user", "parts": [{"text": "Tell me more"}]}]


def test_images_become_inline_data(server: WireServer) -> None:
    image = Image(b"\xff\xd8\xff fake jpeg", "image/jpeg")
    request = ChatRequest([{"role": "user", "content": "What is this?", "images": [image]}])
    read(server, sse_script([reply({"text": "A cat."}, finish="STOP")]), request)
    assert server.records[0].json["contents"] == [{"role": "user", "parts": [
        {"text": "What is this?"},
        {"inline_data": {"mime_type": "image/jpeg", "data": base64.b64encode(image.data).decode()}}]}]
    assert "systemInstruction" not in server.records[0].json


def test_params_map_to_generation_config_and_extra_merges(server: WireServer) -> None:
    params = Params(max_tokens=99, temperature=0.4, top_p=0.8, top_k=32, presence_penalty=0.6, stop=("User:",),
                    reasoning_budget=512)
    safety = [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_ONLY_HIGH"}]
    read(server, sse_script([reply({"text": "ok"}, finish="STOP")]), ask(params=params),
         extra={"safetySettings": safety, "generationConfig": {"responseMimeType": "text/plain"}})
    body = server.records[0].json
    assert body["generationConfig"] == {
        "maxOutputTokens": 99, "temperature": 0.4, "topP": 0.8, "topK": 32, "presencePenalty": 0.6,
        "stopSequences": ["User:"], "thinkingConfig": {"thinkingBudget": 512, "includeThoughts": True},
        "responseMimeType": "text/plain"}
    assert body["safetySettings"] == safety


def test_unset_params_are_not_sent_and_zero_budget_turns_thinking_off(server: WireServer) -> None:
    read(server, sse_script([reply({"text": "ok"}, finish="STOP")]), ask())
    assert server.records[0].json["generationConfig"] == {"maxOutputTokens": 200}
    read(server, sse_script([reply({"text": "ok"}, finish="STOP")]), ask(params=Params(reasoning_budget=0)))
    assert server.records[1].json["generationConfig"]["thinkingConfig"] == {"thinkingBudget": 0,
                                                                            "includeThoughts": False}


def test_api_error_keeps_the_key_out(server: WireServer) -> None:
    error = {"error": {"code": 400, "message": f"API key not valid: {KEY}. Please pass a valid API key.",
                       "status": "INVALID_ARGUMENT"}}
    reader = read(server, json_script(error, 400))
    assert reader.error.code == "bad_request" and reader.error.status == 400
    assert "API key not valid" in str(reader.error) and KEY not in str(reader.error)


def test_stream_cut_before_finish_reason_is_a_connect_error(server: WireServer) -> None:
    reader = read(server, sse_script([reply({"text": "Partial"})], end="abort", framing="close"))
    assert reader.deltas == [Delta("Partial")] and reader.error.code == "connect"


def test_malformed_chunk_after_text(server: WireServer) -> None:
    reader = read(server, sse_script([reply({"text": "ok"}), '{"candidates": [}']))
    assert reader.deltas == [Delta("ok")] and reader.error.code == "protocol"


def test_close_mid_stream_reaches_the_server(server: WireServer) -> None:
    server.enqueue(Script(writes=[*sse_script([reply({"text": "First"})]).writes, (30.0, b"")]))
    reader = Reader(provider(server).open(ask(), KEY))
    record = server.next_request()
    assert reader.first.wait(5)
    reader.generation.close()
    assert reader.done.wait(2) and record.hung_up.wait(2)
    assert reader.deltas == [Delta("First")] and reader.error is None


def test_registry_model_prefix_and_missing_model(server: WireServer) -> None:
    profile = {"name": "g", "provider": "gemini", "base_url": server.url("/v1beta/"), "model": f"models/{MODEL}"}
    created = create_provider(profile)
    assert isinstance(created, GeminiProvider) and created.accepts_images
    read(server, sse_script([reply({"text": "ok"}, finish="STOP")]), model=f"models/{MODEL}")
    assert server.records[0].path == STREAM_PATH
    with pytest.raises(ValueError, match=r"^profile 'g': provider gemini needs model"):
        create_provider({**profile, "model": ""})


def test_unknown_role_is_refused() -> None:
    provider_ = GeminiProvider(model=MODEL)
    with pytest.raises(ProviderError) as caught:
        provider_.open(ChatRequest([{"role": "tool", "content": "x"}]), KEY)
    assert caught.value.code == "bad_request"
