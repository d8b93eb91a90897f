"""The fake OpenAI server, answering with what its system message told it of the game: the distance
to the player, and whether the character's persona came with it (and an emotion tag). So a test sees, in the line the
game shows, that the game state of that request reached the model's prompt.

Run as a real process: `python -m tests.fakes.game_llm` prints `PORT <n>`.
"""

from __future__ import annotations

import re

from tests.fakes.openai_server import Handler, main

DISTANCE = re.compile(r"(?:Distance to the player|Расстояние до игрока): ([0-9.]+)")


class GameHandler(Handler):
    def reply_text(self, body: dict) -> str:
        system = "\n".join(m["content"] for m in body["messages"] if m["role"] == "system")
        found = DISTANCE.search(system)
        persona = "Mita" in system
        user = [m["content"] for m in body["messages"] if m["role"] == "user"][-1].split("\n")[-1]
        return (f"You are {found.group(1) if found else 'nowhere'} metres away. "
                f"<e>smile</e>{'I am Mita' if persona else 'I am nobody'}. You said: {user}")


if __name__ == "__main__":
    main(GameHandler)
