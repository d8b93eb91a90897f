"""Text from the bus or the model made safe to print on a terminal.

Model replies, history, `src` names and counter names are untrusted: an ESC sequence in them can
recolour or clear the screen, an OSC sequence can retitle the window or plant a hyperlink, a CR can
overwrite what was printed before, and a bidi override can reorder what the reader sees.  Every
front-end passes such text through `printable` before it reaches a terminal; the colours a
front-end emits itself are added after, so they stay intact.
"""
from __future__ import annotations

import json
import re
from typing import Any

_BIDI = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
"""The bidi marks, embeddings, overrides and isolates: each can reorder what the reader sees."""
_CONTROL = re.compile(f"[\x00-\x08\x0b-\x1f\x7f-\x9f{_BIDI}]")
_CONTROL_AND_LINES = re.compile(f"[\x00-\x1f\x7f-\x9f{_BIDI}]")
_JSON_UNSAFE = re.compile(f"[\x7f-\x9f{_BIDI}]")
"""What json.dumps(ensure_ascii=False) leaves raw in its strings that a terminal would act on."""


def _shown(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str, *, one_line: bool = False) -> str:
    """`text` with every control character written out as `\\xNN` (`\\uNNNN` for bidi controls).

    Newlines and tabs stay as they are unless `one_line` is set, for fields such as a stage name
    or a counter that must not break the row they sit in.
    """
    return (_CONTROL_AND_LINES if one_line else _CONTROL).sub(_shown, text)


def printable_json(value: Any) -> str:
    """`value` as indented JSON that is safe on a terminal and still the same data: json.dumps escapes
    C0 controls itself; DEL, C1 and the bidi controls become `\\uNNNN` escapes too (they can stand
    only inside strings, where JSON allows the escape), and every other character stays readable."""
    text = json.dumps(value, ensure_ascii=False, indent=2)
    return _JSON_UNSAFE.sub(lambda match: f"\\u{ord(match.group()):04x}", text)
