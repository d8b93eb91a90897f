"""Dialect B, the task API of newer NeuroMita versions, where its shapes are definite (design §1.8, §8).

One connection stays open; the game creates tasks and the link pushes `task_update`s as they move:
PENDING at once, VOICING with the whole text at llm.done, SUCCESS with one voice file (or
FAILED_ON_GENERATION, FAILED_ON_VOICEOVER, CANCELLED). Whole-reply only: the B client is not public,
so whether it would take a reply phrase by phrase is unknown (the newest app's segment broadcast is
unverified, notes §4).

Pure, like `core`: the link passes the time in and carries out the effects.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field

from ...protocol import Audio, Body, Cancel, Chunk, LlmDone, Mark, Message, Playback, Request
from ...stages.audio import AudioFormat
from ...stages.tags import DEFAULT_TAGS, LOOKAHEAD, TagStripper
from .core import (
    SESSION_PREFIX,
    Answer,
    Delete,
    Effect,
    Expiring,
    Log,
    MakeWav,
    Publish,
    Settings,
    game_text,
    state_lines,
)
from .wire import (
    IDLE_EVENT,
    BAction,
    Malformed,
    b_aborted,
    b_error,
    b_info,
    b_loaded_settings,
    b_task,
    b_task_status,
    b_task_update,
    parse_b,
)

IDLE_TIMEOUT_S = 300.0
"""A B connection that sends nothing for this long is closed: the game polls or creates tasks often."""
TASKS_KEPT = 256
"""Finished tasks remembered for get_task_status; the oldest go."""
INFOS_KEPT = 64


@dataclass
class Task:
    uid: str
    conn: int
    type: str
    data: dict[str, object]
    created_at: float
    session: str
    status: str = "PENDING"
    updated_at: float = 0.0
    result: dict[str, object] = field(default_factory=dict)
    error: str | None = None
    spoken: bool = False
    """A chunk with words came: a reply that then has no audio lost its voice to the speech engine."""
    pieces: list[tuple[bytes, AudioFormat]] = field(default_factory=list)
    chunks: dict[int, int] = field(default_factory=dict)
    """Chunk index -> its length, for the playback reports history records what was heard from."""
    moved: float = 0.0
    """When the bus last moved it on (monotonic): a task that has not for stall_s fails."""

    def body(self) -> dict[str, object]:
        return b_task(self.uid, self.status, self.type, self.data, self.created_at, self.updated_at,
                      self.result or None, self.error)


def reply_text(text: str, tags: frozenset[str]) -> str:
    """llm.done's whole text for the game: its allowed tags inline where the model wrote them, the
    others out, as `game_text` does for a chunk (the app's `response` in tag mode, notes §3). Taken
    from llm.done rather than joined from the chunks, which lose the reply's own spacing and lines."""
    shown, found = TagStripper(tuple(dict.fromkeys((*DEFAULT_TAGS, *sorted(tags)))), LOOKAHEAD).push(text, True)
    marks = tuple(Mark(tag=tag.name, body=tag.body, chunk=0, offset=tag.shown) for tag in found if tag.closed)
    return game_text(shown, marks, tags)


class Tasks:
    """The dialect-B tasks of every connection."""

    def __init__(self, settings: Settings, id_prefix: str, epoch: float = 0.0) -> None:
        self.settings = settings
        self.id_prefix = id_prefix
        self.epoch = epoch
        """Added to the link's clock for the tasks' times, which are unix times in the app (notes §3)."""
        self.sequence = 0
        self.tasks: collections.OrderedDict[str, Task] = collections.OrderedDict()
        self.running: dict[tuple[str, str], Task] = {}
        self.infos: dict[str, list[str]] = {}
        self.idle: dict[str, Task] = {}
        """Character -> its running idle task: a repeated idle_timeout gets it again while it is PENDING."""
        self.counters: collections.Counter[str] = collections.Counter()
        self.expiring = Expiring()

    def owns(self, session: str, id: str) -> bool:
        return (session, id) in self.running

    def connected(self, conn: int) -> list[Effect]:
        """The app pushes its settings to a client that connects (notes §1)."""
        return [Answer(conn, b_loaded_settings(self.settings.mod, "Crazy", {}))]

    def action(self, conn: int, obj: object, now: float) -> list[Effect]:
        parsed = parse_b(obj)
        self.counters["b_actions"] += 1
        if isinstance(parsed, Malformed):
            return [Answer(conn, b_error(f"Malformed request: {parsed.reason}"))]
        if parsed.action == "create_task":
            return self._create(conn, parsed, now)
        if parsed.action == "get_task_status":
            if not parsed.task_uid:
                return [Answer(conn, b_error("Missing task_uid"))]
            task = self.tasks.get(parsed.task_uid)
            if task is None:
                return [Answer(conn, b_error(f"Task {parsed.task_uid} not found"))]
            return [Answer(conn, b_task_status(task.body(), silero_connected=self.settings.voice,
                                               game_master=parsed.character == "GameMaster",
                                               gm_voice=self.settings.mod.gm_voice))]
        if parsed.action == "get_settings":
            return [Answer(conn, b_loaded_settings(self.settings.mod, parsed.character, {}))]
        return [Answer(conn, b_error(f"Unknown action: {parsed.action}"))]

    def _create(self, conn: int, action: BAction, now: float) -> list[Effect]:
        infos = self.infos.setdefault(action.character, [])
        if action.type == "system_info":
            if action.message:
                infos[:] = [*infos, action.message][-INFOS_KEPT:]
            return [Answer(conn, b_info(len(infos)))]
        if action.type == "react":
            return [Answer(conn, b_aborted(action.character, action.type, action.req_id, "React disabled by settings"))]
        if action.type == "system_info_flush" and not infos:
            return [Answer(conn, b_aborted(action.character, action.type, action.req_id,
                                           "No pending system_info to flush"))]
        if action.type not in ("answer", "idle_timeout", "system_info_flush"):
            return [Answer(conn, b_aborted(action.character, action.type, action.req_id,
                                           f"Unknown event type: {action.type}"))]
        idle = self.idle.get(action.character)
        if action.type == "idle_timeout" and idle is not None and idle.status == "PENDING":
            return [Answer(conn, b_task_update(idle.body()))]  # the app's re-send (create_task.py:148-155)
        label = self.settings.event_label or self.settings.headings[6]
        if action.type == "answer":
            text = action.message
        elif action.type == "idle_timeout":
            text = f"{label}\n{IDLE_EVENT}"
        else:
            text = "\n".join((label, *infos))
        notes = [self.settings.headings[5], *infos] if infos and action.type != "system_info_flush" else []
        infos.clear()
        effects: list[Effect] = []
        if action.type == "answer":  # the player spoke: what the characters were saying stops
            for task in list(self.running.values()):
                effects += self._cancel(task, "barge-in: the player spoke in the game", now)
        self.sequence += 1
        uid = f"{self.id_prefix}b{self.sequence:06d}"
        data: dict[str, object] = {"character": action.character, "event_type": action.type, "message": action.message}
        if action.req_id:
            data["req_id"] = action.req_id
        session = SESSION_PREFIX + action.character
        task = Task(uid=uid, conn=conn, type="idle" if action.type == "idle_timeout" else "chat", data=data,
                    created_at=now + self.epoch, updated_at=now + self.epoch, session=session, moved=now)
        self.tasks[uid] = task
        if action.type == "idle_timeout":
            self.idle[action.character] = task
        while len(self.tasks) > TASKS_KEPT:
            self.tasks.popitem(last=False)
        self.running[(session, uid)] = task
        character = self.settings.character(action.character)
        state = state_lines(self.settings, action)
        system = "\n".join((*state, *notes))
        self.counters["b_tasks"] += 1
        return [*effects, Answer(conn, b_task_update(task.body())),
                Publish(session, uid, Request(text=text, persona=character.persona, voice=character.voice,
                                              profile=character.profile, system=system, playback="client"))]

    # --- from the bus ---------------------------------------------------------------------------

    def bus(self, message: Message[Body], now: float) -> list[Effect]:
        """llm.done gives the text (VOICING), the final chunk's last audio frame the voice (SUCCESS);
        the final chunk follows llm.done, and its audio the chunk."""
        task = self.running.get((message.session, message.id))
        if task is None:
            return []
        body = message.body
        task.moved = now
        if isinstance(body, LlmDone):
            return self._written(task, body, now)
        if isinstance(body, Chunk):
            task.spoken = task.spoken or bool(body.text.strip())
            task.chunks[body.index] = len(body.text)
        if isinstance(body, Audio) and self.settings.voice:  # the first chunks are spoken before llm.done
            if body.pcm:
                task.pieces.append((body.pcm, AudioFormat(body.rate, body.channels, body.width)))
            if body.last and body.final and task.status == "VOICING":
                pieces, task.pieces = tuple(task.pieces), []
                if pieces:
                    return [MakeWav(task.session, task.uid, -1, pieces)]
                if task.spoken:
                    return [Log(logging.WARNING, f"{task.data['character']}: the reply has no voice: the speech "
                                                 f"engine failed"),
                            *self._end(task, "FAILED_ON_VOICEOVER", now, error="the speech engine failed")]
                return self._end(task, "SUCCESS", now)  # nothing speakable: tags or punctuation only
        return []

    def _written(self, task: Task, done: LlmDone, now: float) -> list[Effect]:
        if done.status == "error":
            return [Log(logging.WARNING, f"{task.data['character']}: the reply failed: {done.error}"),
                    *self._end(task, "FAILED_ON_GENERATION", now, error=done.error or "the reply failed")]
        if done.status == "interrupted":  # cancelled outside the game (a barge-in here ends the task first)
            return self._end(task, "CANCELLED", now, error="interrupted")
        response = reply_text(done.text, self.settings.tags)
        task.result = {"response": response}
        if not self.settings.voice or not response.strip():
            return self._end(task, "SUCCESS", now)
        task.status, task.updated_at = "VOICING", now + self.epoch
        return [Answer(task.conn, b_task_update(task.body()))]

    def wav_failed(self, session: str, id: str, why: str, now: float) -> list[Effect]:
        """The voice file could not be written: the text stands, the voice failed (as the app says)."""
        task = self.running.get((session, id))
        if task is None:
            return []
        return [Log(logging.ERROR, f"cannot write a voice file ({why})"),
                *self._end(task, "FAILED_ON_VOICEOVER", now, error=f"cannot write the voice file: {why}")]

    def wav_ready(self, session: str, id: str, index: int, file: str, shown: str, duration: float,
                  now: float) -> list[Effect]:
        """The task's voice file is written: SUCCESS. The game deletes what it loads; what it never
        loads goes after game.file_ttl_s, as in dialect A."""
        task = self.running.get((session, id))
        if task is None:
            return [Delete(file)]
        task.result["voiceover_path"] = shown
        self.expiring.add(file, now + self.settings.file_ttl_s)
        return [*self._end(task, "SUCCESS", now), *self._heard(task)]

    @staticmethod
    def _heard(task: Task) -> list[Effect]:
        """The playback reports of a voice handed to the game, which reports nothing back: the whole
        reply taken as heard, so history records it as it does for the daemon's player (an estimate)."""
        if not task.chunks:
            return []
        last = max(task.chunks)
        return [Publish(task.session, task.uid, Playback(event="started", chunk=min(task.chunks))),
                *(Publish(task.session, task.uid, Playback(event="finished", chunk=index, final=index == last,
                                                            heard=1.0, heard_chars=chars))
                  for index, chars in sorted(task.chunks.items()))]

    def tick(self, now: float) -> list[Effect]:
        """Files the game never loaded go; a task the daemon stopped answering fails."""
        effects = self.expiring.due(now)
        for task in [one for one in self.running.values() if now - one.moved >= self.settings.stall_s]:
            effects += [Log(logging.WARNING, f"{task.data['character']}: the reply stalled (nothing from the daemon "
                                             f"for {self.settings.stall_s:g} s)"),
                        Publish(task.session, task.uid, Cancel(reason="the game link saw the reply stall")),
                        *self._end(task, "FAILED", now, error="the reply stalled")]
        return effects

    def stop(self) -> list[Effect]:
        """The link is stopping: the running tasks' replies are cancelled (nobody will hear them), and
        every file it handed out goes. A task of a connection that closed goes on, as in the app,
        where get_task_status from a new connection finds it."""
        effects: list[Effect] = [Publish(task.session, task.uid, Cancel(reason="voxpipe game is stopping"))
                                 for task in self.running.values()]
        self.running.clear()
        self.idle.clear()
        return effects + self.expiring.all()

    def _cancel(self, task: Task, why: str, now: float) -> list[Effect]:
        return [*self._end(task, "CANCELLED", now, error=why), Publish(task.session, task.uid, Cancel(reason=why))]

    def _end(self, task: Task, status: str, now: float, error: str | None = None) -> list[Effect]:
        self.running.pop((task.session, task.uid), None)
        if self.idle.get(str(task.data["character"])) is task:
            del self.idle[str(task.data["character"])]
        task.status, task.updated_at, task.error = status, now + self.epoch, error
        task.pieces = []
        return [Answer(task.conn, b_task_update(task.body()))]
