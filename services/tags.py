"""The command-tag grammar, shared by the chunker (never speak them) and history (parse them).

A tag is `<name>body</name>`. Memory tags carry an operator before the name and
close without it, as the companion app writes them: `<+memory>high|text</memory>`.
"""

from __future__ import annotations

DEFAULT_TAGS = ("e", "c", "a", "m", "f", "v", "p", "music", "hint", "clothes", "interaction",
                "+memory", "#memory", "-memory")
OPERATORS = "+#-"


def closers(tag: str) -> tuple[str, ...]:
    """The closing tags that end `tag`: `</+memory>` and `</memory>` both end `<+memory>`."""
    names = [tag]
    if tag[:1] in OPERATORS and len(tag) > 1:
        names.append(tag[1:])
    return tuple(f"</{name}>" for name in names)
