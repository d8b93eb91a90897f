"""Numbers to words before synthesis, for engines that would otherwise read digits badly.

espeak-ng and hosted voices expand numbers themselves; small neural voices (Coqui VITS, XTTS)
often do not. Which languages to expand is set per engine (`normalize_numbers`). Pure.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_CYRILLIC = re.compile(r"[а-яё]", re.I)
_NUMBER = re.compile(r"(?<![\w.,])(\d{1,15})(?:([.,])(\d{1,6}))?(?![\w]|[.,]\d)")


def language_of(text: str) -> str:
    """ru when the text has Cyrillic letters, else en (voxpipe's two languages)."""
    return "ru" if _CYRILLIC.search(text) else "en"


def spell_numbers(text: str, languages: Iterable[str]) -> str:
    """Spell out integers and decimals ("2,5", "3.14") when the chunk's language is listed.

    Times, dates, versions and numbers glued to letters ("12:30", "1.2.3", "mp3") stay as they
    are: they are left to the engine rather than read wrongly.
    """
    language = language_of(text)
    if language not in set(languages):
        return text
    from num2words import num2words

    def spell(match: re.Match[str]) -> str:
        whole, _separator, fraction = match.groups()
        if _inside_time_or_date(text, match):
            return match.group()
        value = float(f"{whole}.{fraction}") if fraction else int(whole)
        return num2words(value, lang=language)

    return _NUMBER.sub(spell, text)


def _inside_time_or_date(text: str, match: re.Match[str]) -> bool:
    before, after = text[max(0, match.start() - 1):match.start()], text[match.end():match.end() + 1]
    return before in (":", "/", "-") or after in (":", "/")
