"""The CLI front-ends as a person meets them: say and chat on a real pty, tap, help, --config anywhere."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.harness import PYTHON, ROOT, Daemon, base_env, fake_openai, heartbeat_pids, openai_settings, write_toml
from tests.terminal import CTRL_C, CTRL_D, ENTER, Terminal
from voxpipe import protocol
from voxpipe.cli import build_parser
from voxpipe.runtime import Connection, endpoints_for

KEY = {"FAKE_OPENAI_KEY": "test-key"}
PROMPT = r"you> "
LONG = "please tell me a long story " * 7
"""About 230 characters of reply in 3-character pieces: about 4 s of streaming at 50 ms a piece."""


def watch(daemon: Daemon, session: str, *kinds: str) -> Connection:
    watcher = Connection("test-watch", endpoints_for(daemon.config()),
                         [protocol.subscription(kind, session) for kind in kinds])
    watcher.open(timeout=30)
    return watcher


def wait_for(watcher: Connection, kind: str, timeout: float = 30.0) -> protocol.Message:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = watcher.receive(1.0)
        if message is not None and message.kind == kind:
            return message
    raise AssertionError(f"no {kind} within {timeout} s")


# --- say -------------------------------------------------------------------------------------------

def test_ctrl_c_in_say_cancels_the_reply_everywhere_and_exits_130() -> None:
    with fake_openai(delay=0.05) as url, Daemon({**openai_settings(url)}, env=KEY) as daemon:
        watcher = watch(daemon, "cli", "llm.done", "playback")
        term = Terminal(daemon.cli("say", LONG, "--timeout", "60"), env=daemon.env, cwd=ROOT)
        try:
            term.expect(r"Echo: please tell")
            at = term.mark()
            term.press(CTRL_C)
            term.expect(r"\[interrupted\]", timeout=15, after=at)
            assert term.wait(15) == 130
        finally:
            term.close()
        done = wait_for(watcher, "llm.done")
        assert done.body.status == "interrupted" and len(done.body.text) < len("Echo: " + LONG)
        watcher.close()


def test_say_joins_its_words_and_refuses_an_empty_message() -> None:
    with fake_openai() as url, Daemon(openai_settings(url), env=KEY) as daemon:
        result = daemon.run_cli("say", "hello", "there", "friend")
        assert result.returncode == 0, result.stderr
        assert result.stdout == "Echo: hello there friend. Done  here.\n"
        empty = daemon.run_cli("say", "  ")
        assert empty.returncode == 2 and empty.stdout == ""
        assert "say needs a message" in empty.stderr


def test_an_unknown_profile_is_a_usage_error_said_once() -> None:
    with fake_openai() as url, Daemon(openai_settings(url), env=KEY) as daemon:
        result = daemon.run_cli("say", "hi", "--profile", "nosuch")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("unknown profile 'nosuch'") == 1, result.stderr


def test_a_failed_reply_is_reported_once_without_blank_lines() -> None:
    settings = openai_settings("http://127.0.0.1:9/v1")  # nothing listens on the discard port
    settings["llm"]["profiles"]["fake"].update({"retries": 0, "connect_timeout_s": 1.0})
    with Daemon(settings, env=KEY) as daemon:
        result = daemon.run_cli("say", "hi")
    assert result.returncode == 1 and result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "voxpipe:" in lines[0], result.stderr


def test_a_reply_cut_by_a_guard_says_so() -> None:
    with fake_openai() as url:
        settings = openai_settings(url)
        settings["llm"]["profiles"]["fake"]["stop_strings"] = ["Done"]
        with Daemon(settings, env=KEY) as daemon:
            result = daemon.run_cli("say", "cut me")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Echo: cut me. \n[cut: stop_string]\n"


# --- tap -------------------------------------------------------------------------------------------

def test_tap_with_no_daemon_fails_at_once(tmp_path: Path) -> None:
    started = time.monotonic()
    result = subprocess.run([PYTHON, "-m", "launcher", "tap"], cwd=ROOT, capture_output=True, text=True,
                            env=base_env({"VOXPIPE_BUS__RUNTIME_DIR": str(tmp_path / "run")}), timeout=30)
    assert time.monotonic() - started < 5  # a bound on a hang; it takes about 0.2 s
    assert result.returncode == 1
    assert "no voxpipe bus is running" in result.stderr and "voxpipe run" in result.stderr


def test_tap_hides_heartbeats_unless_asked_and_refuses_unknown_kinds() -> None:
    with fake_openai() as url, Daemon(openai_settings(url), env=KEY) as daemon:
        outputs = {}
        for name, extra in (("plain", []), ("beats", ["--heartbeats"])):
            tap = subprocess.Popen(daemon.cli("tap", *extra), cwd=ROOT, env=daemon.env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            time.sleep(1.0)
            daemon.run_cli("say", "tapped")
            time.sleep(2.5)  # heartbeats come every second or so
            tap.terminate()
            outputs[name] = tap.communicate(timeout=10)[0]
        unknown = daemon.run_cli("tap", "bogus")
    assert " request " in outputs["plain"] and " heartbeat " not in outputs["plain"]
    assert " heartbeat " in outputs["beats"]
    assert unknown.returncode == 2 and "unknown message kind 'bogus'" in unknown.stderr


# --- --config anywhere, relative paths, help -------------------------------------------------------

def _command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths += _command_paths(sub, (*prefix, name)) or [(*prefix, name)]
    return paths


POSITIONALS = {"stage": ["llm"], "say": ["hi"], "show": ["s"], "export": ["s"], "import": ["f.json"],
               "clear": ["s"]}


@pytest.mark.parametrize("path", _command_paths(build_parser()), ids=" ".join)
def test_config_is_taken_before_or_after_every_subcommand(path: tuple[str, ...]) -> None:
    extra = POSITIONALS.get(path[-1], [])
    after = build_parser().parse_args([*path, *extra, "--config", "x.toml"])
    before = build_parser().parse_args(["--config", "x.toml", *path, *extra])
    assert after.config == before.config == "x.toml"


@pytest.mark.parametrize("path", _command_paths(build_parser()), ids=" ".join)
def test_every_help_has_a_one_line_description(path: tuple[str, ...]) -> None:
    result = subprocess.run([PYTHON, "-m", "launcher", *path, "--help"], cwd=ROOT, env=base_env(),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    paragraphs = result.stdout.split("\n\n")
    assert len(paragraphs) > 2 and paragraphs[1].strip().endswith(".") and "\n" not in paragraphs[1].strip()


def test_help_shows_defaults_and_stats_refuses_a_negative_count() -> None:
    say = subprocess.run([PYTHON, "-m", "launcher", "say", "--help"], cwd=ROOT, env=base_env(),
                         capture_output=True, text=True, timeout=30).stdout
    assert "(default: cli)" in " ".join(say.split()) and "(default: 120.0)" in " ".join(say.split())
    stats = subprocess.run([PYTHON, "-m", "launcher", "stats", "--last", "-5"], cwd=ROOT, env=base_env(),
                           capture_output=True, text=True, timeout=30)
    assert stats.returncode == 2 and "at least 1" in stats.stderr


def test_a_relative_config_works_for_run_stage_and_every_front_end() -> None:
    with fake_openai() as url:
        work = Path(tempfile.mkdtemp(prefix="vp-rel-"))
        try:
            settings = openai_settings(url)
            settings.update({"bus": {"runtime_dir": str(work / "run")}, "history": {"db_path": str(work / "h.db")},
                             "player": {"backend": "null"}})
            write_toml(work / "v.toml", settings)
            env = base_env(KEY)
            run = subprocess.Popen([PYTHON, str(ROOT / "launcher.py"), "run", "--config", "v.toml"], cwd=work,
                                   env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   start_new_session=True)
            try:
                deadline = time.monotonic() + 60
                log = ""
                while "voxpipe ready" not in log:
                    assert time.monotonic() < deadline and run.poll() is None, log
                    log += run.stdout.readline()

                def cli(*args: str) -> subprocess.CompletedProcess[str]:
                    return subprocess.run([PYTHON, str(ROOT / "launcher.py"), *args], cwd=work, env=env,
                                          capture_output=True, text=True, timeout=60)

                assert cli("say", "relative", "--config", "v.toml").stdout == "Echo: relative. Done  here.\n"
                assert cli("status", "--config", "v.toml").returncode == 0
                assert cli("history", "list", "--config", "v.toml").returncode == 0
                assert "relative" in cli("history", "show", "cli", "--config", "v.toml").stdout
                assert cli("stats", "--config", "v.toml").returncode == 0
                term = Terminal([PYTHON, str(ROOT / "launcher.py"), "chat", "--config", "v.toml"], env=env, cwd=work)
                try:
                    term.expect(PROMPT)
                    term.type("from chat")
                    term.press(ENTER)
                    term.expect(r"Echo: from chat\.")
                    term.press(CTRL_D)
                finally:
                    term.close()
                tap = subprocess.Popen([PYTHON, str(ROOT / "launcher.py"), "tap", "--config", "v.toml"], cwd=work,
                                       env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                time.sleep(1.5)
                assert tap.poll() is None, tap.communicate()[1]  # attached, waiting for traffic
                tap.terminate()
                tap.wait(10)
                stage = subprocess.Popen([PYTHON, str(ROOT / "launcher.py"), "stage", "chunker", "--config",
                                          "v.toml", "--shard", "1/2"], cwd=work, env=env,
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                time.sleep(2.0)
                assert stage.poll() is None, stage.communicate()[0]  # a second chunker shard, running
                stage.terminate()
                stage.wait(10)
            finally:
                os.killpg(run.pid, 15)
                run.wait(15)
        finally:
            shutil.rmtree(work, ignore_errors=True)


# --- chat ------------------------------------------------------------------------------------------

def chat(daemon: Daemon, session: str, *extra: str) -> Terminal:
    return Terminal(daemon.cli("chat", "--session", session, "--timeout", "30", *extra), env=daemon.env, cwd=ROOT)


def test_chat_shows_a_waiting_mark_and_cuts_and_sends_the_chosen_voice() -> None:
    with fake_openai(delay=0.02) as url:
        settings = openai_settings(url)
        settings["llm"]["profiles"]["fake"]["stop_strings"] = ["Done"]
        with Daemon(settings, env=KEY) as daemon:
            watcher = watch(daemon, "tty5", "request")
            term = chat(daemon, "tty5")
            try:
                term.expect(PROMPT)
                term.type("/stream off")
                term.press(ENTER)
                term.expect(r"\[streaming: off\]")
                at = term.mark()
                term.type("wait for it")
                term.press(ENTER)
                term.expect("…", after=at)  # shown until the whole reply arrives
                term.expect(r"Echo: wait for it\..*\[cut: stop_string\]", after=at)
                term.expect(PROMPT, after=at)
                assert wait_for(watcher, "request").body.voice == ""
                term.type("/voice ru")
                term.press(ENTER)
                term.expect(r"\[voice: ru\]")
                term.type("privet")
                term.press(ENTER)
                assert wait_for(watcher, "request").body.voice == "ru"
                term.expect(r"Echo: privet\..*" + PROMPT)
                term.press(CTRL_D)
                assert term.wait(30) == 0, term.screen
            finally:
                term.close()
                watcher.close()


def test_chat_says_when_the_daemon_is_gone_and_asks_again_when_it_is_back() -> None:
    with fake_openai() as url, Daemon(openai_settings(url), env=KEY) as daemon:
        term = chat(daemon, "tty6")
        try:
            term.expect(PROMPT)
            daemon.stop()
            at = term.mark()
            term.type("are you there")
            term.press(ENTER)
            asked = time.monotonic()
            term.expect(r"the daemon is not reachable", timeout=10, after=at)
            assert time.monotonic() - asked < 5  # within about 2 s; the bound only catches a hang
            daemon.start()
            term.expect(r"the daemon is back; asking again.*Echo: are you there\.", timeout=60, after=at)
            term.expect(PROMPT, after=at)
            term.press(CTRL_D)
            assert term.wait(30) == 0, term.screen
        finally:
            term.close()


def test_ctrl_c_at_the_chat_prompt_quits_cleanly() -> None:
    with fake_openai() as url, Daemon(openai_settings(url), env=KEY) as daemon:
        term = chat(daemon, "tty7")
        try:
            term.expect(PROMPT)
            term.press(CTRL_C)
            assert term.wait(15) == 0
        finally:
            term.close()


def test_chat_shows_each_command_tag_where_it_stood_and_refused_ones_only_as_a_note() -> None:
    """Tags at the start, in the middle and at the end of a sentence (a chunk), and a refused one."""
    with fake_openai(delay=0.01) as url, Daemon(openai_settings(url), env=KEY) as daemon:
        term = chat(daemon, "tty8")
        try:
            term.expect(PROMPT)
            at = term.mark()
            term.type("<e>smile</e>Hello there! <c>wave,2</c>Nice to meet you<a>bow</a> <bogus>x</bogus>ok", 0.005)
            term.press(ENTER)
            term.expect(r"refused command bogus.*" + PROMPT, after=at)
            shown = term.screen[at:]
            reply = shown[shown.index("Echo:"):shown.index("[refused")]
            assert " ".join(reply.split()) == ("Echo: [e: smile] Hello there! [c: wave,2] Nice to meet you [a: bow] "
                                               "ok. Done [e: smile] here.")
            assert "x" not in reply.replace("Echo:", "")
            term.press(CTRL_D)
            assert term.wait(30) == 0, term.screen
        finally:
            term.close()


def test_chat_waits_for_a_refusal_that_comes_after_the_final_playback() -> None:
    """History publishes a reply's commands once it has llm.done and the final chunk; with a quick player
    that can be after the final playback, which ends the reply (CI saw it on a loaded machine). Here it
    always is: history is stopped until the test saw the final playback, and the note still shows
    before the prompt."""
    with fake_openai() as url, Daemon(openai_settings(url), env=KEY) as daemon:
        history = heartbeat_pids(daemon.runtime_dir, "history")["history"]
        watcher = watch(daemon, "tty10", "playback")
        term = chat(daemon, "tty10")
        try:
            term.expect(PROMPT)
            at = term.mark()
            os.kill(history, signal.SIGSTOP)
            try:
                term.type("<bogus>x</bogus>ok")
                term.press(ENTER)
                deadline = time.monotonic() + 60
                while not ((event := watcher.receive(1.0)) and isinstance(event.body, protocol.Playback)
                           and event.body.final):
                    assert time.monotonic() < deadline, term.screen
            finally:
                os.kill(history, signal.SIGCONT)
            term.expect(r"Echo: ok\. Done \[e: smile\] here\.\s+\[refused command bogus: unknown command <bogus>\]\s+"
                        + PROMPT, after=at)
            term.press(CTRL_D)
            assert term.wait(30) == 0, term.screen
        finally:
            term.close()
            watcher.close()


def test_chat_says_when_history_is_not_there_to_judge_the_commands() -> None:
    """Without history no `command` comes: chat says so once its heartbeat is missing, and prompts again."""
    with fake_openai() as url:
        settings = {**openai_settings(url), "run": {"stages": ["llm", "chunker", "tts", "player"]}}
        with Daemon(settings, env=KEY) as daemon:
            term = chat(daemon, "tty11")
            try:
                term.expect(PROMPT)
                at = term.mark()
                term.type("<bogus>x</bogus>ok")  # and the fake's <e>smile</e>: two commands
                term.press(ENTER)
                term.expect(r"here\.\s+\[history sent no word on 2 command\(s\) of this reply; check that it "
                            r"runs: `voxpipe status`\]\s+" + PROMPT, after=at)
                term.press(CTRL_D)
                assert term.wait(30) == 0, term.screen
            finally:
                term.close()


def test_chat_reports_a_failed_reply_once() -> None:
    settings = openai_settings("http://127.0.0.1:9/v1")  # nothing listens on the discard port
    settings["llm"]["profiles"]["fake"].update({"retries": 0, "connect_timeout_s": 1.0})
    with Daemon(settings, env=KEY) as daemon:
        term = chat(daemon, "tty9")
        try:
            term.expect(PROMPT)
            at = term.mark()
            term.type("hello?")
            term.press(ENTER)
            term.expect(r"\[error .*" + PROMPT, after=at)
            shown = term.screen[at:]
            assert shown.count("Connection refused") + shown.count("connect") >= 1
            assert "[the reply failed" not in shown, shown  # the error event already said it
            term.press(CTRL_D)
            assert term.wait(30) == 0
        finally:
            term.close()
