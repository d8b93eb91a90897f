"""The pure chunker: LLM reply deltas in, display-text deltas and speakable chunks out.

A reply flows through three streaming stages. Each one holds back only what it cannot
decide yet and decides from the text alone, so the chunks never depend on how the reply
was split into deltas (a stall flush in `tick` is the one deliberate exception):

1. `_TagStripper` removes tags, `<name>…</name>` pairs (reported as marks, for history to
   accept or refuse), the markup of formatting such as `<b>` (its text stays), and `<think>`
   blocks (voxpipe.stages.tags); what is left is the display text, so what is shown and what is
   spoken never disagree about a tag.
2. `_SpeechCleaner` turns display text into speakable text: markdown symbols, fenced
   code, emoji and link URLs go; link text stays.
3. `_Splitter` cuts the speakable text into chunks where a pause sounds right.

No sockets, threads or clock reads: the caller passes time in, in seconds.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from ...protocol import Chunk, Mark, TextMark
from ..tags import DEFAULT_TAGS, FENCE_OPEN, LOOKAHEAD, VOID, TagStripper, closes_fence

# --- policy -------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChunkerPolicy:
    """When chunks are cut. Every number trades latency against prosody; the defaults
    are reasoned from the anchors in the brief, for `make bench` to confirm.

    - min_first_chars=10, max_first_words=10: the first chunk decides when the user first
      hears anything, so it goes at the first comma or sentence end once it has 10
      characters (RealtimeTTS' first-fragment minimum; a shorter fragment such as "Ну, "
      alone synthesises with poor prosody). A reply without punctuation is cut after 10
      words, a third of RealtimeTTS' 30: about 15 tokens, well under a second on any model.
    - min_chars=30: later chunks end at sentence ends, but "Да. Конечно." is merged with
      what follows: the first chunk is playing meanwhile, and longer input gives better
      prosody for fewer TTS calls (LiveKit merges below 20).
    - max_chars=180: XTTS v2 warns that audio may be cut short past 182 characters of
      Russian (250 of English); a bounded chunk also bounds each chunk's synthesis time.
    - flush_after_ms=600: tokens normally arrive every 10-100 ms, so 600 ms of nothing is
      a stall, and flushing then keeps the silence under a second. 0 disables it.
    - tag_lookahead=600 (tags.LOOKAHEAD): a '<' is held until its tag closes; the longest
      memory tag fits, and a '<' that never becomes a tag is still released, as text, after
      600 characters. A configured tag still open then is never released: its body is dropped
      as it streams, to its closing tag or the reply's end (history refuses it as too long).
    - code_phrase="": said instead of a fenced code block; empty because the reply's
      language is not known here.
    - first_at_delta_end=True: a sentence end is only sure once the next character is known
      ("Paris." may go on as "Paris..." or "Paris.\""), so a cut there waits one more token: 25 ms
      at 40 tokens/s, all of it added to the time to first audio. With this on, the first chunk
      ends at once where a delta ends in an ordinary word and its '.', '!' or '?' (not a number,
      an abbreviation or initials): a model writes the next token, space first, after a sentence
      end far more often than it goes on. It is the one rule that reads where a delta ends, so
      with it on the first chunk may depend on how the reply was split; off, no chunk does
      (but for a stall flush).
    """

    min_first_chars: int = 10
    max_first_words: int = 10
    min_chars: int = 30
    max_chars: int = 180
    flush_after_ms: int = 600
    tag_lookahead: int = LOOKAHEAD
    code_phrase: str = ""
    tags: tuple[str, ...] = DEFAULT_TAGS
    first_at_delta_end: bool = True

    def __post_init__(self) -> None:
        for key, low in (("min_first_chars", 1), ("max_first_words", 1), ("min_chars", 1),
                         ("max_chars", 20), ("flush_after_ms", 0), ("tag_lookahead", 1)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{key}: expected an integer >= {low}, got {value!r}")
        if self.max_chars < max(self.min_chars, self.min_first_chars):
            raise ValueError(f"max_chars: expected at least min_chars and min_first_chars "
                             f"({max(self.min_chars, self.min_first_chars)}), got {self.max_chars}")
        if not isinstance(self.first_at_delta_end, bool):
            raise ValueError(f"first_at_delta_end: expected true or false, got {self.first_at_delta_end!r}")
        if not isinstance(self.code_phrase, str):
            raise ValueError(f"code_phrase: expected a string, got {self.code_phrase!r}")
        self._check_tags()

    def _check_tags(self) -> None:
        tags = self.tags
        if not isinstance(tags, tuple) or not all(isinstance(t, str) and _TAG_NAME.fullmatch(t) for t in tags):
            raise ValueError(f"tags: expected a list of tag names without spaces, '<', '>' or '/', "
                             f"got {tags!r}")
        if any(t.lower() == "think" for t in tags) or len({t.lower() for t in tags}) != len(tags):
            raise ValueError(f"tags: expected distinct names other than the reserved 'think', got {tags!r}")
        needed = max((2 * len(t) + 5 for t in tags), default=1)
        if self.tag_lookahead < needed:
            raise ValueError(f"tag_lookahead: expected at least {needed}, the length of the longest "
                             f"empty tag pair, got {self.tag_lookahead}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> ChunkerPolicy:
        """Builds a policy from a config table; strings (from environment variables) are
        accepted for numbers, and a comma-separated string for tags."""
        allowed = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown key; allowed: {', '.join(allowed)}")
        values = {key: _coerce(key, value, allowed[key].default) for key, value in data.items()}
        return cls(**values)


_TAG_NAME = re.compile(r"[^\s<>/]+")
_FLAGS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}
"""How an environment variable spells a flag."""


def _coerce(key: str, value: Any, default: Any) -> Any:
    if key == "tags":
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return tuple(value) if isinstance(value, list) else value
    if isinstance(default, bool):
        return _FLAGS.get(value.strip().lower(), value) if isinstance(value, str) else value
    if isinstance(default, int) and isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return value


# --- results ------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChunkerOutput:
    """What one step of a reply released: display text, the chunks decided, and the command tags met
    in that display text. Chunks and marks are the protocol's own records (a `Chunk` has exactly one
    final=True per reply, the last; a `TextMark`'s offset is where the tag stood in this display
    delta, so a front-end can show it exactly there while the text streams; chunks come later)."""

    display: str
    chunks: tuple[Chunk, ...]
    display_marks: tuple[TextMark, ...] = ()


_NOTHING = ChunkerOutput("", ())
_PIECE = 4096
"""The most of a delta the stages take in one step (Chunker._push)."""


# --- the chunker --------------------------------------------------------------------------

class Chunker:
    """Splits one streamed reply; make a new one per reply."""

    def __init__(self, policy: ChunkerPolicy = ChunkerPolicy()) -> None:
        self._policy = policy
        self._tags = _TagStripper(policy.tags, policy.tag_lookahead)
        self._speech = _SpeechCleaner(policy.code_phrase)
        self._splitter = _Splitter(policy)
        self._display_length = 0
        self._last_feed: float | None = None
        self._stall_possible = False
        self._finished = False

    def feed(self, delta: str, now: float) -> ChunkerOutput:
        """Takes the next piece of the reply. An empty delta is no sign of life and does
        not postpone a stall flush."""
        self._check_open("feed")
        if delta:
            self._last_feed = now
        return self._push(delta, at_end=False)

    def tick(self, now: float) -> ChunkerOutput:
        """Flushes up to the last complete word when the stream has stalled."""
        due = self.next_flush_at
        if due is None or now < due:
            return _NOTHING
        chunk = self._splitter.stall_cut()
        self._stall_possible = self._splitter.can_stall_cut()
        return ChunkerOutput("", (chunk,) if chunk else ())

    def finish(self, now: float) -> ChunkerOutput:
        """Ends the reply: everything held is released; the last chunk has final=True."""
        self._check_open("finish")
        self._finished = True
        return self._push("", at_end=True)

    @property
    def next_flush_at(self) -> float | None:
        """When `tick` should next look for a stall flush; None while no text is held, or once a tick
        found only a word still being written (until more comes)."""
        if self._finished or not self._stall_possible or self._last_feed is None:
            return None
        return self._last_feed + self._policy.flush_after_ms / 1000

    def _push(self, delta: str, at_end: bool) -> ChunkerOutput:
        """One delta through the three stages, a bounded piece at a time: each stage rescans what
        it holds on every push, so a huge delta (a whole reply recovered from llm.done) fed at once
        would cost time quadratic in its length. The result is the same, as no stage's decisions
        depend on how the reply was split."""
        start = self._display_length
        display: list[str] = []
        chunks: list[Chunk] = []
        shown: list[TextMark] = []
        pieces = [delta[i:i + _PIECE] for i in range(0, len(delta), _PIECE)] or [""]
        for number, piece in enumerate(pieces, 1):
            last = at_end and number == len(pieces)
            text, marks = self._tags.push(piece, last)
            display.append(text)
            self._display_length += len(text)
            shown += [TextMark(tag=tag, body=body, offset=position - start) for position, tag, body in marks]
            speech, placed = self._speech.push(text, marks, last)
            self._splitter.push(speech, placed)
            if last:
                chunks += self._splitter.finish()
            elif speech:
                chunks += self._splitter.cut(delta_end=number == len(pieces))
        if not at_end:  # whether a stall cut is possible is judged when one is due, not on every delta
            self._stall_possible = bool(self._policy.flush_after_ms) and self._splitter.holds_text()
        return ChunkerOutput("".join(display), tuple(chunks), tuple(shown))

    def _check_open(self, action: str) -> None:
        if self._finished:
            raise RuntimeError(f"cannot {action}: this reply is finished; make a new Chunker")


# --- stage 1: command tags and reasoning --------------------------------------------------

# A mark in flight: (position in the stage's output text, tag, body).
_Placed = tuple[int, str, str]


class _TagStripper:
    """Removes tags, formatting markup and `<think>` blocks (voxpipe.stages.tags, which history shares,
    so the chunker hides exactly the tags history reports), handing each tag on as a mark."""

    def __init__(self, tags: tuple[str, ...], lookahead: int) -> None:
        self._stripper = TagStripper(tags, lookahead)

    def push(self, text: str, at_end: bool) -> tuple[str, list[_Placed]]:
        """Returns the display text it can release now and the tags it completed."""
        display, found = self._stripper.push(text, at_end)
        return display, [(tag.shown, tag.name, tag.body) for tag in found]


# --- stage 2: markdown, code, emoji and links ---------------------------------------------

_EMOJI = ("\U0001F000-\U0001FAFF\u2600-\u27BF\u2B00-\u2BFF\u2300-\u23FF"
          "\uFE00-\uFE0F\u200D\u20E3\U000E0020-\U000E007F")
_EMOJI_RUN = re.compile(f"[{_EMOJI}]+")
_MARKUP_RUN = re.compile(r"[*_`~#|]+")
_PLAIN_RUN = re.compile(rf"[^\n*_`~#|\[\]=\-<{_EMOJI}]+")
_HTML_TAG = re.compile(rf"</[A-Za-z][\w-]{{0,30}}[ \t]{{0,3}}>|<[A-Za-z][\w-]{{0,30}}[ \t]{{0,3}}/>"
                       rf"|<(?:{'|'.join(sorted(VOID))})[ \t]{{0,3}}>", re.I)
_HTML_TAG_START = re.compile(r"</?(?:[A-Za-z][\w-]{0,30}[ \t]{0,3}/?)?")
_LINE_HOLD = frozenset(" \t>-+•·`~")   # what a line's leading markers are made of
_MAX_LINE_HOLD = 16
_FENCE_LINE = frozenset(" \t`~")
_BLOCK_MARKERS = re.compile(r"[ \t]*(?:>[ \t]*)*(?:[-+•·][ \t]+)?")
_URL_START = re.compile(r"://|(?:^|\W)www\.", re.I)
_URL_WINDOW = 64   # a URL is recognised by how a word starts
_LAST_SPACE = re.compile(r"\s(?=\S*$)")
_BLANKS = re.compile(r"\s+")
_MAX_BLANKS = 64
"""The longest run of blanks speech keeps, plus a newline if the rest had one. The splitter reads at
most 64 characters past a word, and chunk text is whitespace-normalised, so the chunks are the same;
and a flood of blanks is not rescanned on every delta while the splitter waits for the next word."""

_Step = tuple[int, str]   # (input characters used, speakable output)


class _SpeechCleaner:
    """Turns display text into speakable text.

    Dropped: * _ ` ~ # | [ ] (a symbol between two letters becomes a space, so
    snake_case stays two words), rules of 3+ '-' or '=', closing, self-closing and void
    HTML tags without attributes (<br> becomes a line break), quote markers and bullets
    at a line start, fenced code (replaced by the code phrase), emoji, and the (url) of
    [text](url). Inside a bare URL nothing is dropped; numbered list markers are kept. A mark is placed where its input
    position is consumed, so marks stay put whatever is dropped around them."""

    def __init__(self, code_phrase: str) -> None:
        self._code_text = f"\n{code_phrase}\n" if code_phrase else "\n"
        self._pending = ""
        self._line_start = True
        self._fence = ""          # the fence of the open code block
        self._url_depth = 0       # parentheses open inside a link's (url)
        self._prev = "\n"         # the last character consumed
        self._word = ""           # the start of the word being consumed
        self._in_bare_url = False
        self._marks: deque[_Placed] = deque()
        self._consumed = 0
        self._spoken = 0
        self._blanks = ""         # the run of blanks the speech so far ends in, as kept

    def push(self, text: str, marks: list[_Placed], at_end: bool) -> tuple[str, list[_Placed]]:
        self._pending += text
        self._marks.extend(marks)
        spoken: list[str] = []
        placed = self._place_marks()
        while self._pending:
            step = self._step(at_end)
            if step is None:
                break
            used, speech = step
            if used:
                self._consume(self._pending[:used])
            speech = self._squeeze(speech)
            self._spoken += len(speech)
            spoken.append(speech)
            placed += self._place_marks()
        return "".join(spoken), placed

    def _squeeze(self, speech: str) -> str:
        """`speech` with each run of blanks, counting the one the speech so far ends in, cut to
        _MAX_BLANKS characters and a newline if it had one."""
        if not speech:
            return speech
        parts, pos, run_kept = [], 0, ""
        for run in _BLANKS.finditer(speech):
            before = self._blanks if run.start() == 0 else ""
            kept = run.group()[:max(0, _MAX_BLANKS - len(before))]
            if "\n" in run.group() and "\n" not in before + kept:
                kept += "\n"
            parts += [speech[pos:run.start()], kept]
            pos, run_kept = run.end(), before + kept
        parts.append(speech[pos:])
        self._blanks = run_kept if speech[-1].isspace() else ""
        return "".join(parts)

    def _consume(self, text: str) -> None:
        self._pending = self._pending[len(text):]
        self._consumed += len(text)
        self._prev = text[-1]
        space = _LAST_SPACE.search(text)
        self._word = (text[space.end():] if space else self._word + text)[:_URL_WINDOW]
        self._in_bare_url = bool(_URL_START.search(self._word))

    def _place_marks(self) -> list[_Placed]:
        placed = []
        while self._marks and self._marks[0][0] <= self._consumed:
            _, tag, body = self._marks.popleft()
            placed.append((self._spoken, tag, body))
        return placed

    def _step(self, at_end: bool) -> _Step | None:
        """One decision at the start of the pending text; None: wait for more text."""
        text = self._pending
        if self._fence:
            return self._code_line_start(text, at_end) if self._line_start else self._code_rest(text)
        if self._url_depth:
            return self._link_url(text)
        if self._line_start:
            return self._line_markers(text, at_end)
        return self._inline(text, at_end)

    def _line_markers(self, text: str, at_end: bool) -> _Step | None:
        held = 0
        while held < min(len(text), _MAX_LINE_HOLD) and text[held] in _LINE_HOLD:
            held += 1
        if held == len(text) and held < _MAX_LINE_HOLD and not at_end:
            return None
        self._line_start = False
        fence = FENCE_OPEN.match(text)
        if fence:
            self._fence = fence.group(1)
            return fence.end(), self._code_text
        return _always(_BLOCK_MARKERS.match(text)).end(), ""

    def _code_line_start(self, text: str, at_end: bool) -> _Step | None:
        newline = text.find("\n")
        line = text if newline < 0 else text[:newline]
        if newline < 0 and not at_end and set(line) <= _FENCE_LINE:
            return None
        if closes_fence(line, self._fence):
            self._fence = ""
            return (len(text) if newline < 0 else newline + 1), ""
        self._line_start = False
        return 0, ""

    def _code_rest(self, text: str) -> _Step:
        newline = text.find("\n")
        if newline < 0:
            return len(text), ""
        self._line_start = True
        return newline + 1, ""

    def _link_url(self, text: str) -> _Step:
        for i, char in enumerate(text):
            if char == "\n":
                self._url_depth = 0
                return i, ""
            if char == "(":
                self._url_depth += 1
            elif char == ")":
                self._url_depth -= 1
                if not self._url_depth:
                    return i + 1, ""
        return len(text), ""

    def _inline(self, text: str, at_end: bool) -> _Step | None:
        char = text[0]
        if char == "\n":
            self._line_start = True
            return 1, "\n"
        if char == "[":
            return 1, ""
        if char == "]":
            if len(text) < 2 and not at_end:
                return None
            if text[1:2] == "(":
                self._url_depth = 1
                return 2, ""
            return 1, ""
        if char in "*_`~#|":
            return self._markup(_always(_MARKUP_RUN.match(text)).end(), text, at_end)
        if char in "-=":
            return self._markup(len(text) - len(text.lstrip(char)), text, at_end)
        if char == "<":
            return self._html_tag(text, at_end)
        emoji = _EMOJI_RUN.match(text)
        if emoji:
            return emoji.end(), ""
        limit = self._marks[0][0] - self._consumed if self._marks else len(text)
        plain = _always(_PLAIN_RUN.match(text, 0, limit))
        return plain.end(), plain.group()

    def _html_tag(self, text: str, at_end: bool) -> _Step | None:
        """A closing </b>, a self-closing <x/> and a void <hr> are markup, <br> a line break.
        A lone opening such as the <y> of x<y>z is text, shown and so spoken: a paired one
        was a tag, gone before this stage."""
        tag = _HTML_TAG.match(text)
        line_break = tag is not None and tag.group().lower().startswith("<br")
        if tag and tag.end() == len(text) and not at_end and not line_break:
            return None   # what replaces it depends on the next character
        if tag:
            return tag.end(), "\n" if line_break else self._joint(text, tag.end())
        if not at_end and _HTML_TAG_START.fullmatch(text):
            return None
        return 1, "<"

    def _markup(self, end: int, text: str, at_end: bool) -> _Step | None:
        """A run of markup symbols, or of '-' or '=' (dropped only as a 3+ rule)."""
        if end == len(text) and not at_end:
            return None
        run = text[:end]
        if self._in_bare_url or (run[0] in "-=" and len(run) < 3):
            return end, run
        return end, self._joint(text, end)

    def _joint(self, text: str, end: int) -> str:
        """What replaces dropped markup: a space if it stood between two words."""
        return " " if self._prev.isalnum() and text[end:end + 1].isalnum() else ""


# --- stage 3: where to cut ----------------------------------------------------------------

# How good a pause each gap between two words makes.
GLUE, WORD, COMMA, CLAUSE, STRONG_CLAUSE, SENTENCE, HARD = range(-1, 6)

_TOKEN = re.compile(r"\S+?(?:(?<=[^\W\d_])[,…]|(?<=\w);|(?=\s)|$)")
"""A word: up to a space, or up to a comma or ellipsis right after a letter, or a semicolon after
a letter or digit. Such a clause mark ends the word whatever follows ("2,5" stays whole), so it
can be judged at once."""
_CLAUSE_END = re.compile(r"(?:[^\W\d_][,…]|\w;)$")
_LAST_TOKEN = re.compile(r"\S+$")
_OPENERS = "«\"“„'‘([{¿¡"
_CLOSERS = "»\"”’')]}"
_DASHES = ("—", "–", "-", "--")
_TERMINAL = re.compile(r"[.!?…]+$")
_SENTENCE_WORD = re.compile(r"[^\W\d_]{2,}(?:[-'’][^\W\d_]+)*[.!?]")
_WORDLIKE = re.compile(r"\w")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)?")
_LIST_MARKER = re.compile(r"\d{1,3}[.)]")
_DOTTED = re.compile(r"(?:[^\W\d_]\.){2,}")          # e.g. U.S. т.е. А.С. J.R.R.
_INITIAL = re.compile(r"[^\W\d_]\.")
_HYPHENATED = re.compile(r"[^\W\d_]\.(?:-[^\W\d_]\.)+")   # double initials: Ж.-П. J.-B.
_NAME = re.compile(r"[^\W\d_]+(?:-[^\W\d_]+)*")       # a surname before trailing initials: Пушкин А. С.
# A number, a phone number or a part of one: 305, +7, (495), 123-45-67, 8-800-555-35-35, 3.14, 12:30.
_NUMERIC = re.compile(r"[(+№]{0,2}\d(?:[\d()\-–/]|[.,:](?=\d))*")
_COMPLETE_TAIL = re.compile(r"(?:[!?…,;:]|(?<!\d)\.)[»\"”’')\]}]*$")

# Abbreviations that do not end a sentence even before a capital ("Dr. Smith", "г. Москва").
_NON_TERMINAL = frozenset("""
    mr. mrs. ms. dr. prof. st. sr. jr. vs. cf. approx. fig. p. pp. vol. ch. mt. ave. blvd. dept.
    nos. sgt. capt. gen. col. lt. cmdr. gov. sen. rep. corp. est. rm. ext. tel. ste. bldg. fl. eq.
    jan. feb. mar. apr. jun. jul. aug. sep. sept. oct. nov. dec.
    mon. tue. tues. wed. thu. thur. thurs. fri. sat. sun.
    пос. м. н. дер. обл. р. оз.
    ул. стр. д. им. проф. акад. доц. см. напр. рис. табл. с. п. пп. просп. пер. кв. обл. ст.
    тов. гр. англ. лат. рус. ср. т. г. гг. в. вв. тыс. млн. млрд. мин. сек. ч. руб. коп.
    каб. комн. оф. корп. эт. мкр. пл. наб. доб. вып. гл.
""".split())
# Units, which end a sentence after a number ("в 2026 г. Потом") but not elsewhere ("г. Москва").
_UNITS = frozenset("г. гг. в. вв. см. тыс. млн. млрд. мин. сек. ч. руб. коп.".split())
# Abbreviations that are also words, so may end a sentence («много тел.», "No.", «Ок.», "quite apt."): they
# bind only to a number after them ("тел. +7 495…", "No. 5", "ок. 10 км", "Apt. 4B"). Before a number any
# abbreviation binds, even a unit after a number: "в 2026 г. 5 мая".
_NUMBER_BOUND = frozenset("no. apt. min. max. sec. art. ca. ref. pt. тел. ок. макс. к.".split())
# What a number is followed by when it is a measure, not a count of something: "10 км", "5 p.m.".
_NUMBER_UNITS = frozenset("""
    км м см мм кг г мг т ц л мл ч мин с сек мс руб коп тыс млн млрд шт га
    km m cm mm kg g mg lb lbs oz mi ft in yd l ml h hr hrs min mins s sec secs ms k bn a.m. p.m. am pm
""".split())
# Dotted abbreviations that may end a sentence ("и т.д. Потом").
_TERMINAL_DOTTED = frozenset("т.д. т.п. и.т.д. и.т.п. н.э. a.m. p.m.".split())


_ABBREVIATIONS = _NON_TERMINAL | _NUMBER_BOUND | _UNITS


def _ordinary_end(token: str) -> bool:
    """Whether a word ends a sentence as an ordinary word: letters then one '.', '!' or '?', closing
    quotes and brackets allowed; no number, abbreviation, initials, list marker or "www.". A
    capitalised word of up to three letters before a '.' ("Inc.", "Ltd.", "St.") is taken for an
    abbreviation not in the lists (ChunkerPolicy.first_at_delta_end waits after it as before)."""
    core = token.lstrip(_OPENERS).rstrip(_CLOSERS)
    if _SENTENCE_WORD.fullmatch(core) is None or _is_abbreviation(core) or core.lower() == "www.":
        return False
    return not (core.endswith(".") and len(core) <= 4 and core[0].isupper())


def _is_abbreviation(word: str) -> bool:
    return word.lower() in _ABBREVIATIONS


def _always(match: re.Match[str] | None) -> re.Match[str]:
    """A match of a pattern that matches wherever it is asked (it can match the empty string, or
    is asked only where its first character stands)."""
    assert match is not None, "the pattern always matches here"
    return match


@dataclass(frozen=True)
class _Gap:
    """A place to cut: after the word ending at `pos`."""

    pos: int
    length: int                 # characters of the chunk if cut here
    words: int                  # words of the chunk if cut here
    strength: int | None        # None: cannot be told before more text arrives
    glue: bool                  # cutting here would, or may, split an abbreviation, initials or a number
    end: bool = False           # the end of the reply


class _Splitter:
    """Cuts speakable text into chunks.

    A gap's strength depends only on the text around it, and a cut is chosen only once
    every gap before it is known, so the cuts never depend on the deltas' sizes. Chunk
    text is whitespace-normalised; marks are placed by their position in the text.

    The text of emitted chunks is dropped, so each push and cut costs time in what is held, not in
    all of the reply so far; and a gap is judged only up to the first past max_chars, as no cut
    comes after it."""

    def __init__(self, policy: ChunkerPolicy) -> None:
        self._policy = policy
        self._text = ""           # the speech not yet in a chunk
        self._dropped = 0         # the speech before it, in emitted chunks
        self._line_open = False   # whether the dropped speech ends in a line with words on it
        self._index = 0
        self._marks: list[_Placed] = []   # positions in self._text
        self._settled: list[tuple[re.Match[str], _Gap]] = []
        """The gaps of the current chunk judged for good, from its start, with their words: once the
        next word has begun, more text never changes a judged gap (the cuts never depend on how the
        text was split), so each is judged once, not again on every delta."""

    def push(self, speech: str, marks: list[_Placed]) -> None:
        self._text += speech
        self._marks += [(pos - self._dropped, tag, body) for pos, tag, body in marks]

    def cut(self, at_end: bool = False, delta_end: bool = False) -> list[Chunk]:
        """The chunks now decided; `delta_end`: the text held ends where a delta ended
        (ChunkerPolicy.first_at_delta_end)."""
        chunks: list[Chunk] = []
        while True:
            gap = self._choose(*self._gaps(at_end, delta_end and self._policy.first_at_delta_end))
            if gap is None:
                return chunks
            chunks.append(self._emit(gap.pos, final=gap.end))
            if gap.end:
                return chunks

    def finish(self) -> list[Chunk]:
        chunks = self.cut(at_end=True)
        if not chunks or not chunks[-1].final:
            chunks.append(self._emit(len(self._text), final=True))
        return chunks

    def stall_cut(self) -> Chunk | None:
        pos = self._stall_point()
        return None if pos is None else self._emit(pos, final=False)

    def holds_text(self) -> bool:
        return bool(self._text) and not self._text.isspace()

    def can_stall_cut(self) -> bool:
        return self._stall_point() is not None

    def _stall_point(self) -> int | None:
        """The end of the last complete word that fits; a word is complete when a space
        or a punctuation mark follows it."""
        gaps, total = self._gaps(at_end=False)
        tail = _LAST_TOKEN.search(self._text) if total <= self._policy.max_chars else None
        if (tail and _COMPLETE_TAIL.search(tail.group())
                and not self._is_glue(tail, None) and tail.group().lstrip(_OPENERS).lower() not in _NUMBER_BOUND):
            return tail.end()
        fitting = [gap.pos for gap in gaps if not gap.glue and gap.length <= self._policy.max_chars]
        return fitting[-1] if fitting else None

    def _choose(self, gaps: list[_Gap], total: int) -> _Gap | None:
        """The next cut, or None to wait. `total` counts a word still being written."""
        fits: list[_Gap] = []
        for gap in gaps:
            if gap.length > self._policy.max_chars:
                return self._forced(fits)
            if gap.strength is None:
                return None
            if gap.strength == HARD or self._good_cut(gap):
                return gap
            fits.append(gap)
        return self._forced(fits) if total > self._policy.max_chars else None

    def _good_cut(self, gap: _Gap) -> bool:
        p = self._policy
        if gap.strength is None:
            return False
        if self._index == 0:
            return ((gap.strength >= COMMA and gap.length >= p.min_first_chars)
                    or (gap.strength >= WORD and gap.words >= p.max_first_words))
        return gap.strength >= SENTENCE and gap.length >= p.min_chars

    def _forced(self, fits: list[_Gap]) -> _Gap:
        """The chunk would grow past max_chars: cut at the strongest gap that fits, never inside
        an abbreviation, initials or a number while another gap fits, preferring chunks of
        min_chars, then the longest; a word longer than max_chars is the one thing ever cut inside."""
        if fits:
            return max(fits, key=lambda gap: (not gap.glue, gap.length >= self._policy.min_chars, gap.strength,
                                              gap.length))
        first = _always(_TOKEN.search(self._text))
        return _Gap(first.start() + self._policy.max_chars, self._policy.max_chars, 1, WORD, False)

    def _gaps(self, at_end: bool, delta_end: bool = False) -> tuple[list[_Gap], int]:
        """Every gap of the current chunk up to the first past max_chars, and its length including
        the last word (or, past max_chars, up to that gap). With `delta_end`, the first chunk's last
        word, ending a sentence where the delta ended ("answer." or "answer. "), is taken as a
        sentence end at once."""
        gaps = [gap for _, gap in self._settled]
        length, words = (gaps[-1].length, gaps[-1].words) if gaps else (0, 0)
        if length > self._policy.max_chars:
            return gaps, length
        tokens = self._tokens()
        for i in range(len(gaps), len(tokens)):
            token = tokens[i]
            length += len(token.group()) + (1 if i else 0)
            words += bool(_WORDLIKE.search(token.group()))
            glue = self._is_glue(token, tokens[i - 1] if i else None)
            following = tokens[i + 1] if i + 1 < len(tokens) else None
            if at_end and not following:
                gaps.append(_Gap(token.end(), length, words, HARD, glue, end=True))
                break
            if not following and token.end() == len(self._text) and not _CLAUSE_END.search(token.group()):
                if delta_end and self._index == 0 and self._ends_sentence(token, tokens[i - 1] if i else None):
                    gaps.append(_Gap(token.end(), length, words, SENTENCE, False))
                break   # the word may go on
            word = token.group()
            # only a word ending in '.' or not starting in lowercase can bind to the next (see _binds)
            bound = glue or ((word[-1] == "." or not word[0].islower()) and self._binds(tokens, i, at_end))
            strength = self._strength(token, following, bound, at_end, delta_end)
            gaps.append(_Gap(token.end(), length, words, strength, bound is not False))
            if following and not at_end and strength is not None and bound is not None and len(self._settled) == i:
                self._settled.append((token, gaps[-1]))
            if length > self._policy.max_chars:
                break
        return gaps, length

    def _tokens(self) -> list[re.Match[str]]:
        """The words of the current chunk, up to the one after the first that takes it past max_chars."""
        tokens = [token for token, _ in self._settled]
        length = self._settled[-1][1].length if tokens else -1
        for token in _TOKEN.finditer(self._text, tokens[-1].end() if tokens else 0):
            tokens.append(token)
            if length > self._policy.max_chars:
                break
            length += len(token.group()) + 1
        return tokens

    def _strength(self, token: re.Match[str], following: re.Match[str] | None, glue: bool | None,
                  at_end: bool, delta_end: bool = False) -> int | None:
        """How good a cut after `token` is; `following` is the next word, if it has begun; `glue`
        is whether the words on either side bind (None: not known before more text arrives)."""
        if "\n" in self._text[token.end():following.start() if following else None]:
            return HARD   # line breaks end headings, list items and paragraphs
        if glue is None:
            return None
        if glue:
            return GLUE
        word = token.group()
        core = word.rstrip(_CLOSERS)
        terminal = _TERMINAL.search(core)
        if terminal:
            lowercase = self._lowercase_follows(token.end(), at_end)
            if lowercase is None and self._index == 0 and terminal.group() != ".":
                return STRONG_CLAUSE   # a first chunk may end here either way: no need to wait
            if lowercase is None and self._index == 0 and delta_end and _ordinary_end(word):
                return SENTENCE   # "answer. " at a delta's end: first_at_delta_end
            if lowercase is None:
                return None
            if lowercase:   # "Ну... я", «Кто?» — спросил он; after "." a false alarm
                return WORD if terminal.group() == "." else STRONG_CLAUSE
            return SENTENCE
        if core.endswith((";", ":")):
            return STRONG_CLAUSE
        if core.endswith(","):
            return COMMA
        if word.endswith(")"):
            return CLAUSE
        if not following:
            return None
        if following.group().startswith("("):
            return CLAUSE
        if following.group() in _DASHES:   # a dash standing alone, unless the word goes on
            return CLAUSE if at_end or following.end() < len(self._text) else None
        return WORD

    def _ends_sentence(self, token: re.Match[str], previous: re.Match[str] | None) -> bool:
        """Whether `token`, the last of the text, ends a sentence as an ordinary word (`_ordinary_end`)."""
        return _ordinary_end(token.group()) and not self._is_glue(token, previous)

    def _lowercase_follows(self, pos: int, at_end: bool) -> bool | None:
        """Whether the next sentence would start in lowercase, past quotes and dashes."""
        for char in self._text[pos:pos + 64]:
            if char.isspace() or char in _OPENERS or char in "—–-":
                continue
            return char.islower()
        return False if at_end or len(self._text) - pos >= 64 else None

    def _is_glue(self, token: re.Match[str], previous: re.Match[str] | None) -> bool:
        """Whether a cut after `token` would split it from what follows, whatever that is."""
        word = token.group().lstrip(_OPENERS)
        if _LIST_MARKER.fullmatch(word):
            return self._starts_line(token.start())
        if not word.endswith("."):
            return False
        low = word.lower()
        if low in _UNITS and previous and _NUMBER.fullmatch(previous.group()):
            return False
        if low in _NON_TERMINAL:
            return True
        if _DOTTED.fullmatch(word):
            return low not in _TERMINAL_DOTTED
        if _HYPHENATED.fullmatch(word):
            return word[0].isupper()
        return bool(_INITIAL.fullmatch(word)) and word[0].isupper() and word not in ("Я.", "I.")

    def _binds(self, tokens: list[re.Match[str]], i: int, at_end: bool) -> bool | None:
        """Whether a cut after token `i` would split it from the words that follow: an abbreviation
        from the number after it ("каб. 305", "Tel. +1 555"), a number from the next group of its
        digits ("+7 495 123-45-67"), or, after such an abbreviation, from its unit ("ок. 10 км"), or
        a surname from its initials ("Пушкин А. С."). None: the text that decides has not arrived.

        Each rule reads only as far as it must: an abbreviation, which waits for the next character
        anyway (is it a capital?), waits for one more only after a '+' or '№'; a word gap after a
        capitalised word waits for the second character of the next word only if it starts with a
        capital, after a number only while the next word could still become a unit. A comma, a
        semicolon or a sentence end after any other word is decided exactly as before, which is why
        a comma inside an address ("ул. Ленина, д. 5") is cut like any other: telling that an address
        part follows would hold every such comma back a word."""
        token = tokens[i]
        word = token.group().lstrip(_OPENERS)
        if word.endswith("."):
            return self._number_follows(token.end(), at_end) if _is_abbreviation(word) else False
        following = tokens[i + 1] if i + 1 < len(tokens) else None
        first = word[:1]
        if (first.isdigit() or first in ("+", "№")) and _NUMERIC.fullmatch(word):
            if following is None:   # a plain word gap waits for the next word anyway, one after ')' does not
                return None if word.endswith(")") else False
            rest = following.group().lstrip("(+№")
            if not rest:
                return None if self._may_go_on(following, at_end) else False
            if rest[0].isdigit():
                return True
            measured = i > 0 and _is_abbreviation(tokens[i - 1].group().lstrip(_OPENERS))
            return self._unit_follows(following, at_end) if measured else False
        if following and first.isupper() and following.group()[0].isupper():
            after = following.group()
            if word.isupper() or not _NAME.fullmatch(word):
                return False
            if len(after) == 1:
                return None if self._may_go_on(following, at_end) else False
            return after[1] == "."
        return False

    def _number_follows(self, pos: int, at_end: bool) -> bool | None:
        """Whether a number comes next, past spaces, opening brackets and quotes, and a '+' or '№'."""
        sign = False
        for char in self._text[pos:pos + 64]:
            if char == "\n":
                return False
            if char.isspace() or char in _OPENERS:
                continue
            if char in "+№" and not sign:
                sign = True
                continue
            return char.isdigit()
        return False if at_end or len(self._text) - pos >= 64 else None

    def _unit_follows(self, following: re.Match[str], at_end: bool) -> bool | None:
        """Whether the next word is a unit ("км", "km,", "p.m."); None while it is being written and
        could still become one."""
        word = following.group().lstrip(_OPENERS).lower()
        core = word.rstrip(".,;:!?…" + _CLOSERS)
        if self._may_go_on(following, at_end) and not _CLAUSE_END.search(word):
            return None if core in _NUMBER_UNITS or any(unit.startswith(word) for unit in _NUMBER_UNITS) else False
        return core in _NUMBER_UNITS or word in _NUMBER_UNITS

    def _may_go_on(self, token: re.Match[str], at_end: bool) -> bool:
        return not at_end and token.end() == len(self._text)

    def _starts_line(self, pos: int) -> bool:
        newline = self._text.rfind("\n", 0, pos)
        return not self._text[newline + 1:pos].strip() and not (newline < 0 and self._line_open)

    def _emit(self, end: int, final: bool) -> Chunk:
        index = self._index
        taken = len(self._marks) if final else sum(1 for pos, _, _ in self._marks if pos < end)
        marks = self._marks[:taken]
        self._marks = [(pos - end, tag, body) for pos, tag, body in self._marks[taken:]]
        text = " ".join(self._text[:end].split())
        placed = tuple(Mark(tag=tag, body=body, chunk=index, offset=_offset(self._text[:pos], len(text)))
                       for pos, tag, body in marks)
        newline = self._text.rfind("\n", 0, end)
        self._line_open = bool(self._text[newline + 1:end].strip()) or (newline < 0 and self._line_open)
        self._text, self._dropped, self._index = self._text[end:], self._dropped + end, index + 1
        self._settled = []
        return Chunk(text=text, index=index, final=final, marks=placed)


def _offset(before: str, limit: int) -> int:
    """Where text `before` a mark ends inside the whitespace-normalised chunk."""
    words = before.split()
    offset = len(" ".join(words)) + (1 if words and before[-1].isspace() else 0)
    return min(offset, limit)
