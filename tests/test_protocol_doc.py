"""docs/protocol.md is the contract: every kind has an example there, and every example is valid."""

from __future__ import annotations

import json
import re

from services import protocol
from tests.harness import ROOT

BIN = re.compile(r'"<bin (\d+) bytes>"')


def examples() -> list[dict]:
    text = (ROOT / "docs" / "protocol.md").read_text()
    found = []
    for block in re.findall(r"```json\n(.*?)```", text, re.S):
        block = BIN.sub(lambda match: json.dumps({"__bin__": int(match.group(1))}), block)
        data = json.loads(block)
        if isinstance(data, dict) and "kind" in data:
            found.append(data)
    return found


def with_binary(value):
    if isinstance(value, dict):
        if set(value) == {"__bin__"}:
            return b"\x00" * value["__bin__"]
        return {key: with_binary(item) for key, item in value.items()}
    if isinstance(value, list):
        return [with_binary(item) for item in value]
    return value


def test_every_kind_has_a_valid_example_in_the_protocol_doc() -> None:
    kinds = set()
    for example in examples():
        message = protocol.validate(with_binary(example))
        assert set(example) - {"v", "kind", "session", "id", "seq", "ts", "src"} == set(message.body), \
            f"{message.kind} example does not show exactly its fields"
        kinds.add(message.kind)
    assert kinds == set(protocol.KINDS)
