"""The chunking benchmark's corpus is well-formed, and its quick run works."""

from __future__ import annotations

import itertools
import json
import re
import time
from collections import Counter

from tests.bench.corpus.speakable import clean, speak


def lines() -> list[dict]:
    from tests.bench.chunking import CORPUS
    return [json.loads(line) for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_corpus_is_well_formed() -> None:
    items = lines()
    assert len(items) >= 100
    for item in items:
        assert set(item) == {"id", "lang", "text", "never_split"}, item.get("id")
        assert item["lang"] in ("ru", "en")
        assert item["id"].startswith(item["lang"] + "-")
        assert isinstance(item["text"], str) and item["text"].strip()
        assert isinstance(item["never_split"], list)
    assert len({item["id"] for item in items}) == len(items), "ids are unique"
    langs = Counter(item["lang"] for item in items)
    assert min(langs["ru"], langs["en"]) >= 0.4 * len(items), langs


def test_annotations_occur_in_the_reply_and_in_its_speakable_text() -> None:
    for item in lines():
        spoken = speak(item["text"])
        for span in item["never_split"]:
            assert len(span.split()) >= 2, f"{item['id']}: {span!r} is one word, always protected"
            pattern = r"\s+".join(re.escape(word) for word in span.split())
            assert re.search(pattern, item["text"]), f"{item['id']}: {span!r} not in the reply"
            assert re.search(pattern, spoken), f"{item['id']}: {span!r} not in its speakable text"


def test_corpus_covers_the_issue() -> None:
    everything = "\n".join(item["text"] for item in lines())
    for needle in ("т.е.", "т.к.", "и т.д.", "и т.п.", "г.", "ул.", "стр.", "e.g.", "i.e.", "Dr.", "Mr.",
                   "U.S.", "etc.", "3.14", "2,5", "12:30", "30.11.2026", "2.3.1", "https://", "@example",
                   "...", "…", "?!", "«", "\"", "— ", "(", "\n1. ", "\n- ", "\n\n", "<e>smile</e>",
                   "<c>Подойти к игроку</c>", "<p>1,-2,0</p>", "<+memory>", "<think>", "**", "## ", "](",
                   "`", "```", "😊"):
        assert needle in everything, needle


def test_corpus_covers_abbreviations_before_numbers_and_rare_initials() -> None:
    """Issue 13: an abbreviation before a number, a time or a contact detail, and initials in their
    rarer forms, each annotated as never split, in both languages."""
    annotated = {(item["lang"], span) for item in lines() for span in item["never_split"]}
    for lang, span in (("ru", "каб. 305"), ("ru", "комн. 12"), ("ru", "оф. 7"), ("ru", "тел. +7 495 123-45-67"),
                       ("ru", "д. 5"), ("ru", "кв. 12"), ("ru", "стр. 2"), ("ru", "мин. 5"), ("ru", "ок. 10 км"),
                       ("ru", "т. 8-800-555-35-35"), ("ru", "Ж.-П. Сартр"), ("ru", "А.-Б. Иванов"),
                       ("ru", "Пушкин А. С."), ("en", "Rm. 305"), ("en", "Apt. 4B"), ("en", "No. 5"),
                       ("en", "Tel. +1 555 123 4567"), ("en", "Ext. 12"), ("en", "approx. 10 km"), ("en", "Fig. 3"),
                       ("en", "Vol. 2"), ("en", "p. 17"), ("en", "St. 5"), ("en", "J.-P. Sartre"), ("en", "J.-B. Say"),
                       ("en", "J.R.R. Tolkien"), ("en", "Tolkien J. R. R.")):
        assert (lang, span) in annotated, (lang, span)
    everything = "\n".join(item["text"] for item in lines())
    assert "А.С.Пушкин" in everything   # one word: no annotation, a cut inside it is always wrong


def test_speakable_text_removes_markup_and_keeps_words() -> None:
    raw = ("<think>plan <e>x</e></think><e>smile</e>**Hi**, see [docs](https://d.io/a_b) or "
           "https://x.io/a_b#c 😊\n# Head\n- item `snake_case`\n```py\nprint(1)\n```\nEnd.")
    cleaned = clean(raw)
    assert cleaned.text == "Hi, see docs or https://x.io/a_b#c \nHead\nitem snake case\n\nEnd."
    assert "plan <e>x</e>" in cleaned.removed() and "print(1)" in cleaned.removed()
    assert cleaned.positions[-1] == len(cleaned.text)
    assert all(a <= b for a, b in itertools.pairwise(cleaned.positions))


def test_quick_run_produces_the_section_quickly() -> None:
    from tests.bench import chunking
    started, cpu = time.monotonic(), time.process_time()
    report = chunking.run(quick=True)
    elapsed, cpu = time.monotonic() - started, time.process_time() - cpu
    assert report.startswith("## Chunking: voxpipe vs stream2sentence\n")
    assert "**Verdict: " in report and "µs per token" in report
    # CPU time, so that a busy machine does not fail it; wall time only bounds a hang
    assert cpu < 20, f"the quick run took {cpu:.1f} s of CPU time"
    assert elapsed < 120, f"the quick run took {elapsed:.1f} s"
