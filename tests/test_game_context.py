"""The game's state reaches the model, end to end: `voxpipe game` on a real daemon whose fake model
answers with what its system message said (tests/fakes/game_llm.py), played by the mod's test double.
The distance the game sends with a decimal comma comes back in the character's line; the character's
built-in persona is in the prompt; a game event becomes a reply; history keeps the game session."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator

import pytest

from tests.fakes.miside_mod import ModDouble
from tests.harness import ROOT, Daemon, fake_openai, free_port, openai_settings, stop_process
from tests.test_game_link import KEY, plain, tap
from voxpipe.frontends.game.wire import IDLE_EVENT
from voxpipe.protocol import Command

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    with fake_openai(delay=0.02, module="tests.fakes.game_llm") as url, \
            Daemon(openai_settings(url), env=KEY) as running:
        yield running


@contextlib.contextmanager
def game(daemon: Daemon) -> Iterator[int]:
    port = free_port()
    env = {**daemon.env, "VOXPIPE_GAME__VOICE_DIR": str(daemon.dir / f"voices-{port}"),
           "VOXPIPE_GAME__LANGUAGE": "EN"}
    process = subprocess.Popen(daemon.cli("game", "--port", str(port)), cwd=ROOT, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None and "listening on" in process.stdout.readline()
    try:
        yield port
    finally:
        code, err = stop_process(process)
        assert code == 0, err


def spoken(mod: ModDouble, start: int, ending: str) -> str:
    """The text of the voiced lines from `start` on, once one ends with `ending`."""
    mod.wait_for(lambda: any(plain(line.text).endswith(ending) for line in mod.voiced_lines()[start:]), timeout=60)
    return " ".join(plain(line.text) for line in mod.voiced_lines()[start:])


def test_the_game_state_and_the_persona_reach_the_model_and_events_are_answered(daemon: Daemon) -> None:
    with tap(daemon, "command") as commands, game(daemon) as port, ModDouble(port) as mod:
        mod.set_state(distance=3.27, room_player=1, room_mita=0)
        assert mod.say("Where am I?")
        said = spoken(mod, 0, "Where am I?")
        assert "You are 3.27 metres away." in said and "I am Mita." in said  # sent as "3,27" (A9)
        assert any("<e>smile</e>I am Mita." in line.text for line in mod.voiced_lines())  # the tag inline
        commands.read(2.0)
        assert [(body.name, body.args, body.accepted) for _, body in commands.bodies(Command)][:1] == [
            ("e", ("smile",), True)]  # and history judged it as for every reply
        mod.set_state(distance=12.5)
        start = len(mod.voiced_lines())
        mod.idle()
        said = spoken(mod, start, IDLE_EVENT)
        assert "You are 12.50 metres away." in said
        assert mod.log.failures() == []
    shown = daemon.run_cli("history", "show", "game.Crazy")
    assert shown.returncode == 0 and "Where am I?" in shown.stdout and "3.27 metres" in shown.stdout
