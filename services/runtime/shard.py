"""Stable session sharding, so N instances of a stage split sessions without coordination."""

from __future__ import annotations

import re
from dataclasses import dataclass

_SPEC = re.compile(r"(\d+)/(\d+)")


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count`: owns the sessions whose stable hash lands on index.

    Python's `hash()` is salted per process, so two instances would disagree;
    blake2b of the session id is the same everywhere and in every language.
    """

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count > 1:  # hashlib loads OpenSSL (3.5 MB of RSS): only a sharded stage needs it, from the start
            import hashlib  # noqa: F401  (loaded here, so the first message does not wait for it)

    @classmethod
    def parse(cls, spec: str) -> Shard:
        """Parse ``I/N`` (0 <= I < N), as given to ``--shard``."""
        match = _SPEC.fullmatch(spec.strip())
        if not match:
            raise ValueError(f"--shard {spec!r}: expected I/N, for example 0/2")
        index, count = int(match.group(1)), int(match.group(2))
        if count < 1 or not 0 <= index < count:
            raise ValueError(f"--shard {spec!r}: need N >= 1 and 0 <= I < N")
        return cls(index, count)

    def owns(self, session: str) -> bool:
        return self.count == 1 or shard_of(session, self.count) == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def shard_of(session: str, count: int) -> int:
    """The shard index of a session: first 8 bytes of blake2b(session), big-endian, mod count."""
    import hashlib  # loaded by a sharded Shard (above)

    digest = hashlib.blake2b(session.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count
