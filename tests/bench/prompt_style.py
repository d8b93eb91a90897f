"""The bundled base model under both prompt styles: 20 varied questions, each asked in both, interleaved.

A reply counts as **on topic** when it contains one of the words its question's answer needs
(case-insensitive; e.g. "Paris" for the capital of France).  It is a **single answer** when it does not
start another turn: no role marker (`User:`, `Assistant:`, a Gemma `user`/`model` marker, even glued to
a word as in "…mendatangmodel") and it does not go on to ask a question of its own.  Both are
mechanical checks, so the figures are comparable from run to run; the replies are listed for a reader
to judge.  TTFA is from the request to the first `audio` message, espeak-ng, streaming on.
"""

from __future__ import annotations

import re
import sys

from tests.bench.pipeline import Client, Sample, time_reply
from tests.bench.stats import median
from tests.harness import Daemon

QUESTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("What is the capital of France?", ("paris",)),
    ("What is a comet?", ("ice", "icy", "dust", "tail", "orbit", "sun", "rock")),
    ("How many legs does a spider have?", ("eight", "8")),
    ("What colour is the sky on a clear day?", ("blue",)),
    ("Who wrote Romeo and Juliet?", ("shakespeare",)),
    ("What is the largest planet in the solar system?", ("jupiter",)),
    ("What do bees make?", ("honey", "wax")),
    ("At what temperature does water boil, in Celsius?", ("100", "hundred")),
    ("Which ocean is the largest?", ("pacific",)),
    ("What language do people speak in Brazil?", ("portuguese",)),
    ("How many days are there in a week?", ("seven", "7")),
    ("What is the opposite of hot?", ("cold",)),
    ("What do plants need to grow?", ("water", "sun", "light", "soil", "nutrient", "carbon")),
    ("What is the capital of Japan?", ("tokyo",)),
    ("Какая столица России?", ("москв",)),
    ("Сколько будет два плюс два?", ("четыре", "4")),
    ("What animal says meow?", ("cat", "kitten")),
    ("What is frozen water called?", ("ice",)),
    ("Какого цвета трава?", ("зел",)),
    ("What is the tallest mountain in the world?", ("everest",)),
)
STYLES = ("dialogue", "chat")
_TURN_MARKER = re.compile(r"(?i)\b(user|assistant|пользователь)\s*:|<(start|end)_of_turn>|(model|user)\s*$"
                          r"|^\s*(model|user)\s*$", re.MULTILINE)


def on_topic(reply: str, words: tuple[str, ...]) -> bool:
    lowered = reply.lower()
    return any(word in lowered for word in words)


def single_answer(reply: str) -> bool:
    """No new turn: no role marker, and no question of its own followed by more text."""
    if _TURN_MARKER.search(reply):
        return False
    return "?" not in reply.rstrip().rstrip("?")


def run(quick: bool = False) -> str:
    questions = QUESTIONS[:4] if quick else QUESTIONS
    profiles = {style: {"provider": "local", "temperature": 0.0, "prompt_style": style} for style in STYLES}
    settings = {"llm": {"profile": "dialogue", "profiles": profiles}, "tts": {"engine": "espeak"},
                "player": {"backend": "null"}}
    replies: dict[str, list[tuple[str, Sample]]] = {style: [] for style in STYLES}
    with Daemon(settings) as daemon:
        client = Client.attach(daemon)
        try:
            for style in STYLES:  # untimed warm-up: each profile loads its own model
                time_reply(client, "Hello!", True, 300, profile=style)
            for index, (question, _) in enumerate(questions):
                for style in (STYLES if index % 2 == 0 else STYLES[::-1]):
                    replies[style].append((question, time_reply(client, question, True, 300, profile=style)))
        finally:
            client.close()
    words = dict(questions)
    lines = [f"Bundled Gemma 3 270M (a base model), `temperature = 0`, other settings the `local` profile's "
             f"defaults; {len(questions)} questions (3 of them Russian), each asked once per style in a new "
             f"session, the order alternating per question.", "",
             "| prompt style | on topic | single answer | both | reply length p50 chars | TTFA p50 ms |",
             "|---|---|---|---|---|---|"]
    for style in STYLES:
        rows = replies[style]
        topic = sum(on_topic(s.text, words[q]) for q, s in rows)
        single = sum(single_answer(s.text) for _, s in rows)
        both = sum(on_topic(s.text, words[q]) and single_answer(s.text) for q, s in rows)
        lines.append(f"| {style} | {topic}/{len(rows)} | {single}/{len(rows)} | **{both}/{len(rows)}** | "
                     f"{median([len(s.text) for _, s in rows]):.0f} | {median([s.ms['audio'] for _, s in rows]):.0f} |")
    lines += ["", "Every reply (✓ on topic and single, ✗ otherwise):", "",
              "| question | dialogue | chat |", "|---|---|---|"]
    for index, (question, answers) in enumerate(questions):
        cells = []
        for style in STYLES:
            text = replies[style][index][1].text
            mark = "✓" if on_topic(text, answers) and single_answer(text) else "✗"
            shown = " ".join(text.split())
            cells.append(f"{mark} {shown[:160] + ('…' if len(shown) > 160 else '')}".replace("|", "\\|"))
        lines.append(f"| {question} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(run("--quick" in sys.argv))
