"""Which persona answers a request (`Request.persona`): the configured one, a `[llm.personas]` file, a
persona shipped in the package, or an error that says how to add it (docs/design/game-link.md §4.2)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from voxpipe.config import ConfigError, load
from voxpipe.stages.llm.persona import BUILT_IN, Personas

CHARACTERS = ("Crazy", "Cappy", "Kind", "Cart_portal", "ShortHair", "Cart_divan", "Mila", "Sleepy", "Creepy",
              "GameMaster")
"""The mod's characterType names (docs/design/game-link.md A8), but Player and None."""


def llm(**keys: Any) -> dict[str, Any]:
    """The [llm] section as the stage gets it: the defaults, with `keys` set."""
    return {**load(env={}).data["llm"], **keys}


def test_a_request_without_a_persona_gets_the_configured_one(tmp_path: Path) -> None:
    assert Personas.load(llm(system_prompt="Be brief.")).text("") == "Be brief."
    file = tmp_path / "mine.md"
    file.write_text("You are Mita.\n")
    assert Personas.load(llm(persona_file=str(file))).text("") == "You are Mita."


def test_every_miside_character_has_a_short_persona_shipped_in_the_package() -> None:
    personas = Personas.load(llm())
    assert {file.stem for file in BUILT_IN.glob("*.md")} == set(CHARACTERS)
    for name in CHARACTERS:
        text = personas.text(name)
        assert 5 <= len(text.splitlines()) <= 12, name
        assert "MiSide" in text and "<e>" in text and "<a>" in text and "language the player writes" in text, name


def test_a_configured_persona_file_comes_before_the_shipped_one_of_its_name(tmp_path: Path) -> None:
    crazy, guide = tmp_path / "crazy.md", tmp_path / "guide.md"
    crazy.write_text("You are my own Mita.\n")
    guide.write_text("You are the museum guide.")
    personas = Personas.load(llm(personas={"Crazy": str(crazy), "guide.v2": str(guide)}))
    assert personas.text("Crazy") == "You are my own Mita."
    assert personas.text("guide.v2") == "You are the museum guide."
    assert personas.text("Kind") == (BUILT_IN / "Kind.md").read_text().strip()


def test_an_unknown_persona_is_a_config_error_that_says_how_to_add_it(tmp_path: Path) -> None:
    guide = tmp_path / "guide.md"
    guide.write_text("You are the museum guide.")
    personas = Personas.load(llm(personas={"guide": str(guide)}))
    with pytest.raises(ConfigError) as refused:
        personas.text("crazy")  # names are matched exactly
    message = str(refused.value)
    assert message.startswith("unknown persona 'crazy'; add [llm.personas] crazy = \"/path/file\"")
    assert "configured: guide;" in message and "built in: Cappy, Cart_divan," in message


@pytest.mark.parametrize("personas, error", [
    ({"Crazy": "/nonexistent/crazy.md"}, "key llm.personas.Crazy = '/nonexistent/crazy.md' cannot be read"),
    ({"two words": "/x.md"}, "key llm.personas.two words: a persona name is 1 to 64 of"),
    ({"": "/x.md"}, "key llm.personas.: a persona name is"),
    ({"Crazy": 3}, "key llm.personas.Crazy = 3 is not allowed; expected the path of a persona file"),
])
def test_a_persona_the_stage_cannot_use_stops_it_at_start_naming_the_key(personas: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError, match=error.replace(".", r"\.").replace("(", r"\(")):
        Personas.load(llm(personas=personas))


def test_the_config_takes_a_personas_table_from_the_file_and_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[llm.personas]\nCrazy = "~/crazy.md"\n')
    config = load(path, env={"VOXPIPE_LLM__PERSONAS__GUIDE": "/srv/guide.md"})
    assert config["llm"]["personas"] == {"Crazy": "~/crazy.md", "guide": "/srv/guide.md"}
    assert load(env={})["llm"]["personas"] == {}
