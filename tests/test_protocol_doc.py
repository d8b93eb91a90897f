"""docs/protocol.md is the contract, and this module holds it to the code, both ways.

- every kind in `protocol.KINDS` has a section, and every section names a kind;
- every field of every kind (and of the envelope, and of nested maps such as `marks[]`) has a table
  row with its type, required or default, and limit, and every row names a field;
- every error code the code publishes is in the error-code table, and every code there is published;
  every `ErrorCode` member is published somewhere;
- every heartbeat counter the code counts is in the counter table, and the reverse;
- the stage tables of §1 and §5 say what each process really subscribes to and publishes;
- the sessionless kinds, the contents list and the section numbering are right;
- every kind has one example, and every example is valid.

What the code says is read from `voxpipe.protocol` (each kind class's `spec`, through `spec_of`
below), what a stage consumes from its `@handles` declarations, and, for codes, counters and who
publishes what, from the sources by an AST walk, never by grep: a kind is published where a module
builds its object (`Chunk(...)`); an error code is the `ErrorCode.NAME` first argument of a
`report`/`Report` call, or the `code=` of an `Error(...)`; a counter is a literal `....counters["name"]`.
If the field specs change shape, only `spec_of`, `type_name`, `record_fields` and `limits` need to.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import pytest

from tests.harness import ROOT
from voxpipe import protocol
from voxpipe.protocol import ErrorCode
from voxpipe.runtime.registry import stage_class

DOC = ROOT / "docs" / "protocol.md"
SERVICES = ROOT / "services"
BIN = re.compile(r'"<bin (\d+) bytes>"')
TICKED = re.compile(r"`([^`]+)`")
STAGES = ("llm", "history", "chunker", "tts", "player")
"""The stage packages: services/stages/<name>/ holds the stage class and what it builds."""
PROCESSES = (*STAGES, "bus", "launcher")
ENVELOPE_KINDS = ("hello", "heartbeat", "error")
"""Kinds every participant publishes through the runtime (services/runtime/stage.py), not its own code."""


# --- the document ---------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def doc() -> str:
    return DOC.read_text()


def section(heading: str) -> str:
    """The text under the heading that starts with `heading`, up to the next heading of its level or above."""
    text = doc()
    match = re.search(rf"^(#+) {re.escape(heading)}.*$", text, re.M)
    assert match, f"docs/protocol.md has no heading starting with {heading!r}"
    level = len(match.group(1))
    end = re.compile(rf"^#{{1,{level}}} ", re.M).search(text, match.end())
    return text[match.end():end.start() if end else len(text)]


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def tables(text: str) -> list[Table]:
    """The markdown tables in `text`, outside code blocks."""
    found: list[Table] = []
    lines = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M).splitlines()
    for number, line in enumerate(lines):
        if line.startswith("|") and number + 1 < len(lines) and re.fullmatch(r"\|(-+\|)+", lines[number + 1]):
            if number and lines[number - 1].startswith("|"):
                continue
            table = Table(cells(line))
            for row in lines[number + 2:]:
                if not row.startswith("|"):
                    break
                table.rows.append(cells(row))
            found.append(table)
    return found


def table_with(text: str, *header: str) -> Table:
    matches = [table for table in tables(text) if table.header[:len(header)] == list(header)]
    assert len(matches) == 1, f"expected one table with header {header}, found {len(matches)}"
    return matches[0]


def ticked(cell: str) -> list[str]:
    return TICKED.findall(cell)


def numbers(cell: str) -> set[int]:
    """The numbers written in a table cell: `65 536` is one number, `−1` is negative, `2^53` is 2 and 53."""
    cell = cell.replace("\u2212", "-")
    return {int(text.replace(" ", "")) for text in
            re.findall(r"(?<![\w.-])-?\d{1,3}(?: \d{3})+(?!\d)|(?<![\w.])-?\d+", cell)}


def literal(cell: str) -> Any:
    """A default as the doc writes it: the first `...` of the cell, in JSON (or nil)."""
    value = ticked(cell)[0]
    return None if value == "nil" else json.loads(value)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


# --- the code: field specs ------------------------------------------------------------------------

def spec_of(check: Callable[[Any], str | None]) -> tuple[str, dict[str, Any]]:
    """The maker of a field check (`text`, `integer`, `list_of`, ...) and the arguments it closed over."""
    maker = check.__qualname__.split(".")[0]
    return maker, dict(inspect.getclosurevars(check).nonlocals)


def type_name(check: Callable[[Any], str | None]) -> str:
    maker, args = spec_of(check)
    simple = {"text": "str", "integer": "int", "number": "number", "fraction": "number", "boolean": "bool",
              "optional_boolean": "nil or bool", "binary": "bin", "record": "map"}
    if maker in simple:
        return simple[maker]
    if maker == "list_of":
        return f"array of {type_name(args['item'])}"
    if maker == "counter_map":
        return f"map str→{type_name(args['values'])}"
    raise AssertionError(f"a field check made by {maker} is new: teach type_name() and the doc its type")


def record_fields(check: Callable[[Any], str | None]) -> dict[str, Callable[[Any], str | None]]:
    """The fields of a nested map (a `record`, or a `list_of` them); {} for other checks."""
    maker, args = spec_of(check)
    if maker == "list_of":
        return record_fields(args["item"])
    return dict(args["fields"]) if maker == "record" else {}


def counter_map_size() -> int:
    """The entry limit of a `map str→T`, as the check reports it."""
    problem = protocol.KINDS["heartbeat"].spec["counters"].check({str(n): 0 for n in range(1 << 16)})
    return int(re.search(r"the limit is (\d+)", problem or "").group(1))


def limits(check: Callable[[Any], str | None]) -> tuple[set[int], list[str]]:
    """The numbers and the `literals` a field's limit cell must show."""
    maker, args = spec_of(check)
    if maker == "text":
        if args["choices"]:
            return set(), [f"`{choice}`" if choice else '`""`' for choice in args["choices"]]  # "" as the doc writes it
        pattern = [f"`{args['pattern'].pattern}`"] if args["pattern"] is not None else []
        return {args["limit"]}, pattern
    if maker == "integer":
        low, high = args["low"], args["high"]
        return ({low} if low or high == 2**53 else set()) | ({high} if high != 2**53 else set()), []
    if maker == "fraction":
        return {0, 1}, []
    if maker in ("binary",):
        return {args["limit"]}, []
    if maker == "list_of":
        inner = limits(args["item"]) if not record_fields(args["item"]) else (set(), [])
        return {args["limit"]} | inner[0], inner[1]
    if maker == "counter_map":
        values = limits(args["values"])
        return {counter_map_size()} | limits(args["key_check"])[0] | values[0], values[1]
    return set(), []


def code_fields(spec: dict[str, protocol.Field]) -> dict[str, tuple[Callable[[Any], str | None], bool, Any]]:
    """Every field a kind's table must list: name -> (check, required, default); nested ones as `a[].b`."""
    found = {}
    for name, rule in spec.items():
        found[name] = (rule.check, rule.required, rule.default)
        for inner, check in record_fields(rule.check).items():
            found[f"{name}[].{inner}"] = (check, True, None)
    return found


# --- the code: who subscribes to and publishes what, error codes, counters --------------------------

def sources(*paths: Path) -> list[tuple[Path, ast.Module]]:
    files = [file for path in paths for file in ([path] if path.is_file() else sorted(path.rglob("*.py")))]
    return [(file, ast.parse(file.read_text(), str(file))) for file in files]


def string_arg(call: ast.Call) -> str | None:
    if call.args and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str):
        return call.args[0].value
    return None


def calls(tree: ast.AST, method: str) -> list[ast.Call]:
    """Calls of `x.method(...)`, `method(...)` and `Method(...)` (the effect records, such as llm's `Publish`)."""
    names = {method, method.capitalize()}
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)
            and (node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")) in names]


def assigned_strings(tree: ast.AST, name: str) -> set[str]:
    """The strings in the tuples assigned to `name` (`kinds = (...)`, in either branch of an if)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(isinstance(target, ast.Name) and target.id == name
                                                for target in node.targets):
            found |= {item.value for leaf in ast.walk(node.value) if isinstance(leaf, (ast.Tuple, ast.List))
                      for item in leaf.elts if isinstance(item, ast.Constant) and isinstance(item.value, str)}
    return found


KIND_CLASSES = {cls.__name__: name for name, cls in protocol.KINDS.items()}
"""The class of each kind by its name: building one (`Chunk(...)`) is how the code publishes a kind."""


@cache
def process_code(process: str) -> tuple[frozenset[str], frozenset[str]]:
    """(kinds it subscribes to, kinds it publishes): the first from the stage's `@handles` declarations
    (the launcher's from its `kinds = (...)`), the second from the kind objects its sources build."""
    if process == "launcher":
        trees = sources(SERVICES / "ops" / "supervisor.py")
        consumed: set[str] = set().union(*(assigned_strings(tree, "kinds") for _, tree in trees))
        published = {"hello"}
    else:
        trees = sources(SERVICES / "runtime" / "broker_stage.py" if process == "bus" else SERVICES / "stages" / process)
        consumed = {*stage_class(process).kinds(), "heartbeat"}
        published = set(ENVELOPE_KINDS)
    for _, tree in trees:
        published |= {KIND_CLASSES[name] for node in ast.walk(tree) if isinstance(node, ast.Call)
                      and (name := getattr(node.func, "id", "")) in KIND_CLASSES}
        if calls(tree, "report"):
            published.add("error")
    return frozenset(consumed), frozenset(published)


def error_code_of(node: ast.AST | None) -> str | None:
    """The code of an `ErrorCode.NAME` expression."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "ErrorCode":
        return ErrorCode[node.attr].value
    return None


@lru_cache(maxsize=1)
def error_codes() -> dict[str, frozenset[Path]]:
    """Every error code the code publishes -> the files that publish it: the `ErrorCode` first argument of
    a `report`/`Report` call, or the `code=` of an `Error(...)` body."""
    found: dict[str, set[Path]] = {}
    for path, tree in sources(SERVICES):
        for call in calls(tree, "report"):
            if (code := error_code_of(call.args[0] if call.args else None)) is not None:
                found.setdefault(code, set()).add(path)
        for call in calls(tree, "error"):
            for keyword in call.keywords:
                if keyword.arg == "code" and (code := error_code_of(keyword.value)) is not None:
                    found.setdefault(code, set()).add(path)
    return {code: frozenset(paths) for code, paths in found.items()}


def test_every_error_code_in_the_enum_is_published() -> None:
    assert set(error_codes()) == {code.value for code in ErrorCode}


def counter_names() -> set[str]:
    """Every `<...>.counters["name"]` the code counts."""
    return {node.slice.value for _, tree in sources(SERVICES) for node in ast.walk(tree)
            if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "counters" and isinstance(node.slice, ast.Constant)
            and isinstance(node.slice.value, str)}


# --- kinds and fields -----------------------------------------------------------------------------

def kind_sections() -> dict[str, tuple[str, str]]:
    """kind -> (section number, section text), from the `### 5.N `kind`` headings."""
    found: dict[str, tuple[str, str]] = {}
    for match in re.finditer(r"^### (5\.\d+) (.*)$", doc(), re.M):
        for kind in ticked(match.group(2)):
            assert kind not in found, f"kind {kind} has two sections"
            found[kind] = (match.group(1), section(f"{match.group(1)} "))
    return found


def doc_fields(kind: str) -> dict[str, list[str]]:
    """A kind's field rows: field name -> [type, required / default, limit, meaning]."""
    rows: dict[str, list[str]] = {}
    for table in tables(kind_sections()[kind][1]):
        if table.header[:2] == ["kind", "field"]:
            entries = [row[1:] for row in table.rows if ticked(row[0]) == [kind]]
        elif table.header[0] == "field":
            entries = table.rows
        else:
            continue
        for entry in entries:
            assert len(entry) == 5, f"{kind}: a field row needs type, required / default, limit, meaning: {entry}"
            inherited = re.fullmatch(r"all `([\w.]+)` fields", entry[0])
            if inherited:
                rows.update(doc_fields(inherited.group(1)))
                continue
            for name in ticked(entry[0]):
                assert name not in rows, f"{kind}.{name} is documented twice"
                rows[name] = entry[1:]
    return rows


def check_row(where: str, row: list[str], check: Callable[[Any], str | None], required: bool, default: Any) -> None:
    kind_of_value, requirement, limit = row[0].replace("*", "").strip(), row[1], row[2]
    assert kind_of_value == type_name(check), f"{where}: the doc says type {kind_of_value!r}, the code " \
                                              f"{type_name(check)!r}"
    if required:
        assert requirement == "required", f"{where} is required, the doc says {requirement!r}"
    else:
        assert requirement != "required" and ticked(requirement), f"{where} has a default, the doc says " \
                                                                 f"{requirement!r}"
        shown = literal(requirement)
        default = list(default) if isinstance(default, tuple) else default  # lists are tuples in the typed kinds
        assert shown == default and isinstance(shown, bool) == isinstance(default, bool), \
            f"{where}: the doc's default is {shown!r}, the code's {default!r}"
    expected_numbers, expected_literals = limits(check)
    missing = sorted(expected_numbers - numbers(limit)) + [text for text in expected_literals if text not in limit]
    assert not missing, f"{where}: the limit cell {limit!r} does not show {missing}"


def test_every_kind_has_one_section_and_every_section_is_a_kind() -> None:
    assert set(kind_sections()) == set(protocol.KINDS)


@pytest.mark.parametrize("kind", sorted(protocol.KINDS))
def test_every_field_is_documented_exactly(kind: str) -> None:
    documented = doc_fields(kind)
    fields = code_fields(protocol.KINDS[kind].spec)
    assert not set(fields) - set(documented), f"{kind}: fields missing from docs/protocol.md"
    assert not set(documented) - set(fields), f"{kind}: docs/protocol.md lists fields the code does not have"
    for name, (check, required, default) in fields.items():
        check_row(f"{kind}.{name}", documented[name], check, required, default)


def test_the_envelope_table_is_exact() -> None:
    table = table_with(section("4. "), "field", "type", "limit", "meaning")
    rows = {ticked(row[0])[0]: row[1:] for row in table.rows}
    assert list(rows) == list(protocol.ENVELOPE), "the envelope rows, in the order decode() checks them"
    for name, rule in protocol.ENVELOPE.items():
        assert rule.required
        check_row(f"envelope.{name}", [rows[name][0], "required", rows[name][1]], rule.check, True, None)


def test_the_sessionless_kinds_are_named_where_the_doc_defines_them() -> None:
    envelope = table_with(section("4. "), "field", "type", "limit", "meaning")
    session_row = next(row for row in envelope.rows if row[0] == "`session`")
    assert set(ticked(session_row[3])) == protocol.SESSIONLESS_KINDS
    step = re.search(r"^8\. `session` is empty.*?(?=^\d+\. )", section("6.2 "), re.M | re.S)
    assert step and set(ticked(step.group(0))) - {"session"} == protocol.SESSIONLESS_KINDS


# --- error codes and counters ---------------------------------------------------------------------

def test_every_error_code_is_in_the_table_and_every_code_there_is_published() -> None:
    table = table_with(section("5.14 "), "code", "from")
    rows = {ticked(row[0])[0]: row for row in table.rows}
    codes = error_codes()
    assert set(codes) == set(rows), "error codes: the code publishes (left) vs docs/protocol.md (right)"
    for code, paths in codes.items():
        for path in paths:
            part = path.relative_to(SERVICES).parts
            publisher = {"runtime": "any", "ops": "launcher"}.get(part[0]) or part[1]
            assert re.search(rf"\b{publisher}\b", rows[code][1]), \
                f"{code} is published by {path.relative_to(ROOT)}: its 'from' cell should say {publisher}"


def test_every_counter_is_documented_and_every_documented_counter_is_counted() -> None:
    table = table_with(section("5.15 "), "counter", "meaning")
    assert {name for row in table.rows for name in ticked(row[0])} == counter_names()


# --- who subscribes to and publishes what ---------------------------------------------------------

def kinds_in(cell: str) -> set[str]:
    """The kinds a cell names; error codes in it (`error` (`gap`)) are not kinds."""
    codes = set(error_codes())
    found = {token for token in ticked(cell) if re.fullmatch(r"[a-z]+(\.[a-z]+)*", token) and token not in codes}
    unknown = found - set(protocol.KINDS)
    assert not unknown, f"{cell!r} names kinds that do not exist: {unknown}"
    return found


def test_the_overview_table_says_what_each_process_subscribes_to_and_publishes() -> None:
    table = table_with(section("1. "), "process (`src`)", "consumes (subscribes to)", "publishes")
    rows = {ticked(row[0])[0] if row[0].startswith("`") else row[0]: row for row in table.rows}
    every = next(row for name, row in rows.items() if name.startswith("every stage"))
    assert "`bus`" in every[0]
    for process in PROCESSES:
        consumed, published = process_code(process)
        row = rows.get(process, ["", "", ""])
        shared = every if process != "launcher" else ["", "", ""]
        assert kinds_in(row[1]) | kinds_in(shared[1]) == consumed, f"{process}: what it subscribes to"
        assert kinds_in(row[2]) | kinds_in(shared[2]) == published, f"{process}: what it publishes"
    front_end = next(row for name, row in rows.items() if name.startswith("front-end"))
    assert kinds_in(front_end[2]) == {"request", "cancel"}


def processes_in(cell: str) -> set[str]:
    names = {name for name in PROCESSES if re.search(rf"(?<![\w.`]){name}(?![\w`])", cell)}
    if "every stage" in cell:
        names |= {*STAGES, "bus"}
    if "any process" in cell or "every participant" in cell:
        names |= set(PROCESSES)
    return names


def test_the_kind_summary_says_who_produces_and_consumes_each_kind() -> None:
    table = table_with(section("5. "), "kind", "§", "producer", "consumers")
    sections = kind_sections()
    seen = []
    for row in table.rows:
        (kind,) = ticked(row[0])
        seen.append(kind)
        assert row[1] == sections[kind][0], f"{kind} is in §{sections[kind][0]}, the summary says §{row[1]}"
        producers = {process for process in PROCESSES if kind in process_code(process)[1]}
        consumers = {process for process in PROCESSES if kind in process_code(process)[0]}
        assert processes_in(row[2]) == producers, f"{kind}: producers"
        assert processes_in(row[3]) == consumers, f"{kind}: consumers"
    assert sorted(seen) == sorted(protocol.KINDS)


# --- structure ------------------------------------------------------------------------------------

def headings() -> list[tuple[int, str]]:
    text = re.sub(r"^```.*?^```", "", doc(), flags=re.S | re.M)
    return [(len(match.group(1)), match.group(2)) for match in re.finditer(r"^(##+) (.*)$", text, re.M)]


def test_sections_are_numbered_in_order() -> None:
    top = 0
    sub = 0
    for level, title in headings():
        number = title.split(" ", 1)[0]
        if level == 2:
            top, sub = top + 1, 0
            assert number == f"{top}.", f"section {title!r} should be numbered {top}."
        else:
            sub += 1
            assert number == f"{top}.{sub}", f"section {title!r} should be numbered {top}.{sub}"


def test_the_contents_list_links_every_section() -> None:
    contents = doc()[doc().index("Contents:"):doc().index("\n---\n")]
    links = re.findall(r"\]\(#([^)]+)\)", contents)
    assert len(links) == len(set(links))
    assert set(links) == {slug(title) for _, title in headings()}


# --- examples -------------------------------------------------------------------------------------

def examples() -> list[dict]:
    found = []
    for block in re.findall(r"```json\n(.*?)```", doc(), re.S):
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
    kinds = []
    for example in examples():
        message = protocol.validate(with_binary(example))
        assert set(example) - {"v", "kind", "session", "id", "seq", "ts", "src"} == set(message.body.to_wire()), \
            f"{message.kind} example does not show exactly its fields"
        kinds.append(message.kind)
    assert sorted(kinds) == sorted(protocol.KINDS), "one example per kind"
