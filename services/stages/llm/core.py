"""The llm stage's pure core: prompt assembly and reply bookkeeping (time is passed in).

The jobs themselves (busy policy, attempts, retries, the watchdog, the journal) are in jobs.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ...protocol import Body, ChatMessage, Context, LlmDone, Request
from .providers.base import ChatRequest, Image, Params, Timeouts

CHARS_PER_TOKEN = 4
"""A rough token estimate for history budgets; exact counts would need each vendor's tokenizer."""


def trim_history(history: Sequence[ChatMessage], token_budget: int) -> Sequence[ChatMessage]:
    """Drop the oldest turns until the rest fits `token_budget` (0: no budget)."""
    if not token_budget:
        return history
    kept: list[ChatMessage] = []
    used = 0
    for turn in reversed(history):
        used += len(turn.content) // CHARS_PER_TOKEN + 1
        if used > token_budget:
            break
        kept.append(turn)
    return kept[::-1]


REPLY_CONTEXT = "Context for this reply:"
"""The heading of a request's own system context (`Request.system`), last in the system prompt."""


def render_persona(persona: str, memory: str = "", variables: Mapping[str, float] | None = None,
                   system: str = "") -> str:
    """The system prompt: the persona, then the persona's memories and variables from history, then the
    request's own context (`Request.system`, a game's state: docs/design/game-link.md §4.2). That comes
    last, nearest the conversation, and belongs to this reply only: history never stores it."""
    parts = [persona] if persona else []
    if memory:
        parts.append("Your memories (numbered; <#memory>N|priority|text</memory> edits one, "
                     "<-memory>N</memory> forgets it):\n" + memory)
    if variables:
        parts.append("Your current state: " + ", ".join(f"{name} {value:g}" for name, value in variables.items())
                     + ".")
    if system.strip():
        parts.append(f"{REPLY_CONTEXT}\n{system.strip()}")
    return "\n\n".join(parts)


def conversation(history: Iterable[ChatMessage], user_text: str) -> list[tuple[str, str]]:
    """The history window, then the user message, as the (role, content) turns the model sees.

    Empty turns and other roles are left out, and a turn that repeats the one before it (same role,
    same text) is said once: a question asked again after its reply was cut off before a word must
    not reach the model as the same text twice in one turn.
    """
    turns: list[tuple[str, str]] = []
    for turn in [*history, ChatMessage(role="user", content=user_text)]:
        role, content = turn.role, turn.content
        if role in ("user", "assistant") and content and (not turns or turns[-1] != (role, content)):
            turns.append((role, content))
    return turns


def build_messages(system_prompt: str, history: Iterable[ChatMessage], user_text: str,
                   images: Sequence[Image] = ()) -> list[dict[str, Any]]:
    """Persona, then the history window, then the user message (with its images).

    Consecutive same-role turns are merged, because strict chat templates
    (Gemma's among them) reject two user or two assistant turns in a row.
    """
    messages: list[dict[str, Any]] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    for role, content in conversation(history, user_text):
        if messages and messages[-1]["role"] == role:
            messages[-1] = {"role": role, "content": messages[-1]["content"] + "\n" + content}
        else:
            messages.append({"role": role, "content": content})
    if images:
        messages[-1]["images"] = list(images)
    return messages


USER_LABEL = "User"
DIALOGUE_EXAMPLES: tuple[tuple[str, str], ...] = (
    ("Hi!", "Hello! How can I help you today?"),
    ("Привет! Как дела?", "Привет! Всё хорошо, спасибо."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("Сколько дней в неделе?", "В неделе семь дней."),
)
"""Example exchanges that show a base model the shape of a turn: one line, on topic, in the user's language."""


def resolve_prompt_style(profile: Mapping[str, Any]) -> str:
    """"chat" (the model's chat template) or "dialogue" (a plain-text transcript for base models).

    "auto" picks dialogue for the bundled Gemma 3 270M, a base model that rambles and leaks role
    markers under the instruction-tuned chat template, and chat for everything else.
    """
    style = profile["prompt_style"]
    if style == "auto":
        return "dialogue" if profile["provider"] == "local" and not profile["model_path"] else "chat"
    return style


def _one_line(text: str) -> str:
    """A turn on one line, so no text can start a forged turn in the transcript."""
    return " ".join(text.split())


def render_dialogue(system_prompt: str, history: Iterable[ChatMessage], user_text: str,
                    name: str) -> tuple[str, tuple[str, ...]]:
    """The dialogue prompt and the stop strings that end the assistant's turn.

    The system prompt (persona, memories, variables, the request's context) comes first, on one
    line, then the example exchanges, then the history and the user message as `User:` / `<name>:`
    lines, then `<name>:` for the model to complete.  A turn is one line, so the first line break
    ends it, and no text (a game's state among it) can start a forged turn.
    """
    lines = [_one_line(system_prompt)] if system_prompt else []
    lines.append(f"Below is a conversation between {USER_LABEL} and {name}. {name} answers each question "
                 f"briefly and directly, in the language {USER_LABEL} writes in.")
    lines.append("")
    turns = [pair for question, answer in DIALOGUE_EXAMPLES for pair in (("user", question), ("assistant", answer))]
    turns += conversation(history, user_text)
    for role, content in turns:
        if content.strip():
            lines.append(f"{USER_LABEL if role == 'user' else name}: {_one_line(content)}")
    lines.append(f"{name}:")
    return "\n".join(lines), ("\n",)


def profile_timeouts(profile: Mapping[str, Any]) -> Timeouts:
    return Timeouts(profile["connect_timeout_s"], profile["first_token_timeout_s"], profile["idle_timeout_s"])


def chat_request(profile: Mapping[str, Any], request: Request, context: Context | None, persona: str,
                 history_token_budget: int) -> ChatRequest:
    """What to ask the profile's provider: the persona with history's memory and variables and the
    request's own system context, the history within its budget, the user message and its images, in
    the profile's prompt style. `context` is history's answer, None when it did not come."""
    stream = profile["stream"] if request.stream is None else request.stream
    images = [Image(image.data, image.mime) for image in request.images]
    history = trim_history(context.messages if context else (), history_token_budget)
    system = render_persona(persona, context.memory if context else "", context.variables if context else None,
                            request.system)
    params = Params(
        max_tokens=profile["max_tokens"], temperature=profile["temperature"],
        top_p=profile["top_p"] or None, top_k=profile["top_k"] or None,
        presence_penalty=profile["presence_penalty"] or None, stop=tuple(profile["stop"]),
        reasoning_budget=None if profile["reasoning_budget"] < 0 else profile["reasoning_budget"])
    timeouts = profile_timeouts(profile)
    messages = build_messages(system, history, request.text, images)
    if resolve_prompt_style(profile) == "chat":
        return ChatRequest(messages, stream=stream, params=params, timeouts=timeouts)
    prompt, stops = render_dialogue(system, history, request.text, profile["assistant_name"])
    params = replace(params, stop=(*params.stop, *stops))
    return ChatRequest(messages, stream=stream, params=params, timeouts=timeouts, prompt=prompt)


def sendable(text: str) -> str:
    """Text that every message can carry: a lone surrogate (JSON's "\\ud800" decodes to one) is not
    UTF-8, so a message holding it could not be encoded; it becomes "?"."""
    return text if text.isascii() else text.encode("utf-8", "replace").decode("utf-8")


def fit(kind: type[Body], name: str, text: str) -> str:
    """`text` as field `name` of `kind` accepts it: sendable, and when its check refuses it, cut to the
    longest start that the check takes with "…" after it, the mark that it was cut.  The field's check
    stays the one home of its limit; this only searches for the length it allows."""
    text = sendable(text)
    check = kind.spec[name].check
    if check(text) is None:
        return text
    low, high = 0, len(text)  # check(text[:low] + "…") holds for low = 0 whenever a string of 1 fits
    while low < high:
        middle = (low + high + 1) // 2
        if check(text[:middle] + "…") is None:
            low = middle
        else:
            high = middle - 1
    return text[:low] + "…"


@dataclass
class Reply:
    """One reply being generated: its text so far and the timings its llm.done reports."""

    session: str
    id: str
    started: float
    parts: list[str] = field(default_factory=list)
    first_token_at: float | None = None

    def add(self, text: str, now: float) -> None:
        if self.first_token_at is None:
            self.first_token_at = now
        self.parts.append(text)

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def done(self, status: str, now: float, *, error: str = "", provider: str = "", model: str = "",
             finish_reason: str = "", usage: Mapping[str, float] | None = None, guard: str = "",
             reasoning: str = "", profile: str = "") -> LlmDone:
        """This reply's llm.done, with what the provider reported fitted into the fields' limits (`fit`);
        usage is already counts only (providers.base.usage_counts), and the guard keeps the text and
        reasoning within theirs."""
        metrics: dict[str, float] = {"total_ms": (now - self.started) * 1000}
        if self.first_token_at is not None:
            metrics["ttft_ms"] = (self.first_token_at - self.started) * 1000
            span = now - self.first_token_at
            if span > 0 and len(self.parts) > 1:
                metrics["tokens_per_s"] = (len(self.parts) - 1) / span
        metrics.update({f"usage_{name}": value for name, value in (usage or {}).items()})
        texts = {"text": self.text, "error": error, "provider": provider, "model": model,
                 "finish_reason": finish_reason, "guard": guard, "reasoning": reasoning, "profile": profile}
        return LlmDone(status=status, tokens=len(self.parts), metrics=metrics,
                       **{name: fit(LlmDone, name, value) for name, value in texts.items()})
